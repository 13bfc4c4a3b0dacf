"""Triton SGD / SGDW: one launch updates every tensor of a (device, dtype) group.

Follows Loshchilov & Hutter, Algorithm 1 (SGD with L2, line 6; SGDW, line 9)
in torch.optim.SGD's parameterisation (lr outside the momentum buffer; the
first step sets buf = g), as written once in
csrc/include/fused_adamw/update.h (resolve_sgd, sgd_update): this kernel
repeats that order of operations, in float32 (float64 for float64 params).
../shared/DESIGN.md states the rule; python/fused_adamw/hyper.py the
launcher's contract.

Layout: an int64 address table, one row per tensor (DESIGN.md's SGD table:
numel, param, grad, momentum_buffer addresses, the first-step flag, the aux
and step addresses, the generator's tensor index, and this backend's vector
flag), and a chunk table of (row, first element); program i
updates chunk i. Both live on the device and are cached across steps
(_common.tables); when the grads or the first-step flags change between
steps, a new version of the address table is uploaded. A tensor whose
param, grad and buffer addresses are all 16-byte aligned takes the vector
path, decided per tensor as in the CUDA backend (_common.Vector).

Precision (issue 12): as in adam.py (_sgd_kernel for round to nearest,
_sgd_precision_kernel for master weights, stochastic rounding and Kahan
summation); the momentum buffer takes word 1. SGD keeps no step count of
its own, so under stochastic rounding the table's step column holds a
float32 count per tensor, the generator's step, which the kernel reads
(+1) and _common.bump_steps then increments, as Adam's.

Run: on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before
triton is imported (tests/test_triton_kernels.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fused_adamw.hyper import PRECISION_NEAREST, PRECISION_STOCHASTIC, SgdHyper
from fused_adamw._native import SgdCol
from fused_adamw.triton_kernels import _common
from fused_adamw.triton_kernels._common import (
    P_KAHAN, P_MASTER, P_STOCHASTIC, _div, _element_words, _f64, _load, _store_param, _store_rounded,
    device_helper,
)


# The address-table columns, one layout for every backend
# (csrc/include/fused_adamw/table.h, mirrored by fused_adamw._native).
SgdColumn = SgdCol


_NCOLS = int(SgdCol.COUNT)
_C_NUMEL = tl.constexpr(SgdColumn.NUMEL.value)
_C_PARAM = tl.constexpr(SgdColumn.PARAM.value)
_C_GRAD = tl.constexpr(SgdColumn.GRAD.value)
_C_MOMENTUM_BUFFER = tl.constexpr(SgdColumn.MOMENTUM_BUFFER.value)
_C_FIRST_STEP = tl.constexpr(SgdColumn.FIRST_STEP.value)
_C_AUX = tl.constexpr(SgdColumn.AUX.value)
_C_STEP = tl.constexpr(SgdColumn.STEP.value)
_C_INDEX = tl.constexpr(SgdColumn.INDEX.value)
# The device table (_common.tables) appends one column: the row's vector flag.
_C_ALIGNED = tl.constexpr(_NCOLS)
_C_NCOLS = tl.constexpr(_NCOLS + 1)
_VEC_ALL = tl.constexpr(int(_common.Vector.ALL))
_VEC_PER_TENSOR = tl.constexpr(int(_common.Vector.PER_TENSOR))


@device_helper
def _sgd_block(p_ptr, g_ptr, buf_ptr, aux_ptr, offs, mask, grad_scale,
               lr, momentum, one_minus_dampening, l2, keep, seed, index, step,
               MATH: tl.constexpr, USE_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """update.h's sgd_update on one block of elements, stored as PRECISION
    says (_common._store_param; the buffer stochastically rounded under
    P_STOCHASTIC). FIRST: the buffer was just allocated; it is written
    (= g), never read."""
    FP64: tl.constexpr = MATH == tl.float64
    SR: tl.constexpr = PRECISION == P_STOCHASTIC
    # The update runs on the master copy under P_MASTER (the param is never
    # read then), else on the param; Kahan also needs the param as it was.
    if PRECISION == P_MASTER:
        p = _load(aux_ptr, offs, mask, MATH, MASKED)
    else:
        p = _load(p_ptr, offs, mask, MATH, MASKED)
    old = p
    g = _load(g_ptr, offs, mask, MATH, MASKED)
    if SR:
        w0, w1, w2, w3 = _element_words(seed, offs, index, step)
    else:
        w0 = 0  # not read: nearest rounding takes no random bits
        w1 = 0
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
        _store_rounded(buf_ptr, offs, buf, w1, mask, MASKED, SR)
    p = p - lr * g
    _store_param(p_ptr, aux_ptr, offs, p, old, w0, mask, MATH, MASKED, PRECISION)


@device_helper
def _sgd_chunk(rec, start, end, grad_scale,
               lr, momentum, one_minus_dampening, l2, keep, seed, index, step,
               PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
               MATH: tl.constexpr, USE_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr,
               MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
               HAS_GRAD_SCALE: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr):
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
    # The aux column: the float32 master copy, or the Kahan compensation in
    # the param dtype; no other mode reads it (p_ptr stands in, never used).
    if PRECISION == P_MASTER:
        aux_ptr = tl.load(rec + _C_AUX).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            aux_ptr = tl.multiple_of(aux_ptr, 16)
    elif PRECISION == P_KAHAN:
        aux_ptr = tl.load(rec + _C_AUX).to(tl.pointer_type(PARAM_DTYPE))
        if ALIGNED:
            aux_ptr = tl.multiple_of(aux_ptr, 16)
    else:
        aux_ptr = p_ptr
    n_full = (end - start) // BLOCK
    lanes = tl.arange(0, BLOCK)
    for i in range(0, n_full):
        offs = start + i * BLOCK + lanes
        if ALIGNED:
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        _sgd_block(p_ptr, g_ptr, buf_ptr, aux_ptr, offs, offs < end, grad_scale,
                   lr, momentum, one_minus_dampening, l2, keep, seed, index, step,
                   MATH, USE_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE,
                   PRECISION, False)
    tail = start + n_full * BLOCK
    if tail < end:
        offs = tail + lanes
        _sgd_block(p_ptr, g_ptr, buf_ptr, aux_ptr, offs, offs < end, grad_scale,
                   lr, momentum, one_minus_dampening, l2, keep, seed, index, step,
                   MATH, USE_MOMENTUM, FIRST, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE,
                   PRECISION, True)


@device_helper
def _sgd_tensor(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep, seed, index, step,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                USE_L2: tl.constexpr, USE_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                PRECISION: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """_sgd_chunk for the tensor of row `rec`, its first step read from the row."""
    if USE_MOMENTUM:
        # Two instances, so that a fresh buffer is never read (it holds
        # whatever the allocation left there).
        if tl.load(rec + _C_FIRST_STEP) != 0:
            _sgd_chunk(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                       seed, index, step,
                       PARAM_DTYPE, STATE_DTYPE, MATH, True, True, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                       HAS_GRAD_SCALE, PRECISION, ALIGNED, BLOCK)
        else:
            _sgd_chunk(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                       seed, index, step,
                       PARAM_DTYPE, STATE_DTYPE, MATH, True, False, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                       HAS_GRAD_SCALE, PRECISION, ALIGNED, BLOCK)
    else:
        _sgd_chunk(rec, start, end, grad_scale, lr, momentum, one_minus_dampening, l2, keep,
                   seed, index, step,
                   PARAM_DTYPE, STATE_DTYPE, MATH, False, False, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                   HAS_GRAD_SCALE, PRECISION, ALIGNED, BLOCK)


@device_helper
def _sgd_program(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                 lr, momentum, dampening, weight_decay, decay_coeff, seed,
                 PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                 USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                 USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                 HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 PRECISION: tl.constexpr, VECTOR: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Program i updates chunk i: CHUNK elements (fewer at a tensor's end) of
    one tensor, on the vector path where VECTOR (a _common.Vector) and the
    tensor's row say so. The body of both kernels below."""
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
    # The generator's counter words of this tensor: its index, and the step
    # after this call's increment (the step column's count + 1; bump_steps
    # writes it after this launch).
    if PRECISION == P_STOCHASTIC:
        index = tl.load(rec + _C_INDEX).to(tl.uint32)
        step_ptr = tl.load(rec + _C_STEP).to(tl.pointer_type(tl.float32))
        step = (tl.load(step_ptr).to(tl.float64) + 1.0).to(tl.int64).to(tl.uint32)
    else:
        index = 0
        step = 0

    end = tl.minimum(start + CHUNK, numel)
    if HAS_FOUND_INF:
        # Inf / NaN in the grads: no element is read or written.
        end = tl.where(tl.load(found_inf_ptr) == 0, end, start)
    if VECTOR == _VEC_ALL:
        _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                    seed, index, step,
                    PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                    HAS_GRAD_SCALE, PRECISION, True, BLOCK)
    elif VECTOR == _VEC_PER_TENSOR:
        if tl.load(rec + _C_ALIGNED) != 0:
            _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                        seed, index, step,
                        PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                        HAS_GRAD_SCALE, PRECISION, True, BLOCK)
        else:
            _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                        seed, index, step,
                        PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                        HAS_GRAD_SCALE, PRECISION, False, BLOCK)
    else:
        _sgd_tensor(rec, start, end, grad_scale, lr_m, momentum_m, one_minus_dampening, l2, keep,
                    seed, index, step,
                    PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                    HAS_GRAD_SCALE, PRECISION, False, BLOCK)


