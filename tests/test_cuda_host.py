"""Host-side tests of fused_adamw._cuda: everything that runs without a GPU.

The module imports on any machine where it was built (cudart is linked
statically); these tests check what it decides before a launch: the chunk
plan (boundaries, counts, sizes over 2**31, many tensors), the per-tensor
16-byte-path decision, the validation of address tables and arguments, and
that a CUDA failure is a RuntimeError. The kernels themselves are tested on a
GPU by test_adam_cuda.py and the cuda ids of test_backend_suite.py, and on
the host through the emulated module by test_cuda_emulation.py.

Compiler guard rails (skipped only where nvcc, or cuobjdump and nvdisasm,
are missing): the kernels compiled for sm_90 with -Xptxas -v have no spills
and at most 64 registers; the 16-byte path is LDG.E.128 / STG.E.128 in SASS.

    pytest tests/test_cuda_host.py
"""
import importlib.util
import math
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

_cuda = pytest.importorskip("fused_adamw._cuda")

from fused_adamw import _native  # noqa: E402
from fused_adamw.hyper import AdamHyper, SgdHyper  # noqa: E402

CHUNK = _cuda.CHUNK_ELEMS
BASE = 0x7F00_0000_0000  # a plausible, 4 KB-aligned device address; never dereferenced here


