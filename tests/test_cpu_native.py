"""Tests of the C++ CPU backend: fused_adamw.backend_cpu and fused_adamw._cpu.

The backend functions are called directly (no optimizer class) and checked,
step by step, against a float64 torch transcription of the update rule of
../shared/DESIGN.md ("The update, per element") written below: each step the
inputs are copied to float64, the oracle takes one step from them, and the
kernel's outputs must lie within the dtype's tolerance of it. That bounds
16-bit results by their own rounding, step after step, without trajectories
drifting apart. Every instruction set the module was built with and this
processor supports is run (_cpu.set_isa).

Tensors are views into larger buffers whose guard elements must stay as they
were; buffers that must be written before they are read (SGD's momentum
buffer on its first step) are poisoned with NaN.

Run: pytest tests/test_cpu_native.py (needs `pip install -e .`).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from fused_adamw import _cpu, _native, backend_cpu

from batch_calls import adam_call, sgd_call
from tolerances import STEP
from fused_adamw.hyper import AdamHyper, SgdHyper

ISAS = _cpu.build_info()["isas_supported"]

# id -> (param dtype, state dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16-fp32state": (torch.bfloat16, torch.float32),
    "fp16-fp32state": (torch.float16, torch.float32),
}

# One step against the float64 oracle: tests/tolerances.py's STEP.
TOL = STEP

GUARD = 5  # guard elements on each side of every tensor
SENTINEL = 7.0

ADAM_MODES = {
    "adamw": AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_coeff=0.1),
    "adamw-schedule": AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_coeff=5.0),
    "adamw-nowd": AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99),
    "adam-l2": AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decoupled=False),
    "adamw-amsgrad": AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_coeff=0.1, amsgrad=True),
    "adam-l2-amsgrad-maximize": AdamHyper(lr=1e-2, beta1=0.8, beta2=0.95, weight_decay=0.05, decoupled=False,
                                          amsgrad=True, maximize=True),
    "adamw-maximize": AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_coeff=0.1,
                                maximize=True),
}

SGD_MODES = {
    "sgd": SgdHyper(lr=5e-2),
    "sgd-l2": SgdHyper(lr=5e-2, weight_decay=0.1),
    "sgdw": SgdHyper(lr=5e-2, weight_decay=0.1, decay_coeff=0.1, decoupled=True),
    "sgdw-schedule": SgdHyper(lr=5e-2, weight_decay=0.1, decay_coeff=3.0, decoupled=True),
    "momentum": SgdHyper(lr=5e-2, momentum=0.9),
    "momentum-dampening-l2": SgdHyper(lr=5e-2, momentum=0.9, dampening=0.3, weight_decay=0.1),
    "nesterov-sgdw": SgdHyper(lr=5e-2, momentum=0.9, nesterov=True, weight_decay=0.1, decay_coeff=0.1,
                              decoupled=True),
    "nesterov-maximize": SgdHyper(lr=5e-2, momentum=0.8, nesterov=True, maximize=True),
}


@pytest.fixture(params=ISAS)
def isa(request):
    previous = _cpu.isa()
    _cpu.set_isa(request.param)
    yield request.param
    _cpu.set_isa(previous)


# ---------------------------------------------------------------- data

class Guarded:
    """A tensor of n elements in the middle of a buffer of sentinels."""

    def __init__(self, values: torch.Tensor, dtype: torch.dtype) -> None:
        n = values.numel()
        self.buffer = torch.full((n + 2 * GUARD,), SENTINEL, dtype=dtype)
        self.t = self.buffer[GUARD:GUARD + n]
        self.t.copy_(values)

    def check_guards(self, name: str) -> None:
        for side in (self.buffer[:GUARD], self.buffer[-GUARD:]):
            assert torch.equal(side, torch.full_like(side, SENTINEL)), f"{name}: wrote outside its elements"


def f64(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy (t.double() would alias a float64 t)."""
    return t.to(torch.float64, copy=True)


def randn(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randn(n, generator=gen, dtype=torch.float64)


def rand(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64)


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor) -> None:
    rtol, atol = TOL[got.dtype]
    err = (got.double() - ref).abs()
    ok = err <= rtol * ref.abs() + atol  # False for NaN
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0])
        raise AssertionError(f"{name} ({got.dtype}): {int((~ok).sum())} of {got.numel()} elements off; "
                             f"first at {i}: got {float(got[i])!r}, want {float(ref[i])!r}")


