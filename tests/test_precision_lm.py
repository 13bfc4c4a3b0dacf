"""Tests of benchmarks/precision_lm.py, the issue-12 training experiment
(a small byte-level transformer LM trained with fp32, bf16 round-to-nearest,
stochastic rounding, Kahan summation, master weights and bf16 state).

On a tiny model (1 layer, d_model 32, context 16, a few steps) it checks that
a run is deterministic (same losses twice; stochastic rounding too, its
generator keyed on the seed), that every run starts from the same init and
the same batches, that the bytes-per-param accounting equals what the
optimizer's state tensors hold (per key and dtype, against the issue's
layout), that the options changed what was trained, that the lr follows the
warmup + cosine schedule, and that results.json, the per-run CSVs, table.md,
COMMAND.txt and the figure are written, a rerun trains nothing and other
settings refuse to mix. Run: pytest tests/test_precision_lm.py (about 10 s
on 2 cores).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import precision_lm as pl  # noqa: E402

TINY_CFG = dict(pl.TRAIN_DEFAULTS, layers=1, d_model=32, heads=2, context=16, batch_size=4, steps=6,
                warmup=2, eval_every=3, eval_seqs=8)
TINY_ARGS = ["--layers", "1", "--d-model", "32", "--heads", "2", "--context", "16", "--batch-size", "4",
             "--steps", "6", "--warmup", "2", "--eval-every", "3", "--eval-seqs", "8", "--workers", "1"]
BF16_RUNS = [n for n, r in pl.RUNS.items() if r["params"] == "bfloat16"]

# State bytes per param element that issue 12 defines for each run (AdamW,
# no amsgrad): exp_avg + exp_avg_sq in the state dtype, plus a float32
# master copy or a param-dtype Kahan compensation; the float32 step scalars
# (4 bytes per param tensor) come on top.
EXPECTED_STATE = {
    "torch-fp32": {"exp_avg": torch.float32, "exp_avg_sq": torch.float32},
    "fp32": {"exp_avg": torch.float32, "exp_avg_sq": torch.float32},
    "bf16-rn": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16},
    "bf16-sr": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16},
    "bf16-kahan": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, "kahan_comp": torch.bfloat16},
    "bf16-master": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, "master_param": torch.float32},
    "fp32-bf16state": {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16},
}


@pytest.fixture(autouse=True)
def one_thread():
    # As the script's workers: the losses then do not depend on the machine's
    # thread count.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_step(name: str):
    """The run's model and optimizer after one training step."""
    train, _, _ = pl.load_corpus(TINY_CFG["eval_frac"])
    torch.manual_seed(TINY_CFG["seed"])
    model = pl.build_model(TINY_CFG)
    if pl.RUNS[name]["params"] == "bfloat16":
        model.to(torch.bfloat16)
    opt = pl.make_optimizer(name, model, TINY_CFG)
    x, y = pl.windows(train, pl.train_offsets(TINY_CFG, len(train))[0], TINY_CFG["context"])
    loss = pl.lm_loss(model, x, y)
    assert loss.dtype == torch.float32  # the loss is fp32 whatever the model's dtype
    loss.backward()
    for p in model.parameters():
        assert p.dtype == p.grad.dtype == getattr(torch, pl.RUNS[name]["params"])
    opt.step()
    return model, opt


