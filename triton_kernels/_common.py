"""Pieces shared by the Triton Adam and SGD launchers (adam.py, sgd.py).

  * device checks and launch sizes (compiled on CUDA, or the Triton
    interpreter on CPU tensors when TRITON_INTERPRET=1 was set before triton
    was imported);
  * the device guard every launch runs under (the params' device, not the
    current one);
  * the device copy of a batch's address table (built by the plan,
    python/fused_adamw/plan.py; one int64 row of element count and addresses
    per tensor, plus a column of this backend's own: whether the tensor takes
    the 16-byte vector path) and its chunk table (a row is (tensor row, first
    element)), kept in the batch's resources across steps and uploaded from
    pinned host buffers (Staging), so that an upload neither syncs the host
    nor breaks a CUDA graph capture;
  * small @triton.jit helpers that the kernels call to mirror
    csrc/include/fused_adamw/update.h exactly: IEEE-rounded sqrt and division
    (Triton's plain fp32 `/` and tl.sqrt are approximate on NVIDIA GPUs, the
    C++ build uses no fast math), round-to-nearest-even stores of bfloat16, and
    float64 scalars;
  * the precision modes of issue 12 (csrc/include/fused_adamw/rounding.h is
    the C++ side, python/fused_adamw/reference.py the definition): the
    Philox-4x32-10 words of an element (tl.philox with uint32 counters),
    stochastic rounding to bfloat16 and float16, and the param stores of
    master weights and Kahan summation;
  * the tiny kernel that adds 1 to every step count after the update.

Nothing here is public; the launchers are fused_adamw.triton_kernels.adam_step
and sgd_step.
"""
from __future__ import annotations

import contextlib
import enum
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from fused_adamw.hyper import PRECISION_KAHAN, PRECISION_MASTER, PRECISION_NEAREST, PRECISION_STOCHASTIC

TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}

# Every address the kernel may treat as 16-byte aligned (vector loads).
_ALIGN_BYTES = 16


def interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class LaunchConfig:
    block: int      # elements per vector operation of one program
    chunk: int      # elements per program (a multiple of block)
    num_warps: int

    def options(self) -> dict:
        """Launch keywords. Multiply-add contraction is on, as in the CUDA
        backend (nvcc's default --fmad=true); saying so explicitly also keeps
        Triton >= 3.9 from warning that its default is about to change."""
        return {"num_warps": self.num_warps, "enable_fp_fusion": True}


# GPU: 1024-element blocks of 4 warps (8 fp32 per thread, two 16-byte
# vectors), 4 blocks per program so that 1M-element tensors still spread over
# 256 programs. The interpreter runs programs one after the other in Python:
# the same shape, smaller, keeps the tests' tensors spanning several chunks and
# exercising both the unmasked and the masked path.
_GPU = LaunchConfig(block=1024, chunk=4096, num_warps=4)
_INTERPRETER = LaunchConfig(block=1024, chunk=2048, num_warps=1)


def launch_config(device: torch.device) -> LaunchConfig:
    if device.type == "cuda" and not interpreted():
        return _GPU
    if device.type == "cpu" and interpreted():
        return _INTERPRETER
    raise ValueError(
        f"the triton backend got tensors on {device}: it runs on CUDA tensors, or on CPU tensors "
        "under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
    )


def check_scalar(name: str, t: Optional[torch.Tensor], device: torch.device) -> None:
    """lr_tensor / grad_scale / found_inf: one float32 element on the params' device."""
    if t is None:
        return
    if t.device != device or t.dtype != torch.float32 or t.numel() != 1:
        raise ValueError(
            f"{name} must be a 1-element float32 tensor on {device}, got {tuple(t.shape)} {t.dtype} on {t.device}"
        )


def device_guard(device: torch.device):
    """The context every launch of a batch runs in. Triton launches on the
    current CUDA device and its current stream, which need not be the params'
    (on a second GPU: an illegal address); on CPU tensors (the interpreter)
    there is nothing to switch."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capturing(device: torch.device) -> bool:
    """Whether work enqueued now goes into a CUDA graph under capture."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class Vector(enum.IntEnum):
    """Which tensors of a launch take the 16-byte vector path (the kernels'
    VECTOR constexpr). A tensor does when every address the update reads or
    writes through (param, grad, state; not the step count, read once per
    program) is a multiple of 16 bytes: the rule of the CUDA backend's
    kVectorAligned (csrc/cuda/multi_tensor.cu, plan_table)."""
    NONE = 0        # none does: scalar code only
    PER_TENSOR = 1  # some do: each program reads its tensor's flag and takes one of two paths
    ALL = 2         # all do: vector code only, no flag read


