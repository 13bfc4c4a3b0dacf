"""GPU tests of what is particular to the CUDA backend (fused_adamw._cuda).

Every mode x dtype x size against the float64 reference and torch.optim, over
20 steps, is the shared suite run on this backend (tests/test_backend_suite.py,
whose cuda ids need a GPU). This file adds what only the CUDA kernels can get
wrong:

  * a bf16 tensor of more than 2**31 elements (64-bit indexing), checked
    against the reference on slices at its start, around 2**31 and at its end;
  * CUDA-graph capture and replay with capturable=True equal eager steps,
    with lr changed on the device between replays, and eager steps after it;
  * found_inf writes nothing (steps included); grad_scale divides exactly;
  * the SGD first step overwrites a NaN-poisoned momentum buffer;
  * misaligned views (the scalar path) equal aligned tensors (the 16-byte
    path) and leave NaN guard elements around them untouched;
  * the kernel runs on the caller's stream, not the default one;
  * 20000 tensors: one kernel launch per step, tables uploaded only when an
    address changes, every step incremented (empty tensors too);
  * CUDA errors are RuntimeErrors.

    pytest -m gpu tests/test_adam_cuda.py
"""
import numpy as np
import pytest
import torch

_cuda = pytest.importorskip("fused_adamw._cuda")

import fused_adamw as fa  # noqa: E402
from fused_adamw import backend_cuda, reference  # noqa: E402
from batch_calls import adam_call, sgd_call  # noqa: E402
from tolerances import SAME_MATH, TORCH_ERROR_FACTOR, TRAJECTORY, ULP  # noqa: E402
from fused_adamw.hyper import AdamHyper, SgdHyper  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
SIZES = (1, 7, 4097, 2**20 + 3)
ADAM = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
# Same data through two code paths that differ only in how elements are
# loaded (16-byte packs or one by one): (rtol, atol) per param dtype.
PATH_TOL = SAME_MATH


def _gen(seed):
    return torch.Generator(device=DEV).manual_seed(seed)


def _np(t):
    return t.detach().double().cpu().numpy()


def adam_tensors(sizes, dtype, state_dtype, seed, *, amsgrad=False):
    """Params, grads and non-trivial state (as after a few steps) on the GPU."""
    gen = _gen(seed)
    params = [torch.randn(n, device=DEV, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, device=DEV, generator=gen).to(dtype) for n in sizes]
    m = [(0.1 * torch.randn(n, device=DEV, generator=gen)).to(state_dtype) for n in sizes]
    v = [(0.01 * torch.rand(n, device=DEV, generator=gen) + 1e-4).to(state_dtype) for n in sizes]
    vmax = [(1.5 * x.float()).to(state_dtype) for x in v] if amsgrad else None
    steps = [torch.full((), 3.0, device=DEV) for _ in sizes]
    return params, grads, m, v, vmax, steps


def snapshot(*lists):
    return [[t.clone() for t in lst] for lst in lists if lst is not None]


