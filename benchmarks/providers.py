"""Benchmark providers: the optimizer implementations the harness compares.

A provider builds an optimizer over a list of params (grads already set) and
returns a Runner whose step() is one whole opt.step(). Providers:
  torch-forloop   torch.optim.<Opt>(foreach=False)
  torch-foreach   torch.optim.<Opt>(foreach=True)      (also the check's reference)
  torch-fused     torch.optim.<Opt>(fused=True)        (the speedup baseline)
  torch-compiled  torch.compile of a function calling opt.step() (torch's
                  "compiling the optimizer" recipe), skipped above a tensor count
  fused_adamw-<b> fused_adamw.<Opt>(..., backend=b) for b in
                  fused_adamw.available_backends(device)

The optimizer configuration (OptConfig: optimizer, dtype, and this package's
storage options, state_dtype and precision) and the bytes one step must move
(bytes_per_step) live here too, since both depend on which optimizer runs.
The storage options go to the fused_adamw providers only: torch.optim has no
twin, so the torch providers run the plain configuration (their Runner says
what they ran, and the rows say so). Used by benchmarks/run.py.
"""
from __future__ import annotations

import enum
import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from workloads import Workload


class OptimizerKind(str, enum.Enum):
    ADAMW = "adamw"
    ADAM = "adam"
    SGDW = "sgdw"
    SGD = "sgd"

    @property
    def is_adam(self) -> bool:
        return self in (OptimizerKind.ADAMW, OptimizerKind.ADAM)


DTYPES: Dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
DTYPE_NAMES: Dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class Precision(str, enum.Enum):
    """How a 16-bit param takes the update (issue 12; fused_adamw.optim's
    keywords). NEAREST is round to nearest, what torch does."""
    NEAREST = "nearest"
    MASTER = "master"
    STOCHASTIC = "stochastic"
    KAHAN = "kahan"

    @property
    def keyword(self) -> Optional[str]:
        """The optimizer keyword that turns it on (None for NEAREST)."""
        return {Precision.MASTER: "master_weights", Precision.STOCHASTIC: "stochastic_rounding",
                Precision.KAHAN: "kahan_summation"}.get(self)

# lr = 1e-2 rather than torch's 1e-3 default: the update must be several bf16
# ulps of the params (|p| ~ 0.1, see workloads.fill_param_) for the
# correctness check to catch a wrong learning rate; speed does not depend on it.
ADAM_HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
SGD_HYPER = dict(lr=1e-2, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=1e-2)


@dataclass(frozen=True)
class OptConfig:
    optimizer: OptimizerKind = OptimizerKind.ADAMW
    dtype: torch.dtype = torch.float32
    # The storage options, fused_adamw keywords only (the torch providers run
    # without them): state_dtype None (the param's dtype), float32 (16-bit
    # params) or bfloat16; precision other than NEAREST for 16-bit params.
    state_dtype: Optional[torch.dtype] = None
    amsgrad: bool = False
    precision: Precision = Precision.NEAREST
    # The generator's key with Precision.STOCHASTIC (the package's `seed`).
    seed: int = 0

    @property
    def has_options(self) -> bool:
        """Whether the package's run differs from torch's by design."""
        return self.precision is not Precision.NEAREST or self.state_dtype not in (None, self.dtype)

    def torch_class(self) -> Tuple[type, dict]:
        """torch.optim class and keywords computing the same update."""
        if self.optimizer is OptimizerKind.ADAMW:
            return torch.optim.AdamW, dict(ADAM_HYPER, amsgrad=self.amsgrad)
        if self.optimizer is OptimizerKind.ADAM:  # L2 regularization
            return torch.optim.Adam, dict(ADAM_HYPER, amsgrad=self.amsgrad)
        if self.optimizer is OptimizerKind.SGD:  # L2 regularization
            return torch.optim.SGD, dict(SGD_HYPER)
        # SGDW's decoupled decay has no torch twin; with weight_decay=0 both
        # compute the same update and move the same bytes.
        return torch.optim.SGD, dict(SGD_HYPER, weight_decay=0.0)

    def package_class(self, fa) -> Tuple[type, dict]:
        cls_name = {OptimizerKind.ADAMW: "AdamW", OptimizerKind.ADAM: "Adam",
                    OptimizerKind.SGDW: "SGDW", OptimizerKind.SGD: "SGD"}[self.optimizer]
        _, kwargs = self.torch_class()
        if self.state_dtype is not None:
            kwargs["state_dtype"] = self.state_dtype
        if self.precision.keyword:
            kwargs[self.precision.keyword] = True
        if self.precision is Precision.STOCHASTIC:
            kwargs["seed"] = self.seed
        return getattr(fa, cls_name), kwargs

    def reference_kwargs(self) -> dict:
        """Keywords of fused_adamw.reference.adam_step / sgd_step (and their
        _lp models) for the update torch_class computes."""
        _, kwargs = self.torch_class()
        return dict(kwargs, decoupled=self.optimizer in (OptimizerKind.ADAMW, OptimizerKind.SGDW))

    def note(self) -> str:
        if self.optimizer is OptimizerKind.SGDW:
            return "SGDW run with weight_decay=0 (= torch SGD; decoupled decay has no torch twin)"
        return ""

    def torch_note(self) -> str:
        """What a torch provider's row says when the options do not apply to it."""
        if not self.has_options:
            return ""
        asked = []
        if self.state_dtype not in (None, self.dtype):
            asked.append(f"state {DTYPE_NAMES[self.state_dtype]}")
        if self.precision is not Precision.NEAREST:
            asked.append(f"precision {self.precision.value}")
        return (f"torch runs plain {DTYPE_NAMES[self.dtype]} (state {DTYPE_NAMES[self.dtype]}, "
                f"round to nearest): no {' / '.join(asked)} option")


