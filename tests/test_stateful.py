"""A stateful property-based test: what users do between steps, interleaved at
random, with fused_adamw beside torch.optim in float64.

Each hypothesis run builds one optimizer of this package and its torch.optim
twin over the same params, then applies a random sequence of user actions to
both: steps with random grads (some None), zero_grad both ways, `p.data`
reassigned to the same shape and to another, hyperparameter and backend
changes, add_param_group, state-dict round trips and cross-loads between the
two, `opt.state` replaced, LR scheduler steps, GradScaler-style scaled steps
and found_inf skips. After every action the two agree (params and every state
tensor), or both raised: ours with a clear error (ValueError / TypeError /
RuntimeError), never a crash. After a raise both are re-synchronised (the
param whose state no longer fits gets fresh state, as a user would do) so the
run goes on.

Backends: cpu (the C++ kernel, where a stale table is a write past a buffer)
and torch; triton under its interpreter with a smaller budget. The budget is
fixed (derandomized, a set number of examples) so CI time is bounded.
"""
from __future__ import annotations

import collections
import copy
import os
import warnings

import pytest
import torch

import fused_adamw as fa
from fused_adamw import plan
from tolerances import TRAJECTORY

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings, strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

SHAPES = [(3,), (2, 3), (5,), (4, 1)]
OPTIMIZERS = {
    "adamw": (fa.AdamW, torch.optim.AdamW, dict(lr=0.05, weight_decay=0.1)),
    "adam-l2-amsgrad": (fa.Adam, torch.optim.Adam, dict(lr=0.05, weight_decay=0.05, amsgrad=True)),
    "sgd-momentum": (fa.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05)),
    "sgd-nesterov": (fa.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.5, nesterov=True)),
    "sgd-plain": (fa.SGD, torch.optim.SGD, dict(lr=0.1)),
}
TOL = TRAJECTORY[torch.float64].kw  # float64, up to 40 steps

# Which params get a grad: mostly all of them (the common case, where the plan
# keeps its tables and only its guards stand between a changed tensor and the
# kernel), sometimes a random subset (a mixture of experts, a frozen branch).
MASKS = st.one_of(st.just([True]), st.just([True]), st.lists(st.booleans(), min_size=1, max_size=6))
USER_ERRORS = (ValueError, TypeError, RuntimeError)


