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
"""
from __future__ import annotations

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
