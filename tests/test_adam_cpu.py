"""The backend suite on the C++ CPU backend (fused_adamw._cpu)."""
from backend_suite import *  # noqa: F401,F403  (the shared tests and fixtures)

BACKEND = "cpu"
DEVICE = "cpu"
SIZES = (1, 7, 4097, 2**20 + 3)