def test_corpus_is_fixed_and_the_held_out_part_is_its_tail():
    train, held_out, info = pl.load_corpus(0.1)
    assert info["files"] > 50 and info["bytes"] == len(train) + len(held_out)
    assert len(held_out) == int(0.1 * info["bytes"])
    pl._CORPUS.clear()  # read the files again: the same bytes
    train2, held_out2, info2 = pl.load_corpus(0.1)
    assert info2["sha256"] == info["sha256"]
    assert torch.equal(train, train2) and torch.equal(held_out, held_out2)
    offsets = pl.train_offsets(TINY_CFG, len(train))
    assert offsets.shape == (TINY_CFG["steps"], TINY_CFG["batch_size"])
    assert int(offsets.max()) + TINY_CFG["context"] + 1 <= len(train)
    x, y = pl.windows(train, offsets[0], TINY_CFG["context"])
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    cfg = dict(TINY_CFG, steps=50, warmup=10)
    f = [pl.lr_factor(s, cfg) for s in range(cfg["steps"])]
    assert f[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(cfg["min_lr_ratio"])
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


@pytest.mark.parametrize("name", ["fp32", "bf16-sr"])
def test_a_run_is_deterministic(name):
    a = pl.train_one(TINY_CFG, name)
    b = pl.train_one(TINY_CFG, name)
    assert a["train_loss"] == b["train_loss"] and a["eval"] == b["eval"]
    assert len(a["train_loss"]) == TINY_CFG["steps"] and all(map(math.isfinite, a["train_loss"]))
    assert [s for s, _ in a["eval"]] == [0, 3, 6]
    # The lr each step used is the schedule's.
    assert a["lr"] == pytest.approx([TINY_CFG["lr"] * pl.lr_factor(s, TINY_CFG) for s in range(6)])


def test_every_run_starts_from_the_same_init_and_batches_and_the_options_change_the_training():
    runs = {n: pl.train_one(TINY_CFG, n) for n in pl.RUNS}
    # The first step's loss is the init's on the first batch: identical for
    # the fp32 runs, the init rounded to bf16 for the others.
    first = {n: r["train_loss"][0] for n, r in runs.items()}
    assert first["torch-fp32"] == first["fp32"] == first["fp32-bf16state"]
    for n in BF16_RUNS:
        assert first[n] == first["bf16-rn"] and first[n] == pytest.approx(first["fp32"], rel=1e-2)
    # fused_adamw's fp32 AdamW follows torch's (to float rounding).
    assert runs["fp32"]["train_loss"] == pytest.approx(runs["torch-fp32"]["train_loss"], rel=1e-4)
    # Each bf16 option trains something else than round to nearest, and bf16
    # state something else than fp32 state.
    for n in ("bf16-sr", "bf16-kahan", "bf16-master"):
        assert runs[n]["eval"] != runs["bf16-rn"]["eval"], n
    assert runs["fp32-bf16state"]["eval"] != runs["fp32"]["eval"]


@pytest.mark.parametrize("name", list(pl.RUNS))
def test_bytes_per_param_are_the_state_tensors_bytes(name):
    model, opt = one_step(name)
    m = pl.memory_accounting(opt)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    assert m["n_params"] == n and m["param_bytes"] == sum(p.numel() * p.element_size() for p in params)
    # The same bytes counted another way: through the state dict's tensors.
    sd_bytes = sum(v.numel() * v.element_size() for st in opt.state_dict()["state"].values()
                   for v in st.values() if torch.is_tensor(v))
    assert m["state_bytes"] == sd_bytes
    # Against the layout issue 12 defines: the keys, their dtypes, one tensor
    # of the param's size per param and key, a 4-byte step per param.
    expected = EXPECTED_STATE[name]
    assert set(m["state_by_key"]) == set(expected) | {"step"}
    for key, dtype in expected.items():
        e = m["state_by_key"][key]
        assert e["dtypes"] == [str(dtype).replace("torch.", "")] and e["tensors"] == len(params), key
        assert e["bytes"] == n * dtype.itemsize, key
    assert m["state_by_key"]["step"]["bytes"] == 4 * len(params)
    per_elem = sum(d.itemsize for d in expected.values())
    assert m["state_bytes_per_param"] == pytest.approx(per_elem + 4 * len(params) / n)
    p_size = getattr(torch, pl.RUNS[name]["params"]).itemsize
    assert m["total_bytes_per_param"] == pytest.approx(m["state_bytes_per_param"] + p_size)


def test_outputs_are_written_and_a_rerun_trains_nothing(tmp_path):
    pytest.importorskip("matplotlib")
    out = str(tmp_path)
    names = ["torch-fp32", "fp32", "bf16-rn", "fp32-bf16state"]
    res = pl.main(["--out", out, "--runs", *names] + TINY_ARGS)
    assert res["trained"] == len(names) and res["names"] == names
    with open(os.path.join(out, "results.json")) as f:
        stored = json.load(f)
    assert set(stored["runs"]) == set(names) and stored["train_cfg"]["steps"] == 6
    assert stored["corpus"]["sha256"] == pl.load_corpus(0.1)[2]["sha256"]
    for name in names:
        with open(os.path.join(out, "runs", f"{name}.csv")) as f:
            rows = list(csv.DictReader(f))
        assert [int(r["step"]) for r in rows] == list(range(7))
        assert [float(r["train_loss"]) for r in rows[1:]] == pytest.approx(stored["runs"][name]["train_loss"],
                                                                          abs=1e-6)
        assert [int(r["step"]) for r in rows if r["eval_loss"]] == [0, 3, 6]
    with open(os.path.join(out, "table.md")) as f:
        md = f.read()
    assert all(f"| {n}: " in md for n in names) and "| 12.00 |" in md and "| 6.00 |" in md
    with open(os.path.join(out, "COMMAND.txt")) as f:
        cmd = f.read()
    env = stored["environments"][-1]
    assert "benchmarks/precision_lm.py --out" in cmd and env["torch_version"] in cmd
    if env["git_commit"]:
        assert env["git_commit"] in cmd
    assert os.path.getsize(os.path.join(out, "loss_curves.png")) > 10_000

    again = pl.main(["--out", out, "--runs", *names, "--no-plot"] + TINY_ARGS)
    assert again["trained"] == 0
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["runs"] == stored["runs"]
    with pytest.raises(SystemExit, match="holds runs made with"):
        pl.main(["--out", out, "--runs", *names] + TINY_ARGS + ["--steps", "7"])
