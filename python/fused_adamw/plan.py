"""The plan of one param group: the one owner of what a step keeps between steps.

A step is four hops: `opt.step()` (optim.py: hyperparameters, per-step
scalars) -> `GroupPlan.step` (this file) -> a backend module's `adam_step` /
`sgd_step` (backend_cpu.py, backend_cuda.py, triton_kernels, backend_torch.py)
-> the kernel. This file holds everything in between:

  * gathering the params that have grads, their grads and state;
  * validation at the boundary (device, dtype, dense layout, matching shapes
    and strides, no overlap), with errors that name the argument;
  * bucketing by (device, dtype) and resolving the backend of each bucket;
  * routing what no kernel serves (strided-view params, sparse grads) to
    torch.optim's own functional implementation (backend_functional.py), or,
    for a group with options torch.optim lacks (bfloat16 state for
    float32/float16 params, master_weights, stochastic_rounding,
    kahan_summation), to backend torch's code, which takes any layout;
  * the precision options' state (the float32 master copy, the Kahan
    compensation, SGD's step count under stochastic rounding: made by the
    optimizer's _init_precision_state) and each param's number in the
    generator's counter (its number in state_dict());
  * the address tables (_native.py) and each backend's long-lived resources
    (a CUDA workspace, Triton's device tables), per (backend, device, dtype).

The key. What the kernels depend on is, for every tensor they are handed,
its address, element count, dtype, device and strides, plus the state
entries and the requested backend. The plan splits that key by who can
change it and how cheaply each part is read:

  * static: the group's params (by identity), which of them have a grad,
    the optimizer state's version (optim._VersionedState counts every
    assignment to `opt.state`, to a param's state dict, and replacements of
    `opt.state` itself), and the group keys the plan reads (backend,
    state_dtype, amsgrad, whether momentum is on, the precision option). Any change rebuilds and
    revalidates everything.
  * user-held tensors (params, grads), read every step: their metadata
    (sizes, strides, dtype, device) and their addresses. A metadata change
    (`p.data = bigger`, a grad in another layout) rebuilds and revalidates;
    an address change alone (a new grad from backward) rewrites that table
    column; a param at a new address (`p.data =` a tensor of the same shape)
    rewrites its column too.

    Two paths read them, with the same rules: fused_adamw._host
    (csrc/host/host_module.cpp), one C++ pass over the tensors' C++ objects,
    where it was built against this torch and the plan is plain (kernel
    buckets, tensors that are not subclasses or complex, grads in their
    params' layout); else Python (torch's C++ tensor guard, then the
    addresses). Whatever the C++ pass does not accept, it hands to the
    Python path, which rebuilds what changed. FUSED_ADAMW_HOST_PATH=python
    forces the Python path; `host_path()` says which is in use.
  * optimizer-held state tensors: validated at each rebuild and then held
    by the plan through aliases (detached views that share their storage), so
    even `state["exp_avg"].data = other` cannot free or shrink the memory the
    kernels write. Replacing a state entry, the way torch itself does it, is
    an assignment, which the static key sees.

Resources that outlive a rebuild (a CUDA workspace) are kept per (backend,
device, dtype) in `GroupPlan.resources`; a change in the set of params with
grads (a mixture of experts, a frozen branch) rebuilds the tables, not them.
"""
from __future__ import annotations

import operator
import os
import sys
from itertools import repeat
from typing import Any, Optional, Sequence

import torch

from . import _native, dispatch
from .hyper import PRECISION_OPTIONS, PRECISION_NEAREST, PRECISION_MASTER, PRECISION_KAHAN, PRECISION_STOCHASTIC, precision_code

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_KERNEL_BACKENDS = ("cpu", "cuda", "triton")
_GRAD = operator.attrgetter("grad")
_PTR = torch.Tensor.data_ptr
_DETACH = torch.Tensor.detach
_LABELS = {(name, algo): f"fused_adamw::{name}::{algo}_step"
           for name in (*dispatch.BACKENDS, "functional") for algo in ("adam", "sgd")}

# The state entry a precision mode keeps beside the moments (the table's aux column).
MASTER_KEY = "master_param"  # the float32 copy (master_weights=True)
KAHAN_KEY = "kahan_comp"     # the compensation, in the param's dtype (kahan_summation=True)
_AUX_NAMES = {PRECISION_MASTER: MASTER_KEY, PRECISION_KAHAN: KAHAN_KEY}

# Which state entries the kernels read, per algorithm, in table order.
ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SGD_STATE = ("momentum_buffer",)


# ---------------------------------------------------------------- the C++ per-step path

def _load_host():
    """fused_adamw._host (csrc/host/host_module.cpp) where it was built
    against this torch and FUSED_ADAMW_HOST_PATH is not "python"; else None
    and the plan does the same per-step work in Python."""
    if os.environ.get("FUSED_ADAMW_HOST_PATH", "").lower() == "python":
        return None
    try:
        from . import _host
    except ImportError:
        return None
    return _host if _host.torch_version() == torch.__version__ else None


_HOST = _load_host()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def host_path() -> str:
    """Which code does a plan's per-step check: "c++" (fused_adamw._host) or "python"."""
    return "c++" if _HOST is not None else "python"


