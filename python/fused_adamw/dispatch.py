"""The backends: which exist, which can serve a device, and loading them.

Backends are sibling modules with one contract (hyper.py): backend_cpu,
backend_cuda, fused_adamw.triton_kernels, backend_torch, and the internal
functional route (backend_functional, torch.optim's own code for what no
kernel serves; plan.py picks it per tensor, users cannot ask for it).

"auto" resolves to cuda, else triton, on CUDA tensors; cpu on CPU tensors;
torch on any other device (meta, mps, xpu ...). Backends import lazily; one
that failed to import is not an error until it is asked for, and then its
stored import error is raised with the reason.

Both GPU backends also run on CPU tensors for tests, when asked for by name
("auto" on CPU tensors stays cpu): triton under TRITON_INTERPRET=1, cuda under
FUSED_ADAMW_CUDA_EMULATION=1 (the emulated module fused_adamw._cuda_emu, see
backend_cuda.py). Both variables are read at each resolution.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
_MODULES = {
    "cpu": "fused_adamw.backend_cpu",
    "cuda": "fused_adamw.backend_cuda",
    "triton": "fused_adamw.triton_kernels",
    "torch": "fused_adamw.backend_torch",
    "functional": "fused_adamw.backend_functional",
}

_loaded: dict[str, Any] = {}
_errors: dict[str, BaseException] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that could not be imported or cannot run here."""


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _errors:
        return None
    try:
        module = importlib.import_module(_MODULES[name])
    except Exception as exc:  # an optional backend: keep the reason for later
        _errors[name] = exc
        return None
    _loaded[name] = module
    return module


def backend_module(name: str):
    """The module of backend `name`, or BackendUnavailableError with the reason."""
    module = _load(name)
    if module is None:
        err = _errors[name]
        hint = {
            "cpu": "the C++ extension fused_adamw._cpu was not built or failed to load; reinstall with `pip install .` and read the build log",
            "cuda": "fused_adamw._cuda is built only where nvcc is found at install time (FUSED_ADAMW_CUDA=ON to insist)",
            "triton": "install triton (`pip install triton`)",
            "torch": "",
            "functional": "",
        }[name]
        raise BackendUnavailableError(
            f"backend={name!r} is not available: {type(err).__name__}: {err}. {hint}"
        ) from err
    return module


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_emulated() -> bool:
    """FUSED_ADAMW_CUDA_EMULATION is set (to anything but "" or "0"): backend
    "cuda" serves CPU tensors through fused_adamw._cuda_emu (backend_cuda.py)."""
    return os.environ.get("FUSED_ADAMW_CUDA_EMULATION", "0") not in ("", "0")


def _cuda_native_error(device: torch.device):
    """Why backend cuda cannot serve `device` (its native module is missing),
    or None when it can. Loads the backend."""
    module = _load("cuda")
    if module is None:
        return _errors["cuda"]
    try:
        module.native_module(device)
    except (ImportError, ValueError) as exc:
        return exc
    return None


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can update parameters on `device`, best first."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if _cuda_native_error(device) is None:
            names.append("cuda")
        if _load("triton") is not None:
            names.append("triton")
    elif device.type == "cpu":
        if _load("cpu") is not None:
            names.append("cpu")
        if _triton_interpreted() and _load("triton") is not None:
            names.append("triton")
        if cuda_emulated() and _cuda_native_error(device) is None:
            names.append("cuda")
    names.append("torch")
    return names


def backend_errors() -> dict[str, str]:
    """Why each backend that failed to import did so (after a first use)."""
    for name in BACKENDS[1:]:
        _load(name)
    return {name: f"{type(e).__name__}: {e}" for name, e in _errors.items()}


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that serves `device` for the requested name."""
    if requested == "auto":
        if device.type == "cuda":
            if _cuda_native_error(device) is None:
                return "cuda"
            if _load("triton") is not None:
                return "triton"
            return "torch"
        if device.type == "cpu":
            backend_module("cpu")  # raises with the reason if the build is broken
            return "cpu"
        return "torch"
    if requested == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' cannot update parameters on {device}; use backend='auto'")
    if requested == "cuda":
        if device.type != "cuda" and not (device.type == "cpu" and cuda_emulated()):
            raise ValueError(f"backend='cuda' cannot update parameters on {device}; use backend='auto' "
                             "(CPU tensors run the CUDA kernels only emulated: FUSED_ADAMW_CUDA_EMULATION=1)")
        backend_module("cuda")
        err = _cuda_native_error(device)
        if err is not None:
            raise BackendUnavailableError(
                f"backend='cuda' is not available on {device}: {type(err).__name__}: {err}. "
                + ("fused_adamw._cuda_emu is built wherever CUDA's headers are found at install time"
                   if device.type == "cpu" else
                   "fused_adamw._cuda is built only where nvcc is found at install time (FUSED_ADAMW_CUDA=ON to insist)")
            ) from err
        return requested
    if requested == "triton" and device.type != "cuda":
        if not (device.type == "cpu" and _triton_interpreted()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {device}); CPU tensors work only "
                "under the Triton interpreter (TRITON_INTERPRET=1)"
            )
    backend_module(requested)
    return requested
