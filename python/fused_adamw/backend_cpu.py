"""The `cpu` backend: the C++ kernels of fused_adamw._cpu on CPU tensors.

Meets the backend contract of hyper.py: adam_step / sgd_step take one Batch
(a (device, dtype) bucket of a group, validated by plan.py, with its address
table) and make one native call for all of its tensors. The call runs one
OpenMP parallel region over every tensor's elements (with
torch.get_num_threads() threads) and a SIMD loop around the shared
per-element math of csrc/include/fused_adamw/update.h;
csrc/bindings/cpu_module.cpp is the module, csrc/cpu/ the kernels.

Importing this module imports fused_adamw._cpu; dispatch.py turns a failure
into "backend cpu unavailable" with the reason. Build it with
`pip install -e .` (setup.py); `_cpu.build_info()` says which instruction set
runs (FUSED_ADAMW_CPU_ISA=base|avx2|avx512 picks one).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _cpu
from . import _native
from .hyper import AdamHyper, SgdHyper

__all__ = ["adam_step", "sgd_step"]


def _scalar_address(t: Optional[torch.Tensor], what: str) -> int:
    """The address of a one-element float32 CPU tensor, 0 for None."""
    if t is None:
        return 0
    if t.device.type != "cpu" or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{what} must be a one-element float32 CPU tensor, got {t.dtype} on {t.device} "
                         f"with {t.numel()} elements")
    return t.data_ptr()


def _call(fn, batch, hyper, grad_scale, found_inf) -> None:
    if not batch.params:
        return
    h = _native.to_cpp(_cpu, hyper)
    if isinstance(hyper.lr, torch.Tensor):  # on the CPU, reading it costs nothing
        h.lr = float(hyper.lr)
    fn(batch.table.data_ptr(), len(batch.params), _native.dtype_code(batch.dtype),
       _native.dtype_code(batch.state_dtype), h,
       _scalar_address(grad_scale, "grad_scale"), _scalar_address(found_inf, "found_inf"),
       torch.get_num_threads())


def adam_step(batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None:
    """One Adam/AdamW step over all of the batch's tensors in one native call (hyper.py)."""
    _call(_cpu.adam_step, batch, hyper, grad_scale, found_inf)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None:
    """One SGD/SGDW step over all of the batch's tensors in one native call (hyper.py)."""
    _call(_cpu.sgd_step, batch, hyper, grad_scale, found_inf)