# ---------------------------------------------------------------- the oracle (DESIGN.md)

def effective_grad(p, g, weight_decay, decoupled, maximize, grad_scale):
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    if not decoupled and weight_decay != 0.0:
        g = g + weight_decay * p
    return g


def adam_oracle(p, g, m, v, vmax, t: float, h: AdamHyper, grad_scale=None):
    """One step in float64 from float64 copies; returns the new (p, m, v, vmax)."""
    g = effective_grad(p, g, h.weight_decay, h.decoupled, h.maximize, grad_scale)
    if h.decoupled:
        p = p * (1.0 - h.lr * h.decay_coeff)
    m = h.beta1 * m + (1.0 - h.beta1) * g
    v = h.beta2 * v + (1.0 - h.beta2) * g * g
    denom = v
    if h.amsgrad:
        vmax = torch.maximum(vmax, v)
        denom = vmax
    p = p - h.lr / (1.0 - h.beta1 ** t) * m / (denom.sqrt() / math.sqrt(1.0 - h.beta2 ** t) + h.eps)
    return p, m, v, vmax


def sgd_oracle(p, g, buf, first: bool, h: SgdHyper, grad_scale=None):
    g = effective_grad(p, g, h.weight_decay, h.decoupled, h.maximize, grad_scale)
    if h.decoupled:
        p = p * (1.0 - h.lr * h.decay_coeff)
    if h.momentum != 0.0:
        buf = g if first else h.momentum * buf + (1.0 - h.dampening) * g
        g = g + h.momentum * buf if h.nesterov else buf
    return p - h.lr * g, buf


# ---------------------------------------------------------------- Adam

class AdamCase:
    """Tensors of the given sizes with fresh random data and state."""

    def __init__(self, sizes, dtypes, h: AdamHyper, start_steps, seed: int) -> None:
        pdt, sdt = dtypes
        gen = torch.Generator().manual_seed(seed)
        self.h = h
        self.p = [Guarded(randn(gen, n), pdt) for n in sizes]
        self.g = [Guarded(randn(gen, n), pdt) for n in sizes]
        self.m = [Guarded(0.1 * randn(gen, n), sdt) for n in sizes]
        self.v = [Guarded(rand(gen, n) + 0.01, sdt) for n in sizes]
        # Around v, so the maximum takes either side.
        self.w = [Guarded((b.t.double() * (0.99 + 0.02 * rand(gen, b.t.numel()))), sdt) for b in self.v]
        self.steps = [torch.tensor(float(s), dtype=torch.float32) for s in start_steps]
        self.gen = gen

    def tensors(self, attr):
        return [b.t for b in getattr(self, attr)]

    def new_grads(self, scale: float = 1.0) -> None:
        for b in self.g:
            b.t.copy_(randn(self.gen, b.t.numel()) * scale)

    def step_and_check(self, cache=None, grad_scale=None, lr_tensor=None):
        h = self.h
        before = [tuple(f64(b.t) for b in bs) for bs in zip(self.p, self.g, self.m, self.v, self.w)]
        old_steps = [float(s) for s in self.steps]
        batch = adam_call(
            backend_cpu, self.tensors("p"), self.tensors("g"), self.tensors("m"), self.tensors("v"),
            self.tensors("w") if h.amsgrad else None, self.steps, h,
            cache=cache, lr_tensor=lr_tensor,
            grad_scale=None if grad_scale is None else torch.tensor([grad_scale], dtype=torch.float32))
        h_ref = h if lr_tensor is None else replace(h, lr=float(lr_tensor))
        for i, (p0, g0, m0, v0, w0) in enumerate(before):
            assert float(self.steps[i]) == old_steps[i] + 1.0
            p, m, v, w = adam_oracle(p0, g0, m0, v0, w0, old_steps[i] + 1.0, h_ref, grad_scale)
            assert_close(f"param {i}", self.p[i].t, p)
            assert_close(f"exp_avg {i}", self.m[i].t, m)
            assert_close(f"exp_avg_sq {i}", self.v[i].t, v)
            if h.amsgrad:
                assert_close(f"max_exp_avg_sq {i}", self.w[i].t, w)
            else:
                assert torch.equal(self.w[i].t.double(), w0), "max_exp_avg_sq written without amsgrad"
        for name in ("p", "g", "m", "v", "w"):
            for b in getattr(self, name):
                b.check_guards(name)
        return batch


