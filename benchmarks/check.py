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
counts must equal the number of steps taken. Used by benchmarks/run.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from providers import OptConfig, Runner

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


@dataclass
class CheckResult:
    ok: bool
    detail: str
    sampled_numel: int
    max_err: Dict[str, float] = field(default_factory=dict)


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


def take(tensors: Sequence[torch.Tensor], cap: int) -> torch.Tensor:
    """One flat tensor: each tensor whole, or its first and last cap/2 elements."""
    pieces: List[torch.Tensor] = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.numel() <= cap:
            pieces.append(flat)
        else:
            head = cap // 2
            pieces += [flat[:head], flat[flat.numel() - (cap - head):]]
    return torch.cat(pieces)


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
    compare them with torch.optim foreach; see the module docstring."""
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
