"""Benchmark and profiling harness for fused_adamw: times whole opt.step()
calls of this package's backends against torch.optim's implementations.

Run from the repository root (or anywhere):
  python benchmarks/run.py                      # default sweep on cuda if present, else cpu
  python benchmarks/run.py --quick              # a short sweep (under 2 minutes on 2 CPU cores)
  python benchmarks/run.py --workloads 4x16M gpt2 --providers torch-fused 'fused_adamw-*'
  python benchmarks/run.py --dtype bf16 --state-dtype fp32 --optimizer adamw --profile
  python benchmarks/run.py --dtype bf16 --precision kahan --workloads 4x16M  # storage options
  python benchmarks/run.py --help               # every option

Per workload: allocate random params and grads (one set, shared by the
providers); for each provider build the optimizer and take CHECK_STEPS steps
compared with torch.optim foreach, or under this package's storage options
(--state-dtype, --precision) with their float64 model in
fused_adamw.reference (check.py; a provider that fails is reported FAILED
and not timed); then time the providers that passed
interleaved, in rounds (timing.measure_interleaved: each round runs a few
steps of every provider in turn), so a busy spell of the machine hits them
alike; each row reports the median over rounds and the spread p20..p80, the
speedup over torch-fused is taken round by round, a row whose spread says
the machine was loaded is flagged "busy?" (timing.busy_reason), and each
row's timed steps are capped at about --row-seconds. Optionally profile a
few steps and measure the host cost of a step (--profile, profiling.py).
GB/s counts the bytes a step must move (providers.bytes_per_step: 28 B per
element for fp32 AdamW, and what each storage option reads and writes) and
is compared with the copy bandwidth measured at the start of the same run.
Output: a table on stdout, DIR/results.json, DIR/*.png, DIR/trace_*.json
with --profile (report.py). Default DIR: <temp dir>/fused_adamw-bench-
<device>-<UTC time>, outside the source tree.
Follows STYLE.md's benchmark rules; workloads are described in workloads.py.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import check  # noqa: E402
import profiling  # noqa: E402
import providers as prov  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402
import workloads as wl  # noqa: E402

# Defaults per (device, quick): workloads and single-tensor exponents. On the
# 2-core CPU the full sweep keeps to a few minutes and --quick to under two.
DEFAULTS = {
    ("cuda", False): (["single", *wl.MODEL_NAMES], list(range(12, 29))),
    ("cuda", True): (["single", "gpt2", "4x16M", "20000x1K"], list(range(12, 29, 2))),
    # The many-tensor workloads are where horizontal fusion pays on CPU; the
    # torch for-loop takes about a second per step on 20000x1K, so --quick
    # keeps only that one of the two.
    ("cpu", False): (["single", "4x16M", "2000x16K", "20000x1K", "resnet50", "gpt2"], list(range(12, 25, 2))),
    ("cpu", True): (["single", "4x16M", "20000x1K"], list(range(12, 23, 3))),
}
# Timing per device: rounds of interleaved steps, seconds of timed steps per
# row (workload x provider), at most this many timed steps per row. On this
# project's 2-core CPU a step costs at least the cache flush (2 x the last
# level cache: ~0.1 s for a 480 MiB L3), so a row gets 10-20 steps.
ROUNDS = 5
ROW_SECONDS = {("cpu", False): 2.0, ("cpu", True): 1.0, ("cuda", False): 1.0, ("cuda", True): 0.5}
MAX_STEPS = {"cpu": 200, "cuda": 1000}
# Elements the correctness check samples (see check.py).
CHECK_BUDGET = {"cpu": 2 ** 21, "cuda": 2 ** 24}
COPY_NUMEL = {"cpu": 2 ** 25, "cuda": 2 ** 28}


def default_out_dir(device_type: str, stamp: str) -> str:
    """<temp dir>/fused_adamw-bench-<device>-<stamp>: outside the source tree,
    so a run never leaves files in the checkout (--out names a folder)."""
    return os.path.join(tempfile.gettempdir(), f"fused_adamw-bench-{device_type}-{stamp}")


def parse_exponents(text: str) -> List[int]:
    """'12:24:2' (start:stop inclusive:stride) or '12,16,20'."""
    if ":" in text:
        parts = [int(x) for x in text.split(":")]
        start, stop = parts[0], parts[1]
        stride = parts[2] if len(parts) > 2 else 1
        return list(range(start, stop + 1, stride))
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a short sweep")
    ap.add_argument("--workloads", nargs="+", metavar="NAME",
                    help=f"from: {wl.SINGLE} {' '.join(wl.MODEL_NAMES)} (default: per device)")
    ap.add_argument("--sizes", type=parse_exponents, metavar="EXPS",
                    help="exponents k of the single-2^k sweep: '12:24:2' or '12,16,20'")
    ap.add_argument("--providers", nargs="+", metavar="NAME",
                    help="provider names, or prefixes ending in '*' (default: all available)")
    ap.add_argument("--optimizer", choices=[k.value for k in prov.OptimizerKind], default="adamw")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--state-dtype", choices=["fp32", "bf16"], default=None,
                    help="optimizer state dtype: fp32 for 16-bit params, bf16 for any "
                         "(fused_adamw only; torch providers keep state in the param dtype)")
    ap.add_argument("--precision", choices=[p.value for p in prov.Precision],
                    default=prov.Precision.NEAREST.value,
                    help="how 16-bit params take the update: nearest (round to nearest, "
                         "as torch), master (fp32 master weights), stochastic (stochastic "
                         "rounding, keyed on --seed), kahan (Kahan summation); fused_adamw "
                         "only, torch providers round to nearest")
    ap.add_argument("--amsgrad", action="store_true")
    ap.add_argument("--out", metavar="DIR",
                    help="output folder (default: <temp dir>/fused_adamw-bench-<device>-<UTC time>)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler trace and summary of a few steps per provider, and the "
                         "host cost of a step (time outside the native call, us per tensor)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--trace-max-mb", type=float, default=20.0, metavar="MB",
                    help="with --profile, keep a provider's Chrome trace only up to this size "
                         "(default 20; torch's per-tensor providers on 20000x1K write 40-200 MB)")
    ap.add_argument("--rounds", type=int, default=ROUNDS,
                    help=f"rounds of interleaved steps per workload (default {ROUNDS}, at least "
                         f"{timing.MIN_ROUNDS})")
    ap.add_argument("--row-seconds", type=float, metavar="S",
                    help="seconds of timed steps per row (workload x provider), flushes included; "
                         f"a provider leaves the rounds past {timing.CAP_SLACK} x S, after at least "
                         "one round (default: cpu 2, cuda 1; halved with --quick)")
    ap.add_argument("--compile-max-tensors", type=int, default=400,
                    help="skip torch-compiled above this many tensors")
    ap.add_argument("--no-flush", action="store_true",
                    help="do not flush the last-level cache before each timed step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.state_dtype == "fp32" and args.dtype == "fp32":
        ap.error("--state-dtype fp32 is for --dtype bf16 or fp16 (fp32 params keep fp32 state)")
    if args.precision != prov.Precision.NEAREST.value and args.dtype not in ("bf16", "fp16"):
        ap.error(f"--precision {args.precision} is for --dtype bf16 or fp16 (16-bit params); "
                 f"got --dtype {args.dtype}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    if args.rounds < timing.MIN_ROUNDS:
        ap.error(f"--rounds must be at least {timing.MIN_ROUNDS}: the spread needs them")
    if args.row_seconds is None:
        args.row_seconds = ROW_SECONDS[(args.device, args.quick)]
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _native_builds() -> Dict[str, object]:
    """Which build of each importable native module ran: its build_info(),
    file modification time and the first 12 hex digits of the file's
    SHA-256 (a dirty tree's git commit does not say which kernels were
    built from it)."""
    import hashlib
    import importlib
    out: Dict[str, object] = {}
    for name in prov.NATIVE_MODULES.values():
        try:
            mod = importlib.import_module(name)
            with open(mod.__file__, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()[:12]
            mtime = datetime.datetime.fromtimestamp(os.path.getmtime(mod.__file__), datetime.timezone.utc)
            info = mod.build_info() if hasattr(mod, "build_info") else None
        except (ImportError, OSError):
            continue
        out[name] = {"sha256": digest, "mtime_utc": mtime.isoformat(timespec="seconds"),
                     "build_info": info}
    return out


def environment(device: torch.device, command: str) -> Dict[str, object]:
    cpu = _cpu_model()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu_model": cpu,
        "cpu_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "triton_version": _version("triton"),
        "python_version": platform.python_version(),
        "git_commit": _git_commit(),
        "native_builds": _native_builds(),
        "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    seen = {}
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                s = v.untyped_storage()
                seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _base_row(workload: wl.Workload, provider: prov.Provider, cfg: prov.OptConfig) -> Dict[str, object]:
    row: Dict[str, object] = {
        "workload": workload.name, "workload_kind": workload.kind, "provider": provider.name,
        "optimizer": cfg.optimizer.value, "amsgrad": cfg.amsgrad,
        "dtype": prov.DTYPE_NAMES[cfg.dtype], "numel": workload.numel,
        "n_tensors": workload.n_tensors, "status": "ok", "reason": "",
        "ms_median": None, "p20": None, "p80": None, "ms_min": None, "ms_max": None,
        "round_ms": None, "rounds": None, "steps_per_round": None, "row_capped": None,
        "step_p20": None, "step_p80": None, "gbps": None, "frac_copy_bw": None,
        "steps_timed": None, "timed_s": None, "bytes_per_step": None, "peak_mem_bytes": None,
        "peak_mem_kind": None, "check_max_err": None, "check_sampled_numel": None,
        "check_oracle": None, "check_same_fraction": None,
        "first_steps_s": None, "busy": None, "busy_reason": "", "others_cpu": None,
        "note": cfg.note(),
    }
    # What this provider runs: the storage options go to fused_adamw only.
    if provider.is_package:
        row["state_dtype"] = prov.DTYPE_NAMES[cfg.state_dtype or cfg.dtype]
        row["precision"] = cfg.precision.value
    else:
        row["state_dtype"] = row["dtype"]
        row["precision"] = prov.Precision.NEAREST.value
        if cfg.has_options:
            row["note"] = "; ".join(n for n in (cfg.note(), cfg.torch_note()) if n)
    return row


def _mem_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _solo_step_peak(runner: prov.Runner, device: torch.device) -> int:
    """CUDA: bytes one step allocates above what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    runner.step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def run_workload(workload: wl.Workload, providers: Sequence[prov.Provider], cfg: prov.OptConfig,
                 device: torch.device, args: argparse.Namespace, flusher: timing.CacheFlusher,
                 out_dir: str) -> List[Dict[str, object]]:
    """Rows for one workload, one per provider (see the module docstring)."""
    rows = {p.name: _base_row(workload, p, cfg) for p in providers}
    job_s = {p.name: 0.0 for p in providers}
    todo = []
    for p in providers:
        skip = p.skip(workload, device, p.name in (args.providers or ()))
        if skip:
            rows[p.name].update(status="SKIPPED", reason=skip)
        else:
            todo.append(p)
    if not todo:
        return list(rows.values())

    params, grads = wl.make_tensors(workload, device, cfg.dtype, args.seed)
    runners: Dict[str, prov.Runner] = {}
    hints: Dict[str, float] = {}  # seconds per step seen in the check
    persistent: Dict[str, int] = {}
    try:
        # Correctness first, provider by provider, on the shared tensors.
        for p in todo:
            row = rows[p.name]
            t0 = time.perf_counter()
            mem0 = _mem_bytes(device)
            runner = None
            try:
                runner = p.build(params, cfg)
                chk = check.check_provider(runner, params, cfg, CHECK_BUDGET[device.type])
                timing.sync(device)
            except Exception as e:  # report any provider failure as a row, keep sweeping
                if p.name == "torch-compiled":
                    row.update(status="SKIPPED", reason="torch.compile failed: " + _why(e))
                else:
                    row.update(status="ERROR", reason=_why(e))
                chk = None
            row["first_steps_s"] = time.perf_counter() - t0
            job_s[p.name] += row["first_steps_s"]
            if chk is not None:
                row["check_max_err"] = chk.max_err
                row["check_sampled_numel"] = chk.sampled_numel
                row["check_oracle"] = chk.oracle
                row["check_same_fraction"] = chk.same_fraction or None
                if not chk.ok:
                    row.update(status="FAILED", reason=chk.detail)
            if row["status"] != "ok":
                del runner
                gc.collect()
                wl.refill_(params, grads, args.seed)  # it may have written NaN or dropped a grad
                continue
            runners[p.name] = runner
            hints[p.name] = row["first_steps_s"] / check.CHECK_STEPS
            del runner
            gc.collect()  # the check's reference tensors
            persistent[p.name] = _mem_bytes(device) - mem0  # state (+ caches) of this optimizer
        if not runners:
            return list(rows.values())
        temporaries = ({n: _solo_step_peak(r, device) for n, r in runners.items()}
                       if device.type == "cuda" else {})

        meter = timing.LoadMeter()
        meter.start()
        res = timing.measure_interleaved({n: r.step for n, r in runners.items()}, device, flusher,
                                         rounds=args.rounds, row_seconds=args.row_seconds,
                                         max_steps=MAX_STEPS[device.type], step_hint_s=hints)
        others = meter.stop()

        for name, runner in runners.items():
            row = rows[name]
            job_s[name] += res.warmup_s[name] + res.timed_s[name]
            row["others_cpu"] = others
            if name in res.errors:  # e.g. out of memory: report it, keep sweeping
                row.update(status="ERROR", reason="while timing: " + _why(res.errors[name]))
            if not res.round_ms[name]:
                if row["status"] == "ok":
                    row.update(status="ERROR", reason="no round completed")
                continue
            rms = res.round_ms[name]
            nbytes = prov.bytes_per_step(cfg, workload.numel, workload.n_tensors, runner.state_dtype,
                                         runner.precision)
            ms = statistics.median(rms)
            gbps = nbytes / (ms * 1e-3) / 1e9
            row.update(ms_median=ms, p20=timing.quantile(rms, 0.2), p80=timing.quantile(rms, 0.8),
                       ms_min=min(rms), ms_max=max(rms), round_ms=rms, rounds=len(rms),
                       steps_per_round=res.steps_per_round[name], row_capped=res.capped(name),
                       step_p20=timing.quantile(res.step_ms[name], 0.2),
                       step_p80=timing.quantile(res.step_ms[name], 0.8),
                       steps_timed=len(res.step_ms[name]), timed_s=res.timed_s[name],
                       bytes_per_step=nbytes, gbps=gbps, frac_copy_bw=gbps / args.copy_gbps)
            if device.type == "cuda":
                row["peak_mem_bytes"] = persistent[name] + temporaries[name]
                row["peak_mem_kind"] = ("cuda: memory the optimizer keeps (state, caches) plus the "
                                        "temporaries of one step")
            else:
                row["peak_mem_bytes"] = _state_bytes(runner.opt)
                row["peak_mem_kind"] = "cpu: bytes of optimizer state tensors (temporaries not measured)"

        # Speedup over torch-fused, round by round; then the busy rule.
        base = res.round_ms.get(report.BASELINE) if report.BASELINE in runners else None
        for name in runners:
            row = rows[name]
            if row["ms_median"] is None:
                continue
            ratios = [b / m for b, m in zip(base, res.round_ms[name])] if base else []
            if ratios:
                row.update(speedup_vs_torch_fused=statistics.median(ratios),
                           speedup_p20=timing.quantile(ratios, 0.2),
                           speedup_p80=timing.quantile(ratios, 0.8), speedup_rounds=ratios)
            why = timing.busy_reason(res.round_ms[name], ratios, others)
            row.update(busy=bool(why), busy_reason=why)

        if args.profile:
            for name, runner in runners.items():
                row = rows[name]
                if row["status"] != "ok":
                    continue
                t0 = time.perf_counter()
                p = next(p for p in todo if p.name == name)
                # One step of a many-tensor for-loop is already ~10**5 trace events.
                steps = args.profile_steps if workload.n_tensors <= 1000 else 1
                path = os.path.join(out_dir, f"trace_{name}_{workload.name}.json")
                try:
                    row.update(profiling.profile_steps(runner.step, device, steps, path, args.trace_max_mb))
                    if p.native_module:
                        row.update(profiling.host_cost(
                            runner.step, p.native_module, workload.n_tensors, flusher,
                            lambda: timing.sync(device), budget_s=args.row_seconds))
                    else:
                        outside = row["prof_host_outside_aten_ms_per_step"]
                        row.update(host_method=profiling.PROFILER_METHOD, host_ms_per_step=outside,
                                   host_us_per_tensor=outside * 1e3 / workload.n_tensors)
                except Exception as e:  # the timing stands; say why there is no profile
                    row["reason"] = "profile failed: " + _why(e)
                job_s[name] += time.perf_counter() - t0
        return list(rows.values())
    finally:
        for name, s in job_s.items():
            rows[name]["job_s"] = s
        runners.clear()
        del params, grads
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _progress(total: int):
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="job", dynamic_ncols=True), True
    except ImportError:
        return None, False


