"""Glue between torch tensors and the native modules' address tables.

The native modules (fused_adamw._cpu, fused_adamw._cuda) do not link against
torch: they take an int64 table of raw addresses, a dtype code and a plain
hyperparameter struct (../shared/DESIGN.md, "Native interface";
csrc/include/fused_adamw/update.h; the table columns are in
csrc/cpu/cpu_common.h). This module builds those from tensors, for
backend_cpu.py and backend_cuda.py:

    dtype_code(dtype) -> int
    adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cache) -> int64 CPU [n, 7]
    sgd_table(params, grads, momentum_buffers, first_step, cache) -> int64 CPU [n, 5]
    to_cpp_adam(module, AdamHyper), to_cpp_sgd(module, SgdHyper) -> the module's struct

The tables are on the hot path of every step, with up to tens of thousands of
tensors, so they are cached in `cache` (a dict the caller keeps per device and
dtype bucket) and checked, not rebuilt, each step:

  * params and grads are the user's: their addresses are read every step
    (`p.data = ...` keeps the object and moves the storage), and the grad
    column is rewritten only when a grad address changed;
  * the state and step tensors belong to the optimizer, which replaces them
    rather than moving their storage: they are checked by identity (the cache
    holds them, so an id is never reused while cached).

A table tensor returned here stays valid until the next call with the same
cache; callers pass its address to the native module at once.
"""
from __future__ import annotations

import enum
import operator
from typing import Optional, Sequence

import numpy as np
import torch

from .hyper import AdamHyper, SgdHyper

__all__ = ["DType", "dtype_code", "adam_table", "sgd_table", "to_cpp_adam", "to_cpp_sgd",
           "AdamCol", "SgdCol"]


class DType(enum.IntEnum):
    """Storage dtype codes: enum DType of csrc/include/fused_adamw/update.h."""

    FLOAT32 = 0
    FLOAT64 = 1
    FLOAT16 = 2
    BFLOAT16 = 3


class AdamCol(enum.IntEnum):
    """Columns of the Adam address table."""

    NUMEL = 0
    PARAM = 1
    GRAD = 2
    EXP_AVG = 3
    EXP_AVG_SQ = 4
    MAX_EXP_AVG_SQ = 5   # 0 unless amsgrad
    STEP = 6             # a float32 scalar
    COUNT = 7


class SgdCol(enum.IntEnum):
    """Columns of the SGD address table."""

    NUMEL = 0
    PARAM = 1
    GRAD = 2
    MOMENTUM_BUFFER = 3  # 0 when momentum == 0
    FIRST_STEP = 4       # 1: the buffer was just allocated, set it to g
    COUNT = 5


_CODES = {
    torch.float32: int(DType.FLOAT32),
    torch.float64: int(DType.FLOAT64),
    torch.float16: int(DType.FLOAT16),
    torch.bfloat16: int(DType.BFLOAT16),
}

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel

# Keys of this module's entries in the caller's cache dict.
_ADAM_KEY = "native_adam_table"
_SGD_KEY = "native_sgd_table"


