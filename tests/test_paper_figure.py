"""Tests of benchmarks/paper_figure.py, the lr x weight-decay grid that
reproduces Figure 2 of Loshchilov & Hutter at small scale.

On a tiny grid (1 epoch, 16 hidden units) it checks that results.json gains
every training run as soon as the run finishes, that a rerun trains nothing,
that a sweep interrupted part-way resumes with only the missing runs, that a
run with other training settings refuses to mix its runs in, and that the
figures are written. The panel metric is checked on synthetic grids whose
answer is known: an axis-aligned good region gives corr ~ 0 and slope 0, a
diagonal one (best wd ~ 1/lr) corr near -1 and slope -1. Needs
scikit-learn (for the digits data); skipped without it.
Run: pytest tests/test_paper_figure.py (a few seconds on 2 cores).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import paper_figure as pf  # noqa: E402

TINY = ["--optimizers", "SGDW", "AdamW", "--n-lr", "2", "--n-wd", "2", "--seeds", "2",
        "--epochs", "1", "--n-train", "100", "--hidden", "16", "--workers", "1", "--no-plot"]
N_TINY = 2 * 2 * 2 * 2


def read_runs(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)["runs"]


@pytest.fixture
def counted(monkeypatch):
    """Counts the trainings and, before each, how many runs results.json holds."""
    calls = []
    real = pf.train_one

    def train_one(train_cfg, opt_name, lr, wd, seed):
        out = train_one.out
        path = os.path.join(out, "results.json")
        calls.append(len(read_runs(out)) if os.path.exists(path) else 0)
        return real(train_cfg, opt_name, lr, wd, seed)

    train_one.out = None
    monkeypatch.setattr(pf, "train_one", train_one)
    return calls, train_one


def test_runs_are_written_one_by_one_and_a_rerun_trains_nothing(tmp_path, counted):
    calls, fake = counted
    out = str(tmp_path)
    fake.out = out
    res = pf.main(["--out", out] + TINY)
    assert res["trained"] == N_TINY and res["total"] == N_TINY
    # Before the k-th training the file held the k-1 runs before it.
    assert calls == list(range(N_TINY))
    runs = read_runs(out)
    assert len(runs) == N_TINY
    for r in runs.values():
        assert 0.0 <= r["test_error"] <= 1.0 and np.isfinite(r["test_loss"]) and r["steps"] == 4
    with open(os.path.join(out, "results.json")) as f:
        summary = json.load(f)["summary"]
    assert set(summary) == {"SGDW", "AdamW"}
    assert np.asarray(summary["AdamW"]["mean_test_error"]).shape == (2, 2)

    calls.clear()
    again = pf.main(["--out", out] + TINY)
    assert again["trained"] == 0 and calls == []
    assert read_runs(out) == runs


def test_an_interrupted_sweep_resumes_with_the_missing_runs(tmp_path, monkeypatch):
    out = str(tmp_path)
    real = pf.train_one
    done = []

    def dies_after_five(*args):
        if len(done) == 5:
            raise KeyboardInterrupt
        done.append(args)
        return real(*args)

    monkeypatch.setattr(pf, "train_one", dies_after_five)
    with pytest.raises(KeyboardInterrupt):
        pf.main(["--out", out] + TINY)
    assert len(read_runs(out)) == 5
    first_five = read_runs(out)

    monkeypatch.setattr(pf, "train_one", real)
    res = pf.main(["--out", out] + TINY)
    assert res["trained"] == N_TINY - 5
    runs = read_runs(out)
    assert len(runs) == N_TINY
    assert all(runs[k] == v for k, v in first_five.items())  # kept, not retrained


def test_other_training_settings_do_not_mix_with_stored_runs(tmp_path):
    out = str(tmp_path)
    pf.main(["--out", out] + TINY)
    with pytest.raises(SystemExit, match="holds runs made with"):
        pf.main(["--out", out] + TINY + ["--epochs", "2"])


def test_figures(tmp_path):
    # In-process: the default 2-process pool would spend ~10 s here starting
    # two interpreters that import torch.
    pytest.importorskip("matplotlib")
    out = str(tmp_path)
    pf.main(["--out", out] + TINY)
    res = pf.main(["--out", out, "--replot"] + [a for a in TINY if a != "--no-plot"])
    assert res["trained"] == 0
    for name in ("paper_figure.png", "paper_figure_loss.png"):
        assert os.path.getsize(os.path.join(out, name)) > 10_000


LRS = [10.0 ** e for e in np.linspace(-4, -1, 7)]
WDS = [10.0 ** e for e in np.linspace(-5, -1, 7)]


def synthetic(kind: str) -> np.ndarray:
    """A smooth error surface with its minimum inside the grid: 'axis' has
    elliptic level sets aligned with the axes (best wd the same at every lr),
    'diagonal' a valley along lr * wd = const (best wd ~ 1/lr, as for L2
    in SGD by the paper's Proposition 1)."""
    x, y = np.meshgrid(np.log10(LRS), np.log10(WDS), indexing="ij")
    if kind == "axis":
        return 0.05 + 0.01 * ((x + 2.5) ** 2 + (y + 3) ** 2)
    return 0.05 + 0.02 * (x + y + 5.5) ** 2 + 0.002 * (x + 2.5) ** 2


def test_metric_axis_aligned_region():
    m = pf.panel_metrics(LRS, WDS, synthetic("axis"), rel_margin=1.5)
    assert m["n_good"] >= 5
    assert abs(m["corr"]) < 0.2
    assert m["slope"] == pytest.approx(0.0, abs=1e-9) and m["spread_decades"] == pytest.approx(0.0)
    assert not m["best_wd_at_edge"] and not m["best_lr_at_edge"]


def test_metric_diagonal_region():
    m = pf.panel_metrics(LRS, WDS, synthetic("diagonal"), rel_margin=1.5)
    assert m["n_good"] >= 5
    assert m["corr"] < -0.8
    # The grid's wd steps (2/3 decade) are coarser than its lr steps (1/2
    # decade), so the row-wise best wd follows 1/lr in a staircase.
    assert -1.3 < m["slope"] < -0.7 and m["spread_decades"] >= 2.0


def test_metric_flags_a_best_cell_on_the_edge_and_a_single_line():
    err = np.ones((7, 7))
    err[:, 6] = 0.5  # the largest wd wins at every lr: the grid is too narrow
    m = pf.panel_metrics(LRS, WDS, err)
    assert m["best_wd_at_edge"] and m["n_good"] == 7
    assert m["corr"] == 0.0 and m["slope"] == pytest.approx(0.0, abs=1e-9)


def test_bootstrap_over_seeds():
    grid = synthetic("diagonal")
    same = np.stack([grid, grid, grid])
    ci = pf.bootstrap_metrics(LRS, WDS, same, rel_margin=1.5, draws=20)
    point = pf.panel_metrics(LRS, WDS, grid, rel_margin=1.5)
    assert ci["corr"] == pytest.approx([point["corr"]] * 2)
    rng = np.random.default_rng(0)
    noisy = np.stack([grid + 0.002 * rng.standard_normal(grid.shape) for _ in range(4)])
    ci = pf.bootstrap_metrics(LRS, WDS, noisy, rel_margin=1.5, draws=50)
    assert ci["corr"][0] <= ci["corr"][1] < -0.5


def test_edge_slope_follows_the_upper_edge_of_the_usable_region():
    x, y = np.meshgrid(np.log10(LRS), np.log10(WDS), indexing="ij")
    # Decay breaks training above wd = 10 ** -2.5 at every lr (axis) or above
    # wd = 1e-3 * lr / 1e-2.5 (decay per step larger than the step: slope +1).
    flat = np.full(x.shape, 0.05)
    axis = np.where(y > -2.5, 0.9, flat)
    tilted = np.where(y > x - 0.5, 0.9, flat)
    assert pf.panel_metrics(LRS, WDS, axis)["edge_slope"] == pytest.approx(0.0, abs=1e-9)
    m = pf.panel_metrics(LRS, WDS, tilted)
    assert 0.8 < m["edge_slope"] < 1.2
    # Rows where nothing breaks inside the grid say nothing about the edge.
    assert all(v < WDS[-1] for v in m["edge_wd_per_lr"].values())
