"""The correctness suite every backend passes, through the public classes.

Collected once; each test runs for every backend through the `backend`
fixture (a Backend: the optimizers' backend= name, the device of the params,
the sizes of the tests that take a `size`), and its id starts with the
backend's name:

  cpu     fused_adamw._cpu on CPU tensors, sizes 1, 7, 4097, 2**20 + 3;
  torch   the foreach backend on CPU tensors, sizes 1, 7, 4097;
  triton  with a GPU, compiled, on CUDA tensors at the full sizes; without
          one, under the Triton interpreter (conftest.py sets
          TRITON_INTERPRET) on CPU tensors at the small sizes, since the
          interpreter is slow;
  cuda    fused_adamw._cuda, full sizes; marked `gpu` (skipped without one);
  cuda_emu  backend="cuda" on CPU tensors through fused_adamw._cuda_emu, the
          same csrc/cuda kernels compiled for the host (the fixture sets
          FUSED_ADAMW_CUDA_EMULATION=1 for the test); skipped where
          the emulated module was not built; sizes 1, 7, 4097 (the 2**20 + 3
          runs cost ~5 s each; tests/test_cuda_emulation.py covers many chunks
          with a small chunk size). test_cuda_emu_equals_cpu_bit_for_bit
          below compares it with the cpu backend bit for bit.

Oracles:

  * fused_adamw.reference (float64), for every mode x dtype x size, over
    STEPS steps with an LR scheduler changing lr every step, params and state;
  * torch.optim in the same dtype: for float32/float64 the trajectories agree
    within tolerances.TRAJECTORY; for 16-bit storage the rule of STYLE.md, our
    max error against the reference is at most twice torch's (or one rounding
    unit of the largest value, where torch happens to be exact); modes that
    torch lacks (SGDW, decay_scaling="schedule") get the worst-case rounding
    bound instead: one half-unit per step;
  * state-dict round trips with torch.optim in the middle of a run;
  * on a GPU, the Triton and CUDA backends against each other.

Data: fresh random params and grads from a seeded generator, never zeros;
each call updates several tensors of different sizes and shapes at once.

    pytest tests/test_backend_suite.py              # every backend (a few minutes on 2 cores)
    pytest tests/test_backend_suite.py -k "[cpu"    # one backend: its ids start with "[cpu"
    pytest tests/test_backend_suite.py -k "cuda_emu" # the emulated CUDA kernels
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

import fused_adamw as fa
from fused_adamw import reference
from tolerances import GPU_BACKENDS, HALF_ULPS_PER_STEP, SAME_MATH, TORCH_ERROR_FACTOR, TRAJECTORY, ULP


class Backend(NamedTuple):
    name: str  # the optimizers' backend= keyword
    device: str  # where the params, grads and state live
    sizes: tuple  # the values of `size` for the tests that take one
    label: str = ""  # the test ids' prefix (default: name)

    @property
    def id(self) -> str:
        return self.label or self.name


_GPU = torch.cuda.is_available()
_FULL_SIZES = (1, 7, 4097, 2**20 + 3)
_SMALL_SIZES = (1, 7, 4097)  # the torch backend, and Triton's interpreter (slow)
BACKENDS = (
    Backend("cpu", "cpu", _FULL_SIZES),
    Backend("torch", "cpu", _SMALL_SIZES),
    Backend("triton", "cuda" if _GPU else "cpu", _FULL_SIZES if _GPU else _SMALL_SIZES),
    Backend("cuda", "cuda", _FULL_SIZES),
    Backend("cuda", "cpu", _SMALL_SIZES, label="cuda_emu"),
)
_MARKS = {"cuda": (pytest.mark.gpu,)}
EMULATION_ENV = "FUSED_ADAMW_CUDA_EMULATION"


def pytest_generate_tests(metafunc):
    """Each test of this module that takes `backend` runs once per backend,
    and once per size of that backend if it also takes `size`."""
    if "backend" not in metafunc.fixturenames or any(
            "backend" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
        return  # not a backend test, or one that lists its backends itself
    if "size" in metafunc.fixturenames:
        cases = [pytest.param(b, s, id=f"{b.id}-n{s}", marks=_MARKS.get(b.id, ()))
                 for b in BACKENDS for s in b.sizes]
        metafunc.parametrize(("backend", "size"), cases, indirect=["backend"])
    else:
        cases = [pytest.param(b, id=b.id, marks=_MARKS.get(b.id, ())) for b in BACKENDS]
        metafunc.parametrize("backend", cases, indirect=True)


@pytest.fixture
def backend(request, monkeypatch) -> Backend:
    """The Backend a test runs on (parametrized by pytest_generate_tests above)."""
    if request.param.name == "triton":
        pytest.importorskip("triton")
    if request.param.id == "cuda_emu":
        pytest.importorskip("fused_adamw._cuda_emu")
        monkeypatch.setenv(EMULATION_ENV, "1")
    return request.param


STEPS = 20

# id -> (param dtype, state_dtype keyword)
DTYPES = {
    "fp32": (torch.float32, None),
    "fp64": (torch.float64, None),
    "bf16": (torch.bfloat16, None),
    "fp16": (torch.float16, None),
    "bf16-fp32state": (torch.bfloat16, torch.float32),
    "fp16-fp32state": (torch.float16, torch.float32),
}
ADAM_COMMON = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
FP16_EPS = 1e-4
SGD_COMMON = dict(lr=5e-2)

# id -> (class name, keywords)
ADAM_MODES = {
    "adamw": ("AdamW", dict(weight_decay=0.1)),
    "adamw-nowd": ("AdamW", dict(weight_decay=0.0)),
    "adam-l2": ("Adam", dict(weight_decay=0.1)),
    "adamw-amsgrad": ("AdamW", dict(weight_decay=0.1, amsgrad=True)),
    "adam-l2-amsgrad-maximize": ("Adam", dict(weight_decay=0.05, amsgrad=True, maximize=True)),
    "adamw-maximize": ("AdamW", dict(weight_decay=0.1, maximize=True)),
    "adamw-schedule": ("AdamW", dict(weight_decay=0.1, decay_scaling="schedule")),
}
SGD_MODES = {
    "sgd": ("SGD", dict()),
    "sgd-l2": ("SGD", dict(weight_decay=0.1)),
    "sgd-momentum-l2": ("SGD", dict(momentum=0.9, dampening=0.1, weight_decay=0.1)),
    "sgd-nesterov-maximize": ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=0.05, maximize=True)),
    "sgdw-momentum": ("SGDW", dict(momentum=0.9, weight_decay=0.1)),
    "sgdw-schedule": ("SGDW", dict(momentum=0.8, dampening=0.2, weight_decay=0.1, decay_scaling="schedule")),
}
TORCH_TWIN = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD}
ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def lr_factor(epoch: int) -> float:
    return 0.9 ** epoch


# ---------------------------------------------------------------- helpers

@functools.lru_cache(maxsize=16)
def make_data(size: int, seed: int, steps: int = STEPS):
    """Initial params (float64) of several shapes and per-step grads; cached,
    since every mode x dtype of a size draws the same data (callers copy)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(size,), (3, 5), (129,)]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (0.5 + j) for j, s in enumerate(shapes)]
             for _ in range(steps)]
    return init, grads


