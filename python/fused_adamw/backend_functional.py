"""The functional route: torch.optim's own functional Adam and SGD for what
no kernel serves.

plan.py sends here, with the user's own tensors (not the plan's aliases):
  * params that are strided views (a kernel updates a dense storage span in
    place; torch's single-tensor code handles any layout);
  * sparse grads (SGD only, as torch.optim.SGD; Adam refuses them, as torch);
  * every param of a group with differentiable=True (torch's code keeps the
    update in the autograd graph).

It calls torch.optim.adam.adam / torch.optim.sgd.sgd with foreach=False, so
its results are torch.optim's, plus this package's extras, applied around
the call in the order of csrc/include/fused_adamw/update.h:
  * decay_scaling="schedule": torch's decoupled decay multiplies p by
    (1 - lr * weight_decay), so it is handed decay_coeff as weight_decay;
  * SGDW (decoupled SGD, which torch lacks): p *= 1 - lr * decay_coeff before
    torch's SGD runs without decay;
  * state_dtype=float32 for 16-bit params: the update runs on float32 copies
    of the param and grad, and the param takes the rounded result;
  * grad_scale / found_inf (GradScaler): grads are unscaled first, and a step
    with found_inf != 0 changes nothing (read on the host: this route is not
    capturable).
The contract is hyper.py's; the batch carries the param state dicts so that
SGD's first-step buffers land in the state as torch.optim.SGD puts them.
"""
from __future__ import annotations

from torch.optim.adam import adam as _torch_adam
from torch.optim.sgd import sgd as _torch_sgd

from .hyper import AdamHyper, SgdHyper

__all__ = ["adam_step", "sgd_step"]


def _skip(found_inf) -> bool:
    return found_inf is not None and float(found_inf) != 0.0


def _unscaled(grads, grad_scale):
    if grad_scale is None:
        return list(grads)
    return [g / grad_scale.to(g.device) for g in grads]


def _inputs(batch, grad_scale):
    """(params, grads, copied): what torch's code runs on. The params and
    unscaled grads, or float32 copies of both where the state is float32 and
    the params 16-bit (then the params take the result back afterwards)."""
    grads = _unscaled(batch.grads, grad_scale)
    params = batch.params
    if batch.differentiable or params[0].dtype == batch.state_dtype or params[0].is_complex():
        return list(params), grads, False
    return [p.to(batch.state_dtype) for p in params], [g.to(batch.state_dtype) for g in grads], True


def _write_back(batch, params, copied) -> None:
    if copied:
        for p, w in zip(batch.params, params):
            p.copy_(w)


def adam_step(batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None:
    """torch.optim.adam.adam on the batch's tensors (module docstring)."""
    if not batch.params or _skip(found_inf):
        return
    params, grads, copied = _inputs(batch, grad_scale)
    _torch_adam(params, grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs or [], batch.steps,
                foreach=False, capturable=False, differentiable=batch.differentiable,
                has_complex=any(p.is_complex() for p in params),
                decoupled_weight_decay=hyper.decoupled, amsgrad=hyper.amsgrad,
                beta1=hyper.beta1, beta2=hyper.beta2, lr=hyper.lr, eps=hyper.eps, maximize=hyper.maximize,
                weight_decay=hyper.decay_coeff if hyper.decoupled else hyper.weight_decay)
    _write_back(batch, params, copied)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None:
    """torch.optim.sgd.sgd on the batch's tensors (module docstring)."""
    if not batch.params or _skip(found_inf):
        return
    params, grads, copied = _inputs(batch, grad_scale)
    lr = float(hyper.lr) if not batch.differentiable else hyper.lr
    if hyper.decoupled and hyper.decay_coeff != 0.0:
        for p in params:
            p.mul_(1.0 - lr * hyper.decay_coeff)
    use_momentum = hyper.momentum != 0.0
    bufs = list(batch.momentum_buffers) if use_momentum else [None] * len(params)
    _torch_sgd(params, grads, bufs, has_sparse_grad=any(g.is_sparse for g in grads), foreach=False,
               weight_decay=0.0 if hyper.decoupled else hyper.weight_decay, momentum=hyper.momentum,
               lr=lr, dampening=hyper.dampening, nesterov=hyper.nesterov, maximize=hyper.maximize)
    _write_back(batch, params, copied)
    if use_momentum:
        for st, old, new in zip(batch.state_dicts, batch.momentum_buffers, bufs):
            if old is None and new is not None:  # torch made it from this step's grad
                st["momentum_buffer"] = new
