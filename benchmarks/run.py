"""Benchmark and profiling harness for fused_adamw: times whole opt.step()
calls of this package's backends against torch.optim's implementations.

Run from the repository root:
  python benchmarks/run.py                      # default sweep on cuda if present, else cpu
  python benchmarks/run.py --quick              # a short sweep (under 2 minutes on 2 CPU cores)
  python benchmarks/run.py --workloads 4x16M gpt2 --providers torch-fused 'fused_adamw-*'
  python benchmarks/run.py --dtype bf16 --state-dtype fp32 --optimizer adamw --profile
  python benchmarks/run.py --help               # every option

For every (workload, provider): allocate fresh random params and grads; build
the optimizer; take CHECK_STEPS steps and compare them with torch.optim
foreach (check.py; a provider that fails is reported FAILED and not timed);
warm up; time many steps (timing.py); optionally profile a few (--profile,
profiling.py); free everything. GB/s counts the bytes a step must move
(providers.bytes_per_step: 28 B per element for fp32 AdamW) and is compared
with the copy bandwidth measured at the start of the same run. Output: a
table on stdout, DIR/results.json, DIR/*.png, DIR/trace_*.json with
--profile (report.py). Default DIR: benchmarks/results/<device>-<UTC time>.
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
import subprocess
import sys
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
# Timing per device: minimum and maximum timed steps, seconds per measurement.
MIN_STEPS = {"cpu": 15, "cuda": 25}
MAX_STEPS = {"cpu": 60, "cuda": 200}
BUDGET_S = {"cpu": 0.3, "cuda": 0.2}
# Elements the correctness check samples (see check.py).
CHECK_BUDGET = {"cpu": 2 ** 21, "cuda": 2 ** 24}
COPY_NUMEL = {"cpu": 2 ** 25, "cuda": 2 ** 28}


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
    ap.add_argument("--state-dtype", choices=["fp32"], default=None,
                    help="fp32 optimizer state for 16-bit params (fused_adamw only; "
                         "torch providers keep state in the param dtype)")
    ap.add_argument("--amsgrad", action="store_true")
    ap.add_argument("--out", metavar="DIR", help="default: benchmarks/results/<device>-<UTC time>")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler trace and summary of a few steps per provider")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--min-steps", type=int, help="timed steps at least (cpu 15, cuda 25)")
    ap.add_argument("--compile-max-tensors", type=int, default=400,
                    help="skip torch-compiled above this many tensors")
    ap.add_argument("--no-flush", action="store_true",
                    help="do not flush the last-level cache before each timed step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.state_dtype and args.dtype == "fp32":
        ap.error("--state-dtype fp32 is for --dtype bf16 or fp16")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
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


def run_job(workload: wl.Workload, provider: prov.Provider, cfg: prov.OptConfig,
            device: torch.device, args: argparse.Namespace, flusher: timing.CacheFlusher,
            out_dir: str) -> Dict[str, object]:
    row: Dict[str, object] = {
        "workload": workload.name, "workload_kind": workload.kind, "provider": provider.name,
        "optimizer": cfg.optimizer.value, "amsgrad": cfg.amsgrad,
        "dtype": prov.DTYPE_NAMES[cfg.dtype], "numel": workload.numel,
        "n_tensors": workload.n_tensors, "status": "ok", "reason": "",
        "ms_median": None, "p20": None, "p80": None, "gbps": None, "frac_copy_bw": None,
        "steps_timed": None, "bytes_per_step": None, "peak_mem_bytes": None,
        "peak_mem_kind": None, "check_max_err": None, "check_sampled_numel": None,
        "first_steps_s": None, "note": cfg.note(),
    }
    row["state_dtype"] = prov.DTYPE_NAMES[cfg.state_dtype or cfg.dtype] if provider.is_package \
        else row["dtype"]
    if cfg.state_dtype is not None and not provider.is_package:
        row["note"] = f"torch keeps {row['dtype']} state (no fp32-state option)"
    skip = provider.skip(workload, device, provider.name in (args.providers or ()))
    if skip:
        row.update(status="SKIPPED", reason=skip)
        return row

    params, grads = wl.make_tensors(workload, device, cfg.dtype, args.seed)
    runner = None
    try:
        timing.sync(device)
        base_mem = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        try:
            runner = provider.build(params, cfg)
            t0 = time.perf_counter()
            chk = check.check_provider(runner, params, cfg, CHECK_BUDGET[device.type])
            timing.sync(device)
            row["first_steps_s"] = time.perf_counter() - t0
        except Exception as e:  # report any provider failure as a row, keep sweeping
            if provider.name == "torch-compiled":
                row.update(status="SKIPPED", reason="torch.compile failed: " + _why(e))
            else:
                row.update(status="ERROR", reason=_why(e))
            return row
        row["check_max_err"] = chk.max_err
        row["check_sampled_numel"] = chk.sampled_numel
        if not chk.ok:
            row.update(status="FAILED", reason=chk.detail)
            return row
        gc.collect()  # the check's reference tensors

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t = timing.measure(runner.step, device, flusher, warmup=2,
                               min_steps=args.min_steps or MIN_STEPS[device.type],
                               max_steps=max(MAX_STEPS[device.type], args.min_steps or 0),
                               budget_s=BUDGET_S[device.type])
        except Exception as e:  # e.g. out of memory: report it, keep sweeping
            row.update(status="ERROR", reason="while timing: " + _why(e))
            return row
        if device.type == "cuda":
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base_mem
            row["peak_mem_kind"] = ("cuda max_memory_allocated over the timed steps minus "
                                    "params and grads: state + temporaries")
        else:
            row["peak_mem_bytes"] = _state_bytes(runner.opt)
            row["peak_mem_kind"] = "cpu: bytes of optimizer state tensors (temporaries not measured)"
        nbytes = prov.bytes_per_step(cfg, workload.numel, workload.n_tensors, runner.state_dtype)
        gbps = nbytes / (t.ms_median * 1e-3) / 1e9
        row.update(ms_median=t.ms_median, p20=t.p20, p80=t.p80, steps_timed=t.steps,
                   bytes_per_step=nbytes, gbps=gbps, frac_copy_bw=gbps / args.copy_gbps)

        if args.profile:
            # One step of a many-tensor for-loop is already ~10**5 trace events.
            steps = args.profile_steps if workload.n_tensors <= 1000 else 1
            path = os.path.join(out_dir, f"trace_{provider.name}_{workload.name}.json")
            try:
                row.update(profiling.profile_steps(runner.step, device, steps, path))
            except Exception as e:  # the timing stands; say why there is no profile
                row["reason"] = "profile failed: " + _why(e)
        return row
    finally:
        del runner, params, grads
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
                         args.amsgrad)
    default_workloads, default_exps = DEFAULTS[(device.type, args.quick)]
    jobs_workloads = wl.resolve(args.workloads or default_workloads, args.sizes or default_exps)

    package, notes = prov.package_providers(device, cfg)
    available = prov.torch_providers(args.compile_max_tensors) + package + list(extra_providers)
    chosen = prov.select(available, args.providers)
    for n in notes:
        print(f"note: {n}")
    if cfg.note():
        print(f"note: {cfg.note()}")

    env = environment(device, command)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or os.path.join(HERE, "results", f"{device.type}-{stamp}")
    os.makedirs(out_dir, exist_ok=True)

    args.copy_gbps = timing.copy_bandwidth_gbps(device, COPY_NUMEL[device.type])
    flusher = timing.CacheFlusher(device, enabled=not args.no_flush)
    env.update(copy_bw_gbps=args.copy_gbps, cache_flush=not args.no_flush,
               package_notes=notes)
    print(f"{env['device_name']} ({device.type}, {env['cpu_threads']} threads), "
          f"torch {env['torch_version']}, copy bandwidth {args.copy_gbps:.1f} GB/s; "
          f"{args.optimizer} {args.dtype}{' state ' + args.state_dtype if args.state_dtype else ''}; "
          f"providers: {', '.join(p.name for p in chosen)}")

    jobs = [(w, p) for w in jobs_workloads for p in chosen]
    bar, have_tqdm = _progress(len(jobs))
    say = bar.write if have_tqdm else print
    rows: List[Dict[str, object]] = []
    t_start = time.perf_counter()
    for i, (w, p) in enumerate(jobs):
        if have_tqdm:
            bar.set_description(f"{w.name} {p.name}")
        else:
            print(f"[{i + 1}/{len(jobs)}] {w.name} {p.name}", flush=True)
        t_job = time.perf_counter()
        row = run_job(w, p, cfg, device, args, flusher, out_dir)
        row["job_s"] = time.perf_counter() - t_job
        row.update(env)
        rows.append(row)
        if row["status"] == "ok":
            say(f"{w.name:>14} {p.name:<22} {row['ms_median']:9.3f} ms {row['gbps']:7.1f} GB/s")
        else:
            say(f"{w.name:>14} {p.name:<22} {row['status']}: {row['reason']}")
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
    title = (f"{args.optimizer} {args.dtype}, {env['device_name']}, torch {env['torch_version']}, "
             f"{env['git_commit'] or ''}"[:120])
    pngs = report.plots(rows, out_dir, args.copy_gbps, title)
    print(f"\n{len(rows)} rows in {wall:.1f} s; wrote {os.path.join(out_dir, 'results.json')}"
          + "".join(f", {os.path.basename(p)}" for p in pngs))
    return rows


if __name__ == "__main__":
    main()