class CopyDone:
    """The completion marker of a copy between CPU tensors, which is done when
    copy_ returns (the interpreter). On CUDA: torch.cuda.Event."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return True


class Staging:
    """The host side of a batch's table uploads; one per batch.resources (the
    plan's (backend, device, dtype)).

    An upload fills a host buffer and enqueues one non_blocking copy to a new
    device tensor on the current stream. On CUDA the buffer is pinned: a copy
    from pageable memory would sync the host on every upload and is illegal
    while a CUDA graph is being captured. A buffer must outlive the copy that
    reads it:
      * eager: the buffer goes back to `ring` with an event recorded after the
        copy, and is refilled only once that event has completed (a new buffer
        is allocated meanwhile; completed ones beyond SPARE are dropped);
      * under capture the copy becomes a graph node that every replay runs
        again, reading the buffer as it is then: the buffer stays in `kept` for
        as long as the plan keeps its resources, never refilled, never queried
        (event queries are illegal during a capture).
    On CPU tensors (the interpreter) the buffers are plain memory and each
    copy is complete when copy_ returns."""

    SPARE = 2

    def __init__(self, device: torch.device) -> None:
        self.pinned = device.type == "cuda"
        self.event = torch.cuda.Event if self.pinned else CopyDone
        self.ring: list = []   # (buffer, event after the copy that reads it), oldest first
        self.kept: list = []   # whatever a captured graph reads on replay

    def upload(self, shape: tuple, fill, device: torch.device, captured: bool) -> torch.Tensor:
        """A new int64 tensor of `shape` on `device`, holding what fill(buffer)
        wrote into a host buffer of that shape."""
        buf = self._new(shape) if captured else self._reuse(shape)
        fill(buf)
        out = torch.empty(shape, dtype=torch.int64, device=device)
        out.copy_(buf, non_blocking=True)
        if captured:
            self.kept.append(buf)
        else:
            done = self.event()
            done.record()
            self.ring.append((buf, done))
            self._trim()
        return out

    def _new(self, shape: tuple) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int64, pin_memory=self.pinned)

    def _reuse(self, shape: tuple) -> torch.Tensor:
        for i, (buf, done) in enumerate(self.ring):
            if buf.shape == shape and done.query():
                del self.ring[i]
                return buf
        return self._new(shape)

    def _trim(self) -> None:
        completed = [id(slot) for slot in self.ring if slot[1].query()]
        drop = set(completed[:-self.SPARE])
        if drop:
            self.ring = [slot for slot in self.ring if id(slot) not in drop]


@dataclass
class Tables:
    """The device tables of one batch at one table version.

    table: int64 [n, ncols] on the params' device: the batch's host table
    (plan.Batch.table, _native.py's columns) plus one last column of this
    backend's own, 1 where the row's tensor takes the vector path (Vector);
    chunks: int64 [n_chunks, 2] of (row, first element); vector: the launch's
    Vector mode. Never written after the upload that made them, so a CUDA
    graph captured with them reads the same addresses on every replay, while
    eager steps move on to new versions."""
    key: tuple      # (id(batch), chunk size)
    version: int    # batch.version the table holds
    table: torch.Tensor
    chunks: torch.Tensor
    vector: int

    @property
    def ncols(self) -> int:
        return self.table.shape[1]


def _chunk_table(numels: list[int], chunk: int) -> torch.Tensor:
    n = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (n + chunk - 1) // chunk
    rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(rows.numel(), dtype=torch.int64) - first[rows]) * chunk
    return torch.stack([rows, starts], dim=1)


def vector_rows(host: np.ndarray, address_cols: Sequence[int]) -> tuple[np.ndarray, Vector]:
    """Per row of a host table, whether its tensor takes the vector path (every
    address in address_cols a multiple of 16 bytes; empty tensors, which read
    nothing, count as aligned), and the launch's Vector mode, decided by the
    rows with elements. NumPy: a few microseconds, where torch's small CPU ops
    cost tens (hundreds on a busy machine)."""
    aligned = (host[:, list(address_cols)] % _ALIGN_BYTES == 0).all(axis=1)
    live = host[:, 0] > 0   # column 0: numel, in every table
    aligned |= ~live
    n_live, n_aligned = int(live.sum()), int((aligned & live).sum())
    mode = Vector.ALL if n_aligned == n_live else Vector.NONE if n_aligned == 0 else Vector.PER_TENSOR
    return aligned, mode


def tables(batch, config: LaunchConfig, address_cols: Sequence[int]) -> Tables:
    """The device tables of `batch` (plan.Batch) at its current table version.

    Kept in batch.resources while the batch and its version stay: a new
    version (a grad or param moved) costs one upload of the address table
    into a new device tensor, a new batch (the plan rebuilt) also one of the
    chunk table (Staging). Call under device_guard(batch.device).

    During a CUDA graph capture: the cached tables when they are current
    (then the captured step holds the update kernels only), kept for the
    graph; otherwise tables uploaded by the graph itself, which hold nothing
    until it replays and so are never cached for eager steps."""
    device = batch.device
    captured = _capturing(device)
    key = (id(batch), config.chunk)
    resources = batch.resources
    entry = resources.get("triton_tables")
    if entry is not None and entry.key == key and entry.version == batch.version:
        if captured and not any(k is entry for k in resources["triton_staging"].kept):
            resources["triton_staging"].kept.append(entry)
        return entry
    staging = resources.get("triton_staging")
    if staging is None:
        staging = resources["triton_staging"] = Staging(device)
    host = batch.table.numpy()
    n, ncols = host.shape
    if entry is not None and entry.key == key:
        chunks = entry.chunks   # same tensors, same sizes: only addresses moved
    else:
        rows = _chunk_table(host[:, 0].tolist(), config.chunk)
        chunks = staging.upload(tuple(rows.shape), lambda buf: buf.copy_(rows), device, captured)
    aligned, mode = vector_rows(host, address_cols)

    def fill(buf: torch.Tensor) -> None:
        out = buf.numpy()
        out[:, :ncols] = host
        out[:, ncols] = aligned

    table = staging.upload((n, ncols + 1), fill, device, captured)
    new = Tables(key=key, version=batch.version, table=table, chunks=chunks, vector=int(mode))
    if captured:
        staging.kept.append(new)
        return new
    resources["triton_tables"] = new
    # The batch itself is held, so that its id cannot be reused while cached.
    resources["triton_batch"] = batch
    return new


# ------------------------------------------------------------------ kernels

def device_helper(fn):
    """@triton.jit for a function that kernels call. Under the interpreter it
    stays a plain Python function: the interpreter re-patches triton.language
    on every call of a jit function, which was half the run time of
    tests/test_triton_kernels.py, and a plain call runs the same code."""
    return fn if interpreted() else triton.jit(fn)


@device_helper
def _f64(x):
    """A float64 scalar from a kernel argument annotated tl.float64. Compiled,
    the argument already is one; the interpreter hands over the Python float,
    which Triton's literal rules would otherwise round to float32."""
    return tl.full([], x, tl.float64)


@device_helper
def _sqrt(x, FP64: tl.constexpr):
    # tl.sqrt on fp32 is the approximate PTX sqrt; sqrt_rn is IEEE, as in C++.
    if FP64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@device_helper
def _div(a, b, FP64: tl.constexpr):
    # Triton's fp32 `/` is div.full (2 ulp); div_rn is IEEE, as in C++.
    if FP64:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@device_helper
def _store_as(x, DTYPE: tl.constexpr):
    """x (the math type) converted to the storage type DTYPE, rounded to
    nearest even. bfloat16 is rounded here by hand: the interpreter's own
    float32 -> bfloat16 cast truncates, and one rule in both modes keeps the
    CPU-run tests meaningful for the GPU (whose cvt.rn gives the same bits)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        high = bits >> 16
        rounded = (bits + (0x7FFF + (high & 1))) >> 16
        # NaN stays NaN (quiet, sign kept); rounding its bits could make inf.
        y = tl.where(x == x, rounded, high | 0x40).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@device_helper
def _load(ptr, offs, mask, MATH: tl.constexpr, MASKED: tl.constexpr):
    """ptr[offs] in the math type; MASKED: only where mask (full blocks skip
    the mask so that the loads can be vectorised)."""
    if MASKED:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(MATH)


@device_helper
def _store(ptr, offs, x, mask, MASKED: tl.constexpr):
    y = _store_as(x, ptr.dtype.element_ty)
    if MASKED:
        tl.store(ptr + offs, y, mask=mask)
    else:
        tl.store(ptr + offs, y)


# ------------------------------------------------------------------ precision modes (issue 12)

# hyper.py's PRECISION_* values as compile-time constants of the kernels.
P_NEAREST = tl.constexpr(PRECISION_NEAREST)
P_MASTER = tl.constexpr(PRECISION_MASTER)
P_STOCHASTIC = tl.constexpr(PRECISION_STOCHASTIC)
P_KAHAN = tl.constexpr(PRECISION_KAHAN)
PRECISIONS = (PRECISION_NEAREST, PRECISION_MASTER, PRECISION_STOCHASTIC, PRECISION_KAHAN)


def check_precision(batch, precision: int, seed: int) -> None:
    """What the kernels rely on for hyper.precision (the optimizer checks the
    user's options; this catches a launcher called with a batch that does not
    fit them): a known mode, 16-bit params for modes 1-3, the aux tensors
    of modes 1 and 3 in the dtype each mode stores (checked once per batch
    version), a seed that fits the generator's key."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == PRECISION_NEAREST:
        return
    if batch.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"precision={precision} needs float16 or bfloat16 params, got {batch.dtype}")
    if precision == PRECISION_STOCHASTIC and not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if precision in (PRECISION_MASTER, PRECISION_KAHAN):
        # The batch is held by resources["triton_batch"] (tables()), so its
        # id is not reused while this key can match.
        key = (id(batch), batch.version, precision)
        if batch.resources.get("triton_aux_checked") == key:
            return
        want = torch.float32 if precision == PRECISION_MASTER else batch.dtype
        what = "float32 master copies" if precision == PRECISION_MASTER else f"{want} Kahan compensations"
        if batch.aux is None or any(a.dtype != want for a in batch.aux):
            got = None if batch.aux is None else sorted({str(a.dtype) for a in batch.aux})
            raise ValueError(f"precision={precision} needs batch.aux: {what}, got {got}")
        batch.resources["triton_aux_checked"] = key


