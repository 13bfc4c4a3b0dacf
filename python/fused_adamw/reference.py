"""NumPy float64 reference of every update in fused_adamw: the oracle for tests and benchmarks.

Two independent transcriptions live here:

* ``adam_step`` / ``sgd_step`` (and the multi-step drivers ``run_adam`` /
  ``run_sgd``) follow the per-element rule of ../shared/DESIGN.md ("The update,
  per element"), in torch.optim's parameterisation: lr outside the momentum
  buffer, eps added to sqrt(v) / sqrt(1 - beta2^t). They cover Adam, AdamW, SGD
  and SGDW with every option the optimizers take.
* ``paper_algorithm1`` / ``paper_algorithm2`` transcribe Algorithm 1 (SGD with
  L2 / SGDW) and Algorithm 2 (Adam with L2 / AdamW) of Loshchilov & Hutter,
  "Decoupled Weight Decay Regularization" (../shared/paper/, lines ~74-116),
  line by line, with the schedule multiplier eta_t.

Plain float64 NumPy, no fusion, no tricks: this module is what the kernels are
checked against, so it favours being obviously right over being fast. It is
never used by the optimizer. It imports nothing but NumPy, so it runs without
the native modules:

    PYTHONPATH=python python -c "import fused_adamw.reference as r; help(r)"

tests/test_reference.py pins it to torch.optim (Adam, AdamW, SGD) and to the
paper's algorithms and propositions.

Precision options (issue 12), modelled on top of ``adam_step`` / ``sgd_step``
without changing them: ``adam_step_lp`` / ``sgd_step_lp`` (and ``run_adam_lp``
/ ``run_sgd_lp``) take a ``Precision`` (storage dtype of the param and of the
state, and at most one of ``master_weights``, ``stochastic_rounding``,
``kahan_summation``), a ``seed`` and the tensor's ``tensor_index``. Stored
values stay float64 arrays that hold exactly the values the storage dtype can
represent. The pieces every backend must reproduce bit for bit:

* ``philox4x32`` / ``random_bits``: the counter-based generator, Philox-4x32-10
  (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3",
  SC'11, doi:10.1145/2063384.2063405; the generator of Triton's
  ``tl.randint`` / ``tl.philox`` and of torch's CUDA RNG). Layout:
  key = (seed & 0xffffffff, seed >> 32); counter = (element index & 0xffffffff,
  element index >> 32, tensor index, step). Word 0 rounds the param (it is
  what ``tl.randint(seed, element)`` returns when tensor index and step are 0);
  words 1, 2, 3 round exp_avg (or momentum_buffer), exp_avg_sq and
  max_exp_avg_sq. Each rounding uses the low 16 bits of its word.
* ``round_bf16`` / ``round_fp16`` (round to nearest even, through float32) and
  ``stochastic_round_bf16`` / ``stochastic_round_fp16`` (see their docstrings
  for the exact rule, NaN, inf and overflow).
* The per-option update, in ``adam_step_lp``'s docstring; the state keys it
  adds are ``MASTER_KEY`` ('master_param', float32 values) and ``KAHAN_KEY``
  ('kahan_comp', param-dtype values).

tests/test_reference_precision.py pins the generator to Random123's known
answers and to Triton, the roundings to torch's conversions, and the options
to the float64 trajectory.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional, Sequence, Union

import numpy as np

__all__ = [
    "DecayScaling",
    "adam_step",
    "sgd_step",
    "run_adam",
    "run_sgd",
    "paper_algorithm1",
    "paper_algorithm2",
    "PHILOX_M4x32",
    "PHILOX_W32",
    "philox4x32",
    "random_bits",
    "round_bf16",
    "round_fp16",
    "round_to",
    "stochastic_round_bf16",
    "stochastic_round_fp16",
    "stochastic_round_to",
    "Precision",
    "adam_step_lp",
    "sgd_step_lp",
    "run_adam_lp",
    "run_sgd_lp",
    "MASTER_KEY",
    "KAHAN_KEY",
]


class DecayScaling(str, Enum):
    """How decoupled weight decay is scaled each step (DESIGN.md).

    LR: p *= 1 - lr * weight_decay (torch, optax, Keras).
    SCHEDULE: p *= 1 - (lr / initial_lr) * weight_decay, the paper's
    eta_t * lambda with eta_t = lr / initial_lr.
    """

    LR = "lr"
    SCHEDULE = "schedule"


def _decay_factor(lr: float, weight_decay: float, decay_scaling: str,
                  initial_lr: Optional[float]) -> float:
    """The d in p *= 1 - d of decoupled decay; validates decay_scaling and initial_lr."""
    try:
        scaling = DecayScaling(decay_scaling)
    except ValueError:
        raise ValueError(
            f"decay_scaling must be 'lr' or 'schedule', got {decay_scaling!r}") from None
    if scaling is DecayScaling.LR:
        return lr * weight_decay
    if initial_lr is None:
        raise ValueError("decay_scaling='schedule' needs initial_lr (eta_t = lr / initial_lr)")
    if not initial_lr > 0.0:
        raise ValueError(f"initial_lr must be > 0 for decay_scaling='schedule', got {initial_lr!r}")
    return (lr / initial_lr) * weight_decay


def _check_param_grad(param: np.ndarray, grad) -> np.ndarray:
    """Validates param (updated in place, so it must be float64) and returns grad as float64."""
    if not isinstance(param, np.ndarray) or param.dtype != np.float64:
        raise TypeError(f"param must be a float64 numpy array, got "
                        f"{type(param).__name__} of dtype {getattr(param, 'dtype', None)}")
    g = np.asarray(grad, dtype=np.float64)
    if g.shape != param.shape:
        raise ValueError(f"grad has shape {g.shape}, param has shape {param.shape}")
    return g


def _effective_grad(param: np.ndarray, g: np.ndarray, *, weight_decay: float, maximize: bool,
                    decoupled: bool, grad_scale: Optional[float]) -> np.ndarray:
    """The gradient the update sees: unscaled, sign-flipped for maximize, L2 term added."""
    if grad_scale is not None:
        g = g / float(grad_scale)
    if maximize:
        g = -g
    if not decoupled and weight_decay != 0.0:
        g = g + weight_decay * param
    return g


def adam_step(param: np.ndarray, grad, state: dict, *, lr: float, betas: tuple[float, float],
              eps: float, weight_decay: float, amsgrad: bool = False, maximize: bool = False,
              decoupled: bool = True, decay_scaling: str = "lr",
              initial_lr: Optional[float] = None, grad_scale: Optional[float] = None,
              found_inf: bool = False) -> None:
    """One Adam (decoupled=False: L2) or AdamW (decoupled=True) step on one tensor.

    param: float64 array, updated in place. grad: any float array of param's
    shape (converted to float64). state: torch's keys, created on first use:
    'step' (int, or float if the caller stored a float), 'exp_avg',
    'exp_avg_sq', and 'max_exp_avg_sq' with amsgrad.
    decay_scaling "lr": p *= 1 - lr * weight_decay; "schedule":
    p *= 1 - (lr / initial_lr) * weight_decay (initial_lr > 0 required,
    checked in L2 mode too, where decay_scaling has no effect).
    grad_scale: grad is divided by it. found_inf (truthy): nothing changes, not
    even the step, and an empty state stays empty. Arguments are validated
    before found_inf is looked at.
    """
    g = _check_param_grad(param, grad)
    beta1, beta2 = (float(b) for b in betas)
    # Validated in L2 mode too, so a bad setting fails whatever the mode.
    decay = _decay_factor(lr, weight_decay, decay_scaling, initial_lr)
    if found_inf:
        return

    if "step" not in state:
        state["step"] = 0
        state["exp_avg"] = np.zeros_like(param)
        state["exp_avg_sq"] = np.zeros_like(param)
    if amsgrad and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = np.zeros_like(param)
    state["step"] += 1
    t = float(state["step"])

    g = _effective_grad(param, g, weight_decay=weight_decay, maximize=maximize,
                        decoupled=decoupled, grad_scale=grad_scale)
    if decoupled and weight_decay != 0.0:
        param *= 1.0 - decay

    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = beta1 * m + (1.0 - beta1) * g
    v[...] = beta2 * v + (1.0 - beta2) * g * g
    if amsgrad:
        vmax = state["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        v = vmax

    step_size = lr / (1.0 - beta1 ** t)
    bc2_sqrt = np.sqrt(1.0 - beta2 ** t)
    param -= step_size * m / (np.sqrt(v) / bc2_sqrt + eps)


def sgd_step(param: np.ndarray, grad, state: dict, *, lr: float, momentum: float = 0,
             dampening: float = 0, weight_decay: float = 0, nesterov: bool = False,
             maximize: bool = False, decoupled: bool = False, decay_scaling: str = "lr",
             initial_lr: Optional[float] = None, grad_scale: Optional[float] = None,
             found_inf: bool = False) -> None:
    """One SGD (decoupled=False: L2) or SGDW (decoupled=True) step on one tensor.

    state: torch.optim.SGD's keys: 'momentum_buffer', only with momentum != 0,
    absent before the first step (which sets buf = g, undamped, as torch does).
    There is no 'step' key, as in torch.optim.SGD. The other arguments mean
    what they mean in adam_step; found_inf leaves param and state untouched.
    """
    g = _check_param_grad(param, grad)
    # Validated in L2 mode too, so a bad setting fails whatever the mode.
    decay = _decay_factor(lr, weight_decay, decay_scaling, initial_lr)
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening == 0 (as in torch.optim.SGD)")
    if found_inf:
        return

    g = _effective_grad(param, g, weight_decay=weight_decay, maximize=maximize,
                        decoupled=decoupled, grad_scale=grad_scale)
    if decoupled and weight_decay != 0.0:
        param *= 1.0 - decay

    if momentum != 0:
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = g.copy()
        else:
            buf = state["momentum_buffer"]
            buf[...] = momentum * buf + (1.0 - dampening) * g
        buf = state["momentum_buffer"]
        g = g + momentum * buf if nesterov else buf

    param -= lr * g


def _lr_at(lrs: Union[float, Sequence[float]], i: int) -> float:
    return float(lrs) if np.isscalar(lrs) else float(lrs[i])


def _run(step_fn, params, grads_per_step, lrs, kw):
    ps = [np.array(p, dtype=np.float64, copy=True) for p in params]
    states: list[dict] = [{} for _ in ps]
    for i, grads in enumerate(grads_per_step):
        if len(grads) != len(ps):
            raise ValueError(f"step {i}: {len(grads)} grads for {len(ps)} params")
        lr = _lr_at(lrs, i)
        for p, g, s in zip(ps, grads, states):
            step_fn(p, g, s, lr=lr, **kw)
    return ps, states


def run_adam(params: Sequence[np.ndarray], grads_per_step: Sequence[Sequence[np.ndarray]],
             lrs: Union[float, Sequence[float]], **kw) -> tuple[list[np.ndarray], list[dict]]:
    """Runs adam_step over several tensors for len(grads_per_step) steps.

    params: initial values (copied to float64; the inputs are not modified).
    grads_per_step[i][j]: the grad of tensor j at step i. lrs: one lr, or one
    per step (lrs[i] is the lr of step i, e.g. read from a torch LR scheduler).
    kw: adam_step's keywords (betas, eps, weight_decay, ...).
    Returns (final params, their state dicts).
    """
    return _run(adam_step, params, grads_per_step, lrs, kw)


def run_sgd(params: Sequence[np.ndarray], grads_per_step: Sequence[Sequence[np.ndarray]],
            lrs: Union[float, Sequence[float]], **kw) -> tuple[list[np.ndarray], list[dict]]:
    """run_adam for sgd_step; kw are sgd_step's keywords."""
    return _run(sgd_step, params, grads_per_step, lrs, kw)


