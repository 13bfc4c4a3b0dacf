"""The `torch` backend: the fused step written with torch's foreach ops.

Serves devices that no kernel of this package serves (backend="auto" picks it
there), and is a readable statement of the update that the kernels fuse. It
follows the same contract (hyper.py) and the same order of operations as
csrc/include/fused_adamw/update.h: math in float32 for 16-bit storage (float64
for float64), one rounding when the result is stored.

It is not a fast path: several passes over memory, and step counts, lr,
grad_scale and found_inf are read on the host (a device sync on GPUs), so it
is not capturable.
"""
from __future__ import annotations

import math

import torch

from .hyper import AdamHyper, SgdHyper

_LOW = (torch.float16, torch.bfloat16)


def _math(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in the math dtype: themselves, or float32 copies."""
    if tensors and tensors[0].dtype in _LOW:
        return [t.float() for t in tensors]
    return tensors


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
        g = torch._foreach_add(g, params_m, alpha=l2)
    return g


def _skip(found_inf) -> bool:
    return found_inf is not None and float(found_inf) != 0.0


def adam_step(batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None:
    params, grads, steps = batch.params, batch.grads, batch.steps
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs = batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs
    if not params or _skip(found_inf):
        return
    torch._foreach_add_(steps, 1.0)
    if batch.device.type == "meta":  # no values to compute (torch.optim runs on meta too)
        return
    lr = float(hyper.lr)
    counts = [float(s) for s in steps]
    step_sizes = [-lr / (1.0 - hyper.beta1 ** t) for t in counts]
    bc2_sqrts = [math.sqrt(1.0 - hyper.beta2 ** t) for t in counts]

    p = _math(params)
    m, v = _math(exp_avgs), _math(exp_avg_sqs)
    use_l2 = not hyper.decoupled and hyper.weight_decay != 0.0
    g = _effective_grads(grads, p, hyper.maximize, use_l2, hyper.weight_decay, grad_scale)
    if hyper.decoupled and hyper.decay_coeff != 0.0:
        torch._foreach_mul_(p, 1.0 - lr * hyper.decay_coeff)
    torch._foreach_mul_(m, hyper.beta1)
    torch._foreach_add_(m, g, alpha=1.0 - hyper.beta1)
    torch._foreach_mul_(v, hyper.beta2)
    torch._foreach_addcmul_(v, g, g, value=1.0 - hyper.beta2)
    denom_src = v
    if hyper.amsgrad:
        vmax = _math(max_exp_avg_sqs)
        torch._foreach_maximum_(vmax, v)
        _write_back(max_exp_avg_sqs, vmax)
        denom_src = vmax
    denom = torch._foreach_sqrt(denom_src)
    torch._foreach_div_(denom, bc2_sqrts)
    torch._foreach_add_(denom, hyper.eps)
    torch._foreach_addcdiv_(p, m, denom, step_sizes)
    _write_back(exp_avgs, m)
    _write_back(exp_avg_sqs, v)
    _write_back(params, p)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None:
    params, grads = batch.params, batch.grads
    momentum_buffers, first_step = batch.momentum_buffers, batch.first_step
    if not params or _skip(found_inf) or batch.device.type == "meta":
        return
    lr = float(hyper.lr)
    p = _math(params)
    use_l2 = not hyper.decoupled and hyper.weight_decay != 0.0
    g = _effective_grads(grads, p, hyper.maximize, use_l2, hyper.weight_decay, grad_scale)
    if hyper.decoupled and hyper.decay_coeff != 0.0:
        torch._foreach_mul_(p, 1.0 - lr * hyper.decay_coeff)
    if hyper.momentum != 0.0:
        buf = _math(momentum_buffers)
        for i, first in enumerate(first_step):
            if first:
                buf[i].copy_(g[i])
            else:
                buf[i].mul_(hyper.momentum).add_(g[i], alpha=1.0 - hyper.dampening)
        _write_back(momentum_buffers, buf)
        if hyper.nesterov:
            g = torch._foreach_add(g, buf, alpha=hyper.momentum)
        else:
            g = buf
    torch._foreach_add_(p, g, alpha=-lr)
    _write_back(params, p)
