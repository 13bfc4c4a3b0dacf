"""Triton SGD / SGDW: one launch updates every tensor of a (device, dtype) group.

Follows Loshchilov & Hutter, Algorithm 1 (SGD with L2, line 6; SGDW, line 9)
in torch.optim.SGD's parameterisation (lr outside the momentum buffer; the
first step sets buf = g), as written once in
csrc/include/fused_adamw/update.h (resolve_sgd, sgd_update): this kernel
repeats that order of operations, in float32 (float64 for float64 params).
../shared/DESIGN.md states the rule; python/fused_adamw/hyper.py the
launcher's contract.

Layout: an int64 address table, one row per tensor (DESIGN.md's SGD table:
numel, param, grad, momentum_buffer addresses, the first-step flag, and this
backend's vector flag), and a chunk table of (row, first element); program i
updates chunk i. Both live on the device and are cached across steps
(_common.tables); when the grads or the first-step flags change between
steps, a new version of the address table is uploaded. A tensor whose
param, grad and buffer addresses are all 16-byte aligned takes the vector
path, decided per tensor as in the CUDA backend (_common.Vector).

Run: on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before
triton is imported (tests/test_triton_kernels.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fused_adamw.hyper import SgdHyper
from fused_adamw._native import SgdCol
from fused_adamw.triton_kernels import _common
from fused_adamw.triton_kernels._common import _div, _f64, _load, _store, device_helper


# The address-table columns, one layout for every backend
# (csrc/include/fused_adamw/table.h, mirrored by fused_adamw._native).
SgdColumn = SgdCol


_NCOLS = int(SgdCol.COUNT)
_C_NUMEL = tl.constexpr(SgdColumn.NUMEL.value)
_C_PARAM = tl.constexpr(SgdColumn.PARAM.value)
_C_GRAD = tl.constexpr(SgdColumn.GRAD.value)
_C_MOMENTUM_BUFFER = tl.constexpr(SgdColumn.MOMENTUM_BUFFER.value)
_C_FIRST_STEP = tl.constexpr(SgdColumn.FIRST_STEP.value)
# The device table (_common.tables) appends one column: the row's vector flag.
_C_ALIGNED = tl.constexpr(_NCOLS)
_C_NCOLS = tl.constexpr(_NCOLS + 1)
_VEC_ALL = tl.constexpr(int(_common.Vector.ALL))
_VEC_PER_TENSOR = tl.constexpr(int(_common.Vector.PER_TENSOR))


@device_helper
def _sgd_block(p_ptr, g_ptr, buf_ptr, offs, mask, grad_scale,
               lr, momentum, one_minus_dampening, l2, keep,
               MATH: tl.constexpr, USE_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    """update.h's sgd_update on one block of elements. FIRST: the buffer was
    just allocated; it is written (= g), never read."""
    FP64: tl.constexpr = MATH == tl.float64
    p = _load(p_ptr, offs, mask, MATH, MASKED)
    g = _load(g_ptr, offs, mask, MATH, MASKED)
    # effective_grad: unscale, flip for maximize, add the L2 term.
    if HAS_GRAD_SCALE:
        g = _div(g, grad_scale, FP64)
    if MAXIMIZE:
        g = -g
    if USE_L2:
        g = g + l2 * p
    if USE_DECAY:
        p = p * keep
    if USE_MOMENTUM:
        if FIRST:
            buf = g
        else:
            buf = momentum * _load(buf_ptr, offs, mask, MATH, MASKED) + one_minus_dampening * g
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
        _store(buf_ptr, offs, buf, mask, MASKED)
    p = p - lr * g
    _store(p_ptr, offs, p, mask, MASKED)


@device_helper
def _sgd_chunk(rec, start, end, grad_scale,
               lr, momentum, one_minus_dampening, l2, keep,
               PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
               MATH: tl.constexpr, USE_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [start, end) of the tensor of table row `rec`: full BLOCKs
    unmasked, then a masked tail. ALIGNED: every address of the row is a
    multiple of 16 bytes, and the hints below let the full blocks' loads and
    stores vectorise. The addresses are loaded here, not by the caller:
    tl.multiple_of marks the op that produced its operand, so each call's
    hints stay on its own loads, and an unaligned call never inherits them."""
    p_ptr = tl.load(rec + _C_PARAM).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(rec + _C_GRAD).to(tl.pointer_type(PARAM_DTYPE))
    buf_ptr = tl.load(rec + _C_MOMENTUM_BUFFER).to(tl.pointer_type(STATE_DTYPE))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        buf_ptr = tl.multiple_of(buf_ptr, 16)
    n_full = (end - start) // BLOCK
    lanes = tl.arange(0, BLOCK)
    for i in range(0, n_full):
        offs = start + i * BLOCK + lanes
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        _sgd_block(p_ptr, g_ptr, buf_ptr, offs, offs < end, grad_scale,
                   lr, momentum, one_minus_dampening, l2, keep,
                   MATH, USE_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE, False)
    tail = start + n_full * BLOCK
    if tail < end:
        offs = tail + lanes
        _sgd_block(p_ptr, g_ptr, buf_ptr, offs, offs < end, grad_scale,
                   lr, momentum, one_minus_dampening, l2, keep,
                   MATH, USE_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE, True)