GradsFn = Callable[[int, np.ndarray], np.ndarray]


def paper_algorithm1(theta0, grads_fn: GradsFn, *, alpha: float, beta1: float, lam: float,
                     etas: Sequence[float], l2: bool = False) -> np.ndarray:
    """Algorithm 1 of the paper: SGD with momentum, with L2 (l2=True) or SGDW (l2=False).

    theta0: the initial parameter vector. grads_fn(t, theta): the gradient of
    the batch loss f_t at theta, t = 1, 2, ... etas[t-1] is eta_t, the
    schedule multiplier; len(etas) steps are run.
    l2=True adds lam * theta_{t-1} to the gradient (line 6) and does not decay;
    l2=False decays by eta_t * lam * theta_{t-1} in line 9 and adds no L2 term.
    Returns the trajectory, shape (len(etas) + 1, *theta0.shape): row t is theta_t.
    """
    theta = np.array(theta0, dtype=np.float64, copy=True)    # line 2: theta_{t=0}
    m = np.zeros_like(theta)                                  # line 2: m_{t=0} = 0
    traj = [theta.copy()]
    for t in range(1, len(etas) + 1):                         # lines 3-4: t <- t + 1
        g = np.asarray(grads_fn(t, theta.copy()), dtype=np.float64)   # line 5
        if l2:
            g = g + lam * theta                               # line 6
        eta = float(etas[t - 1])                              # line 7
        m = beta1 * m + eta * alpha * g                       # line 8
        if l2:
            theta = theta - m                                 # line 9, without decay
        else:
            theta = theta - m - eta * lam * theta             # line 9
        traj.append(theta.copy())
    return np.stack(traj)