def assert_equal_lists(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"{what}[{i}] changed"


# ---------------------------------------------------------------- 64-bit indexing

@pytest.mark.slow
def test_bf16_tensor_over_2_31_elements():
    n = 2**31 + 1029  # odd, so the last chunk ends in the scalar tail
    gen = _gen(0)
    p = torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen).requires_grad_()
    g = torch.randn(n, device=DEV, dtype=torch.bfloat16, generator=gen)
    slices = [slice(0, 4096), slice(2**31 - 4096, 2**31 + 4096), slice(n - 4096, n)]
    init = [p.detach()[s].clone() for s in slices]
    opt = fa.AdamW([p], **ADAM, weight_decay=0.1, backend="cuda")
    p.grad = g
    steps = 2
    for _ in range(steps):
        opt.step()
    torch.cuda.synchronize()
    assert float(opt.state[p]["step"]) == steps
    for s, p0 in zip(slices, init):
        # The update is elementwise: the reference and torch on a slice see
        # exactly what those elements saw.
        ref, st = _np(p0).copy(), {}
        for _ in range(steps):
            reference.adam_step(ref, _np(g[s]), st, **ADAM, weight_decay=0.1, decoupled=True)
        q = p0.clone().requires_grad_()
        twin = torch.optim.AdamW([q], **ADAM, weight_decay=0.1, fused=True)
        q.grad = g[s].clone()
        for _ in range(steps):
            twin.step()
        ours = {"param": _np(p[s]), "exp_avg": _np(opt.state[p]["exp_avg"][s]),
                "exp_avg_sq": _np(opt.state[p]["exp_avg_sq"][s])}
        theirs = {"param": _np(q), "exp_avg": _np(twin.state[q]["exp_avg"]),
                  "exp_avg_sq": _np(twin.state[q]["exp_avg_sq"])}
        refs = {"param": ref, "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        for key in ours:
            err = np.max(np.abs(ours[key] - refs[key]))
            torch_err = np.max(np.abs(theirs[key] - refs[key]))
            bound = max(TORCH_ERROR_FACTOR * torch_err, ULP[torch.bfloat16] * np.max(np.abs(refs[key])))
            assert err <= bound, f"{key} at {s}: error {err:.3g} > {bound:.3g} (torch {torch_err:.3g})"


# ---------------------------------------------------------------- CUDA graphs

@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_graph_capture_and_replay_equals_eager(dtype, amsgrad):
    n_steps, warmup = 8, 2
    gen = _gen(1)
    init = [torch.randn(n, device=DEV, generator=gen).to(dtype) for n in SIZES]
    grads = [[torch.randn(n, device=DEV, generator=gen).to(dtype) for n in SIZES] for _ in range(n_steps + 1)]
    lrs = [1e-2 * 0.9**k for k in range(n_steps + 1)]

    def make():
        params = [t.clone().requires_grad_() for t in init]
        lr = torch.tensor(lrs[0], device=DEV)
        opt = fa.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=amsgrad, capturable=True,
                       backend="cuda")
        return params, lr, opt

    eager_p, eager_lr, eager = make()
    for k in range(n_steps):
        eager_lr.fill_(lrs[k])
        for p, g in zip(eager_p, grads[k]):
            p.grad = g.clone()
        eager.step()

    graph_p, graph_lr, opt = make()
    static_grads = [torch.empty_like(t) for t in init]
    for p, g in zip(graph_p, static_grads):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # torch's recipe: warm up off the default stream
        for k in range(warmup):
            graph_lr.fill_(lrs[k])
            for sg, g in zip(static_grads, grads[k]):
                sg.copy_(g)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for k in range(warmup, n_steps):
        graph_lr.fill_(lrs[k])
        for sg, g in zip(static_grads, grads[k]):
            sg.copy_(g)
        if k == warmup:  # the captured step is the step kernel and the update kernel, no table upload
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                graph.replay()
                torch.cuda.synchronize()
            kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            assert not [n for n in kernels if "upload_kernel" in n], kernels
            assert len([n for n in kernels if "adam_step_kernel" in n]) == 1, kernels
            assert len([n for n in kernels if "adam_kernel" in n]) == 1, kernels
        else:
            graph.replay()
    torch.cuda.synchronize()

    keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    for i, (p, q) in enumerate(zip(graph_p, eager_p)):
        assert torch.equal(p.detach(), q.detach()), f"param {i}"
        for key in keys:
            assert torch.equal(opt.state[p][key], eager.state[q][key]), f"{key} {i}"

    # An eager step after the capture: the graph keeps its own tables, the
    # eager call its own.
    for p, q, g in zip(graph_p, eager_p, grads[n_steps]):
        p.grad = g.clone()
        q.grad = g.clone()
    graph_lr.fill_(lrs[n_steps])
    eager_lr.fill_(lrs[n_steps])
    opt.step()
    eager.step()
    torch.cuda.synchronize()
    for i, (p, q) in enumerate(zip(graph_p, eager_p)):
        assert torch.equal(p.detach(), q.detach()), f"param {i} after an eager step"


# ---------------------------------------------------------------- AMP