class _Machine(RuleBasedStateMachine):
    backends = ("cpu", "torch")

    @initialize(kind=st.sampled_from(sorted(OPTIMIZERS)), seed=st.integers(0, 2**16),
                backend=st.sampled_from(["cpu", "torch"]), host=st.booleans())
    def start(self, kind, seed, backend, host):
        # host: the plan's per-step check in C++ (fused_adamw._host, where
        # built) or in Python (plan.py).
        self._saved_host = plan._HOST
        if not host:
            plan._HOST = None
        if "triton" in self.backends:
            if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
                pytest.skip("needs TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
            pytest.importorskip("triton")
        backend = backend if backend in self.backends else self.backends[0]
        self.cls, self.tcls, kw = OPTIMIZERS[kind]
        self.gen = torch.Generator().manual_seed(seed)
        init = [torch.randn(s, generator=self.gen, dtype=torch.float64) for s in SHAPES]
        self.ours = [t.clone().requires_grad_() for t in init]
        self.theirs = [t.clone().requires_grad_() for t in init]
        self.opt = self.cls(self.ours, backend=backend, **kw)
        self.topt = self.tcls(self.theirs, **kw)
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma=0.9)
        self.tsched = torch.optim.lr_scheduler.ExponentialLR(self.topt, gamma=0.9)

    def teardown(self):
        if hasattr(self, "_saved_host"):
            plan._HOST = self._saved_host

    # ------------------------------------------------------------ helpers
    def _both(self, fn, torch_may_skip=False):
        """fn(side, opt, params) on both sides; equal outcomes or both raise.
        torch_may_skip: torch's side did not run the step (a GradScaler skip),
        so it had no chance to see what ours refuses."""
        errors = []
        for side, opt, params in (("theirs", self.topt, self.theirs), ("ours", self.opt, self.ours)):
            try:
                fn(side, opt, params)
                errors.append(None)
            except USER_ERRORS as e:
                errors.append(e)
        theirs, ours = errors
        if not (torch_may_skip and theirs is None):
            assert (theirs is None) == (ours is None), f"torch: {theirs!r}; fused_adamw: {ours!r}"
        if ours is not None:
            self._resync()

    def _resync(self):
        """After both raised: fresh state where it no longer fits the param,
        then torch's side takes our values (torch may have updated some
        params before it raised; ours validates before it writes)."""
        for opt, params in ((self.opt, self.ours), (self.topt, self.theirs)):
            for p in params:
                stt = opt.state.get(p)
                if stt and any(isinstance(v, torch.Tensor) and v.dim() and (v.shape != p.shape or v.dtype != p.dtype)
                               for v in stt.values()):
                    opt.state[p] = {}
                if p.grad is not None and (p.grad.shape != p.shape or p.grad.dtype != p.dtype):
                    p.grad = None
        for a, b in zip(self.ours, self.theirs):
            b.data = a.detach().clone()
        # A deep copy, as through torch.save: a loaded state dict's tensors are
        # used as they are when dtype and device fit, so both would share them.
        self.topt.load_state_dict(copy.deepcopy(self.opt.state_dict()))

    def _grads(self, mask, scale=1.0):
        for i, (a, b) in enumerate(zip(self.ours, self.theirs)):
            if mask[i % len(mask)]:
                g = torch.randn(a.shape, generator=self.gen, dtype=torch.float64)
                a.grad = g * scale
                b.grad = g.clone()
            else:
                a.grad = None
                b.grad = None

    # ------------------------------------------------------------ rules
    @rule(mask=MASKS)
    def step(self, mask):
        self._grads(mask)
        self._both(lambda side, opt, params: opt.step())

    @rule(mask=MASKS, k=st.integers(-3, 3), found=st.booleans())
    def scaled_step(self, mask, k, found):
        """GradScaler's protocol: grads scaled by 2**k; found_inf skips."""
        scale = 2.0 ** k
        self._grads(mask, scale)
        self.opt.grad_scale = torch.tensor(scale)
        self.opt.found_inf = torch.tensor(1.0 if found else 0.0)
        try:
            def go(side, opt, params):
                if side == "ours" or not found:
                    opt.step()
                elif isinstance(opt, torch.optim.Adam):
                    # A skipped step still makes the state of a first step, as
                    # torch's own amp-aware (fused) Adam does; the step count stays.
                    for p in params:
                        if p.grad is not None and not opt.state.get(p):
                            g = opt.param_groups[0] if any(q is p for q in opt.param_groups[0]["params"]) \
                                else next(g for g in opt.param_groups if any(q is p for q in g["params"]))
                            opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                            "exp_avg_sq": torch.zeros_like(p)}
                            if g["amsgrad"]:
                                opt.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)
            self._both(go, torch_may_skip=found)
        finally:
            del self.opt.grad_scale, self.opt.found_inf

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self._both(lambda side, opt, params: opt.zero_grad(set_to_none=set_to_none))

    @rule(i=st.integers(0, 10), other_shape=st.booleans())
    def reassign_data(self, i, other_shape):
        i %= len(self.ours)
        shape = (7,) if other_shape else tuple(self.ours[i].shape)
        new = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        self.ours[i].data = new.clone()
        self.theirs[i].data = new.clone()

    @rule(i=st.integers(0, 10))
    def reset_param_state(self, i):
        i %= len(self.ours)
        self.opt.state[self.ours[i]] = {}
        self.topt.state[self.theirs[i]] = {}

    @rule(key=st.sampled_from(["lr", "weight_decay", "maximize", "amsgrad"]), value=st.integers(0, 3))
    def change_hyperparameter(self, key, value):
        new = {"lr": [0.01, 0.05, 0.2, 0.0][value], "weight_decay": [0.0, 0.01, 0.1, 0.3][value],
               "maximize": bool(value % 2), "amsgrad": bool(value % 2)}[key]
        for opt, params in ((self.opt, self.ours), (self.topt, self.theirs)):
            g = opt.param_groups[0]
            if key not in g:
                return
            if key == "amsgrad" and new and not g["amsgrad"]:
                for p in g["params"]:  # torch only makes it on a param's first step
                    if opt.state.get(p) and "max_exp_avg_sq" not in opt.state[p]:
                        opt.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)
            g[key] = new

    @rule(backend=st.sampled_from(["auto", "cpu", "torch"]))
    def change_backend(self, backend):
        if backend in ("cpu", "auto") and "cpu" not in self.backends:
            backend = self.backends[0]
        self.opt.param_groups[0]["backend"] = backend

    @precondition(lambda self: len(self.opt.param_groups) < 3)
    @rule()
    def add_param_group(self):
        new = torch.randn(6, generator=self.gen, dtype=torch.float64)
        a, b = new.clone().requires_grad_(), new.clone().requires_grad_()
        self.ours.append(a)
        self.theirs.append(b)
        self.opt.add_param_group({"params": [a], "lr": 0.03})
        self.topt.add_param_group({"params": [b], "lr": 0.03})

    @rule(cross=st.booleans())
    def state_dict_round_trip(self, cross):
        ours, theirs = copy.deepcopy(self.opt.state_dict()), copy.deepcopy(self.topt.state_dict())
        if cross:  # each loads the other's: the formats are one
            ours, theirs = theirs, ours
        self._both(lambda side, opt, params: opt.load_state_dict(ours if side == "ours" else theirs))

    @rule()
    def replace_state(self):
        self.opt.state = collections.defaultdict(dict)
        self.topt.state = collections.defaultdict(dict)

    @rule()
    def scheduler_step(self):
        with warnings.catch_warnings():
            # torch warns when a scheduler steps before the optimizer's first step
            warnings.simplefilter("ignore", UserWarning)
            self.sched.step()
            self.tsched.step()

    # ------------------------------------------------------------ the property
    @invariant()
    def same_params_and_state(self):
        if not hasattr(self, "opt"):
            return
        for a, b in zip(self.ours, self.theirs):
            torch.testing.assert_close(a.detach(), b.detach(), **TOL)
            sa, sb = self.opt.state.get(a, {}), self.topt.state.get(b, {})
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer", "step"):
                if key in sb:
                    assert key in sa, f"{key} missing"
                    torch.testing.assert_close(sa[key].detach().double().reshape(sb[key].shape),
                                               sb[key].detach().double(), **TOL)


_BUDGET = int(os.environ.get("FUSED_ADAMW_STATEFUL_EXAMPLES", "200"))


def _settings(examples, steps):
    return settings(max_examples=examples, stateful_step_count=steps, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck), database=None)


# unittest classes that pytest collects: one per backend set.
class _CpuAndTorch(_Machine):
    backends = ("cpu", "torch")


class _Triton(_Machine):
    backends = ("triton",)


TestUserActionsCpuAndTorch = _settings(_BUDGET, 40)(_CpuAndTorch).TestCase
TestUserActionsTriton = _settings(max(4, _BUDGET // 10), 15)(_Triton).TestCase