def paper_algorithm2(theta0, grads_fn: GradsFn, *, alpha: float, beta1: float, beta2: float,
                     eps: float, lam: float, etas: Sequence[float],
                     l2: bool = False) -> np.ndarray:
    """Algorithm 2 of the paper: Adam with L2 (l2=True) or AdamW (l2=False).

    Arguments and the returned trajectory as in paper_algorithm1. l2=True adds
    lam * theta_{t-1} to the gradient (line 6) and does not decay; l2=False
    uses line 12's eta_t * lam * theta_{t-1} and adds no L2 term.
    """
    theta = np.array(theta0, dtype=np.float64, copy=True)    # line 2
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    traj = [theta.copy()]
    for t in range(1, len(etas) + 1):                         # lines 3-4
        g = np.asarray(grads_fn(t, theta.copy()), dtype=np.float64)   # line 5
        if l2:
            g = g + lam * theta                               # line 6
        m = beta1 * m + (1.0 - beta1) * g                     # line 7
        v = beta2 * v + (1.0 - beta2) * g * g                 # line 8
        m_hat = m / (1.0 - beta1 ** t)                        # line 9
        v_hat = v / (1.0 - beta2 ** t)                        # line 10
        eta = float(etas[t - 1])                              # line 11
        step = alpha * m_hat / (np.sqrt(v_hat) + eps)
        if l2:
            theta = theta - eta * step                        # line 12, without decay
        else:
            theta = theta - eta * (step + lam * theta)        # line 12
        traj.append(theta.copy())
    return np.stack(traj)