def run_optimizer(cls, kw, init, grads, dtype, device, *, sched=True):
    """Run `cls` over the data; returns (params, optimizer, lr of each step)."""
    params = [p.to(device=device, dtype=dtype).clone().requires_grad_() for p in init]
    opt = cls(params, **kw)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) if sched else None
    lrs = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.to(device=device, dtype=dtype)
        lrs.append(float(opt.param_groups[0]["lr"]))
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return params, opt, lrs


def reference_kwargs(cls_name: str, kw: dict) -> dict:
    ref = {k: v for k, v in kw.items() if k not in ("lr",)}
    ref["decoupled"] = cls_name in ("AdamW", "SGDW")
    return ref


def run_reference(cls_name, kw, init, grads, dtype, lrs):
    """The float64 oracle, fed the same dtype-rounded params and grads."""
    step = reference.adam_step if cls_name.startswith("Adam") else reference.sgd_step
    ref_kw = reference_kwargs(cls_name, kw)
    ps = [p.to(dtype).double().numpy().copy() for p in init]
    states = [{} for _ in ps]
    for lr, gs in zip(lrs, grads):
        for p, g, s in zip(ps, gs, states):
            step(p, g.to(dtype).double().numpy(), s, lr=lr, initial_lr=kw["lr"], **ref_kw)
    return ps, states


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, dtype, what: str, torch_val=None, steps=STEPS):
    if dtype in TRAJECTORY:
        # atol scales with the largest magnitude: an element that is a small
        # difference of large terms (a momentum buffer) carries their rounding.
        rtol, atol = TRAJECTORY[dtype]
        scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
        np.testing.assert_allclose(ours, ref, rtol=rtol, atol=atol * scale, err_msg=what)
        return
    err = float(np.max(np.abs(ours - ref)))
    scale = float(np.max(np.abs(ref))) or 1.0
    torch_err = float(np.max(np.abs(torch_val - ref))) if torch_val is not None else math.nan
    if math.isfinite(torch_err):
        bound = max(TORCH_ERROR_FACTOR * torch_err, ULP[dtype] * scale)
        assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch's error {torch_err:.3g})"
    else:  # no torch twin, or torch itself overflowed (fp16 Adam: eps=1e-8 underflows to 0)
        bound = steps * HALF_ULPS_PER_STEP * ULP[dtype] * scale
        assert err <= bound, f"{what}: error {err:.3g} > {steps} half-units {bound:.3g}"


