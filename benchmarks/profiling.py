"""--profile: a torch.profiler trace of a few steps per provider and workload,
a summary of it, and the host cost of a step.

Writes DIR/trace_<provider>_<workload>.json (Chrome trace format: open in
chrome://tracing or https://ui.perfetto.dev). The summary counts, per step:
  GPU: CUDA kernels launched (memcpy/memset excluded) and their mean time;
  CPU: top-level aten ops (aten ops not called from another aten op) and
       fused_adamw's backend calls (the record_function ranges the package
       puts around each one, "fused_adamw::<backend>::<algo>_step"; aten ops
       inside them are not counted again), and their mean time;
  both: host time of the step (wall time of the record_function range
        around opt.step()).

Host cost (host_cost, profile_steps): the time one step spends outside the
native code that does the update, per tensor of the workload.
  fused_adamw backends with a native module (fused_adamw._cpu, ._cuda): the
    step's wall time minus the time inside that module's *_step functions,
    timed by wrapping them (NativeCallTimer) while the steps run without the
    profiler, cache flushed before each step as in the timed steps. What
    runs in between (Python, building the tensor table) is whatever the
    package does: the shim sees only the native call, so the number does not
    depend on how the Python side is organised. On CUDA the native call
    returns after the launch, so this is host time proper.
  every other provider: from the profiler trace, the step's range minus its
    top-level aten ops (profiler overhead included, caches warm): an
    approximate figure for comparison.
Named profiling.py, not profile.py, so as not to shadow the standard library
module when benchmarks/ is on sys.path. Used by benchmarks/run.py.
"""
from __future__ import annotations

import collections
import importlib
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

STEP_RANGE = "bench::optimizer_step"


def _in_step(evt) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name == STEP_RANGE:
            return True
        parent = parent.cpu_parent
    return False


_OP_PREFIXES = ("aten::", "fused_adamw::")


def _has_op_ancestor(evt) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith(_OP_PREFIXES):
            return True
        parent = parent.cpu_parent
    return False


def _has_aten_ancestor(evt) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profile_steps(step: Callable[[], None], device: torch.device, steps: int,
                  trace_path: Optional[str], trace_max_mb: Optional[float] = None) -> Dict[str, object]:
    """Profiles `steps` steps; writes the Chrome trace to trace_path unless it
    is larger than trace_max_mb (then it is deleted and the row says so:
    torch's per-tensor providers on 20000 tensors write 40-200 MB)."""
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    trace, trace_note = None, None
    if trace_path:
        os.makedirs(os.path.dirname(trace_path) or ".", exist_ok=True)
        prof.export_chrome_trace(trace_path)
        mb = os.path.getsize(trace_path) / 2**20
        if trace_max_mb is not None and mb > trace_max_mb:
            os.remove(trace_path)
            trace_note = f"trace of {mb:.0f} MB not kept (> --trace-max-mb {trace_max_mb:g})"
        else:
            trace = os.path.basename(trace_path)

    events = prof.events()
    step_events = [e for e in events if e.name == STEP_RANGE]
    host_ms = sum(e.time_range.elapsed_us() for e in step_events) / 1e3 / max(len(step_events), 1)
    if device.type == "cuda":
        ops = [e for e in events if e.device_type == DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset"))]
        what = "CUDA kernels"
    else:
        ops = [e for e in events if e.name.startswith(_OP_PREFIXES)
               and not _has_op_ancestor(e) and _in_step(e)]
        what = "top-level aten ops and fused_adamw calls"
    names = collections.Counter(e.name for e in ops)
    total_us = sum(e.time_range.elapsed_us() for e in ops)
    # Host time outside the top-level aten ops (the fused_adamw:: ranges hold
    # Python work too, so only aten ops count as native here).
    aten_us = sum(e.time_range.elapsed_us() for e in events
                  if e.name.startswith("aten::") and _in_step(e) and not _has_aten_ancestor(e)
                  and e.device_type == DeviceType.CPU)
    outside_ms = host_ms - aten_us / 1e3 / max(len(step_events), 1)
    return {
        "prof_host_outside_aten_ms_per_step": outside_ms,
        "prof_what": what,
        "prof_ops_per_step": len(ops) / steps,
        "prof_us_per_op": total_us / len(ops) if ops else None,
        "prof_host_ms_per_step": host_ms,
        "prof_top_ops": [f"{n} x{c / steps:g}" for n, c in names.most_common(3)],
        "trace": trace,
        "trace_note": trace_note,
    }


# ---------------------------------------------------------------- host cost

NATIVE_METHOD = "step wall minus {module}.*_step (timer shim, no profiler)"
PROFILER_METHOD = "profiler: step range minus top-level aten ops (warm caches, profiler on)"


class NativeCallTimer:
    """Wraps every function of a native module whose name ends in "_step"
    with a perf_counter timer, while inside the `with` block. The package's
    backends look the function up on the module at call time
    (`_cpu.adam_step(...)`), so the wrapper sees every native call."""

    def __init__(self, module) -> None:
        self.module = module
        self.seconds = 0.0
        self.calls = 0
        self._saved: Dict[str, Callable] = {}

    def _wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed

    def __enter__(self) -> "NativeCallTimer":
        for name in dir(self.module):
            fn = getattr(self.module, name)
            if name.endswith("_step") and callable(fn):
                self._saved[name] = fn
                setattr(self.module, name, self._wrap(fn))
        if not self._saved:
            raise AttributeError(f"{self.module.__name__} has no *_step function to time")
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(self.module, name, fn)
        self._saved.clear()


def host_cost(step: Callable[[], None], native_module: str, n_tensors: int,
              flush: Callable[[], None], sync: Callable[[], None], *,
              min_steps: int = 3, max_steps: int = 50, budget_s: float = 1.0) -> Dict[str, object]:
    """Per step: wall time minus the time inside native_module's *_step
    calls; the median over min_steps..max_steps steps (as many as fit in
    budget_s, flushes included). Keys: host_us_per_tensor, host_ms_per_step,
    native_ms_per_step, native_calls_per_step, host_steps, host_method."""
    module = importlib.import_module(native_module)
    host: List[float] = []
    native: List[float] = []
    calls: List[int] = []
    t_start = time.perf_counter()
    with NativeCallTimer(module) as timer:
        while len(host) < max_steps and (len(host) < min_steps
                                         or time.perf_counter() - t_start < budget_s):
            flush()
            sync()
            timer.seconds, timer.calls = 0.0, 0
            t0 = time.perf_counter()
            step()
            wall = time.perf_counter() - t0
            host.append(wall - timer.seconds)
            native.append(timer.seconds)
            calls.append(timer.calls)
    out: Dict[str, object] = {"host_method": NATIVE_METHOD.format(module=native_module),
                              "host_steps": len(host),
                              "native_calls_per_step": statistics.mean(calls)}
    if not any(calls):
        out["host_reason"] = f"no call to {native_module}.*_step seen during the step"
        return out
    h = statistics.median(host)
    out.update(host_ms_per_step=h * 1e3, native_ms_per_step=statistics.median(native) * 1e3,
               host_us_per_tensor=h * 1e6 / n_tensors)
    return out
