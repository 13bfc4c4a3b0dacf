"""The `cpu` backend: the C++ kernels of fused_adamw._cpu on CPU tensors.

Meets the backend contract of hyper.py: adam_step / sgd_step take the tensor
lists of one (device, dtype) bucket and make one native call for all of them.
The call runs one OpenMP parallel region over every tensor's elements (with
torch.get_num_threads() threads) and a SIMD loop around the shared per-element
math of csrc/include/fused_adamw/update.h; csrc/bindings/cpu_module.cpp is the
module, csrc/cpu/ the kernels.

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


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper: AdamHyper, *,
              lr_tensor=None, grad_scale=None, found_inf=None, cache=None) -> None:
    """One Adam/AdamW step over all these tensors in one native call (hyper.py)."""
    if not params:
        return
    table = _native.adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cache)
    h = _native.to_cpp_adam(_cpu, hyper)
    if lr_tensor is not None:
        h.lr = float(lr_tensor)
    _cpu.adam_step(table.data_ptr(), len(params), _native.dtype_code(params[0].dtype),
                   _native.dtype_code(exp_avgs[0].dtype), h,
                   _scalar_address(grad_scale, "grad_scale"), _scalar_address(found_inf, "found_inf"),
                   torch.get_num_threads())


def sgd_step(params, grads, momentum_buffers, first_step, hyper: SgdHyper, *,
             lr_tensor=None, grad_scale=None, found_inf=None, cache=None) -> None:
    """One SGD/SGDW step over all these tensors in one native call (hyper.py)."""
    if not params:
        return
    table = _native.sgd_table(params, grads, momentum_buffers, first_step, cache)
    h = _native.to_cpp_sgd(_cpu, hyper)
    if lr_tensor is not None:
        h.lr = float(lr_tensor)
    param_code = _native.dtype_code(params[0].dtype)
    state_code = _native.dtype_code(momentum_buffers[0].dtype) if momentum_buffers else param_code
    _cpu.sgd_step(table.data_ptr(), len(params), param_code, state_code, h,
                  _scalar_address(grad_scale, "grad_scale"), _scalar_address(found_inf, "found_inf"),
                  torch.get_num_threads())
