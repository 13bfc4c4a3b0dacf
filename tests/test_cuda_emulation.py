"""The CUDA kernels executed on CPU tensors: fused_adamw._cuda_emu.

_cuda_emu is csrc/cuda/*.cu compiled a second time by the host compiler over
csrc/emulation/cuda_emulation.h: blocks run in a shuffled order, the threads
of a block are fibers with a real __syncthreads barrier, and the runtime calls
(malloc, memset, memcpy, events, stream waits, capture) work on host memory,
with a simulated stream capture. FUSED_ADAMW_CUDA_EMULATION=1 makes
backend="cuda" run CPU tensors through it with the same Python glue
(backend_cuda.py), tables and workspace as on a GPU.

Here, with the launch knobs (a small chunk size and a capped grid, so chunk
indices, tails and blocks looping over chunks are exercised at test sizes):
the emulator's own barrier and divergence check; bit-for-bit equality with
the cpu backend's baseline build over many chunks and block orders;
misaligned views with guard elements; a chunk index whose element offset
passes 2**31 on a small buffer; empty tensors; found_inf; the step increment
happening exactly once; table re-uploads in 32 KB kernel-parameter pieces;
workspace growth and freeing; the simulated capture (the captured step holds
the step and update kernels only, replays equal eager steps); cross-stream
ordering. CI runs this file under AddressSanitizer and UBSan (.ci/run).

What emulation cannot show stays for the GPU run (benchmarks/gpu_check.sh):
the memory model (one emulated thread runs at a time), occupancy, registers
and spills, timing, and the real capture rules beyond the simulated ones.

    pytest tests/test_cuda_emulation.py
"""
from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

emu = pytest.importorskip("fused_adamw._cuda_emu")
_cpu = pytest.importorskip("fused_adamw._cpu")

import fused_adamw as fa  # noqa: E402
from fused_adamw import _native  # noqa: E402
from fused_adamw.hyper import AdamHyper  # noqa: E402

SMALL_CHUNK = 40  # a multiple of every pack width (8), not a power of two
SMALL_GRID = 3


@pytest.fixture(autouse=True)
def emulation(monkeypatch):
    """Emulation on, the cpu backend's baseline build (no FMA, as the
    emulated module), default knobs restored afterwards."""
    monkeypatch.setenv("FUSED_ADAMW_CUDA_EMULATION", "1")
    isa = _cpu.build_info()["isa"]
    _cpu.set_isa("base")
    options = emu.options()
    yield
    _cpu.set_isa(isa)
    emu.set_launch_overrides(0, 0)
    emu.set_options(seed=options["seed"], shuffle=options["shuffle"], sm_count=options["sm_count"])
    emu.set_current_stream(0)


@pytest.fixture
def small_launch():
    emu.set_launch_overrides(chunk_elems=SMALL_CHUNK, max_blocks=SMALL_GRID)


def kernels_since_reset():
    return emu.stats()["kernels"]


def run(backend, sizes, *, cls=fa.AdamW, dtype=torch.float32, steps=4, seed=0, views=False, state_dtype=None,
        **kw):
    """Params of these sizes (as offset views of a guarded buffer when
    `views`), `steps` steps; returns (params, optimizer, guard buffers)."""
    gen = torch.Generator().manual_seed(seed)
    params, bufs = [], []
    for n in sizes:
        init = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
        if views:  # one element of guard on each side: storage offset 1, not 16-byte aligned
            buf = torch.full((n + 2,), 7.0, dtype=dtype)
            buf[1:n + 1] = init
            bufs.append(buf)
            p = buf[1:n + 1]
        else:
            p = init.clone()
        params.append(p.requires_grad_())
    kw = dict(dict(lr=1e-2, weight_decay=0.1), **kw)
    opt = cls(params, backend=backend, state_dtype=state_dtype, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype)
        opt.step()
    return params, opt, bufs


