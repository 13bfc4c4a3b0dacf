"""Smoke test of the benchmark harness (benchmarks/run.py) on CPU.

Runs the harness in-process on tiny workloads with the torch providers, this
package's available backends and a deliberately wrong provider, and checks
results.json's schema, the plots, the --profile output, and that the
correctness check reports wrong providers as FAILED without timing them.
Run: pytest tests/test_benchmarks.py (about 20 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import check  # noqa: E402
import providers as prov  # noqa: E402
import run  # noqa: E402
import workloads as wl  # noqa: E402

ROW_KEYS = {
    "workload", "provider", "ms_median", "gbps", "p20", "p80", "frac_copy_bw", "dtype",
    "state_dtype", "numel", "n_tensors", "speedup_vs_torch_fused", "status", "reason",
    "bytes_per_step", "peak_mem_bytes", "peak_mem_kind", "steps_timed",
    # environment, in every row
    "device", "device_name", "cpu_model", "cpu_threads", "torch_version", "cuda_version",
    "triton_version", "git_commit", "utc_time", "command", "copy_bw_gbps",
}


def _scaled_lr_runner(factor: float):
    """torch foreach with lr scaled: the kind of bug the check must catch."""
    def build(params, cfg):
        cls, kwargs = cfg.torch_class()
        kwargs["lr"] *= factor
        opt = cls(params, foreach=True, **kwargs)
        return prov.Runner(opt, opt.step, cfg.dtype)
    return build


def _tail_dropping_runner(params, cfg):
    """Correct except that every param's last element is never written."""
    cls, kwargs = cfg.torch_class()
    opt = cls(params, foreach=True, **kwargs)

    def step():
        last = [p.detach().reshape(-1)[-1].clone() for p in params]
        opt.step()
        with torch.no_grad():
            for p, v in zip(params, last):
                p.reshape(-1)[-1] = v
    return prov.Runner(opt, step, cfg.dtype)


WRONG_LR = prov.Provider("wrong-lr-x2", _scaled_lr_runner(2.0))


def test_harness_smoke(tmp_path):
    out = tmp_path / "out"
    rows = run.main(["--device", "cpu", "--workloads", "single", "--sizes", "10,13",
                     "--providers", "torch-forloop", "torch-foreach", "torch-fused",
                     "fused_adamw-*", "wrong-lr-x2", "--min-steps", "5", "--profile",
                     "--profile-steps", "2", "--out", str(out)],
                    extra_providers=[WRONG_LR])
    with open(out / "results.json") as f:
        saved = json.load(f)
    assert isinstance(saved, list) and len(saved) == len(rows)
    providers = {r["provider"] for r in saved}
    assert {"torch-forloop", "torch-foreach", "torch-fused", "wrong-lr-x2"} <= providers
    assert {r["workload"] for r in saved} == {"single-2^10", "single-2^13"}
    for r in saved:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert r["dtype"] == "fp32" and r["n_tensors"] == 1
        if r["provider"] == "wrong-lr-x2":
            assert r["status"] == "FAILED" and r["reason"].startswith("param")
            assert r["ms_median"] is None and r["gbps"] is None
            continue
        assert r["status"] == "ok", (r["provider"], r["reason"])
        assert 0 < r["p20"] <= r["ms_median"] <= r["p80"]
        assert r["steps_timed"] >= 5
        assert r["bytes_per_step"] == 28 * r["numel"] + 8
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / r["ms_median"] / 1e6)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / r["copy_bw_gbps"])
        assert r["speedup_vs_torch_fused"] > 0
        # exp_avg and exp_avg_sq (torch adds a 4-byte step; a backend may pack state)
        assert r["peak_mem_bytes"] >= 8 * r["numel"]
        if r["provider"].startswith("torch-"):
            assert r["peak_mem_bytes"] == 8 * r["numel"] + 4
        assert r["prof_ops_per_step"] >= 0 and r["prof_host_ms_per_step"] > 0
        assert (out / r["trace"]).is_file()
    fused = [r for r in saved if r["provider"] == "torch-fused"]
    assert all(r["speedup_vs_torch_fused"] == 1.0 for r in fused)
    # The for-loop runs a dozen aten ops per tensor; the profile must see them.
    forloop = [r for r in saved if r["provider"] == "torch-forloop"]
    assert all(r["prof_ops_per_step"] >= 5 for r in forloop)
    assert (out / "gbps_single.png").stat().st_size > 0
    assert (out / "speedup.png").stat().st_size > 0


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd", "sgdw"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_check_catches_wrong_providers(dtype, optimizer):
    cfg = prov.OptConfig(prov.OptimizerKind(optimizer), DTYPES[dtype])
    # 3 tensors, one above the per-tensor cap so the check samples head + tail.
    work = wl.Workload("t", ((5000,), (33, 7), (1,)))
    budget = 1200
    forloop, _, fused, _ = prov.torch_providers(10)
    cases = [
        (forloop.build, True),
        (_scaled_lr_runner(2.0), False),
        (_scaled_lr_runner(1.1), False),
        (_tail_dropping_runner, False),
    ]
    if cfg.optimizer.is_adam or cfg.dtype == torch.float32:
        # torch 2.12-2.13's fused CPU SGD leaves fp16/bf16 params unwritten
        # in full SIMD blocks (pytorch/pytorch#191763); the harness reports
        # it FAILED, which this test does not pin to a torch version.
        cases.append((fused.build, True))
    for build, should_pass in cases:
        params, _ = wl.make_tensors(work, torch.device("cpu"), cfg.dtype, seed=1)
        res = check.check_provider(build(params, cfg), params, cfg, budget)
        assert res.ok is should_pass, (build, res.detail)
        assert res.sampled_numel <= budget


def test_byte_model_and_sampling():
    fp32 = prov.OptConfig()
    assert prov.bytes_per_step(fp32, 1000, 1, torch.float32) == 28 * 1000 + 8
    ams = prov.OptConfig(amsgrad=True)
    assert prov.bytes_per_step(ams, 1000, 2, torch.float32) == 36 * 1000 + 16
    bf16 = prov.OptConfig(dtype=torch.bfloat16)
    assert prov.bytes_per_step(bf16, 1000, 1, torch.bfloat16) == 14 * 1000 + 8
    assert prov.bytes_per_step(bf16, 1000, 1, torch.float32) == 22 * 1000 + 8
    sgd = prov.OptConfig(prov.OptimizerKind.SGD)
    assert prov.bytes_per_step(sgd, 1000, 3, torch.float32) == 20 * 1000
    assert check.per_tensor_cap([10, 1000, 5], 100) == 85
    assert check.per_tensor_cap([10, 20], 100) == 20
    t = torch.arange(10.0)
    assert check.take([t, t[:3]], 4).tolist() == [0, 1, 8, 9, 0, 1, 2]
    assert run.parse_exponents("12:16:2") == [12, 14, 16]
    assert run.parse_exponents("10,13") == [10, 13]
    assert wl.model("gpt2").numel == 124_439_808
    assert wl.model("resnet50").numel == 25_557_032