@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float16, torch.float16)], ids=["fp32", "bf16-fp32", "fp16"])
def test_adam_found_inf_writes_nothing_and_grad_scale_is_exact(dtype, state_dtype):
    params, grads, m, v, vmax, steps = adam_tensors(SIZES[:3], dtype, state_dtype, seed=2, amsgrad=True)
    hyper = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_coeff=0.1, amsgrad=True)
    before = snapshot(params, m, v, vmax, steps)
    scale = torch.full((1,), 8.0, device=DEV)
    found = torch.ones(1, device=DEV)
    scaled = [g * 8 for g in grads]  # a power of two: dividing it back is exact
    adam_call(backend_cuda, params, scaled, m, v, vmax, steps, hyper, grad_scale=scale, found_inf=found, cache={})
    torch.cuda.synchronize()
    for what, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
                          (params, m, v, vmax, steps), before):
        assert_equal_lists(a, b, what)

    found.zero_()
    adam_call(backend_cuda, params, scaled, m, v, vmax, steps, hyper, grad_scale=scale, found_inf=found, cache={})
    twin = snapshot(*before)
    adam_call(backend_cuda, *twin[:1], grads, *twin[1:], hyper, cache={})
    torch.cuda.synchronize()
    for what, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"),
                          (params, m, v, vmax, steps), twin):
        for x, y in zip(a, b):
            assert torch.equal(x, y), what
    assert all(float(s) == 4.0 for s in steps)


