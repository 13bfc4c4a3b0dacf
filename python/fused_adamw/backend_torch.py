"""The `torch` backend: the fused step written with torch's foreach ops.

Serves devices that no kernel of this package serves (backend="auto" picks it
there), and is a readable statement of the update that the kernels fuse. It
follows the same contract (hyper.py) and the same order of operations as
csrc/include/fused_adamw/update.h: math in float32 for 16-bit storage (float64
for float64), one rounding when the result is stored.

Precision options (hyper.precision, issue 12; the rules are ../spec's kernel
contract and fused_adamw.reference.adam_step_lp):
  0 round to nearest; 1 master weights (the update runs on batch.aux, float32,
  and the param is its rounding); 2 stochastic rounding of the param and of
  16-bit state with Philox-4x32-10 words (_philox_torch); 3 Kahan summation
  (batch.aux holds the compensation in the param dtype).

Every function takes any strided tensor, so this backend also serves views no
kernel takes. The generator's element index of a tensor is its storage order
when the param is dense (contiguous or permuted, as the kernels walk it) and
its row-major logical index otherwise; each state element uses the index of
the param element at the same position (_philox_torch.element_indices).

Each product is its own op, rounded before the sum, as the host kernels
compute it (torch's add with alpha, addcmul and addcdiv fuse a multiply-add
on the CPU, which would round differently): on the CPU its float32 values are
the cpu backend's (baseline build, which has no FMA contraction). float64
Adam may still differ in the last bit: torch's float64 CPU sqrt is not
correctly rounded (_sqrt).

It is not a fast path: several passes over memory, and step counts, lr,
grad_scale and found_inf are read on the host (a device sync on GPUs), so it
is not capturable.
"""
from __future__ import annotations

import math

import torch

from . import _philox_torch
from .hyper import (PRECISION_KAHAN, PRECISION_MASTER, PRECISION_NEAREST, PRECISION_STOCHASTIC,
                    AdamHyper, SgdHyper)

_LOW = (torch.float16, torch.bfloat16)
_PRECISIONS = (PRECISION_NEAREST, PRECISION_MASTER, PRECISION_STOCHASTIC, PRECISION_KAHAN)


def _math(tensors: list[torch.Tensor], copy: bool = False) -> list[torch.Tensor]:
    """The tensors in the math dtype: float32 copies of 16-bit tensors, else
    themselves (updated in place) or, with copy, clones."""
    if tensors and tensors[0].dtype in _LOW:
        return [t.float() for t in tensors]
    return [t.clone() for t in tensors] if copy else tensors