def check_against_oracles(cls_name, kw, size, dtype_id, backend, device, seed):
    dtype, state_dtype = DTYPES[dtype_id]
    if dtype == torch.float16 and "eps" in kw:
        # eps=1e-8 is below float16's smallest subnormal: torch's float16 Adam
        # then divides by zero (inf/nan), leaving no error to compare against.
        kw = dict(kw, eps=FP16_EPS)
    init, grads = make_data(size, seed)
    cls = getattr(fa, cls_name)
    params, opt, lrs = run_optimizer(cls, dict(kw, backend=backend, state_dtype=state_dtype), init, grads,
                                     dtype, device)
    ref_p, ref_s = run_reference(cls_name, kw, init, grads, dtype, lrs)
    twin = TORCH_TWIN.get(cls_name)
    torch_params = torch_opt = None
    if dtype not in TRAJECTORY and twin is not None and kw.get("decay_scaling", "lr") == "lr":
        torch_kw = {k: v for k, v in kw.items() if k != "decay_scaling"}
        torch_params, torch_opt, _ = run_optimizer(twin, torch_kw, init, grads, dtype, "cpu")
    # The low-precision rule compares max errors, so it is applied to all the
    # tensors of the call together: a single element's error is a coin flip.
    def cat(arrays):
        return np.concatenate([a.ravel() for a in arrays])

    def theirs(key):
        if torch_opt is None:
            return None
        if key == "param":
            return cat([_np(q) for q in torch_params])
        return cat([_np(torch_opt.state[q][key]) for q in torch_params])

    assert_close(cat([_np(p) for p in params]), cat(ref_p), dtype, "params", theirs("param"))
    for key in ref_s[0]:
        if key == "step":
            assert all(float(opt.state[p]["step"]) == s["step"] for p, s in zip(params, ref_s)), "step"
            continue
        ours = [opt.state[p][key] for p in params]
        assert all(t.dtype == (state_dtype or dtype) for t in ours), f"{key} dtype"
        assert_close(cat([_np(t) for t in ours]), cat([s[key] for s in ref_s]), dtype, key, theirs(key))


# ---------------------------------------------------------------- the suite

@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode", list(ADAM_MODES))
def test_adam_against_reference(backend, mode, dtype_id, size):
    cls_name, kw = ADAM_MODES[mode]
    check_against_oracles(cls_name, dict(ADAM_COMMON, **kw), size, dtype_id, backend.name, backend.device, seed=size)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode", list(SGD_MODES))
def test_sgd_against_reference(backend, mode, dtype_id, size):
    cls_name, kw = SGD_MODES[mode]
    check_against_oracles(cls_name, dict(SGD_COMMON, **kw), size, dtype_id, backend.name, backend.device, seed=size)


@pytest.mark.parametrize("mode", ["adamw", "adam-l2", "adamw-amsgrad", "adam-l2-amsgrad-maximize",
                                  "sgd-momentum-l2", "sgd-nesterov-maximize"])
@pytest.mark.parametrize("dtype_id", ["fp32", "fp64"])
def test_trajectory_matches_torch_optim(backend, mode, dtype_id):
    """Same dtype, same data: our params and state track torch.optim's."""
    device = backend.device
    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    dtype = DTYPES[dtype_id][0]
    init, grads = make_data(257, seed=7)
    ours, o_opt, _ = run_optimizer(getattr(fa, cls_name), dict(kw, backend=backend.name), init, grads, dtype, device)
    theirs, t_opt, _ = run_optimizer(TORCH_TWIN[cls_name], kw, init, grads, dtype, "cpu")
    rtol, atol = TRAJECTORY[dtype]
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(_np(p), _np(q), rtol=rtol, atol=atol)
        for key, val in t_opt.state[q].items():
            np.testing.assert_allclose(_np(o_opt.state[p][key]), _np(val), rtol=rtol, atol=atol, err_msg=key)