def main(argv: Optional[Sequence[str]] = None,
         extra_providers: Sequence[prov.Provider] = ()) -> List[Dict[str, object]]:
    """Run the sweep; returns the rows also written to DIR/results.json.
    extra_providers are appended to the available ones (tests use this)."""
    if argv is None:  # sys.orig_argv (3.10+) keeps the interpreter's own flags
        command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    else:
        command = shlex.join(["python", "benchmarks/run.py", *argv])
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = prov.OptConfig(prov.OptimizerKind(args.optimizer), prov.DTYPES[args.dtype],
                         prov.DTYPES[args.state_dtype] if args.state_dtype else None,
                         args.amsgrad, prov.Precision(args.precision), args.seed)
    default_workloads, default_exps = DEFAULTS[(device.type, args.quick)]
    jobs_workloads = wl.resolve(args.workloads or default_workloads, args.sizes or default_exps)

    package, notes = prov.package_providers(device, cfg)
    available = prov.torch_providers(args.compile_max_tensors) + package + list(extra_providers)
    chosen = prov.select(available, args.providers)
    for n in notes:
        print(f"note: {n}")
    if cfg.note():
        print(f"note: {cfg.note()}")
    if cfg.torch_note():
        print(f"note: {cfg.torch_note()}")

    env = environment(device, command)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or default_out_dir(device.type, stamp)
    os.makedirs(out_dir, exist_ok=True)

    args.copy_gbps = timing.copy_bandwidth_gbps(device, COPY_NUMEL[device.type])
    flusher = timing.CacheFlusher(device, enabled=not args.no_flush)
    env.update(copy_bw_gbps=args.copy_gbps, cache_flush=not args.no_flush,
               package_notes=notes, rounds_planned=args.rounds, row_seconds=args.row_seconds)
    print(f"{env['device_name']} ({device.type}, {env['cpu_threads']} threads), "
          f"torch {env['torch_version']}, copy bandwidth {args.copy_gbps:.1f} GB/s; "
          f"{args.optimizer} {args.dtype}{' state ' + args.state_dtype if args.state_dtype else ''}"
          f"{' ' + args.precision if cfg.precision is not prov.Precision.NEAREST else ''}; "
          f"providers: {', '.join(p.name for p in chosen)}")
    print(f"{args.rounds} interleaved rounds per workload, about {args.row_seconds:g} s of timed "
          f"steps per row; output in {out_dir}")

    bar, have_tqdm = _progress(len(jobs_workloads) * len(chosen))
    say = bar.write if have_tqdm else print
    rows: List[Dict[str, object]] = []
    t_start = time.perf_counter()
    for i, w in enumerate(jobs_workloads):
        if have_tqdm:
            bar.set_description(w.name)
        else:
            print(f"[{i + 1}/{len(jobs_workloads)}] {w.name}", flush=True)
        for row in run_workload(w, chosen, cfg, device, args, flusher, out_dir):
            row.update(env)
            rows.append(row)
            name = f"{w.name:>14} {row['provider']:<22}"
            if row["status"] == "ok":
                say(f"{name} {row['ms_median']:9.3f} ms ({row['p20']:.3f}..{row['p80']:.3f} over "
                    f"{row['rounds']} rounds) {row['gbps']:7.1f} GB/s"
                    + ("  busy?" if row["busy"] else ""))
            else:
                say(f"{name} {row['status']}: {row['reason']}")
            if have_tqdm:
                bar.update(1)
    if have_tqdm:
        bar.close()
    wall = time.perf_counter() - t_start

    report.add_speedups(rows)
    print()
    print(report.table(rows))
    prof = report.profile_table(rows)
    if prof:
        print()
        print(prof)
    report.write_json(rows, os.path.join(out_dir, "results.json"))
    commit = env["git_commit"] or ""
    commit = commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")
    storage = (f" state {args.state_dtype}" if args.state_dtype else "") + \
        (f" {args.precision}" if cfg.precision is not prov.Precision.NEAREST else "")
    title = (f"{args.optimizer} {args.dtype}{storage}, {env['device_name']}, torch {env['torch_version']}, "
             f"{commit}"[:100])
    pngs = report.plots(rows, out_dir, args.copy_gbps, title)
    print(f"\n{len(rows)} rows in {wall:.1f} s; wrote {os.path.join(out_dir, 'results.json')}"
          + "".join(f", {os.path.basename(p)}" for p in pngs))
    return rows


if __name__ == "__main__":
    main()
