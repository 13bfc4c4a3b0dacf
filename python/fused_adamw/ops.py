"""The fused steps as torch.library custom ops, for torch.compile.

    torch.ops.fused_adamw.adam_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                                lr, beta1, beta2, eps, weight_decay, decay_coeff,
                                decoupled, amsgrad, maximize, backend, grad_scale, found_inf, lr_tensor=None)
    torch.ops.fused_adamw.sgd_(params, grads, momentum_buffers, first_step,
                               lr, momentum, dampening, weight_decay, decay_coeff,
                               decoupled, nesterov, maximize, backend, grad_scale, found_inf, lr_tensor=None)

Each op updates its tensor lists in place (params and state; Adam's step
counts too) and returns nothing; `mutates_args` names those lists, so
torch.compile functionalizes them and Inductor writes the results back. The
fake implementation (register_fake) does nothing, as an in-place op without
outputs has no output metadata to compute: Dynamo then traces an
`opt.step()` as one call of one op per param group, with no graph break,
and the compiled graph calls the real op, which runs the same backend
modules as the eager step (hyper.py's contract).

The hyperparameters are those of hyper.AdamHyper / SgdHyper, flat, with
`decay_coeff` already resolved (optim.py: weight_decay for
decay_scaling="lr", weight_decay / decay_base_lr for "schedule"). The lists
may hold tensors of several devices and dtypes: the op buckets them by
(device, dtype), validates each bucket at the boundary (plan.Batch.adam /
Batch.sgd: the checks of the eager step, every call) and makes one backend
call per bucket. `backend` is a group's backend name ("auto" resolves per
device, as in the eager step). max_exp_avg_sqs is empty unless amsgrad;
momentum_buffers is empty when momentum == 0; first_step[i] says buffer i
was just made (the update sets it to the step's grad). `lr_tensor`, when
given, is the lr (a 1-element tensor, a group's tensor lr) and `lr` is
ignored: a tensor lr is an input of the compiled graph, so an LR scheduler
changing it causes no recompile, where a float lr is a constant Dynamo
guards on.

What the eager step keeps between steps (plan.py's address tables, a CUDA
workspace) is rebuilt on every call here: the compiled step trades that
host cost for tracing. The optimizer classes call these ops only while
torch.compiler.is_compiling() (optim.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import dispatch
from .hyper import AdamHyper, SgdHyper
from .plan import Batch, _lazy

__all__ = ["adam_", "sgd_"]

Tensor = torch.Tensor


def _buckets(params: list[Tensor]) -> dict[tuple, list[int]]:
    out: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        out.setdefault((p.device, p.dtype), []).append(i)
    return out


def _pick(lst, idx):
    return [lst[i] for i in idx]


def _grads(grads, idx):
    """The grads of a bucket as the kernels read them: a negative, conjugate
    or zero view (its memory is not its values; Dynamo cannot test for that
    while tracing) is read through a plain copy."""
    return [torch.empty_like(g, memory_format=torch.preserve_format).copy_(g) if _lazy(g) else g
            for g in _pick(grads, idx)]


def _with_lr(hyper, lr_tensor: Optional[Tensor], device: torch.device):
    """hyper with the tensor lr, as the backends take one (hyper.py): a
    1-element float32 tensor on the params' device."""
    if lr_tensor is None:
        return hyper
    return dataclasses.replace(hyper, lr=_scalar(lr_tensor.reshape(1), device))


def _scalar(t: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    if t is None:
        return None
    if t.device != device or t.dtype != torch.float32:
        t = t.to(device=device, dtype=torch.float32)
    return t


# The real implementations run untraced even when called from code Dynamo is
# tracing frame by frame (after a graph break elsewhere in a compiled function):
# their address tables and native calls cannot be traced.
@torch._disable_dynamo
def _adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, backend, grad_scale,
               found_inf, lr_tensor) -> None:
    for (device, _), idx in _buckets(params).items():
        batch = Batch.adam(_pick(params, idx), _grads(grads, idx), _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx),
                           _pick(max_exp_avg_sqs, idx) if hyper.amsgrad else None, _pick(steps, idx))
        module = dispatch.backend_module(dispatch.resolve_backend(backend, device))
        module.adam_step(batch, _with_lr(hyper, lr_tensor, device), grad_scale=_scalar(grad_scale, device),
                         found_inf=_scalar(found_inf, device))


@torch._disable_dynamo
def _sgd_impl(params, grads, momentum_buffers, first_step, hyper, backend, grad_scale, found_inf,
              lr_tensor) -> None:
    use_buffers = hyper.momentum != 0.0
    for (device, _), idx in _buckets(params).items():
        batch = Batch.sgd(_pick(params, idx), _grads(grads, idx),
                          _pick(momentum_buffers, idx) if use_buffers else None,
                          _pick(first_step, idx) if use_buffers else None)
        module = dispatch.backend_module(dispatch.resolve_backend(backend, device))
        module.sgd_step(batch, _with_lr(hyper, lr_tensor, device), grad_scale=_scalar(grad_scale, device),
                        found_inf=_scalar(found_inf, device))


@torch.library.custom_op("fused_adamw::adam_",
                         mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"))
def adam_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
          max_exp_avg_sqs: list[Tensor], steps: list[Tensor], lr: float, beta1: float, beta2: float, eps: float,
          weight_decay: float, decay_coeff: float, decoupled: bool, amsgrad: bool, maximize: bool,
          backend: str, grad_scale: Optional[Tensor], found_inf: Optional[Tensor],
          lr_tensor: Optional[Tensor] = None) -> None:
    """One Adam / AdamW step over every tensor of the lists (module docstring)."""
    hyper = AdamHyper(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decay_coeff=decay_coeff, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
    _adam_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, backend, grad_scale, found_inf,
               lr_tensor)


@adam_.register_fake
def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
               weight_decay, decay_coeff, decoupled, amsgrad, maximize, backend, grad_scale, found_inf,
               lr_tensor=None) -> None:
    return None


@torch.library.custom_op("fused_adamw::sgd_", mutates_args=("params", "momentum_buffers"))
def sgd_(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], first_step: list[bool],
         lr: float, momentum: float, dampening: float, weight_decay: float, decay_coeff: float, decoupled: bool,
         nesterov: bool, maximize: bool, backend: str, grad_scale: Optional[Tensor],
         found_inf: Optional[Tensor], lr_tensor: Optional[Tensor] = None) -> None:
    """One SGD / SGDW step over every tensor of the lists (module docstring)."""
    hyper = SgdHyper(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                     decay_coeff=decay_coeff, decoupled=decoupled, nesterov=nesterov, maximize=maximize)
    _sgd_impl(params, grads, momentum_buffers, first_step, hyper, backend, grad_scale, found_inf, lr_tensor)


@sgd_.register_fake
def _sgd_fake(params, grads, momentum_buffers, first_step, lr, momentum, dampening, weight_decay, decay_coeff,
              decoupled, nesterov, maximize, backend, grad_scale, found_inf, lr_tensor=None) -> None:
    return None