def assert_same(a, b):
    (pa, oa, _), (pb, ob, _) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        assert oa.state[x].keys() == ob.state[y].keys()
        for key in ob.state[y]:
            assert torch.equal(oa.state[x][key], ob.state[y][key]), key


# ---------------------------------------------------------------- the emulator itself

def test_build_info_says_emulated():
    info = emu.build_info()
    assert info["emulated"] is True and info["archs"] == "emulated"
    assert "step kernel" in info["step_increment"]


def test_barrier_orders_shared_memory_across_threads():
    """Each thread writes a __shared__ slot, waits at __syncthreads, reads its
    neighbour's slot and an atomic arrival count: only a barrier that holds
    every thread until all arrived gives every read the neighbour's write."""
    out = emu.selftest_barrier_exchange(4)
    expect = [b * 1000 + (t + 1) % 128 for b in range(4) for t in range(128)]
    assert out == expect


def test_shuffled_threads_expose_a_missing_barrier():
    """Thread 0 writes a __shared__ value the others read with no barrier:
    in index order the bug hides (thread 0 runs first); shuffled, some
    threads read the previous launch's value."""
    emu.set_options(shuffle=False)
    emu.selftest_missing_barrier(1)
    assert emu.selftest_missing_barrier(2) == [2] * 128
    emu.set_options(shuffle=True, seed=7)
    out = emu.selftest_missing_barrier(3)
    assert 2 in out and 3 in out


def test_divergent_barrier_is_a_launch_failure():
    with pytest.raises(RuntimeError, match="cudaErrorLaunchFailure"):
        emu.selftest_divergent_barrier()
    assert "64 of 128 threads" in emu.last_launch_failure()


def test_unsafe_call_during_capture_invalidates_it():
    """The simulated capture refuses cudaMalloc in global capture mode, as a GPU does."""
    s = emu.stream_create()
    try:
        emu.begin_capture(s)
        with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureUnsupported"):
            emu.selftest_barrier_exchange(1)
        with pytest.raises(RuntimeError, match="cudaErrorStreamCaptureInvalidated"):
            emu.end_capture(s)
    finally:
        emu.stream_destroy(s)


def test_dispatch_serves_cpu_tensors_only_when_asked(monkeypatch):
    from fused_adamw import dispatch
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("auto", cpu) == "cpu"  # auto stays cpu under emulation
    assert dispatch.resolve_backend("cuda", cpu) == "cuda"
    assert "cuda" in fa.available_backends("cpu")
    monkeypatch.setenv("FUSED_ADAMW_CUDA_EMULATION", "0")
    with pytest.raises(ValueError, match="FUSED_ADAMW_CUDA_EMULATION=1"):
        dispatch.resolve_backend("cuda", cpu)
    assert "cuda" not in fa.available_backends("cpu")


# ---------------------------------------------------------------- equal to the cpu backend

SIZES = (1, 7, 8, 39, 40, 41, 1000, 4097)


@pytest.mark.parametrize("dtype_id,dtype,state_dtype", [
    ("fp32", torch.float32, None), ("fp64", torch.float64, None), ("bf16", torch.bfloat16, None),
    ("fp16-fp32state", torch.float16, torch.float32)])
@pytest.mark.parametrize("cls,kw", [
    (fa.AdamW, {}), (fa.Adam, dict(amsgrad=True, maximize=True)),
    (fa.SGD, dict(momentum=0.9, nesterov=True)), (fa.SGDW, dict(momentum=0.8, dampening=0.1))],
    ids=["adamw", "adam-amsgrad-maximize", "sgd-nesterov", "sgdw"])
def test_small_chunks_and_grid_equal_cpu(small_launch, dtype_id, dtype, state_dtype, cls, kw):
    """40-element chunks on a 3-block grid: every tensor of several chunks,
    blocks looping over chunks in a shuffled order, tails of every length."""
    if cls in (fa.Adam, fa.AdamW) and dtype == torch.float16:
        kw = dict(kw, eps=1e-4)
    emu.reset_stats()
    ours = run("cuda", SIZES, cls=cls, dtype=dtype, state_dtype=state_dtype, **kw)
    blocks = emu.stats()["blocks"]
    assert_same(ours, run("cpu", SIZES, cls=cls, dtype=dtype, state_dtype=state_dtype, **kw))
    assert blocks > 0