# ---------------------------------------------------------------------------
# The counter-based generator: Philox-4x32-10
# ---------------------------------------------------------------------------
# Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3"
# (SC'11) and Random123's philox.h: each round is two 32x32->64
# multiplications (the high and low halves feed a Feistel-like permutation of
# the four counter words), and the two key words are bumped by Weyl constants
# between rounds. Ten rounds: Random123's default, and what Triton's
# tl.randint, cuRAND's Philox4_32_10 and torch's CUDA RNG use. Counter words
# must be uint32 in Triton too: tl.philox switches to Philox-4x64 for 64-bit
# counters.

PHILOX_M4x32 = (0xD2511F53, 0xCD9E8D57)  # round multipliers M0, M1 (Random123's PHILOX_M4x32_0/1)
PHILOX_W32 = (0x9E3779B9, 0xBB67AE85)    # key bumps: golden ratio, sqrt(3) - 1, times 2**32
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_STREAM_WORDS = {"param": 0, "exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2,
                 "max_exp_avg_sq": 3}


def _u32(x) -> np.ndarray:
    """x (ints or arrays of ints in [0, 2**32)) as uint64 arrays, checked."""
    a = np.asarray(x)
    if a.dtype.kind not in "ui":
        a = np.asarray(x, dtype=object)
        if not all(isinstance(v, (int, np.integer)) for v in a.ravel()):
            raise TypeError(f"expected integer words, got {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF):
        raise ValueError("Philox words must be in [0, 2**32)")
    return a.astype(np.uint64)


def philox4x32(counter: Sequence, key: Sequence, rounds: int = PHILOX_ROUNDS
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Philox-4x32-R of Random123: counter (c0, c1, c2, c3) and key (k0, k1) -> 4 words.

    Each word may be an int or an array of ints in [0, 2**32); they broadcast.
    Returns four uint32 arrays (the output block x0, x1, x2, x3). One round:
        hi0:lo0 = M0 * c0,  hi1:lo1 = M1 * c2          (64-bit products)
        c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
    and between rounds k0 += W0, k1 += W1 (mod 2**32). This is Random123's
    philox4x32_R and Triton's ``tl.philox_impl`` (uint32 path) word for word.
    """
    c0, c1, c2, c3 = np.broadcast_arrays(*(_u32(w) for w in counter))
    c0, c1, c2, c3 = (np.array(w, dtype=np.uint64) for w in (c0, c1, c2, c3))
    k0, k1 = (_u32(k) for k in key)
    m0, m1 = (np.uint64(m) for m in PHILOX_M4x32)
    w0, w1 = (np.uint64(w) for w in PHILOX_W32)
    for r in range(rounds):
        if r:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
        p0 = m0 * c0   # < 2**64: a 32-bit by 32-bit product
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _MASK32)
    return tuple(w.astype(np.uint32) for w in (c0, c1, c2, c3))


def random_bits(seed: int, step: int, tensor_index: int, shape, *,
                elements: Optional[np.ndarray] = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four 32-bit random words of every element of one tensor at one step.

    Layout (fixed; every backend uses it):
        key     = (seed & 0xffffffff, seed >> 32)          seed in [0, 2**64)
        counter = (e & 0xffffffff, e >> 32, tensor_index, step)
    e is the element's index in storage order (0 .. numel - 1; ``elements``
    overrides it), tensor_index and step are in [0, 2**32); step is the step
    count after the increment (1 on the first step). This is what Triton's
    ``tl.philox(seed, e_lo, e_hi, tensor_index, step)`` computes with uint32
    counters, and with tensor_index = step = 0 word 0 is
    ``tl.randint(seed, e)``. Word 0 rounds the param; words 1, 2, 3 round
    exp_avg (or momentum_buffer), exp_avg_sq, max_exp_avg_sq.
    Returns four uint32 arrays of ``shape``.
    """
    seed, step, tensor_index = int(seed), int(step), int(tensor_index)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    for name, v in (("step", step), ("tensor_index", tensor_index)):
        if not 0 <= v < 2 ** 32:
            raise ValueError(f"{name} must be in [0, 2**32), got {v}")
    shape = (int(shape),) if np.isscalar(shape) else tuple(int(d) for d in shape)
    n = int(np.prod(shape, dtype=np.int64))
    e = (np.arange(n, dtype=np.uint64) if elements is None
         else np.asarray(elements, dtype=np.uint64).reshape(-1))
    if e.size != n:
        raise ValueError(f"{e.size} element indices for a tensor of {n} elements")
    words = philox4x32((e & _MASK32, e >> np.uint64(32), tensor_index, step),
                       (seed & 0xFFFFFFFF, seed >> 32))
    return tuple(w.reshape(shape) for w in words)


# ---------------------------------------------------------------------------
# Rounding to the storage dtypes
# ---------------------------------------------------------------------------
# Every value is first rounded to float32 (round to nearest even), as the
# kernels hold it, and then to the 16-bit format: the reference rounds twice
# exactly where a kernel does. Results are float64 arrays of representable
# values (bits=True: the uint16 patterns, bfloat16 only).

_BF16_NAN = 0x7FC0  # the quiet NaN torch writes (c10::round_to_nearest_even)
_FORMATS = {
    # name: (significand bits p incl. the implicit one, smallest ulp, largest finite)
    "bfloat16": (8, 2.0 ** -133, (2.0 - 2.0 ** -7) * 2.0 ** 127),
    "float16": (11, 2.0 ** -24, 65504.0),
}


def _fp32(x) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float64).astype(np.float32)


def _bf16_value(b16: np.ndarray) -> np.ndarray:
    return (b16.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)


def _random16(r, shape) -> np.ndarray:
    r = np.broadcast_to(np.asarray(r), shape)
    if r.dtype.kind not in "ui" or (r.size and (r.min() < 0 or r.max() > 0xFFFF)):
        raise ValueError("random bits must be integers in [0, 2**16) (the low 16 bits of a word)")
    return r.astype(np.uint64)


def round_bf16(x, *, bits: bool = False) -> np.ndarray:
    """Round to nearest even bfloat16, through float32.

    bits16 = (u + 0x7fff + ((u >> 16) & 1)) >> 16 with u the float32 pattern:
    ties to even, values at or above (max + half an ulp) become inf, NaN
    becomes 0x7fc0. torch's float -> bfloat16 conversion, bit for bit.
    """
    f = _fp32(x)
    u = f.view(np.uint32).astype(np.uint64)
    b = ((u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16))
    b = np.where(np.isnan(f), np.uint64(_BF16_NAN), b).astype(np.uint16)
    return b if bits else _bf16_value(b)


def stochastic_round_bf16(x, r, *, bits: bool = False) -> np.ndarray:
    """Stochastic rounding to bfloat16 with 16 random bits per element.

    u = the float32 pattern of x (x rounded to float32 first), r in [0, 2**16)
    (the low 16 bits of the element's Philox word):
        bits16 = (u + r) >> 16            (32-bit unsigned add, then truncate)
    The carry into bit 16 happens for r >= 2**16 - (u & 0xffff), so |x| is
    rounded away from zero with probability (u & 0xffff) / 2**16, exactly the
    distance from the bfloat16 value below (toward zero) over the spacing:
    E[SR(x)] = fp32(x). Signs are symmetric (sign-magnitude patterns). Values
    a bfloat16 represents (low 16 bits zero) stay exact, zeros keep their sign,
    +-inf stay (no carry), NaN becomes 0x7fc0 (its payload could otherwise carry
    into an inf). A finite value above the largest bfloat16 (0x7f7f, 3.3895e38)
    rounds to it or, with the distance ratio, to inf: inf takes the place of
    the next value 2**128, as in the bit arithmetic.
    """
    f = _fp32(x)
    u = f.view(np.uint32).astype(np.uint64)
    b = (u + _random16(r, u.shape)) >> np.uint64(16)
    b = np.where(np.isnan(f), np.uint64(_BF16_NAN), b).astype(np.uint16)
    return b if bits else _bf16_value(b)


def round_fp16(x) -> np.ndarray:
    """Round to nearest even float16, through float32 (IEEE: values at or above
    65520 become inf; subnormals down to 2**-24)."""
    with np.errstate(over="ignore"):
        return _fp32(x).astype(np.float16).astype(np.float64)


def _stochastic_round(x, r, fmt: str) -> np.ndarray:
    """The stochastic rounding rule for any binary format, by arithmetic.

    With a = |fp32(x)|, ulp its spacing in the format (2**(exponent - p + 1),
    at least the subnormal spacing), lo = a truncated to a multiple of ulp and
    f16 = floor((a - lo) / ulp * 2**16) (the top 16 bits of the dropped
    fraction): the result is lo + ulp when f16 + r >= 2**16, else lo, with x's
    sign; above the largest finite value it is inf. For bfloat16 this is
    stochastic_round_bf16's bit rule (f16 is the low 16 bits of u exactly).
    """
    p, min_ulp, largest = _FORMATS[fmt]
    f = _fp32(x).astype(np.float64)
    a = np.abs(f)
    finite = np.isfinite(a)
    af = np.where(finite, a, 0.0)
    _, e = np.frexp(af)                      # af = m * 2**e, m in [0.5, 1)
    ulp = np.maximum(np.ldexp(1.0, e - p), min_ulp)
    lo = np.floor(af / ulp) * ulp
    f16 = np.floor((af - lo) / ulp * 65536.0)
    up = f16 + _random16(r, a.shape).astype(np.float64) >= 65536.0
    mag = lo + np.where(up, ulp, 0.0)
    mag = np.where(mag > largest, np.inf, mag)
    mag = np.where(finite, mag, a)           # inf stays inf, NaN stays NaN
    return np.copysign(mag, f)


def stochastic_round_fp16(x, r) -> np.ndarray:
    """Stochastic rounding to float16 with 16 random bits per element.

    The rule of stochastic_round_bf16 written for float16 (``_stochastic_round``):
    |x| goes to the float16 value above with probability f16 / 2**16, f16 the
    top 16 bits of the fraction of a float16 spacing that truncation drops
    (exact for normal float16, where float32 has 13 bits below; truncated to 16
    bits below float16's subnormal spacing). Above 65504 the value above is inf.
    """
    return _stochastic_round(x, r, "float16")


def round_to(x, dtype: str, r=None) -> np.ndarray:
    """x stored in dtype ("float64", "float32", "bfloat16", "float16"): round to
    nearest even, or stochastically (16-bit dtypes) when random bits r are given."""
    if dtype == "float64":
        return np.array(x, dtype=np.float64, copy=True)
    if dtype == "float32":
        return _fp32(x).astype(np.float64)
    if dtype == "bfloat16":
        return round_bf16(x) if r is None else stochastic_round_bf16(x, r)
    if dtype == "float16":
        return round_fp16(x) if r is None else stochastic_round_fp16(x, r)
    raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")


def stochastic_round_to(x, dtype: str, r) -> np.ndarray:
    """round_to with random bits (16-bit dtypes only)."""
    if dtype not in _SIXTEEN_BIT:
        raise ValueError(f"stochastic rounding is defined for {_SIXTEEN_BIT}, got {dtype!r}")
    return round_to(x, dtype, r)


# ---------------------------------------------------------------------------
# Precision options: state dtype, master weights, stochastic rounding, Kahan
# ---------------------------------------------------------------------------

_DTYPES = ("float64", "float32", "bfloat16", "float16")
_SIXTEEN_BIT = ("bfloat16", "float16")
_STATE_DTYPES = (None, "float32", "bfloat16")
MASTER_KEY = "master_param"   # the fp32 copy (master_weights=True)
KAHAN_KEY = "kahan_comp"      # the 16-bit compensation (kahan_summation=True; optimi's name)


@dataclass(frozen=True)
class Precision:
    """How a tensor and its state are stored (issue 12).

    param_dtype: storage dtype of the param ("float64", "float32", "bfloat16",
    "float16"). state_dtype: None (the param's dtype, as torch), "float32" or
    "bfloat16" (not for float64 params). For 16-bit params, at most one of
    master_weights, stochastic_rounding, kahan_summation.
    """

    param_dtype: str = "float64"
    state_dtype: Optional[str] = None
    master_weights: bool = False
    stochastic_rounding: bool = False
    kahan_summation: bool = False

    def __post_init__(self):
        if self.param_dtype not in _DTYPES:
            raise ValueError(f"param_dtype must be one of {_DTYPES}, got {self.param_dtype!r}")
        if self.state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be one of {_STATE_DTYPES}, "
                             f"got {self.state_dtype!r}")
        if self.state_dtype == "bfloat16" and self.param_dtype == "float64":
            raise ValueError("state_dtype='bfloat16' is not supported for float64 params")
        chosen = [n for n in ("master_weights", "stochastic_rounding", "kahan_summation")
                  if getattr(self, n)]
        if len(chosen) > 1:
            raise ValueError(f"at most one of master_weights, stochastic_rounding, "
                             f"kahan_summation; got {' and '.join(chosen)}")
        if chosen and self.param_dtype not in _SIXTEEN_BIT:
            raise ValueError(f"{chosen[0]}=True needs bfloat16 or float16 params, "
                             f"got {self.param_dtype}")

    @property
    def stored_state_dtype(self) -> str:
        return self.state_dtype or self.param_dtype