def test_sgd_found_inf_writes_nothing():
    gen = _gen(3)
    params = [torch.randn(n, device=DEV, generator=gen) for n in SIZES[:3]]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    before = snapshot(params, bufs)
    hyper = SgdHyper(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    sgd_call(backend_cuda, params, grads, bufs, [False] * 3, hyper, found_inf=torch.ones(1, device=DEV), cache={})
    torch.cuda.synchronize()
    assert_equal_lists(params, before[0], "param")
    assert_equal_lists(bufs, before[1], "momentum_buffer")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sgd_first_step_overwrites_poisoned_buffer(dtype):
    gen = _gen(4)
    params = [torch.randn(n, device=DEV, generator=gen).to(dtype) for n in SIZES]
    grads = [torch.randn(n, device=DEV, generator=gen).to(dtype) for n in SIZES]
    bufs = [torch.full_like(p, float("nan")) for p in params]
    p0 = snapshot(params)[0]
    # Dampening is not applied on the first step (torch): buf = g exactly.
    hyper = SgdHyper(lr=0.1, momentum=0.9, dampening=0.5)
    sgd_call(backend_cuda, params, grads, bufs, [True] * len(params), hyper, cache={})
    torch.cuda.synchronize()
    rtol, atol = PATH_TOL[dtype]
    for b, g, p, q in zip(bufs, grads, params, p0):
        assert torch.equal(b, g)
        torch.testing.assert_close(p.float(), q.float() - 0.1 * g.float(), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- alignment

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_misaligned_views_match_aligned_and_keep_guards(dtype):
    sizes = (1, 7, 4097, 70001)
    gap = 3  # NaN guard elements between and around the tensors; offsets are odd
    gen = _gen(5)
    init = [torch.randn(n, device=DEV, generator=gen).to(dtype) for n in sizes]
    grads = [[torch.randn(n, device=DEV, generator=gen).to(dtype) for n in sizes] for _ in range(5)]

    total = sum(sizes) + gap * (len(sizes) + 1)
    flat_p = torch.full((total,), float("nan"), device=DEV, dtype=dtype)
    flat_g = torch.full((total,), float("nan"), device=DEV, dtype=dtype)
    spans, at = [], gap
    for n in sizes:
        spans.append((at, at + n))
        at += n + gap
    odd = [torch.nn.Parameter(flat_p[a:b]) for a, b in spans]
    for t, x in zip(odd, init):
        t.data.copy_(x)
    aligned = [torch.nn.Parameter(x.clone()) for x in init]
    assert all(t.data_ptr() % 16 != 0 for t in odd)  # the scalar path
    o_opt = fa.AdamW(odd, **ADAM, weight_decay=0.1, backend="cuda")
    a_opt = fa.AdamW(aligned, **ADAM, weight_decay=0.1, backend="cuda")
    for gs in grads:
        for t, (a, b), g in zip(odd, spans, gs):
            flat_g[a:b].copy_(g)
            t.grad = flat_g[a:b]
        for t, g in zip(aligned, gs):
            t.grad = g.clone()
        o_opt.step()
        a_opt.step()
    torch.cuda.synchronize()
    rtol, atol = PATH_TOL[dtype]
    for t, u in zip(odd, aligned):
        torch.testing.assert_close(t.detach(), u.detach(), rtol=rtol, atol=atol)
    mask = torch.ones(total, dtype=torch.bool, device=DEV)
    for a, b in spans:
        mask[a:b] = False
    assert torch.isnan(flat_p[mask]).all(), "an element outside the params was written"


# ---------------------------------------------------------------- streams

def test_runs_on_the_callers_stream():
    p = torch.nn.Parameter(torch.randn(1 << 16, device=DEV))
    p.grad = torch.randn_like(p)
    opt = fa.AdamW([p], **ADAM, backend="cuda")
    opt.step()  # state and device tables exist: the measured step allocates nothing
    torch.cuda.synchronize()
    before = p.detach().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(2_000_000_000)  # about a second: holds `side` back
        opt.step()
    # On the default stream, which does not wait for `side`: if the kernel
    # had been launched there, p would already be updated.
    seen = p.detach().clone()
    assert not side.query()
    torch.cuda.synchronize()
    assert torch.equal(seen, before)
    assert not torch.equal(p.detach(), before)
    assert float(opt.state[p]["step"]) == 2.0


def test_non_default_stream_equals_default_stream():
    gen = _gen(6)
    init = [torch.randn(n, device=DEV, generator=gen) for n in SIZES]
    grads = [[torch.randn(n, device=DEV, generator=gen) for n in SIZES] for _ in range(4)]
    results = []
    for use_side in (False, True):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = fa.AdamW(params, **ADAM, weight_decay=0.1, amsgrad=True, backend="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        ctx = torch.cuda.stream(side) if use_side else torch.cuda.stream(torch.cuda.current_stream())
        with ctx:
            for gs in grads:
                for p, g in zip(params, gs):
                    p.grad = g
                opt.step()
        torch.cuda.synchronize()
        results.append([p.detach().clone() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- many tensors

def test_many_tensors_one_launch_and_cached_tables():
    sizes = [int(n) for n in torch.randint(1, 300, (20000,), generator=torch.Generator().manual_seed(7))]
    sizes[::997] = [0] * len(sizes[::997])  # empty tensors get their step too
    params, grads, m, v, _, steps = adam_tensors(sizes, torch.float32, torch.float32, seed=7)
    for t in m + v + steps:  # a fresh optimizer, like the reference's empty state
        t.zero_()
    hyper = AdamHyper(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decay_coeff=0.1)
    # All tensors share one step count, so the reference runs on the concatenation.
    ref = _np(torch.cat(params)).copy()
    flat_g = _np(torch.cat(grads))
    st = {}
    cache = {}
    for k in range(3):
        if k == 1:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                adam_call(backend_cuda, params, grads, m, v, None, steps, hyper, cache=cache)
                torch.cuda.synchronize()
            kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            assert len([name for name in kernels if "adam_kernel" in name]) == 1, kernels
            assert not [name for name in kernels if "upload_kernel" in name], "unchanged tables were uploaded again"
        else:
            adam_call(backend_cuda, params, grads, m, v, None, steps, hyper, cache=cache)
        reference.adam_step(ref, flat_g, st, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                            decoupled=True)
    torch.cuda.synchronize()
    batch = cache["adam"][1]  # the batch tests/batch_calls.py keeps, as the plan does
    ws = batch.resources[backend_cuda._WORKSPACE_KEY]
    assert ws.uploads == 1
    np.testing.assert_allclose(_np(torch.cat(params)), ref, **TRAJECTORY[torch.float32].kw)
    assert all(float(s) == 3.0 for s in steps)

    # New grad tensors (zero_grad(set_to_none=True) and a backward): the
    # tables are uploaded again, and the step still uses the new addresses.
    new_grads = [g.clone() for g in grads]
    adam_call(backend_cuda, params, new_grads, m, v, None, steps, hyper, cache=cache)
    reference.adam_step(ref, flat_g, st, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, decoupled=True)
    torch.cuda.synchronize()
    assert ws.uploads == 2
    np.testing.assert_allclose(_np(torch.cat(params)), ref, **TRAJECTORY[torch.float32].kw)


# ---------------------------------------------------------------- errors

def test_cuda_error_is_runtime_error():
    p = torch.randn(4, device=DEV)
    table = torch.tensor([[4, p.data_ptr(), p.data_ptr(), p.data_ptr(), p.data_ptr(), 0, p.data_ptr()]],
                         dtype=torch.int64)
    bad = torch.cuda.device_count() + 3
    with pytest.raises(RuntimeError, match="cudaSetDevice"):
        _cuda.adam_step(table.data_ptr(), 1, 0, 0, _cuda.AdamHyper(), 0, 0, 0, bad, 0, _cuda.Workspace(bad))
    # The failed call leaves no error behind for the next launch to report.
    q = torch.nn.Parameter(torch.randn(5, device=DEV))
    q.grad = torch.randn_like(q)
    fa.AdamW([q], backend="cuda").step()
    torch.cuda.synchronize()


# ---------------------------------------------------------------- issue 11: grid shape, index arithmetic

def test_chunk_size_follows_the_devices_sm_count():
    """A 2**20-element group is cut into chunks for about 8 blocks per SM of
    this device, and the step equals the fixed-64K-chunk step exactly (the
    chunking changes which block does what, not the math)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = _gen(11)
    init = torch.randn(2**20, device=DEV, generator=gen)
    grads = [torch.randn(2**20, device=DEV, generator=gen) for _ in range(3)]
    out = []
    for chunk in (0, _cuda.CHUNK_ELEMS):
        _cuda.set_launch_overrides(chunk_elems=chunk)
        try:
            p = init.clone().requires_grad_()
            opt = fa.AdamW([p], lr=1e-2, weight_decay=0.1, backend="cuda")
            for g in grads:
                p.grad = g.clone()
                opt.step()
            torch.cuda.synchronize()
            ws = next(v for _, plan in opt._plans.values() for r in plan.resources.values() for v in r.values()
                      if isinstance(v, _cuda.Workspace))
            out.append((p.detach().clone(), ws.chunk_elems))
        finally:
            _cuda.set_launch_overrides(0, 0)
    (chosen, chosen_chunk), (fixed, fixed_chunk) = out
    assert fixed_chunk == _cuda.CHUNK_ELEMS
    assert chosen_chunk == max(4096, min(65536, 1 << (-(-2**20 // (8 * sms)) - 1).bit_length()))
    assert torch.equal(chosen, fixed)


def test_chunk_index_past_2_31_elements_on_a_small_buffer():
    """Chunk 2048 of 2**20-element chunks starts at element 2**31: the table's
    pointers are shifted back by 2**31 elements onto a 100-element buffer.
    32-bit index arithmetic would address 8 GB away."""
    n, base = 100, 2**31
    gen = _gen(5)
    tensors = {k: torch.randn(n, device=DEV, generator=gen) for k in ("param", "grad", "exp_avg")}
    tensors["exp_avg_sq"] = torch.rand(n, device=DEV, generator=gen)
    from fused_adamw import _native
    hyper = _native.to_cpp(_cuda, AdamHyper(lr=1e-2, weight_decay=0.1, decay_coeff=0.1))

    def step_on(shift, chunk_index, numel):
        ts = {k: v.clone() for k, v in tensors.items()}
        step = torch.zeros((), device=DEV)
        table = np.zeros((1, _native.AdamCol.COUNT), dtype=np.int64)
        table[0, _native.AdamCol.NUMEL] = numel
        for col, key in ((_native.AdamCol.PARAM, "param"), (_native.AdamCol.GRAD, "grad"),
                         (_native.AdamCol.EXP_AVG, "exp_avg"), (_native.AdamCol.EXP_AVG_SQ, "exp_avg_sq")):
            table[0, col] = ts[key].data_ptr() - shift * 4
        table[0, _native.AdamCol.STEP] = step.data_ptr()
        _cuda.adam_step_chunks(table.ctypes.data, 1, 0, 0, hyper, [(0, chunk_index)], 2**20, 0,
                               torch.cuda.current_stream().cuda_stream)
        return ts, step

    far, step_far = step_on(base, 2048, base + n)
    near, step_near = step_on(0, 0, n)
    assert float(step_far) == float(step_near) == 1.0
    for k in tensors:
        assert torch.equal(far[k], near[k]), k
