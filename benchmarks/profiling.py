"""--profile: a torch.profiler trace of a few steps per provider and workload,
and a summary of it.

Writes DIR/trace_<provider>_<workload>.json (Chrome trace format: open in
chrome://tracing or https://ui.perfetto.dev). The summary counts, per step:
  GPU: CUDA kernels launched (memcpy/memset excluded) and their mean time;
  CPU: top-level aten ops (aten ops not called from another aten op) and
       fused_adamw's backend calls (the record_function ranges dispatch.py
       puts around each one, "fused_adamw::<backend>::<algo>_step"; aten ops
       inside them are not counted again), and their mean time;
  both: host time of the step (wall time of the record_function range
        around opt.step()).
Named profiling.py, not profile.py, so as not to shadow the standard library
module when benchmarks/ is on sys.path. Used by benchmarks/run.py.
"""
from __future__ import annotations

import collections
import os
from typing import Callable, Dict, Optional

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


def profile_steps(step: Callable[[], None], device: torch.device, steps: int,
                  trace_path: Optional[str]) -> Dict[str, object]:
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP_RANGE):
                step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if trace_path:
        os.makedirs(os.path.dirname(trace_path) or ".", exist_ok=True)
        prof.export_chrome_trace(trace_path)

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
    return {
        "prof_what": what,
        "prof_ops_per_step": len(ops) / steps,
        "prof_us_per_op": total_us / len(ops) if ops else None,
        "prof_host_ms_per_step": host_ms,
        "prof_top_ops": [f"{n} x{c / steps:g}" for n, c in names.most_common(3)],
        "trace": os.path.basename(trace_path) if trace_path else None,
    }
