"""Glue between torch tensors and the native modules' address tables.

The native modules (fused_adamw._cpu, fused_adamw._cuda) do not link against
torch: they take an int64 table of raw addresses, a dtype code and a plain
hyperparameter struct (../shared/DESIGN.md, "Native interface";
csrc/include/fused_adamw/update.h; the table columns are in
csrc/cpu/cpu_common.h). This module builds those from tensors, for
the plan (plan.py) and the backends:

    dtype_code(dtype) -> int
    build_table(algo, params, grads, state, steps, first_step, aux, index) -> int64 [n, 9] (Adam) or [n, 8] (SGD)
    to_cpp(module, AdamHyper | SgdHyper) -> the module's struct

The plan builds a table once per validated tensor set and rewrites its param
and grad columns when only addresses move; the backends read it.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional, Sequence

import numpy as np
import torch


__all__ = ["DType", "dtype_code", "build_table", "to_cpp", "AdamCol", "SgdCol"]


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
    AUX = 7              # precision 1: float32 master copy; 3: Kahan compensation; else 0
    INDEX = 8            # the tensor's index in the generator's counter
    COUNT = 9


class SgdCol(enum.IntEnum):
    """Columns of the SGD address table."""

    NUMEL = 0
    PARAM = 1
    GRAD = 2
    MOMENTUM_BUFFER = 3  # 0 when momentum == 0
    FIRST_STEP = 4       # 1: the buffer was just allocated, set it to g
    AUX = 5              # as AdamCol.AUX
    STEP = 6             # precision 2: a float32 scalar (the generator's step); else 0
    INDEX = 7            # as AdamCol.INDEX
    COUNT = 8


_CODES = {
    torch.float32: int(DType.FLOAT32),
    torch.float64: int(DType.FLOAT64),
    torch.float16: int(DType.FLOAT16),
    torch.bfloat16: int(DType.BFLOAT16),
}

_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel


def dtype_code(dtype: torch.dtype) -> int:
    """The native dtype code of a torch dtype (TypeError for any other dtype)."""
    try:
        return _CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by the fused kernels "
                        "(float32, float64, float16, bfloat16)") from None


PARAM_COLUMN = int(AdamCol.PARAM)   # the same column in both layouts
GRAD_COLUMN = int(AdamCol.GRAD)
assert PARAM_COLUMN == SgdCol.PARAM and GRAD_COLUMN == SgdCol.GRAD


def _ptrs(tensors: Optional[Sequence[torch.Tensor]], n: int) -> list[int]:
    return list(map(_data_ptr, tensors)) if tensors is not None else [0] * n


def build_table(algo: str, params, grads, state: dict, steps, first_step, aux=None,
                index=None) -> np.ndarray:
    """The int64 address table (AdamCol or SgdCol rows) of validated lists.

    algo "adam": state holds exp_avg, exp_avg_sq and max_exp_avg_sq (None
    without amsgrad: column 0), steps the step tensors. algo "sgd": state
    holds momentum_buffer (None without momentum), first_step the flags.
    The plan (plan.py) owns the array and rewrites its param and grad
    columns when only addresses move. aux: the master copies or Kahan
    compensations (None: column 0); index: the tensors' generator indices
    (None: 0). SGD's step column holds steps when given (precision 2)."""
    n = len(params)
    if algo == "adam":
        table = np.empty((n, AdamCol.COUNT), dtype=np.int64)
        table[:, AdamCol.NUMEL] = list(map(_numel, params))
        table[:, AdamCol.PARAM] = _ptrs(params, n)
        table[:, AdamCol.GRAD] = _ptrs(grads, n)
        table[:, AdamCol.EXP_AVG] = _ptrs(state["exp_avg"], n)
        table[:, AdamCol.EXP_AVG_SQ] = _ptrs(state["exp_avg_sq"], n)
        table[:, AdamCol.MAX_EXP_AVG_SQ] = _ptrs(state.get("max_exp_avg_sq"), n)
        table[:, AdamCol.STEP] = _ptrs(steps, n)
        table[:, AdamCol.AUX] = _ptrs(aux, n)
        table[:, AdamCol.INDEX] = list(index) if index is not None else 0
        return table
    table = np.empty((n, SgdCol.COUNT), dtype=np.int64)
    table[:, SgdCol.NUMEL] = list(map(_numel, params))
    table[:, SgdCol.PARAM] = _ptrs(params, n)
    table[:, SgdCol.GRAD] = _ptrs(grads, n)
    table[:, SgdCol.MOMENTUM_BUFFER] = _ptrs(state.get("momentum_buffer"), n)
    table[:, SgdCol.FIRST_STEP] = [1 if f else 0 for f in first_step] if first_step is not None else 0
    table[:, SgdCol.AUX] = _ptrs(aux, n)
    table[:, SgdCol.STEP] = _ptrs(steps, n)
    table[:, SgdCol.INDEX] = list(index) if index is not None else 0
    return table


def to_cpp(module, h):
    """h (hyper.AdamHyper or SgdHyper) as the native module's struct of the
    same name; a tensor lr (capturable) goes as NaN, the kernels read the
    tensor instead (the CUDA call is handed its address)."""
    fields = {f.name: getattr(h, f.name) for f in dataclasses.fields(h)}
    if isinstance(fields["lr"], torch.Tensor):
        fields["lr"] = float("nan")
    return getattr(module, type(h).__name__)(**fields)
