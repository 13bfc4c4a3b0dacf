"""torch.compile: the fused step traced as one custom op, and compiled models.

  * the custom ops of fused_adamw.ops run eagerly and equal the optimizer's
    own step (the same backends);
  * `torch.compile` of a function that calls `opt.step()` traces the step
    into one graph with no graph break, whose only call is the group's
    custom op (torch.ops.fused_adamw.adam_ / sgd_), and gives exactly the
    eager results over several steps (params and state), for AdamW, Adam
    with L2, amsgrad, "schedule" decay, a tensor lr, SGD and SGDW, on the
    cpu and torch backends, through Inductor; under an LR scheduler with
    warm restarts too, where a tensor lr (a graph input) compiles nothing
    new when the scheduler changes it;
  * what the ops do not take (complex params) runs the eager step behind
    one graph break, with eager results;
  * training a torch.compile'd model with these optimizers equals
    torch.optim.AdamW on the same compiled model.

The tests of a compiled `opt.step()` need optim.py to call the ops while
torch.compiler.is_compiling() (issue 13); where it does not, they are skipped
with that reason (before it, Dynamo traced the plan: 11 graph breaks, and a
crash reported on the third call).
"""
import copy
import warnings

import pytest
import torch
import torch._dynamo

import fused_adamw as fa
from fused_adamw import ops  # noqa: F401  (registers torch.ops.fused_adamw.*)
from tolerances import TRAJECTORY

STEPS = 5

# Inductor's first compile imports torch.jit code that warns about its own
# deprecation (torch 2.13); it is torch's, not ours, and pytest makes warnings errors.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
OPS = {"adam": torch.ops.fused_adamw.adam_.default, "sgd": torch.ops.fused_adamw.sgd_.default}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graph_ops(graphs) -> list:
    return [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]


