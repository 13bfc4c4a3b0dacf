"""Tests of the benchmark harness (benchmarks/run.py) on CPU.

Runs the harness in-process on tiny workloads with the torch providers, this
package's available backends and deliberately wrong providers, and checks
results.json's schema, the plots, the --profile output (host cost included),
and that the correctness check reports wrong providers as FAILED without
timing them or disturbing the providers after them; under the storage
options (--state-dtype, --precision) that the check against the float64
model passes the package and fails planted bugs. Unit tests pin the
interleaving order, the row time cap, the busy rule, the byte model, the
precision table and the default output folder. Run: pytest
tests/test_benchmarks.py (about 10 s on 2 idle cores).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import pytest
import torch

import fused_adamw as fa

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import check  # noqa: E402
import providers as prov  # noqa: E402
import run  # noqa: E402
import timing  # noqa: E402
import workloads as wl  # noqa: E402

ROW_KEYS = {
    "workload", "provider", "ms_median", "gbps", "p20", "p80", "frac_copy_bw", "dtype",
    "state_dtype", "numel", "n_tensors", "speedup_vs_torch_fused", "status", "reason",
    "bytes_per_step", "peak_mem_bytes", "peak_mem_kind", "steps_timed",
    "rounds", "round_ms", "steps_per_round", "ms_min", "ms_max", "speedup_p20", "speedup_p80",
    "busy", "busy_reason", "others_cpu", "row_capped", "timed_s", "precision", "check_oracle",
    # environment, in every row
    "device", "device_name", "cpu_model", "cpu_threads", "torch_version", "cuda_version",
    "triton_version", "git_commit", "native_builds", "utc_time", "command", "copy_bw_gbps",
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


def _nan_writing_runner(params, cfg):
    """Writes NaN into every param and drops the grads: the shared tensors
    must be refilled before the next provider's check."""
    cls, kwargs = cfg.torch_class()
    opt = cls(params, foreach=True, **kwargs)

    def step():
        opt.step()
        with torch.no_grad():
            for p in params:
                p.fill_(float("nan"))
                p.grad = None
    return prov.Runner(opt, step, cfg.dtype)


WRONG_LR = prov.Provider("wrong-lr-x2", _scaled_lr_runner(2.0))
NAN_WRITER = prov.Provider("nan-writer", _nan_writing_runner)


