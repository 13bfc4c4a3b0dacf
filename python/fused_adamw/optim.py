"""The optimizer classes: drop-in replacements for torch.optim.AdamW, Adam, SGD,
plus SGDW and the paper's schedule-scaled decay.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization": Algorithm 2
(Adam with L2 regularization, or AdamW: decay outside the adaptive step) and
Algorithm 1 (SGD with L2, or SGDW), with the schedule multiplier eta_t.

These classes validate arguments, own `param_groups` and `state` under torch's
names and layout (so state dicts move both ways between this package and
torch.optim), compute the per-step scalars once per group, and make one call
into dispatch.py. The per-element math is in csrc/include/fused_adamw/update.h
(and its Triton and foreach mirrors), never here.

Decay conventions (`decay_scaling`):
  "lr"        p <- p * (1 - lr * weight_decay)            torch, optax, Keras
  "schedule"  p <- p * (1 - eta_t * weight_decay),        the paper
              eta_t = lr / initial_lr
`initial_lr` is the group's "initial_lr" (set by torch's LR schedulers) or,
when absent, the lr the group had when the optimizer first saw it (kept in the
group as "decay_base_lr", so it survives a state-dict round trip).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from . import dispatch
from .hyper import AdamHyper, SgdHyper

DECAY_SCALINGS = ("lr", "schedule")

# Group keys this package adds to torch's; carried over from the optimizer's own
# configuration when a state dict that lacks them (one saved by torch.optim) is loaded.
_OWN_KEYS = ("decay_scaling", "state_dtype", "backend", "decay_base_lr", "decoupled_weight_decay")


def _as_float(x: Any, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} as a Tensor must have one element, got shape {tuple(x.shape)}")
        return float(x.item())
    try:
        return float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {type(x).__name__}") from None


class _VersionedState(defaultdict):
    """torch's `Optimizer.state` (a defaultdict of per-param dicts) that counts
    its assignments, so the per-step gather cache sees `opt.state[p] = {...}`
    in O(1). state_dict() copies its items into plain dicts, so checkpoints
    hold no trace of this class."""

    def __init__(self, *args) -> None:
        super().__init__(dict, *args)
        self.version = 0

    def __setitem__(self, key, value) -> None:
        self.version += 1
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self.version += 1
        super().__delitem__(key)

    def _bump(name):  # noqa: N805 - a helper that builds methods
        def method(self, *args, **kwargs):
            self.version += 1
            return getattr(defaultdict, name)(self, *args, **kwargs)
        method.__name__ = name
        return method

    pop = _bump("pop")
    popitem = _bump("popitem")
    clear = _bump("clear")
    update = _bump("update")
    setdefault = _bump("setdefault")
    del _bump

    def __reduce__(self):
        return (_VersionedState, (dict(self),))


class _FusedOptimizer(Optimizer):
    """Shared plumbing: argument checks, state-dict compatibility, AMP hooks."""

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        if defaults.get("differentiable"):
            raise ValueError(
                "differentiable=True is not supported: fused kernels update in place outside autograd; "
                "use torch.optim with differentiable=True"
            )
        self._caches: dict[int, dict] = {}
        super().__init__(params, defaults)
        self.state = _VersionedState(self.state)
        # GradScaler hands grad_scale / found_inf to step() as attributes
        # instead of unscaling the grads itself (one pass fewer over memory).
        self._step_supports_amp_scaling = True

    # ------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
            if id(p) in seen:
                raise ValueError(
                    f"params[{i}] appears twice in one parameter group; a fused step would update it twice"
                )
            seen.add(id(p))
        param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        group.setdefault("decay_base_lr", _as_float(group["lr"], "lr"))

    def _check_group(self, group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"lr as a Tensor must have one element, got shape {tuple(lr.shape)}")
        lr_value = _as_float(lr, "lr")
        if not lr_value >= 0.0:
            raise ValueError(f"Invalid learning rate: lr={lr_value} (must be >= 0)")
        wd = group["weight_decay"]
        if not _as_float(wd, "weight_decay") >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {wd} (must be >= 0)")
        if group["decay_scaling"] not in DECAY_SCALINGS:
            raise ValueError(f"Invalid decay_scaling={group['decay_scaling']!r}: expected one of {DECAY_SCALINGS}")
        if group["backend"] not in dispatch.BACKENDS:
            raise ValueError(f"Invalid backend={group['backend']!r}: expected one of {dispatch.BACKENDS}")
        sd = group["state_dtype"]
        if sd is not None and sd != torch.float32:
            raise ValueError(f"Invalid state_dtype={sd}: expected None (the param's dtype) or torch.float32")
        if group.get("differentiable"):
            raise ValueError("differentiable=True is not supported by fused_adamw")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("decay_base_lr", _as_float(group["lr"], "lr"))
        if not isinstance(self.state, _VersionedState):
            self.state = _VersionedState(self.state)
        self._caches = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, then this package's conventions.

        Group keys: hyperparameters come from the saved dict, as in torch; the
        keys this package adds come from the saved dict when it has them (one
        saved by this package) and otherwise stay as this optimizer has them
        (one saved by torch.optim); `backend` always stays, since it says where
        this process runs, not how training goes.
        State: steps become float32 tensors on the param's device (where the
        kernels read them); state tensors are re-read from the saved tensors in
        the group's state dtype (torch's load casts them to the param dtype,
        which would round the float32 state of 16-bit params)."""
        mine = [{k: g[k] for k in _OWN_KEYS if k in g} for g in self.param_groups]
        missing = [[k for k in _OWN_KEYS if k not in sg or k == "backend"] for sg in state_dict["param_groups"]]
        saved_state = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        for group, own, keys in zip(self.param_groups, mine, missing):
            for k in keys:
                if k in own:
                    group[k] = own[k]
            if self._fixed_decoupled():
                group["decoupled_weight_decay"] = True
        state_dtype_of = {id(p): g["state_dtype"] for g in self.param_groups for p in g["params"]}
        params = [p for g in self.param_groups for p in g["params"]]
        for sid, p in zip(saved_ids, params):
            st = self.state.get(p)
            if not st or sid not in saved_state:
                continue
            sd = state_dtype_of[id(p)] or p.dtype
            for key, value in saved_state[sid].items():
                if key == "step":
                    st[key] = torch.as_tensor(value).detach().to(device=p.device, dtype=torch.float32).clone()
                elif isinstance(value, torch.Tensor) and value.shape == p.shape:
                    t = torch.empty_like(p, dtype=sd)
                    st[key] = t.copy_(value.detach())

    def _fixed_decoupled(self) -> bool:
        """AdamW and SGDW always decouple, whatever a loaded dict says."""
        return False

    # ------------------------------------------------------------ per step
    def _decay_coeff(self, group: dict[str, Any], lr: float) -> float:
        wd = float(group["weight_decay"])
        if group["decay_scaling"] == "lr" or wd == 0.0:
            return wd
        initial = group.get("initial_lr", group["decay_base_lr"])
        initial = _as_float(initial, "initial_lr")
        if initial <= 0.0:
            raise ValueError(
                f"decay_scaling='schedule' divides by the initial lr, which is {initial}; "
                "give the group a positive lr (or initial_lr)"
            )
        return wd / initial

    def _lr(self, group: dict[str, Any]) -> tuple[float, Optional[torch.Tensor]]:
        """(lr as a float, lr as a device tensor for capturable steps or None)."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and group.get("capturable"):
            return float("nan"), lr
        return _as_float(lr, "lr"), None

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step for every param group; GradScaler's grad_scale / found_inf
        attributes, when set, are applied inside the fused call."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, grad_scale, found_inf)
        return loss

    def _step_group(self, gi: int, group: dict[str, Any], grad_scale, found_inf) -> None:
        raise NotImplementedError

    def _cache(self, index: int) -> dict:
        return self._caches.setdefault(index, {})

    def _gather(self, gi: int, group: dict[str, Any]):
        """(params, grads, per-param state dicts, the params as the user holds
        them, any complex) for the params of group `gi` that have a grad;
        complex params and grads as real views.

        A step on thousands of small tensors is mostly this loop, so what only
        changes when the group's params, their grad presence or opt.state
        change (which params, their state dicts, complex views) is cached;
        grads are read every step. Any assignment to opt.state (a versioned
        dict) rebuilds the cache, and state tensors are read from the per-param
        dicts every step, so replacing opt.state[p]["exp_avg"] is seen too."""
        all_params = group["params"]
        all_grads = [p.grad for p in all_params]
        has = [g is not None for g in all_grads]
        cache = self._cache(gi)
        hit = cache.get("gather")
        version = (id(self.state), self.state.version)
        if hit is None or hit[0] is not all_params or hit[1] != has or hit[-1] != version:
            params, states, users, cplx = [], [], [], False
            for p, h in zip(all_params, has):
                if h:
                    st = self.state[p]
                    if not st:
                        self._init_state(p, group, st)
                    states.append(st)
                    users.append(p)
                    cplx = cplx or p.is_complex()
                    params.append(torch.view_as_real(p) if p.is_complex() else p)
            hit = (all_params, has, params, states, users, cplx, (id(self.state), self.state.version))
            cache["gather"] = hit
        _, _, params, states, users, cplx, _ = hit
        grads = all_grads if all(has) else [g for g in all_grads if g is not None]
        if cplx:
            grads = [_real(g) for g in grads]
        return params, grads, states, users, cplx


def _real(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return torch.view_as_real(t) if t is not None and t.is_complex() else t


def _column(states: list[dict], key: str, cplx: bool) -> list[torch.Tensor]:
    """state[key] of every param (real views where complex), at C speed."""
    column = list(map(operator.itemgetter(key), states))
    return [_real(t) for t in column] if cplx else column


class _AlwaysDecoupled:
    """AdamW and SGDW decouple their decay whatever a loaded state dict says
    (torch's AdamW keeps the same guarantee)."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def _fixed_decoupled(self) -> bool:
        return True


class Adam(_FusedOptimizer):
    """torch.optim.Adam's interface (L2 decay unless decoupled_weight_decay=True),
    fused. Extra keywords: decay_scaling, state_dtype, backend."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 decay_scaling: str = "lr", state_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto") -> None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        # Plain floats, as torch keeps them; ranges are checked per group.
        betas = (_as_float(betas[0], "betas[0]"), _as_float(betas[1], "betas[1]"))
        eps = _as_float(eps, "eps")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, decay_scaling=decay_scaling,
                        state_dtype=state_dtype, backend=backend)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        b1, b2 = group["betas"]
        for i, b in enumerate((b1, b2)):
            if not 0.0 <= _as_float(b, f"betas[{i}]") < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b} (must be in [0, 1))")
        if not _as_float(group["eps"], "eps") >= 0.0:
            raise ValueError(f"Invalid epsilon value: eps={group['eps']} (must be >= 0)")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        sd = group["state_dtype"] or p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)

    def _step_group(self, gi: int, group: dict[str, Any], grad_scale, found_inf) -> None:
        params, grads, states, _, cplx = self._gather(gi, group)
        if not params:
            return
        amsgrad = group["amsgrad"]
        m = _column(states, "exp_avg", cplx)
        v = _column(states, "exp_avg_sq", cplx)
        vmax = None
        if amsgrad:
            for st in states:
                if "max_exp_avg_sq" not in st:  # amsgrad switched on after the first step
                    st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])
            vmax = _column(states, "max_exp_avg_sq", cplx)
        steps = _column(states, "step", False)
        lr, lr_tensor = self._lr(group)
        beta1, beta2 = group["betas"]
        decoupled = bool(group["decoupled_weight_decay"])
        hyper = AdamHyper(
            lr=lr, beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decay_coeff=self._decay_coeff(group, lr if lr_tensor is None else 1.0) if decoupled else 0.0,
            decoupled=decoupled, amsgrad=bool(amsgrad), maximize=bool(group["maximize"]),
        )
        dispatch.adam_step(
            self._cache(gi), group["backend"], params, grads, m, v, vmax, steps,
            hyper, state_dtype=group["state_dtype"], lr_tensor=lr_tensor,
            grad_scale=grad_scale, found_inf=found_inf,
        )


class AdamW(_AlwaysDecoupled, Adam):
    """torch.optim.AdamW (Algorithm 2 with decoupled decay), fused.

    decay_scaling="lr" (default) decays by lr * weight_decay like torch;
    "schedule" decays by eta_t * weight_decay, eta_t = lr / initial_lr, as in
    the paper, so the decay follows an LR scheduler but not the base lr."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decay_scaling: str = "lr",
                 state_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, decay_scaling=decay_scaling,
                         state_dtype=state_dtype, backend=backend)