@pytest.mark.parametrize("mode", list(ADAM_MODES))
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
def test_adam_matches_oracle(isa, dtypes, mode):
    # Three tensors in one call, each with its own step count (t = 1, 6, 1001).
    case = AdamCase((1, 7, 4097), dtypes, ADAM_MODES[mode], start_steps=(0, 5, 1000), seed=1)
    cache = {}
    for _ in range(3):
        case.step_and_check(cache=cache)
        case.new_grads()


@pytest.mark.parametrize("dtypes", [DTYPES["fp32"], DTYPES["fp16-fp32state"]], ids=["fp32", "fp16-fp32state"])
def test_adam_large(isa, dtypes):
    case = AdamCase((2 ** 20 + 3,), dtypes, ADAM_MODES["adamw-amsgrad"], start_steps=(2,), seed=2)
    case.step_and_check()


def test_adam_many_tensors_one_call():
    # Sizes around the 32K work unit, so units span several tensors and
    # tensors span several units.
    gen = torch.Generator().manual_seed(3)
    sizes = [int(x) for x in torch.randint(1, 40_000, (40,), generator=gen)] + [1, 2, 32768, 32769, 65536]
    starts = [int(x) for x in torch.randint(0, 50, (len(sizes),), generator=gen)]
    case = AdamCase(sizes, DTYPES["fp32"], ADAM_MODES["adamw"], start_steps=starts, seed=4)
    case.step_and_check(cache={})


def test_adam_grad_scale(isa):
    case = AdamCase((7, 4097), DTYPES["fp32"], ADAM_MODES["adamw"], start_steps=(0, 0), seed=5)
    case.new_grads(scale=1024.0)
    case.step_and_check(grad_scale=1024.0)


def test_adam_lr_tensor_overrides_hyper_lr():
    case = AdamCase((4097,), DTYPES["fp32"], replace(ADAM_MODES["adamw"], lr=123.0), start_steps=(0,), seed=6)
    case.step_and_check(lr_tensor=torch.tensor([3e-3], dtype=torch.float32))


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_found_inf_writes_nothing(isa, amsgrad):
    case = AdamCase((7, 4097), DTYPES["bf16"], replace(ADAM_MODES["adamw"], amsgrad=amsgrad),
                    start_steps=(3, 4), seed=7)
    snapshot = [b.buffer.clone() for name in ("p", "g", "m", "v", "w") for b in getattr(case, name)]
    steps = [s.clone() for s in case.steps]
    adam_call(backend_cpu, case.tensors("p"), case.tensors("g"), case.tensors("m"), case.tensors("v"),
                          case.tensors("w") if amsgrad else None, case.steps, case.h,
                          grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([1.0]), cache={})
    after = [b.buffer for name in ("p", "g", "m", "v", "w") for b in getattr(case, name)]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))
    assert all(torch.equal(a, b) for a, b in zip(steps, case.steps))
    # found_inf == 0 steps as usual.
    case.step_and_check()


def test_adam_thread_count_does_not_change_results():
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            case = AdamCase((300_000, 5, 70_001), DTYPES["bf16"], ADAM_MODES["adamw"], (0, 1, 2), seed=8)
            adam_call(backend_cpu, case.tensors("p"), case.tensors("g"), case.tensors("m"), case.tensors("v"),
                                  None, case.steps, case.h)
            results.append([b.t.clone() for b in case.p + case.m + case.v])
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---------------------------------------------------------------- SGD

class SgdCase:
    def __init__(self, sizes, dtypes, h: SgdHyper, seed: int) -> None:
        pdt, sdt = dtypes
        gen = torch.Generator().manual_seed(seed)
        self.h = h
        self.p = [Guarded(randn(gen, n), pdt) for n in sizes]
        self.g = [Guarded(randn(gen, n), pdt) for n in sizes]
        # Poison: the first step must write the buffer without reading it.
        self.b = [Guarded(torch.full((n,), math.nan, dtype=torch.float64), sdt) for n in sizes]
        self.first = [True] * len(sizes)
        self.gen = gen

    def new_grads(self, scale: float = 1.0) -> None:
        for b in self.g:
            b.t.copy_(randn(self.gen, b.t.numel()) * scale)

    def step_and_check(self, cache=None, grad_scale=None) -> None:
        h = self.h
        before = [(f64(p.t), f64(g.t), f64(b.t)) for p, g, b in zip(self.p, self.g, self.b)]
        bufs = [b.t for b in self.b] if h.momentum != 0.0 else None
        sgd_call(backend_cpu, [b.t for b in self.p], [b.t for b in self.g], bufs, list(self.first), h,
                             cache=cache,
                             grad_scale=None if grad_scale is None else torch.tensor([grad_scale]))
        for i, (p0, g0, b0) in enumerate(before):
            p, buf = sgd_oracle(p0, g0, b0, self.first[i], h, grad_scale)
            assert_close(f"param {i}", self.p[i].t, p)
            if h.momentum != 0.0:
                assert_close(f"momentum_buffer {i}", self.b[i].t, buf)
            else:
                assert bool(self.b[i].t.isnan().all()), "momentum_buffer written with momentum == 0"
        for name in ("p", "g", "b"):
            for b in getattr(self, name):
                b.check_guards(name)
        self.first = [False] * len(self.first)


