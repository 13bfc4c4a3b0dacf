"""Triton Adam / AdamW: one launch updates every tensor of a (device, dtype) group.

Follows Loshchilov & Hutter, Algorithm 2 (Adam with L2, line 6; AdamW, line
12) in torch.optim's parameterisation, as written once in
csrc/include/fused_adamw/update.h (resolve_adam, adam_update): this kernel
repeats that order of operations, in float32 (float64 for float64 params),
with the step-resolved scalars computed in float64 and cast, as resolve_adam
does. ../shared/DESIGN.md states the rule; python/fused_adamw/hyper.py the
launcher's contract.

Layout: an int64 address table, one row per tensor (DESIGN.md's Adam table:
numel, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step, aux addresses,
the generator's tensor index, and this backend's vector flag), and a chunk table of (row, first element);
program i updates chunk i. Both live on the device and are cached across
steps (_common.tables). A tensor whose param, grad and state addresses are all
16-byte aligned takes the vector path (unmasked full blocks with alignment
hints), decided per tensor as in the CUDA backend (_common.Vector).

Steps: every program reads its tensor's step s from memory and uses t = s + 1;
a second, tiny launch (_common.bump_steps) then writes s + 1. Stream order
makes every reader finish before the write, with no atomics, no counters to
reset and nothing that a CUDA graph replay could leave half done; the price is
one extra launch of a few microseconds per step.

Precision (issue 12; hyper.precision; python/fused_adamw/reference.py's
adam_step_lp is the definition): round to nearest runs _adam_kernel; master
weights (the float32 copy in the table's aux column is what the update reads
and writes), stochastic rounding (param and 16-bit state, with the
Philox-4x32-10 words of (seed, element, tensor index, step after the
increment)) and Kahan summation (the compensation in the aux column) run
_adam_precision_kernel, the same body with the mode a constexpr. State may be stored in bfloat16 beside float32 or float16 params.

Run: on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set before
triton is imported (tests/test_triton_kernels.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fused_adamw.hyper import PRECISION_NEAREST, AdamHyper
from fused_adamw._native import AdamCol
from fused_adamw.triton_kernels import _common
from fused_adamw.triton_kernels._common import (
    P_KAHAN, P_MASTER, P_STOCHASTIC, _div, _element_words, _f64, _load, _sqrt, _store_param, _store_rounded,
    device_helper,
)


# The address-table columns, one layout for every backend
# (csrc/include/fused_adamw/table.h, mirrored by fused_adamw._native).
AdamColumn = AdamCol


_NCOLS = int(AdamCol.COUNT)
# The same columns as compile-time constants for the kernel.
_C_NUMEL = tl.constexpr(AdamColumn.NUMEL.value)
_C_PARAM = tl.constexpr(AdamColumn.PARAM.value)
_C_GRAD = tl.constexpr(AdamColumn.GRAD.value)
_C_EXP_AVG = tl.constexpr(AdamColumn.EXP_AVG.value)
_C_EXP_AVG_SQ = tl.constexpr(AdamColumn.EXP_AVG_SQ.value)
_C_MAX_EXP_AVG_SQ = tl.constexpr(AdamColumn.MAX_EXP_AVG_SQ.value)
_C_STEP = tl.constexpr(AdamColumn.STEP.value)
_C_AUX = tl.constexpr(AdamColumn.AUX.value)
_C_INDEX = tl.constexpr(AdamColumn.INDEX.value)
# The device table (_common.tables) appends one column: the row's vector flag.
_C_ALIGNED = tl.constexpr(_NCOLS)
_C_NCOLS = tl.constexpr(_NCOLS + 1)
_VEC_ALL = tl.constexpr(int(_common.Vector.ALL))
_VEC_PER_TENSOR = tl.constexpr(int(_common.Vector.PER_TENSOR))


@device_helper
def _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, aux_ptr, offs, mask, grad_scale,
                beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, keep, step_size, bc2_sqrt,
                seed, index, step,
                MATH: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr,
                USE_DECAY: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, PRECISION: tl.constexpr,
                MASKED: tl.constexpr):
    """update.h's adam_update on one block of elements, stored as PRECISION
    says (_common._store_param; state stochastically rounded under
    P_STOCHASTIC with the words of seed, the elements, index and step)."""
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
    m = _load(m_ptr, offs, mask, MATH, MASKED)
    v = _load(v_ptr, offs, mask, MATH, MASKED)
    if SR:
        w0, w1, w2, w3 = _element_words(seed, offs, index, step)
    else:
        w0 = 0  # not read: nearest rounding takes no random bits
        w1 = 0
        w2 = 0
        w3 = 0
    # effective_grad: unscale, flip for maximize, add the L2 term.
    if HAS_GRAD_SCALE:
        g = _div(g, grad_scale, FP64)
    if MAXIMIZE:
        g = -g
    if USE_L2:
        g = g + l2 * p
    if USE_DECAY:
        p = p * keep
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom_v = v
    if AMSGRAD:
        vmax = _load(vmax_ptr, offs, mask, MATH, MASKED)
        vmax = tl.where(vmax > v, vmax, v)
        denom_v = vmax
        _store_rounded(vmax_ptr, offs, vmax, w3, mask, MASKED, SR)
    p = p - _div(step_size * m, _div(_sqrt(denom_v, FP64), bc2_sqrt, FP64) + eps, FP64)
    _store_param(p_ptr, aux_ptr, offs, p, old, w0, mask, MATH, MASKED, PRECISION)
    _store_rounded(m_ptr, offs, m, w1, mask, MASKED, SR)
    _store_rounded(v_ptr, offs, v, w2, mask, MASKED, SR)


@device_helper
def _adam_tensor(rec, start, end, grad_scale,
                 beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, keep, step_size, bc2_sqrt,
                 seed, index, step,
                 PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr):
    """Elements [start, end) of the tensor of table row `rec`: full BLOCKs
    without masks, then one masked tail. ALIGNED: every address of the row is
    a multiple of 16 bytes, and the hints below let the full blocks' loads
    and stores vectorise. The addresses are loaded here, not by the caller:
    tl.multiple_of marks the op that produced its operand, so each call's
    hints stay on its own loads, and an unaligned call never inherits them."""
    p_ptr = tl.load(rec + _C_PARAM).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(rec + _C_GRAD).to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = tl.load(rec + _C_EXP_AVG).to(tl.pointer_type(STATE_DTYPE))
    v_ptr = tl.load(rec + _C_EXP_AVG_SQ).to(tl.pointer_type(STATE_DTYPE))
    vmax_ptr = tl.load(rec + _C_MAX_EXP_AVG_SQ).to(tl.pointer_type(STATE_DTYPE))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
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
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, aux_ptr, offs, offs < end, grad_scale,
                    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, keep, step_size, bc2_sqrt,
                    seed, index, step,
                    MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE, PRECISION, False)
    tail = start + n_full * BLOCK
    if tail < end:
        offs = tail + lanes
        _adam_block(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, aux_ptr, offs, offs < end, grad_scale,
                    beta1, beta2, one_minus_beta1, one_minus_beta2, eps, l2, keep, step_size, bc2_sqrt,
                    seed, index, step,
                    MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE, PRECISION, True)


@device_helper
def _adam_program(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                  lr, beta1, beta2, eps, weight_decay, decay_coeff, log_beta1, log_beta2, seed,
                  PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                  AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
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
    step_ptr = tl.load(rec + _C_STEP).to(tl.pointer_type(tl.float32))

    # update.h's resolve_adam: float64 scalars, cast once to the math type.
    # beta ** t is exp(t * log(beta)) with log(beta) from the host: Triton has
    # no portable pow (libdevice is not available in the interpreter).
    if HAS_LR_TENSOR:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = _f64(lr)
    t = tl.load(step_ptr).to(tl.float64) + 1.0
    step_size = (lr64 / (1.0 - tl.exp(t * _f64(log_beta1)))).to(MATH)
    bc2_sqrt = tl.sqrt(1.0 - tl.exp(t * _f64(log_beta2))).to(MATH)
    keep = (1.0 - lr64 * _f64(decay_coeff)).to(MATH)
    b1 = _f64(beta1).to(MATH)
    b2 = _f64(beta2).to(MATH)
    one_minus_beta1 = (1.0 - _f64(beta1)).to(MATH)
    one_minus_beta2 = (1.0 - _f64(beta2)).to(MATH)
    eps_m = _f64(eps).to(MATH)
    l2 = _f64(weight_decay).to(MATH)
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(MATH)
    else:
        grad_scale = tl.full([], 1.0, MATH)
    # The generator's counter words of this tensor: its index, and the step
    # after this call's increment (uint32(t), as the reference's int step).
    if PRECISION == P_STOCHASTIC:
        index = tl.load(rec + _C_INDEX).to(tl.uint32)
        step = t.to(tl.int64).to(tl.uint32)
    else:
        index = 0
        step = 0

    end = tl.minimum(start + CHUNK, numel)
    if HAS_FOUND_INF:
        # Inf / NaN in the grads: no element is read or written.
        end = tl.where(tl.load(found_inf_ptr) == 0, end, start)
    if VECTOR == _VEC_ALL:
        _adam_tensor(rec, start, end, grad_scale,
                     b1, b2, one_minus_beta1, one_minus_beta2, eps_m, l2, keep, step_size, bc2_sqrt,
                     seed, index, step,
                     PARAM_DTYPE, STATE_DTYPE, MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE,
                     PRECISION, True, BLOCK)
    elif VECTOR == _VEC_PER_TENSOR:
        if tl.load(rec + _C_ALIGNED) != 0:
            _adam_tensor(rec, start, end, grad_scale,
                         b1, b2, one_minus_beta1, one_minus_beta2, eps_m, l2, keep, step_size, bc2_sqrt,
                         seed, index, step,
                         PARAM_DTYPE, STATE_DTYPE, MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE,
                         PRECISION, True, BLOCK)
        else:
            _adam_tensor(rec, start, end, grad_scale,
                         b1, b2, one_minus_beta1, one_minus_beta2, eps_m, l2, keep, step_size, bc2_sqrt,
                         seed, index, step,
                         PARAM_DTYPE, STATE_DTYPE, MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE,
                         PRECISION, False, BLOCK)
    else:
        _adam_tensor(rec, start, end, grad_scale,
                     b1, b2, one_minus_beta1, one_minus_beta2, eps_m, l2, keep, step_size, bc2_sqrt,
                     seed, index, step,
                     PARAM_DTYPE, STATE_DTYPE, MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY, HAS_GRAD_SCALE,
                     PRECISION, False, BLOCK)


# Two entry points over one body. _adam_kernel is round to nearest (precision
# 0), the kernel every fp32 / fp64 group runs: its arguments and code are
# those it had before the precision modes, so its speed cannot change (the
# PRECISION branches are constexpr and vanish). _adam_precision_kernel adds
# the mode and the generator's seed; seed is not specialised (a seed that is
# 1 or a multiple of 16 compiles no variant of its own).
@triton.jit
def _adam_kernel(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                 lr: tl.float64, beta1: tl.float64, beta2: tl.float64, eps: tl.float64,
                 weight_decay: tl.float64, decay_coeff: tl.float64,
                 log_beta1: tl.float64, log_beta2: tl.float64,
                 PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                 AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr, USE_DECAY: tl.constexpr,
                 HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                 VECTOR: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _adam_program(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                  lr, beta1, beta2, eps, weight_decay, decay_coeff, log_beta1, log_beta2, 0,
                  PARAM_DTYPE, STATE_DTYPE, MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY,
                  HAS_LR_TENSOR, HAS_GRAD_SCALE, HAS_FOUND_INF, 0, VECTOR, BLOCK, CHUNK)


@triton.jit(do_not_specialize=["seed"])
def _adam_precision_kernel(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                           lr: tl.float64, beta1: tl.float64, beta2: tl.float64, eps: tl.float64,
                           weight_decay: tl.float64, decay_coeff: tl.float64,
                           log_beta1: tl.float64, log_beta2: tl.float64, seed: tl.int64,
                           PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, MATH: tl.constexpr,
                           AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, USE_L2: tl.constexpr,
                           USE_DECAY: tl.constexpr, HAS_LR_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                           HAS_FOUND_INF: tl.constexpr, PRECISION: tl.constexpr,
                           VECTOR: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    _adam_program(table, chunks, lr_ptr, grad_scale_ptr, found_inf_ptr,
                  lr, beta1, beta2, eps, weight_decay, decay_coeff, log_beta1, log_beta2, seed,
                  PARAM_DTYPE, STATE_DTYPE, MATH, AMSGRAD, MAXIMIZE, USE_L2, USE_DECAY,
                  HAS_LR_TENSOR, HAS_GRAD_SCALE, HAS_FOUND_INF, PRECISION, VECTOR, BLOCK, CHUNK)


def _log(beta: float) -> float:
    # beta ** t is computed in the kernel as exp(t * log(beta)); beta == 0
    # (allowed by torch) gives 0 ** t = 0 through exp(-inf).
    return math.log(beta) if beta > 0.0 else -math.inf


# The addresses that decide a tensor's vector path: what the update loads and
# stores per element. Not the step count (one scalar load per program); an
# absent max_exp_avg_sq is 0, aligned.
_ADDRESS_COLS = (AdamColumn.PARAM, AdamColumn.GRAD, AdamColumn.EXP_AVG, AdamColumn.EXP_AVG_SQ,
                  AdamColumn.MAX_EXP_AVG_SQ, AdamColumn.AUX)


def adam_step(batch, hyper: AdamHyper, *, grad_scale: Optional[torch.Tensor] = None,
              found_inf: Optional[torch.Tensor] = None) -> None:
    """One Adam / AdamW step over all of the batch's tensors (the contract of hyper.py)."""
    n = len(batch.params)
    if n == 0:
        return
    device = batch.device
    config = _common.launch_config(device)
    lr_tensor = hyper.lr if isinstance(hyper.lr, torch.Tensor) else None
    for name, t in (("lr", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _common.check_scalar(name, t, device)
    if hyper.amsgrad and batch.max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    precision, seed = int(hyper.precision), int(hyper.seed)
    _common.check_precision(batch, precision, seed)
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
                float(hyper.lr) if lr_tensor is None else 0.0, float(hyper.beta1), float(hyper.beta2),
                float(hyper.eps), float(hyper.weight_decay), float(hyper.decay_coeff),
                _log(float(hyper.beta1)), _log(float(hyper.beta2)),
            )
            flags = dict(
                PARAM_DTYPE=_common.TL_DTYPE[batch.dtype], STATE_DTYPE=_common.TL_DTYPE[batch.state_dtype],
                MATH=math_dtype, AMSGRAD=bool(hyper.amsgrad), MAXIMIZE=bool(hyper.maximize),
                USE_L2=(not hyper.decoupled) and hyper.weight_decay != 0.0,
                USE_DECAY=bool(hyper.decoupled) and hyper.decay_coeff != 0.0,
                HAS_LR_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None, VECTOR=t.vector,
                BLOCK=config.block, CHUNK=config.chunk, **config.options(),
            )
            if precision == PRECISION_NEAREST:
                _adam_kernel[(n_chunks,)](*args, **flags)
            else:
                _adam_precision_kernel[(n_chunks,)](*args, seed, PRECISION=precision, **flags)
        _common.bump_steps(t, n, found_inf, int(AdamColumn.STEP))