class SGD(_FusedOptimizer):
    """torch.optim.SGD's interface (L2 weight decay), fused. Extra keywords:
    decoupled_weight_decay, decay_scaling, state_dtype, backend."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: bool = False, decay_scaling: str = "lr",
                 state_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> None:
        # Plain floats; ranges are checked per group.
        momentum = _as_float(momentum, "momentum")
        dampening = _as_float(dampening, "dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay,
                        decay_scaling=decay_scaling, state_dtype=state_dtype, backend=backend)
        super().__init__(params, defaults)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        momentum = _as_float(group["momentum"], "momentum")
        if not momentum >= 0.0:
            raise ValueError(f"Invalid momentum value: momentum={momentum} (must be >= 0)")
        if group["nesterov"] and (momentum <= 0.0 or float(group["dampening"]) != 0.0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """torch.optim.SGD keeps no state until the first step with momentum."""

    def _step_group(self, gi: int, group: dict[str, Any], grad_scale, found_inf) -> None:
        momentum = float(group["momentum"])
        params, grads, states, users, cplx = self._gather(gi, group)
        if not params:
            return
        bufs = first = None
        new_bufs = {}
        if momentum != 0.0:
            bufs = [st.get("momentum_buffer") for st in states]
            first = [b is None for b in bufs]
            if any(first):
                if found_inf is not None and float(found_inf) != 0.0:
                    # A skipped first step leaves no buffer behind: the
                    # next step starts the buffer from its own gradient.
                    return
                for i in (i for i, f in enumerate(first) if f):
                    buf = torch.empty_like(params[i], dtype=group["state_dtype"] or params[i].dtype)
                    new_bufs[i] = buf
                    bufs[i] = buf
            if cplx:
                bufs = [_real(b) for b in bufs]
        lr, lr_tensor = self._lr(group)
        decoupled = bool(group["decoupled_weight_decay"])
        hyper = SgdHyper(
            lr=lr, momentum=momentum, dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            decay_coeff=self._decay_coeff(group, lr) if decoupled else 0.0,
            decoupled=decoupled, nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
        )
        dispatch.sgd_step(
            self._cache(gi), group["backend"], params, grads, bufs, first, hyper,
            state_dtype=group["state_dtype"], lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
        )
        for i, buf in new_bufs.items():  # stored once the step has filled them
            states[i]["momentum_buffer"] = torch.view_as_complex(buf) if users[i].is_complex() else buf


class SGDW(_AlwaysDecoupled, SGD):
    """SGD with decoupled weight decay (Algorithm 1, SGDW): p <- p*(1 - d) - lr*update,
    d = lr * weight_decay ("lr") or eta_t * weight_decay ("schedule")."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 decay_scaling: str = "lr", state_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto") -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, decay_scaling=decay_scaling,
                         state_dtype=state_dtype, backend=backend)