@pytest.mark.parametrize("mode", list(SGD_MODES))
@pytest.mark.parametrize("dtypes", list(DTYPES.values()), ids=list(DTYPES))
def test_sgd_matches_oracle(isa, dtypes, mode):
    case = SgdCase((1, 7, 4097), dtypes, SGD_MODES[mode], seed=11)
    cache = {}
    for _ in range(3):
        case.step_and_check(cache=cache)
        case.new_grads()


def test_sgd_large(isa):
    case = SgdCase((2 ** 20 + 3,), DTYPES["bf16-fp32state"], SGD_MODES["nesterov-sgdw"], seed=12)
    case.first = [False]
    case.b[0].t.copy_(randn(case.gen, 2 ** 20 + 3))
    case.step_and_check()


def test_sgd_first_step_per_tensor():
    # One call where some buffers are new (first_step) and others are not.
    case = SgdCase((7, 4097, 40_000), DTYPES["fp32"], SGD_MODES["momentum-dampening-l2"], seed=13)
    for b in case.b[1:]:
        b.t.copy_(torch.randn(b.t.numel(), generator=case.gen))
    case.first = [True, False, True]
    case.step_and_check(cache={})


def test_sgd_grad_scale_and_found_inf(isa):
    case = SgdCase((7, 4097), DTYPES["fp16"], SGD_MODES["momentum"], seed=14)
    case.new_grads(scale=64.0)
    case.step_and_check(grad_scale=64.0)
    snapshot = [b.buffer.clone() for name in ("p", "g", "b") for b in getattr(case, name)]
    sgd_call(backend_cpu, [b.t for b in case.p], [b.t for b in case.g], [b.t for b in case.b], case.first,
                         case.h, found_inf=torch.tensor([1.0]))
    after = [b.buffer for name in ("p", "g", "b") for b in getattr(case, name)]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))