def test_harness_smoke(tmp_path):
    out = tmp_path / "out"
    # nan-writer runs first: every provider after it must still pass.
    rows = run.main(["--device", "cpu", "--workloads", "single", "--sizes", "10,13",
                     "--providers", "nan-writer", "torch-forloop", "torch-foreach", "torch-fused",
                     "fused_adamw-*", "wrong-lr-x2", "--rounds", "3", "--row-seconds", "0.1",
                     "--no-flush",  # a flush costs ~0.1 s here (2 x a 480 MiB L3)
                     "--profile", "--profile-steps", "2", "--out", str(out)],
                    extra_providers=[WRONG_LR, NAN_WRITER])
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
        if r["provider"] in ("wrong-lr-x2", "nan-writer"):
            assert r["status"] == "FAILED" and r["reason"].startswith("param")
            assert r["ms_median"] is None and r["gbps"] is None and r["rounds"] is None
            continue
        assert r["status"] == "ok", (r["provider"], r["reason"])
        assert 0 < r["ms_min"] <= r["p20"] <= r["ms_median"] <= r["p80"] <= r["ms_max"]
        assert len(r["round_ms"]) == r["rounds"] >= 1
        # A loaded machine can push a row past its cap in fewer rounds; the row says so.
        assert r["rounds"] >= timing.MIN_ROUNDS or "round(s) within the row cap" in r["busy_reason"]
        assert r["steps_timed"] == r["rounds"] * r["steps_per_round"]
        assert r["speedup_p20"] <= r["speedup_vs_torch_fused"] <= r["speedup_p80"]
        assert isinstance(r["busy"], bool) and r["busy"] == bool(r["busy_reason"])
        assert r["bytes_per_step"] == 28 * r["numel"] + 8
        assert r["gbps"] == pytest.approx(r["bytes_per_step"] / r["ms_median"] / 1e6)
        assert r["frac_copy_bw"] == pytest.approx(r["gbps"] / r["copy_bw_gbps"])
        assert r["speedup_vs_torch_fused"] > 0
        # exp_avg and exp_avg_sq (torch adds a 4-byte step; a backend may pack state)
        assert r["peak_mem_bytes"] >= 8 * r["numel"]
        if r["provider"].startswith("torch-"):
            assert r["peak_mem_bytes"] == 8 * r["numel"] + 4
        assert r["prof_ops_per_step"] >= 0 and r["prof_host_ms_per_step"] > 0
        assert (out / r["trace"]).is_file() and r["trace_note"] is None
        # Host cost: time outside the native update, per tensor.
        assert r["host_us_per_tensor"] > 0 and r["host_method"]
        if r["provider"] == "fused_adamw-cpu":
            # The shim around fused_adamw._cpu.*_step saw the one native call.
            assert r["host_method"].startswith("step wall minus fused_adamw._cpu")
            assert r["native_calls_per_step"] == 1 and r["native_ms_per_step"] > 0
            assert r["host_steps"] >= 5
    fused = [r for r in saved if r["provider"] == "torch-fused"]
    assert all(r["speedup_vs_torch_fused"] == 1.0 for r in fused)
    # The for-loop runs a dozen aten ops per tensor; the profile must see them.
    forloop = [r for r in saved if r["provider"] == "torch-forloop"]
    assert all(r["prof_ops_per_step"] >= 5 for r in forloop)
    assert (out / "gbps_single.png").stat().st_size > 0
    assert (out / "speedup.png").stat().st_size > 0


def test_traces_above_the_size_cap_are_not_kept(tmp_path):
    """--trace-max-mb: a trace larger than the cap is deleted and the row says
    so (torch's per-tensor providers on 20000 tensors write 40-200 MB)."""
    import profiling
    p = torch.zeros(1000)

    def step():
        for _ in range(50):
            p.add_(1)

    kept = profiling.profile_steps(step, torch.device("cpu"), 1, str(tmp_path / "a.json"), trace_max_mb=100)
    assert kept["trace"] == "a.json" and kept["trace_note"] is None and (tmp_path / "a.json").is_file()
    dropped = profiling.profile_steps(step, torch.device("cpu"), 1, str(tmp_path / "b.json"), trace_max_mb=1e-6)
    assert dropped["trace"] is None and not (tmp_path / "b.json").exists()
    assert "not kept" in dropped["trace_note"]


def test_providers_are_interleaved_round_robin():
    log = []
    steps = {n: (lambda n=n: log.append(n)) for n in "ABC"}
    # max_steps 8 over 4 rounds: 2 steps per provider and round.
    res = timing.measure_interleaved(steps, torch.device("cpu"), lambda: log.append("f"),
                                     rounds=4, row_seconds=60.0, max_steps=8, warmup=1)
    assert res.rounds == 4 and not any(res.capped(n) for n in "ABC")
    assert res.steps_per_round == {"A": 2, "B": 2, "C": 2}
    seq = "".join(log)
    assert seq[:6] == "fAfBfC"  # one warm-up step each, every step after a cache flush
    assert seq[6:] == "fAfAfBfBfCfC" "fBfBfCfCfAfA" "fCfCfAfAfBfB" "fAfAfBfBfCfC"
    assert res.order[:4] == [(0, "A"), (0, "B"), (0, "C"), (1, "B")]
    assert all(len(res.round_ms[n]) == 4 and len(res.step_ms[n]) == 8 for n in "ABC")