@pytest.mark.parametrize("cls_name", ["AdamW", "Adam", "SGD"])
def test_state_dict_round_trip_with_torch(backend, cls_name):
    """torch -> ours -> torch mid-run continues exactly like torch throughout."""
    device = backend.device
    kw = dict(ADAM_COMMON, weight_decay=0.1, amsgrad=True) if cls_name.startswith("Adam") else \
        dict(SGD_COMMON, momentum=0.9, dampening=0.1, weight_decay=0.1)
    init, grads = make_data(65, seed=11, steps=18)
    dtype = torch.float64

    def run(params, opt, gs):
        for g_step in gs:
            for p, g in zip(params, g_step):
                p.grad = g.to(device=device, dtype=dtype)
            opt.step()

    whole_p = [p.to(dtype).clone().requires_grad_() for p in init]
    whole = TORCH_TWIN[cls_name](whole_p, **kw)
    run(whole_p, whole, grads)

    params = [p.to(device=device, dtype=dtype).clone().requires_grad_() for p in init]
    t1 = TORCH_TWIN[cls_name](params, **kw)
    run(params, t1, grads[:6])
    ours = getattr(fa, cls_name)(params, **kw, backend=backend.name)
    ours.load_state_dict(t1.state_dict())
    run(params, ours, grads[6:12])
    t2 = TORCH_TWIN[cls_name](params, **kw)
    t2.load_state_dict(ours.state_dict())
    run(params, t2, grads[12:])
    tol = TRAJECTORY[dtype]
    for p, q in zip(params, whole_p):
        np.testing.assert_allclose(_np(p), _np(q), **tol.kw)
        for key, val in whole.state[q].items():
            np.testing.assert_allclose(_np(t2.state[p][key]), _np(val), **tol.kw, err_msg=key)


def test_amp_grad_scale_and_found_inf(backend):
    """GradScaler's protocol: grads divided by grad_scale; found_inf != 0
    leaves params, state and step counts untouched."""
    device = backend.device
    init, grads = make_data(33, seed=5, steps=4)
    kw = dict(ADAM_COMMON, weight_decay=0.1, backend=backend.name)
    plain, p_opt, _ = run_optimizer(fa.AdamW, kw, init, grads, torch.float32, device, sched=False)

    params = [p.to(device=device, dtype=torch.float32).clone().requires_grad_() for p in init]
    opt = fa.AdamW(params, **kw)
    scale = torch.tensor(1024.0, device=device)
    for i, gs in enumerate(grads):
        for p, g in zip(params, gs):
            p.grad = (g * 1024.0).to(device=device, dtype=torch.float32)
        opt.grad_scale, opt.found_inf = scale, torch.zeros((), device=device)
        opt.step()
        if i == 1:  # an overflowing step in the middle: must change nothing
            before = [p.detach().clone() for p in params]
            state_before = {k: [opt.state[p][k].clone() for p in params] for k in ("step", "exp_avg", "exp_avg_sq")}
            for p in params:
                p.grad = torch.full_like(p, float("inf"))
            opt.found_inf = torch.ones((), device=device)
            opt.step()
            for p, b in zip(params, before):
                assert torch.equal(p.detach(), b)
            for k, vals in state_before.items():
                for p, v in zip(params, vals):
                    assert torch.equal(opt.state[p][k], v), k
        del opt.grad_scale, opt.found_inf
    for p, q in zip(params, plain):
        np.testing.assert_allclose(_np(p), _np(q), **SAME_MATH[torch.float32].kw)


def test_per_tensor_step_counts(backend):
    """A param whose grads start later has its own step count and bias correction."""
    device = backend.device
    init, grads = make_data(17, seed=3, steps=8)
    kw = dict(ADAM_COMMON, weight_decay=0.1)
    params = [p.to(device=device, dtype=torch.float64).clone().requires_grad_() for p in init]
    opt = fa.AdamW(params, **kw, backend=backend.name)
    ref_p = [p.double().numpy().copy() for p in init]
    ref_s = [{} for _ in init]
    for t, gs in enumerate(grads):
        for j, (p, g) in enumerate(zip(params, gs)):
            late = j == 1 and t < 3
            p.grad = None if late else g.to(device=device, dtype=torch.float64)
            if not late:
                reference.adam_step(ref_p[j], g.numpy(), ref_s[j], lr=kw["lr"], betas=kw["betas"], eps=kw["eps"],
                                    weight_decay=0.1, decoupled=True)
        opt.step()
    assert float(opt.state[params[1]]["step"]) == len(grads) - 3
    for p, r in zip(params, ref_p):
        np.testing.assert_allclose(_np(p), r, **TRAJECTORY[torch.float64].kw)