def _step_traces_to_the_op() -> bool:
    """Whether Dynamo traces opt.step() into the custom op (one explain of
    one step; before the hook, Dynamo warns about the native calls it meets)."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = fa.AdamW([p])
    p.grad = torch.randn(4)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = torch._dynamo.explain(opt.step)()
    except Exception:
        return False
    finally:
        torch._dynamo.reset()
    return OPS["adam"] in _graph_ops(out.graphs)


def test_the_optimizer_step_traces_to_the_op():
    """optim.py calls fused_adamw.ops under torch.compile (else Dynamo would
    trace the plan, with its native calls, piece by piece)."""
    assert _step_traces_to_the_op()


def _params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (1,), (4, 4, 2), (33,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


CASES = {
    "AdamW": lambda ps: fa.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "AdamW-tensor-lr": lambda ps: fa.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1),
    "AdamW-torch-backend": lambda ps: fa.AdamW(ps, lr=1e-2, weight_decay=0.1, backend="torch"),
    "AdamW-amsgrad-maximize": lambda ps: fa.AdamW(ps, lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
    "Adam-L2": lambda ps: fa.Adam(ps, lr=1e-2, weight_decay=0.1),
    "AdamW-schedule-groups": lambda ps: fa.AdamW([{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.0}],
                                                 lr=1e-2, weight_decay=1e-3, decay_scaling="schedule"),
    "AdamW-fp32-state-bf16": lambda ps: fa.AdamW(ps, lr=1e-2, state_dtype=torch.float32),
    "SGD-nesterov": lambda ps: fa.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "SGDW": lambda ps: fa.SGDW(ps, lr=0.05, momentum=0.9, weight_decay=0.1),
    "SGD-plain": lambda ps: fa.SGD(ps, lr=0.05),
    "SGD-tensor-lr": lambda ps: fa.SGD(ps, lr=torch.tensor(0.05), momentum=0.5),
}


def _dtype(name):
    return torch.bfloat16 if "bf16" in name else torch.float32


def _assert_same(opt_a, pa, opt_b, pb):
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"param {i} differs: max |diff| {(x.float() - y.float()).abs().max()}"
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert sorted(sa) == sorted(sb)
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"state {k!r} of param {i} differs"
            assert sa[k].dtype == sb[k].dtype


# ---------------------------------------------------------------- the ops, eagerly

def test_ops_called_eagerly_equal_the_optimizer_step():
    pa, pb = _params(), _params()
    opt = fa.AdamW(pb, lr=1e-2, weight_decay=0.1)
    exp_avgs = [torch.zeros_like(p) for p in pa]
    exp_avg_sqs = [torch.zeros_like(p) for p in pa]
    steps = [torch.zeros((), dtype=torch.float32) for _ in pa]
    for step in range(STEPS):
        grads = _grads(pa, step)
        with torch.no_grad():
            torch.ops.fused_adamw.adam_(pa, grads, exp_avgs, exp_avg_sqs, [], steps, 1e-2, 0.9, 0.999, 1e-8,
                                        0.1, 0.1, True, False, False, "auto", None, None)
        for p, g in zip(pb, grads):
            p.grad = g
        opt.step()
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y)
        assert torch.equal(exp_avgs[i], opt.state[y]["exp_avg"]) and float(steps[i]) == STEPS


def test_ops_validate_their_lists():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="shape"):
        torch.ops.fused_adamw.adam_([p], [torch.zeros(4)], [torch.zeros(3)], [torch.zeros(3)], [],
                                    [torch.zeros(())], 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.0, True, False, False,
                                    "auto", None, None)


# ---------------------------------------------------------------- compiled opt.step()

@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_is_one_op_without_graph_breaks(name):
    params = _params(dtype=_dtype(name))
    opt = CASES[name](params)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g
    out = torch._dynamo.explain(opt.step)()   # a first step: the state is made inside the trace
    assert out.graph_break_count == 0, [str(b.reason) for b in out.break_reasons]
    assert out.graph_count == 1
    called = _graph_ops(out.graphs)
    want = OPS[opt.ALGO]
    assert called.count(want) == len(opt.param_groups), called
    assert not [t for t in called if t != want and "fused_adamw" in str(t)]


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_step_equals_eager(name):
    """Inductor, fullgraph: exactly the eager step (the same backend call), params
    and state after every step, the state made in the first compiled step."""
    dtype = _dtype(name)
    pa, pb = _params(dtype=dtype), _params(dtype=dtype)
    opt_a, opt_b = CASES[name](pa), CASES[name](pb)
    compiled = torch.compile(opt_a.step, fullgraph=True)
    for step in range(STEPS):
        grads = _grads(pa, step)
        for p, q, g in zip(pa, pb, grads):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        opt_b.step()
        _assert_same(opt_a, pa, opt_b, pb)


@pytest.mark.parametrize("lr_kind", ["tensor", "float-schedule"])
def test_compiled_step_under_an_lr_scheduler_equals_eager(lr_kind):
    """The lr changes every step (warm restarts): still the eager results,
    and the step is still the op. A tensor lr is a graph input, so the
    changing lr compiles nothing new after the first two graphs (the first
    step makes the state); a float lr is a constant Dynamo guards on, one
    graph per lr value (the "schedule" decay here). A scheduler wraps
    opt.step in a function of torch/optim/lr_scheduler.py, a file Dynamo
    never traces, so Dynamo compiles the step's own frame (no fullgraph), as
    it does for torch.optim's optimizers."""
    def make(ps):
        if lr_kind == "tensor":
            return fa.AdamW(ps, lr=torch.tensor(1e-2), weight_decay=0.1)
        return fa.AdamW(ps, lr=1e-2, weight_decay=1e-3, decay_scaling="schedule")

    pa, pb = _params(), _params()
    opt_a, opt_b = make(pa), make(pb)
    sch_a = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt_a, T_0=3)
    sch_b = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt_b, T_0=3)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(lambda: opt_a.step(), backend=record)
    for step in range(7):
        for p, q, g in zip(pa, pb, _grads(pa, step)):
            p.grad, q.grad = g.clone(), g.clone()
        compiled()
        opt_b.step()
        sch_a.step()
        sch_b.step()
        _assert_same(opt_a, pa, opt_b, pb)
    ours = [[t for t in _graph_ops([g]) if "fused_adamw" in str(t)] for g in graphs]
    assert graphs and all(o == [OPS["adam"]] for o in ours), ours
    if lr_kind == "tensor":
        assert len(graphs) <= 2, f"{len(graphs)} graphs: the tensor lr should not recompile"