def test_row_time_is_capped():
    # Budget 0.1 s per row (cap 0.15 s) over 10 planned rounds. "slow" takes
    # 40 ms a step: one step per round, out after MIN_ROUNDS = 3 (a fourth
    # round would pass the cap). "slower" takes 0.2 s a step, past the cap at once:
    # one round. "fast" takes its most steps (max_steps) in all 10 rounds.
    steps = {"slow": lambda: time.sleep(0.04), "slower": lambda: time.sleep(0.2),
             "fast": lambda: None}
    flush = timing.CacheFlusher(torch.device("cpu"), enabled=False)
    t0 = time.perf_counter()
    res = timing.measure_interleaved(steps, torch.device("cpu"), flush, rounds=10,
                                     row_seconds=0.1, max_steps=200,
                                     step_hint_s={"slower": 0.2})
    assert time.perf_counter() - t0 < 1.5
    assert res.warmup_s["slower"] < 0.05  # the hint said slow: no warm-up step
    assert res.steps_per_round["slow"] == 1 and res.steps_per_round["slower"] == 1
    assert len(res.round_ms["slow"]) == timing.MIN_ROUNDS and res.capped("slow")
    assert len(res.round_ms["slower"]) == 1 and res.capped("slower")
    assert len(res.round_ms["fast"]) == 10 and not res.capped("fast")
    assert res.steps_per_round["fast"] == 200 // 10  # max_steps over the rounds
    for n in steps:
        assert res.timed_s[n] < timing.CAP_SLACK * 0.1 + 0.21
    # Rounds after the slow providers left still alternate among the rest.
    assert [n for r, n in res.order if r == 9] == ["fast"]
    assert timing.steps_per_round(0.001, 1.0, 5, 40) == 8
    assert timing.steps_per_round(10.0, 1.0, 5, 40) == 1
    assert timing.takes_part(5.0, 0, 1.0) and not timing.takes_part(1.1, 1, 1.0)
    assert timing.takes_part(0.9, 2, 1.0) and not timing.takes_part(0.9, 3, 1.0)


def test_provider_that_raises_while_timed_is_dropped():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("out of memory")

    flush = timing.CacheFlusher(torch.device("cpu"), enabled=False)
    res = timing.measure_interleaved({"ok": lambda: None, "flaky": flaky}, torch.device("cpu"),
                                     flush, rounds=5, row_seconds=0.01, max_steps=5, warmup=1)
    assert isinstance(res.errors["flaky"], RuntimeError)
    assert len(res.round_ms["flaky"]) == 2 and len(res.round_ms["ok"]) == 5


def test_busy_rule():
    quiet = [1.00, 1.03, 0.98, 1.01, 1.02]
    assert timing.busy_reason(quiet, [1.05, 1.04, 1.06, 1.05, 1.07], 0.02) == ""
    # Of five rounds, one twice as slow is noise; one 20x as slow (the
    # loaded-machine symptom) or two 2x as slow flag the row.
    assert timing.busy_reason([1.0, 1.0, 1.0, 1.0, 2.0]) == ""
    assert "ms p80/p20 over rounds 4.80" in timing.busy_reason([1.0, 1.0, 1.0, 1.0, 20.0])
    assert "ms p80/p20" in timing.busy_reason([1.0, 1.0, 1.0, 2.0, 2.0])
    # The speedup's spread alone (the baseline was the one disturbed).
    assert "speedup p80/p20" in timing.busy_reason(quiet, [1.05, 1.1, 16.0, 24.0, 1.0])
    # A steady neighbour leaves no spread but shows in the CPU accounting.
    assert "other processes" in timing.busy_reason(quiet, [], timing.BUSY_OTHERS_CPU + 0.5)
    assert timing.busy_reason(quiet, [], None) == ""
    assert "only 1 round" in timing.busy_reason([1.0])
    assert timing.spread([2.0]) is None
    assert timing.spread([1.0, 2.0]) == pytest.approx(1.8 / 1.2)
    assert timing.round_order(["A", "B", "C"], 4) == ["B", "C", "A"]