# ---------------------------------------------------------------- conversions

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_conversion_rounds_to_nearest_even(isa, dtype):
    # SGD with lr = -1 computes p + g in float32, exactly for these operands,
    # so the stored result must be torch's round-to-nearest-even of the sum,
    # bit for bit: ties, overflow to inf, subnormals, inf and NaN included.
    gen = torch.Generator().manual_seed(21)
    n = 5000
    base = torch.ldexp(1.0 + torch.rand(n, generator=gen), torch.randint(-3, 3, (n,), generator=gen))
    p = (base * torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)).to(dtype)
    # g one or a few binades below p: p + g has bits beyond p's precision, ties included.
    g = (p.float() * torch.ldexp(torch.ones(n), -torch.randint(1, 4, (n,), generator=gen))
         * (1.0 + torch.randint(0, 8, (n,), generator=gen) / 8.0)).to(dtype)
    info = torch.finfo(dtype)
    specials_p = [info.max, -info.max, info.tiny, info.tiny / 4, math.inf, -math.inf, math.nan, 0.0, -0.0, 1.0]
    specials_g = [info.max / 2, -info.max / 2, -info.tiny / 2, info.tiny / 8, 1.0, 1.0, 1.0, -0.0, -0.0, math.nan]
    p = torch.cat([p, torch.tensor(specials_p, dtype=dtype)])
    g = torch.cat([g, torch.tensor(specials_g, dtype=dtype)])
    want = (p.float() + g.float()).to(dtype)
    sgd_call(backend_cpu, [p], [g], None, [False], SgdHyper(lr=-1.0))
    torch.testing.assert_close(p, want, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------- tables and cache

def test_cached_table_follows_moved_tensors():
    case = AdamCase((7, 4097), DTYPES["fp32"], ADAM_MODES["adamw"], start_steps=(0, 0), seed=31)
    cache = {}
    case.step_and_check(cache=cache)
    # New grad tensors (zero_grad(set_to_none=True)) and a param whose
    # storage moved under the same object (p.data = ...).
    for b in case.g:
        b.buffer = b.buffer.clone()
        b.t = b.buffer[GUARD:GUARD + b.t.numel()]
    moved = case.p[1]
    moved.buffer = moved.buffer.clone()
    new_param = moved.buffer[GUARD:GUARD + moved.t.numel()]
    old_param = moved.t
    old_param.data = new_param
    moved.t = old_param
    case.new_grads()
    batch = case.step_and_check(cache=cache)
    fresh = _native.build_table("adam", case.tensors("p"), case.tensors("g"),
                                {"exp_avg": case.tensors("m"), "exp_avg_sq": case.tensors("v")}, case.steps, None)
    assert batch.table.tolist() == fresh.tolist()
    assert int(batch.table[1, _native.AdamCol.PARAM]) == new_param.data_ptr()


def test_sgd_table_columns():
    ps = [torch.randn(n) for n in (3, 5)]
    gs = [torch.randn_like(p) for p in ps]
    bs = [torch.randn_like(p) for p in ps]
    t = _native.build_table("sgd", ps, gs, {"momentum_buffer": bs}, None, [True, False])
    # aux, step and the generator's index: 0 without a precision option
    want = [[p.numel(), p.data_ptr(), g.data_ptr(), b.data_ptr(), f, 0, 0, 0] for p, g, b, f in zip(ps, gs, bs, (1, 0))]
    assert t.dtype == np.int64 and t.flags.c_contiguous and t.tolist() == want
    aux = [torch.zeros_like(p) for p in ps]
    steps = [torch.zeros(()) for _ in ps]
    t = _native.build_table("sgd", ps, gs, {"momentum_buffer": None}, steps, None, aux=aux, index=[4, 9])
    want = [[p.numel(), p.data_ptr(), g.data_ptr(), 0, 0, a.data_ptr(), s.data_ptr(), k]
            for p, g, a, s, k in zip(ps, gs, aux, steps, (4, 9))]
    assert t.tolist() == want
    assert [c.name for c in _native.SgdCol][-1] == "COUNT" and _native.SgdCol.COUNT == t.shape[1]


def test_dtype_codes():
    assert [_native.dtype_code(d) for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16)] == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="int32"):
        _native.dtype_code(torch.int32)


# ---------------------------------------------------------------- argument checks

def _adam_table_for(p, amsgrad_buffer=True):
    # Never run: every call with it fails its checks first.
    a = p.data_ptr()
    return torch.tensor([[p.numel(), a, a, a, a, a if amsgrad_buffer else 0, a]], dtype=torch.int64)


@pytest.mark.parametrize("kwargs, match", [
    (dict(param_dtype=7), "param_dtype"),
    (dict(state_dtype=-1), "state_dtype"),
    (dict(param_dtype=0, state_dtype=2), "state_dtype=float16 is not allowed for float32"),
    (dict(param_dtype=0, state_dtype=1), "state_dtype=float64"),
    (dict(param_dtype=1, state_dtype=3), "state_dtype=bfloat16 is not allowed for float64"),
    (dict(n_tensors=-1), "n_tensors"),
    (dict(table_addr=0), "table_addr"),
    (dict(num_threads=0), "num_threads"),
], ids=["param-dtype", "state-dtype", "fp32-fp16state", "fp32-fp64state", "fp64-bf16state", "n-tensors",
        "null-table", "threads"])
@pytest.mark.parametrize("step", ["adam", "sgd"])
def test_native_argument_errors(step, kwargs, match):
    p = torch.randn(4)
    before = p.clone()
    table = _adam_table_for(p)
    args = dict(table_addr=table.data_ptr(), n_tensors=1, param_dtype=0, state_dtype=0,
                grad_scale_addr=0, found_inf_addr=0, num_threads=1)
    args.update(kwargs)
    fn, hyper = (_cpu.adam_step, _cpu.AdamHyper()) if step == "adam" else (_cpu.sgd_step, _cpu.SgdHyper())
    with pytest.raises(ValueError, match=match):
        fn(hyper=hyper, **args)
    assert torch.equal(p, before)


