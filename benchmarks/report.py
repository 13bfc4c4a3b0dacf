"""Output of a benchmark run: the stdout table, results.json and PNG plots.

results.json is a list of rows, one per (workload, provider), each carrying
the run's environment (device, versions, git commit, time, command line), as
in Liger-Kernel's all_benchmark_data.csv. Plots (matplotlib, Agg backend):
  gbps_single.png  GB/s against tensor size per provider (single-tensor sweep),
                   with the measured copy bandwidth as a dashed line
  speedup.png      speedup over torch-fused per workload and provider
Used by benchmarks/run.py.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

BASELINE = "torch-fused"


def add_speedups(rows: List[Dict]) -> None:
    base = {r["workload"]: r["ms_median"] for r in rows
            if r["provider"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        b = base.get(r["workload"])
        r["speedup_vs_torch_fused"] = (b / r["ms_median"]
                                       if b is not None and r["status"] == "ok" else None)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: Sequence[Dict]) -> str:
    head = ["workload", "provider", "numel", "tensors", "ms", "p20..p80", "GB/s",
            "%copy", "x fused", "state MB", "status"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        lines.append([
            r["workload"], r["provider"], str(r["numel"]), str(r["n_tensors"]),
            _fmt(r["ms_median"], ".3f"),
            f"{r['p20']:.3f}..{r['p80']:.3f}" if ok else "-",
            _fmt(r["gbps"], ".2f"),
            _fmt(r["frac_copy_bw"] * 100 if ok else None, ".0f"),
            _fmt(r.get("speedup_vs_torch_fused"), ".2f"),
            _fmt(r["peak_mem_bytes"] / 2 ** 20 if r.get("peak_mem_bytes") is not None else None, ".1f"),
            r["status"] + (f" ({r['reason']})" if r.get("reason") else ""),
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        out.append("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())
    return "\n".join(out)


def profile_table(rows: Sequence[Dict]) -> Optional[str]:
    prof = [r for r in rows if r.get("prof_ops_per_step") is not None]
    if not prof:
        return None
    out = [f"{'workload':<14} {'provider':<22} {'ops/step':>9} {'us/op':>9} {'host ms/step':>13}  what; top ops"]
    for r in prof:
        out.append(f"{r['workload']:<14} {r['provider']:<22} {r['prof_ops_per_step']:>9.1f} "
                   f"{_fmt(r['prof_us_per_op'], '.2f'):>9} {r['prof_host_ms_per_step']:>13.3f}  "
                   f"{r['prof_what']}; {', '.join(r['prof_top_ops'])}")
    return "\n".join(out)


def write_json(rows: Sequence[Dict], path: str) -> None:
    with open(path, "w") as f:
        json.dump(list(rows), f, indent=1)


def plots(rows: Sequence[Dict], out_dir: str, copy_gbps: float, title: str) -> List[str]:
    """Write the PNGs; returns their paths (none if matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    written = []
    ok = [r for r in rows if r["status"] == "ok"]

    single = [r for r in ok if r["workload_kind"] == "single"]
    if single:
        fig, ax = plt.subplots(figsize=(8, 5))
        for prov in dict.fromkeys(r["provider"] for r in single):
            pts = sorted((r["numel"], r["gbps"]) for r in single if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
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
        fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(workloads) * max(len(provs), 1) / 2), 5))
        width = 0.8 / len(provs)
        for j, prov in enumerate(provs):
            xs, ys = [], []
            for i, w in enumerate(workloads):
                hit = [r for r in sped if r["workload"] == w and r["provider"] == prov]
                if hit:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(hit[0]["speedup_vs_torch_fused"])
            ax.bar(xs, ys, width=width, label=prov)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(workloads, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log", base=2)
        ax.set_ylabel(f"speedup over {BASELINE} (higher is faster)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, "speedup.png")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