def test_load_meter_reads_this_machine():
    meter = timing.LoadMeter()
    meter.start()
    time.sleep(0.2)
    others = meter.stop()
    if os.path.exists("/proc/stat"):
        assert others is not None and 0 <= others <= os.cpu_count()


def test_default_output_is_outside_the_source_tree():
    out = os.path.realpath(run.default_out_dir("cpu", "20250101T000000Z"))
    repo = os.path.realpath(os.path.dirname(BENCH))
    assert not (out + os.sep).startswith(repo + os.sep)
    assert os.path.basename(out) == "fused_adamw-bench-cpu-20250101T000000Z"
    assert run.parse_args(["--device", "cpu"]).out is None


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
    # Storage options (providers.bytes_per_step's docstring): bf16 state 2 B
    # r+w per state element; master: grad r, master r+w, param w only; Kahan:
    # compensation r+w besides the param; stochastic rounding moves nothing
    # more, but SGD then keeps a float32 step per tensor.
    assert prov.bytes_per_step(fp32, 1000, 1, torch.bfloat16) == 20 * 1000 + 8
    assert prov.bytes_per_step(bf16, 1000, 1, torch.bfloat16, P.MASTER) == 20 * 1000 + 8
    assert prov.bytes_per_step(bf16, 1000, 1, torch.float32, P.MASTER) == 28 * 1000 + 8
    assert prov.bytes_per_step(bf16, 1000, 1, torch.bfloat16, P.KAHAN) == 18 * 1000 + 8
    assert prov.bytes_per_step(bf16, 1000, 1, torch.bfloat16, P.STOCHASTIC) == 14 * 1000 + 8
    fp16 = prov.OptConfig(dtype=torch.float16)
    assert prov.bytes_per_step(fp16, 1000, 1, torch.bfloat16, P.MASTER) == 20 * 1000 + 8
    sgd16 = prov.OptConfig(prov.OptimizerKind.SGD, torch.bfloat16)
    assert prov.bytes_per_step(sgd16, 1000, 3, torch.bfloat16) == 10 * 1000
    assert prov.bytes_per_step(sgd16, 1000, 3, torch.bfloat16, P.STOCHASTIC) == 10 * 1000 + 24
    assert check.per_tensor_cap([10, 1000, 5], 100) == 85
    assert check.per_tensor_cap([10, 20], 100) == 20
    t = torch.arange(10.0)
    assert check.take([t, t[:3]], 4).tolist() == [0, 1, 8, 9, 0, 1, 2]
    assert check.element_indices(10, 4).tolist() == [0, 1, 8, 9]
    assert check.element_indices(3, 4) is None
    assert run.parse_exponents("12:16:2") == [12, 14, 16]
    assert run.parse_exponents("10,13") == [10, 13]
    assert wl.model("gpt2").numel == 124_439_808
    assert wl.model("resnet50").numel == 25_557_032


# ---------------------------------------------------------------- storage options

P = prov.Precision
# id -> (param dtype, state dtype, precision): every option the harness runs.
STORAGE = {
    "bf16-master": (torch.bfloat16, None, P.MASTER),
    "bf16-stochastic": (torch.bfloat16, None, P.STOCHASTIC),
    "bf16-kahan": (torch.bfloat16, None, P.KAHAN),
    "fp32-bf16state": (torch.float32, torch.bfloat16, P.NEAREST),
    "bf16-fp32state": (torch.bfloat16, torch.float32, P.NEAREST),
    "fp16-stochastic": (torch.float16, None, P.STOCHASTIC),
    "fp16-bf16state-kahan": (torch.float16, torch.bfloat16, P.KAHAN),
}


def _package(cfg, params, **changes):
    """fused_adamw's torch-backend runner for cfg, keywords changed (a planted bug)."""
    cls, kwargs = cfg.package_class(fa)
    kwargs.update(changes)
    opt = cls(params, **kwargs, backend="torch")
    return prov.Runner(opt, opt.step, cfg.state_dtype or cfg.dtype, cfg.precision)