def state_bytes_per_element(cfg: OptConfig, state_dtype: torch.dtype) -> int:
    s = state_dtype.itemsize
    if cfg.optimizer.is_adam:
        return 4 * s + (2 * s if cfg.amsgrad else 0)  # exp_avg, exp_avg_sq (+max) r+w
    return 2 * s if SGD_HYPER["momentum"] else 0     # momentum_buffer r+w


def param_bytes_per_element(itemsize: int, precision: Precision) -> int:
    """Param-side bytes per element, grad read included, P = the param's itemsize
    (the per-element rule of ../spec/issue12.md):
      nearest, stochastic  grad r, param r+w                        3P
      master               grad r, master r+w (float32), param w    2P + 8
                           (x comes from the master: the param is not read)
      kahan                grad r, param r+w, compensation r+w (P)   5P
    Stochastic rounding draws its random bits in registers: no extra bytes."""
    if precision is Precision.MASTER:
        return 2 * itemsize + 8
    if precision is Precision.KAHAN:
        return 5 * itemsize
    return 3 * itemsize


def bytes_per_step(cfg: OptConfig, numel: int, n_tensors: int, state_dtype: torch.dtype,
                   precision: Precision = Precision.NEAREST) -> int:
    """Bytes one step must move, the GB/s numerator:

      numel * (param_bytes_per_element(P, precision) + state_bytes_per_element(S))
      + n_tensors * (8 for Adam, or SGD with stochastic rounding; else 0)

    P the param's itemsize, S the state's; state: exp_avg and exp_avg_sq
    (+ max_exp_avg_sq with amsgrad) or SGD's momentum_buffer, each r+w; per
    tensor the float32 step count r+w (SGD keeps one only for the generator
    of stochastic rounding). Per element, AdamW: fp32 28 B; bf16 14;
    bf16 params with fp32 state 22; fp32 params with bf16 state 20; bf16
    master 20, Kahan 18, stochastic 14. fp32 SGD with momentum: 20."""
    per_elem = (param_bytes_per_element(cfg.dtype.itemsize, precision)
                + state_bytes_per_element(cfg, state_dtype))
    counts_steps = cfg.optimizer.is_adam or precision is Precision.STOCHASTIC
    return numel * per_elem + n_tensors * (8 if counts_steps else 0)


