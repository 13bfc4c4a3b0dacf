"""fused_adamw: fused decoupled-weight-decay optimizers for PyTorch."""