# ---------------------------------------------------------------- metadata guard

def _meta(t: torch.Tensor) -> tuple:
    strided = t.layout == torch.strided
    return (t.layout, t.dtype, t.device, t.shape, t.stride() if strided else None, _lazy(t))


def _lazy(t: torch.Tensor) -> bool:
    """Whether t's memory does not hold its values as they read: a negative
    or conjugate view (the sign is a flag, applied when read) or a ZeroTensor
    (no memory at all, address 0). torch's ops honour that; a kernel reading
    the address would not, so such tensors go to torch's functional code."""
    return t.is_neg() or t.is_conj() or t._is_zerotensor()


class _MetadataGuard:
    """True while every tensor still has the layout, sizes, strides, dtype
    and device it had when the guard was made. Uses torch's C++ tensor guard
    (the check torch.compile runs on its inputs at every call; about half the
    cost of reading shape, stride and dtype from Python) where it is there
    and every tensor is strided, else reads the metadata from Python."""

    __slots__ = ("_guard", "_meta", "_n")

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._n = len(tensors)
        self._guard = None
        self._meta = None
        if all(t.layout == torch.strided for t in tensors):
            try:
                from torch._C._dynamo.guards import TensorGuards
                guard = TensorGuards(*tensors, dynamic_dims_sizes=[list(t.shape) for t in tensors],
                                     dynamic_dims_strides=[list(t.stride()) for t in tensors])
                if guard.check(*tensors):  # fails here, not mid-run, where the API differs
                    self._guard = guard
            except Exception:  # another torch's private API: the Python check means the same
                self._guard = None
        if self._guard is None:
            self._meta = list(map(_meta, tensors))

    def check(self, tensors: Sequence[torch.Tensor]) -> bool:
        if len(tensors) != self._n:
            return False
        if self._guard is not None:
            return self._guard.check(*tensors)
        return list(map(_meta, tensors)) == self._meta


# ---------------------------------------------------------------- a backend call's tensors

class Batch:
    """The tensors of one backend call: one (device, dtype) bucket of a group.

    The backend contract (hyper.py) in one object. `params`, `grads` and
    `state[name]` (exp_avg, exp_avg_sq, max_exp_avg_sq; momentum_buffer) are
    lists the plan validated, a state list None where the mode has no such
    entry; `steps` (Adam) the step counts; `first_step` (SGD) True where a
    buffer was made this step; `table` the int64 address table of _native.py
    (a CPU tensor whose `version` changes with its contents; None for the
    torch and functional backends); `resources` a dict the backend keeps
    derived things in (device copies of the table, a CUDA workspace) for as
    long as the plan keeps this (backend, device, dtype). `state_dicts` (the
    functional route only) are the params' own state dicts. `aux` (None, or
    one tensor per param) holds the float32 master copies (precision 1) or
    the Kahan compensations in the param dtype (precision 3); `tensor_index`
    the tensors' indices in the generator's counter (precision 2); SGD's
    `steps` are the generator's step counts under precision 2, else None.

    `Batch.adam(...)` / `Batch.sgd(...)` validate lists and build one; tests
    and tools call the backends that way too."""

    __slots__ = ("algo", "device", "dtype", "state_dtype", "params", "grads", "state", "steps",
                 "first_step", "table", "version", "resources", "state_dicts", "differentiable",
                 "aux", "tensor_index", "_array", "_grad_ptrs")

    def __init__(self, algo: str, params: list, grads: list, state: dict, steps: Optional[list],
                 first_step: Optional[list], resources: Optional[dict] = None, build_table: bool = True,
                 state_dtype: Optional[torch.dtype] = None, aux: Optional[list] = None,
                 tensor_index: Optional[list] = None) -> None:
        self.algo = algo
        self.params = params
        self.grads = grads
        self.state = state
        self.steps = steps
        self.first_step = first_step
        self.aux = aux
        self.tensor_index = list(tensor_index) if tensor_index is not None else [0] * len(params)
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = params[0].dtype if params else torch.float32
        self.state_dtype = state_dtype or self.dtype
        self.resources = resources if resources is not None else {}
        self.state_dicts = None
        self.differentiable = False
        self.version = 0
        self._array = None
        self._grad_ptrs = None
        self.table = None
        if build_table and params:
            self._array = _native.build_table(algo, params, grads, state, steps, first_step,
                                              aux=aux, index=self.tensor_index)
            self.table = torch.from_numpy(self._array)
        if all(g.layout == torch.strided for g in grads):
            # Where each grad is (set_grads checks a grad that moved; sparse
            # grads, torch's functional route only, have no address).
            self._grad_ptrs = list(map(_PTR, grads))

    @property
    def exp_avgs(self):
        return self.state["exp_avg"]

    @property
    def exp_avg_sqs(self):
        return self.state["exp_avg_sq"]

    @property
    def max_exp_avg_sqs(self):
        return self.state.get("max_exp_avg_sq")

    @property
    def momentum_buffers(self):
        return self.state.get("momentum_buffer")

    def set_grads(self, grads: list) -> None:
        """Grads with the metadata of the last ones (the caller checked): a
        grad at a new address is checked against its storage (_check_covered)
        and, with an address table, its column rewritten."""
        self.grads = grads
        if self._grad_ptrs is None:
            return
        ptrs = list(map(_PTR, grads))
        if ptrs != self._grad_ptrs:
            old = self._grad_ptrs
            for i, g in enumerate(grads):
                if i >= len(old) or ptrs[i] != old[i]:
                    _check_covered("grads", i, g)
            if self._array is not None:
                self._array[:, _native.GRAD_COLUMN] = ptrs
                self.version += 1
            self._grad_ptrs = ptrs

    def set_first_step(self, flags: list) -> None:
        self.first_step = flags
        if self._array is not None:
            self._array[:, _native.SgdCol.FIRST_STEP] = [1 if f else 0 for f in flags]
            self.version += 1

    @classmethod
    def adam(cls, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
             resources: Optional[dict] = None, *, aux: Optional[Sequence] = None,
             tensor_index: Optional[Sequence[int]] = None) -> "Batch":
        """A validated Adam batch from lists (aux, tensor_index: see the class)."""
        state = {"exp_avg": list(exp_avgs), "exp_avg_sq": list(exp_avg_sqs),
                 "max_exp_avg_sq": list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else None}
        sd = exp_avgs[0].dtype if len(exp_avgs) else None
        _validate_lists(params, grads, state, sd, steps)
        _validate_extras(params, aux, tensor_index)
        return cls("adam", list(params), list(grads), state, list(steps), None, resources, state_dtype=sd,
                   aux=list(aux) if aux is not None else None, tensor_index=tensor_index)

    @classmethod
    def sgd(cls, params, grads, momentum_buffers, first_step, resources: Optional[dict] = None, *,
            aux: Optional[Sequence] = None, tensor_index: Optional[Sequence[int]] = None,
            steps: Optional[Sequence] = None) -> "Batch":
        """A validated SGD batch from lists (momentum_buffers None without momentum;
        aux, tensor_index, steps: see the class)."""
        state = {"momentum_buffer": list(momentum_buffers) if momentum_buffers is not None else None}
        sd = momentum_buffers[0].dtype if momentum_buffers else None
        _validate_lists(params, grads, state, sd, steps)
        _validate_extras(params, aux, tensor_index)
        flags = [bool(f) for f in first_step] if first_step is not None else [False] * len(params)
        return cls("sgd", list(params), list(grads), state, list(steps) if steps is not None else None,
                   flags, resources, state_dtype=sd, aux=list(aux) if aux is not None else None,
                   tensor_index=tensor_index)


