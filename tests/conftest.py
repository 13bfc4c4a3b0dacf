"""Shared pytest wiring.

* Tests marked `gpu` are skipped where torch sees no CUDA device.
* The backend suite (test_backend_suite.py) parametrizes its own tests over
  the backends, through its `backend` fixture; the tolerances every test
  compares with are in tolerances.py.
* Without a GPU, Triton kernels run under its interpreter on CPU tensors.
  Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here,
  before any test module imports fused_adamw.triton_kernels. With a GPU the
  kernels compile and the Triton suite runs on CUDA tensors.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