def test_lr_tensor_equals_float(backend):
    device = backend.device
    init, grads = make_data(9, seed=4, steps=5)
    a, _, _ = run_optimizer(fa.AdamW, dict(ADAM_COMMON, backend=backend.name), init, grads, torch.float32, device)
    kw = dict(ADAM_COMMON, backend=backend.name, lr=torch.tensor(ADAM_COMMON["lr"]))
    b, _, _ = run_optimizer(fa.AdamW, kw, init, grads, torch.float32, device)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, **SAME_MATH[torch.float32].kw)


def test_two_groups_two_dtypes(backend):
    """One optimizer, one fp32 group and one bf16 group with fp32 state."""
    device = backend.device
    init, grads = make_data(100, seed=8, steps=6)
    p32 = [init[0].to(device=device, dtype=torch.float32).clone().requires_grad_()]
    p16 = [init[1].to(device=device, dtype=torch.bfloat16).clone().requires_grad_()]
    opt = fa.AdamW([{"params": p32}, {"params": p16, "state_dtype": torch.float32, "lr": 2e-2}],
                   **ADAM_COMMON, weight_decay=0.1, backend=backend.name)
    ref = [p32[0].detach().double().cpu().numpy().copy(), p16[0].detach().double().cpu().numpy().copy()]
    states = [{}, {}]
    for gs in grads:
        p32[0].grad = gs[0].to(device=device, dtype=torch.float32)
        p16[0].grad = gs[1].to(device=device, dtype=torch.bfloat16)
        for j, (r, lr, g) in enumerate(zip(ref, (1e-2, 2e-2), (p32[0].grad, p16[0].grad))):
            reference.adam_step(r, _np(g), states[j], lr=lr, betas=ADAM_COMMON["betas"], eps=1e-8,
                                weight_decay=0.1, decoupled=True)
        opt.step()
    assert opt.state[p16[0]]["exp_avg"].dtype == torch.float32
    np.testing.assert_allclose(_np(p32[0]), ref[0], **TRAJECTORY[torch.float32].kw)
    assert_close(_np(p16[0]), ref[1], torch.bfloat16, "bf16 group", steps=len(grads))


@pytest.mark.parametrize("mode", ["adam-l2-amsgrad-maximize", "adamw", "sgd-nesterov-maximize", "sgdw-schedule"])
def test_grads_are_read_only(backend, mode):
    device = backend.device
    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    init, grads = make_data(33, seed=6, steps=3)
    params = [p.to(device=device, dtype=torch.float32).clone().requires_grad_() for p in init]
    opt = getattr(fa, cls_name)(params, **kw, backend=backend.name)
    opt.grad_scale = torch.tensor(2.0, device=device)
    for gs in grads:
        given = [g.to(device=device, dtype=torch.float32) for g in gs]
        for p, g in zip(params, given):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, given):
            assert torch.equal(p.grad, g)


def test_params_without_grad_are_untouched(backend):
    device = backend.device
    a = torch.randn(10, device=device, requires_grad=True)
    b = torch.randn(10, device=device, requires_grad=True)
    b0 = b.detach().clone()
    opt = fa.AdamW([a, b], backend=backend.name)
    a.grad = torch.randn_like(a)
    opt.step()
    assert torch.equal(b.detach(), b0)
    assert len(opt.state[b]) == 0


def test_channels_last_and_complex_params(backend):
    """Dense non-contiguous layouts update in storage order; complex params
    through their real view, as torch.optim does."""
    device = backend.device
    gen = torch.Generator().manual_seed(9)
    conv = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    cplx = torch.randn(6, dtype=torch.complex64, generator=gen)
    ours = [conv.clone(memory_format=torch.preserve_format).to(device).requires_grad_(),
            cplx.clone().to(device).requires_grad_()]
    theirs = [conv.clone(memory_format=torch.preserve_format).requires_grad_(), cplx.clone().requires_grad_()]
    o = fa.AdamW(ours, **ADAM_COMMON, weight_decay=0.1, backend=backend.name)
    t = torch.optim.AdamW(theirs, **ADAM_COMMON, weight_decay=0.1)
    for _ in range(5):
        gs = [torch.randn(conv.shape, generator=gen).to(memory_format=torch.channels_last),
              torch.randn(6, dtype=torch.complex64, generator=gen)]
        for p, q, g in zip(ours, theirs, gs):
            p.grad = g.to(device)
            q.grad = g.clone()
        o.step()
        t.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), **TRAJECTORY[torch.float32].kw)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


