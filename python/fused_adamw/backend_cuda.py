"""The `cuda` backend: the kernels of fused_adamw._cuda on CUDA tensors.

Meets the backend contract of hyper.py: adam_step / sgd_step take the tensor
lists of one (device, dtype) bucket and make one native call, which is one
kernel launch for all of them (csrc/cuda/multi_tensor.cuh explains the chunk
table, the device-resident metadata and the step increment). The call runs on
torch.cuda.current_stream(device) and makes no host sync, so with
capturable=True (lr_tensor on the device) a step can be captured in a CUDA
graph.

The bucket's `cache` keeps the address table (fused_adamw._native) and a
_cuda.Workspace, the device memory that holds the uploaded tables across
steps; it is freed with the cache.

Importing this module imports fused_adamw._cuda; dispatch.py turns a failure
into "backend cuda unavailable" with the reason. Build it with
`pip install -e .` where nvcc is found; `_cuda.build_info()` says what was
built.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _cuda
from . import _native
from .hyper import AdamHyper, SgdHyper

__all__ = ["adam_step", "sgd_step"]

# Keys of this module's entries in the bucket's cache dict.
_WORKSPACE_KEY = "cuda_workspace"
_CHECKED_KEY = "cuda_checked_table"


def _scalar_address(t: Optional[torch.Tensor], device: torch.device, what: str) -> int:
    """The address of a one-element float32 tensor on `device`, 0 for None."""
    if t is None:
        return 0
    if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{what} must be a one-element float32 tensor on {device}, got {t.dtype} on {t.device} "
                         f"with {t.numel()} elements")
    return t.data_ptr()


def _workspace(cache: Optional[dict], device: torch.device):
    """The bucket's workspace; None (the module's per-device default) without a cache."""
    if cache is None:
        return None
    ws = cache.get(_WORKSPACE_KEY)
    if ws is None or ws.device != device.index:
        ws = cache[_WORKSPACE_KEY] = _cuda.Workspace(device.index)
    return ws


def _check_steps(steps: Sequence[torch.Tensor], device: torch.device, table: torch.Tensor,
                 cache: Optional[dict]) -> None:
    """The kernel reads and writes the steps on the device: a CPU step would
    be an illegal address there. Checked when the table is new (_native keeps
    the same table object while the step tensors stay the same)."""
    if cache is not None and cache.get(_CHECKED_KEY) is table:
        return
    for i, s in enumerate(steps):
        if s.device != device or s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"steps[{i}] must be a one-element float32 tensor on {device}, got {s.dtype} "
                             f"on {s.device} with {s.numel()} elements")
    if cache is not None:
        cache[_CHECKED_KEY] = table


def _device_of(params: Sequence[torch.Tensor]) -> torch.device:
    device = params[0].device
    if device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got params on {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper: AdamHyper, *,
              lr_tensor=None, grad_scale=None, found_inf=None, cache=None) -> None:
    """One Adam/AdamW step over all these tensors in one kernel launch (hyper.py)."""
    if not params:
        return
    device = _device_of(params)
    table = _native.adam_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, cache)
    _check_steps(steps, device, table, cache)
    _cuda.adam_step(table.data_ptr(), len(params), _native.dtype_code(params[0].dtype),
                    _native.dtype_code(exp_avgs[0].dtype), _native.to_cpp_adam(_cuda, hyper),
                    _scalar_address(grad_scale, device, "grad_scale"),
                    _scalar_address(found_inf, device, "found_inf"),
                    _scalar_address(lr_tensor, device, "lr_tensor"),
                    device.index, torch.cuda.current_stream(device).cuda_stream,
                    _workspace(cache, device))


def sgd_step(params, grads, momentum_buffers, first_step, hyper: SgdHyper, *,
             lr_tensor=None, grad_scale=None, found_inf=None, cache=None) -> None:
    """One SGD/SGDW step over all these tensors in one kernel launch (hyper.py)."""
    if not params:
        return
    device = _device_of(params)
    table = _native.sgd_table(params, grads, momentum_buffers, first_step, cache)
    param_code = _native.dtype_code(params[0].dtype)
    state_code = _native.dtype_code(momentum_buffers[0].dtype) if momentum_buffers else param_code
    _cuda.sgd_step(table.data_ptr(), len(params), param_code, state_code, _native.to_cpp_sgd(_cuda, hyper),
                   _scalar_address(grad_scale, device, "grad_scale"),
                   _scalar_address(found_inf, device, "found_inf"),
                   _scalar_address(lr_tensor, device, "lr_tensor"),
                   device.index, torch.cuda.current_stream(device).cuda_stream,
                   _workspace(cache, device))