def _around_steps(runner, before=None, after=None):
    """The runner with something done around each step (a planted bug)."""
    inner = runner.step

    def step():
        if before:
            before()
        inner()
        if after:
            after()
    runner.step = step
    return runner


def _planted(cfg, params):
    """(name, build, should_pass): the package over params, and bugs the check
    must catch, each a function building a fresh runner."""
    def tail_kept():
        last = {}

        def keep():
            last.update({id(p): p.detach().reshape(-1)[-1].clone() for p in params})

        def restore():
            with torch.no_grad():
                for p in params:
                    p.reshape(-1)[-1] = last[id(p)]
        return _around_steps(_package(cfg, params), keep, restore)

    cases = [("package", lambda: _package(cfg, params), True),
             ("lr x 1.1", lambda: _package(cfg, params, lr=cfg.torch_class()[1]["lr"] * 1.1), False),
             ("last element unwritten", tail_kept, False)]
    if cfg.precision is P.STOCHASTIC:
        def nearest():
            r = _package(dataclasses.replace(cfg, precision=P.NEAREST), params)
            r.precision = P.STOCHASTIC  # claims stochastic rounding, rounds to nearest
            return r

        def other_seed():
            # The group says cfg.seed; the steps draw with another key.
            r = _package(cfg, params)
            g = r.opt.param_groups[0]
            return _around_steps(r, lambda: g.update(seed=cfg.seed + 1), lambda: g.update(seed=cfg.seed))
        cases += [("nearest for stochastic", nearest, False), ("another seed", other_seed, False)]
    if cfg.precision is P.KAHAN:
        def comp_unwritten():
            r = _package(cfg, params)

            def zero():
                for p in params:
                    r.opt.state[p]["kahan_comp"].zero_()
            return _around_steps(r, after=zero)
        cases.append(("compensation unwritten", comp_unwritten, False))
    if cfg.precision is P.MASTER:
        def master_from_param():
            r = _package(cfg, params)

            def copy():
                for p in params:
                    r.opt.state[p]["master_param"].copy_(p.detach())
            return _around_steps(r, after=copy)
        cases.append(("master rebuilt from the param", master_from_param, False))
    if cfg.state_dtype not in (None, cfg.dtype):
        def ignored():
            r = _package(dataclasses.replace(cfg, state_dtype=None), params)
            r.state_dtype = cfg.state_dtype  # claims the option, keeps the param's dtype
            return r
        cases.append(("state dtype ignored", ignored, False))
    return cases


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("storage", list(STORAGE))
def test_model_check_passes_the_package_and_catches_planted_bugs(storage, optimizer):
    """Under the storage options the check compares with fused_adamw.reference's
    float64 models: the package's torch backend (which the backend suite pins
    to them) passes, and planted bugs fail."""
    dtype, state_dtype, precision = STORAGE[storage]
    cfg = prov.OptConfig(prov.OptimizerKind(optimizer), dtype, state_dtype, precision=precision, seed=7)
    # One tensor above the per-tensor cap: the random words of its sampled
    # tail are those of elements 4400.. (check._random_words_of).
    work = wl.Workload("t", ((5000,), (33, 7), (1,)))

    def fresh():
        return wl.make_tensors(work, torch.device("cpu"), dtype, seed=1)[0]

    for i in range(len(_planted(cfg, fresh()))):
        params = fresh()
        name, build, should_pass = _planted(cfg, params)[i]
        res = check.check_provider(build(), params, cfg, 1200)
        assert res.ok is should_pass, (name, res.detail, res.same_fraction)
        assert res.oracle.startswith("fused_adamw.reference")
        assert res.sampled_numel <= 1200