def test_large_count_of_small_tensors(backend):
    """Many tensors in one call: the chunk list spans all of them."""
    gen = torch.Generator().manual_seed(12)
    init = [torch.randn(int(n), generator=gen, dtype=torch.float64) for n in torch.randint(1, 40, (300,), generator=gen)]
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in init] for _ in range(3)]
    kw = dict(ADAM_COMMON, weight_decay=0.1, backend=backend.name)
    params, _, lrs = run_optimizer(fa.AdamW, kw, init, grads, torch.float32, backend.device)
    ref_p, _ = run_reference("AdamW", dict(ADAM_COMMON, weight_decay=0.1), init, grads, torch.float32, lrs)
    for p, r in zip(params, ref_p):
        np.testing.assert_allclose(_np(p), r, **TRAJECTORY[torch.float32].kw)


# ---------------------------------------------------------------- the GPU backends against each other

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["adamw", "adam-l2-amsgrad-maximize", "sgd-nesterov-maximize", "sgdw-schedule"])
@pytest.mark.parametrize("dtype_id", ["fp32", "bf16-fp32state"])
def test_triton_equals_cuda_backend(mode, dtype_id):
    """Both GPU backends run the same fp32 math (update.h and its Triton
    mirror): their trajectories agree to rounding, tensor by tensor."""
    pytest.importorskip("triton")
    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    dtype, state_dtype = DTYPES[dtype_id]
    init, grads = make_data(4097, seed=21)
    runs = {}
    for name in ("triton", "cuda"):
        params, opt, _ = run_optimizer(getattr(fa, cls_name), dict(kw, backend=name, state_dtype=state_dtype),
                                       init, grads, dtype, "cuda")
        runs[name] = (params, opt)
    (tp, topt), (cp, copt) = runs["triton"], runs["cuda"]
    tol = GPU_BACKENDS[dtype]
    for a, b in zip(tp, cp):
        torch.testing.assert_close(a, b, **tol.kw)
        for key, val in topt.state[a].items():
            torch.testing.assert_close(val, copt.state[b][key], **tol.kw, msg=key)


# ---------------------------------------------------------------- the emulated CUDA kernels against cpu

@pytest.fixture
def cpu_baseline_isa():
    """The cpu backend's baseline build: no FMA, like the emulated module
    (-ffp-contract=off). The AVX2 / AVX-512 builds are compiled with -mfma and
    GCC contracts a*b+c there, so they differ from both in the last bit; the
    real GPU kernels differ too (nvcc contracts by default)."""
    _cpu = pytest.importorskip("fused_adamw._cpu")
    before = _cpu.build_info()["isa"]
    _cpu.set_isa("base")
    yield
    _cpu.set_isa(before)


@pytest.mark.parametrize("dtype_id", list(DTYPES))
@pytest.mark.parametrize("mode", list(ADAM_MODES) + list(SGD_MODES))
def test_cuda_emu_equals_cpu_bit_for_bit(mode, dtype_id, monkeypatch, cpu_baseline_isa):
    """Both run update.h's per-element math in the same order, the per-tensor
    scalars from the same double expressions, and round the same way (RNE), so
    params and state agree exactly, 16-byte path, scalar tail and all."""
    pytest.importorskip("fused_adamw._cuda_emu")
    monkeypatch.setenv(EMULATION_ENV, "1")
    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    dtype, state_dtype = DTYPES[dtype_id]
    init, grads = make_data(4097, seed=31, steps=6)
    runs = [run_optimizer(getattr(fa, cls_name), dict(kw, backend=name, state_dtype=state_dtype), init, grads,
                          dtype, "cpu") for name in ("cuda", "cpu")]
    (ep, eopt, _), (cp, copt, _) = runs
    for a, b in zip(ep, cp):
        assert torch.equal(a, b)
        assert eopt.state[a].keys() == copt.state[b].keys()
        for key, val in copt.state[b].items():
            assert torch.equal(eopt.state[a][key], val), key


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["adamw", "adam-l2-amsgrad-maximize", "sgd-nesterov-maximize", "sgdw-schedule"])
@pytest.mark.parametrize("dtype_id", ["fp32", "bf16-fp32state"])
def test_cuda_equals_emulated_cuda(mode, dtype_id, monkeypatch):
    """The same kernels on the GPU and emulated on the host agree to rounding
    (nvcc contracts a*b+c into FMAs, the host build does not)."""
    pytest.importorskip("fused_adamw._cuda_emu")
    monkeypatch.setenv(EMULATION_ENV, "1")
    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    dtype, state_dtype = DTYPES[dtype_id]
    init, grads = make_data(4097, seed=23)
    runs = [run_optimizer(getattr(fa, cls_name), dict(kw, backend="cuda", state_dtype=state_dtype), init, grads,
                          dtype, device) for device in ("cuda", "cpu")]
    (gp, gopt, _), (ep, eopt, _) = runs
    tol = GPU_BACKENDS[dtype]
    for a, b in zip(gp, ep):
        torch.testing.assert_close(a.detach().cpu(), b.detach(), **tol.kw)
        for key, val in gopt.state[a].items():
            torch.testing.assert_close(val.cpu(), eopt.state[b][key], **tol.kw, msg=key)


