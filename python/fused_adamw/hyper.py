"""Hyperparameters of one fused step, and the contract every backend meets.

The optimizer classes (optim.py) compute these once per param group and step;
the group's plan (plan.py) hands them, with a Batch of validated tensors, to a
backend. The field names are those of the C++ field lists in
csrc/include/fused_adamw/update.h (tests/test_optim_api.py compares them),
which hold the per-element math that all backends share.

Backend contract (fused_adamw.backend_cpu, backend_cuda, backend_torch,
backend_functional and fused_adamw.triton_kernels each provide both):

    adam_step(batch: plan.Batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None
    sgd_step(batch: plan.Batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None

What the caller (plan.py, which builds the Batch) guarantees:
  * every tensor is on one device; params and grads share one dtype
    (float32, float64, float16 or bfloat16); the state tensors (exp_avg,
    exp_avg_sq, max_exp_avg_sq, momentum_buffer) share one dtype: the params',
    float32 for 16-bit params, or bfloat16 for float32/float16 params; each
    state tensor and grad has its param's numel and strides,
    and every param is non-overlapping and dense, so a flat loop over its
    storage is the update; no two params or state tensors overlap in memory.
  * batch.max_exp_avg_sqs is None unless hyper.amsgrad; batch.momentum_buffers
    is None when hyper.momentum == 0, and batch.first_step[i] is True where
    buffer i was just allocated (the update sets it to g rather than reading it).
  * batch.steps[i] is param i's step count: a float32 scalar tensor, on the params'
    device for the kernel backends. The backend adds 1 to every step, then uses
    each tensor's own count for its bias corrections (t = step after the add).
  * hyper.precision says how results are stored (PRECISION_* below; not 0
    only for 16-bit params): batch.aux holds the float32 master copies
    (PRECISION_MASTER) or the Kahan compensations in the param dtype
    (PRECISION_KAHAN), laid out as the params; under PRECISION_STOCHASTIC
    the random bits are Philox-4x32-10 keyed on hyper.seed with counter
    (element index, batch.tensor_index[i], step after the increment), as
    fused_adamw.reference.random_bits defines them, and SGD's batch.steps are
    float32 step counts the backend increments like Adam's.
  * hyper.lr is one value: a float, or (capturable) a 1-element float32
    tensor on the params' device, which a device backend reads there (no host
    sync).
  * grad_scale / found_inf, when given, are 1-element float32 tensors on the
    params' device (torch's GradScaler). The grad is divided by grad_scale;
    when found_inf != 0 nothing is written at all, steps included.
  * batch.table (kernel backends) describes exactly these tensors; its
    `version` changes whenever its contents do; batch.resources is the
    backend's own dict for this (backend, device, dtype), kept across steps
    and rebuilds, for what it derives from the table (device copies) or holds
    long (a CUDA workspace).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


# Values of the `precision` field (update.h, rounding.h): how a step stores
# its results.
PRECISION_NEAREST = 0      # round to nearest even (torch's behaviour)
PRECISION_MASTER = 1       # float32 master copy in the table's aux column
PRECISION_STOCHASTIC = 2   # stochastic rounding of the param and 16-bit state
PRECISION_KAHAN = 3        # Kahan compensation (param dtype) in the aux column

# The optimizers' keywords that select them (at most one per group).
PRECISION_OPTIONS = {"master_weights": PRECISION_MASTER, "stochastic_rounding": PRECISION_STOCHASTIC,
                     "kahan_summation": PRECISION_KAHAN}


def precision_code(group: dict) -> int:
    """The `precision` value of a param group's options."""
    for key, code in PRECISION_OPTIONS.items():
        if group.get(key):
            return code
    return PRECISION_NEAREST


@dataclass
class AdamHyper:
    lr: Union[float, torch.Tensor] = 1e-3
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
    # How results are stored (PRECISION_* above); seed keys the generator of
    # stochastic rounding.
    precision: int = 0
    seed: int = 0


@dataclass
class SgdHyper:
    lr: Union[float, torch.Tensor] = 1e-3
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    decay_coeff: float = 0.0
    decoupled: bool = False
    nesterov: bool = False
    maximize: bool = False
    precision: int = 0
    seed: int = 0