def dtype_code(dtype: torch.dtype) -> int:
    """The native dtype code of a torch dtype (TypeError for any other dtype)."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by the fused kernels "
                        "(float32, float64, float16, bfloat16)") from None


def _same_objects(a: Optional[Sequence], b: Optional[Sequence]) -> bool:
    """True when a and b hold the very same objects (or are both None)."""
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _ptrs(tensors: Optional[Sequence[torch.Tensor]], n: int) -> list[int]:
    return list(map(_data_ptr, tensors)) if tensors is not None else [0] * n


def _check_steps(steps: Sequence[torch.Tensor], device: torch.device) -> None:
    """Steps live with their params (the kernels read and write them there)."""
    for i, s in enumerate(steps):
        if s.dtype != torch.float32 or s.device != device or s.numel() != 1:
            raise ValueError(f"steps[{i}] must be a one-element float32 tensor on {device}, "
                             f"got {s.dtype} on {s.device} with {s.numel()} elements")


class _Entry:
    """A cached table, what it was built from, and the addresses it holds."""

    __slots__ = ("array", "tensor", "param_ptrs", "grad_ptrs", "first_step", "held")

    def __init__(self, array: np.ndarray, param_ptrs: list[int], grad_ptrs: list[int],
                 first_step: Optional[list], held: tuple) -> None:
        self.array = array
        self.tensor = torch.from_numpy(array)  # shares memory with array
        self.param_ptrs = param_ptrs
        self.grad_ptrs = grad_ptrs
        self.first_step = first_step
        self.held = held  # the optimizer-owned tensor lists, checked by identity


def _fresh(cache: dict, key: str, param_ptrs: list[int], grad_ptrs: list[int], held: tuple,
           grad_col: int) -> Optional[_Entry]:
    """The cached entry if it still describes these tensors (grad column
    brought up to date), else None."""
    entry = cache.get(key)
    if entry is None or entry.param_ptrs != param_ptrs:
        return None
    if not all(_same_objects(a, b) for a, b in zip(entry.held, held)):
        return None
    if entry.grad_ptrs != grad_ptrs:
        entry.array[:, grad_col] = grad_ptrs
        entry.grad_ptrs = grad_ptrs
    return entry


def adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cache: Optional[dict]) -> torch.Tensor:
    """The int64 [n, 7] Adam address table (AdamCol) of these tensors.

    max_exp_avg_sqs is None without amsgrad (column 0). cache: a dict kept
    across steps, or None to build afresh.
    """
    n = len(params)
    param_ptrs = list(map(_data_ptr, params))
    grad_ptrs = list(map(_data_ptr, grads))
    held = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    if cache is not None:
        entry = _fresh(cache, _ADAM_KEY, param_ptrs, grad_ptrs, held, AdamCol.GRAD)
        if entry is not None:
            return entry.tensor
    _check_steps(steps, params[0].device)
    table = np.empty((n, AdamCol.COUNT), dtype=np.int64)
    table[:, AdamCol.NUMEL] = list(map(_numel, params))
    table[:, AdamCol.PARAM] = param_ptrs
    table[:, AdamCol.GRAD] = grad_ptrs
    table[:, AdamCol.EXP_AVG] = _ptrs(exp_avgs, n)
    table[:, AdamCol.EXP_AVG_SQ] = _ptrs(exp_avg_sqs, n)
    table[:, AdamCol.MAX_EXP_AVG_SQ] = _ptrs(max_exp_avg_sqs, n)
    table[:, AdamCol.STEP] = _ptrs(steps, n)
    entry = _Entry(table, param_ptrs, grad_ptrs, None, tuple(map(_held_copy, held)))
    if cache is not None:
        cache[_ADAM_KEY] = entry
    return entry.tensor


def sgd_table(params, grads, momentum_buffers, first_step, cache: Optional[dict]) -> torch.Tensor:
    """The int64 [n, 5] SGD address table (SgdCol) of these tensors.

    momentum_buffers is None when momentum == 0 (column 0); first_step[i] is
    truthy where buffer i was just allocated.
    """
    n = len(params)
    param_ptrs = list(map(_data_ptr, params))
    grad_ptrs = list(map(_data_ptr, grads))
    first = [1 if f else 0 for f in first_step] if first_step is not None else [0] * n
    held = (momentum_buffers,)
    if cache is not None:
        entry = _fresh(cache, _SGD_KEY, param_ptrs, grad_ptrs, held, SgdCol.GRAD)
        if entry is not None:
            if entry.first_step != first:
                entry.array[:, SgdCol.FIRST_STEP] = first
                entry.first_step = first
            return entry.tensor
    table = np.empty((n, SgdCol.COUNT), dtype=np.int64)
    table[:, SgdCol.NUMEL] = list(map(_numel, params))
    table[:, SgdCol.PARAM] = param_ptrs
    table[:, SgdCol.GRAD] = grad_ptrs
    table[:, SgdCol.MOMENTUM_BUFFER] = _ptrs(momentum_buffers, n)
    table[:, SgdCol.FIRST_STEP] = first
    entry = _Entry(table, param_ptrs, grad_ptrs, first, tuple(map(_held_copy, held)))
    if cache is not None:
        cache[_SGD_KEY] = entry
    return entry.tensor


def _held_copy(tensors: Optional[Sequence[torch.Tensor]]) -> Optional[tuple]:
    # A copy: the caller may reuse and refill its list object.
    return tuple(tensors) if tensors is not None else None


def to_cpp_adam(module, h: AdamHyper):
    """h as `module.AdamHyper` (the pybind struct of _cpu or _cuda)."""
    return module.AdamHyper(lr=h.lr, beta1=h.beta1, beta2=h.beta2, eps=h.eps, weight_decay=h.weight_decay,
                            decay_coeff=h.decay_coeff, decoupled=h.decoupled, amsgrad=h.amsgrad,
                            maximize=h.maximize)


def to_cpp_sgd(module, h: SgdHyper):
    """h as `module.SgdHyper`."""
    return module.SgdHyper(lr=h.lr, momentum=h.momentum, dampening=h.dampening, weight_decay=h.weight_decay,
                           decay_coeff=h.decay_coeff, decoupled=h.decoupled, nesterov=h.nesterov,
                           maximize=h.maximize)