# ---------------------------------------------------------------- precision options (issue 12)
# Oracle: fused_adamw.reference.adam_step_lp / sgd_step_lp (float64 models of
# the storage: bf16 state, master weights, stochastic rounding with the same
# Philox bits, Kahan summation). torch.optim has no twin. The kernels compute
# in float32, the model in float64, and a 16-bit rounding whose input lies
# within float32's error of a rounding boundary goes the other way (with
# 16-bit inputs, float32 results land on exact ties often: ~0.5% of the
# elements of a bf16-state step differ from the model by one unit, and the
# difference carries on). Two checks per stored tensor:
#   * at least PRECISION_AGREE of the elements agree with the model: bit for
#     bit for 16-bit values (plain round-to-nearest in place of stochastic
#     rounding, or a wrong random word, leaves about half of them off);
#     float32 values within TRAJECTORY; the Kahan compensation (a residue of
#     the param, at most half its 16-bit unit) within float32's error of the
#     param it corrects, which grows by about a float32 unit a step;
#   * the largest error stays within the 16-bit rule's bound (half a unit of
#     the 16-bit dtype per step), so the rest are near misses, not garbage.
# id -> (param dtype, state_dtype keyword, precision option or None)
PRECISIONS = {
    "bf16-sr": (torch.bfloat16, None, "stochastic_rounding"),
    "bf16-fp32state-sr": (torch.bfloat16, torch.float32, "stochastic_rounding"),
    "bf16-master": (torch.bfloat16, None, "master_weights"),
    "bf16-fp32state-master": (torch.bfloat16, torch.float32, "master_weights"),
    "bf16-kahan": (torch.bfloat16, None, "kahan_summation"),
    "fp16-sr": (torch.float16, None, "stochastic_rounding"),
    "fp16-bf16state-master": (torch.float16, torch.bfloat16, "master_weights"),
    "fp16-kahan": (torch.float16, torch.float32, "kahan_summation"),
    "fp32-bf16state": (torch.float32, torch.bfloat16, None),
    "fp16-bf16state": (torch.float16, torch.bfloat16, None),
}
PRECISION_MODES = ("adamw", "adam-l2-amsgrad-maximize", "adamw-schedule", "sgd-momentum-l2",
                   "sgd-nesterov-maximize", "sgdw-schedule", "sgd")
PRECISION_AGREE = 0.9
PRECISION_SEED = 20261205
_REF_DTYPE = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
              torch.float16: "float16", None: None}


def run_precision_reference(cls_name, kw, init, grads, dtype, state_dtype, option, lrs):
    prec = reference.Precision(param_dtype=_REF_DTYPE[dtype], state_dtype=_REF_DTYPE[state_dtype],
                               **({option: True} if option else {}))
    run = reference.run_adam_lp if cls_name.startswith("Adam") else reference.run_sgd_lp
    ref_kw = dict(reference_kwargs(cls_name, kw), initial_lr=kw["lr"])
    gs = [[g.to(dtype).double().numpy() for g in step] for step in grads]
    return run([p.double().numpy() for p in init], gs, lrs, precision=prec, seed=PRECISION_SEED, **ref_kw)


def assert_precision_close(ours: np.ndarray, ref: np.ndarray, dtype, what: str, unit: float,
                           near=None, steps=STEPS) -> None:
    """unit: the rounding unit (torch.finfo.eps) of the 16-bit dtype of the
    case; near: the model's param values, for the Kahan compensation."""
    if dtype in TRAJECTORY:
        rtol, atol = TRAJECTORY[dtype]
        agree = np.abs(ours - ref) <= rtol * np.abs(ref) + atol * max(1.0, float(np.max(np.abs(ref))))
    elif near is not None:
        # float32's error in the param it corrects, growing by about a unit a step
        agree = np.abs(ours - ref) <= 2 * steps * ULP[torch.float32] * np.abs(near) + unit * np.abs(ref)
    else:
        agree = (ours == ref) | (np.isnan(ours) & np.isnan(ref))
    share = float(np.mean(agree))
    assert share >= PRECISION_AGREE, f"{what}: only {share:.1%} of the elements agree with the model"
    scale = float(np.max(np.abs(near if near is not None else ref))) or 1.0
    bound = steps * HALF_ULPS_PER_STEP * unit * scale
    err = float(np.max(np.abs(ours - ref)))
    assert err <= bound, f"{what}: error {err:.3g} > {steps} half-units {bound:.3g}"


