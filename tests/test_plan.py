"""The group plan (python/fused_adamw/plan.py) against what users do from Python.

Each test reproduces one thing a user can do between steps (reassign
`p.data`, replace `opt.state`, change a group's keys, hand over grads in
another layout ...) and checks that the result equals torch.optim doing the
same, or that both raise, ours with an error naming the argument: never a
crash, never memory the plan did not validate. Run on the cpu backend (the
C++ kernel: a stale address table there is a write past a buffer) and the
torch backend; test_stateful.py interleaves the same actions at random.
"""
from __future__ import annotations

import collections

import pytest
import torch

import fused_adamw as fa
from fused_adamw import backend_torch, plan
from tolerances import SAME_MATH, TRAJECTORY

BACKENDS = ["cpu", "torch"]


@pytest.fixture(autouse=True, params=["c++", "python"])
def host_path(request, monkeypatch):
    """Every test runs with the plan's per-step check in C++ (fused_adamw._host,
    where it was built) and in Python."""
    if request.param == "c++" and plan._HOST is None:
        pytest.skip("fused_adamw._host was not built (pip install --no-build-isolation builds it)")
    if request.param == "python":
        monkeypatch.setattr(plan, "_HOST", None)
    return request.param


def _pair(shapes, cls=fa.AdamW, tcls=torch.optim.AdamW, dtype=torch.float64, seed=0, backend="cpu", **kw):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    ours = [t.clone().requires_grad_() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]
    return ours, cls(ours, backend=backend, **kw), theirs, tcls(theirs, **kw)


def _grads(ours, theirs, seed):
    gen = torch.Generator().manual_seed(seed)
    for a, b in zip(ours, theirs):
        g = torch.randn(a.shape, generator=gen, dtype=a.dtype)
        a.grad = g.clone().to(memory_format=torch.preserve_format)
        b.grad = g.clone()


def _steps(ours, opt, theirs, topt, n, seed=0):
    for k in range(n):
        _grads(ours, theirs, seed + k)
        opt.step()
        topt.step()


def _assert_same(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **TRAJECTORY[torch.float64].kw)


# ---------------------------------------------------------------- p.data

