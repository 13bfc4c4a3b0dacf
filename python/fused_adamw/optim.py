"""The optimizer classes: drop-in replacements for torch.optim.AdamW, Adam, SGD,
plus SGDW and the paper's schedule-scaled decay.

Loshchilov & Hutter, "Decoupled Weight Decay Regularization": Algorithm 2
(Adam with L2 regularization, or AdamW: decay outside the adaptive step) and
Algorithm 1 (SGD with L2, or SGDW), with the schedule multiplier eta_t.

These classes validate arguments, own `param_groups` and `state` under torch's
names and layout (so state dicts move both ways between this package and
torch.optim), compute the per-step scalars once per group, and hand each
group to its plan (plan.py), which owns everything a step keeps between
steps and calls the backends. The per-element math is in csrc/include/fused_adamw/update.h
(and its Triton and foreach mirrors), never here.

Decay conventions (`decay_scaling`):
  "lr"        p <- p * (1 - lr * weight_decay)            torch, optax, Keras
  "schedule"  p <- p * (1 - eta_t * weight_decay),        the paper
              eta_t = lr / decay_base_lr
`decay_base_lr`, the lr at which eta_t = 1, is the keyword when given, else
the group's "initial_lr" (set by torch's LR schedulers), else the lr the group
had when the optimizer first saw it (kept as "first_lr", so it survives a
state-dict round trip).

Precision and memory (group keys, every class and backend; the float64 model
of each is in fused_adamw.reference, `adam_step_lp`):
  state_dtype          None (the param's dtype, as torch), torch.float32 (for
                       16-bit params) or torch.bfloat16 (any but float64):
                       the storage of the moments; math is float32 regardless
  master_weights       16-bit params: a float32 copy in state["master_param"]
                       takes the update; the param is its rounding to nearest
  stochastic_rounding  16-bit params: the param (and 16-bit state) is rounded
                       up or down with the probability that makes its expected
                       value the float32 result; the random bits are
                       Philox-4x32-10 keyed on the group's `seed` with counter
                       (element, the param's number in state_dict(), step)
  kahan_summation      16-bit params: state["kahan_comp"] (param dtype)
                       carries what rounding the param dropped into the next step
  seed                 the generator's key, in [0, 2**63); None:
                       torch.initial_seed() when the group is added (no draw
                       from torch's generator). In the state dict with
                       stochastic_rounding only.
At most one of the three options per group; they need float16/bfloat16
params. The options torch lacks run eagerly under torch.compile.
"""
from __future__ import annotations

import numbers
import warnings
from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch.optim import Optimizer

from . import dispatch, ops
from .hyper import PRECISION_NEAREST, PRECISION_OPTIONS, AdamHyper, SgdHyper, precision_code
from .plan import _PLAIN, KAHAN_KEY, MASTER_KEY, STATE_DTYPES, GroupPlan, check_precision_params

DECAY_SCALINGS = ("lr", "schedule")

# Group keys this package adds to torch's; carried over from the optimizer's own
# configuration when a state dict that lacks them (one saved by torch.optim) is loaded.
_OWN_KEYS = ("decay_scaling", "state_dtype", "backend", "decay_base_lr", "first_lr", "decoupled_weight_decay",
             "master_weights", "stochastic_rounding", "kahan_summation", "seed")
# Their values at which this package behaves as torch.optim (state_dict leaves them out).
_TORCH_VALUES = {"decay_scaling": "lr", "state_dtype": None, "decay_base_lr": None, "master_weights": False,
                 "stochastic_rounding": False, "kahan_summation": False}
SEED_LIMIT = 2 ** 63  # seeds are in [0, 2**63)


def _group_seed(group: dict[str, Any]) -> int:
    """The group's generator key; None (a group made before the key existed,
    or a user's reset) is resolved as add_param_group does."""
    seed = group.get("seed")
    if seed is None:
        seed = group["seed"] = torch.initial_seed() % SEED_LIMIT
    return int(seed)