@device_helper
def _sgd_tensor(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                USE_L2: tl.constexpr, USE_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """_sgd_chunk for the tensor of row `rec`, its first step read from the row."""
    if USE_MOMENTUM:
        # Two instances, so that a fresh buffer is never read (it holds
        # whatever the allocation left there).
        if tl.load(rec + _C_FIRST_STEP) != 0:
            _sgd_chunk(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                       PARAM_DTYPE, STATE_DTYPE, MATH, True, True, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                       HAS_GRAD_SCALE, ALIGNED, BLOCK)
        else:
            _sgd_chunk(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                       PARAM_DTYPE, STATE_DTYPE, MATH, True, False, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                       HAS_GRAD_SCALE, ALIGNED, BLOCK)
    else:
        _sgd_chunk(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                   PARAM_DTYPE, STATE_DTYPE, MATH, False, False, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                   HAS_GRAD_SCALE, ALIGNED, BLOCK)


@triton.jit
def _sgd_kernel(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                lr: tl.float64, momentum: tl.float64, dampening: tl.float64,
                weight_decay: tl.float64, decay_coeff: tl.float64,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                VECTOR: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program i updates chunk i: CHUNK elements (fewer at a tensor's end) of
    one tensor, on the vector path where VECTOR (a _common.Vector) and the
    tensor's row say so."""
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    rec = table + row * _C_NCOLS
    numel = tl.load(rec + _C_NUMEL)

    # update.h's resolve_sgd: float64 scalars, cast once to the math type.
    if HAS_LR_TENSOR:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = _f64(lr)
    lr_m = lr64.to(MATH)
    momentum_m = _f64(momentum).to(MATH)
    one_minus_dampening = (1.0 - _f64(dampening)).to(MATH)
    l2 = _f64(weight_decay).to(MATH)
    keep = (1.0 - lr64 * _f64(decay_coeff)).to(MATH)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(MATH)
    else:
        grad_scale = tl.full([], 1.0, MATH)

    end = tl.minimum(start + CHUNK, numel)
    if HAS_FOUND_INF:
        # Inf / NaN in the grads: no element is read or written.
        end = tl.where(tl.load(found_inf_ptr) == 0, end, start)
    if VECTOR == _VEC_ALL:
        _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                    PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                    HAS_GRAD_SCALE, True, BLOCK)
    elif VECTOR == _VEC_PER_TENSOR:
        if tl.load(rec + _C_ALIGNED) != 0:
            _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                        PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                        HAS_GRAD_SCALE, True, BLOCK)
        else:
            _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                        PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                        HAS_GRAD_SCALE, False, BLOCK)
    else:
        _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                    PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                    HAS_GRAD_SCALE, False, BLOCK)


# The addresses that decide a tensor's vector path (an absent momentum buffer
# is 0, aligned).
_ADDRESS_COLS = (SgdColumn.PARAM, SgdColumn.GRAD, SgdColumn.MOMENTUM_BUFFER)


def sgd_step(batch, hyper: SgdHyper, *, grad_scale: Optional[torch.Tensor] = None,
             found_inf: Optional[torch.Tensor] = None) -> None:
    """One SGD / SGDW step over all of the batch's tensors (the contract of hyper.py)."""
    n = len(batch.params)
    if n == 0:
        return
    device = batch.device
    config = _common.launch_config(device)
    lr_tensor = hyper.lr if isinstance(hyper.lr, torch.Tensor) else None
    for name, t in (("lr", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _common.check_scalar(name, t, device)
    use_momentum = hyper.momentum != 0.0
    if use_momentum and batch.momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    math_dtype = tl.float64 if batch.dtype == torch.float64 else tl.float32
    with _common.device_guard(device):  # tables and launch on the params' device
        t = _common.tables(batch, config, _ADDRESS_COLS)
        n_chunks = t.chunks.shape[0]
        if n_chunks == 0:
            return
        dummy = t.table  # stands in for absent scalar tensors; never read
        _sgd_kernel[(n_chunks,)](
            t.table, t.chunks,
            lr_tensor if lr_tensor is not None else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy,
            float(hyper.lr) if lr_tensor is None else 0.0, float(hyper.momentum), float(hyper.dampening),
            float(hyper.weight_decay), float(hyper.decay_coeff),
            PARAM_DTYPE=_common.TL_DTYPE[batch.dtype], STATE_DTYPE=_common.TL_DTYPE[batch.state_dtype],
            MATH=math_dtype, USE_MOMENTUM=use_momentum, NESTEROV=bool(hyper.nesterov),
            MAXIMIZE=bool(hyper.maximize),
            USE_L2=(not hyper.decoupled) and hyper.weight_decay != 0.0,
            USE_DECAY=bool(hyper.decoupled) and hyper.decay_coeff != 0.0,
            HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, VECTOR=t.vector,
            BLOCK=config.block, CHUNK=config.chunk, **config.options(),
        )