@pytest.mark.parametrize("backend", BACKENDS)
def test_param_reassigned_to_a_bigger_tensor_is_refused_not_written_past(backend):
    ours, opt, theirs, topt = _pair([(64,), (8, 8)], backend=backend)
    _steps(ours, opt, theirs, topt, 2)
    ours[0].data = torch.randn(4096, dtype=torch.float64)   # resize_token_embeddings, by hand
    theirs[0].data = torch.randn(4096, dtype=torch.float64)
    ours[0].grad = torch.randn(4096, dtype=torch.float64)
    theirs[0].grad = ours[0].grad.clone()
    with pytest.raises(RuntimeError):
        topt.step()
    with pytest.raises(ValueError, match=r"state 'exp_avg' of params\[0\] has shape \(64,\)"):
        opt.step()
    # Resetting that param's state, as torch's users do, makes both go on.
    opt.state[ours[0]] = {}
    topt.state[theirs[0]] = {}
    theirs[0].data.copy_(ours[0].data)
    _steps(ours, opt, theirs, topt, 2, seed=10)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_reassigned_to_a_smaller_view_is_refused(backend):
    ours, opt, theirs, topt = _pair([(64,)], backend=backend)
    _steps(ours, opt, theirs, topt, 1)
    ours[0].data = ours[0].data[:10]   # same address, fewer elements
    ours[0].grad = torch.randn(10, dtype=torch.float64)
    with pytest.raises(ValueError, match="has shape"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_reassigned_to_a_smaller_view_with_its_old_grad_is_refused(backend):
    """The grad kept from before still has the old shape: torch raises on the
    mismatch, and so do we (the kernel would update all 64 elements)."""
    ours, opt, theirs, topt = _pair([(64,)], backend=backend)
    _steps(ours, opt, theirs, topt, 1)
    ours[0].data = ours[0].data[:10]
    theirs[0].data = theirs[0].data[:10]
    with pytest.raises(RuntimeError):
        topt.step()
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(64,\) but its param has \(10,\)"):
        opt.step()


def test_param_dtype_changed_through_data_is_refused():
    p = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    opt = fa.AdamW([p], backend="cpu")
    p.grad = torch.randn_like(p)
    opt.step()
    p.data = p.data.float()
    p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match=r"state 'exp_avg' of params\[0\] has dtype torch.bfloat16"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_moved_to_new_storage_of_the_same_shape_is_followed(backend):
    ours, opt, theirs, topt = _pair([(33,), (5, 7)], backend=backend)
    _steps(ours, opt, theirs, topt, 2)
    fresh = torch.randn(5, 7, dtype=torch.float64)
    ours[1].data = fresh.clone()
    theirs[1].data = fresh.clone()
    _steps(ours, opt, theirs, topt, 3, seed=5)
    _assert_same(ours, theirs)
    assert ours[1].data_ptr() != 0 and not torch.equal(ours[1].detach(), fresh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_relaid_through_data_follows_torch(backend):
    """channels_last -> contiguous through .data: torch pairs elements by
    index; so do we (that param goes to torch's functional code)."""
    shape = (2, 3, 4, 5)
    ours, opt, theirs, topt = _pair([shape, (7,)], backend=backend)
    for t in (ours[0], theirs[0]):
        t.data = t.data.to(memory_format=torch.channels_last)
    _steps(ours, opt, theirs, topt, 2)
    for t in (ours[0], theirs[0]):
        t.data = t.data.contiguous()
    _steps(ours, opt, theirs, topt, 3, seed=3)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_reassigned_through_data_is_refused(backend):
    ours, opt, theirs, topt = _pair([(16,)], backend=backend)
    _steps(ours, opt, theirs, topt, 1)
    ours[0].grad = torch.randn(16, dtype=torch.float64)
    ours[0].grad.data = torch.randn(1024, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(1024,\)"):
        opt.step()


def test_state_tensor_reassigned_through_data_cannot_make_the_kernel_write_freed_memory():
    """The plan writes through its own views of the state it validated: a
    user's `.data` swap on a state tensor leaves those intact (the step still
    runs on the validated storage, and nothing is written elsewhere)."""
    p = torch.randn(1 << 16, requires_grad=True)
    opt = fa.AdamW([p], backend="cpu")
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    small = torch.zeros(1)
    st["exp_avg"].data = small
    opt.step()
    assert torch.isfinite(p).all() and small.item() == 0.0


# ---------------------------------------------------------------- opt.state and group keys

@pytest.mark.parametrize("backend", BACKENDS)
def test_state_replaced_by_a_fresh_defaultdict(backend):
    ours, opt, theirs, topt = _pair([(9,), (3, 4)], backend=backend)
    _steps(ours, opt, theirs, topt, 2)
    opt.state = collections.defaultdict(dict)
    topt.state = collections.defaultdict(dict)
    _steps(ours, opt, theirs, topt, 3, seed=7)
    _assert_same(ours, theirs)
    assert float(opt.state[ours[0]]["step"]) == 3.0


def test_backend_changed_mid_run_is_honoured(monkeypatch):
    ours, opt, theirs, topt = _pair([(9,), (3, 4)], backend="cpu")
    _steps(ours, opt, theirs, topt, 2)
    calls = []
    real = backend_torch.adam_step
    monkeypatch.setattr(backend_torch, "adam_step", lambda *a, **k: (calls.append(1), real(*a, **k)))
    opt.param_groups[0]["backend"] = "torch"
    _steps(ours, opt, theirs, topt, 2, seed=4)
    assert len(calls) == 2
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_amsgrad_switched_on_mid_run(backend):
    ours, opt, theirs, topt = _pair([(9,)], backend=backend)
    _steps(ours, opt, theirs, topt, 2)
    opt.param_groups[0]["amsgrad"] = True
    topt.param_groups[0]["amsgrad"] = True
    topt.state[theirs[0]]["max_exp_avg_sq"] = torch.zeros_like(theirs[0])
    _steps(ours, opt, theirs, topt, 2, seed=4)
    _assert_same(ours, theirs)


# ---------------------------------------------------------------- grads

@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_grad_sets_keep_the_backend_resources(backend):
    """A mixture of experts: a different subset has grads each step. The
    results follow torch, and the plan's long-lived resources survive."""
    ours, opt, theirs, topt = _pair([(5,), (6,), (7,), (8,)], backend=backend)
    for k in range(6):
        _grads(ours, theirs, k)
        for i in range(4):
            if (i + k) % 3 == 0:
                ours[i].grad = None
                theirs[i].grad = None
        opt.step()
        topt.step()
        if k == 0:
            resources = opt._plans[id(opt.param_groups[0])][1].resources
            kept = dict(resources)
    _assert_same(ours, theirs)
    now = opt._plans[id(opt.param_groups[0])][1].resources
    assert now is resources and all(now[k] is v for k, v in kept.items())


def test_steady_steps_do_not_rebuild_the_plan():
    p = [torch.randn(4, 4, dtype=torch.complex64, requires_grad=True), torch.randn(8, requires_grad=True)]
    opt = fa.AdamW(p, backend="cpu")
    for _ in range(4):
        for t in p:
            t.grad = torch.randn_like(t)
        opt.step()
    assert opt._plans[id(opt.param_groups[0])][1].rebuilds == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_another_layout_is_paired_by_index(backend):
    """A contiguous grad for a channels_last param: elements are paired by
    index (as torch does), not by storage position."""
    shape = (2, 3, 4, 5)
    ours, opt, theirs, topt = _pair([shape], backend=backend)
    for t in (ours[0], theirs[0]):
        t.data = t.data.to(memory_format=torch.channels_last)
    for k in range(3):
        g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        ours[0].grad = g.contiguous()
        theirs[0].grad = g.contiguous()
        assert not ours[0].grad.is_contiguous(memory_format=torch.channels_last)
        opt.step()
        topt.step()
    _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_layout_changing_mid_run_is_paired_by_index(backend):
    """Grads in the param's layout for some steps, then contiguous ones: the
    plan sees the new strides (not only the new address) and pairs by index."""
    shape = (2, 3, 4, 5)
    ours, opt, theirs, topt = _pair([shape, (7,)], backend=backend)
    for t in (ours[0], theirs[0]):
        t.data = t.data.to(memory_format=torch.channels_last)
    for k in range(5):
        gen = torch.Generator().manual_seed(k)
        g, h = torch.randn(shape, dtype=torch.float64, generator=gen), torch.randn(7, dtype=torch.float64, generator=gen)
        g = g.contiguous(memory_format=torch.channels_last) if k < 2 else g.contiguous()
        ours[0].grad, theirs[0].grad = g.clone(memory_format=torch.preserve_format), g.clone()
        ours[1].grad, theirs[1].grad = h.clone(), h.clone()
        opt.step()
        topt.step()
    _assert_same(ours, theirs)


# ---------------------------------------------------------------- what kernels cannot serve

@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_view_params_follow_torch(backend):
    base_a, base_b = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    ours = [base_a.clone()[:, ::2].requires_grad_(), torch.randn(5, dtype=torch.float64).requires_grad_()]
    theirs = [base_a.clone()[:, ::2].requires_grad_(), ours[1].detach().clone().requires_grad_()]
    del base_b
    for cls, tcls, kw in [(fa.AdamW, torch.optim.AdamW, dict(weight_decay=0.1)),
                          (fa.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9))]:
        opt, topt = cls(ours, backend=backend, **kw), tcls(theirs, **kw)
        _steps(ours, opt, theirs, topt, 3)
        _assert_same(ours, theirs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grads_for_sgd_follow_torch(backend):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True).double()
    twin = torch.nn.Embedding(10, 4, sparse=True).double()
    twin.load_state_dict(emb.state_dict())
    opt = fa.SGD(emb.parameters(), lr=0.1, momentum=0.9, backend=backend)
    topt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for k in range(3):
        idx = torch.tensor([k, k + 2])
        for m, o in ((emb, opt), (twin, topt)):
            o.zero_grad()
            m(idx).pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(emb.weight, twin.weight, rtol=0, atol=0)


def test_differentiable_follows_torch():
    """differentiable=True keeps the update in the autograd graph (torch's
    own code runs it): the updated param and its gradient with respect to
    the initial one equal torch.optim's."""
    results = []
    for cls in (fa.AdamW, torch.optim.AdamW):
        w0 = torch.linspace(-1, 1, 6, dtype=torch.float64, requires_grad=True)
        p = w0.clone()  # a non-leaf: the optimizer's in-place update stays in the graph
        opt = cls([p], lr=0.1, weight_decay=0.1, differentiable=True)
        for k in range(3):
            p.grad = torch.sin(p.detach() + k)
            opt.step()
        (dw,) = torch.autograd.grad(p.pow(2).sum(), w0)
        results.append((p.detach().clone(), dw))
    torch.testing.assert_close(results[0], results[1], **SAME_MATH[torch.float64].kw)


def test_meta_params_step_as_torch():
    model = torch.nn.Linear(4, 3, device="meta")
    for cls in (fa.AdamW, fa.SGD):
        opt = cls(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert "torch" == fa.available_backends("meta")[0]


def test_capturable_on_cpu_raises_as_torch():
    p = torch.randn(3, requires_grad=True)
    p.grad = torch.randn(3)
    with pytest.raises(AssertionError) as theirs:
        torch.optim.AdamW([p], capturable=True).step()
    with pytest.raises(AssertionError) as ours:
        fa.AdamW([p], capturable=True).step()
    assert str(ours.value) == str(theirs.value)


# ---------------------------------------------------------------- a drop-in's surface

def test_named_parameters_and_named_state_dicts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    twin.load_state_dict(model.state_dict())
    opt = fa.AdamW(model.named_parameters(), lr=0.1)
    topt = torch.optim.AdamW(twin.named_parameters(), lr=0.1)
    x = torch.randn(5, 3)
    for m, o in ((model, opt), (twin, topt)):
        m(x).sum().backward()
        o.step()
    ours, theirs = opt.state_dict(), topt.state_dict()
    assert ours["param_groups"][0]["param_names"] == theirs["param_groups"][0]["param_names"]
    assert ours["state"].keys() == theirs["state"].keys()
    # Named groups load into each other.
    topt.load_state_dict(ours)
    opt.load_state_dict(theirs)


def test_sgd_without_momentum_keeps_no_state():
    p = torch.randn(4, requires_grad=True)
    opt = fa.SGD([p], lr=0.1)
    p.grad = torch.randn(4)
    opt.step()
    assert opt.state_dict()["state"] == {} == torch.optim.SGD([p], lr=0.1).state_dict()["state"]


def test_duplicate_params_in_named_groups_are_refused():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="twice"):
        fa.AdamW([("a", p), ("b", p)])


# ---------------------------------------------------------------- the Batch contract

def test_batch_validates_what_the_kernels_rely_on():
    p = [torch.randn(4), torch.randn(4)]
    steps = [torch.zeros(()), torch.zeros(())]
    with pytest.raises(ValueError, match=r"state 'exp_avg' of params\[1\] has shape"):
        plan.Batch.adam(p, [torch.randn(4)] * 2, [torch.zeros(4), torch.zeros(5)], [torch.zeros(4)] * 2, None, steps)
    with pytest.raises(ValueError, match="overlap"):
        base = torch.randn(8)
        plan.Batch.adam([base[:5], base[3:]], [torch.randn(5)] * 2, [torch.zeros(5), torch.zeros(5)],
                        [torch.zeros(5), torch.zeros(5)], None, steps)
    with pytest.raises(ValueError, match=r"step' of params\[0\]"):
        plan.Batch.adam(p, [torch.randn(4)] * 2, [torch.zeros(4)] * 2, [torch.zeros(4)] * 2, None,
                        [torch.zeros((), dtype=torch.float64), torch.zeros(())])


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_plan_holds_no_grads_between_steps(backend):
    """zero_grad(set_to_none=True) must free the grads before the next
    backward, as with torch.optim: the plan keeps addresses, not tensors."""
    import gc
    import weakref
    p = [torch.randn(64, requires_grad=True) for _ in range(3)]
    opt = fa.AdamW(p, backend=backend)
    for t in p:
        t.grad = torch.randn(64)
    refs = [weakref.ref(t.grad) for t in p]
    opt.step()
    opt.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)


def _plan_of(opt, k=0):
    return opt._plans[id(opt.param_groups[k])][1]


def test_steady_steps_take_the_host_path(host_path):
    """Steady steps of plain params on a kernel backend are checked by the C++
    pass (where it was built); a change it reports goes to the Python path,
    which rebuilds and hands back to C++."""
    ours, opt, theirs, topt = _pair([(64,), (8, 8), (3,)])
    _steps(ours, opt, theirs, topt, 3)
    pl = _plan_of(opt)
    assert (pl._host is not None and pl._host_used) == (host_path == "c++")
    assert pl.rebuilds == 1
    ours[1].grad = None            # the grad set changes: a rebuild
    theirs[1].grad = None
    opt.step()
    topt.step()
    assert pl.rebuilds == 2
    _steps(ours, opt, theirs, topt, 2, seed=10)
    assert pl.rebuilds == 3        # and back
    assert (pl._host is not None and pl._host_used) == (host_path == "c++")
    _assert_same(ours, theirs)


def test_host_path_follows_new_grad_addresses_and_revalidates_moved_params(host_path):
    ours, opt, theirs, topt = _pair([(32,), (4, 4)])
    _steps(ours, opt, theirs, topt, 2)
    pl = _plan_of(opt)
    table = pl._buckets[0].batch._array
    for a, b in zip(ours, theirs):  # grads at new addresses, as after zero_grad(set_to_none=True)
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    opt.step()
    topt.step()
    assert [int(x) for x in table[:, 2]] == [a.grad.data_ptr() for a in ours]
    new = torch.randn(32, dtype=torch.float64)   # same shape, new storage
    ours[0].data = new.clone()
    theirs[0].data = new.clone()
    _steps(ours, opt, theirs, topt, 2, seed=5)
    assert pl.rebuilds == 2            # a param at a new address is validated again, once
    assert int(pl._buckets[0].batch._array[0, 1]) == ours[0].data_ptr()
    _steps(ours, opt, theirs, topt, 2, seed=7)
    assert pl.rebuilds == 2
    assert (pl._host is not None and pl._host_used) == (plan._HOST is not None)
    _assert_same(ours, theirs)


def test_host_path_declines_what_it_cannot_check():
    """Complex params, and grads in another layout, stay on the Python path."""
    p = [torch.randn(4, 4, dtype=torch.complex64, requires_grad=True), torch.randn(8, requires_grad=True)]
    opt = fa.AdamW(p, backend="cpu")
    for t in p:
        t.grad = torch.randn_like(t)
    opt.step()
    assert _plan_of(opt)._host is None
    q = torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    opt2 = fa.AdamW([q], backend="cpu")
    q.grad = torch.randn(2, 3, 4, 4)   # contiguous: copied into the param's layout
    opt2.step()
    assert _plan_of(opt2)._host is None


# ---------------------------------------------------------------- tensors whose memory is not their values

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["grad", "param"])
def test_negative_views_follow_torch(backend, where):
    """A negative view (torch._neg_view: the values are minus the memory) as
    grad or as param: torch's ops honour the flag, a kernel reading the
    address would not, so these go to torch's functional code."""
    ours, opt, theirs, topt = _pair([(4, 5), (6,)], backend=backend)
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        if where == "param" and k == 1:
            for t in (ours[0], theirs[0]):
                t.data = torch._neg_view(-t.data)
        for a, b in zip(ours, theirs):
            g = torch.randn(a.shape, dtype=torch.float64, generator=gen)
            a.grad = torch._neg_view(-g) if where == "grad" else g.clone()
            b.grad = g.clone()
        opt.step()
        topt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.detach().resolve_neg(), b.detach().resolve_neg(), **TRAJECTORY[torch.float64].kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first", [True, False])