@pytest.mark.parametrize("seed,shuffle", [(1, True), (2, True), (99, True), (1, False)])
def test_block_order_does_not_matter(small_launch, seed, shuffle):
    emu.set_options(seed=seed, shuffle=shuffle)
    assert_same(run("cuda", SIZES), run("cpu", SIZES))


def test_chunk_size_is_chosen_from_the_group_and_sm_count():
    table = np.zeros((1, _native.AdamCol.COUNT), dtype=np.int64)
    table[0, 1:] = 1 << 20
    hyper = emu.AdamHyper()
    for numel, sms, chunk in [(2**20, 132, 4096), (2**20, 4, 32768), (2**30, 132, 65536), (100, 132, 4096)]:
        table[0, _native.AdamCol.NUMEL] = numel
        plan = emu.plan_table(table.ctypes.data, 1, hyper, sm_count=sms)
        assert plan["chunk_elems"] == chunk, (numel, sms)
    # A 2**20-element group on an H100 (132 SMs): 256 blocks, not 16.
    table[0, _native.AdamCol.NUMEL] = 2**20
    assert emu.plan_table(table.ctypes.data, 1, hyper, sm_count=132)["blocks"] == 256
    assert emu.plan_table(table.ctypes.data, 1, hyper)["blocks"] == 16


def test_many_chunks_without_knobs_equal_cpu():
    """The chosen chunk size on a 4-SM emulated device: 2**18 elements in 8K-element chunks (32 blocks)."""
    emu.set_options(sm_count=4)
    emu.reset_stats()
    ours = run("cuda", (2**18 - 3, 3), steps=2)
    assert_same(ours, run("cpu", (2**18 - 3, 3), steps=2))
    ws = next(iter(v for r in _resources(ours[1]) for v in r.values()))
    assert ws.chunk_elems == 8192


def _resources(opt):
    """The backend resources of every group plan (optim.py keeps them in _plans)."""
    return [r for _, plan in opt._plans.values() for r in plan.resources.values()]


def workspaces(opt):
    found = [v for r in _resources(opt) for v in r.values() if isinstance(v, emu.Workspace)]
    assert found, "no emulated workspace in the optimizer's plans"
    return found


# ---------------------------------------------------------------- layouts and sizes

@pytest.mark.parametrize("cls", [fa.AdamW, fa.SGD])
def test_misaligned_views_equal_cpu_and_keep_guards(small_launch, cls):
    kw = dict(momentum=0.9) if cls is fa.SGD else {}
    ours = run("cuda", SIZES, cls=cls, views=True, **kw)
    assert_same(ours, run("cpu", SIZES, cls=cls, views=True, **kw))
    for buf in ours[2]:
        assert buf[0].item() == 7.0 and buf[-1].item() == 7.0


def test_empty_tensors(small_launch):
    """Empty params beside full ones, and a group of empty params only (the
    step kernel runs, the update kernel is not launched): steps still count."""
    assert_same(run("cuda", (0, 5, 0, 41)), run("cpu", (0, 5, 0, 41)))
    emu.reset_stats()
    params, opt, _ = run("cuda", (0, 0), steps=3)
    assert [float(opt.state[p]["step"]) for p in params] == [3.0, 3.0]
    assert not any(k.startswith("adam_kernel") for k in kernels_since_reset())
    assert kernels_since_reset().count("adam_step_kernel") == 3


