"""Correctness check run on every provider before it is timed.

The provider takes a few steps on the workload itself (its first steps, so the
optimizer state starts empty and a compiled provider compiles once, here). The
same steps are computed by torch.optim in foreach mode on a copy of a sample of
the data: in the workload's dtype, and in float64 as the truth. Optimizer
updates are element-wise, so a sample (whole tensors up to a per-tensor cap,
else each tensor's head and tail, where tail-handling bugs live) stands for the
whole workload, and a single flat reference tensor stands for all of them.

Pass rule, per quantity (param and each state tensor), the flash-attention
rule of STYLE.md: the provider's max error against float64 is at most twice
torch's own in the same dtype, plus an absolute floor from ATOL. The step
counts must equal the number of steps taken.

A runner with this package's storage options (bf16 or fp32 state beside
other params, master weights, stochastic or Kahan rounding; Runner.state_dtype
and .precision) differs from torch by design, so it is checked against the
float64 models of fused_adamw.reference instead (check_against_model:
adam_step_lp / sgd_step_lp, each tensor with its index in the param list as
tensor_index and its group's seed, so stochastic rounding draws the package's
random words), on the same sample. The rule is tests/test_backend_suite.py's
for the precision options: at least MODEL_SAME_FRACTION of the sampled
elements of every stored quantity equal the model's (16-bit: the same value;
float32: within MODEL_FP32_TOL), since float32 and float64 math round to
different neighbours only where a value sits within a float32 unit of a
rounding boundary (one 16-bit unit, which then carries on); and the largest
error is at most half a rounding unit of the coarsest 16-bit storage per
step, relative to the quantity's largest value, so the differing elements
are near misses. Wrong hyperparameters, round-to-nearest in place of
stochastic rounding, another seed or element numbering (a third of the
stochastic roundings change), an ignored option (the state's dtype or key is
checked) or an unwritten element fail. Used by benchmarks/run.py.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence

import numpy as np
import torch

from providers import DTYPE_NAMES, OptConfig, Precision, Runner

# Absolute error floor per storage dtype, far below the effect of any real bug
# (a wrong lr moves params by ~1e-2 per step; see providers.ADAM_HYPER).
ATOL: Dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}
CHECK_STEPS = 3
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")

# The model check (check_against_model), tests/test_backend_suite.py's rule
# for the precision options and its numbers (tests/tolerances.py): the
# fraction of elements that must agree with the model; float32 agreement is
# TRAJECTORY[float32] (float32 math against float64 over a few steps), atol
# per unit of the quantity's largest |value|; the largest error, in half
# rounding units of the coarsest 16-bit storage per step.
MODEL_SAME_FRACTION = 0.98
MODEL_FP32_TOL = (2e-5, 2e-6)  # rtol, atol x max|value|
MODEL_HALF_UNITS_PER_STEP = 0.5
# fused_adamw.reference's dtype names.
_REF_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16",
               torch.float64: "float64"}


@dataclass
class CheckResult:
    ok: bool
    detail: str
    sampled_numel: int
    max_err: Dict[str, float] = field(default_factory=dict)
    # What the provider was compared with, and (model check) the fraction of
    # sampled elements per quantity that agree with the model.
    oracle: str = "torch.optim foreach (same dtype and float64)"
    same_fraction: Dict[str, float] = field(default_factory=dict)


def per_tensor_cap(numels: Sequence[int], budget: int) -> int:
    """Largest c with sum(min(n, c)) <= budget (at least 2: head and tail)."""
    if sum(numels) <= budget:
        return max(numels)
    lo, hi = 2, max(numels)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in numels) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def element_indices(numel: int, cap: int) -> Optional[np.ndarray]:
    """The storage indices take() samples from a tensor of numel elements:
    None when it takes the whole tensor, else its first cap/2 and last
    cap - cap/2 indices."""
    if numel <= cap:
        return None
    head = cap // 2
    return np.concatenate([np.arange(head), np.arange(numel - (cap - head), numel)]).astype(np.uint64)


def take_one(t: torch.Tensor, cap: int) -> torch.Tensor:
    """One tensor's sample, flat: whole, or its first and last cap/2 elements."""
    flat = t.detach().reshape(-1)
    if flat.numel() <= cap:
        return flat
    head = cap // 2
    return torch.cat([flat[:head], flat[flat.numel() - (cap - head):]])


def take(tensors: Sequence[torch.Tensor], cap: int) -> torch.Tensor:
    """One flat tensor: each tensor whole, or its first and last cap/2 elements."""
    return torch.cat([take_one(t, cap) for t in tensors])