def test_harness_runs_the_options_on_the_package_only(tmp_path):
    out = tmp_path / "out"
    rows = run.main(["--device", "cpu", "--dtype", "bf16", "--precision", "kahan", "--workloads",
                     "single", "--sizes", "11", "--providers", "torch-foreach", "fused_adamw-torch",
                     "--rounds", "3", "--row-seconds", "0.05", "--no-flush", "--out", str(out)])
    by = {r["provider"]: r for r in rows}
    pkg, tch = by["fused_adamw-torch"], by["torch-foreach"]
    assert pkg["status"] == "ok" and tch["status"] == "ok", (pkg["reason"], tch["reason"])
    assert (pkg["precision"], pkg["state_dtype"]) == ("kahan", "bf16")
    assert pkg["bytes_per_step"] == 18 * 2 ** 11 + 8 and pkg["check_oracle"].startswith("fused_adamw.reference")
    assert min(pkg["check_same_fraction"].values()) >= check.MODEL_SAME_FRACTION
    # torch has no such option: it runs plain bf16, checked against torch, and says so.
    assert (tch["precision"], tch["state_dtype"]) == ("nearest", "bf16")
    assert tch["bytes_per_step"] == 14 * 2 ** 11 + 8 and tch["check_oracle"].startswith("torch.optim")
    assert "torch runs plain bf16" in tch["note"] and "kahan" in tch["note"]


@pytest.mark.parametrize("argv, message", [
    (["--precision", "master"], "--precision master is for --dtype bf16 or fp16"),
    (["--precision", "kahan", "--dtype", "fp32"], "--precision kahan is for --dtype bf16 or fp16"),
    (["--state-dtype", "fp32"], "--state-dtype fp32 is for --dtype bf16 or fp16"),
    (["--state-dtype", "fp16"], "invalid choice"),
    (["--precision", "exact"], "invalid choice"),
])
def test_storage_options_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err
    ok = run.parse_args(["--device", "cpu", "--state-dtype", "bf16", "--dtype", "fp16", "--precision", "master"])
    assert (ok.state_dtype, ok.dtype, ok.precision) == ("bf16", "fp16", "master")


def test_precision_table_ratios():
    import report

    def row(dtype, state, precision, gbps, busy=False, provider="fused_adamw-cpu"):
        return dict(workload="4x16M", provider=provider, optimizer="adamw", dtype=dtype,
                    state_dtype=state, precision=precision, status="ok", gbps=gbps,
                    ms_median=1.0, numel=100, bytes_per_step=2800, busy=busy)

    rows = [row("fp32", "fp32", "nearest", g) for g in (60.0, 70.0, 80.0)]
    rows += [row("bf16", "bf16", "master", g) for g in (62.0, 66.0)]   # median 64: 0.91
    rows += [row("bf16", "bf16", "kahan", 50.0, busy=True)]          # 0.71
    rows += [row("bf16", "bf16", "nearest", 1.0, provider="torch-fused")]  # no fp32 baseline
    rows += [dict(row("fp32", "fp32", "nearest", 1e9), status="FAILED")]   # not timed: ignored
    lines = report.precision_table(rows).splitlines()
    # columns: workload provider build optimizer storage(2) B/elem runs ms GB/s range ratio ok busy
    body = {l.split()[4] + " " + l.split()[5]: l.split() for l in lines[2:6]}
    assert body["fp32/fp32 nearest"][11:13] == ["1.00", "yes"]
    assert body["bf16/bf16 master"][7:12] == ["2", "1.000", "64.0", "62.0..66.0", "0.91"]
    assert body["bf16/bf16 master"][12] == "yes"
    assert body["bf16/bf16 kahan"][11:14] == ["0.71", "NO", "1"]
    assert [l for l in lines if "torch-fused" in l][0].split()[11:13] == ["-", "-"]
    # Another build of the native module is not pooled with these rows.
    other = [dict(row("bf16", "bf16", "master", 10.0), native_builds={"fused_adamw._cpu": {"sha256": "abc"}})]
    again = report.precision_table(rows + other)
    assert [l for l in again.splitlines() if " abc " in l][0].split()[11] == "-"
    quiet = report.precision_table(rows, skip_busy=True)
    assert "kahan" not in quiet and "master" in quiet