class DecayScheduleWarning(UserWarning):
    """decay_scaling="schedule" with a setting that is almost certainly a
    mistake (README.md, "Decay conventions")."""


def _as_float(x: Any, name: str) -> float:
    """A hyperparameter as a float: numbers and 1-element tensors; a string
    (from a config file, say) is a TypeError, as in torch.optim."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element")
        return float(x.item())
    if isinstance(x, (str, bytes)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(x).__name__} {x!r}")
    return float(x)


class _VersionedDict(dict):
    """A param's state dict that bumps its optimizer state's version on every
    assignment, so the plan (plan.py) sees `opt.state[p]["exp_avg"] = t` in
    O(1). Reads are a plain dict's."""

    __slots__ = ("_owner",)

    def __init__(self, owner: "_VersionedState", *args) -> None:
        super().__init__(*args)
        self._owner = owner

    def __reduce__(self):
        return (dict, (dict(self),))


def _bumping(base, name: str):
    def method(self, *args, **kwargs):
        (self if isinstance(self, _VersionedState) else self._owner).version += 1
        return getattr(base, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("__setitem__", "__delitem__", "pop", "popitem", "clear", "update", "setdefault"):
    setattr(_VersionedDict, _name, _bumping(dict, _name))


class _VersionedState(defaultdict):
    """torch's `Optimizer.state` (a defaultdict of per-param dicts) that counts
    assignments to itself and to the per-param dicts it holds (each held as a
    _VersionedDict). state_dict() copies into plain dicts, so checkpoints hold
    no trace of these classes."""

    def __init__(self, items=()) -> None:
        super().__init__(None)
        self.version = 0
        for k, v in dict(items).items():
            self[k] = v

    def __missing__(self, key):
        self[key] = {}
        return defaultdict.__getitem__(self, key)  # the stored (versioned) dict

    def __setitem__(self, key, value) -> None:
        self.version += 1
        if isinstance(value, dict) and not (isinstance(value, _VersionedDict) and value._owner is self):
            value = _VersionedDict(self, value)
        defaultdict.__setitem__(self, key, value)

    def __delitem__(self, key) -> None:
        self.version += 1
        defaultdict.__delitem__(self, key)

    def update(self, *args, **kwargs) -> None:
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default if default is not None else {}
        return self[key]

    def __reduce__(self):
        return (_VersionedState, ({k: dict(v) if isinstance(v, dict) else v for k, v in self.items()},))


for _name in ("pop", "popitem", "clear"):
    setattr(_VersionedState, _name, _bumping(defaultdict, _name))
del _name


class _FusedOptimizer(Optimizer):
    """Shared plumbing: argument checks, the per-group plans, state-dict
    compatibility, AMP hooks. Subclasses set ALGO and implement _hyper,
    _check_hyper and _init_state."""

    ALGO = ""

    def __init__(self, params, defaults: dict[str, Any]) -> None:
        # Hyperparameters first, as torch.optim checks them (before params).
        self._check_hyper(defaults)
        self._plans: dict[int, tuple[dict, GroupPlan]] = {}
        self._warned: set[str] = set()
        super().__init__(params, defaults)
        # GradScaler hands grad_scale / found_inf to step() as attributes
        # instead of unscaling the grads itself (one pass fewer over memory).
        self._step_supports_amp_scaling = True

    # `opt.state = ...` (torch's own __init__ and load, or a user's reset with
    # a fresh defaultdict) always yields a versioned state.
    @property
    def state(self) -> _VersionedState:
        return self.__dict__["state"]

    @state.setter
    def state(self, value) -> None:
        if not isinstance(value, _VersionedState):
            value = _VersionedState(value)
        self.__dict__["state"] = value

    # ------------------------------------------------------------ groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group (named params included), after this
        package's checks: hyperparameters first, as torch; a param twice in
        one group is an error, not torch's warning, since a fused step would
        update it twice."""
        if isinstance(param_group, dict):
            self._check_hyper({**self.defaults, **param_group})
            params = param_group.get("params")
            if params is not None and not isinstance(params, (torch.Tensor, set)):
                params = list(params)  # a generator is read once, here
                seen: set[int] = set()
                for i, p in enumerate(params):
                    t = p[1] if isinstance(p, tuple) and len(p) == 2 else p
                    if id(t) in seen:
                        raise ValueError(f"params[{i}] appears twice in one parameter group; a fused step "
                                         "would update it twice (torch.optim only warns)")
                    seen.add(id(t))
                param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("first_lr", _as_float(group["lr"], "lr"))
        # The generator's key of stochastic rounding when not given: torch's
        # seed of this process (torch.manual_seed sets it), read without
        # drawing from torch's generator, so the option changes no other stream.
        _group_seed(group)
        check_precision_params(group, group["params"])

    def _check_hyper(self, group: dict[str, Any]) -> None:
        """The checks every group's hyperparameters pass, with torch.optim's
        exception types and messages where torch has the check."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr_value = _as_float(lr, "lr")
        if not 0.0 <= lr_value:
            raise ValueError(f"Invalid learning rate: {lr}")
        wd = _as_float(group["weight_decay"], "weight_decay")
        if not 0.0 <= wd:
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
        if group["decay_scaling"] not in DECAY_SCALINGS:
            raise ValueError(f"Invalid decay_scaling={group['decay_scaling']!r}: expected one of {DECAY_SCALINGS}")
        if group["backend"] not in dispatch.BACKENDS:
            raise ValueError(f"Invalid backend={group['backend']!r}: expected one of {dispatch.BACKENDS}")
        sd = group["state_dtype"]
        if sd not in STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype={sd}: expected None (the param's dtype), torch.float32 "
                             "or torch.bfloat16")
        chosen = []
        for key in PRECISION_OPTIONS:
            value = group.get(key, False)
            if not isinstance(value, bool):
                raise TypeError(f"{key} must be True or False, got {type(value).__name__} {value!r}")
            if value:
                chosen.append(key)
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} cannot be combined: choose at most one of master_weights, "
                             "stochastic_rounding and kahan_summation")
        seed = group.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                                 or not 0 <= int(seed) < SEED_LIMIT):
            raise ValueError(f"Invalid seed={seed!r}: expected None or an int in [0, 2**63)")
        base = group.get("decay_base_lr")
        if base is not None and not _as_float(base, "decay_base_lr") > 0.0:
            raise ValueError(f"Invalid decay_base_lr={base}: the lr at which eta_t = 1 must be > 0")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.setdefault("first_lr", _as_float(group["lr"], "lr"))
        self.__dict__.setdefault("_plans", {})
        self.__dict__.setdefault("_warned", set())
        self._plans = {}
        self.state = self.__dict__.get("state", {})

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict. Of the group keys this package adds, only those
        that make this optimizer behave otherwise than its torch.optim twin
        are in it, so a dict of an optimizer configured as torch's has exactly
        torch's keys: torch.distributed.checkpoint's default load planner
        refuses a checkpoint that lacks a key of the dict it loads into, so
        that is what lets a DCP checkpoint move both ways between this package
        and torch.optim. `backend` is never saved (load keeps this process's);
        `first_lr` only with decay_scaling="schedule", where it is eta_t's
        reference. Loading a dict without one of them keeps this optimizer's
        value (load_state_dict)."""
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        sd["param_groups"] = [{k: v for k, v in g.items() if not self._like_torch(g, k, v)}
                              for g in sd["param_groups"]]
        return sd

    def _like_torch(self, group: dict[str, Any], key: str, value: Any) -> bool:
        """Whether group key `key` (one this package adds) is at the value
        that behaves as torch.optim does, or says nothing about training."""
        if key == "backend":
            return True
        if key == "first_lr":
            return group.get("decay_scaling") != "schedule"
        if key in _TORCH_VALUES:
            return value == _TORCH_VALUES[key]
        if key == "decoupled_weight_decay":  # torch.optim.SGD has no such key
            return self.ALGO == "sgd" and not value
        if key == "seed":  # says something only with stochastic rounding
            return not group.get("stochastic_rounding")
        return False

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
                    # The master copy stays float32, the compensation in the
                    # param's dtype, the moments in the group's state dtype.
                    dtype = {MASTER_KEY: torch.float32, KAHAN_KEY: p.dtype}.get(key, sd)
                    t = torch.empty_like(p, dtype=dtype if not p.is_complex() else None)
                    st[key] = t.copy_(value.detach())

    def _fixed_decoupled(self) -> bool:
        """AdamW and SGDW always decouple, whatever a loaded dict says."""
        return False

    # ------------------------------------------------------------ per step
    def _lr(self, group: dict[str, Any]):
        """The group's lr as the one value the backends take: a float, or
        (capturable) the group's own 1-element tensor."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and group.get("capturable"):
            return lr if lr.dtype == torch.float32 and lr.numel() == 1 else lr.reshape(1).float()
        return _as_float(lr, "lr")

    def _decay_coeff(self, group: dict[str, Any], lr: float) -> float:
        """weight_decay ("lr") or weight_decay / decay_base (the paper's
        eta_t * lambda with eta_t = lr / decay_base, "schedule")."""
        wd = float(group["weight_decay"])
        if group["decay_scaling"] == "lr" or wd == 0.0:
            return wd
        base = group.get("decay_base_lr")
        if base is None:
            base = group.get("initial_lr", group["first_lr"])
        base = _as_float(base, "decay_base_lr")
        if base <= 0.0:
            raise ValueError(
                f"decay_scaling='schedule' divides by the reference lr of eta_t, which is {base}; "
                "give the group a positive lr (or decay_base_lr)"
            )
        self._warn_schedule(group, lr / base, wd)
        return wd / base

    def _warn_schedule(self, group: dict[str, Any], eta: float, wd: float) -> None:
        """Once per optimizer and kind: the two settings that are almost
        certainly a mistake with the paper's convention. Under torch.compile
        the conditions are traced and the warning, when one is due, is
        emitted untraced (a graph break on that step only)."""
        if (eta * wd >= 0.01 and "strong" not in self._warned) or (eta > 1.5 and "eta" not in self._warned):
            _emit_schedule_warnings(self, eta, wd)

    def _emit_schedule_warnings(self, eta: float, wd: float) -> None:
        if eta * wd >= 0.01 and "strong" not in self._warned:
            self._warned.add("strong")
            warnings.warn(
                f"decay_scaling='schedule' shrinks the weights by eta_t * weight_decay = {eta * wd:.3g} per step "
                f"(weight_decay={wd} is the paper's lambda, not torch's coefficient, which is multiplied by lr): "
                "for torch's decay at base lr alpha use weight_decay = alpha * torch_weight_decay "
                "(README.md, 'Decay conventions')", DecayScheduleWarning, stacklevel=6)
        if eta > 1.5 and "eta" not in self._warned:
            self._warned.add("eta")
            warnings.warn(
                f"decay_scaling='schedule': eta_t = lr / decay_base_lr = {eta:.3g} > 1, so the decay is stronger "
                "than weight_decay (a scheduler such as OneCycleLR sets initial_lr below its peak); name the "
                "lr at which eta_t = 1 with decay_base_lr=...", DecayScheduleWarning, stacklevel=6)

    def step(self, closure: Optional[Callable[[], float]] = None):
        """One step for every param group; GradScaler's grad_scale / found_inf
        attributes, when set, are applied inside the fused call."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if torch.compiler.is_compiling():
            # Under torch.compile, Dynamo traces this branch: one custom op
            # per group (ops.py), no plan (its address tables cannot be traced).
            # Groups the ops do not take run the eager step after the loop:
            # one graph break at its end (a break inside a loop would make
            # Dynamo run the whole step() frame untraced).
            rest = [g for g in self.param_groups if not self._compiled_step_group(g, grad_scale, found_inf)]
            if rest:
                _eager_step(self, grad_scale, found_inf, rest)
        else:
            _eager_step(self, grad_scale, found_inf)
        return loss

    def _step_group(self, group: dict[str, Any], grad_scale, found_inf) -> None:
        self._check_hyper(group)  # keys may change between steps (a user's, a scheduler's)
        if group.get("capturable") and any(p.device.type not in _CAPTURABLE_DEVICES for p in group["params"]):
            raise CapturableDeviceError(
                f"If capturable=True, params and state_steps must be on supported devices: "
                f"{list(_CAPTURABLE_DEVICES)}."
            )
        entry = self._plans.get(id(group))
        if entry is None or entry[0] is not group:
            entry = self._plans[id(group)] = (group, GroupPlan(self.ALGO))
        entry[1].step(self, group, self._hyper(group), grad_scale, found_inf)

    def _hyper(self, group: dict[str, Any]):
        raise NotImplementedError

    def _init_precision_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """The state the group's precision option keeps, made where missing
        (the option's first step, or a state loaded without it): the float32
        master copy (from the param's value), the zero compensation, SGD's
        step count (the generator's counter under stochastic rounding)."""
        if group.get("master_weights") and MASTER_KEY not in state:
            state[MASTER_KEY] = p.detach().to(torch.float32, memory_format=torch.preserve_format, copy=True)
        if group.get("kahan_summation") and KAHAN_KEY not in state:
            state[KAHAN_KEY] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group.get("stochastic_rounding") and "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)

    # ------------------------------------------------------------ under torch.compile
    def _compiled_step_group(self, group: dict[str, Any], grad_scale, found_inf) -> bool:
        """The step of one group as Dynamo traces it: gather the params with
        grads and their state (made here on a first step), then one call of
        the group's custom op (ops.py), which validates and runs the same
        backends as the eager step. A tensor lr goes to the op as a tensor
        (a graph input: a scheduler changing it recompiles nothing; a float
        lr is a constant Dynamo guards on). What the op does not take (a
        differentiable group, complex, sparse, strided-view or DTensor
        params, grads in another layout) is left to the eager step, which
        Dynamo does not trace: False for such a group."""
        if not self._compilable(group):
            return False
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return True
        lr_tensor = group["lr"] if isinstance(group["lr"], torch.Tensor) else None
        # The hyperparameters but a tensor lr, read without reading it (an
        # .item() would break the graph); the op takes the tensor.
        view = group if lr_tensor is None else dict(group, lr=0.0)
        self._check_hyper(view)
        hyper = self._hyper(view)
        state = self.state
        if (self.ALGO == "sgd" and found_inf is not None and float(group["momentum"]) != 0.0
                and any(state.get(p, {}).get("momentum_buffer") is None for p in params)):
            # A first momentum step under a GradScaler: if found_inf skips it,
            # no buffer may be left behind (torch starts the buffer from the
            # next step's grad), which the plan's eager step handles.
            return False
        with torch.no_grad():
            if self.ALGO == "adam":
                names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                for p in params:
                    st = state[p]
                    if len(st) == 0:
                        self._init_state(p, group, st)
                    if hyper.amsgrad and "max_exp_avg_sq" not in st:
                        st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])
                sts = [state[p] for p in params]
                cols = [[st[n] for st in sts] if n != "max_exp_avg_sq" or hyper.amsgrad else [] for n in names]
                ops.adam_(params, [p.grad for p in params], cols[0], cols[1], cols[2], [st["step"] for st in sts],
                          hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, hyper.decay_coeff,
                          hyper.decoupled, hyper.amsgrad, hyper.maximize, group["backend"], grad_scale, found_inf,
                          lr_tensor)
            else:
                bufs, first = [], []
                if hyper.momentum != 0.0:
                    sd = group["state_dtype"]
                    for p in params:
                        st = state[p]
                        buf = st.get("momentum_buffer")
                        first.append(buf is None)
                        if buf is None:
                            buf = st["momentum_buffer"] = torch.zeros_like(p, dtype=sd)
                        bufs.append(buf)
                ops.sgd_(params, [p.grad for p in params], bufs, first, hyper.lr, hyper.momentum, hyper.dampening,
                         hyper.weight_decay, hyper.decay_coeff, hyper.decoupled, hyper.nesterov, hyper.maximize,
                         group["backend"], grad_scale, found_inf, lr_tensor)
        return True

    @staticmethod
    def _compilable(group: dict[str, Any]) -> bool:
        """Whether the custom ops take this group (Dynamo evaluates it while
        tracing and guards on what it read)."""
        if group.get("differentiable") or precision_code(group) != PRECISION_NEAREST:
            return False  # the precision options run eagerly (their state is the plan's)
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if (type(p) not in _PLAIN or p.is_complex() or g.layout != torch.strided
                    or not p.is_contiguous() or not g.is_contiguous()):
                return False
        return True


@torch._disable_dynamo
def _emit_schedule_warnings(opt, eta: float, wd: float) -> None:
    opt._emit_schedule_warnings(eta, wd)


@torch._disable_dynamo
def _eager_step(opt, grad_scale, found_inf, groups=None) -> None:
    """The eager step: each group's plan (of `groups`, default all). Never
    traced: where Dynamo runs a step() frame without tracing it (after a
    graph break in a compiled caller), the plan's frames are not handed to
    Dynamo one by one; a compiled step calls it for the groups the custom
    ops do not take (a graph break)."""
    for group in (opt.param_groups if groups is None else groups):
        # Autograd stays on for a differentiable group (torch.optim's
        # rule), whose plan sends it to torch's functional code.
        with torch.set_grad_enabled(bool(group.get("differentiable"))):
            opt._step_group(group, grad_scale, found_inf)


# torch.optim's capturable devices (torch.optim.optimizer._get_capturable_supported_devices).
_CAPTURABLE_DEVICES = ("cuda", "xpu", "hpu", "privateuseone", "xla")


class CapturableDeviceError(ValueError, AssertionError):
    """capturable=True with params on a device that cannot capture (the CPU):
    the error torch.optim raises (an AssertionError there), also a ValueError."""


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
    fused. Extra keywords: decay_scaling, decay_base_lr, state_dtype, backend,
    and the precision options master_weights, stochastic_rounding,
    kahan_summation, seed (README.md, "Precision and memory")."""

    ALGO = "adam"

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach: Optional[bool] = None,
                 maximize: bool = False, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 decay_scaling: str = "lr", decay_base_lr: Optional[float] = None,
                 state_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 kahan_summation: bool = False, seed: Optional[int] = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, decay_scaling=decay_scaling,
                        decay_base_lr=decay_base_lr, state_dtype=state_dtype, backend=backend,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                        kahan_summation=kahan_summation, seed=seed)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        if not 0.0 <= _as_float(group["eps"], "eps"):
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= _as_float(b, f"betas[{i}]") < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        sd = group["state_dtype"] if not p.is_complex() else None
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=sd, memory_format=torch.preserve_format)

    def _hyper(self, group: dict[str, Any]) -> AdamHyper:
        lr = self._lr(group)
        beta1, beta2 = group["betas"]
        decoupled = bool(group["decoupled_weight_decay"])
        # A tensor lr (capturable) is read on the device; "schedule" then
        # needs its value once on the host for eta_t = lr / decay_base_lr.
        decay = self._decay_coeff(group, float(lr)) if decoupled else 0.0
        return AdamHyper(lr=lr, beta1=_as_float(beta1, "betas[0]"), beta2=_as_float(beta2, "betas[1]"),
                         eps=_as_float(group["eps"], "eps"), weight_decay=_as_float(group["weight_decay"], "weight_decay"),
                         decay_coeff=decay, decoupled=decoupled, amsgrad=bool(group["amsgrad"]),
                         maximize=bool(group["maximize"]), precision=precision_code(group),
                         seed=_group_seed(group))


class AdamW(_AlwaysDecoupled, Adam):
    """torch.optim.AdamW (Algorithm 2 with decoupled decay), fused.

    decay_scaling="lr" (default) decays by lr * weight_decay like torch;
    "schedule" decays by eta_t * weight_decay, eta_t = lr / decay_base_lr
    (default: the scheduler's initial_lr, else the group's first lr), as in
    the paper, so the decay follows an LR scheduler but not the base lr."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 fused: Optional[bool] = None, decay_scaling: str = "lr", decay_base_lr: Optional[float] = None,
                 state_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 kahan_summation: bool = False, seed: Optional[int] = None) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, decay_scaling=decay_scaling, decay_base_lr=decay_base_lr,
                         state_dtype=state_dtype, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, kahan_summation=kahan_summation, seed=seed)