def test_a_group_the_ops_do_not_take_runs_the_eager_step_behind_one_break():
    """Complex params (updated through their real view by the eager plan):
    that group runs the eager step behind one graph break, the other group
    is still the op, and the results are eager's."""
    def params():
        gen = torch.Generator().manual_seed(3)
        return [torch.nn.Parameter(torch.randn(6, generator=gen)),
                torch.nn.Parameter(torch.randn(5, dtype=torch.complex64, generator=gen))]

    pa, pb = params(), params()
    opt_a = fa.AdamW([{"params": pa[:1]}, {"params": pa[1:]}], lr=1e-2)
    opt_b = fa.AdamW([{"params": pb[:1]}, {"params": pb[1:]}], lr=1e-2)
    for step in range(3):
        for p, q in zip(pa, pb):
            g = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = g.clone(), g.clone()
        out = torch._dynamo.explain(opt_a.step)()
        opt_b.step()
        # one break: the call of the eager step at the end (explain counts
        # a break that ends the frame in break_reasons, not as a second graph)
        assert len(out.break_reasons) == 1, [str(b.reason) for b in out.break_reasons]
        assert OPS["adam"] in _graph_ops(out.graphs)
        _assert_same(opt_a, pa, opt_b, pb)
        torch._dynamo.reset()


# ---------------------------------------------------------------- compiled models

def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                               torch.nn.Linear(16, 3))


def _data(step):
    gen = torch.Generator().manual_seed(step)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)


def test_training_a_compiled_model_equals_torch_optim():
    """torch.compile(model) with fused_adamw.AdamW, eager step: torch.optim.AdamW's trajectory."""
    base = _mlp()
    ma, mb = torch.compile(copy.deepcopy(base)), torch.compile(copy.deepcopy(base))
    opt_a = fa.AdamW(ma.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(mb.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(6):
        x, y = _data(step)
        for m, opt in ((ma, opt_a), (mb, opt_b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        for p, q in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(p, q, **TRAJECTORY[torch.float32].kw)


# Dynamo reads .grad of a param it holds as a non-leaf in the frame it resumes
# after backward(), and warns; torch.optim.AdamW in the same function draws
# the same warning (torch 2.13), which pytest would make an error.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning")
def test_a_compiled_train_step_with_the_optimizer_inside_equals_eager():
    """One compiled function doing forward, backward and opt.step() on a
    compiled model, against the same steps run eagerly."""
    base = _mlp()
    ma, mb = copy.deepcopy(base), copy.deepcopy(base)
    cm = torch.compile(ma)
    opt_a = fa.AdamW(ma.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = fa.AdamW(mb.parameters(), lr=1e-2, weight_decay=0.1)

    def train_step(model, opt, x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    compiled_step = torch.compile(train_step)
    for step in range(4):
        x, y = _data(step)
        la = compiled_step(cm, opt_a, x, y)
        lb = train_step(mb, opt_b, x, y)
        torch.testing.assert_close(la, lb, **TRAJECTORY[torch.float32].kw)
        for p, q in zip(ma.parameters(), mb.parameters()):
            torch.testing.assert_close(p, q, **TRAJECTORY[torch.float32].kw)


def test_a_first_sgd_momentum_step_skipped_by_found_inf_leaves_no_buffer():
    """GradScaler's found_inf skips the first momentum step: no buffer may be
    left behind (torch starts it from the next step's grad), which matters
    with dampening."""
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(10, dtype=torch.float64, generator=gen)
    ga, gb = torch.randn(10, dtype=torch.float64, generator=gen), torch.randn(10, dtype=torch.float64, generator=gen)
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    q = torch.nn.Parameter(p0.clone())
    ref = torch.optim.SGD([q], **kw)
    q.grad = gb.clone()
    ref.step()
    ref.step()
    p = torch.nn.Parameter(p0.clone())
    opt = fa.SGD([p], backend="cpu", **kw)
    step = torch.compile(opt.step, backend="eager")
    for g, inf in ((ga, 1.0), (gb, 0.0), (gb, 0.0)):
        p.grad = g.clone()
        opt.grad_scale, opt.found_inf = None, torch.tensor([inf])
        step()
    torch.testing.assert_close(p.detach(), q.detach(), **TRAJECTORY[torch.float64].kw)


def test_negative_view_grads_equal_torch():
    """A negative view as grad (its memory is minus its values): the op reads
    it through a plain copy (a kernel reading the memory would flip its sign)."""
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = fa.AdamW([p], backend="cpu"), torch.optim.AdamW([q])
    step = torch.compile(opt.step, backend="eager")
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        g = torch.randn(6, dtype=torch.float64, generator=gen)
        p.grad, q.grad = torch._neg_view(-g), g.clone()
        step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), **TRAJECTORY[torch.float64].kw)
