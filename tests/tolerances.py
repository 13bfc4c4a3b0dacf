"""The tolerances of the test suite: every rtol / atol a test compares with is here.

One table per kind of comparison, keyed by dtype (STYLE.md, "Tests"), and a
few named special cases with the reason they differ. A test picks the kind
that describes what it compares; it writes no number of its own. An entry is
a Tol(rtol, atol): it unpacks as a pair (`rtol, atol = STEP[dtype]`) and gives
keywords through `.kw` (`np.testing.assert_allclose(a, b, **tol.kw)`).

Kinds, from tightest to loosest:

  SAME_MATH   one formula evaluated twice in one dtype: another order of
              operations (torch's lerp against a multiply-add), another load
              path of one kernel, grads scaled by a power of two and divided
              back, an lr given as a float32 tensor instead of a float;
  STEP        one step from identical inputs against the float64 oracle
              (fused_adamw.reference), by storage dtype: the kernels compute in
              float32 (float64 for float64 tensors), then round once to storage;
  TRAJECTORY  float32 / float64 runs of many steps (up to 20; the float64
              reference pinned to torch.optim over 50) against the float64
              oracle or against torch.optim in the same dtype, where rounding
              differences accumulate; atol is per unit of the largest |value|
              where the caller scales it (backend suite);
  16-bit      no fixed tolerance over many steps: flash-attention's rule, our
              max error against the float64 oracle is at most
              TORCH_ERROR_FACTOR times torch's in the same dtype, with a floor
              of one rounding unit (ULP) of the largest value; where torch has
              no twin, HALF_ULPS_PER_STEP rounding units per step.

Nothing to run: the tests import it (`from tolerances import STEP`; pytest's
default import mode puts tests/ on sys.path).
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class Tol(NamedTuple):
    """np.testing / torch.testing semantics: |ours - want| <= atol + rtol * |want|."""

    rtol: float
    atol: float

    @property
    def kw(self) -> dict:
        return {"rtol": self.rtol, "atol": self.atol}


# One unit in the last place relative to 1 (torch.finfo(dtype).eps):
# 2**-52, 2**-23, 2**-7 and 2**-10. Round-to-nearest storage is within half of
# it relative to the stored value.
ULP = {dtype: torch.finfo(dtype).eps for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)}

SAME_MATH = {
    # torch.optim against the reference, 50 steps; two transcriptions of a
    # formula (sqrt(v_hat) against sqrt(v) / sqrt(bc2)); float64 optimizers
    # against torch.optim and the paper's algorithms over a dozen steps.
    torch.float64: Tol(1e-12, 1e-14),
    # Vector and scalar loads of one kernel; grads scaled by 1024 and divided
    # back; lr as a float32 tensor: a few roundings of the last steps.
    torch.float32: Tol(1e-6, 1e-7),
    # The same, stored in bfloat16: one rounding unit.
    torch.bfloat16: Tol(ULP[torch.bfloat16], 1e-6),
}

# float32 math against float64, over one step from the same inputs. 16-bit:
# half a unit of the stored result plus the float32 math, so a truncating
# conversion (an error of up to one unit) already fails.
_FP32_MATH = 2e-6
STEP = {
    torch.float64: Tol(1e-12, 1e-14),
    torch.float32: Tol(_FP32_MATH, 1e-6),
    torch.bfloat16: Tol(0.5 * ULP[torch.bfloat16] + _FP32_MATH, 1e-6),
    torch.float16: Tol(0.5 * ULP[torch.float16] + _FP32_MATH, 1e-6),
}

TRAJECTORY = {
    torch.float64: Tol(1e-10, 1e-12),
    torch.float32: Tol(2e-5, 2e-6),
}

# The 16-bit rule (see the module docstring).
TORCH_ERROR_FACTOR = 2.0
HALF_ULPS_PER_STEP = 0.5

# ---------------------------------------------------------------- special cases

# Triton against the CUDA backend on one GPU, 20 steps: the same float32 math
# compiled by two compilers, which contract multiply-adds differently; the
# differences grow step by step. 32 float32 units, 4 bfloat16 units.
GPU_BACKENDS = {
    torch.float32: Tol(32 * ULP[torch.float32], 32 * ULP[torch.float32]),
    torch.bfloat16: Tol(4 * ULP[torch.bfloat16], 4 * ULP[torch.bfloat16]),
}

# The difference of two float64 trajectories of order 1 against its closed
# form (test_reference.py, Algorithm 1 where the lr changes): the difference is
# ~1e-3, so it keeps ~1e-13 of relative precision after cancellation.
TRAJECTORY_DIFFERENCE = Tol(1e-9, 1e-15)

# Not a tolerance but its mirror: a relative gap between two float64
# trajectories "well above rounding" (many orders of magnitude over
# SAME_MATH), for tests asserting that two rules really differ.
REAL_GAP = 1e-6
