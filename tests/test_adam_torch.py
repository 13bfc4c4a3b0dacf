"""The backend suite on the `torch` (foreach) backend, CPU tensors."""
from backend_suite import *  # noqa: F401,F403  (the shared tests and fixtures)

BACKEND = "torch"
DEVICE = "cpu"
SIZES = (1, 7, 4097)
