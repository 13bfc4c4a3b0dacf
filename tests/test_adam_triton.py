"""The backend suite on the Triton backend.

Without a GPU (CI) it runs on CPU tensors under the Triton interpreter (set up
in conftest.py), with small sizes since the interpreter is slow; with a GPU
the kernels compile and the suite runs on CUDA tensors at full sizes.
"""
import pytest
import torch

pytest.importorskip("triton")

from backend_suite import *  # noqa: E402,F401,F403  (the shared tests and fixtures)

BACKEND = "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 7, 4097, 2**20 + 3) if torch.cuda.is_available() else (1, 7, 4097)
