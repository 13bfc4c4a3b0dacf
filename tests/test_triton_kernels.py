"""Tests of the Triton launchers fused_adamw.triton_kernels.adam_step / sgd_step.

They call the launchers directly (the backend contract of
python/fused_adamw/hyper.py), not through the optimizer classes: every mode x
dtype x weight decay on/off, several tensors of odd sizes (1, 7, 4097, a
transposed 3x5) in one call, per-tensor step counts, 20 steps with lr changing
every step, found_inf, grad_scale, lr from a tensor, the table cache; the
vector path decided per tensor (misaligned views among aligned tensors), table
versions kept alive until their copy has read them (completion and capture
simulated), every launch under the params' device.

Oracle: fused_adamw.reference (float64 NumPy, DESIGN.md's rule), two ways:
  * each step, one reference step from our own state before it: the kernel's
    math type (float32) against float64, so our result is within a few fp32
    rounding units, or one rounding unit of a 16-bit storage type (STEP_TOL);
  * for float32 / float64 storage, the whole 20-step trajectory against an
    independent reference run (TRAJ_TOL).

Where: without CUDA (CI), on CPU tensors under the Triton interpreter: this
module sets TRITON_INTERPRET=1 before it imports triton (the kernels choose
interpreter or compiler when they are defined; if something imported them
earlier in the other mode, collection stops with a message saying so). With
CUDA, the same tests run compiled on the GPU, plus the `gpu` tests (no
recompiles when lr changes, CUDA-graph capture and replay). Either way one
test compiles the kernels for sm_90 in a subprocess (no GPU needed) and reads
the PTX, with the installed Triton and with each one named in
FUSED_ADAMW_TRITON_AOT_PATHS (CI: the GPU machine's Triton 3.6, installed by
.ci/triton_versions.sh; where unset, that case is skipped, and fails under CI).

    pytest tests/test_triton_kernels.py        # ~1 minute on 2 CPU cores
    FUSED_ADAMW_TRITON_AOT_PATHS="$(bash .ci/triton_versions.sh)" pytest tests/test_triton_kernels.py -k compile
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first import of triton (kernels pick the interpreter
    # when they are decorated).
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from fused_adamw import reference  # noqa: E402
from fused_adamw.hyper import AdamHyper, SgdHyper  # noqa: E402
from fused_adamw import triton_kernels  # noqa: E402
from batch_calls import adam_call, sgd_call  # noqa: E402
from tolerances import STEP, TRAJECTORY  # noqa: E402
from fused_adamw.triton_kernels import adam as triton_adam  # noqa: E402
from fused_adamw.triton_kernels import sgd as triton_sgd  # noqa: E402
from fused_adamw.triton_kernels import _common  # noqa: E402
from fused_adamw.plan import Batch  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
if INTERPRETED != (type(triton_adam._adam_kernel).__name__ == "InterpretedFunction"):
    raise RuntimeError(
        "fused_adamw.triton_kernels was imported before TRITON_INTERPRET was set, so its kernels do not "
        "match the mode this module runs in; set TRITON_INTERPRET=1 in the environment (or in conftest.py) "
        "before anything imports triton, or run this file on its own"
    )

STEPS = 20
SHAPES = [(1,), (7,), (4097,), "3x5T"]  # "3x5T": a transposed (5, 3) tensor, dense but not contiguous
INITIAL_STEPS = (0, 3, 10, 1)
LR0 = 1e-2

# id -> (param dtype, state dtype)
DTYPES = {
    "fp32": (torch.float32, torch.float32),
    "fp64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp16": (torch.float16, torch.float16),
    "bf16-fp32state": (torch.bfloat16, torch.float32),
}
# One reference step from our state, and whole trajectories against an
# independent float64 run: tests/tolerances.py's STEP and TRAJECTORY.
STEP_TOL = STEP
TRAJ_TOL = TRAJECTORY

# id -> reference keywords (weight_decay comes from the case)
ADAM_MODES = {
    "adamw": dict(decoupled=True),
    "adam-l2": dict(decoupled=False),
    "adamw-amsgrad": dict(decoupled=True, amsgrad=True),
    "adam-l2-amsgrad-maximize": dict(decoupled=False, amsgrad=True, maximize=True),
    "adamw-maximize": dict(decoupled=True, maximize=True),
    "adamw-schedule": dict(decoupled=True, decay_scaling="schedule"),
}
SGD_MODES = {
    "sgd": dict(),
    "sgd-momentum-dampening": dict(momentum=0.9, dampening=0.1),
    "sgd-nesterov-maximize": dict(momentum=0.9, nesterov=True, maximize=True),
    "sgdw": dict(decoupled=True),
    "sgdw-momentum": dict(decoupled=True, momentum=0.9),
    "sgdw-schedule": dict(decoupled=True, momentum=0.8, dampening=0.2, decay_scaling="schedule"),
}
# Weight decay off only where it makes a different kernel (with wd = 0 the
# L2 / decoupled / schedule variants of a mode are one and the same update).
ADAM_CASES = [(m, 0.1) for m in ADAM_MODES] + [("adamw", 0.0), ("adam-l2-amsgrad-maximize", 0.0)]
SGD_CASES = [(m, 0.1) for m in SGD_MODES] + [("sgd", 0.0), ("sgd-nesterov-maximize", 0.0)]
BETAS = (0.9, 0.99)
EPS = 1e-8


# ---------------------------------------------------------------- helpers

def _lr(k: int) -> float:
    return LR0 * 0.9 ** k * (1.0 + 0.1 * math.sin(k))


def _randn(gen, shape, dtype, scale=1.0):
    """Fresh random data, never zeros, on DEVICE; "3x5T" gives a transposed view."""
    if shape == "3x5T":
        return (torch.randn((5, 3), generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype).t()
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype)


def _positive(gen, like, dtype, scale):
    """Like `like` (shape and strides), uniform in (0.1, 1.1) * scale."""
    out = torch.empty_like(like, dtype=dtype)
    out.copy_((torch.rand(like.shape, generator=gen, dtype=torch.float64) + 0.1) * scale)
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().copy()


def _assert_close(what: str, ours: torch.Tensor, ref: np.ndarray, tol: tuple[float, float]) -> None:
    rtol, atol = tol
    got = _np(ours)
    diff = np.abs(got - ref)
    bound = atol + rtol * np.abs(ref)
    bad = ~(diff <= bound)  # NaN counts as bad
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff - bound, -np.inf)), bad.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.size} elements off; worst at {i}: "
            f"ours {got[i]!r}, reference {ref[i]!r}, |diff| {diff[i]:.3g} > {bound[i]:.3g} (rtol {rtol}, atol {atol})"
        )


def _adam_hyper(lr: float, wd: float, kw: dict) -> AdamHyper:
    schedule = kw.get("decay_scaling", "lr") == "schedule"
    return AdamHyper(lr=lr, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=wd,
                     decay_coeff=wd / LR0 if schedule else wd, decoupled=kw.get("decoupled", True),
                     amsgrad=kw.get("amsgrad", False), maximize=kw.get("maximize", False))


def _sgd_hyper(lr: float, wd: float, kw: dict) -> SgdHyper:
    schedule = kw.get("decay_scaling", "lr") == "schedule"
    return SgdHyper(lr=lr, momentum=kw.get("momentum", 0.0), dampening=kw.get("dampening", 0.0),
                    weight_decay=wd, decay_coeff=wd / LR0 if schedule else wd,
                    decoupled=kw.get("decoupled", False), nesterov=kw.get("nesterov", False),
                    maximize=kw.get("maximize", False))


class AdamRun:
    """Params, grads and state of one multi-tensor Adam test on DEVICE."""

    def __init__(self, seed: int, dtype_id: str, amsgrad: bool, shapes=SHAPES, initial_steps=INITIAL_STEPS):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype, self.state_dtype = DTYPES[dtype_id]
        self.shapes = shapes
        self.params = [_randn(self.gen, s, self.dtype) for s in shapes]
        self.exp_avgs = [_randn(self.gen, s, self.state_dtype, 0.1) for s in shapes]
        self.exp_avg_sqs = [_positive(self.gen, p, self.state_dtype, 1e-2) for p in self.params]
        self.max_exp_avg_sqs = None
        if amsgrad:
            # max(v) >= v, with some elements that this step's v overtakes
            self.max_exp_avg_sqs = [(v.double() * 1.02).to(self.state_dtype) for v in self.exp_avg_sqs]
        self.steps = [torch.tensor(float(s), dtype=torch.float32, device=DEVICE) for s in initial_steps]
        self.cache: dict = {}

    def grads(self, scale: float = 1.0):
        return [_randn(self.gen, s, self.dtype, (0.5 + j) * scale) for j, s in enumerate(self.shapes)]

    def snapshot(self):
        """Our current params and state as float64 reference inputs."""
        out = []
        for i, p in enumerate(self.params):
            st = {"step": int(self.steps[i].item()), "exp_avg": _np(self.exp_avgs[i]),
                  "exp_avg_sq": _np(self.exp_avg_sqs[i])}
            if self.max_exp_avg_sqs is not None:
                st["max_exp_avg_sq"] = _np(self.max_exp_avg_sqs[i])
            out.append((_np(p), st))
        return out

    def step(self, grads, hyper, **kw):
        return adam_call(triton_kernels, self.params, grads, self.exp_avgs, self.exp_avg_sqs,
                         self.max_exp_avg_sqs, self.steps, hyper, cache=self.cache, **kw)

    def check(self, what: str, expected, tol_table) -> None:
        for i, (p_ref, st) in enumerate(expected):
            _assert_close(f"{what} param {i}", self.params[i], p_ref, tol_table[self.dtype])
            st_tol = tol_table[self.state_dtype]
            _assert_close(f"{what} exp_avg {i}", self.exp_avgs[i], st["exp_avg"], st_tol)
            _assert_close(f"{what} exp_avg_sq {i}", self.exp_avg_sqs[i], st["exp_avg_sq"], st_tol)
            if self.max_exp_avg_sqs is not None:
                _assert_close(f"{what} max_exp_avg_sq {i}", self.max_exp_avg_sqs[i], st["max_exp_avg_sq"], st_tol)
            assert self.steps[i].item() == float(st["step"]), f"{what} step {i}"


class SgdRun:
    """Params, grads and momentum buffers of one multi-tensor SGD test on DEVICE.

    Tensors 0 and 2 start without a buffer (first step: the buffer is
    allocated, poisoned with NaN, and must be written, never read); tensors 1
    and 3 start with a random one."""

    def __init__(self, seed: int, dtype_id: str, momentum: bool, shapes=SHAPES):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype, self.state_dtype = DTYPES[dtype_id]
        self.shapes = shapes
        self.params = [_randn(self.gen, s, self.dtype) for s in shapes]
        self.bufs = None
        self.first = [False] * len(shapes)
        if momentum:
            self.first = [i % 2 == 0 for i in range(len(shapes))]
            self.bufs = [torch.full_like(p, math.nan, dtype=self.state_dtype) if f
                         else _randn(self.gen, s, self.state_dtype, 0.1)
                         for p, s, f in zip(self.params, shapes, self.first)]
        self.cache: dict = {}

    def grads(self, scale: float = 1.0):
        return [_randn(self.gen, s, self.dtype, (0.5 + j) * scale) for j, s in enumerate(self.shapes)]

    def snapshot(self):
        out = []
        for i, p in enumerate(self.params):
            st = {} if self.bufs is None or self.first[i] else {"momentum_buffer": _np(self.bufs[i])}
            out.append((_np(p), st))
        return out

    def step(self, grads, hyper, **kw):
        sgd_call(triton_kernels, self.params, grads, self.bufs, list(self.first), hyper, cache=self.cache, **kw)
        self.first = [False] * len(self.first)

    def check(self, what: str, expected, tol_table) -> None:
        for i, (p_ref, st) in enumerate(expected):
            _assert_close(f"{what} param {i}", self.params[i], p_ref, tol_table[self.dtype])
            if self.bufs is not None:
                _assert_close(f"{what} momentum_buffer {i}", self.bufs[i], st["momentum_buffer"],
                              tol_table[self.state_dtype])


def _ref_adam(expected, grads, lr, wd, kw, **extra):
    for (p, st), g in zip(expected, grads):
        reference.adam_step(p, _np(g), st, lr=lr, betas=BETAS, eps=EPS, weight_decay=wd,
                            initial_lr=LR0, **kw, **extra)


def _ref_sgd(expected, grads, lr, wd, kw, **extra):
    for (p, st), g in zip(expected, grads):
        reference.sgd_step(p, _np(g), st, lr=lr, weight_decay=wd, initial_lr=LR0, **kw, **extra)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN poison included)."""
    a, b = (t.detach().cpu().contiguous() for t in (a, b))
    as_int = _INT_OF_SIZE[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


# ---------------------------------------------------------------- every mode x dtype

@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode,wd", ADAM_CASES, ids=[f"{m}-wd{w}" for m, w in ADAM_CASES])
def test_adam_matches_reference(mode, wd, dtype_id):
    kw = ADAM_MODES[mode]
    run = AdamRun(seed=1, dtype_id=dtype_id, amsgrad=kw.get("amsgrad", False))
    trajectory = run.snapshot()
    for k in range(STEPS):
        lr = _lr(k)
        grads = run.grads()
        expected = run.snapshot()
        _ref_adam(expected, grads, lr, wd, kw)
        _ref_adam(trajectory, grads, lr, wd, kw)
        run.step(grads, _adam_hyper(lr, wd, kw))
        run.check(f"step {k}", expected, STEP_TOL)
    if run.dtype in TRAJ_TOL:
        run.check(f"after {STEPS} steps", trajectory, TRAJ_TOL)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode,wd", SGD_CASES, ids=[f"{m}-wd{w}" for m, w in SGD_CASES])
def test_sgd_matches_reference(mode, wd, dtype_id):
    kw = SGD_MODES[mode]
    run = SgdRun(seed=2, dtype_id=dtype_id, momentum=kw.get("momentum", 0.0) != 0.0)
    trajectory = run.snapshot()
    for k in range(STEPS):
        lr = _lr(k)
        grads = run.grads()
        expected = run.snapshot()
        _ref_sgd(expected, grads, lr, wd, kw)
        _ref_sgd(trajectory, grads, lr, wd, kw)
        run.step(grads, _sgd_hyper(lr, wd, kw))
        run.check(f"step {k}", expected, STEP_TOL)
    if run.dtype in TRAJ_TOL:
        run.check(f"after {STEPS} steps", trajectory, TRAJ_TOL)


# ---------------------------------------------------------------- AMP and capturable inputs

def _scalar(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float32, device=DEVICE)


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
def test_adam_found_inf_writes_nothing(dtype_id):
    kw = ADAM_MODES["adamw-amsgrad"]
    run = AdamRun(seed=3, dtype_id=dtype_id, amsgrad=True)
    grads = run.grads()
    grads[2].view(-1)[5] = math.inf
    tensors = run.params + run.exp_avgs + run.exp_avg_sqs + run.max_exp_avg_sqs + run.steps
    before = [t.clone() for t in tensors]
    run.step(grads, _adam_hyper(LR0, 0.1, kw), grad_scale=_scalar(1.0), found_inf=_scalar(1.0))
    assert all(_same_bits(a, b) for a, b in zip(tensors, before))
    # The same call with found_inf == 0 does update, steps included.
    grads = run.grads()
    expected = run.snapshot()
    _ref_adam(expected, grads, LR0, 0.1, kw)
    run.step(grads, _adam_hyper(LR0, 0.1, kw), found_inf=_scalar(0.0))
    run.check("found_inf=0", expected, STEP_TOL)


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
def test_sgd_found_inf_writes_nothing(dtype_id):
    kw = SGD_MODES["sgd-momentum-dampening"]
    run = SgdRun(seed=4, dtype_id=dtype_id, momentum=True)
    grads = run.grads()
    grads[2].view(-1)[5] = math.nan
    tensors = run.params + run.bufs
    before = [t.clone() for t in tensors]
    sgd_call(triton_kernels, run.params, grads, run.bufs, list(run.first), _sgd_hyper(LR0, 0.1, kw), cache=run.cache,
             found_inf=_scalar(1.0))
    assert all(_same_bits(a, b) for a, b in zip(tensors, before))
    grads = run.grads()
    expected = run.snapshot()
    _ref_sgd(expected, grads, LR0, 0.1, kw)
    run.step(grads, _sgd_hyper(LR0, 0.1, kw), found_inf=_scalar(0.0))
    run.check("found_inf=0", expected, STEP_TOL)


# A scale that is not a power of two, so that the division rounds.
GRAD_SCALE = 1000.0


@pytest.mark.parametrize("dtype_id", ["fp32", "fp64", "bf16"])
def test_adam_grad_scale_and_lr_tensor(dtype_id):
    """AMP inputs and a capturable lr at once: grads scaled by GRAD_SCALE,
    lr read from a tensor while hyper.lr is NaN (it must not be used)."""
    kw = ADAM_MODES["adam-l2-amsgrad-maximize"]
    run = AdamRun(seed=5, dtype_id=dtype_id, amsgrad=True)
    for k in range(3):
        lr = float(np.float32(_lr(k)))  # what a float32 lr_tensor holds
        grads = run.grads(scale=GRAD_SCALE)
        expected = run.snapshot()
        _ref_adam(expected, grads, lr, 0.1, kw, grad_scale=GRAD_SCALE)
        run.step(grads, _adam_hyper(math.nan, 0.1, kw), lr_tensor=_scalar(lr),
                 grad_scale=_scalar(GRAD_SCALE), found_inf=_scalar(0.0))
        run.check(f"step {k}", expected, STEP_TOL)


@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
def test_sgd_grad_scale_and_lr_tensor(dtype_id):
    kw = SGD_MODES["sgdw-momentum"]
    run = SgdRun(seed=6, dtype_id=dtype_id, momentum=True)
    for k in range(3):
        lr = float(np.float32(_lr(k)))  # what a float32 lr_tensor holds
        grads = run.grads(scale=GRAD_SCALE)
        expected = run.snapshot()
        _ref_sgd(expected, grads, lr, 0.1, kw, grad_scale=GRAD_SCALE)
        run.step(grads, _sgd_hyper(math.nan, 0.1, kw), lr_tensor=_scalar(lr),
                 grad_scale=_scalar(GRAD_SCALE), found_inf=_scalar(0.0))
        run.check(f"step {k}", expected, STEP_TOL)


# ---------------------------------------------------------------- layout and cache

def test_unaligned_views_leave_neighbours_alone():
    """Params and state as views at odd offsets into poisoned buffers: the
    kernel's unaligned path updates exactly the view, nothing beside it."""
    sizes = [7, 4097, 1]
    gen = torch.Generator().manual_seed(7)
    pool = {}

    def carve(name, dtype):
        base = torch.full((sum(sizes) + 3 * len(sizes) + 1,), -123.0, dtype=dtype, device=DEVICE)
        views, at = [], 1  # offset 1: not 16-byte aligned
        for n in sizes:
            views.append(base[at:at + n])
            at += n + 3
        pool[name] = base
        return views

    params = carve("param", torch.float32)
    exp_avgs = carve("exp_avg", torch.float32)
    exp_avg_sqs = carve("exp_avg_sq", torch.float32)
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        p.copy_(torch.randn(p.shape, generator=gen))
        m.copy_(torch.randn(m.shape, generator=gen) * 0.1)
        v.copy_(torch.rand(v.shape, generator=gen) * 1e-2 + 1e-3)
    steps = [torch.tensor(2.0, device=DEVICE) for _ in sizes]
    guard = {name: base.clone() for name, base in pool.items()}
    expected = [(_np(p), {"step": 2, "exp_avg": _np(m), "exp_avg_sq": _np(v)})
                for p, m, v in zip(params, exp_avgs, exp_avg_sqs)]
    grads = [torch.randn(n, generator=gen).to(DEVICE) for n in sizes]
    adam_call(triton_kernels, params, grads, exp_avgs, exp_avg_sqs, None, steps, _adam_hyper(LR0, 0.1, ADAM_MODES["adamw"]),
              cache={})
    _ref_adam(expected, grads, LR0, 0.1, ADAM_MODES["adamw"])
    for i, (p_ref, st) in enumerate(expected):
        _assert_close(f"param {i}", params[i], p_ref, STEP_TOL[torch.float32])
        _assert_close(f"exp_avg {i}", exp_avgs[i], st["exp_avg"], STEP_TOL[torch.float32])
    for name, base in pool.items():
        outside = torch.ones_like(base, dtype=torch.bool)
        at = 1
        for n in sizes:
            outside[at:at + n] = False
            at += n + 3
        assert torch.equal(base[outside], guard[name][outside]), f"{name}: elements outside the views changed"


def test_cache_follows_the_tensors():
    """The cached tables are reused while params and state stay; when only the
    grads move, a new version of the address table is uploaded (the old one is
    never written again) and the chunk table stays; both are rebuilt when the
    tensor list changes; a 0-element tensor still counts its step."""
    kw = ADAM_MODES["adamw"]
    shapes = [(7,), (0,), (4097,)]
    run = AdamRun(seed=8, dtype_id="fp32", amsgrad=False, shapes=shapes, initial_steps=(0, 0, 5))
    batch = run.step(run.grads(), _adam_hyper(LR0, 0.1, kw))
    entry = batch.resources["triton_tables"]
    table, chunks = entry.table, entry.chunks
    old_rows = table.clone()
    grads = run.grads()  # new tensors: new addresses
    expected = run.snapshot()
    _ref_adam(expected, grads, LR0, 0.1, kw)
    assert run.step(grads, _adam_hyper(LR0, 0.1, kw)) is batch
    run.check("new grads", expected, STEP_TOL)
    entry = batch.resources["triton_tables"]
    assert entry.chunks is chunks and entry.table is not table
    assert torch.equal(table, old_rows)
    assert int(entry.table[2, triton_adam.AdamColumn.GRAD]) == grads[2].data_ptr()

    # Another tensor list with the same cache: the first and the last tensor,
    # swapped.
    sub = AdamRun(seed=9, dtype_id="fp32", amsgrad=False, shapes=[(4097,), (7,)], initial_steps=(4, 1))
    for attr in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        lst = getattr(run, attr)
        setattr(sub, attr, [lst[2], lst[0]])
    sub.cache = run.cache
    grads = sub.grads()
    expected = sub.snapshot()
    _ref_adam(expected, grads, LR0, 0.1, kw)
    other = sub.step(grads, _adam_hyper(LR0, 0.1, kw))
    sub.check("other list", expected, STEP_TOL)
    assert other is not batch and other.resources["triton_tables"].table.shape[0] == 2
    assert run.steps[1].item() == 2.0


def test_sgd_first_step_flags_follow_the_call():
    """first_step is per call: a buffer flagged first is overwritten with g
    even when the cached table last saw it as old."""
    kw = SGD_MODES["sgd-momentum-dampening"]
    run = SgdRun(seed=10, dtype_id="fp32", momentum=True)
    run.step(run.grads(), _sgd_hyper(LR0, 0.0, kw))
    run.first = [False, True, False, False]
    run.bufs[1].fill_(math.nan)
    grads = run.grads()
    expected = run.snapshot()
    _ref_sgd(expected, grads, LR0, 0.0, kw)
    run.step(grads, _sgd_hyper(LR0, 0.0, kw))
    run.check("re-flagged", expected, STEP_TOL)


@pytest.mark.parametrize("dtype_id", ["bf16", "fp16"])
def test_16bit_stores_round_to_nearest_even(dtype_id):
    """A first SGD step with momentum stores buf = g / grad_scale: one float32
    division, one rounding, no multiply-add that a compiler could contract;
    so the stored bits must equal torch's round-to-nearest-even conversion,
    inf and NaN included (a truncating conversion fails about half of them)."""
    run = SgdRun(seed=16, dtype_id=dtype_id, momentum=True, shapes=[(4097,)])
    run.first = [True]
    grads = run.grads()
    grads[0][:3] = torch.tensor([math.nan, math.inf, -math.inf], dtype=run.dtype)
    sgd_call(triton_kernels, run.params, grads, run.bufs, run.first, _sgd_hyper(LR0, 0.0, SGD_MODES["sgd-momentum-dampening"]),
             grad_scale=_scalar(3.0))
    expected = (grads[0].float() / 3.0).to(run.dtype)
    assert _same_bits(run.bufs[0][3:], expected[3:])
    assert math.isnan(run.bufs[0][0].item()) and run.bufs[0][1].item() == math.inf
    assert run.bufs[0][2].item() == -math.inf


def test_bad_scalar_tensors_are_rejected():
    run = AdamRun(seed=11, dtype_id="fp32", amsgrad=False)
    with pytest.raises(ValueError, match="lr must be"):
        run.step(run.grads(), _adam_hyper(LR0, 0.0, ADAM_MODES["adamw"]),
                 lr_tensor=torch.tensor([LR0], dtype=torch.float64, device=DEVICE))
    run.steps[1] = torch.tensor(3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match=r"step. of params\[1\]"):
        run.step(run.grads(), _adam_hyper(LR0, 0.0, ADAM_MODES["adamw"]))


# ---------------------------------------------------------------- vector path, table uploads, device guard

class _Spy:
    """Stands in for a launcher's kernel: records each launch's keywords
    (with `during`, what the test wants to know at launch time), then runs it."""

    def __init__(self, kernel, during=lambda: None):
        self.kernel, self.during, self.launches = kernel, during, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kw):
            self.launches.append(dict(kw, during=self.during()))
            return launch(*args, **kw)
        return run