# ---------------------------------------------------------------- validation

def is_dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its storage span with no gaps or overlaps,
    in any dimension order (contiguous, channels_last, transposed ...)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda ss: ss[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _check_param(i: int, p: Any) -> None:
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
    if p.layout != torch.strided:
        raise ValueError(f"params[{i}] has layout {p.layout}; only dense (strided) parameters are supported")
    if (p.dtype.to_real() if p.is_complex() else p.dtype) not in SUPPORTED_DTYPES:
        raise TypeError(
            f"params[{i}] has dtype {p.dtype}; supported: float32, float64, float16, bfloat16 "
            "(complex parameters are updated through their real view)"
        )


def _check_grad(i: int, p: torch.Tensor, g: Any, sparse_ok: bool) -> None:
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"grads[{i}] is a {type(g).__name__}, expected a torch.Tensor")
    if g.layout != torch.strided and not (sparse_ok and g.layout == torch.sparse_coo):
        raise ValueError(
            f"grads[{i}] is sparse ({g.layout}); this optimizer needs dense gradients "
            "(torch.optim.SparseAdam handles sparse ones)"
        )
    if g.device != p.device:
        raise ValueError(f"grads[{i}] is on {g.device} but its param is on {p.device}")
    if g.dtype != p.dtype:
        raise TypeError(f"grads[{i}] has dtype {g.dtype} but its param has {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"grads[{i}] has shape {tuple(g.shape)} but its param has {tuple(p.shape)}")


def _check_state(i: int, name: str, s: Any, p: torch.Tensor, state_dtype: torch.dtype,
                 same_strides: bool = True) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"state {name!r} of params[{i}] is a {type(s).__name__}, expected a tensor")
    if s.device != p.device:
        raise ValueError(f"state {name!r} of params[{i}] is on {s.device}, its param on {p.device}")
    if s.dtype != state_dtype:
        raise TypeError(f"state {name!r} of params[{i}] has dtype {s.dtype}, expected {state_dtype}")
    if s.shape != p.shape or (same_strides and p.numel() > 1 and s.stride() != p.stride()):
        raise ValueError(
            f"state {name!r} of params[{i}] has shape {tuple(s.shape)} stride {s.stride()}, its param "
            f"shape {tuple(p.shape)} stride {p.stride()} (was the param reassigned through .data after "
            "its state was made? reset it with opt.state[p] = {} or load a matching state dict)"
        )


def _check_step(i: int, s: Any, device: torch.device) -> None:
    if not (isinstance(s, torch.Tensor) and s.dtype == torch.float32 and s.device == device and s.numel() == 1):
        got = f"{s.dtype} on {s.device} with {s.numel()} elements" if isinstance(s, torch.Tensor) else type(s).__name__
        raise ValueError(f"state 'step' of params[{i}] must be a one-element float32 tensor on {device}, got {got}")


