"""Reproduction of Figure 2 of Loshchilov & Hutter, "Decoupled Weight Decay
Regularization" (ICLR 2019), at laptop scale: test error over a grid of base
learning rate x weight decay, one heatmap per optimizer.

The paper's claim (Figure 2; first findings of its introduction; Algorithms 1
and 2): with L2 regularization (SGD, Adam) the best weight decay depends on
the learning rate, so the good region of the lr x wd plane is a diagonal;
with decay decoupled from the gradient step and scaled by the schedule
multiplier eta_t only (SGDW, AdamW with decay_scaling="schedule") the two
become nearly independent and the good region lines up with the axes. A
fifth panel, AdamW with torch's decay_scaling="lr" (decay lr_t * wd), checks
that tying the decay to the base lr couples them again.

Setting (a small stand-in for the paper's ResNet on CIFAR-10): scikit-learn's
8x8 digits with a small training set (100 images, a fixed stratified split
per seed; the other 1697 are the test set), so that the network overfits and
regularization matters; an MLP 64-256-256-10 (--arch bn adds BatchNorm after
each hidden layer, closer to the paper's normalized ResNets); 200 epochs of
minibatches of 32; cosine annealing of the lr to zero stepped per iteration
(torch's CosineAnnealingLR, so eta_t = lr_t / base lr is the paper's
SetScheduleMultiplier); weight decay on every parameter, as in the paper;
SGD with momentum 0.9, Adam with the paper's betas and eps; every optimizer
is fused_adamw's C++ CPU kernel (backend="cpu").

Run from the repository root (one command; the default grid took 7.4 minutes on 2
shared cores, benchmarks/results/paper-figure/COMMAND.txt):
  python benchmarks/paper_figure.py                 # default grid -> benchmarks/results/paper-figure/
  python benchmarks/paper_figure.py --out DIR --seeds 2 --n-lr 5 --n-wd 5 --epochs 20
  python benchmarks/paper_figure.py --replot        # figures and summary from DIR/results.json only
  python benchmarks/paper_figure.py --arch bn --out DIR   # with BatchNorm (--augment: 1-pixel shifts)

Every training run (optimizer, lr, wd, seed) is written to DIR/results.json
as soon as it finishes; a rerun with the same training settings skips the
runs already there, so an interrupted sweep resumes where it stopped (and a
larger grid reuses the cells it shares with a smaller one). When every run
is in, the script writes the per-cell means, the per-panel metrics
(panel_metrics: how strongly the good region of each panel is tied to a
diagonal) into results.json, the figure DIR/paper_figure.png (test error)
and DIR/paper_figure_loss.png (test cross-entropy), and prints a table.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "paper-figure")

# The five panels. "decoupled" is how the decay enters: "l2" adds wd * p to
# the gradient (Algorithm 1/2 line 6), "schedule" is the paper's
# p <- p - eta_t * wd * p (Alg. 1 line 9, Alg. 2 line 12), "lr" is torch's
# p <- p - lr_t * wd * p = p - eta_t * (base lr * wd) * p.
OPTIMIZERS: Dict[str, dict] = {
    "SGD": dict(cls="SGD", kwargs=dict(momentum=0.9), decay="l2",
                title="SGD, L2 (fused_adamw.SGD)"),
    "SGDW": dict(cls="SGDW", kwargs=dict(momentum=0.9, decay_scaling="schedule"), decay="schedule",
                 title='SGDW, decay_scaling="schedule"'),
    "Adam": dict(cls="Adam", kwargs=dict(), decay="l2",
                 title="Adam, L2 (fused_adamw.Adam)"),
    "AdamW": dict(cls="AdamW", kwargs=dict(decay_scaling="schedule"), decay="schedule",
                  title='AdamW, decay_scaling="schedule"'),
    "AdamW-lr": dict(cls="AdamW", kwargs=dict(decay_scaling="lr"), decay="lr",
                     title='AdamW, decay_scaling="lr" (torch)'),
}

# Default grid per optimizer: (log10 lr low, high), (log10 wd low, high);
# --n-lr / --n-wd log-spaced points in between. The wd ranges differ per
# panel because the knob means different things: an L2 coefficient, a decay
# per step (schedule), or a decay per unit of lr (torch's "lr"); each range
# was chosen so that the panel's good region lies inside it, as the paper's
# panels also use different ranges. (SGDW's reaches higher than a per-step
# decay of lr * L2 factor suggests: with momentum 0.9 an L2 term in the
# buffer decays about 10x more per step than the same factor outside it.)
GRIDS: Dict[str, tuple] = {
    "SGD": ((-2.5, 0.0), (-5.0, -1.0)),
    "SGDW": ((-2.5, 0.0), (-29 / 6, -5 / 6)),
    "Adam": ((-4.0, -1.0), (-5.0, -1.0)),
    "AdamW": ((-4.0, -1.0), (-4.5, -0.5)),
    "AdamW-lr": ((-4.0, -1.0), (-2.5, 1.5)),
}

# Settings that change what a training run computes; results.json records
# them and a rerun only reuses runs made with the same ones.
TRAIN_DEFAULTS = dict(arch="plain", n_train=100, hidden=256, epochs=200, batch_size=32, augment=False)

# The margin that defines a panel's "good region": cells whose mean test
# error is within this factor of the panel's best cell.
REL_MARGIN = 1.10
# The usable region, whose upper edge panel_metrics' edge_slope follows.
EDGE_MARGIN = 1.5


# ---------------------------------------------------------------- training

_DATA_CACHE: dict = {}


def shifted(x: np.ndarray) -> np.ndarray:
    """The 9 copies of images x [n, 64] shifted by -1, 0, +1 pixels in each
    direction (blank border), shape [9, n, 64]: the augmentation draws one
    per sample and step, the 8x8 analogue of the paper's random crops."""
    img = np.pad(x.reshape(-1, 8, 8), ((0, 0), (1, 1), (1, 1)))
    return np.stack([img[:, 1 + dy:9 + dy, 1 + dx:9 + dx].reshape(-1, 64)
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def load_split(seed: int, n_train: int, augment: bool = False):
    """Digits (1797 images, 8x8, 16 grey levels) as float tensors in [0, 1],
    centred by the training mean; a stratified split fixed by the seed, so
    every cell of a seed sees the same data (paired comparisons). With
    augment the training images come as [9, n, 64] (see shifted)."""
    key = (seed, n_train, augment)
    if key not in _DATA_CACHE:
        import torch
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        x, y = load_digits(return_X_y=True)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x / 16.0, y, train_size=n_train, stratify=y, random_state=seed)
        mean = x_tr.mean(axis=0)
        if augment:
            x_tr = shifted(x_tr)
        as_t = lambda a, dt: torch.tensor(a, dtype=dt)  # noqa: E731
        _DATA_CACHE[key] = (as_t(x_tr - mean, torch.float32), as_t(y_tr, torch.long),
                            as_t(x_te - mean, torch.float32), as_t(y_te, torch.long))
    return _DATA_CACHE[key]


def build_model(arch: str, hidden: int):
    import torch.nn as nn
    layers: List[nn.Module] = []
    width = 64
    for _ in range(2):
        layers.append(nn.Linear(width, hidden))
        if arch == "bn":
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        width = hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def make_optimizer(name: str, params, lr: float, wd: float):
    import fused_adamw
    spec = OPTIMIZERS[name]
    cls = getattr(fused_adamw, spec["cls"])
    return cls(params, lr=lr, weight_decay=wd, backend="cpu", **spec["kwargs"])


def train_one(train_cfg: dict, opt_name: str, lr: float, wd: float, seed: int) -> dict:
    """One training run; returns the final test error, test and train loss."""
    import torch
    import torch.nn.functional as F
    t0 = time.perf_counter()
    augment = train_cfg.get("augment", False)
    x_tr, y_tr, x_te, y_te = load_split(seed, train_cfg["n_train"], augment)
    torch.manual_seed(seed)  # same initial weights for every cell of a seed
    model = build_model(train_cfg["arch"], train_cfg["hidden"])
    opt = make_optimizer(opt_name, model.parameters(), lr, wd)
    bs = train_cfg["batch_size"]
    n = len(y_tr)
    steps_per_epoch = math.ceil(n / bs)
    total = steps_per_epoch * train_cfg["epochs"]
    # Stepped per iteration down to 0 at the last step: eta_t = lr_t / lr is
    # the paper's cosine SetScheduleMultiplier, and decay_scaling="schedule"
    # reads it from the group's initial_lr that this scheduler sets.
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    gen = torch.Generator().manual_seed(seed)
    diverged = False
    model.train()
    for _ in range(train_cfg["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            if augment:
                xb = x_tr[torch.randint(0, 9, (len(idx),), generator=gen), idx]
            else:
                xb = x_tr[idx]
            loss = F.cross_entropy(model(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if not math.isfinite(loss.item()):
            diverged = True  # the error of a diverged net is chance level; stop early
            break
    model.eval()
    with torch.no_grad():
        out = model(x_te)
        err = (out.argmax(1) != y_te).double().mean().item()
        te_loss = F.cross_entropy(out, y_te).item()
        tr_out = model(x_tr[4] if augment else x_tr)  # index 4: the unshifted images
        tr_loss = F.cross_entropy(tr_out, y_tr).item()
        tr_err = (tr_out.argmax(1) != y_tr).double().mean().item()
    if diverged or not math.isfinite(te_loss):
        # A diverged net counts as chance level (error 0.9, loss log 10), so
        # means and heatmaps stay finite; the flag keeps the fact.
        diverged = True
        err = max(err, 0.9)
        te_loss = max(te_loss, math.log(10.0)) if math.isfinite(te_loss) else math.log(10.0)
    return dict(test_error=err, test_loss=te_loss, train_loss=tr_loss if math.isfinite(tr_loss) else None,
                train_error=tr_err, diverged=diverged, steps=total, seconds=time.perf_counter() - t0)


def _init_worker() -> None:
    # One thread per process and one process per core: small matmuls scale
    # better across processes than across threads.
    import torch
    torch.set_num_threads(1)


def _work(args):
    train_cfg, opt_name, lr, wd, seed = args
    return args, train_one(train_cfg, opt_name, lr, wd, seed)


# ------------------------------------------------------------------ grid

def log_grid(lo: float, hi: float, n: int) -> List[float]:
    # Rounded to 4 significant digits so that run keys are stable text.
    return [float(f"{10 ** v:.4g}") for v in np.linspace(lo, hi, n)]


def grid_for(name: str, n_lr: int, n_wd: int):
    (l0, l1), (w0, w1) = GRIDS[name]
    return log_grid(l0, l1, n_lr), log_grid(w0, w1, n_wd)


def run_key(opt_name: str, lr: float, wd: float, seed: int) -> str:
    return f"{opt_name}|lr={lr:.4g}|wd={wd:.4g}|seed={seed}"


def _json_safe(obj):
    # NaN is not JSON: undefined metrics are written as null.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str, obj) -> None:
    # Write then rename: an interrupted write never leaves a truncated file.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=1, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)


def environment(argv: Sequence[str]) -> dict:
    import torch
    import fused_adamw
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return dict(git_commit=commit, git_dirty_tracked=dirty, cpu_model=cpu, cpu_count=os.cpu_count(),
                torch_version=torch.__version__, fused_adamw_file=fused_adamw.__file__,
                python=platform.python_version(),
                utc_time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                command=" ".join(shlex.quote(a) for a in ["benchmarks/paper_figure.py", *argv]))


# --------------------------------------------------------------- metrics

def panel_metrics(lrs: Sequence[float], wds: Sequence[float], err, rel_margin: float = REL_MARGIN,
                  edge_margin: float = EDGE_MARGIN) -> dict:
    """How strongly the good region of one lr x wd panel is tied to a diagonal.

    err[i, j] is the (mean) test error at lrs[i], wds[j]. The good region is
    the cells with err <= rel_margin * min(err). Returned:
      corr   Pearson correlation of log10 lr and log10 wd over the good cells:
             about -1 for a good region along wd ~ 1/lr (L2 in SGD), about 0
             for one aligned with the axes. When the good cells share one lr
             or one wd (a line parallel to an axis) it is 0.
      slope  least-squares slope of log10(best wd of the row) on log10 lr,
             over the rows (lrs) whose best cell is in the good region: -1
             when the best wd scales as 1/lr, 0 when it does not move.
      spread decades between the largest and smallest best wd of those rows.
      edge_slope  the same slope for the largest wd that each lr tolerates
             (error within edge_margin x the best): the upper edge of the
             usable region, where decay starts to cost accuracy. Rows whose
             largest tolerated wd is the top of the grid are left out (the
             edge lies above the grid there). Less noisy than slope, since
             the error changes fast across the edge and slowly near the best.
      best   the best cell; best_wd_at_edge / best_lr_at_edge flag a best cell
             on the border of the grid (the grid may not contain the optimum).
    """
    err = np.asarray(err, dtype=float)
    llr, lwd = np.log10(np.asarray(lrs, float)), np.log10(np.asarray(wds, float))
    bi, bj = np.unravel_index(np.nanargmin(err), err.shape)
    best = float(err[bi, bj])
    thresh = rel_margin * best + 1e-12
    gi, gj = np.nonzero(err <= thresh)
    x, y = llr[gi], lwd[gj]
    if len(gi) < 2 or np.std(x) == 0 or np.std(y) == 0:
        corr = 0.0
    else:
        corr = float(np.corrcoef(x, y)[0, 1])
    rows = [i for i in range(len(lrs)) if np.nanmin(err[i]) <= thresh]
    best_wd_row = {i: int(np.nanargmin(err[i])) for i in range(len(lrs))}
    ry = np.array([lwd[best_wd_row[i]] for i in rows])
    rx = llr[rows]
    slope = float(np.polyfit(rx, ry, 1)[0]) if len(rows) >= 2 else float("nan")
    spread = float(ry.max() - ry.min()) if len(rows) else float("nan")
    edge_thresh = edge_margin * best + 1e-12
    wd_max = {}
    for i in range(len(lrs)):
        ok = np.nonzero(err[i] <= edge_thresh)[0]
        if len(ok) and ok.max() < len(wds) - 1:
            wd_max[i] = int(ok.max())
    ex = llr[list(wd_max)]
    ey = lwd[list(wd_max.values())]
    edge_slope = float(np.polyfit(ex, ey, 1)[0]) if len(wd_max) >= 2 else float("nan")
    return dict(best=best, best_lr=float(lrs[bi]), best_wd=float(wds[bj]),
                best_lr_at_edge=bool(bi in (0, len(lrs) - 1)), best_wd_at_edge=bool(bj in (0, len(wds) - 1)),
                n_good=int(len(gi)), corr=corr, slope=slope, spread_decades=spread,
                rows_used=[float(lrs[i]) for i in rows],
                best_wd_per_lr=[float(wds[best_wd_row[i]]) for i in range(len(lrs))],
                edge_slope=edge_slope, edge_wd_per_lr={f"{lrs[i]:.4g}": float(wds[j]) for i, j in wd_max.items()})


def bootstrap_metrics(lrs, wds, per_seed, rel_margin: float = REL_MARGIN, draws: int = 300,
                      rng_seed: int = 0) -> dict:
    """10th/90th percentiles of corr and slope when the seeds are resampled
    with replacement (all cells of a seed together: they share data and
    initial weights). per_seed: array [n_seeds, n_lr, n_wd]."""
    per_seed = np.asarray(per_seed, float)
    if per_seed.shape[0] < 2:
        return {}
    rng = np.random.default_rng(rng_seed)
    out = {"corr": [], "slope": [], "spread_decades": [], "edge_slope": []}
    for _ in range(draws):
        pick = rng.integers(0, per_seed.shape[0], per_seed.shape[0])
        m = panel_metrics(lrs, wds, per_seed[pick].mean(axis=0), rel_margin)
        for k in out:
            out[k].append(m[k])
    ci = {}
    for k, v in out.items():
        v = np.asarray(v, float)
        v = v[np.isfinite(v)]  # slope is undefined on draws with < 2 good rows
        ci[k] = [float(np.percentile(v, 10)), float(np.percentile(v, 90))] if len(v) else [math.nan] * 2
    return ci


# ------------------------------------------------------------ aggregation

def collect(results: dict, opt_names: Sequence[str], n_lr: int, n_wd: int, seeds: Sequence[int]) -> dict:
    """Per panel: the grids and arrays [seed, lr, wd] of test error and loss,
    from the runs of results.json (all must be present)."""
    panels = {}
    for name in opt_names:
        lrs, wds = grid_for(name, n_lr, n_wd)
        shape = (len(seeds), len(lrs), len(wds))
        e, l, dv = np.empty(shape), np.empty(shape), np.zeros(shape, bool)
        for s_i, s in enumerate(seeds):
            for i, lr in enumerate(lrs):
                for j, wd in enumerate(wds):
                    r = results["runs"][run_key(name, lr, wd, s)]
                    e[s_i, i, j], l[s_i, i, j], dv[s_i, i, j] = r["test_error"], r["test_loss"], r["diverged"]
        panels[name] = dict(lrs=lrs, wds=wds, err=e, loss=l, diverged=dv)
    return panels


def summarize(panels: dict) -> dict:
    summary = {}
    for name, p in panels.items():
        mean_err, mean_loss = p["err"].mean(axis=0), p["loss"].mean(axis=0)
        m = panel_metrics(p["lrs"], p["wds"], mean_err)
        m["ci"] = bootstrap_metrics(p["lrs"], p["wds"], p["err"])
        bi, bj = p["lrs"].index(m["best_lr"]), p["wds"].index(m["best_wd"])
        m["best_sd_over_seeds"] = float(p["err"][:, bi, bj].std(ddof=1)) if p["err"].shape[0] > 1 else None
        # Does decay help at all? The best cell of the smallest-wd column (the
        # nearest to no decay), and the best cell's gain over it, per seed.
        bi0 = int(np.argmin(mean_err[:, 0]))
        m["best_at_smallest_wd"] = float(mean_err[bi0, 0])
        gain = p["err"][:, bi0, 0] - p["err"][:, bi, bj]
        m["decay_gain"] = float(gain.mean())
        m["decay_gain_sd"] = float(gain.std(ddof=1)) if len(gain) > 1 else None
        ml = panel_metrics(p["lrs"], p["wds"], mean_loss)
        ml["ci"] = bootstrap_metrics(p["lrs"], p["wds"], p["loss"])
        summary[name] = dict(lrs=p["lrs"], wds=p["wds"], mean_test_error=mean_err.tolist(),
                             mean_test_loss=mean_loss.tolist(), diverged_runs=int(p["diverged"].sum()),
                             error_metrics=m, loss_metrics=ml)
    return summary


def fmt_ci(ci: dict, key: str) -> str:
    if key not in ci:
        return ""
    lo, hi = ci[key]
    return f" [{lo:+.2f}, {hi:+.2f}]"


def table(summary: dict, which: str = "error_metrics") -> str:
    pct = which == "error_metrics"
    head = ("| panel | best cell (lr, wd) | best " + ("test error %" if pct else "test loss")
            + " | good cells | corr(log lr, log wd) [p10, p90] | slope of best wd vs lr [p10, p90] | spread (decades)"
            + " | slope of largest usable wd vs lr [p10, p90] |" + (" best at smallest wd |" if pct else ""))
    lines = [head, "|---|---|---|---|---|---|---|---|" + ("---|" if pct else "")]
    for name, s in summary.items():
        m = s[which]
        best = f"{100 * m['best']:.2f}" if pct else f"{m['best']:.3f}"
        if pct and m.get("best_sd_over_seeds") is not None:
            best += f" ± {100 * m['best_sd_over_seeds']:.2f}"
        edge = " (edge)" if m["best_wd_at_edge"] or m["best_lr_at_edge"] else ""
        lines.append(f"| {name} | {m['best_lr']:.3g}, {m['best_wd']:.3g}{edge} | {best} | {m['n_good']} "
                     f"| {m['corr']:+.2f}{fmt_ci(m['ci'], 'corr')} | {m['slope']:+.2f}{fmt_ci(m['ci'], 'slope')} "
                     f"| {m['spread_decades']:.1f} | {m['edge_slope']:+.2f}{fmt_ci(m['ci'], 'edge_slope')} |"
                     + (f" {100 * m['best_at_smallest_wd']:.2f} |" if pct else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------ plot

# The paper's layout: SGD-type top row, Adam-type bottom row, L2 on the left,
# decoupled on the right; torch's lr-scaled AdamW is an extra third column.
LAYOUT = {"SGD": (0, 0), "SGDW": (0, 1), "Adam": (1, 0), "AdamW": (1, 1), "AdamW-lr": (1, 2)}


def plot(summary: dict, path: str, key: str = "mean_test_error", metrics: str = "error_metrics",
         subtitle: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pct = key == "mean_test_error"
    fig, axes = plt.subplots(2, 3, figsize=(15, 9.5), squeeze=False)
    used = set()
    for name, s in summary.items():
        r, c = LAYOUT[name]
        used.add((r, c))
        ax = axes[r][c]
        z = np.asarray(s[key]) * (100 if pct else 1)
        m = s[metrics]
        best = np.nanmin(z)
        # Colour range from the best cell to twice it: the interesting part;
        # broken cells (chance level) saturate instead of flattening the rest.
        im = ax.imshow(z.T, origin="lower", cmap="viridis", vmin=best, vmax=2 * best, aspect="auto")
        cb = fig.colorbar(im, ax=ax, extend="max", fraction=0.046, pad=0.03)
        cb.set_label("test error %" if pct else "test cross-entropy")
        good = z <= REL_MARGIN * best + 1e-12
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                ax.text(i, j, f"{z[i, j]:.1f}" if pct else f"{z[i, j]:.2f}", ha="center", va="center",
                        fontsize=7, color="black" if z[i, j] > 1.5 * best else "white")
                if good[i, j]:
                    ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, fill=False, ec="white", lw=1.0))
        # The best wd of each lr row that reaches the good region: the line
        # whose slope panel_metrics reports.
        rows = [s["lrs"].index(v) for v in m["rows_used"]]
        ys = [s["wds"].index(m["best_wd_per_lr"][i]) for i in rows]
        ax.plot(rows, ys, "w.--", lw=1, ms=8)
        # The upper edge of the usable region (edge_slope's points).
        ex = [s["lrs"].index(float(k)) for k in m["edge_wd_per_lr"]]
        ey = [s["wds"].index(v) for v in m["edge_wd_per_lr"].values()]
        ax.plot(ex, [y + 0.3 for y in ey], "v", color="orange", ms=6, ls="none")
        bi, bj = s["lrs"].index(m["best_lr"]), s["wds"].index(m["best_wd"])
        ax.add_patch(plt.Rectangle((bi - 0.5, bj - 0.5), 1, 1, fill=False, ec="red", lw=2.5))
        ax.set_xticks(range(len(s["lrs"])), [f"{v:.2g}" for v in s["lrs"]], rotation=45, fontsize=8)
        ax.set_yticks(range(len(s["wds"])), [f"{v:.2g}" for v in s["wds"]], fontsize=8)
        ax.set_xlabel("base learning rate")
        ylab = {"l2": "L2 factor", "schedule": "weight decay per step (x eta_t)",
                "lr": "weight decay (x lr_t)"}[OPTIMIZERS[name]["decay"]]
        ax.set_ylabel(ylab)
        ax.set_title(f"{OPTIMIZERS[name]['title']}\ncorr={m['corr']:+.2f}  slope={m['slope']:+.2f}  "
                     f"edge slope={m['edge_slope']:+.2f}  best={best:.2f}{'%' if pct else ''}", fontsize=10)
    for r in range(2):
        for c in range(3):
            if (r, c) not in used:
                axes[r][c].axis("off")
    if (0, 2) not in used:
        axes[0][2].text(0.0, 0.5, (
            "white boxes: cells within "
            f"{REL_MARGIN:.2f}x of the panel's best\n"
            "red box: best cell\n"
            "dots: best wd of each lr that reaches the good region\n"
            f"orange marks: largest wd within {EDGE_MARGIN:.1f}x of the best\n"
            "corr: Pearson r of log lr, log wd over the white boxes\n"
            "slope: of the dots, edge slope: of the orange marks\n"
            "(decades of wd per decade of lr)\n"
            "near +-1: diagonal (coupled); near 0: axis-aligned\n\n" + subtitle),
            transform=axes[0][2].transAxes, fontsize=10, va="center", family="monospace")
    fig.suptitle("Test " + ("error" if pct else "cross-entropy")
                 + " over base lr x weight decay (cf. Loshchilov & Hutter, Figure 2)", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--n-lr", type=int, default=7, help="lr grid points per panel")
    ap.add_argument("--n-wd", type=int, default=7, help="weight decay grid points per panel")
    ap.add_argument("--seeds", type=int, default=6, help="seeds per cell (seed = split + init + batches)")
    ap.add_argument("--arch", choices=["plain", "bn"], default=TRAIN_DEFAULTS["arch"],
                    help="MLP without (default) or with BatchNorm after each hidden layer (as the paper's ResNets)")
    ap.add_argument("--n-train", type=int, default=TRAIN_DEFAULTS["n_train"],
                    help="training images (the other of the 1797 are the test set)")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=TRAIN_DEFAULTS["augment"],
                    help="random 1-pixel shifts of the training images")
    ap.add_argument("--hidden", type=int, default=TRAIN_DEFAULTS["hidden"])
    ap.add_argument("--epochs", type=int, default=TRAIN_DEFAULTS["epochs"])
    ap.add_argument("--batch-size", type=int, default=TRAIN_DEFAULTS["batch_size"])
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes (1 = in this process)")
    ap.add_argument("--fresh", action="store_true", help="discard DIR/results.json instead of resuming")
    ap.add_argument("--replot", action="store_true", help="only summarize and plot DIR/results.json")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from tqdm import tqdm
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    train_cfg = dict(arch=args.arch, n_train=args.n_train, hidden=args.hidden, epochs=args.epochs,
                     batch_size=args.batch_size, augment=args.augment)
    seeds = list(range(args.seeds))
    results = None
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            results = json.load(f)
        if results.get("train_cfg") != train_cfg:
            if args.replot:
                train_cfg = results["train_cfg"]
            else:
                sys.exit(f"{path} holds runs made with {results.get('train_cfg')}, not {train_cfg}: "
                         "pass the same settings to resume, or --fresh, or another --out")
    if results is None:
        if args.replot:
            sys.exit(f"--replot: no {path}")
        results = dict(train_cfg=train_cfg, runs={})
    results["grid"] = dict(optimizers=args.optimizers, n_lr=args.n_lr, n_wd=args.n_wd, seeds=seeds,
                           ranges_log10={k: GRIDS[k] for k in args.optimizers}, rel_margin=REL_MARGIN,
                           optimizer_kwargs={k: OPTIMIZERS[k]["kwargs"] for k in args.optimizers})
    if not args.replot:
        results.setdefault("environments", []).append(environment(sys.argv[1:] if argv is None else argv))

    todo = []
    for name in args.optimizers:
        lrs, wds = grid_for(name, args.n_lr, args.n_wd)
        for s in seeds:
            for lr in lrs:
                for wd in wds:
                    if run_key(name, lr, wd, s) not in results["runs"]:
                        todo.append((train_cfg, name, lr, wd, s))
    n_total = len(args.optimizers) * args.n_lr * args.n_wd * len(seeds)
    trained = 0
    t0 = time.perf_counter()
    if todo and not args.replot:
        print(f"{len(todo)} of {n_total} runs to train ({n_total - len(todo)} already in {path}); "
              f"{args.workers} worker(s)", flush=True)
        # Redrawn every 10 s into a log file, live on a terminal.
        bar = tqdm(total=n_total, initial=n_total - len(todo), unit="run", smoothing=0.05,
                   mininterval=0.2 if sys.stderr.isatty() else 10.0)

        def record(job, res):
            nonlocal trained
            _, name, lr, wd, s = job
            results["runs"][run_key(name, lr, wd, s)] = dict(optimizer=name, lr=lr, wd=wd, seed=s, **res)
            write_json_atomic(path, results)
            trained += 1
            bar.update(1)
            bar.set_postfix_str(f"{name} lr={lr:.2g} wd={wd:.2g} err={100 * res['test_error']:.1f}%",
                                refresh=False)

        if args.workers <= 1:
            import torch
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the workers; restored for the caller
            try:
                for job in todo:
                    record(job, train_one(*job))
            finally:
                torch.set_num_threads(threads)
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked torch state
            with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker) as ex:
                futures = [ex.submit(_work, job) for job in todo]
                try:
                    for fut in cf.as_completed(futures):
                        job, res = fut.result()
                        record(job, res)
                except KeyboardInterrupt:
                    for fut in futures:
                        fut.cancel()
                    raise
        bar.close()
    elapsed = time.perf_counter() - t0
    if trained:
        results.setdefault("wall_seconds", []).append(round(elapsed, 1))

    panels = collect(results, args.optimizers, args.n_lr, args.n_wd, seeds)
    summary = summarize(panels)
    results["summary"] = summary
    write_json_atomic(path, results)
    cfg_line = (f"digits, {train_cfg['n_train']} train / {1797 - train_cfg['n_train']} test, "
                f"MLP 64-{train_cfg['hidden']}-{train_cfg['hidden']}-10"
                f"{' + BatchNorm' if train_cfg['arch'] == 'bn' else ''}, {train_cfg['epochs']} epochs, "
                f"batch {train_cfg['batch_size']}, cosine to 0, {len(seeds)} seeds")
    print(cfg_line)
    print(f"trained {trained} runs in {elapsed:.0f} s")
    print("\ntest error (good region: within "
          f"{REL_MARGIN:.2f}x of the best cell; [p10, p90] over seed resamples)")
    print(table(summary, "error_metrics"))
    print("\ntest cross-entropy")
    print(table(summary, "loss_metrics"))
    if not args.no_plot:
        plot(summary, os.path.join(args.out, "paper_figure.png"), subtitle=cfg_line.replace(", ", "\n"))
        plot(summary, os.path.join(args.out, "paper_figure_loss.png"), key="mean_test_loss",
             metrics="loss_metrics", subtitle=cfg_line.replace(", ", "\n"))
    return dict(trained=trained, total=n_total, summary=summary, path=path)


if __name__ == "__main__":
    main()