class SGD(_FusedOptimizer):
    """torch.optim.SGD's interface (L2 weight decay), fused. Extra keywords:
    decoupled_weight_decay, decay_scaling, decay_base_lr, state_dtype, backend,
    master_weights, stochastic_rounding, kahan_summation, seed. Without
    momentum it keeps no per-param state, as torch (the precision options
    keep theirs)."""

    ALGO = "sgd"

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 decoupled_weight_decay: bool = False, decay_scaling: str = "lr",
                 decay_base_lr: Optional[float] = None, state_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto", master_weights: bool = False, stochastic_rounding: bool = False,
                 kahan_summation: bool = False, seed: Optional[int] = None) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused, decoupled_weight_decay=decoupled_weight_decay,
                        decay_scaling=decay_scaling, decay_base_lr=decay_base_lr, state_dtype=state_dtype,
                        backend=backend, master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                        kahan_summation=kahan_summation, seed=seed)
        super().__init__(params, defaults)

    def _check_hyper(self, group: dict[str, Any]) -> None:
        super()._check_hyper(group)
        momentum = _as_float(group["momentum"], "momentum")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {group['momentum']}")
        dampening = _as_float(group["dampening"], "dampening")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _init_state(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """torch.optim.SGD keeps no state until the first step with momentum."""

    def _hyper(self, group: dict[str, Any]) -> SgdHyper:
        lr = self._lr(group)
        decoupled = bool(group["decoupled_weight_decay"])
        return SgdHyper(lr=lr, momentum=_as_float(group["momentum"], "momentum"),
                        dampening=_as_float(group["dampening"], "dampening"),
                        weight_decay=_as_float(group["weight_decay"], "weight_decay"),
                        decay_coeff=self._decay_coeff(group, float(lr)) if decoupled else 0.0,
                        decoupled=decoupled, nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]),
                        precision=precision_code(group), seed=_group_seed(group))


class SGDW(_AlwaysDecoupled, SGD):
    """SGD with decoupled weight decay (Algorithm 1, SGDW): p <- p*(1 - d) - lr*update,
    d = lr * weight_decay ("lr") or eta_t * weight_decay ("schedule")."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 decay_scaling: str = "lr", decay_base_lr: Optional[float] = None,
                 state_dtype: Optional[torch.dtype] = None, backend: str = "auto",
                 master_weights: bool = False, stochastic_rounding: bool = False,
                 kahan_summation: bool = False, seed: Optional[int] = None) -> None:
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, maximize=maximize,
                         foreach=foreach, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, decay_scaling=decay_scaling, decay_base_lr=decay_base_lr,
                         state_dtype=state_dtype, backend=backend, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding, kahan_summation=kahan_summation, seed=seed)