def _lp_step(base_step, param: np.ndarray, grad, state: dict, precision: Precision,
             seed: int, tensor_index: int, kw: dict) -> None:
    """The shared body of adam_step_lp / sgd_step_lp (see adam_step_lp)."""
    prec = precision
    if not isinstance(prec, Precision):
        raise TypeError(f"precision must be a Precision, got {type(prec).__name__}")
    _check_param_grad(param, grad)
    if not np.array_equal(round_to(param, prec.param_dtype), param, equal_nan=True):
        raise ValueError(f"param holds values a {prec.param_dtype} cannot store")
    is_adam = base_step is adam_step
    # Working copies in float64: the update reads the stored values exactly.
    work = {k: (np.array(v, dtype=np.float64) if isinstance(v, np.ndarray) else v)
            for k, v in state.items() if k not in (MASTER_KEY, KAHAN_KEY)}
    if not is_adam:
        work.pop("step", None)
    old = param.copy()
    if prec.master_weights and MASTER_KEY in state:
        x = np.array(state[MASTER_KEY], dtype=np.float64)
    else:
        x = old.copy()
    base_step(x, grad, work, **kw)   # validates every argument, then honours found_inf
    if kw.get("found_inf"):
        return

    if is_adam:
        t = int(work["step"])
    else:
        t = int(state.get("step", 0)) + 1
    sr = prec.stochastic_rounding
    words = random_bits(seed, t, tensor_index, param.shape) if sr else None

    def r16(name):
        return None if words is None else words[_STREAM_WORDS[name]] & np.uint32(0xFFFF)

    sdtype = prec.stored_state_dtype
    for k, v in work.items():
        if isinstance(v, np.ndarray):
            state[k] = round_to(v, sdtype, r16(k) if sdtype in _SIXTEEN_BIT else None)
        else:
            state[k] = v
    if sr and not is_adam:
        state["step"] = t

    pdtype = prec.param_dtype
    if prec.master_weights:
        master = round_to(x, "float32")
        state[MASTER_KEY] = master
        param[...] = round_to(master, pdtype)
    elif prec.kahan_summation:
        comp = state.get(KAHAN_KEY)
        comp = np.zeros_like(param) if comp is None else np.asarray(comp, dtype=np.float64)
        u = comp + (x - old)                  # this step's update plus what was dropped before
        new = round_to(old + u, pdtype)
        state[KAHAN_KEY] = round_to(u - (new - old), pdtype)
        param[...] = new
    else:
        param[...] = round_to(x, pdtype, r16("param") if sr else None)


