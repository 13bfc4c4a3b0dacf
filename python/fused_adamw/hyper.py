"""Hyperparameters of one fused step, and the contract every backend meets.

The optimizer classes (optim.py) compute these once per param group and step;
dispatch.py hands them, with lists of validated tensors, to a backend. The
fields mirror the C++ structs in csrc/include/fused_adamw/update.h, which hold
the per-element math that all backends share.

Backend contract (fused_adamw.backend_cpu, backend_cuda, backend_torch and
fused_adamw.triton_kernels each provide both functions):

    adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
              hyper: AdamHyper, *, lr_tensor=None, grad_scale=None,
              found_inf=None, cache=None) -> None
    sgd_step(params, grads, momentum_buffers, first_step, hyper: SgdHyper, *,
             lr_tensor=None, grad_scale=None, found_inf=None, cache=None) -> None

What the caller (dispatch.py) guarantees:
  * every tensor is on one device; params and grads share one dtype
    (float32, float64, float16 or bfloat16); the state tensors (exp_avg,
    exp_avg_sq, max_exp_avg_sq, momentum_buffer) share one dtype, the params'
    or float32; each state tensor and grad has its param's numel and strides,
    and every param is non-overlapping and dense, so a flat loop over its
    storage is the update; no two params or state tensors overlap in memory.
  * max_exp_avg_sqs is None unless hyper.amsgrad; momentum_buffers is None
    when hyper.momentum == 0, and first_step[i] is True where buffer i was just
    allocated (the update sets it to g rather than reading it).
  * steps[i] is param i's step count: a float32 scalar tensor, on the params'
    device for the kernel backends. The backend adds 1 to every step, then uses
    each tensor's own count for its bias corrections (t = step after the add).
  * lr_tensor, when given (capturable), is a 1-element float32 tensor on the
    params' device holding the learning rate; the backend must read it there
    (no host sync) and ignore hyper.lr.
  * grad_scale / found_inf, when given, are 1-element float32 tensors on the
    params' device (torch's GradScaler). The grad is divided by grad_scale;
    when found_inf != 0 nothing is written at all, steps included.
  * cache is a dict the caller keeps for this (device, dtype) bucket across
    steps; the backend may keep address tables in it and must check that they
    still describe the tensors it was given.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AdamHyper:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Decoupled decay multiplies p by (1 - lr * decay_coeff): decay_coeff is
    # weight_decay for decay_scaling="lr" (torch) and weight_decay / initial_lr
    # for "schedule" (the paper's eta_t * lambda, eta_t = lr / initial_lr).
    decay_coeff: float = 0.0
    decoupled: bool = True
    amsgrad: bool = False
    maximize: bool = False


@dataclass
class SgdHyper:
    lr: float = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    decay_coeff: float = 0.0
    decoupled: bool = False
    nesterov: bool = False
    maximize: bool = False
