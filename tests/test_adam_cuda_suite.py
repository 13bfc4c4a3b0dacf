"""The backend suite on the CUDA backend (fused_adamw._cuda); GPU only."""
import pytest

from backend_suite import *  # noqa: F401,F403  (the shared tests and fixtures)

pytestmark = pytest.mark.gpu

BACKEND = "cuda"
DEVICE = "cuda"
SIZES = (1, 7, 4097, 2**20 + 3)