# Two entry points over one body, as in adam.py: _sgd_kernel is round to
# nearest (precision 0) with the arguments and code it had before the
# precision modes; _sgd_precision_kernel adds the mode and the generator's
# seed (not specialised).
@triton.jit
def _sgd_kernel(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                lr: tl.float64, momentum: tl.float64, dampening: tl.float64,
                weight_decay: tl.float64, decay_coeff: tl.float64,
                PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                VECTOR: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _sgd_program(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                 lr, momentum, dampening, weight_decay, decay_coeff, 0,
                 PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                 HAS_LR_TENSOR, HAS_GRAD_SCALE, HAS_FOUND_INF, 0, VECTOR, BLOCK, CHUNK)


@triton.jit(do_not_specialize=["seed"])
def _sgd_precision_kernel(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                          lr: tl.float64, momentum: tl.float64, dampening: tl.float64,
                          weight_decay: tl.float64, decay_coeff: tl.float64, seed: tl.int64,
                          PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                          USE_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                          USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                          HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                          HAS_FOUND_INF: tl.constexpr, PRECISION: tl.constexpr,
                          VECTOR: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _sgd_program(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                 lr, momentum, dampening, weight_decay, decay_coeff, seed,
                 PARAM_DTYPE, STATE_DTYPE, MATH, USE_MOMENTUM, NESTEROV, MAXIMIZE, USE_L2, USE_DECAY,
                 HAS_LR_TENSOR, HAS_GRAD_SCALE, HAS_FOUND_INF, PRECISION, VECTOR, BLOCK, CHUNK)


# The addresses that decide a tensor's vector path (an absent momentum buffer
# or aux tensor is 0, aligned; the step count is one scalar load per program).
_ADDRESS_COLS = (SgdColumn.PARAM, SgdColumn.GRAD, SgdColumn.MOMENTUM_BUFFER, SgdColumn.AUX)


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
    precision, seed = int(hyper.precision), int(hyper.seed)
    _common.check_precision(batch, precision, seed)
    stochastic = precision == PRECISION_STOCHASTIC
    if stochastic and batch.steps is None:
        raise ValueError("precision=2 (stochastic rounding) needs batch.steps: the generator's step counts")
    math_dtype = tl.float64 if batch.dtype == torch.float64 else tl.float32
    with _common.device_guard(device):  # tables and launches on the params' device
        t = _common.tables(batch, config, _ADDRESS_COLS)
        n_chunks = t.chunks.shape[0]
        if n_chunks > 0:
            dummy = t.table  # stands in for absent scalar tensors; never read
            args = (
                t.table, t.chunks,
                lr_tensor if lr_tensor is not None else dummy,
                grad_scale if grad_scale is not None else dummy,
                found_inf if found_inf is not None else dummy,
                float(hyper.lr) if lr_tensor is None else 0.0, float(hyper.momentum), float(hyper.dampening),
                float(hyper.weight_decay), float(hyper.decay_coeff),
            )
            flags = dict(
                PARAM_DTYPE=_common.TL_DTYPE[batch.dtype], STATE_DTYPE=_common.TL_DTYPE[batch.state_dtype],
                MATH=math_dtype, USE_MOMENTUM=use_momentum, NESTEROV=bool(hyper.nesterov),
                MAXIMIZE=bool(hyper.maximize),
                USE_L2=(not hyper.decoupled) and hyper.weight_decay != 0.0,
                USE_DECAY=bool(hyper.decoupled) and hyper.decay_coeff != 0.0,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, VECTOR=t.vector,
                BLOCK=config.block, CHUNK=config.chunk, **config.options(),
            )
            if precision == PRECISION_NEAREST:
                _sgd_kernel[(n_chunks,)](*args, **flags)
            else:
                _sgd_precision_kernel[(n_chunks,)](*args, seed, PRECISION=precision, **flags)
        if stochastic:
            # The generator's step counts, after the update read them (stream order).
            _common.bump_steps(t, n, found_inf, int(SgdColumn.STEP))
