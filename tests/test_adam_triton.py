"""The backend suite on the Triton backend.

Without a GPU (CI) it runs on CPU tensors under the Triton interpreter (set up
in conftest.py), with small sizes since the interpreter is slow; with a GPU
the kernels compile and the suite runs on CUDA tensors at full sizes.
"""
import pytest
import torch

pytest.importorskip("triton")

from backend_suite import *  # noqa: E402,F401,F403  (the shared tests and fixtures)
from backend_suite import (ADAM_COMMON, ADAM_MODES, DTYPES, SGD_COMMON, SGD_MODES,  # noqa: E402
                           make_data, run_optimizer)

BACKEND = "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = (1, 7, 4097, 2**20 + 3) if torch.cuda.is_available() else (1, 7, 4097)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["adamw", "adam-l2-amsgrad-maximize", "sgd-nesterov-maximize", "sgdw-schedule"])
@pytest.mark.parametrize("dtype_id", ["fp32", "bf16-fp32state"])
def test_triton_equals_cuda_backend(mode, dtype_id):
    """Both GPU backends run the same fp32 math (update.h and its Triton
    mirror): their trajectories agree to rounding, tensor by tensor."""
    import fused_adamw as fa

    cls_name, kw = {**ADAM_MODES, **SGD_MODES}[mode]
    kw = dict(ADAM_COMMON if cls_name.startswith("Adam") else SGD_COMMON, **kw)
    dtype, state_dtype = DTYPES[dtype_id]
    init, grads = make_data(4097, seed=21)
    runs = {}
    for backend in ("triton", "cuda"):
        params, opt, _ = run_optimizer(getattr(fa, cls_name), dict(kw, backend=backend, state_dtype=state_dtype),
                                       init, grads, dtype, "cuda")
        runs[backend] = (params, opt)
    (tp, topt), (cp, copt) = runs["triton"], runs["cuda"]
    ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -20
    for a, b in zip(tp, cp):
        torch.testing.assert_close(a, b, rtol=4 * ulp, atol=4 * ulp)
        for key, val in topt.state[a].items():
            torch.testing.assert_close(val, copt.state[b][key], rtol=4 * ulp, atol=4 * ulp, msg=key)