def _check_covered(what: str, i: int, t: torch.Tensor) -> None:
    """t's storage holds every element t spans (a dense tensor: numel
    elements from its offset). `t.untyped_storage().resize_(n)` can shrink a
    storage under a tensor whose sizes still say otherwise; a kernel handed
    its address would read or write past the new end."""
    if t.device.type == "meta" or not t.numel():
        return
    have, need = t.untyped_storage().nbytes(), (t.storage_offset() + t.numel()) * t.element_size()
    if have < need:
        raise ValueError(f"{what}[{i}] spans {need} bytes of its storage but the storage holds {have} "
                         "(was its untyped_storage() resized?)")


def _check_no_overlap(params: Sequence[torch.Tensor], index: Sequence[int]) -> None:
    spans = sorted((params[i].data_ptr(), params[i].data_ptr() + params[i].numel() * params[i].element_size(), i)
                   for i in index if params[i].numel() and params[i].device.type != "meta")
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ValueError(
                f"params[{i0}] and params[{i1}] overlap in memory (views of one tensor?); "
                "a fused update would apply twice to the shared elements"
            )


STATE_DTYPES = (None, torch.float32, torch.bfloat16)   # a group's state_dtype


def check_precision_params(group: dict, params) -> None:
    """A group's precision options against its params' dtypes:
    master_weights, stochastic_rounding and kahan_summation need float16 or
    bfloat16 params, state_dtype=torch.bfloat16 real params other than float64."""
    chosen = [k for k in PRECISION_OPTIONS if group.get(k)]
    bf16_state = group.get("state_dtype") == torch.bfloat16
    if not chosen and not bf16_state:
        return
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            continue
        if chosen and p.dtype not in _LOW_PRECISION:
            raise ValueError(f"{chosen[0]}=True needs float16 or bfloat16 params, but params[{i}] is {p.dtype} "
                             "(put such params in a param group of their own without it)")
        if bf16_state and (p.dtype == torch.float64 or p.is_complex()):
            raise ValueError(f"state_dtype=torch.bfloat16 is not supported for {p.dtype} params "
                             f"(params[{i}]); use None or torch.float32 for them")


def expected_state_dtype(dtype: torch.dtype, state_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The state dtype for `dtype` params under the group's state_dtype."""
    sd = state_dtype or dtype
    ok = (sd == dtype or (sd == torch.float32 and dtype in _LOW_PRECISION)
          or (sd == torch.bfloat16 and dtype in (torch.float32, torch.float16)))
    if not ok:
        raise TypeError(
            f"state_dtype={sd} is not supported for {dtype} params: use None (the param's dtype), "
            "torch.float32 with float16/bfloat16 params, or torch.bfloat16 with any but float64 params"
        )
    return sd


def _validate_extras(params, aux, tensor_index) -> None:
    """aux (master copies or Kahan compensations) and generator indices of a batch."""
    if tensor_index is not None:
        if len(tensor_index) != len(params):
            raise ValueError(f"got {len(tensor_index)} tensor indices for {len(params)} params")
        for i, k in enumerate(tensor_index):
            if not isinstance(k, int) or not 0 <= k < 2 ** 32:
                raise ValueError(f"tensor_index[{i}] must be an int in [0, 2**32), got {k!r}")
    if aux is None:
        return
    if len(aux) != len(params):
        raise ValueError(f"got {len(aux)} aux tensors for {len(params)} params")
    for i, (p, a) in enumerate(zip(params, aux)):
        if not isinstance(a, torch.Tensor) or a.dtype not in (torch.float32, p.dtype):
            raise TypeError(f"aux[{i}] must be a float32 or {p.dtype} tensor, got {a!r:.80}")
        _check_state(i, "aux", a, p, a.dtype)
        _check_covered("aux of params", i, a)


def _validate_lists(params, grads, state: dict, state_dtype, steps) -> None:
    """Everything the kernels rely on, for one (device, dtype) batch."""
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} grads for {len(params)} params")
    for name, lst in state.items():
        if lst is not None and len(lst) != len(params):
            raise ValueError(f"got {len(lst)} {name} tensors for {len(params)} params")
    if steps is not None and len(steps) != len(params):
        raise ValueError(f"got {len(steps)} steps for {len(params)} params")
    if not params:
        return
    device, dtype = params[0].device, params[0].dtype
    sd = expected_state_dtype(dtype, state_dtype)
    for i, (p, g) in enumerate(zip(params, grads)):
        _check_param(i, p)
        if p.device != device or p.dtype != dtype:
            raise ValueError(f"params[{i}] is {p.dtype} on {p.device}; this batch is {dtype} on {device}")
        if not is_dense(p):
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}, stride {p.stride()}) is not dense")
        _check_grad(i, p, g, sparse_ok=False)
        for what, t in (("params", p), ("grads", g)):
            if _lazy(t):
                raise ValueError(f"{what}[{i}] is a negative, conjugate or zero view (its memory does not hold "
                                 "its values); pass t.resolve_neg() / t.resolve_conj() / a dense tensor")
            _check_covered(what, i, t)
        if g.stride() != p.stride() and p.numel() > 1:
            raise ValueError(f"grads[{i}] has stride {g.stride()}, its param {p.stride()}")
        for name, lst in state.items():
            if lst is not None:
                _check_state(i, name, lst[i], p, sd)
                _check_covered(f"state {name!r} of params", i, lst[i])
        if steps is not None:
            _check_step(i, steps[i], device)
    _check_no_overlap(params, range(len(params)))