def test_chunk_index_past_2_31_elements():
    """Chunk 2048 of 2**20-element chunks starts at element 2**31: run it on a
    100-element buffer whose table pointers are shifted back by 2**31
    elements. 32-bit index arithmetic would land 8 GB away (ASan: a wild
    access; without it, a crash or wrong values)."""
    n, base = 100, 2**31
    gen = torch.Generator().manual_seed(5)
    tensors = {k: torch.randn(n, generator=gen) for k in ("param", "grad", "exp_avg")}
    tensors["exp_avg_sq"] = torch.rand(n, generator=gen)
    hyper = _native.to_cpp(emu, AdamHyper(lr=1e-2, weight_decay=0.1, decay_coeff=0.1))

    def step_on(shift, chunk_index, numel):
        ts = {k: v.clone() for k, v in tensors.items()}
        step = torch.zeros(())
        table = np.zeros((1, _native.AdamCol.COUNT), dtype=np.int64)
        table[0, _native.AdamCol.NUMEL] = numel
        for col, key in ((_native.AdamCol.PARAM, "param"), (_native.AdamCol.GRAD, "grad"),
                         (_native.AdamCol.EXP_AVG, "exp_avg"), (_native.AdamCol.EXP_AVG_SQ, "exp_avg_sq")):
            table[0, col] = ts[key].data_ptr() - shift * 4
        table[0, _native.AdamCol.STEP] = step.data_ptr()
        emu.adam_step_chunks(table.ctypes.data, 1, 0, 0, hyper, [(0, chunk_index)], 2**20, 0, 0)
        return ts, step

    far, step_far = step_on(base, 2048, base + n)
    near, step_near = step_on(0, 0, n)
    assert float(step_far) == float(step_near) == 1.0
    for k in tensors:
        assert torch.equal(far[k], near[k]), k
    assert not torch.equal(far["param"], tensors["param"])


# ---------------------------------------------------------------- step, found_inf

def test_step_incremented_exactly_once(small_launch):
    """25 chunks on 3 blocks: each tensor's step goes up by one per call, by the step kernel alone."""
    emu.reset_stats()
    params, opt, _ = run("cuda", (1000, 7, 0), steps=5)
    assert [float(opt.state[p]["step"]) for p in params] == [5.0, 5.0, 5.0]
    ks = [k for k in kernels_since_reset() if k != "upload_kernel"]
    assert ks == ["adam_step_kernel", "adam_kernel<P, S, false>"] * 5


def test_found_inf_changes_nothing(small_launch):
    params, opt, _ = run("cuda", (1000, 7), steps=2)
    before = [p.detach().clone() for p in params]
    state = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.full_like(p, float("inf"))
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.ones(())
    opt.step()
    for p, b, s in zip(params, before, state):
        assert torch.equal(p.detach(), b)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k


def test_grad_scale_equals_cpu(small_launch):
    def scaled(backend):
        params, opt, _ = run(backend, SIZES, steps=1)
        for p in params:
            p.grad = p.detach() * 1024.0
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.zeros(())
        opt.step()
        return params, opt, []
    assert_same(scaled("cuda"), scaled("cpu"))


# ---------------------------------------------------------------- tables and workspace

def test_table_uploads_in_32_kb_pieces_and_only_when_changed():
    """1200 tensors: 76800 bytes of tensor records go up as 3 kernels of at
    most 32000 bytes of parameters, 9600 bytes of chunk records as 1; an
    unchanged table uploads nothing; new grad addresses upload the records alone."""
    sizes = [3] * 1200
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in sizes]
    opt = fa.AdamW(params, lr=1e-2, backend="cuda")
    uploads = []
    for i in range(3):
        for p in params:
            if i != 1 or p.grad is None:
                p.grad = torch.randn(p.shape, generator=gen)  # new tensors: new addresses
            else:
                p.grad.copy_(torch.randn(p.shape, generator=gen))  # same addresses
        emu.reset_stats()
        opt.step()
        uploads.append(kernels_since_reset().count("upload_kernel"))
    assert uploads == [4, 0, 3]
    (ws,) = workspaces(opt)
    assert ws.uploads == 2


