"""fused_adamw: fused decoupled-weight-decay optimizers for PyTorch.

    from fused_adamw import AdamW
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)   # drop-in for torch.optim.AdamW

Classes: AdamW, Adam, SGDW, SGD (torch's keywords, plus decay_scaling,
decay_base_lr, state_dtype and backend). Backends: "cuda", "triton", "cpu", "torch"; see
available_backends(device). The float64 oracle is fused_adamw.reference.
"""
from .dispatch import BackendUnavailableError, available_backends, backend_errors
from .optim import SGD, SGDW, Adam, AdamW, CapturableDeviceError, DecayScheduleWarning
from .param_groups import normalized_weight_decay, weight_decay_groups

__version__ = "0.1.0"
__all__ = ["AdamW", "Adam", "SGDW", "SGD", "available_backends", "backend_errors", "BackendUnavailableError",
           "DecayScheduleWarning", "CapturableDeviceError",
           "weight_decay_groups", "normalized_weight_decay"]