def test_zero_tensor_grads_follow_torch(backend, first):
    """An efficient zero tensor as grad (no memory: address 0), on the first
    step or after normal ones."""
    ours, opt, theirs, topt = _pair([(4, 5), (3,)], backend=backend)
    for k in range(3):
        for a, b in zip(ours, theirs):
            if k >= 1 or first:
                a.grad = torch._efficientzerotensor(a.shape, dtype=torch.float64)
                b.grad = torch._efficientzerotensor(b.shape, dtype=torch.float64)
            else:
                a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
        opt.step()
        topt.step()
    _assert_same(ours, theirs)


def test_batch_refuses_negative_and_zero_views():
    p, g = torch.randn(5), torch.randn(5)
    st = dict(exp_avgs=[torch.zeros(5)], exp_avg_sqs=[torch.zeros(5)], max_exp_avg_sqs=None, steps=[torch.zeros(())])
    with pytest.raises(ValueError, match=r"grads\[0\] is a negative, conjugate or zero view"):
        plan.Batch.adam([p], [torch._neg_view(g)], **st)
    with pytest.raises(ValueError, match=r"grads\[0\] is a negative, conjugate or zero view"):
        plan.Batch.adam([p], [torch._efficientzerotensor(5)], **st)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_moved_onto_another_params_memory_is_refused(backend):
    """p1.data = a view overlapping p0 after the build: the new address is
    validated like the old ones (the overlap check), not only written."""
    base = torch.randn(20, dtype=torch.float64)
    p0 = base[:10].clone().requires_grad_()
    p1 = base[10:].clone().requires_grad_()
    opt = fa.AdamW([p0, p1], backend=backend)
    for t in (p0, p1):
        t.grad = torch.randn_like(t)
    opt.step()
    p1.data = p0.data.view(10)                 # p0's own memory
    for t in (p0, p1):
        t.grad = torch.randn_like(t)
    with pytest.raises(ValueError, match="overlap in memory"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["grad", "param"])