def _scalar_on(t: Optional[torch.Tensor], device: torch.device, what: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        raise ValueError(f"{what} must be a one-element tensor, got {t!r}")
    if t.device != device or t.dtype != torch.float32:
        t = t.to(device=device, dtype=torch.float32)
    return t


def _real(t):
    return torch.view_as_real(t) if isinstance(t, torch.Tensor) and t.is_complex() else t


def _is_dtensor(t) -> bool:
    """FSDP2's sharded params, and their grads and state, are DTensors. Read
    without importing torch.distributed.tensor (half a second): where it was
    never imported, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def _local(t):
    """A DTensor's local shard (the tensor that holds this rank's elements;
    a DTensor's own data_ptr() is 0), anything else as it is. The update is
    elementwise, so updating every local shard is the step, whatever the
    mesh or placement (FSDP2's Shard(0), uneven and empty shards included);
    torch.optim's foreach and fused steps do the same."""
    return t._local_tensor if _is_dtensor(t) else t


def _check_dtensor_pairing(i: int, p, g, st, names) -> None:
    """A DTensor param needs a DTensor grad and DTensor state on its own mesh
    and placements, and a plain param plain ones: their local shards are what
    the kernels pair element by element."""
    tensors = [("grads", g)] + [(f"state {n!r} of params", st.get(n)) for n in names if st is not None]
    for what, t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        if _is_dtensor(p) != _is_dtensor(t):
            kind = lambda x: "a DTensor" if _is_dtensor(x) else "a plain tensor"  # noqa: E731
            raise ValueError(f"{what}[{i}] is {kind(t)} but params[{i}] is {kind(p)}; under FSDP2 the grads "
                             "and optimizer state of a sharded param are DTensors like it (load a state dict "
                             "made for these params, e.g. with torch.distributed.checkpoint.state_dict."
                             "set_optimizer_state_dict)")
        if _is_dtensor(p) and (t.device_mesh != p.device_mesh or t.placements != p.placements):
            raise ValueError(f"{what}[{i}] is a DTensor on {t.device_mesh} with placements {t.placements}, its "
                             f"param on {p.device_mesh} with {p.placements}; their local shards must match")


# ---------------------------------------------------------------- the plan

class _Bucket:
    """One backend call of a group: positions in the gathered lists, the
    backend module that serves them, and their batch."""

    __slots__ = ("index", "whole", "backend", "module", "label", "batch", "copy_grads")

    def __init__(self, index: list, whole: bool, backend: str, algo: str, batch: Batch, copy_grads: list) -> None:
        self.index = index
        self.whole = whole             # index covers every gathered param, in order
        self.backend = backend
        self.module = dispatch.backend_module(backend)
        self.label = _LABELS[backend, algo]
        self.batch = batch
        self.copy_grads = copy_grads   # positions whose grads are copied into their param's layout


class GroupPlan:
    """Everything one param group's step keeps between steps (module docstring).

    `algo` is "adam" or "sgd". The optimizer calls `step(opt, group, hyper,
    grad_scale, found_inf)`; the plan calls `opt._init_state(p, group, st)`
    for Adam params without state and makes SGD's momentum buffers itself."""

    def __init__(self, algo: str) -> None:
        self.algo = algo
        self.resources: dict[tuple, dict] = {}   # (backend, device, dtype) -> dict; outlives rebuilds
        self.rebuilds = 0        # how often the plan was built and validated (tests read it)
        self._static = None      # the static key of the last build (module docstring)
        self._params: list = []  # the group's params at the last build
        self._users: list = []   # the params that had grads, as the user holds them
        self._ptrs: list = []
        self._guard: Optional[_MetadataGuard] = None
        self._buckets: list[_Bucket] = []
        self._cplx = False
        self._first: list = []   # the state dicts that got an SGD buffer from this build
        self._kusers: list = []  # self._users as the kernels see them: DTensors' local shards
        self._dtensor = False    # whether the group has DTensor params (FSDP2)
        self._host = None        # the C++ per-step path (_host.Refresher), where it serves this plan
        self._host_used = False  # it has refreshed at least once since it was made
        self._rest = None        # the static key without `has` (the C++ path checks that)

    def _static_key(self, opt, group, has: list) -> tuple:
        return (has, *self._rest_key(opt, group))

    def _rest_key(self, opt, group) -> tuple:
        return (id(opt.state), opt.state.version, group["backend"], group["state_dtype"],
                self._state_names(group), bool(group.get("differentiable")), precision_code(group))

    def _state_names(self, group) -> tuple:
        if self.algo == "adam":
            return ADAM_STATE if group["amsgrad"] else ADAM_STATE[:2]
        return SGD_STATE if float(group["momentum"]) != 0.0 else ()

    # ------------------------------------------------------------ step
    def step(self, opt, group: dict, hyper, grad_scale=None, found_inf=None) -> None:
        params = group["params"]
        if self._host is None or not self._host_step(opt, group, params):
            if not self._python_step(opt, group, params):
                return
        if self._first and self._skip_first(opt, found_inf):
            return
        for b in self._buckets:
            with torch.profiler.record_function(b.label):
                getattr(b.module, f"{self.algo}_step")(
                    b.batch, hyper,
                    grad_scale=_scalar_on(grad_scale, b.batch.device, "grad_scale"),
                    found_inf=_scalar_on(found_inf, b.batch.device, "found_inf"),
                )
        if self._first:
            self._commit_first()
        # Hold no grads between steps (the table keeps their addresses only):
        # with zero_grad(set_to_none=True) they are freed before the next
        # backward, as with torch.optim.
        for b in self._buckets:
            b.batch.grads = None

    def _host_step(self, opt, group, params) -> bool:
        """The per-step check and grad-address refresh in C++ (_host): True
        when everything the plan validated still holds and the tables are up
        to date; False sends the step to the Python path, which rebuilds
        what changed (and remakes this, see _make_host)."""
        if self._rest_key(opt, group) != self._rest or type(params) is not list:
            return False
        changed = self._host.refresh(params)
        if changed < 0:
            for b in self._buckets:
                b.batch._grad_ptrs = []  # the C++ pass may have written some cells: recheck all
            if not self._host_used:
                self._host = None          # it fails where it was just made: not for this plan
            return False
        self._host_used = True
        if changed:
            for k, b in enumerate(self._buckets):
                if changed >> k & 1:
                    b.batch._grad_ptrs = []
                    b.batch.version += 1
        return True

    def _python_step(self, opt, group, params) -> bool:
        """The per-step check in Python: False when no param has a grad."""
        grads = list(map(_GRAD, params))
        has = list(map(operator.is_not, grads, repeat(None)))
        if not any(has):
            return False
        static = self._static_key(opt, group, has)
        user_grads = grads if all(has) else [g for g in grads if g is not None]
        if self._dtensor:
            # A DTensor's local shard can be swapped under the same DTensor
            # (FSDP2 does it on lazy init and to_empty): read it every step.
            kusers = [_local(p) for p, h in zip(params, has) if h]
            kgrads = list(map(_local, user_grads))
        else:
            kusers, kgrads = self._kusers, user_grads
        if (static != self._static or len(params) != len(self._params)
                or not all(map(operator.is_, params, self._params))
                or not self._guard.check(kusers + kgrads)
                or not self._refresh(kusers, user_grads, kgrads)):
            self._build(opt, group, params, grads, has)
        elif self._host is not None or self._host_used:
            self._make_host(params, has)  # addresses moved: the C++ path follows from here
        return True

    def _refresh(self, kusers: list, user_grads: list, kgrads: list) -> bool:
        """Metadata and param addresses as at the build: bring the grads'
        addresses up to date. False where only a rebuild can. kusers and
        kgrads are the kernels' views (local shards of DTensors); torch's
        functional route takes the user's own tensors."""
        ptrs = list(map(_PTR, kusers))
        if ptrs != self._ptrs:
            # A param at a new address (p.data = another tensor of the same
            # shape): rare, and the new memory must be validated like the
            # old (overlap with the others, storage large enough): rebuild.
            return False
        for b in self._buckets:
            g = _pick(user_grads if b.backend == "functional" else kgrads, b.index, b.whole)
            if self._cplx:
                g = list(map(_real, g))
            if b.copy_grads:
                g = list(g)
                for j in b.copy_grads:
                    g[j] = torch.empty_like(b.batch.params[j]).copy_(g[j])
            b.batch.set_grads(g)
        self._kusers = kusers
        return True

    # ------------------------------------------------------------ build
    def _build(self, opt, group, params, grads, has) -> None:
        """Gather, validate, bucket and make the batches from scratch; raise
        on anything the kernels cannot take. The previous plan is dropped
        first, so a failed build leaves nothing stale behind."""
        self._static = self._rest = self._host = None
        self._buckets = []
        self._first = []
        self.rebuilds += 1
        users = [p for p, h in zip(params, has) if h]
        user_grads = [g for g, h in zip(grads, has) if h]
        functional_group = bool(group.get("differentiable"))
        precision = precision_code(group)
        # Options torch.optim's functional code lacks: bfloat16 state for
        # float32/float16 params, and the precision modes.
        options = precision != PRECISION_NEAREST or (
            group["state_dtype"] == torch.bfloat16 and any(p.dtype != torch.bfloat16 for p in users))
        if options and functional_group:
            raise ValueError("differentiable=True cannot be combined with state_dtype=torch.bfloat16 or "
                             "master_weights / stochastic_rounding / kahan_summation")
        for i, (p, g) in enumerate(zip(users, user_grads)):
            _check_param(i, p)
            _check_grad(i, p, g, sparse_ok=self.algo == "sgd" and not options)
        check_precision_params(group, users)
        names = self._state_names(group)
        dtensor = any(map(_is_dtensor, users)) or any(map(_is_dtensor, user_grads))
        states = []
        for p in users:
            st = opt.state.get(p)
            if not st and self.algo == "adam":
                st = opt.state[p]
                opt._init_state(p, group, st)
            if self.algo == "adam" and "max_exp_avg_sq" in names and "max_exp_avg_sq" not in st:
                st["max_exp_avg_sq"] = torch.zeros_like(st["exp_avg_sq"])  # amsgrad switched on mid-run
            if precision != PRECISION_NEAREST:
                st = opt.state[p]
                opt._init_precision_state(p, group, st)
            states.append(st)
            if dtensor:
                _check_dtensor_pairing(len(states) - 1, p, user_grads[len(states) - 1], st, names)
        # The kernels' views: DTensors' local shards, complex tensors' real views.
        kusers = list(map(_local, users)) if dtensor else users
        klgrads = list(map(_local, user_grads)) if dtensor else user_grads
        cplx = any(p.is_complex() for p in users)
        kparams = list(map(_real, kusers)) if cplx else kusers
        kgrads = list(map(_real, klgrads)) if cplx else klgrads
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(kparams):
            groups.setdefault((p.device, p.dtype), []).append(i)
        extra = {"precision": precision, "aux_name": _AUX_NAMES.get(precision), "index": None}
        if precision == PRECISION_STOCHASTIC:
            # The generator's tensor index: the param's number in state_dict().
            number = {id(q): k for k, q in enumerate(q for g in opt.param_groups for q in g["params"])}
            extra["index"] = [number[id(p)] % 2 ** 32 for p in users]
        buckets = []
        for (device, dtype), idx in groups.items():
            sd = expected_state_dtype(dtype, group["state_dtype"])
            backend = dispatch.resolve_backend(group["backend"], device)
            if functional_group:
                fast, slow = [], idx
            else:
                checked = names + ((extra["aux_name"],) if extra["aux_name"] else ())
                ok = [self._kernel_ok(kparams[i], kgrads[i], states[i], checked) for i in idx]
                fast = [i for i, k in zip(idx, ok) if k]
                slow = [i for i, k in zip(idx, ok) if not k]
            whole = len(idx) == len(kparams)
            if fast:
                buckets.append(self._kernel_bucket(opt, group, users, kparams, kgrads, states, fast,
                                                   whole and not slow, names, sd, backend, extra))
            if slow and options:
                # Strided views under the options: backend torch's code, which
                # takes any layout, on the kernels' views of the tensors.
                buckets.append(self._kernel_bucket(opt, group, users, kparams, kgrads, states, slow, False,
                                                   names, sd, "torch", extra, dense=False))
            elif slow:
                buckets.append(self._functional_bucket(opt, group, users, user_grads, states, slow, names, sd,
                                                       functional_group))
        self._buckets = buckets
        self._users = users
        self._kusers = kusers
        self._dtensor = dtensor
        self._params = list(params)
        self._cplx = cplx
        self._ptrs = list(map(_PTR, kusers))
        self._guard = _MetadataGuard(kusers + klgrads)
        # Read last: this build's own state assignments (new Adam state, SGD
        # buffers) must not count as a change at the next step.
        self._static = self._static_key(opt, group, has)
        self._rest = self._static[1:]
        self._make_host(params, has)

    def _make_host(self, params, has) -> None:
        """The C++ per-step path for this build, where it can serve it: every
        bucket a kernel bucket with an address table, plain tensors (no
        subclass, not complex), grads in their params' layout. It checks what
        the Python path checks (params by identity, which have grads, the
        metadata and addresses of params and grads) and writes the grad
        column; anything else it reports, and the Python path takes over."""
        self._host, self._host_used = None, False
        if (_HOST is None or self._cplx or not self._buckets or type(params) is not list
                or len(self._buckets) > 62
                or any(b.batch._array is None or b.copy_grads for b in self._buckets)
                or any(type(p) not in _PLAIN for p in params)):
            return
        cells = [None] * len(self._users)
        for k, b in enumerate(self._buckets):
            for row, i in enumerate(b.index):
                cells[i] = (k, row)
        try:
            self._host = _HOST.Refresher(list(params), list(has), cells, [b.batch._array for b in self._buckets],
                                         _native.GRAD_COLUMN)
        except (TypeError, ValueError):
            self._host = None

    @staticmethod
    def _kernel_ok(p, g, st, names) -> bool:
        """Whether a kernel can take this param: dense, a dense grad, both
        holding their values in memory (_lazy), and state (where there is
        some) laid out as the param. A state tensor in
        another layout (a param re-laid through .data, say) goes to torch's
        functional code, which pairs elements by index, as torch.optim does."""
        if not is_dense(p) or g.layout != torch.strided or _lazy(p) or _lazy(g):
            return False
        if st is None or p.numel() <= 1:
            return True
        for name in names:
            s = _real(_local(st.get(name)))
            if isinstance(s, torch.Tensor) and s.shape == p.shape and s.stride() != p.stride():
                return False
        return True

    def _kernel_bucket(self, opt, group, users, kparams, kgrads, states, idx, whole, names, sd, backend,
                       extra, dense: bool = True) -> _Bucket:
        """A backend's batch of the params idx. dense=False: params that are
        strided views, for backend torch (which pairs elements by index, and
        whose state need not share the param's strides)."""
        params = [kparams[i] for i in idx]
        grads = [kgrads[i] for i in idx]
        copy_grads = []
        for j, (p, g) in enumerate(zip(params, grads)):
            _check_covered("params", idx[j], p)
            _check_covered("grads", idx[j], g)
            if dense and g.stride() != p.stride() and p.numel() > 1:
                # The kernels pair elements by storage position: a grad in
                # another layout (a contiguous grad of a channels_last
                # param) is read through a copy in the param's layout.
                copy_grads.append(j)
                grads[j] = torch.empty_like(p).copy_(g)
        state: dict[str, Optional[list]] = {}
        first = [False] * len(idx) if self.algo == "sgd" else None
        for name in (ADAM_STATE if self.algo == "adam" else SGD_STATE):
            if name not in names:
                state[name] = None
                continue
            col = []
            for j, i in enumerate(idx):
                s = states[i].get(name) if states[i] is not None else None
                if s is None and name == "momentum_buffer":
                    # torch.optim.SGD's buffer starts as the first step's
                    # update: made here, set by the kernel (first_step).
                    u = users[i]
                    s = torch.empty_like(u) if u.is_complex() else torch.empty_like(u, dtype=sd)
                    st = opt.state[u]
                    st["momentum_buffer"] = s
                    first[j] = True
                    self._first.append(st)
                s = _real(_local(s))
                _check_state(i, name, s, params[j], sd, same_strides=dense)
                _check_covered(f"state {name!r} of params", i, s)
                col.append(s)
            state[name] = col
        aux = None
        aux_name = extra["aux_name"]
        if aux_name is not None:
            aux = []
            for j, i in enumerate(idx):
                a = _local(states[i].get(aux_name))
                _check_state(i, aux_name, a, params[j],
                             torch.float32 if aux_name == MASTER_KEY else params[j].dtype, same_strides=dense)
                _check_covered(f"state {aux_name!r} of params", i, a)
                aux.append(a)
        steps = None
        if self.algo == "adam" or extra["precision"] == PRECISION_STOCHASTIC:
            steps = [states[i].get("step") for i in idx]
            for i, s in zip(idx, steps):
                _check_step(i, s, kparams[i].device)
        index = [extra["index"][i] for i in idx] if extra["index"] is not None else None
        if dense:
            _check_no_overlap(kparams, idx)
        # The plan's own views of the state's storage (module docstring).
        held = {k: (list(map(_DETACH, v)) if v is not None else None) for k, v in state.items()}
        held_steps = list(map(_DETACH, steps)) if steps is not None else None
        held_aux = list(map(_DETACH, aux)) if aux is not None else None
        resources = self.resources.setdefault((backend, params[0].device, params[0].dtype), {})
        batch = Batch(self.algo, params, grads, held, held_steps, first, resources,
                      build_table=backend in _KERNEL_BACKENDS, state_dtype=sd, aux=held_aux, tensor_index=index)
        return _Bucket(idx, whole, backend, self.algo, batch, copy_grads)

    def _functional_bucket(self, opt, group, users, user_grads, states, idx, names, sd, differentiable) -> _Bucket:
        """Tensors no kernel serves (strided views, sparse grads, or the whole
        group with differentiable=True): torch.optim's functional code on the
        user's own tensors (backend_functional.py)."""
        params = [users[i] for i in idx]
        grads = [user_grads[i] for i in idx]
        state = {}
        for name in (ADAM_STATE if self.algo == "adam" else SGD_STATE):
            state[name] = [states[i].get(name) if states[i] is not None else None for i in idx] \
                if name in names else None
        for name, col in state.items():
            if col is None:
                continue
            for j, i in enumerate(idx):
                if col[j] is not None:  # torch's code pairs by index: any layout
                    _check_state(i, name, col[j], params[j], sd if not params[j].is_complex() else params[j].dtype,
                                 same_strides=False)
        steps = None
        if self.algo == "adam":
            steps = [states[i].get("step") for i in idx]
            for i, s in zip(idx, steps):
                _check_step(i, s, users[i].device)
        batch = Batch(self.algo, params, grads, state, steps, None, build_table=False, state_dtype=sd)
        batch.state_dicts = [opt.state[p] for p in params] if self.algo == "sgd" else None
        batch.differentiable = differentiable
        return _Bucket(idx, False, "functional", self.algo, batch, [])

    # ------------------------------------------------------------ SGD's first step
    def _skip_first(self, opt, found_inf) -> bool:
        """A step skipped by found_inf leaves no new buffer behind (the next
        step starts the buffer from its own gradient, as torch does)."""
        if found_inf is None or float(found_inf) == 0.0:
            return False
        for st in self._first:
            st.pop("momentum_buffer", None)
        self._static = self._rest = None  # the buffers are gone: rebuild next step
        self._first = []
        return True

    def _commit_first(self) -> None:
        for b in self._buckets:
            if b.batch.first_step is not None and any(b.batch.first_step):
                b.batch.set_first_step([False] * len(b.batch.first_step))
        self._first = []


def _pick(lst: list, idx: list, whole: bool) -> list:
    return lst if whole else [lst[i] for i in idx]
