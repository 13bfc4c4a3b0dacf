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
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

BASELINE = "torch-fused"
SPEEDUP_KEYS = ("speedup_vs_torch_fused", "speedup_p20", "speedup_p80", "speedup_rounds")


def add_speedups(rows: List[Dict]) -> None:
    """Rows without a speedup (no baseline in the run, not timed) get None."""
    for r in rows:
        for k in SPEEDUP_KEYS:
            r.setdefault(k, None)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _range(lo, hi, spec: str) -> str:
    return "-" if lo is None or hi is None else f"{lo:{spec}}..{hi:{spec}}"


def table(rows: Sequence[Dict]) -> str:
    head = ["workload", "provider", "numel", "tensors", "ms", "p20..p80", "rounds", "GB/s",
            "%copy", "x fused", "x p20..p80", "state MB", "busy?", "status"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        lines.append([
            r["workload"], r["provider"], str(r["numel"]), str(r["n_tensors"]),
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
               "rounds x steps per round")
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