@dataclass
class Runner:
    opt: torch.optim.Optimizer
    step: Callable[[], None]
    # Storage dtype of the optimizer state and how the param is rounded:
    # what this runner runs (bytes_per_step charges it; check.py picks its
    # oracle by it). Torch's runners: the param's dtype, NEAREST.
    state_dtype: torch.dtype
    precision: Precision = Precision.NEAREST
    note: str = ""

    def state_of(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {k: v for k, v in self.opt.state[p].items() if torch.is_tensor(v)}


@dataclass
class Provider:
    name: str
    build: Callable[[List[torch.Tensor], OptConfig], Runner]
    # skip(workload, device, named): a reason to skip this provider on the
    # workload, or None; named is True when --providers names it exactly.
    skip: Callable[[Workload, torch.device, bool], Optional[str]] = \
        field(default=lambda w, device, named: None)
    is_package: bool = False
    # The native module whose *_step functions do this provider's update
    # (fused_adamw._cpu / ._cuda); --profile times the step around them.
    native_module: Optional[str] = None


def _torch_runner(params, cfg: OptConfig, **impl) -> Runner:
    cls, kwargs = cfg.torch_class()
    opt = cls(params, **kwargs, **impl)
    return Runner(opt, opt.step, cfg.dtype)


def _compiled_runner(params, cfg: OptConfig) -> Runner:
    # Each workload builds a fresh optimizer; without a reset the recompiles
    # pile up on Optimizer.step's code object until dynamo's cache limit makes
    # it fall back to eager without saying so.
    torch._dynamo.reset()
    cls, kwargs = cfg.torch_class()
    opt = cls(params, **kwargs, foreach=True)

    @torch.compile(fullgraph=False)
    def compiled_step() -> None:
        opt.step()

    return Runner(opt, compiled_step, cfg.dtype)


def torch_providers(compile_max_tensors: int) -> List[Provider]:
    def compile_skip(w: Workload, device: torch.device, named: bool) -> Optional[str]:
        if w.n_tensors > compile_max_tensors:
            return (f"{w.n_tensors} tensors > --compile-max-tensors {compile_max_tensors} "
                    f"(compile time grows with the tensor count)")
        # Every workload compiles afresh: measured 30 s for one tensor and
        # 100 s for ResNet-50's 161 on the 2-core CPU, which alone would
        # overrun the default sweeps' time budget.
        if not named and (device.type == "cpu" or w.kind == "single"):
            where = "on cpu" if device.type == "cpu" else "on the single-tensor sweep"
            return (f"not run by default {where} (compiling takes 30-100 s per workload); "
                    f"name torch-compiled in --providers to run it")
        return None

    return [
        Provider("torch-forloop", lambda ps, cfg: _torch_runner(ps, cfg, foreach=False)),
        Provider("torch-foreach", lambda ps, cfg: _torch_runner(ps, cfg, foreach=True)),
        Provider("torch-fused", lambda ps, cfg: _torch_runner(ps, cfg, fused=True)),
        Provider("torch-compiled", _compiled_runner, skip=compile_skip),
    ]


def import_package():
    """Import fused_adamw: the installed one, else the source tree's python/."""
    try:
        return importlib.import_module("fused_adamw"), ""
    except ImportError:
        pass
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python")
    sys.path.insert(0, src)
    try:
        return importlib.import_module("fused_adamw"), f"imported from {src} (not installed)"
    except ImportError as e:
        return None, f"fused_adamw not importable: {e}"


CANDIDATE_BACKENDS = ("cpu", "cuda", "triton", "torch")
NATIVE_MODULES = {"cpu": "fused_adamw._cpu", "cuda": "fused_adamw._cuda"}


# The Triton interpreter (TRITON_INTERPRET=1) runs kernels in NumPy: a
# correctness tool, 10**3-10**4 times slower than the CPU backend.
INTERPRETER_MAX_NUMEL = 2 ** 20


def _interpreter_skip(w: Workload, device: torch.device, named: bool) -> Optional[str]:
    if device.type == "cpu" and w.numel > INTERPRETER_MAX_NUMEL:
        return f"Triton interpreter on cpu: only workloads up to {INTERPRETER_MAX_NUMEL} elements"
    return None


def _package_runner(fa, backend: str):
    def build(params, cfg: OptConfig) -> Runner:
        cls, kwargs = cfg.package_class(fa)
        opt = cls(params, **kwargs, backend=backend)
        return Runner(opt, opt.step, cfg.state_dtype or cfg.dtype, cfg.precision)
    return build


def _probe(fa, backend: str, device: torch.device, cfg: OptConfig) -> Optional[str]:
    """Run one step on a tiny tensor; the error text, or None if it worked."""
    try:
        p = torch.randn(7, device=device, dtype=cfg.dtype, requires_grad=True)
        p.grad = torch.randn_like(p)
        _package_runner(fa, backend)([p], cfg).step()
        return None
    except Exception as e:  # any failure means "not usable here"; report why
        return f"{type(e).__name__}: {e}"


def package_providers(device: torch.device, cfg: OptConfig) -> Tuple[List[Provider], List[str]]:
    """Providers for this package's backends usable on device, and notes
    (why a backend or the package is missing)."""
    fa, note = import_package()
    notes = [note] if note else []
    if fa is None:
        return [], notes
    try:
        cfg.package_class(fa)
    except AttributeError as e:
        return [], notes + [f"fused_adamw lacks the optimizer class: {e}"]
    if hasattr(fa, "available_backends"):
        backends = list(fa.available_backends(device.type))
    else:
        notes.append("fused_adamw.available_backends missing: probing " + ", ".join(CANDIDATE_BACKENDS))
        backends = []
        for b in CANDIDATE_BACKENDS:
            err = _probe(fa, b, device, cfg)
            if err is None:
                backends.append(b)
            else:
                notes.append(f"backend {b!r} unusable on {device.type}: {err}")
    provs = [Provider(f"fused_adamw-{b}", _package_runner(fa, b), is_package=True,
                      native_module=NATIVE_MODULES.get(b),
                      **({"skip": _interpreter_skip} if b == "triton" else {}))
             for b in backends]
    return provs, notes


def select(providers: Sequence[Provider], wanted: Optional[Sequence[str]]) -> List[Provider]:
    """Providers named in wanted (a name, or a prefix ending in '*'), in order."""
    if not wanted:
        return list(providers)
    out = []
    for w in wanted:
        hits = [p for p in providers
                if p.name == w or (w.endswith("*") and p.name.startswith(w[:-1]))]
        if not hits:
            raise SystemExit(f"unknown or unavailable provider {w!r}; "
                             f"available: {', '.join(p.name for p in providers)}")
        out += [h for h in hits if h not in out]
    return out
