"""Output of a benchmark run: the stdout table, results.json and PNG plots.

results.json is a list of rows, one per (workload, provider), each carrying
the run's environment (device, versions, git commit, time, command line), as
in Liger-Kernel's all_benchmark_data.csv. A row's ms_median, p20 and p80 are
over the rounds of interleaved steps (timing.py), its speedup is the median
of the round-by-round ratios with their p20..p80, and "busy?" marks a row
measured on a loaded machine (timing.busy_reason). Plots (matplotlib, Agg):
  gbps_single.png  GB/s against tensor size per provider (single-tensor sweep),
                   p20..p80 as error bars, each provider with its own marker
                   and line style so coinciding lines stay visible, busy
                   points circled in red, the copy bandwidth dashed
  speedup.png      speedup over torch-fused per workload and provider, bars
                   labelled with their value, p20..p80 as error bars, busy
                   bars hatched
Used by benchmarks/run.py.

Storage options against plain fp32 (precision_table): run the harness once
per option on one workload, a few times each, then

  python benchmarks/report.py --precision-table DIR [DIR ...]

tabulates, per workload, provider and storage (param dtype, state dtype,
precision), the median GB/s over the runs (each run's GB/s counts the bytes
that storage must move, providers.bytes_per_step) and its ratio to the plain
fp32 run's median GB/s of the same provider, workload and optimizer, against
the issue's target of PRECISION_TARGET (90%).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from typing import Dict, List, Optional, Sequence

BASELINE = "torch-fused"
SPEEDUP_KEYS = ("speedup_vs_torch_fused", "speedup_p20", "speedup_p80", "speedup_rounds")


def add_speedups(rows: List[Dict]) -> None:
    """Rows without a speedup (no baseline in the run, not timed) get None."""
    for r in rows:
        for k in SPEEDUP_KEYS:
            r.setdefault(k, None)


def storage(r: Dict) -> str:
    """'bf16/fp32 master': param dtype / state dtype and precision (rows
    written before the storage options have no precision: nearest)."""
    return f"{r['dtype']}/{r.get('state_dtype') or r['dtype']} {r.get('precision') or 'nearest'}"


def native_build(r: Dict) -> Optional[str]:
    """The SHA-256 prefix of the native module a fused_adamw-<backend> row
    ran (fused_adamw._<backend>), None for other providers or older rows."""
    if not r["provider"].startswith("fused_adamw-"):
        return None
    module = "fused_adamw._" + r["provider"].split("-", 1)[1]
    return ((r.get("native_builds") or {}).get(module) or {}).get("sha256")


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _range(lo, hi, spec: str) -> str:
    return "-" if lo is None or hi is None else f"{lo:{spec}}..{hi:{spec}}"


def table(rows: Sequence[Dict]) -> str:
    head = ["workload", "provider", "storage", "numel", "tensors", "ms", "p20..p80", "rounds",
            "GB/s", "%copy", "x fused", "x p20..p80", "state MB", "busy?", "status"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        lines.append([
            r["workload"], r["provider"], storage(r), str(r["numel"]), str(r["n_tensors"]),
            _fmt(r["ms_median"], ".3f"),
            _range(r["p20"], r["p80"], ".3f") if ok else "-",
            f"{r['rounds']}x{r['steps_per_round']}" if ok and r.get("rounds") else "-",
            _fmt(r["gbps"], ".2f"),
            _fmt(r["frac_copy_bw"] * 100 if ok else None, ".0f"),
            _fmt(r.get("speedup_vs_torch_fused"), ".2f"),
            _range(r.get("speedup_p20"), r.get("speedup_p80"), ".2f"),
            _fmt(r["peak_mem_bytes"] / 2 ** 20 if r.get("peak_mem_bytes") is not None else None, ".1f"),
            "busy?" if r.get("busy") else "",
            r["status"] + (f" ({r['reason']})" if r.get("reason") else ""),
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())
    busy = [r for r in rows if r.get("busy")]
    out.append("ms, p20..p80: over rounds of interleaved steps; x fused: median of the "
               "round-by-round speedups over torch-fused, with their p20..p80; rounds: "
               "rounds x steps per round; storage: param/state dtype, precision")
    if busy:
        out.append(f"busy? ({len(busy)} rows): the machine looked loaded while they were timed; "
                   "rerun before quoting them. Why:")
        for r in busy:
            out.append(f"  {r['workload']} {r['provider']}: {r['busy_reason']}")
    return "\n".join(out)


def profile_table(rows: Sequence[Dict]) -> Optional[str]:
    prof = [r for r in rows if r.get("prof_ops_per_step") is not None]
    if not prof:
        return None
    out = [f"{'workload':<14} {'provider':<22} {'ops/step':>9} {'us/op':>9} {'host ms/step':>13} "
           f"{'outside native':>15} {'us/tensor':>10}  what; top ops"]
    for r in prof:
        out.append(f"{r['workload']:<14} {r['provider']:<22} {r['prof_ops_per_step']:>9.1f} "
                   f"{_fmt(r['prof_us_per_op'], '.2f'):>9} {r['prof_host_ms_per_step']:>13.3f} "
                   f"{_fmt(r.get('host_ms_per_step'), '.3f'):>15} "
                   f"{_fmt(r.get('host_us_per_tensor'), '.3f'):>10}  "
                   f"{r['prof_what']}; {', '.join(r['prof_top_ops'])}")
    out.append("host ms/step: the profiled step's range. outside native, us/tensor: the step's "
               "host cost, time outside the native update, per step and per tensor:")
    for method in dict.fromkeys(r.get("host_method") for r in prof if r.get("host_method")):
        who = ", ".join(dict.fromkeys(r["provider"] for r in prof if r.get("host_method") == method))
        out.append(f"  {who}: {method}")
    for r in prof:
        if r.get("host_reason"):
            out.append(f"  {r['workload']} {r['provider']}: no host cost, {r['host_reason']}")
    return "\n".join(out)


PRECISION_TARGET = 0.9
PLAIN_FP32 = "fp32/fp32 nearest"


def precision_table(rows: Sequence[Dict], target: float = PRECISION_TARGET,
                    skip_busy: bool = False) -> str:
    """GB/s of each storage against plain fp32 (module docstring). rows: the
    rows of any number of runs; timed rows ("ok") of one workload, provider,
    optimizer and storage are pooled, their median GB/s compared with the
    median of the plain fp32 rows of the same workload, provider and
    optimizer. A run's row counts as one sample whatever its rounds. Rows
    of different builds of a provider's native module (native_build) are
    not pooled. skip_busy: leave out rows flagged busy? (timing.busy_reason)."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        if skip_busy and r.get("busy"):
            continue
        if r.get("status") == "ok" and r.get("gbps"):
            key = (r["workload"], r["provider"], native_build(r) or "-", r.get("optimizer", "adamw"),
                   storage(r))
            groups.setdefault(key, []).append(r)
    head = ["workload", "provider", "build", "optimizer", "storage", "B/elem", "runs", "ms", "GB/s",
            "GB/s min..max", "x plain fp32", f">= {target:.0%}", "busy runs"]
    lines = []
    for (work, prov, build, opt, stor), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][:4], kv[0][4] != PLAIN_FP32, kv[0][4])):
        gbps = [r["gbps"] for r in rs]
        med = statistics.median(gbps)
        base = groups.get((work, prov, build, opt, PLAIN_FP32))
        ratio = med / statistics.median(r["gbps"] for r in base) if base else None
        lines.append([work, prov, build, opt, stor, f"{rs[0]['bytes_per_step'] / rs[0]['numel']:.1f}",
                      str(len(rs)), f"{statistics.median(r['ms_median'] for r in rs):.3f}",
                      f"{med:.1f}", f"{min(gbps):.1f}..{max(gbps):.1f}", _fmt(ratio, ".2f"),
                      "-" if ratio is None else ("yes" if ratio >= target else "NO"),
                      str(sum(bool(r.get("busy")) for r in rs))])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip() for l in lines]
    out.append("build: SHA-256 prefix of the provider's native module (run.py's native_builds); "
               "storage: param/state dtype, precision; B/elem: bytes the step must move per "
               "element (providers.bytes_per_step); ms, GB/s: medians over the runs' rows; x plain "
               f"fp32: median GB/s over the plain fp32 rows' median ({PLAIN_FP32}, same workload, "
               "provider, build, optimizer)")
    return "\n".join(out)