def adam_step_lp(param: np.ndarray, grad, state: dict, *, precision: Precision,
                 seed: int = 0, tensor_index: int = 0, **kw) -> None:
    """adam_step for a tensor stored as ``precision`` says.

    param: float64 array of values the param dtype represents, updated in
    place; state: as adam_step's, plus 'master_param' (float32 values,
    master_weights) or 'kahan_comp' (param-dtype values, kahan_summation).
    kw: adam_step's keywords. seed, tensor_index: the generator's key and
    counter word 2 (stochastic_rounding). One step:

    1. x = the master copy (master_weights; the param's value on the first
       step) or the param; state read at its stored values. adam_step runs on
       x and the state in float64 (the kernels: float32); t = the new step.
    2. State entries are stored in state_dtype (None: the param's dtype):
       round to nearest even, or, with stochastic_rounding and a 16-bit state,
       stochastically with words 1 (exp_avg), 2 (exp_avg_sq), 3 (max_exp_avg_sq)
       of random_bits(seed, t, tensor_index).
    3. The param, from its old value p and the new x:
       * plain: p = RN(x) in the param dtype;
       * master_weights: master = RN_fp32(x); p = RN(master);
       * stochastic_rounding: p = SR(x) with word 0;
       * kahan_summation (optimi's update; Kahan, "Further remarks on reducing
         truncation errors", CACM 8(1), 1965): with c the stored compensation
         (zero at first), u = c + (x - p); p' = RN(p + u); c' = RN(u - (p' - p)),
         both in the param dtype: c carries what rounding p dropped.
    found_inf: nothing changes.
    """
    _lp_step(adam_step, param, grad, state, precision, seed, tensor_index, kw)


