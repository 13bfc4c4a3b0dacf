"""Pieces shared by the Triton Adam and SGD launchers (adam.py, sgd.py).

  * device checks and launch sizes (compiled on CUDA, or the Triton
    interpreter on CPU tensors when TRITON_INTERPRET=1 was set before triton
    was imported);
  * the device copy of a batch's address table (built by the plan,
    python/fused_adamw/plan.py) and its chunk table, kept in the batch's
    resources across steps (one int64 row of element count and addresses
    per tensor; a chunk row is (tensor row, first element));
  * small @triton.jit helpers that the kernels call to mirror
    csrc/include/fused_adamw/update.h exactly: IEEE-rounded sqrt and division
    (Triton's plain fp32 `/` and tl.sqrt are approximate on NVIDIA GPUs, the
    C++ build uses no fast math), round-to-nearest-even stores of bfloat16, and
    float64 scalars;
  * the tiny kernel that adds 1 to every step count after the update.

Nothing here is public; the launchers are fused_adamw.triton_kernels.adam_step
and sgd_step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

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


@dataclass
class Tables:
    """The device copies of one batch's address table, and its chunk table.

    table: int64 [n, ncols] on the params' device (the batch's own host table
    on CPU); chunks: int64 [n_chunks, 2] of (row, first element); aligned:
    every address column is a multiple of 16 bytes (vector loads)."""
    key: tuple
    table: torch.Tensor
    chunks: torch.Tensor
    aligned: bool


def _chunk_table(numels: list[int], chunk: int, device: torch.device) -> torch.Tensor:
    n = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (n + chunk - 1) // chunk
    rows = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), per_tensor)
    first = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(rows.numel(), dtype=torch.int64) - first[rows]) * chunk
    return torch.stack([rows, starts], dim=1).contiguous().to(device)


def tables(batch, config: LaunchConfig, address_cols: Sequence[int]) -> Tables:
    """The tables of `batch` (plan.Batch), derived from its host table and
    kept in batch.resources while the batch and its table version stay the
    same: a new version (a grad or param moved) costs one host-to-device copy;
    a new batch (the plan rebuilt) also a new chunk table."""
    key = (id(batch), batch.version, config.chunk)
    entry = batch.resources.get("triton_tables")
    if entry is not None and entry.key == key:
        return entry
    host = batch.table
    if entry is not None and entry.key[0] == id(batch) and entry.key[2] == config.chunk:
        chunks = entry.chunks   # same tensors, same sizes: only addresses moved
        if entry.table is not host:
            entry.table.copy_(host)
        table = entry.table
    else:
        table = host if batch.device.type == "cpu" else host.to(batch.device)
        chunks = _chunk_table(host[:, 0].tolist(), config.chunk, batch.device)
    aligned = bool((host[:, list(address_cols)] % _ALIGN_BYTES == 0).all())
    entry = Tables(key=key, table=table, chunks=chunks, aligned=aligned)
    # The batch itself is held, so that its id cannot be reused while cached.
    batch.resources["triton_tables"] = entry
    batch.resources["triton_batch"] = batch
    return entry


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


def bump_steps(t: Tables, n_rows: int, found_inf: Optional[torch.Tensor], ncols: int, step_col: int) -> None:
    grid = (triton.cdiv(n_rows, _BUMP_BLOCK),)
    _bump_steps_kernel[grid](
        t.table, n_rows, found_inf if found_inf is not None else t.table,
        NCOLS=ncols, STEP_COL=step_col, HAS_FOUND_INF=found_inf is not None, BLOCK=_BUMP_BLOCK,
        num_warps=4, enable_fp_fusion=True,
    )