def check_precision(cls_name, kw, size, prec_id, backend):
    dtype, state_dtype, option = PRECISIONS[prec_id]
    if dtype == torch.float16 and "eps" in kw:
        kw = dict(kw, eps=FP16_EPS)
    init, grads = make_data(size, seed=size + 1)
    extra = dict(backend=backend.name, state_dtype=state_dtype, seed=PRECISION_SEED)
    if option:
        extra[option] = True
    params, opt, lrs = run_optimizer(getattr(fa, cls_name), dict(kw, **extra), init, grads, dtype, backend.device)
    ref_p, ref_s = run_precision_reference(cls_name, kw, init, grads, dtype, state_dtype, option, lrs)

    def cat(arrays):
        return np.concatenate([a.ravel() for a in arrays])

    # The rounding unit of the case: its 16-bit dtype (param's, else state's).
    unit = ULP[dtype if dtype in (torch.bfloat16, torch.float16) else state_dtype]
    assert_precision_close(cat([_np(p) for p in params]), cat(ref_p), dtype, "params", unit)
    stored = {"master_param": torch.float32, "kahan_comp": dtype}
    for key in ref_s[0]:
        if key == "step":
            assert all(float(opt.state[p]["step"]) == s["step"] for p, s in zip(params, ref_s)), "step"
            continue
        ours = [opt.state[p][key] for p in params]
        want_dtype = stored.get(key, state_dtype or dtype)
        assert all(t.dtype == want_dtype for t in ours), f"{key} dtype"
        assert_precision_close(cat([_np(t) for t in ours]), cat([s[key] for s in ref_s]), want_dtype, key, unit,
                               near=cat(ref_p) if key == "kahan_comp" else None)
    assert set(opt.state[params[0]]) >= set(ref_s[0]), "state keys"


@pytest.mark.parametrize("prec_id", list(PRECISIONS))
@pytest.mark.parametrize("mode", PRECISION_MODES)
def test_precision_against_reference(backend, mode, prec_id):
    """Sizes 1, 7, 4097 (the float64 model of 2**20 elements with Philox costs
    ~10 s a case: test_precision_large_tensor runs one)."""
    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    for size in _SMALL_SIZES:
        check_precision(cls_name, kw, size, prec_id, backend)


@pytest.mark.parametrize("prec_id", ["bf16-sr", "bf16-kahan"])
@pytest.mark.parametrize("backend", [pytest.param(b, id=b.id, marks=_MARKS.get(b.id, ()))
                                     for b in BACKENDS if _FULL_SIZES[-1] in b.sizes], indirect=True)
def test_precision_large_tensor(backend, prec_id):
    """One tensor of 2**20 + 3 elements (many work units / chunks)."""
    check_precision("AdamW", dict(ADAM_COMMON, weight_decay=0.1), 2**20 + 3, prec_id, backend)


def _exact_case(backend, cls_name, kw, dtype, state_dtype, n=4099, seed=5):
    """A run whose float32 values are exact on every backend, so every
    stochastic rounding must give the model's bits: Adam with beta1 = beta2 = 0
    (exp_avg = g, exp_avg_sq = g * g, one rounding each) or SGD p - 1.0 * g."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in init] for _ in range(3)]
    extra = dict(backend=backend.name, state_dtype=state_dtype, seed=PRECISION_SEED, stochastic_rounding=True)
    params, opt, lrs = run_optimizer(getattr(fa, cls_name), dict(kw, **extra), init, grads, dtype, backend.device,
                                     sched=False)
    ref_p, ref_s = run_precision_reference(cls_name, kw, init, grads, dtype, state_dtype, "stochastic_rounding", lrs)
    return params, opt, ref_p, ref_s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_bits_are_the_models(backend, dtype):
    """The same random bits and rounding rule on every backend: exact where the
    float32 values are (the first three steps of each case)."""
    params, opt, _, ref_s = _exact_case(backend, "Adam", dict(lr=1e-3, betas=(0.0, 0.0), eps=1e-3, weight_decay=0.0),
                                     dtype, None)
    for key in ("exp_avg", "exp_avg_sq"):
        for p, s in zip(params, ref_s):
            np.testing.assert_array_equal(_np(opt.state[p][key]), s[key], err_msg=key)
    params, opt, ref_p, _ = _exact_case(backend, "SGD", dict(lr=1.0, momentum=0.0, weight_decay=0.0), dtype, None)
    for p, r in zip(params, ref_p):
        np.testing.assert_array_equal(_np(p), r, err_msg="params")