def sgd_step_lp(param: np.ndarray, grad, state: dict, *, precision: Precision,
                seed: int = 0, tensor_index: int = 0, **kw) -> None:
    """sgd_step for a tensor stored as ``precision`` says; see adam_step_lp.

    momentum_buffer is rounded with word 1. torch's SGD keeps no step count;
    with stochastic_rounding this model keeps 'step' (int, the step after the
    increment) because the generator's counter needs it.
    """
    _lp_step(sgd_step, param, grad, state, precision, seed, tensor_index, kw)


def _run_lp(step_fn, params, grads_per_step, lrs, precision, seed, kw):
    ps = [round_to(p, precision.param_dtype) for p in params]
    states: list[dict] = [{} for _ in ps]
    for i, grads in enumerate(grads_per_step):
        if len(grads) != len(ps):
            raise ValueError(f"step {i}: {len(grads)} grads for {len(ps)} params")
        lr = _lr_at(lrs, i)
        for j, (p, g, s) in enumerate(zip(ps, grads, states)):
            step_fn(p, g, s, precision=precision, seed=seed, tensor_index=j, lr=lr, **kw)
    return ps, states


def run_adam_lp(params, grads_per_step, lrs, *, precision: Precision, seed: int = 0, **kw):
    """run_adam with adam_step_lp: params are rounded to the param dtype first;
    tensor j of the list has tensor_index j."""
    return _run_lp(adam_step_lp, params, grads_per_step, lrs, precision, seed, kw)


def run_sgd_lp(params, grads_per_step, lrs, *, precision: Precision, seed: int = 0, **kw):
    """run_adam_lp for sgd_step_lp."""
    return _run_lp(sgd_step_lp, params, grads_per_step, lrs, precision, seed, kw)