@device_helper
def _element_words(seed, offs, index, step):
    """The four Philox-4x32-10 words of elements `offs` of a tensor
    (reference.random_bits): key (seed lo, seed hi), counter (e lo, e hi,
    tensor index, step). The counters must be uint32: tl.philox switches to
    Philox-4x64 for 64-bit ones. index, step: uint32 scalars."""
    lo = offs.to(tl.uint32)
    hi = (offs >> 32).to(tl.uint32)
    zero = tl.zeros_like(lo)
    return tl.philox(seed, lo, hi, zero + index, zero + step)


@device_helper
def _stochastic_bf16(x, word):
    """float32 x to bfloat16, stochastically (reference.stochastic_round_bf16):
    add the low 16 bits of word to the float32 pattern and truncate; a carry
    rounds |x| up with probability (dropped bits) / 2**16. NaN -> 0x7fc0 (its
    payload could carry into an infinity)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + (word & 0xFFFF)) >> 16
    y = tl.where(x == x, rounded, 0x7FC0)
    return y.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@device_helper
def _stochastic_fp16(x, word):
    """float32 x to float16, stochastically (reference.stochastic_round_fp16):
    with a = |x|, lo = a truncated to float16's grid, ulp the float16 spacing
    there and f16 the top 16 bits of (a - lo) / ulp, |x| becomes lo + ulp when
    f16 + (word & 0xffff) >= 2**16, else lo. Exact float32 arithmetic only:
      * a >= 2**-14 (normal float16): float32 keeps 13 bits below float16's
        10, so lo is a with them cleared, f16 those bits shifted up by 3, ulp
        2**(exponent - 10); at or above 65536 (lo + ulp above 65504, or a
        itself) the result is inf, as the reference's rule;
      * below (float16 subnormals, spacing 2**-24): s = a * 2**24 (exact),
        lo = floor(s) * 2**-24, f16 = floor((s - floor(s)) * 2**16); other
        lanes compute this branch on 0, so that nothing overflows.
    The sign is put back on the magnitude; inf stays inf (no bits dropped),
    NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    mag = tl.where(nan, 0, bits & 0x7FFFFFFF)  # NaN lanes compute on 0 (their result is x)
    a = mag.to(tl.float32, bitcast=True)
    small = a < 6.103515625e-05  # 2**-14
    lo_n = (mag & 0xFFFFE000).to(tl.float32, bitcast=True)
    ulp_n = ((mag & 0x7F800000) - (10 << 23)).to(tl.float32, bitcast=True)
    f16_n = (mag & 0x1FFF) << 3
    s = tl.where(small, a, 0.0) * 16777216.0  # 2**24
    whole = tl.floor(s)
    f16_s = ((s - whole) * 65536.0).to(tl.uint32)
    lo_s = whole * 5.9604644775390625e-08  # 2**-24
    lo = tl.where(small, lo_s, lo_n)
    ulp = tl.where(small, 5.9604644775390625e-08, ulp_n)
    f16 = tl.where(small, f16_s, f16_n)
    up = f16 + (word & 0xFFFF) >= 65536
    rounded = lo + tl.where(up, ulp, 0.0)
    out = tl.where(rounded >= 65536.0, 0x7F800000, rounded.to(tl.uint32, bitcast=True))
    y = (out | sign).to(tl.float32, bitcast=True)
    return tl.where(nan, x, y).to(tl.float16)