def test_storage_shrunk_under_a_tensor_is_refused(host_path, backend, where):
    """A storage resized below its tensor's extent between steps
    (t.untyped_storage().resize_(n): the sizes still say 4096 elements): a
    clear error on either path, never a kernel reading or writing past the new
    end (CI also runs this under the sanitizers)."""
    p = torch.randn(4096, dtype=torch.float64, requires_grad=True)
    opt = fa.AdamW([p], backend=backend)
    for _ in range(2):
        p.grad = torch.randn_like(p)
        opt.step()
    if host_path == "c++" and backend == "cpu":
        assert _plan_of(opt)._host_used
    p.grad = torch.randn_like(p)
    (p.grad if where == "grad" else p).untyped_storage().resize_(64)
    with pytest.raises(ValueError, match=rf"{where}s\[0\] spans 32768 bytes of its storage but the storage holds 64"):
        opt.step()


def test_refresher_takes_part_in_the_cycle_collector(host_path):
    """A param that holds its optimizer (p.opt = opt) makes a cycle through
    the plan's C++ refresher: the collector frees it."""
    import gc
    import weakref
    p = torch.randn(1000, requires_grad=True)
    opt = fa.AdamW([p], backend="cpu")
    p.grad = torch.randn_like(p)
    opt.step()
    opt.step()
    p.opt = opt
    ref = weakref.ref(opt)
    del p, opt
    gc.collect()
    assert ref() is None
