"""The `cuda` backend: the kernels of fused_adamw._cuda on CUDA tensors, or of
fused_adamw._cuda_emu on CPU tensors under FUSED_ADAMW_CUDA_EMULATION=1.

Meets the backend contract of hyper.py: adam_step / sgd_step take the tensor
lists of one (device, dtype) bucket and make one native call (Adam: a small
step kernel and the update kernel; SGD: the update kernel), whatever the
number of tensors (csrc/cuda/multi_tensor.cuh explains the chunk table, the
device-resident metadata and the step increment). The call runs on
torch.cuda.current_stream(device) and makes no host sync, so with
capturable=True (hyper.lr a tensor on the device) a step can be captured in a CUDA
graph.

Emulation: fused_adamw._cuda_emu is the same csrc/cuda sources compiled by
the host compiler over csrc/emulation/cuda_emulation.h. With
FUSED_ADAMW_CUDA_EMULATION=1 (read at each call, as dispatch.py reads it),
CPU tensors go through it with this same glue, table and workspace: device
index 0 of the emulated device, and the emulator's current stream
(_cuda_emu.set_current_stream, default 0) in place of torch's.

The plan (plan.py) owns the address table; this backend keeps a Workspace,
the device memory that holds the uploaded tables across steps, in the batch's
resources (one per plan, device and dtype).

Precision modes (issue 12): hyper.precision and hyper.seed travel in the
hyper struct; the batch's aux tensors (master copies or Kahan
compensations), tensor indices and, for SGD under stochastic rounding, its
float32 steps travel in the table's AUX / INDEX / STEP columns. The native
call checks them (precision 0..3, 1..3 only for float16/bfloat16 params,
the columns each mode reads) before any launch; mode 0 runs the same kernels
as before the modes existed.

Importing this module imports fused_adamw._cuda; where that fails (no nvcc
at build time) the import still succeeds when the emulated module is there,
and CUDA tensors then raise the stored error. Build with `pip install -e .`;
`_cuda.build_info()` / `_cuda_emu.build_info()` say what was built.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch

from . import _native, dispatch
from .hyper import AdamHyper, SgdHyper

__all__ = ["adam_step", "sgd_step", "native_module"]

_WORKSPACE_KEY = "cuda_workspace"

try:
    from . import _cuda
    _CUDA_ERROR: Optional[BaseException] = None
except ImportError as _exc:  # the emulated module may still serve CPU tensors
    _cuda = None
    _CUDA_ERROR = _exc
    try:
        importlib.import_module("fused_adamw._cuda_emu")
    except ImportError:
        raise _exc from None

_emulated_module = None


def native_module(device: torch.device):
    """The native module serving `device`: _cuda for CUDA tensors, _cuda_emu
    for CPU tensors under emulation. ImportError with the reason when it is
    missing, ValueError for any other device."""
    global _emulated_module
    if device.type == "cuda":
        if _cuda is None:
            raise ImportError(f"fused_adamw._cuda failed to import: {_CUDA_ERROR}")
        return _cuda
    if device.type == "cpu" and dispatch.cuda_emulated():
        if _emulated_module is None:
            _emulated_module = importlib.import_module("fused_adamw._cuda_emu")
        return _emulated_module
    raise ValueError(f"backend 'cuda' needs CUDA tensors, got params on {device} "
                     "(CPU tensors only under FUSED_ADAMW_CUDA_EMULATION=1)")


def _scalar_address(t: Optional[torch.Tensor], device: torch.device, what: str) -> int:
    """The address of a one-element float32 tensor on `device`, 0 for None."""
    if t is None:
        return 0
    if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(f"{what} must be a one-element float32 tensor on {device}, got {t.dtype} on {t.device} "
                         f"with {t.numel()} elements")
    return t.data_ptr()


def _workspace(batch, native, index: int):
    """The workspace of this (device, dtype): kept in the batch's resources,
    which the plan keeps across rebuilds (a change of the grad set does not
    free and re-make it)."""
    ws = batch.resources.get(_WORKSPACE_KEY)
    if ws is None or ws.device != index or not isinstance(ws, native.Workspace):
        ws = batch.resources[_WORKSPACE_KEY] = native.Workspace(index)
    return ws


def _target(batch):
    """(native module, device, device index, stream handle) of a batch."""
    device = batch.device
    native = native_module(device)
    if device.type == "cpu":  # emulated: one device, the emulator's stream
        return native, device, 0, native.current_stream()
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return native, device, device.index, torch.cuda.current_stream(device).cuda_stream


def _call(name, batch, hyper, grad_scale, found_inf) -> None:
    if not batch.params:
        return
    native, device, index, stream = _target(batch)
    lr = hyper.lr if isinstance(hyper.lr, torch.Tensor) else None
    getattr(native, name)(
        batch.table.data_ptr(), len(batch.params), _native.dtype_code(batch.dtype),
        _native.dtype_code(batch.state_dtype), _native.to_cpp(native, hyper),
        _scalar_address(grad_scale, device, "grad_scale"),
        _scalar_address(found_inf, device, "found_inf"),
        _scalar_address(lr, device, "lr"),
        index, stream, _workspace(batch, native, index))


def adam_step(batch, hyper: AdamHyper, *, grad_scale=None, found_inf=None) -> None:
    """One Adam/AdamW step over all of the batch's tensors (a step kernel and one update launch; hyper.py)."""
    _call("adam_step", batch, hyper, grad_scale, found_inf)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale=None, found_inf=None) -> None:
    """One SGD/SGDW step over all of the batch's tensors in one kernel launch (hyper.py)."""
    _call("sgd_step", batch, hyper, grad_scale, found_inf)