@device_helper
def _round_as(x, word, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """x (the math type) in the storage type DTYPE: stochastically with the
    low 16 bits of word where STOCHASTIC and DTYPE is a 16-bit type, else
    rounded to nearest even (_store_as)."""
    if STOCHASTIC:
        if DTYPE == tl.bfloat16:
            y = _stochastic_bf16(x, word)
        elif DTYPE == tl.float16:
            y = _stochastic_fp16(x, word)
        else:
            y = _store_as(x, DTYPE)
    else:
        y = _store_as(x, DTYPE)
    return y


@device_helper
def _store_rounded(ptr, offs, x, word, mask, MASKED: tl.constexpr, STOCHASTIC: tl.constexpr):
    """_store, stochastically rounded where STOCHASTIC (state stores)."""
    y = _round_as(x, word, ptr.dtype.element_ty, STOCHASTIC)
    if MASKED:
        tl.store(ptr + offs, y, mask=mask)
    else:
        tl.store(ptr + offs, y)


@device_helper
def _store_param(p_ptr, aux_ptr, offs, x, old, word, mask, MATH: tl.constexpr, MASKED: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The param store of each precision mode; x: the updated value, old: the
    param as loaded (both the math type; old is read by Kahan only).
      nearest:    param = RN(x)
      master:     aux (float32) = x, param = RN(x)
      stochastic: param = SR(x) with word (w0)
      Kahan:      with c the compensation in aux (param dtype),
                  u = c + (x - old); param = RN(old + u); aux = RN(u - (param - old))
                  (Kahan, CACM 8(1), 1965; optimi's update), all in float32."""
    if PRECISION == P_MASTER:
        _store(aux_ptr, offs, x, mask, MASKED)
        _store(p_ptr, offs, x, mask, MASKED)
    elif PRECISION == P_STOCHASTIC:
        _store_rounded(p_ptr, offs, x, word, mask, MASKED, True)
    elif PRECISION == P_KAHAN:
        u = _load(aux_ptr, offs, mask, MATH, MASKED) + (x - old)
        new = _store_as(old + u, p_ptr.dtype.element_ty)
        comp = u - (new.to(MATH) - old)
        if MASKED:
            tl.store(p_ptr + offs, new, mask=mask)
        else:
            tl.store(p_ptr + offs, new)
        _store(aux_ptr, offs, comp, mask, MASKED)
    else:
        _store(p_ptr, offs, x, mask, MASKED)


# n_rows is not specialised: one compiled kernel for any tensor count.
@triton.jit(do_not_specialize=["n_rows"])
def _bump_steps_kernel(table, n_rows, found_inf_ptr, NCOLS: tl.constexpr, STEP_COL: tl.constexpr,
                       HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """steps[i] += 1 for every row, unless found_inf. Runs after the update
    kernel, in stream order, so that every program of the update read the
    step value from before the increment."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if HAS_FOUND_INF:
        n_rows = tl.where(tl.load(found_inf_ptr) == 0, n_rows, 0)
    live = rows < n_rows
    addr = tl.load(table + rows * NCOLS + STEP_COL, mask=live, other=0)
    step_ptrs = addr.to(tl.pointer_type(tl.float32))
    s = tl.load(step_ptrs, mask=live, other=0.0)
    tl.store(step_ptrs, s + 1.0, mask=live)


_BUMP_BLOCK = 256


def bump_steps(t: Tables, n_rows: int, found_inf: Optional[torch.Tensor], step_col: int) -> None:
    grid = (triton.cdiv(n_rows, _BUMP_BLOCK),)
    _bump_steps_kernel[grid](
        t.table, n_rows, found_inf if found_inf is not None else t.table,
        NCOLS=t.ncols, STEP_COL=step_col, HAS_FOUND_INF=found_inf is not None, BLOCK=_BUMP_BLOCK,
        num_warps=4, enable_fp_fusion=True,
    )