def _carve(n: int, dtype, byte_offset: int):
    """A 1-d tensor of n elements at byte_offset into a buffer poisoned around
    it (allocations are at least 64-byte aligned), and that buffer."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    at = byte_offset // itemsize
    base = torch.full((at + n + 5,), -123.0, dtype=dtype, device=DEVICE)
    return base[at:at + n], base


# Per column, the byte offset of a tensor's address (absent: 0). Each
# misaligned tensor has one misaligned address, each column one misaligned
# tensor; tensor 2's param is a view at 16 bytes (aligned), tensor 4's state
# one at 8 bytes (8-byte but not 16-byte aligned).
_VEC_SIZES = [4097, 7, 2053, 1, 3000, 2048, 5, 100]
_VEC_ADAM = {"param": {1: 4, 2: 16}, "grad": {3: 4}, "exp_avg": {6: 4}, "exp_avg_sq": {4: 8},
             "max_exp_avg_sq": {7: 12}}
_VEC_SGD = {"param": {1: 4, 2: 16}, "grad": {3: 4}, "momentum_buffer": {4: 8, 6: 12}}
_VEC_ALIGNED = {"adam": [True, False, True, False, False, True, False, False],
                "sgd": [True, False, True, False, False, True, False, True]}


def _vector_case(algo: str, dtype_id: str, offsets: dict, gen):
    """Lists of tensors (per column) at the given offsets, random contents,
    and the poisoned buffers they were carved from; steps at 4-byte offsets."""
    dtype, state_dtype = DTYPES[dtype_id]
    cols, bases = {}, []
    for name, where in offsets.items():
        dt = dtype if name in ("param", "grad") else state_dtype
        col = []
        for i, n in enumerate(_VEC_SIZES):
            t, base = _carve(n, dt, where.get(i, 0))
            scale = 1e-2 if name.endswith("sq") else 1.0
            fill = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1 if name.endswith("sq") \
                else torch.randn(n, generator=gen, dtype=torch.float64)
            t.copy_(fill * scale)
            col.append(t)
            bases.append((base, t))
        cols[name] = col
    if algo == "adam":
        step_buf = torch.zeros(2 * len(_VEC_SIZES) + 1, dtype=torch.float32, device=DEVICE)
        cols["step"] = [step_buf[2 * i + 1] for i in range(len(_VEC_SIZES))]  # 4 mod 8 bytes: never 16-aligned
        for i, st in enumerate(cols["step"]):
            st.fill_(float(i))
    return cols, bases


def _vector_step(algo: str, cols: dict, hyper, monkeypatch):
    """One step of a batch made from cols; returns (tables, launches, helper
    calls by ALIGNED) where the helper calls are counted under the
    interpreter only."""
    if algo == "adam":
        batch = Batch.adam(cols["param"], cols["grad"], cols["exp_avg"], cols["exp_avg_sq"],
                           cols["max_exp_avg_sq"], cols["step"])
        module, kernel_name, helper_name, step = triton_adam, "_adam_kernel", "_adam_tensor", triton_kernels.adam_step
    else:
        batch = Batch.sgd(cols["param"], cols["grad"], cols["momentum_buffer"], [False] * len(_VEC_SIZES))
        module, kernel_name, helper_name, step = triton_sgd, "_sgd_kernel", "_sgd_tensor", triton_kernels.sgd_step
    spy = _Spy(getattr(module, kernel_name))
    paths = {True: 0, False: 0}
    with monkeypatch.context() as m:
        m.setattr(module, kernel_name, spy)
        if INTERPRETED:  # the helper is a plain function there, looked up at each call
            helper = getattr(module, helper_name)

            def counted(*args):
                paths[bool(args[-2])] += 1  # ALIGNED, the second to last argument
                return helper(*args)
            m.setattr(module, helper_name, counted)
        step(batch, hyper)
    return batch.resources["triton_tables"], spy.launches, paths


@pytest.mark.parametrize("algo,dtype_id", [("adam", "fp32"), ("adam", "bf16"), ("sgd", "fp32")])
def test_vector_path_is_decided_per_tensor(algo, dtype_id, monkeypatch):
    """Misaligned views (param, grad or a state tensor, each of a different
    tensor; 4 and 8 bytes off) mixed with aligned tensors in one launch, and
    step counts that are never 16-byte aligned: exactly the tensors whose
    param, grad and state addresses are all aligned take the vector path (the
    step column plays no part); the results equal those of the same data in
    fresh, aligned tensors, bit for bit, and nothing beside a view changes."""
    offsets = _VEC_ADAM if algo == "adam" else _VEC_SGD
    aligned = [all(where.get(i, 0) % 16 == 0 for where in offsets.values()) for i in range(len(_VEC_SIZES))]
    assert aligned == _VEC_ALIGNED[algo]
    gen = torch.Generator().manual_seed(21)
    mixed, bases = _vector_case(algo, dtype_id, offsets, gen)
    fresh = {name: [t.clone() for t in col] for name, col in mixed.items() if name != "step"}
    if algo == "adam":  # misaligned steps here too: they must not matter
        step_buf = torch.zeros(2 * len(_VEC_SIZES) + 1, dtype=torch.float32, device=DEVICE)
        fresh["step"] = [step_buf[2 * i + 1] for i in range(len(_VEC_SIZES))]
        for a, b in zip(fresh["step"], mixed["step"]):
            a.copy_(b)
        hyper = _adam_hyper(LR0, 0.1, ADAM_MODES["adamw-amsgrad"])
    else:
        hyper = _sgd_hyper(LR0, 0.1, SGD_MODES["sgd-momentum-dampening"])
    guard = [(base.clone(), base, view) for base, view in bases]
    expected = [(_np(p), {}) for p in mixed["param"]]
    if algo == "adam":
        for (p, st), i in zip(expected, range(len(_VEC_SIZES))):
            st.update(step=int(mixed["step"][i].item()), exp_avg=_np(mixed["exp_avg"][i]),
                      exp_avg_sq=_np(mixed["exp_avg_sq"][i]), max_exp_avg_sq=_np(mixed["max_exp_avg_sq"][i]))
        _ref_adam(expected, mixed["grad"], LR0, 0.1, ADAM_MODES["adamw-amsgrad"])
    else:
        for (p, st), b in zip(expected, mixed["momentum_buffer"]):
            st["momentum_buffer"] = _np(b)
        _ref_sgd(expected, mixed["grad"], LR0, 0.1, SGD_MODES["sgd-momentum-dampening"])

    tables, launches, paths = _vector_step(algo, mixed, hyper, monkeypatch)
    assert tables.table[:, -1].tolist() == [int(a) for a in aligned]
    assert tables.vector == _common.Vector.PER_TENSOR
    assert [k["VECTOR"] for k in launches] == [int(_common.Vector.PER_TENSOR)]
    if INTERPRETED:  # one helper call per program: per chunk, vector path exactly for the aligned tensors
        chunks = [-(-n // _common._INTERPRETER.chunk) for n in _VEC_SIZES]
        assert paths == {True: sum(c for c, a in zip(chunks, aligned) if a),
                         False: sum(c for c, a in zip(chunks, aligned) if not a)}
    all_tables, all_launches, all_paths = _vector_step(algo, fresh, hyper, monkeypatch)
    assert all_tables.table[:, -1].tolist() == [1] * len(_VEC_SIZES)
    assert [k["VECTOR"] for k in all_launches] == [int(_common.Vector.ALL)]
    if INTERPRETED:
        assert all_paths == {True: sum(chunks), False: 0}

    for name in mixed:
        for i, (a, b) in enumerate(zip(mixed[name], fresh[name])):
            assert _same_bits(a, b), f"{name} {i}: the per-tensor launch differs from the aligned one"
    dtype, state_dtype = DTYPES[dtype_id]
    for i, (p_ref, st) in enumerate(expected):
        _assert_close(f"param {i}", mixed["param"][i], p_ref, STEP_TOL[dtype])
        for name, ref in st.items():
            if name != "step":
                _assert_close(f"{name} {i}", mixed[name][i], ref, STEP_TOL[state_dtype])
    for before, base, view in guard:
        inside = torch.zeros_like(base, dtype=torch.bool)
        at = (view.data_ptr() - base.data_ptr()) // base.element_size()
        inside[at:at + view.numel()] = True
        assert torch.equal(base[~inside], before[~inside]), "elements beside a view changed"


def test_vector_mode_of_a_group():
    """The launch's mode from the rows with elements: all aligned, none, or
    some; an empty tensor (no chunks, nothing read) decides nothing."""
    cols = (1, 2)

    def rows(*spec):  # (numel, address offset)
        return np.array([[n, 4096 + off, 8192] for n, off in spec], dtype=np.int64)

    flags, mode = _common.vector_rows(rows((5, 0), (5, 16)), cols)
    assert flags.tolist() == [True, True] and mode == _common.Vector.ALL
    flags, mode = _common.vector_rows(rows((5, 4), (5, 8)), cols)
    assert flags.tolist() == [False, False] and mode == _common.Vector.NONE
    flags, mode = _common.vector_rows(rows((5, 4), (5, 0)), cols)
    assert flags.tolist() == [False, True] and mode == _common.Vector.PER_TENSOR
    flags, mode = _common.vector_rows(rows((5, 4), (0, 0)), cols)
    assert flags.tolist() == [False, True] and mode == _common.Vector.NONE
    flags, mode = _common.vector_rows(rows((5, 0), (0, 4)), cols)
    assert flags.tolist() == [True, True] and mode == _common.Vector.ALL


def test_table_versions_stay_alive_until_read(monkeypatch):
    """Table uploads go through host buffers (pinned on CUDA) that live until
    the copy that reads them is done: a buffer whose copy is pending is never
    refilled; an upload made while a CUDA graph is captured keeps its buffer
    and tables for good and is not cached for eager steps; no device table is
    written after its upload. Completion and capture are simulated (the
    copy's event, _common._capturing); on CUDA the real copies run."""
    state = {"done": False, "capturing": False, "queries_in_capture": 0}

    class CopyEvent:  # the event recorded after an upload's copy
        def record(self):
            assert not state["capturing"], "an event recorded during a capture"

        def query(self):
            state["queries_in_capture"] += state["capturing"]
            return state["done"]

    def device_done():
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        state["done"] = True

    monkeypatch.setattr(_common, "_capturing", lambda device: state["capturing"])
    kw = ADAM_MODES["adamw"]
    hyper = _adam_hyper(LR0, 0.1, kw)
    run = AdamRun(seed=22, dtype_id="fp32", amsgrad=False, shapes=[(7,), (4097,)], initial_steps=(0, 2))
    staging = _common.Staging(DEVICE)
    staging.event = CopyEvent
    grads = run.grads()
    batch = Batch.adam(run.params, grads, run.exp_avgs, run.exp_avg_sqs, None, run.steps,
                       resources={"triton_staging": staging})
    grad_col = int(triton_adam.AdamColumn.GRAD)
    held = []  # every grad stays allocated: each version's addresses are new

    def step(what, new_grads):
        held.append(new_grads)
        expected = run.snapshot()
        _ref_adam(expected, new_grads, LR0, 0.1, kw)
        batch.set_grads(new_grads)
        triton_kernels.adam_step(batch, hyper)
        run.check(what, expected, STEP_TOL)
        return batch.resources["triton_tables"]

    # Eager, version 0: the chunk table and the address table, each from a
    # buffer of its own, both copies pending.
    e0 = step("v0", grads)
    assert [b.shape for b, _ in staging.ring] == [e0.chunks.shape, e0.table.shape] and staging.kept == []
    buf0 = staging.ring[1][0]
    rows0 = e0.table.clone()
    assert torch.equal(buf0.to(DEVICE), rows0)
    assert int(rows0[1, grad_col]) == grads[1].data_ptr()

    # Grads moved while the copy of version 0 is pending: a new buffer, a new
    # device table; version 0's buffer and table stay as they were.
    grads = run.grads()
    e1 = step("v1", grads)
    assert e1 is not e0 and e1.chunks is e0.chunks and e1.table is not e0.table
    buf1 = staging.ring[-1][0]
    assert buf1.data_ptr() != buf0.data_ptr() and len(staging.ring) == 3
    assert torch.equal(buf0.to(DEVICE), rows0) and torch.equal(e0.table, rows0)
    assert int(e1.table[1, grad_col]) == grads[1].data_ptr()

    # Copies done: the oldest buffer of the shape is refilled, completed
    # buffers beyond SPARE are dropped.
    device_done()
    grads = run.grads()
    e2 = step("v2", grads)
    assert staging.ring[-1][0] is buf0 and not torch.equal(buf0.to(DEVICE), rows0)
    assert len(staging.ring) == staging.SPARE

    # Captured with the cached version current: the graph uses the cached
    # tables (nothing uploaded), which are kept for it.
    state["done"] = False
    ring_before = [b for b, _ in staging.ring]
    state["capturing"] = True
    assert step("captured, same version", grads) is e2
    assert staging.kept == [e2] and [b for b, _ in staging.ring] == ring_before

    # Captured after the grads moved: the graph uploads its own table from a
    # buffer kept for good; not cached for eager steps.
    grads = run.grads()
    assert step("captured, new version", grads) is e2
    assert len(staging.kept) == 3 and staging.kept[0] is e2
    captured_buf, captured = staging.kept[1], staging.kept[2]
    assert captured.version == batch.version != e2.version and captured.chunks is e2.chunks
    assert int(captured.table[1, grad_col]) == grads[1].data_ptr()
    assert torch.equal(captured_buf.to(DEVICE), captured.table)
    assert [b for b, _ in staging.ring] == ring_before and state["queries_in_capture"] == 0
    captured_rows = captured.table.clone()
    state["capturing"] = False

    # Eager again at that version: uploaded anew (the captured table holds
    # nothing until the graph replays); later uploads never touch what the
    # graph reads.
    e3 = step("eager after capture", grads)
    assert e3 is not e2 and e3.table is not captured.table and e3.version == captured.version
    device_done()
    for k in range(4):
        e3 = step(f"eager {k}", run.grads())
    assert all(b is not captured_buf for b, _ in staging.ring)
    assert torch.equal(captured_buf.to(DEVICE), captured_rows) and torch.equal(captured.table, captured_rows)
    assert len(staging.kept) == 3


def test_launches_run_under_the_params_device(monkeypatch):
    """Every launch (and the table upload before it) runs inside
    _common.device_guard(params' device); the guard is torch.cuda.device of
    that device on CUDA tensors (Triton launches on the current device)."""
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)

    active = []
    real_guard, real_tables = _common.device_guard, _common.tables

    @contextlib.contextmanager
    def recording_guard(device):
        with real_guard(device):
            active.append(device)
            try:
                yield
            finally:
                active.pop()

    uploads = []

    def recording_tables(*args, **kw):
        uploads.append(list(active))
        return real_tables(*args, **kw)

    monkeypatch.setattr(_common, "device_guard", recording_guard)
    monkeypatch.setattr(_common, "tables", recording_tables)
    spies = {"adam": _Spy(triton_adam._adam_kernel, lambda: list(active)),
             "bump": _Spy(_common._bump_steps_kernel, lambda: list(active)),
             "sgd": _Spy(triton_sgd._sgd_kernel, lambda: list(active))}
    monkeypatch.setattr(triton_adam, "_adam_kernel", spies["adam"])
    monkeypatch.setattr(_common, "_bump_steps_kernel", spies["bump"])
    monkeypatch.setattr(triton_sgd, "_sgd_kernel", spies["sgd"])
    run = AdamRun(seed=23, dtype_id="fp32", amsgrad=False)
    run.step(run.grads(), _adam_hyper(LR0, 0.1, ADAM_MODES["adamw"]))
    srun = SgdRun(seed=24, dtype_id="fp32", momentum=True)
    srun.step(srun.grads(), _sgd_hyper(LR0, 0.1, SGD_MODES["sgdw-momentum"]))
    assert {name: [k["during"] for k in spy.launches] for name, spy in spies.items()} == \
        {"adam": [[DEVICE]], "bump": [[DEVICE]], "sgd": [[DEVICE]]}
    assert uploads == [[DEVICE], [DEVICE]] and active == []