def load_rows(paths: Sequence[str]) -> List[Dict]:
    """Rows of results.json files, or of the results.json in folders."""
    rows: List[Dict] = []
    for path in paths:
        if os.path.isdir(path):
            path = os.path.join(path, "results.json")
        with open(path) as f:
            rows += json.load(f)
    return rows


def write_json(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(list(rows), f, indent=1)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def plots(rows: Sequence[Dict], out_dir: str, copy_gbps: float, title: str) -> List[str]:
    """Write the PNGs; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    written = []
    ok = [r for r in rows if r["status"] == "ok"]

    single = [r for r in ok if r["workload_kind"] == "single"]
    if single:
        fig, ax = plt.subplots(figsize=(8, 5))
        provs = list(dict.fromkeys(r["provider"] for r in single))
        for j, prov in enumerate(provs):
            pts = sorted((r["numel"], r["gbps"], r) for r in single if r["provider"] == prov)
            xs = [p[0] for p in pts]
            ys = [p[1] for p in pts]
            # GB/s at the round p80 (slower) and p20 (faster) milliseconds.
            lo = [y - y * p[2]["ms_median"] / p[2]["p80"] for y, p in zip(ys, pts)]
            hi = [y * p[2]["ms_median"] / p[2]["p20"] - y for y, p in zip(ys, pts)]
            # Distinct marker, line style and decreasing marker size per
            # provider, half-transparent: lines that coincide stay visible.
            ax.errorbar(xs, ys, yerr=[lo, hi], marker=MARKERS[j % len(MARKERS)],
                        linestyle=LINESTYLES[j % len(LINESTYLES)], markersize=max(3, 9 - j),
                        alpha=0.75, capsize=2, linewidth=1.4, label=prov)
        busy = [r for r in single if r.get("busy")]
        if busy:
            ax.scatter([r["numel"] for r in busy], [r["gbps"] for r in busy], s=220,
                       facecolors="none", edgecolors="red", linewidths=1.2, zorder=5,
                       label="busy? (machine loaded)")
        ax.axhline(copy_gbps, linestyle="--", color="gray", label=f"copy {copy_gbps:.0f} GB/s")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements in the tensor")
        ax.set_ylabel("GB/s (bytes the step must move)")
        ax.set_title(f"single tensor: {title}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, "gbps_single.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    sped = [r for r in ok if r.get("speedup_vs_torch_fused") is not None]
    if sped:
        workloads = list(dict.fromkeys(r["workload"] for r in sped))
        provs = list(dict.fromkeys(r["provider"] for r in sped))
        fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(workloads) * len(provs)) + 2, 5))
        width = 0.8 / len(provs)
        handles = []
        for j, prov in enumerate(provs):
            hits = [(i, r) for i, w in enumerate(workloads) for r in sped
                    if r["workload"] == w and r["provider"] == prov]
            if not hits:
                continue
            xs = [i + (j - (len(provs) - 1) / 2) * width for i, _ in hits]
            ys = [r["speedup_vs_torch_fused"] for _, r in hits]
            err = [[max(0.0, y - (r.get("speedup_p20") or y)) for y, (_, r) in zip(ys, hits)],
                   [max(0.0, (r.get("speedup_p80") or y) - y) for y, (_, r) in zip(ys, hits)]]
            color = f"C{j % 10}"
            bars = ax.bar(xs, ys, width=width, color=color, yerr=err, capsize=2,
                          error_kw={"elinewidth": 0.8, "alpha": 0.7})
            handles.append(Patch(facecolor=color, label=prov))
            for bar, (_, r) in zip(bars, hits):
                if r.get("busy"):
                    bar.set_hatch("///")
                    bar.set_edgecolor("black")
                    bar.set_linewidth(0.5)
            ax.bar_label(bars, labels=[f"{y:.2f}" + ("?" if r.get("busy") else "")
                                       for y, (_, r) in zip(ys, hits)],
                         fontsize=6, rotation=90, padding=2)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.margins(y=0.15)
        ax.set_ylabel(f"speedup over {BASELINE} (higher is faster)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if any(r.get("busy") for r in sped):
            handles.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                                 label="busy? (machine loaded)"))
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        path = os.path.join(out_dir, "speedup.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Tables from benchmark results (benchmarks/run.py's "
                                             "results.json files or their folders).")
    ap.add_argument("paths", nargs="+", metavar="PATH", help="results.json files or their folders")
    ap.add_argument("--precision-table", action="store_true",
                    help="GB/s of each storage option against plain fp32 (default: the run table)")
    ap.add_argument("--target", type=float, default=PRECISION_TARGET,
                    help=f"the fraction of plain fp32's GB/s to meet (default {PRECISION_TARGET})")
    ap.add_argument("--skip-busy", action="store_true",
                    help="--precision-table: leave out rows flagged busy? (machine loaded)")
    cli = ap.parse_args()
    loaded = load_rows(cli.paths)
    print(precision_table(loaded, cli.target, cli.skip_busy) if cli.precision_table else table(loaded))