def test_workspace_grows_frees_and_is_freed():
    gc.collect()  # workspaces of earlier tests' optimizers
    base = emu.stats()["live_allocations"]
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(5, generator=gen).requires_grad_() for _ in range(400)]
    opt = fa.AdamW(params, lr=1e-2, backend="cuda")
    capacities = []
    for k in (10, 100, 400):  # more params with grads each time: a bigger table
        for p in params[:k]:
            p.grad = torch.randn(5, generator=gen)
        opt.step()
        (ws,) = workspaces(opt)
        capacities.append(ws.capacity_bytes)
        assert emu.stats()["live_allocations"] == base + 1  # the outgrown buffer was freed
    assert capacities[0] < capacities[1] < capacities[2]
    del opt, ws
    gc.collect()
    assert emu.stats()["live_allocations"] == base


# ---------------------------------------------------------------- capture and streams

def test_captured_step_is_two_kernels_and_replays_equal_eager(small_launch):
    """The captured step holds the step and update kernels and nothing else
    (its tables were copied outside the graph, into a buffer the workspace
    keeps for it); replays equal eager steps; eager steps after the capture
    keep their cached tables; the workspace frees the graph's buffer when it goes."""
    gc.collect()
    base = emu.stats()["live_allocations"]
    sizes = (1000, 7, 41)
    gen = torch.Generator().manual_seed(8)
    init = [torch.randn(n, generator=gen) for n in sizes]
    grads = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(4)]

    eager = [p.clone().requires_grad_() for p in init]
    e_opt = fa.AdamW(eager, lr=1e-2, weight_decay=0.1, backend="cuda")
    for gs in grads:
        for p, g in zip(eager, gs):
            p.grad = g.clone()
        e_opt.step()

    ours = [p.clone().requires_grad_() for p in init]
    opt = fa.AdamW(ours, lr=1e-2, weight_decay=0.1, backend="cuda")
    for p, g in zip(ours, grads[0]):
        p.grad = g.clone()
    opt.step()  # warm-up step, eager (torch.cuda.graph users do the same): state exists
    stream = emu.stream_create()
    try:
        emu.set_current_stream(stream)
        (ws,) = workspaces(opt)
        live = emu.stats()["live_allocations"]
        emu.begin_capture(stream)
        opt.step()
        graph = emu.end_capture(stream)
        assert graph.nodes == [("kernel", "adam_step_kernel"), ("kernel", "adam_kernel<P, S, false>")]
        assert ws.graph_buffers == 1 and emu.stats()["live_allocations"] == live + 1
        for gs in grads[1:]:
            for p, g in zip(ours, gs):
                p.grad.copy_(g)  # a graph reads the grads where they were captured
            emu.reset_stats()
            graph.replay()
            assert kernels_since_reset() == ["adam_step_kernel", "adam_kernel<P, S, false>"]
        uploads = ws.uploads
        opt.step()  # eager again: its own tables, still cached
        assert ws.uploads == uploads
    finally:
        emu.set_current_stream(0)
        emu.stream_destroy(stream)
    # The eager run took 4 steps; ours 1 eager + 3 replays + 1 more eager
    # (with the last grads still in place): one more eager step to match.
    for p, q in zip(ours, eager):
        assert not torch.equal(p, q)
    for p, g in zip(eager, grads[-1]):
        p.grad = g.clone()
    e_opt.step()
    for p, q in zip(ours, eager):
        assert torch.equal(p, q)
        for key in e_opt.state[q]:
            assert torch.equal(opt.state[p][key], e_opt.state[q][key]), key
    del opt, e_opt, ws
    gc.collect()
    assert emu.stats()["live_allocations"] == base


def test_a_second_stream_waits_for_the_first():
    params, opt, _ = run("cuda", (33,), steps=1)
    other = emu.stream_create()
    try:
        emu.set_current_stream(other)
        emu.reset_stats()
        params[0].grad = torch.randn(33)
        opt.step()
        assert emu.stats()["stream_waits"] == 1
    finally:
        emu.set_current_stream(0)
        emu.stream_destroy(other)