# ---------------------------------------------------------------- compiled code, without a GPU

# Run in a fresh interpreter without TRITON_INTERPRET: compiles the kernels
# ahead of time for an sm_90 target (Triton needs no GPU for that) and prints
# what the PTX holds. Catches what the interpreter cannot: code that does not
# compile, approximate sqrt / division, lost vectorisation, alignment hints
# that leak from the vector path into the scalar one.
_AOT_SCRIPT = r"""
import json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fused_adamw.triton_kernels import adam, sgd, _common

PTRS = dict(table="*i64", chunks="*i64", lr_ptr="*fp32", grad_scale_ptr="*fp32", found_inf_ptr="*fp32")
SCALARS = {"adam": ("lr", "beta1", "beta2", "eps", "weight_decay", "decay_coeff", "log_beta1", "log_beta2"),
           "sgd": ("lr", "momentum", "dampening", "weight_decay", "decay_coeff")}
KERNELS = {"adam": adam._adam_kernel, "sgd": sgd._sgd_kernel}
DT = {"fp32": tl.float32, "fp64": tl.float64, "bf16": tl.bfloat16, "fp16": tl.float16}
out = {"triton": [triton.__version__, triton.__file__]}
for name, kind, param, state, flags in json.loads(sys.argv[1]):
    fn = KERNELS[kind]
    consts = dict(flags, VECTOR=int(_common.Vector[flags["VECTOR"]]), PARAM_DTYPE=DT[param], STATE_DTYPE=DT[state],
                  MATH=tl.float64 if param == "fp64" else tl.float32, BLOCK=1024, CHUNK=4096)
    sig = {a: "constexpr" if a in consts else PTRS.get(a, "fp64") for a in fn.arg_names}
    assert all(sig[a] == "fp64" for a in SCALARS[kind])
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32),
                       options=_common._GPU.options())
    ptx = k.asm["ptx"]
    out[name] = {op: sorted(set(re.findall(op + r"\.[a-z0-9.]+", ptx))) for op in ("sqrt", "div")}
    out[name]["vector_loads"] = len(re.findall(r"ld\.global[.a-z0-9]*\.v[24]", ptx))
    out[name]["vector_stores"] = len(re.findall(r"st\.global[.a-z0-9]*\.v[24]", ptx))
print(json.dumps(out))
"""

