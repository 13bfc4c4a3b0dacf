"""The `cuda` backend: the kernels of fused_adamw._cuda on CUDA tensors.

Meets the backend contract of hyper.py: adam_step / sgd_step take the tensor
lists of one (device, dtype) bucket and make one native call, which is one
kernel launch for all of them (csrc/cuda/multi_tensor.cuh explains the chunk
table, the device-resident metadata and the step increment). The call runs on
torch.cuda.current_stream(device) and makes no host sync, so with
capturable=True (hyper.lr a tensor on the device) a step can be captured in a CUDA
graph.

The plan (plan.py) owns the address table; this backend keeps a
_cuda.Workspace, the device memory that holds the uploaded tables across
steps, in the batch's resources (one per plan, device and dtype).

Importing this module imports fused_adamw._cuda; dispatch.py turns a failure
into "backend cuda unavailable" with the reason. Build it with
`pip install -e .` where nvcc is found; `_cuda.build_info()` says what was
built.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _cuda
from . import _native
from .hyper import AdamHyper, SgdHyper

__all__ = ["adam_step", "sgd_step"]

_WORKSPACE_KEY = "cuda_workspace"


def _scalar_address(t: Optional[torch.Tensor], device: torch.device, what: str) -> int:
    """The address of a one-element float32 tensor on `device`, 0 for None."""
    if t is None:
        return 0
    if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{what} must be a one-element float32 tensor on {device}, got {t.dtype} on {t.device} "
                         f"with {t.numel()} elements")
    return t.data_ptr()


def _workspace(batch, device: torch.device):
    """The workspace of this (device, dtype): kept in the batch's resources,
    which the plan keeps across rebuilds (a change of the grad set does not
    free and re-make it)."""
    ws = batch.resources.get(_WORKSPACE_KEY)
    if ws is None or ws.device != device.index:
        ws = batch.resources[_WORKSPACE_KEY] = _cuda.Workspace(device.index)
    return ws


def _device_of(batch) -> torch.device:
    device = batch.device
    if device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got params on {device}")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _call(fn, batch, hyper, grad_scale, found_inf) -> None:
    if not batch.params:
        return
    device = _device_of(batch)
    lr = hyper.lr if isinstance(hyper.lr, torch.Tensor) else None
    fn(batch.table.data_ptr(), len(batch.params), _native.dtype_code(batch.dtype),
       _native.dtype_code(batch.state_dtype), _native.to_cpp(_cuda, hyper),
       _scalar_address(grad_scale, device, "grad_scale"),
       _scalar_address(found_inf, device, "found_inf"),
       _scalar_address(lr, device, "lr"),
       device.index, torch.cuda.current_stream(device).cuda_stream,
       _workspace(batch, device))


def adam_step(batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None:
    """One Adam/AdamW step over all of the batch's tensors in one kernel launch (hyper.py)."""
    _call(_cuda.adam_step, batch, hyper, grad_scale, found_inf)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None:
    """One SGD/SGDW step over all of the batch's tensors in one kernel launch (hyper.py)."""
    _call(_cuda.sgd_step, batch, hyper, grad_scale, found_inf)