def expected_plan(numels, chunk):
    tensor, start, end = [], [], []
    for i, n in enumerate(numels):
        for c in range(-(-n // chunk)):
            tensor.append(i)
            start.append(c * chunk)
            end.append(min((c + 1) * chunk, n))
    return tensor, start, end


def adam_table(numels, *, amsgrad=False, misalign=None):
    """An int64 [n, 7] Adam table of fake, disjoint addresses; misalign maps
    (row, column) to a byte offset added to that address."""
    n = len(numels)
    t = np.zeros((n, _native.AdamCol.COUNT), dtype=np.int64)
    t[:, _native.AdamCol.NUMEL] = numels
    cols = [_native.AdamCol.PARAM, _native.AdamCol.GRAD, _native.AdamCol.EXP_AVG, _native.AdamCol.EXP_AVG_SQ,
            _native.AdamCol.STEP] + ([_native.AdamCol.MAX_EXP_AVG_SQ] if amsgrad else [])
    for k, col in enumerate(cols):
        t[:, col] = BASE + (np.arange(n, dtype=np.int64) * len(cols) + k) * (1 << 24)
    for (row, col), off in (misalign or {}).items():
        t[row, col] += off
    return t


def sgd_table(numels, *, momentum=True, first=None):
    n = len(numels)
    t = np.zeros((n, _native.SgdCol.COUNT), dtype=np.int64)
    t[:, _native.SgdCol.NUMEL] = numels
    cols = [_native.SgdCol.PARAM, _native.SgdCol.GRAD] + ([_native.SgdCol.MOMENTUM_BUFFER] if momentum else [])
    for k, col in enumerate(cols):
        t[:, col] = BASE + (np.arange(n, dtype=np.int64) * len(cols) + k) * (1 << 24)
    t[:, _native.SgdCol.FIRST_STEP] = first if first is not None else 0
    return t


def plan_of(table, hyper):
    return _cuda.plan_table(table.ctypes.data, table.shape[0], hyper)


# ---------------------------------------------------------------- module

def test_build_info_reports_archs_and_scheme():
    info = _cuda.build_info()
    archs = info["archs"].split(",")
    assert any(a.startswith("80") for a in archs) and any(a.startswith("90") for a in archs), info["archs"]
    assert info["nvcc"].count(".") == 2
    assert "device-resident" in info["metadata"]
    assert info["chunk_elems"] == CHUNK and CHUNK % 8 == 0  # a multiple of every 16-byte pack width
    assert info["cudart_static"] is True


def test_device_count_is_a_count():
    n = _cuda.device_count()
    assert isinstance(n, int) and n >= 0


def test_hyper_structs_round_trip():
    h = AdamHyper(lr=0.1, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.3, decay_coeff=3.0,
                  decoupled=False, amsgrad=True, maximize=True)
    from dataclasses import fields
    assert _cuda.AdamHyper.FIELDS == tuple(f.name for f in fields(AdamHyper))
    assert _cuda.SgdHyper.FIELDS == tuple(f.name for f in fields(SgdHyper))
    c = _native.to_cpp(_cuda, h)
    assert isinstance(c, _cuda.AdamHyper)
    assert (c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.decay_coeff, c.decoupled, c.amsgrad, c.maximize) == (
        0.1, 0.8, 0.95, 1e-6, 0.3, 3.0, False, True, True)
    s = _native.to_cpp(_cuda, SgdHyper(lr=0.2, momentum=0.9, dampening=0.1, weight_decay=0.01,
                                       decay_coeff=0.05, decoupled=True, nesterov=True, maximize=True))
    assert (s.lr, s.momentum, s.dampening, s.weight_decay, s.decay_coeff, s.decoupled, s.nesterov, s.maximize) == (
        0.2, 0.9, 0.1, 0.01, 0.05, True, True, True)
    s.lr = 0.5
    assert s.lr == 0.5


def test_workspace_is_created_without_touching_the_gpu():
    ws = _cuda.Workspace(3)
    assert (ws.device, ws.uploads, ws.capacity_bytes, ws.graph_owned) == (3, 0, 0, False)


def test_backend_module_imports():
    import fused_adamw.backend_cuda as backend
    assert callable(backend.adam_step) and callable(backend.sgd_step)


# ---------------------------------------------------------------- chunk planning

def test_chunk_plan_of_odd_sizes():
    numels = [1, 7, 4097, 2**20 + 3, 0, CHUNK, CHUNK + 1]
    plan = _cuda.plan_chunks(numels)
    tensor, start, end = expected_plan(numels, CHUNK)
    assert (plan["tensor"], plan["start"], plan["end"]) == (tensor, start, end)
    assert len(plan["tensor"]) == 1 + 1 + 1 + 17 + 0 + 1 + 2
    assert plan["blocks"] == len(tensor)


def test_chunks_tile_every_tensor_exactly():
    rng = np.random.default_rng(7)
    numels = [int(x) for x in rng.integers(0, 300_000, size=64)]
    plan = _cuda.plan_chunks(numels)
    for i, n in enumerate(numels):
        spans = [(s, e) for t, s, e in zip(plan["tensor"], plan["start"], plan["end"]) if t == i]
        assert len(spans) == math.ceil(n / CHUNK)
        covered = 0
        for s, e in spans:
            assert s == covered and 0 < e - s <= CHUNK
            covered = e
        assert covered == n


def test_chunk_plan_beyond_2_31_elements():
    big = 2**31 + 5
    plan = _cuda.plan_chunks([3, big, 2**40 + 1], CHUNK)
    counts = [1, -(-big // CHUNK), -(-(2**40 + 1) // CHUNK)]
    assert len(plan["tensor"]) == sum(counts)
    second = [(s, e) for t, s, e in zip(plan["tensor"], plan["start"], plan["end"]) if t == 1]
    assert second[-1] == ((counts[1] - 1) * CHUNK, big) and second[-1][0] >= 2**31
    third = [(s, e) for t, s, e in zip(plan["tensor"], plan["start"], plan["end"]) if t == 2]
    assert third[-1] == (2**40, 2**40 + 1)


def test_chunk_plan_of_many_tensors():
    rng = np.random.default_rng(11)
    numels = [int(x) for x in rng.integers(1, 5000, size=20000)]
    plan = _cuda.plan_chunks(numels, 4096)
    tensor, start, end = expected_plan(numels, 4096)
    assert (plan["tensor"], plan["start"], plan["end"]) == (tensor, start, end)
    assert plan["blocks"] == len(tensor)


def test_empty_plan_launches_no_update_blocks():
    # The step kernel increments the steps (of empty tensors too); the update
    # kernel is not launched for a plan without chunks (a grid of 0 blocks is
    # a launch error).
    for numels in ([], [0, 0]):
        plan = _cuda.plan_chunks(numels)
        assert plan["tensor"] == [] and plan["blocks"] == 0


@pytest.mark.parametrize("numel,sms,chunk", [(2**20, 132, 4096), (2**20, 4, 32768), (2**24, 132, 16384),
                                              (2**30, 132, CHUNK), (5, 132, 4096)])
def test_chunk_size_follows_group_size_and_sm_count(numel, sms, chunk):
    """About 8 blocks per SM (kTargetBlocksPerSm in multi_tensor.cuh), chunks
    a power of two between 4K and 64K elements."""
    plan = plan_of(adam_table([numel]), _native.to_cpp(_cuda, AdamHyper()))
    assert plan["chunk_elems"] == CHUNK
    plan = _cuda.plan_table(adam_table([numel]).ctypes.data, 1, _native.to_cpp(_cuda, AdamHyper()), sm_count=sms)
    assert plan["chunk_elems"] == chunk and plan["blocks"] == -(-numel // chunk)


def test_launch_overrides_force_chunk_and_grid():
    try:
        _cuda.set_launch_overrides(chunk_elems=40, max_blocks=3)
        plan = _cuda.plan_table(adam_table([1000]).ctypes.data, 1, _native.to_cpp(_cuda, AdamHyper()), sm_count=132)
        assert plan["chunk_elems"] == 40 and len(plan["tensor"]) == 25 and plan["blocks"] == 3
        with pytest.raises(ValueError, match="multiple of 8"):
            _cuda.set_launch_overrides(chunk_elems=12)
    finally:
        _cuda.set_launch_overrides(0, 0)
    assert _cuda.launch_overrides() == (0, 0)


@pytest.mark.parametrize("numels,chunk,what", [
    ([5, -1], CHUNK, "negative"),
    ([5], 0, "chunk_elems"),
    ([2**40], 1, "too many elements"),
])
def test_chunk_plan_rejects(numels, chunk, what):
    with pytest.raises(ValueError, match=what):
        _cuda.plan_chunks(numels, chunk)


# ---------------------------------------------------------------- tables

def test_vector_path_needs_every_used_pointer_aligned():
    numels = [10, 10, 10, 10, 10]
    table = adam_table(numels, misalign={(1, _native.AdamCol.GRAD): 2, (2, _native.AdamCol.EXP_AVG_SQ): 8,
                                         (3, _native.AdamCol.PARAM): 16, (4, _native.AdamCol.STEP): 4})
    plan = plan_of(table, _cuda.AdamHyper())
    # 16 bytes off is still aligned; the step is a scalar, not part of the packs.
    assert plan["vector"] == [True, False, False, True, True]


def test_unused_state_columns_are_ignored():
    table = adam_table([8, 8])
    table[0, _native.AdamCol.MAX_EXP_AVG_SQ] = BASE + 3  # not amsgrad: never read
    assert plan_of(table, _cuda.AdamHyper(amsgrad=False))["vector"] == [True, True]
    with pytest.raises(ValueError, match=r"row 1, column max_exp_avg_sq"):
        plan_of(table, _cuda.AdamHyper(amsgrad=True))
    ams = adam_table([8, 8], amsgrad=True, misalign={(0, _native.AdamCol.MAX_EXP_AVG_SQ): 4})
    assert plan_of(ams, _cuda.AdamHyper(amsgrad=True))["vector"] == [False, True]


def test_table_plan_matches_chunk_plan():
    numels = [1, 7, 4097, 2**20 + 3, 0]
    plan = plan_of(adam_table(numels), _cuda.AdamHyper())
    tensor, start, end = expected_plan(numels, CHUNK)
    assert (plan["tensor"], plan["start"], plan["end"]) == (tensor, start, end)


@pytest.mark.parametrize("row,col,value,what", [
    (1, _native.AdamCol.PARAM, 0, "row 1, column param"),
    (0, _native.AdamCol.GRAD, 0, "row 0, column grad"),
    (2, _native.AdamCol.EXP_AVG, 0, "row 2, column exp_avg"),
    (1, _native.AdamCol.EXP_AVG_SQ, 0, "row 1, column exp_avg_sq"),
    (2, _native.AdamCol.STEP, 0, "row 2, column step"),
    (0, _native.AdamCol.STEP, BASE + 2, "row 0, column step"),
    (1, _native.AdamCol.NUMEL, -4, "row 1, column numel"),
])
def test_adam_table_rows_are_validated(row, col, value, what):
    table = adam_table([3, 4, 5])
    table[row, col] = value
    with pytest.raises(ValueError, match=what):
        plan_of(table, _cuda.AdamHyper())


def test_empty_tensor_may_have_no_storage():
    table = adam_table([0, 4])
    table[0, [_native.AdamCol.PARAM, _native.AdamCol.GRAD, _native.AdamCol.EXP_AVG, _native.AdamCol.EXP_AVG_SQ]] = 0
    plan = plan_of(table, _cuda.AdamHyper())
    assert plan["tensor"] == [1]


def test_sgd_table_buffer_and_first_step():
    table = sgd_table([5, 6, 7], first=[1, 0, 1])
    plan = plan_of(table, _cuda.SgdHyper(momentum=0.9))
    assert plan["first_step"] == [True, False, True] and plan["vector"] == [True] * 3
    # Without momentum there is no buffer: its column and flag are ignored.
    bare = sgd_table([5, 6, 7], momentum=False, first=[1, 1, 1])
    bare[1, _native.SgdCol.MOMENTUM_BUFFER] = 3
    plan = plan_of(bare, _cuda.SgdHyper(momentum=0.0))
    assert plan["first_step"] == [False] * 3 and plan["vector"] == [True] * 3
    with pytest.raises(ValueError, match=r"row 0, column momentum_buffer"):
        plan_of(bare, _cuda.SgdHyper(momentum=0.5))


# ---------------------------------------------------------------- arguments

def _adam_call(table_addr=0, n=0, param=0, state=0, device=0, workspace=None):
    _cuda.adam_step(table_addr, n, param, state, _cuda.AdamHyper(), 0, 0, 0, device, 0, workspace)


@pytest.mark.parametrize("kw,what", [
    (dict(param=7), "param_dtype"),
    (dict(param=-1), "param_dtype"),
    (dict(state=9), "state_dtype"),
    (dict(param=0, state=2), "state_dtype"),     # fp16 state for fp32 params
    (dict(param=1, state=0), "state_dtype"),     # fp32 state for fp64 params
    (dict(param=3, state=2), "state_dtype"),     # fp16 state for bf16 params
    (dict(n=-1), "n_tensors"),
    (dict(n=1), "table_addr"),
    (dict(device=-1), "device_index"),
    (dict(workspace=_cuda.Workspace(1)), "workspace"),
])
def test_arguments_are_validated_before_any_cuda_call(kw, what):
    with pytest.raises(ValueError, match=what):
        _adam_call(**kw)
    sgd_kw = dict(table_addr=0, n=0, param=0, state=0, device=0, workspace=None)
    sgd_kw.update(kw)
    with pytest.raises(ValueError, match=what):
        _cuda.sgd_step(sgd_kw["table_addr"], sgd_kw["n"], sgd_kw["param"], sgd_kw["state"], _cuda.SgdHyper(),
                       0, 0, 0, sgd_kw["device"], 0, sgd_kw["workspace"])


@pytest.mark.parametrize("param,state", [(0, 0), (1, 1), (2, 2), (2, 0), (3, 3), (3, 0), (0, 3), (2, 3)])
def test_allowed_dtype_pairs_with_nothing_to_do(param, state):
    _adam_call(param=param, state=state)  # n_tensors == 0: validated, then nothing


@pytest.mark.skipif(_cuda.device_count() > 0, reason="checks the error raised where there is no GPU")
def test_cuda_failure_is_a_runtime_error():
    table = adam_table([4])
    with pytest.raises(RuntimeError, match="fused_adamw._cuda: cuda"):
        _adam_call(table.ctypes.data, 1, 0, 0, 0, _cuda.Workspace(0))


# ---------------------------------------------------------------- compiler guard rails

ROOT = Path(__file__).resolve().parent.parent
GUARD_ARCH = "sm_90"
# With 512-thread blocks, 64 registers a thread keep 2 blocks resident per
# SM (65536 registers); more would leave one.
MAX_REGISTERS = 64


def _missing(what: str):
    """Skip, or fail where the run asks for the guard rails
    (FUSED_ADAMW_GUARD_RAILS=1, benchmarks/gpu_check.sh)."""
    if os.environ.get("FUSED_ADAMW_GUARD_RAILS", "0") not in ("", "0"):
        pytest.fail(f"{what} (FUSED_ADAMW_GUARD_RAILS=1 requires the guard rails)")
    pytest.skip(what)


def _tool(name: str) -> Optional[str]:
    """A CUDA tool on PATH, beside nvcc, or from the nvidia-cuda-* pip wheels."""
    found = shutil.which(name)
    if found:
        return found
    for root in ("/usr/local/cuda/bin",):
        if os.access(os.path.join(root, name), os.X_OK):
            return os.path.join(root, name)
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []) or []:
        for hit in sorted(Path(base).glob(f"*/bin/{name}")):
            if os.access(hit, os.X_OK):
                return str(hit)
    return None


@pytest.fixture(scope="module")
def guard_build(tmp_path_factory):
    """adam_cuda.cu and sgd_cuda.cu compiled for sm_90 with -Xptxas -v:
    {file stem: (ptxas log, cubin path)} (about 25 s on 2 cores)."""
    nvcc = _tool("nvcc")
    if nvcc is None:
        _missing("nvcc not found")
    out = tmp_path_factory.mktemp("guard")
    built = {}
    for stem in ("adam_cuda", "sgd_cuda"):
        cubin = out / f"{stem}.cubin"
        cmd = [nvcc, "-O3", "--expt-relaxed-constexpr", "-std=c++17", f"-arch={GUARD_ARCH}", "-Xptxas", "-v",
               "-cubin", "-o", str(cubin), "-I", str(ROOT / "csrc/include"), "-I", str(ROOT / "csrc/cuda"),
               str(ROOT / f"csrc/cuda/{stem}.cu")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-3000:]
        built[stem] = (res.stdout + res.stderr, cubin)
    return built


_PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(\S+)' for '\w+'\n"
    r"ptxas info\s+: Function properties for \S+\n"
    r"\s+(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
    r"ptxas info\s+: Used (\d+) registers")


def _short(mangled: str) -> str:
    """The kernel and its template arguments, from a mangled name."""
    m = re.search(r"(adam_step_kernel|adam_precision_kernel|adam_kernel|sgd_step_kernel|sgd_precision_kernel|"
                  r"sgd_kernel|upload_kernel)(I.*?EEv)?", mangled)
    return m.group(0) if m else mangled


def test_ptxas_registers_and_no_spills(guard_build):
    """Every kernel: no spills, no stack frame, at most MAX_REGISTERS registers."""
    rows = []
    for stem, (log, _) in guard_build.items():
        entries = _PTXAS_ENTRY.findall(log)
        assert entries, log[-2000:]
        for name, stack, stores, loads, regs in entries:
            rows.append((stem, name, int(stack), int(stores), int(loads), int(regs)))
    print("\n".join(f"{_short(n)}: {r} registers, stack {st}, spills {a}/{b}" for _, n, st, a, b, r in rows))
    kernels = {n for _, n, *_ in rows}
    # Plain kernels: 8 (param, state) dtype pairs x the amsgrad / momentum flag.
    # Precision kernels: the 5 pairs with a 16-bit param x 3 modes x the flag.
    assert any("adam_step_kernel" in n for n in kernels) and any("sgd_step_kernel" in n for n in kernels)
    assert sum("adam_kernel" in n for n in kernels) == 16
    assert sum("sgd_kernel" in n for n in kernels) == 16
    assert sum("adam_precision_kernel" in n for n in kernels) == 30
    assert sum("sgd_precision_kernel" in n for n in kernels) == 30
    for stem, name, stack, stores, loads, regs in rows:
        assert (stack, stores, loads) == (0, 0, 0), f"{name}: stack {stack}, spill stores {stores}, loads {loads}"
        assert regs <= MAX_REGISTERS, f"{name}: {regs} registers"


def test_vector_path_uses_128_bit_global_accesses(guard_build):
    """The 16-byte path compiles to LDG.E.128 / STG.E.128 (the SASS of each
    update kernel): one per 16 bytes of each tensor it reads and writes."""
    cuobjdump = _tool("cuobjdump")
    nvdisasm = _tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        _missing("cuobjdump / nvdisasm not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
    counts = {}
    for stem, (_, cubin) in guard_build.items():
        res = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr
        current = None
        for line in res.stdout.splitlines():
            m = re.search(r"Function : (\S+)", line)
            if m:
                current = m.group(1)
                counts[current] = {"LDG128": 0, "STG128": 0}
            elif current and re.search(r"\bLDG\.E\.128\b", line):
                counts[current]["LDG128"] += 1
            elif current and re.search(r"\bSTG\.E\.128\b", line):
                counts[current]["STG128"] += 1
    print("\n".join(f"{_short(n)}: {c}" for n, c in counts.items()))
    checked = 0
    for name, c in counts.items():
        # The mangled name ends with the template flag: Lb1 amsgrad / momentum.
        flag = re.search(r"Lb([01])EEEv", name)
        if "adam_kernel" in name:
            need = (5, 4) if flag.group(1) == "1" else (4, 3)
        elif "sgd_kernel" in name:
            need = (3, 2) if flag.group(1) == "1" else (2, 1)
        else:
            continue
        checked += 1
        assert c["LDG128"] >= need[0] and c["STG128"] >= need[1], f"{name}: {c}, want at least {need}"
    assert checked == 32