def reference(cfg: OptConfig, p0: torch.Tensor, g: torch.Tensor, steps: int,
              dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    p = p0.to(dtype).clone()
    p.grad = g.to(dtype).clone()
    cls, kwargs = cfg.torch_class()
    opt = cls([p], foreach=True, **kwargs)
    for _ in range(steps):
        opt.step()
    out = {"param": p.detach()}
    out.update({k: v for k, v in opt.state[p].items() if k in STATE_KEYS})
    return out


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def check_provider(runner: Runner, params: Sequence[torch.Tensor], cfg: OptConfig,
                   budget: int, steps: int = CHECK_STEPS) -> CheckResult:
    """Take `steps` steps with runner (a fresh optimizer over params) and
    compare them with torch.optim foreach, or with the float64 model of the
    storage options the runner runs; see the module docstring."""
    if runner.precision is not Precision.NEAREST or runner.state_dtype != cfg.dtype:
        return check_against_model(runner, params, cfg, budget, steps)
    cap = per_tensor_cap([p.numel() for p in params], budget)
    p0 = take(params, cap).clone()
    g = take([p.grad for p in params], cap).clone()
    same = reference(cfg, p0, g, steps, cfg.dtype)
    truth = reference(cfg, p0, g, steps, torch.float64)
    del p0, g

    for _ in range(steps):
        runner.step()

    got = {"param": take(params, cap)}
    states = [runner.state_of(p) for p in params]
    for key in truth:
        if key == "param":
            continue
        if not all(key in s for s in states):
            return CheckResult(False, f"state {key!r} missing", got["param"].numel())
        got[key] = take([s[key] for s in states], cap)

    errs: Dict[str, float] = {}
    for key, ref in truth.items():
        err = max_abs_err(got[key], ref)
        tol = 2 * max_abs_err(same[key], ref) + ATOL[got[key].dtype]
        errs[key] = err
        if not err <= tol:  # also catches NaN
            return CheckResult(False, f"{key}: max err {err:.3g} > tol {tol:.3g}",
                               got["param"].numel(), errs)

    if cfg.optimizer.is_adam:
        if not all("step" in s for s in states):
            return CheckResult(False, "state 'step' missing", got["param"].numel(), errs)
        counts = torch.stack([s["step"].detach().reshape(()).double().cpu() for s in states])
        if not bool((counts == steps).all()):
            bad = counts[counts != steps][0].item()
            return CheckResult(False, f"step count {bad:g} after {steps} steps",
                               got["param"].numel(), errs)
    return CheckResult(True, "", got["param"].numel(), errs)


# ---------------------------------------------------------------- storage options


@contextlib.contextmanager
def _random_words_of(ref, elements: Optional[np.ndarray]) -> Iterator[None]:
    """Make the model draw the random words of the given storage indices.

    adam_step_lp numbers the elements of the array it gets 0..n-1; a sample's
    tail (the last elements of a large tensor) has other indices. The model
    calls its module's random_bits, which takes the indices (``elements``),
    so that call is redirected while the sample's steps run."""
    if elements is None:
        yield
        return
    draw = ref.random_bits

    def random_bits(seed, step, tensor_index, shape, **_):
        return draw(seed, step, tensor_index, shape, elements=elements)

    ref.random_bits = random_bits
    try:
        yield
    finally:
        ref.random_bits = draw


def _agree(got: np.ndarray, want: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Elements that agree with the model: 16-bit storage the same value,
    float32 within MODEL_FP32_TOL; NaN agrees with NaN."""
    both_nan = np.isnan(got) & np.isnan(want)
    if dtype.itemsize == 2:
        return (got == want) | both_nan
    rtol, atol = MODEL_FP32_TOL
    scale = float(np.max(np.abs(want), initial=0.0))
    with np.errstate(invalid="ignore"):
        return (np.abs(got - want) <= rtol * np.abs(want) + atol * scale) | both_nan


def check_against_model(runner: Runner, params: Sequence[torch.Tensor], cfg: OptConfig,
                        budget: int, steps: int = CHECK_STEPS) -> CheckResult:
    """Take `steps` steps with runner and compare every stored quantity on a
    sample with fused_adamw.reference's float64 model of its options (module
    docstring)."""
    ref = importlib.import_module("fused_adamw.reference")
    prec = runner.precision
    model_prec = ref.Precision(
        param_dtype=_REF_DTYPES[cfg.dtype],
        state_dtype=None if runner.state_dtype == cfg.dtype else _REF_DTYPES[runner.state_dtype],
        **({prec.keyword: True} if prec.keyword else {}))
    step_fn = ref.adam_step_lp if cfg.optimizer.is_adam else ref.sgd_step_lp
    oracle = (f"fused_adamw.reference {step_fn.__name__} (param {DTYPE_NAMES[cfg.dtype]}, "
              f"state {DTYPE_NAMES[runner.state_dtype]}, {prec.value})")
    kwargs = cfg.reference_kwargs()
    seeds = {id(p): group.get("seed") or 0 for group in runner.opt.param_groups
             for p in group["params"]}
    # tensor_index: the param's place in the optimizer's flattened param order.
    order = {id(p): i for i, p in enumerate(p for g in runner.opt.param_groups for p in g["params"])}

    cap = per_tensor_cap([p.numel() for p in params], budget)
    models = []
    for p in params:
        idx = element_indices(p.numel(), cap)
        x = take_one(p, cap).double().cpu().numpy().copy()
        g = take_one(p.grad, cap).double().cpu().numpy()
        state: Dict[str, object] = {}
        with _random_words_of(ref, idx):
            for _ in range(steps):
                step_fn(x, g, state, precision=model_prec, seed=seeds[id(p)],
                        tensor_index=order[id(p)], **kwargs)
        models.append((x, state))

    for _ in range(steps):
        runner.step()

    sampled = sum(x.size for x, _ in models)
    states = [runner.state_of(p) for p in params]
    stored = {ref.MASTER_KEY: torch.float32, ref.KAHAN_KEY: cfg.dtype}
    quantities = {"param": (list(params), [x for x, _ in models], cfg.dtype)}
    for key in models[0][1]:
        if key == "step":
            continue
        if not all(key in s for s in states):
            return CheckResult(False, f"state {key!r} missing", sampled, oracle=oracle)
        quantities[key] = ([s[key] for s in states], [m[1][key] for m in models],
                           stored.get(key, runner.state_dtype))
    sixteen = [d for d in (cfg.dtype, runner.state_dtype) if d.itemsize == 2]
    unit = max((torch.finfo(d).eps for d in sixteen), default=torch.finfo(torch.float32).eps)

    values = {}
    for key, (ours, want, dtype) in quantities.items():
        bad = next((t.dtype for t in ours if t.dtype != dtype), None)
        if bad is not None:
            return CheckResult(False, f"{key} stored as {bad}, the option stores {dtype}",
                               sampled, {}, oracle)
        values[key] = (take(ours, cap).double().cpu().numpy(),
                       np.concatenate([w.reshape(-1) for w in want]), dtype)

    errs: Dict[str, float] = {}
    same: Dict[str, float] = {}
    for key, (got, want, dtype) in values.items():
        scale = float(np.max(np.abs(want), initial=0.0))
        agree = _agree(got, want, dtype)
        if key == ref.KAHAN_KEY:
            # The compensation is float32 math's remainder below half a unit
            # of the param, so float32 against float64 moves it by many of its
            # own units (an eighth to a fifth of the elements differ after 3 fp16 steps)
            # while the carried value, param + compensation, agrees: checked
            # to a sixteenth of a param unit (on 99.7-99.99% of the elements
            # for bf16 and fp16 AdamW/Adam/SGD, torch backend; an unwritten
            # compensation agrees on 13-26%), in param units.
            p_got, p_want, _ = values["param"]
            got, want = p_got + got, p_want + want
            scale = float(np.max(np.abs(want), initial=0.0))
            with np.errstate(invalid="ignore"):
                agree = np.abs(got - want) <= torch.finfo(cfg.dtype).eps / 16 * np.abs(want)
        err = float(np.max(np.abs(got - want), initial=0.0))
        errs[key] = err
        same[key] = float(np.mean(agree)) if agree.size else 1.0
        bound = steps * MODEL_HALF_UNITS_PER_STEP * unit * scale
        if not err <= bound:  # also catches NaN
            return CheckResult(False, f"{key}: max err {err:.3g} against the model > {bound:.3g} "
                                      f"({steps} x {MODEL_HALF_UNITS_PER_STEP} units of the largest value)",
                               sampled, errs, oracle, same)
        if not same[key] >= MODEL_SAME_FRACTION:
            return CheckResult(False, f"{key}: {same[key]:.1%} of the sampled elements agree with "
                                      f"the model < {MODEL_SAME_FRACTION:.0%}", sampled, errs, oracle, same)

    for s, (_, m) in zip(states, models):
        if "step" not in m:
            continue
        if "step" not in s:
            return CheckResult(False, "state 'step' missing", sampled, errs, oracle, same)
        if float(s["step"]) != float(m["step"]):
            return CheckResult(False, f"step count {float(s['step']):g} after {steps} steps",
                               sampled, errs, oracle, same)
    return CheckResult(True, "", sampled, errs, oracle, same)