_ADAM_ALL_FLAGS = dict(AMSGRAD=True, MAXIMIZE=True, USE_L2=True, USE_DECAY=False, HAS_LR_TENSOR=True,
                       HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, VECTOR="ALL")
_SGD_ALL_FLAGS = dict(USE_MOMENTUM=True, NESTEROV=True, MAXIMIZE=True, USE_L2=False, USE_DECAY=True,
                      HAS_LR_TENSOR=True, HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, VECTOR="ALL")

# Other Triton installs to compile with besides the one imported here: folders
# (os.pathsep-separated) that each hold a `triton` package, put first on the
# subprocess's PYTHONPATH. CI sets it to the Triton 3.6 of the GPU machine,
# installed by .ci/triton_versions.sh.
_AOT_PATHS_ENV = "FUSED_ADAMW_TRITON_AOT_PATHS"
_AOT_PATHS = [p for p in os.environ.get(_AOT_PATHS_ENV, "").split(os.pathsep) if p]


def _aot_params():
    out = [pytest.param(None, id="installed")]
    out += [pytest.param(p, id=f"path{i}") for i, p in enumerate(_AOT_PATHS)]
    if not _AOT_PATHS:
        out.append(pytest.param("", id="triton-3.6"))
    return out


@pytest.mark.parametrize("triton_path", _aot_params())
def test_kernels_compile_for_cuda_with_ieee_math(triton_path):
    import json
    import subprocess
    import sys

    if triton_path == "":
        msg = (f"{_AOT_PATHS_ENV} is not set: the compile check with the GPU machine's Triton (3.6) needs it; "
               f'CI sets it with: export {_AOT_PATHS_ENV}="$(bash .ci/triton_versions.sh)"')
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    cases = [
        ("adam-fp32", "adam", "fp32", "fp32", _ADAM_ALL_FLAGS),
        ("adam-fp32-per-tensor", "adam", "fp32", "fp32", dict(_ADAM_ALL_FLAGS, VECTOR="PER_TENSOR")),
        ("adam-fp32-unaligned", "adam", "fp32", "fp32", dict(_ADAM_ALL_FLAGS, VECTOR="NONE")),
        ("adam-bf16-fp32state-unaligned", "adam", "bf16", "fp32", dict(_ADAM_ALL_FLAGS, VECTOR="NONE")),
        ("sgd-fp64", "sgd", "fp64", "fp64", _SGD_ALL_FLAGS),
        ("sgd-fp64-per-tensor", "sgd", "fp64", "fp64", dict(_SGD_ALL_FLAGS, VECTOR="PER_TENSOR")),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(([triton_path] if triton_path else []) + [p for p in sys.path if p])
    done = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ptx = json.loads(done.stdout.strip().splitlines()[-1])
    version, where = ptx.pop("triton")
    if triton_path:
        # The Triton under test, not the installed one.
        assert os.path.realpath(where).startswith(os.path.realpath(triton_path)), (version, where)
    # IEEE-rounded sqrt and division only, as in the C++ build.
    for name in ("adam-fp32", "adam-fp32-per-tensor", "adam-bf16-fp32state-unaligned"):
        assert ptx[name]["sqrt"] == ["sqrt.rn.f32", "sqrt.rn.f64"], (version, name, ptx[name])
        assert ptx[name]["div"] == ["div.rn.f32", "div.rn.f64"], (version, name, ptx[name])
    assert ptx["sgd-fp64"]["div"] == ["div.rn.f64"], (version, ptx["sgd-fp64"])
    # 16-byte vector accesses when every address is aligned; none when not.
    assert ptx["adam-fp32"]["vector_loads"] >= 5, (version, ptx)
    assert ptx["sgd-fp64"]["vector_loads"] >= 3, (version, ptx)
    for name in ("adam-fp32-unaligned", "adam-bf16-fp32state-unaligned"):
        assert ptx[name]["vector_loads"] == 0 and ptx[name]["vector_stores"] == 0, (version, name, ptx[name])
    # Per tensor: the flagged path vectorises exactly as the all-aligned
    # kernel, and the unflagged one not at all (a hint that reached the
    # scalar path would add its loads and stores here).
    for kind in ("adam-fp32", "sgd-fp64"):
        for what in ("vector_loads", "vector_stores"):
            assert ptx[f"{kind}-per-tensor"][what] == ptx[kind][what], (version, kind, what, ptx)


# ---------------------------------------------------------------- GPU only

def _compiled_variants(fn) -> int:
    """How many compiled kernels a @triton.jit function holds (all devices)."""
    caches = getattr(fn, "device_caches", None)
    assert caches is not None, "this Triton keeps no device_caches on JIT functions"
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
def test_no_recompile_when_lr_changes():
    if INTERPRETED:
        pytest.skip("compiled kernels only (TRITON_INTERPRET is set)")
    kw = ADAM_MODES["adamw-amsgrad"]
    run = AdamRun(seed=12, dtype_id="fp32", amsgrad=True)
    srun = SgdRun(seed=13, dtype_id="fp32", momentum=True)
    grads, sgrads = run.grads(), srun.grads()
    run.step(grads, _adam_hyper(_lr(0), 0.1, kw))
    srun.step(sgrads, _sgd_hyper(_lr(0), 0.1, SGD_MODES["sgdw-momentum"]))
    counts = [_compiled_variants(f) for f in (triton_adam._adam_kernel, triton_sgd._sgd_kernel)]
    for k in range(1, 100):
        run.step(grads, _adam_hyper(_lr(k), 0.1, kw))
        srun.step(sgrads, _sgd_hyper(_lr(k), 0.1, SGD_MODES["sgdw-momentum"]))
    torch.cuda.synchronize()
    assert [_compiled_variants(f) for f in (triton_adam._adam_kernel, triton_sgd._sgd_kernel)] == counts
    assert run.steps[0].item() == INITIAL_STEPS[0] + 100


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_id", ["fp32", "bf16"])
def test_cuda_graph_capture_and_replay(dtype_id):
    """Capturable: lr from a device tensor, steps on the device. A captured
    step replayed with new lr and grads matches the same steps run eagerly."""
    if INTERPRETED:
        pytest.skip("compiled kernels only (TRITON_INTERPRET is set)")
    kw = ADAM_MODES["adamw-amsgrad"]
    graphed = AdamRun(seed=14, dtype_id=dtype_id, amsgrad=True)
    eager = AdamRun(seed=14, dtype_id=dtype_id, amsgrad=True)
    static_grads = graphed.grads()
    lr_tensor = _scalar(_lr(0))
    hyper = _adam_hyper(math.nan, 0.1, kw)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, builds the cached tables
        graphed.step(static_grads, hyper, lr_tensor=lr_tensor)
    torch.cuda.current_stream().wait_stream(side)
    eager.step([g.clone() for g in static_grads], hyper, lr_tensor=_scalar(_lr(0)))

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step(static_grads, hyper, lr_tensor=lr_tensor)
    gen = torch.Generator().manual_seed(15)
    for k in range(1, 8):
        new = [_randn(gen, s, graphed.dtype) for s in graphed.shapes]
        for g, n in zip(static_grads, new):
            g.copy_(n)
        lr_tensor.fill_(_lr(k))
        graph.replay()
        eager.step(new, hyper, lr_tensor=_scalar(_lr(k)))
    torch.cuda.synchronize()
    for a, b in zip(graphed.params + graphed.exp_avgs + graphed.exp_avg_sqs + graphed.max_exp_avg_sqs + graphed.steps,
                    eager.params + eager.exp_avgs + eager.exp_avg_sqs + eager.max_exp_avg_sqs + eager.steps):
        assert _same_bits(a, b)
    assert graphed.steps[0].item() == INITIAL_STEPS[0] + 8