@pytest.mark.parametrize("column, hyper, match", [
    (_native.AdamCol.GRAD, {}, "row 0: grad address is 0"),
    (_native.AdamCol.STEP, {}, "row 0: step address is 0"),
    (_native.AdamCol.MAX_EXP_AVG_SQ, dict(amsgrad=True), "max_exp_avg_sq"),
    (_native.AdamCol.NUMEL, {}, "numel -1"),
], ids=["grad", "step", "amsgrad-buffer", "numel"])
def test_native_adam_row_errors(column, hyper, match):
    p = torch.randn(4)
    table = _adam_table_for(p)
    table[0, column] = -1 if column == _native.AdamCol.NUMEL else 0
    with pytest.raises(ValueError, match=match):
        _cpu.adam_step(table.data_ptr(), 1, 0, 0, _cpu.AdamHyper(**hyper), 0, 0, 1)


def test_native_sgd_momentum_buffer_required():
    p = torch.randn(4)
    table = torch.tensor([[4, p.data_ptr(), p.data_ptr(), 0, 0]], dtype=torch.int64)
    with pytest.raises(ValueError, match="momentum_buffer"):
        _cpu.sgd_step(table.data_ptr(), 1, 0, 0, _cpu.SgdHyper(momentum=0.9), 0, 0, 1)


def test_backend_rejects_bad_grad_scale():
    p, g = torch.randn(3), torch.randn(3)
    with pytest.raises(ValueError, match="grad_scale"):
        sgd_call(backend_cpu, [p], [g], None, [False], SgdHyper(), grad_scale=torch.tensor([1.0, 2.0]))


def test_isa_selection():
    info = _cpu.build_info()
    assert info["isa"] == _cpu.isa() and info["isa"] in info["isas_supported"]
    assert set(info["isas_supported"]) <= set(info["isas_built"]) and "base" in info["isas_supported"]
    assert isinstance(info["openmp"], int) and info["compiler"]
    previous = _cpu.isa()
    try:
        _cpu.set_isa("base")
        assert _cpu.isa() == "base"
        _cpu.set_isa("auto")
        assert _cpu.isa() == info["isas_supported"][-1]
    finally:
        _cpu.set_isa(previous)
    with pytest.raises(ValueError, match="unknown CPU instruction set 'sse9'"):
        _cpu.set_isa("sse9")
    assert _cpu.isa() == previous


def test_isa_environment_variable():
    # Read once, at import: a fresh interpreter per value.
    code = "import fused_adamw._cpu as c; print(c.isa())"

    def run(value):
        env = dict(os.environ, FUSED_ADAMW_CPU_ISA=value)
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)

    ok = run("base")
    assert ok.returncode == 0 and ok.stdout.strip() == "base", ok.stderr
    bad = run("sse9")
    assert bad.returncode != 0 and "ImportError: FUSED_ADAMW_CPU_ISA: unknown CPU instruction set" in bad.stderr


def test_hyper_structs_mirror_dataclasses():
    # One field list each side (update.h's X-lists, hyper.py's dataclasses):
    # adding a field on one side only fails here.
    from dataclasses import fields
    assert _cpu.AdamHyper.FIELDS == tuple(f.name for f in fields(AdamHyper))
    assert _cpu.SgdHyper.FIELDS == tuple(f.name for f in fields(SgdHyper))
    h = AdamHyper(lr=0.5, beta1=0.7, beta2=0.8, eps=1e-3, weight_decay=0.2, decay_coeff=0.3,
                  decoupled=False, amsgrad=True, maximize=True, precision=2, seed=2**63 - 5)
    c = _native.to_cpp(_cpu, h)
    assert tuple(getattr(c, f) for f in c.FIELDS) == (0.5, 0.7, 0.8, 1e-3, 0.2, 0.3, False, True, True, 2,
                                                      2**63 - 5)
    s = SgdHyper(lr=0.5, momentum=0.7, dampening=0.1, weight_decay=0.2, decay_coeff=0.3, decoupled=True,
                 nesterov=True, maximize=True, precision=3, seed=7)
    c = _native.to_cpp(_cpu, s)
    assert tuple(getattr(c, f) for f in c.FIELDS) == (0.5, 0.7, 0.1, 0.2, 0.3, True, True, True, 3, 7)
    with pytest.raises(TypeError, match="unknown keyword"):
        _cpu.AdamHyper(lr=1.0, momentum=0.9)