def _write_back(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if src is not dst:
        torch._foreach_copy_(dst, src)


def _effective_grads(grads, params_m, maximize, use_l2, l2, grad_scale):
    # The user's grads are read, never written: every change makes new tensors.
    g = _math(grads)
    if grad_scale is not None:
        g = torch._foreach_div(g, float(grad_scale))
    if maximize:
        g = torch._foreach_neg(g)
    if use_l2:
        g = torch._foreach_add(g, torch._foreach_mul(params_m, l2))
    return g


def _sqrt(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Square roots in the math dtype, correctly rounded for float32 on the CPU.

    torch's vectorised CPU sqrt is not correctly rounded (on this project's
    AVX-512 machine about 0.7% of 10**6 float32 results are one ulp off,
    numpy's sqrt as the judge); the float64 root rounded to float32 is (53 bits
    are more than 2 * 24 + 2), which is what std::sqrt gives the cpu kernels.
    Other devices keep torch's sqrt (CUDA's is correctly rounded; MPS has no
    float64)."""
    if tensors and tensors[0].device.type == "cpu" and tensors[0].dtype == torch.float32:
        return [t.double().sqrt_().float() for t in tensors]
    return torch._foreach_sqrt(tensors)


def _skip(found_inf) -> bool:
    return found_inf is not None and float(found_inf) != 0.0


def _check_precision(batch, precision: int) -> None:
    if precision not in _PRECISIONS:
        raise ValueError(f"hyper.precision must be one of {_PRECISIONS}, got {precision!r}")
    if precision in (PRECISION_MASTER, PRECISION_KAHAN):
        want = torch.float32 if precision == PRECISION_MASTER else batch.dtype
        what = "float32 master copies" if precision == PRECISION_MASTER else "Kahan compensations"
        if batch.aux is None or len(batch.aux) != len(batch.params):
            raise ValueError(f"precision={precision} needs batch.aux ({what}), one per param")
        for i, a in enumerate(batch.aux):
            if a.dtype != want:
                raise TypeError(f"batch.aux[{i}] must be {want} ({what}) under precision={precision}, "
                                f"got {a.dtype}")


def _working_params(batch, precision: int) -> list[torch.Tensor]:
    """x, the values the update runs on, in the math dtype: the master copies
    themselves (precision 1, updated in place), else the params' values; a
    copy under Kahan summation, which needs the old param at the store."""
    if precision == PRECISION_MASTER:
        return batch.aux
    return _math(batch.params, copy=precision == PRECISION_KAHAN)


def _store_kahan(params, comps, x) -> None:
    """u = c + (x - old); p = RN(old + u); c = RN(u - (p - old)), in the math dtype."""
    for p, c, xi in zip(params, comps, x):
        old = p.to(xi.dtype)
        u = c.to(xi.dtype) + (xi - old)
        new = (old + u).to(p.dtype)
        c.copy_(u - (new.to(xi.dtype) - old))
        p.copy_(new)


def _store(batch, precision: int, seed: int, counts, x, state) -> None:
    """Write the step's results: state, a list of (stored tensors, math-dtype
    values, Philox word) triples, and the params from x (precision rules in
    the module docstring). counts: the tensors' step counts after the
    increment (the generator's step, precision 2)."""
    params = batch.params
    stochastic = precision == PRECISION_STOCHASTIC
    sr_state = stochastic and batch.state_dtype in _LOW
    sr_param = stochastic and batch.dtype in _LOW
    if not sr_state:
        for dsts, srcs, _ in state:
            _write_back(dsts, srcs)
    if precision == PRECISION_MASTER:
        torch._foreach_copy_(params, x)        # x is batch.aux: the master copy is written
    elif precision == PRECISION_KAHAN:
        _store_kahan(params, batch.aux, x)
    elif not sr_param:
        _write_back(params, x)
    if not (sr_state or sr_param):
        return
    for i, p in enumerate(params):
        targets = [(p, x[i], 0)] if sr_param else []
        if sr_state:
            targets += [(dsts[i], srcs[i], word) for dsts, srcs, word in state]
        step = int(counts[i]) & 0xFFFFFFFF
        _philox_torch.round_stochastically(p, targets, seed, batch.tensor_index[i], step)


def adam_step(batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None:
    params, grads, steps = batch.params, batch.grads, batch.steps
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs
    if not params or _skip(found_inf):
        return
    precision = int(hyper.precision)
    _check_precision(batch, precision)
    torch._foreach_add_(steps, 1.0)
    if batch.device.type == "meta":  # no values to compute (torch.optim runs on meta too)
        return
    lr = float(hyper.lr)
    counts = [float(s) for s in steps]
    step_sizes = [lr / (1.0 - hyper.beta1 ** t) for t in counts]
    bc2_sqrts = [math.sqrt(1.0 - hyper.beta2 ** t) for t in counts]

    p = _working_params(batch, precision)
    m, v = _math(exp_avgs), _math(exp_avg_sqs)
    use_l2 = not hyper.decoupled and hyper.weight_decay != 0.0
    g = _effective_grads(grads, p, hyper.maximize, use_l2, hyper.weight_decay, grad_scale)
    if hyper.decoupled and hyper.decay_coeff != 0.0:
        torch._foreach_mul_(p, 1.0 - lr * hyper.decay_coeff)
    # m = beta1 * m + (1 - beta1) * g; v = beta2 * v + (1 - beta2) * g * g
    torch._foreach_mul_(m, hyper.beta1)
    torch._foreach_add_(m, torch._foreach_mul(g, 1.0 - hyper.beta1))
    torch._foreach_mul_(v, hyper.beta2)
    torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(g, 1.0 - hyper.beta2), g))
    state = [(exp_avgs, m, 1), (exp_avg_sqs, v, 2)]
    denom_src = v
    if hyper.amsgrad:
        vmax = _math(max_exp_avg_sqs)
        torch._foreach_maximum_(vmax, v)
        state.append((max_exp_avg_sqs, vmax, 3))
        denom_src = vmax
    # p = p - step_size * m / (sqrt(v) / bc2_sqrt + eps)
    denom = _sqrt(denom_src)
    torch._foreach_div_(denom, bc2_sqrts)
    torch._foreach_add_(denom, hyper.eps)
    update = torch._foreach_mul(m, step_sizes)
    torch._foreach_div_(update, denom)
    torch._foreach_sub_(p, update)
    _store(batch, precision, hyper.seed, counts, p, state)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None:
    params, grads, steps = batch.params, batch.grads, batch.steps
    momentum_buffers, first_step = batch.momentum_buffers, batch.first_step
    if not params or _skip(found_inf):
        return
    precision = int(hyper.precision)
    _check_precision(batch, precision)
    if precision == PRECISION_STOCHASTIC and steps is None:
        raise ValueError("SGD with precision=2 (stochastic rounding) needs batch.steps, "
                         "the generator's step counts")
    if steps is not None:  # the generator's steps (precision 2), counted like Adam's
        torch._foreach_add_(steps, 1.0)
    if batch.device.type == "meta":
        return
    lr = float(hyper.lr)
    counts = [float(s) for s in steps] if steps is not None else None
    p = _working_params(batch, precision)
    use_l2 = not hyper.decoupled and hyper.weight_decay != 0.0
    g = _effective_grads(grads, p, hyper.maximize, use_l2, hyper.weight_decay, grad_scale)
    if hyper.decoupled and hyper.decay_coeff != 0.0:
        torch._foreach_mul_(p, 1.0 - lr * hyper.decay_coeff)
    state = []
    if hyper.momentum != 0.0:
        buf = _math(momentum_buffers)
        for i, first in enumerate(first_step):
            if first:
                buf[i].copy_(g[i])
            else:  # buf = momentum * buf + (1 - dampening) * g
                buf[i].mul_(hyper.momentum).add_(g[i] * (1.0 - hyper.dampening))
        state.append((momentum_buffers, buf, 1))
        if hyper.nesterov:
            g = torch._foreach_add(g, torch._foreach_mul(buf, hyper.momentum))
        else:
            g = buf
    torch._foreach_sub_(p, torch._foreach_mul(g, lr))
    _store(batch, precision, hyper.seed, counts, p, state)
