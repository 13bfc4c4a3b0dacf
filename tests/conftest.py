"""Shared pytest wiring.

* Tests marked `gpu` are skipped where torch sees no CUDA device.
* backend_suite.py holds the backend-independent tests; a module that does
  `from backend_suite import *` sets BACKEND, DEVICE and SIZES, and the `size`
  parameter is drawn from its SIZES here (the Triton interpreter gets small
  sizes, the compiled backends the full list).
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


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        sizes = getattr(metafunc.module, "SIZES", (1, 7, 4097))
        metafunc.parametrize("size", sizes, ids=[f"n{s}" for s in sizes])
