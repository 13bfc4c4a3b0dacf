"""Philox-4x32-10 and stochastic rounding in torch integer ops (the `torch` backend's, issue 12).

The generator and the rounding rules of fused_adamw.reference (``philox4x32``,
``random_bits``, ``stochastic_round_bf16``, ``stochastic_round_fp16``), written
with torch ops so that they run on any device the `torch` backend serves and
give the same bits as the reference and the kernels. Philox-4x32-R is
Random123's philox4x32_R (Salmon, Moraes, Dror & Shaw, "Parallel random
numbers: as easy as 1, 2, 3", SC'11).

32-bit words are held in int64 tensors with values in [0, 2**32): torch has no
full uint32 arithmetic. Each 32x32 -> 64-bit product of a round is assembled
from the multiplier times the two 16-bit halves of the counter word, so no
intermediate leaves int64's range (a wrapped
signed int64 product would give the same low bits on the CPU, but signed
overflow is not something every device's kernels promise).

Element indices (``element_indices``): the generator's counter holds the index
e of an element in its tensor. For a contiguous tensor e is the row-major
index; for a dense but permuted tensor (non-overlapping and dense, strides a
permutation of a contiguous layout) e is the element's position in storage
(sum of index * stride), as the kernels, which walk storage, see it; for any
other strided tensor (a view with gaps) e is the row-major logical index
0 .. numel - 1.

Checked against the reference by tests/test_backend_suite.py through the
`torch` backend.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

# Random123's constants (reference.PHILOX_M4x32 / PHILOX_W32 / PHILOX_ROUNDS).
PHILOX_M4x32 = (0xD2511F53, 0xCD9E8D57)  # round multipliers M0, M1
PHILOX_W32 = (0x9E3779B9, 0xBB67AE85)    # Weyl key bumps
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF
_BF16_NAN = 0x7FC0            # the quiet NaN torch's float -> bfloat16 writes
_FP16_MAX = 65504.0
_FP16_MIN_NORMAL = 2.0 ** -14
_FP16_MIN_ULP = 2.0 ** -24

Word = Union[int, torch.Tensor]


def _mulhilo(m: int, c: Word) -> tuple[Word, Word]:
    """(hi, lo) 32-bit halves of the 64-bit product m * c, m and c in [0, 2**32).

    With c = ch * 2**16 + cl: a = m * cl and b = m * ch are below 2**48, and
    m * c = b * 2**16 + a; no intermediate reaches 2**50, so int64 never
    overflows."""
    a = m * (c & _MASK16)
    b = m * (c >> 16)
    low = a + ((b & _MASK16) << 16)              # < 2**49
    return (b >> 16) + (low >> 32), low & _MASK32


def philox4x32(counter: Sequence[Word], key: Sequence[int], rounds: int = PHILOX_ROUNDS
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-R: counter (c0, c1, c2, c3) and key (k0, k1) -> the 4 output words.

    Counter words are Python ints or int64 tensors (broadcasting) with values
    in [0, 2**32), at least one of them a tensor; key words are ints in
    [0, 2**32). Returns four int64 tensors of values in [0, 2**32), equal to
    reference.philox4x32's uint32 words. One round:
        hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2
        c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    with k0 += W0, k1 += W1 (mod 2**32) between rounds.
    """
    c0, c1, c2, c3 = counter
    if not any(isinstance(c, torch.Tensor) for c in (c0, c1, c2, c3)):
        raise TypeError("philox4x32 needs at least one counter word as a tensor")
    k0, k1 = (int(k) for k in key)
    for k in (k0, k1):
        if not 0 <= k <= _MASK32:
            raise ValueError(f"Philox key words must be in [0, 2**32), got {k}")
    m0, m1 = PHILOX_M4x32
    w0, w1 = PHILOX_W32
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + w0) & _MASK32, (k1 + w1) & _MASK32
        hi0, lo0 = _mulhilo(m0, c0)
        hi1, lo1 = _mulhilo(m1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    words = (c0, c1, c2, c3)
    shape = torch.broadcast_shapes(*(w.shape for w in words if isinstance(w, torch.Tensor)))
    like = next(w for w in words if isinstance(w, torch.Tensor))
    return tuple(w.expand(shape) if isinstance(w, torch.Tensor)
                 else torch.full(shape, w, dtype=torch.int64, device=like.device)
                 for w in words)


def random_bits(seed: int, step: int, tensor_index: int, elements: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The four random words of the given elements of one tensor at one step.

    elements: int64 tensor of element indices e (>= 0). key = (seed & 0xffffffff,
    seed >> 32); counter = (e & 0xffffffff, e >> 32, tensor_index, step), step
    the count after the increment: reference.random_bits's layout. Word 0 rounds
    the param, 1 exp_avg / momentum_buffer, 2 exp_avg_sq, 3 max_exp_avg_sq.
    Returns four int64 tensors shaped like elements."""
    seed, step, tensor_index = int(seed), int(step), int(tensor_index)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    for name, v in (("step", step), ("tensor_index", tensor_index)):
        if not 0 <= v <= _MASK32:
            raise ValueError(f"{name} must be in [0, 2**32), got {v}")
    if elements.dtype != torch.int64:
        raise TypeError(f"elements must be an int64 tensor, got {elements.dtype}")
    return philox4x32((elements & _MASK32, elements >> 32, tensor_index, step),
                      (seed & _MASK32, seed >> 32))


def storage_ordered(t: torch.Tensor) -> bool:
    """True when t is non-overlapping and dense but not contiguous: its elements
    fill numel consecutive storage slots in another order (a permuted layout)."""
    if t.is_contiguous():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def element_indices(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The generator's element index e of t's elements start .. end - 1 in
    row-major logical order (int64, on t's device).

    Storage position (sum of index * stride) for a dense tensor, which is the
    row-major index itself when t is contiguous; the row-major index for a
    strided view with gaps (see the module docstring)."""
    flat = torch.arange(start, end, dtype=torch.int64, device=t.device)
    if not storage_ordered(t):
        return flat
    e = torch.zeros_like(flat)
    rest = flat
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if size != 1:
            e += (rest % size) * stride
            rest = rest // size
    return e


def stochastic_round_bf16(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x (float32) to bfloat16 with random bits r (integers in [0, 2**16)).

    bits16 = (float32 bits + r) >> 16, NaN -> 0x7fc0: reference.stochastic_round_bf16.
    The add is done on the int32 view: for every non-NaN pattern (at most
    0x7f800000 or, negative, 0xff800000) adding r < 2**16 neither overflows
    int32 nor carries into the sign, and the arithmetic shift of a negative
    pattern leaves the bfloat16 pattern as an int16."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 takes float32 values, got {x.dtype}")
    nan = torch.isnan(x)
    u = torch.where(nan, 0, x.view(torch.int32))
    b = ((u + r.to(torch.int32)) >> 16).to(torch.int16)
    b = torch.where(nan, _BF16_NAN, b)
    return b.view(torch.bfloat16)


def stochastic_round_fp16(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x (float32) to float16 with random bits r (integers in [0, 2**16)).

    reference.stochastic_round_fp16: with a = |x|, lo = a truncated toward zero
    to a float16 value and ulp the float16 spacing there (2**-24 below the
    normal range), f16 = floor((a - lo) / ulp * 2**16) (exact in float32):
    lo + ulp when f16 + r >= 2**16, else lo, with x's sign; above 65504 the
    value above is inf (so is every a >= 65536); inf and NaN stay."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_fp16 takes float32 values, got {x.dtype}")
    a = x.abs()
    bits = a.view(torch.int32)
    normal = a >= _FP16_MIN_NORMAL
    # Normal float16: truncating float32's 13 extra significand bits; the spacing
    # has float32's exponent minus 10. Subnormal float16: multiples of 2**-24.
    lo_normal = (bits & ~0x1FFF).view(torch.float32)
    ulp_normal = ((bits & 0x7F800000) - (10 << 23)).clamp_min(1 << 23).view(torch.float32)
    lo = torch.where(normal, lo_normal, torch.floor(a * 2.0 ** 24) * _FP16_MIN_ULP)
    ulp = torch.where(normal, ulp_normal, torch.full_like(a, _FP16_MIN_ULP))
    f16 = torch.floor((a - lo) / ulp * 65536.0)
    up = f16 + r.to(torch.float32) >= 65536.0
    mag = torch.where(up, lo + ulp, lo)
    mag = torch.where((mag > _FP16_MAX) | (a >= 65536.0), float("inf"), mag)
    mag = torch.where(torch.isfinite(a), mag, a)    # inf stays inf, NaN stays NaN
    return torch.copysign(mag, x).to(torch.float16)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, r: torch.Tensor) -> torch.Tensor:
    """x (float32) stored in a 16-bit dtype with random bits r (the low 16 bits
    of the element's word)."""
    if dtype == torch.bfloat16:
        return stochastic_round_bf16(x, r)
    if dtype == torch.float16:
        return stochastic_round_fp16(x, r)
    raise ValueError(f"stochastic rounding is defined for bfloat16 and float16, got {dtype}")


def round_stochastically(param: torch.Tensor, targets: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                         seed: int, tensor_index: int, step: int,
                         chunk: Optional[int] = None) -> None:
    """Store float32 results in 16-bit tensors with stochastic rounding.

    targets: (dst, src, word) triples: dst a bfloat16/float16 tensor of
    param's shape (any strides), src its float32 values (any strides), word the
    Philox word (0..3) whose low 16 bits round it. Element indices e follow
    param's layout (element_indices); dst element (i, j, ...) uses the e of
    param element (i, j, ...). The words are made ``chunk`` elements at a time
    (default: _default_chunk) so that the generator's int64 temporaries (about
    a dozen per element) stay small beside the tensors."""
    n = param.numel()
    if n == 0 or not targets:
        return
    chunk = chunk or _default_chunk(param.device)
    srcs = [src.reshape(-1) for _, src, _ in targets]   # row-major logical order
    outs = [torch.empty(n, dtype=dst.dtype, device=dst.device) for dst, _, _ in targets]
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        words = random_bits(seed, step, tensor_index, element_indices(param, start, end))
        for (dst, _, word), src, out in zip(targets, srcs, outs):
            out[start:end] = stochastic_round(src[start:end], dst.dtype, words[word] & _MASK16)
    for (dst, _, _), out in zip(targets, outs):
        dst.copy_(out.view(dst.shape))


def _default_chunk(device: torch.device) -> int:
    """Elements per chunk of generator work. CPU: 2**15, below torch's
    parallel grain (32768), so each int64 op runs on one thread with its
    temporaries (256 KiB each) in cache; on this project's 2-core machine,
    under load, 2**20 elements took 0.35 s in 2**15 chunks and 4.3 s in 2**16
    chunks (every op an OpenMP fork). Other devices: 2**20, enough work per
    launch, ~100 MiB of temporaries."""
    return 1 << 15 if device.type == "cpu" else 1 << 20
