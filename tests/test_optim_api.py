"""The optimizer classes as a user meets them: arguments, errors, schedulers,
closures, AMP, state dicts, and the paper's algorithms through the public API.

Runs on the default backend for CPU tensors ("auto" -> cpu) and, where the
behaviour lives in Python, on the torch backend too.
"""
import numpy as np
import pytest
import torch

import fused_adamw as fa
from fused_adamw import dispatch, reference
from tolerances import SAME_MATH, TRAJECTORY

BACKENDS = ["auto", "torch"]


def _params(n=3, size=8, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen, dtype=dtype).requires_grad_() for _ in range(n)]


# ---------------------------------------------------------------- arguments

TWIN = {fa.AdamW: torch.optim.AdamW, fa.Adam: torch.optim.Adam, fa.SGD: torch.optim.SGD, fa.SGDW: torch.optim.SGD}


@pytest.mark.parametrize("cls, kwargs", [
    (fa.AdamW, dict(lr=-1e-3)),
    (fa.AdamW, dict(lr=torch.tensor([1e-3, 2e-3]))),
    (fa.AdamW, dict(betas=(1.0, 0.999))),
    (fa.AdamW, dict(betas=(0.9, -0.1))),
    (fa.AdamW, dict(eps=-1e-8)),
    (fa.AdamW, dict(weight_decay=-0.1)),
    (fa.Adam, dict(lr=float("nan"))),
    (fa.SGD, dict(lr=0.1, momentum=-0.5)),
    (fa.SGD, dict(lr=0.1, nesterov=True)),
    (fa.SGD, dict(lr=0.1, nesterov=True, momentum=0.9, dampening=0.1)),
    (fa.SGDW, dict(lr=-1.0)),
])
def test_bad_hyperparameters_raise_what_torch_raises(cls, kwargs):
    """Where torch.optim has the check: the same exception type and message,
    raised before the params are looked at (here: a param list torch would
    refuse too, which must not be what is reported)."""
    with pytest.raises(Exception) as theirs:
        TWIN[cls](["not a tensor"], **kwargs)
    with pytest.raises(type(theirs.value)) as ours:
        cls(["not a tensor"], **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("cls, kwargs, exc, match", [
    (fa.AdamW, dict(betas=(0.9,)), ValueError, "betas"),
    (fa.AdamW, dict(decay_scaling="paper"), ValueError, "decay_scaling"),
    (fa.AdamW, dict(backend="rocm"), ValueError, "backend"),
    (fa.AdamW, dict(state_dtype=torch.float16), ValueError, "state_dtype"),
    (fa.AdamW, dict(decay_base_lr=0.0), ValueError, "decay_base_lr"),
    (fa.AdamW, dict(lr="1e-3"), TypeError, "lr must be a float"),
    (fa.SGD, dict(lr="0.1"), TypeError, "lr must be a float"),
    (fa.AdamW, dict(weight_decay="0.1"), TypeError, "weight_decay must be a float"),
    (fa.SGDW, dict(decay_scaling=None), ValueError, "decay_scaling"),
])
def test_bad_extra_hyperparameters_name_the_argument(cls, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cls(_params(), **kwargs)


def test_bad_group_override_is_rejected():
    with pytest.raises(ValueError, match="weight_decay"):
        fa.AdamW([{"params": _params(1)}, {"params": _params(1, seed=1), "weight_decay": -1.0}])


def test_duplicate_params_are_rejected():
    p = _params(1)[0]
    with pytest.raises(ValueError, match="twice"):
        fa.AdamW([p, p])
    with pytest.raises(ValueError, match="more than one"):
        fa.AdamW([{"params": [p]}, {"params": [p]}])


def test_keywords_match_torch():
    """Every keyword torch's class takes is accepted (foreach/fused have no effect)."""
    import inspect
    for ours, theirs in [(fa.AdamW, torch.optim.AdamW), (fa.Adam, torch.optim.Adam), (fa.SGD, torch.optim.SGD)]:
        ours_sig = inspect.signature(ours.__init__).parameters
        for name, param in inspect.signature(theirs.__init__).parameters.items():
            assert name in ours_sig, f"{ours.__name__} lacks torch's keyword {name}"
            if param.default is not inspect.Parameter.empty:
                assert ours_sig[name].default == param.default, f"{ours.__name__}.{name} default"


# ---------------------------------------------------------------- bad tensors

@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad_is_rejected_by_adam(backend):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = fa.AdamW(emb.parameters(), backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"grads\[0\] is sparse"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_params_are_rejected(backend):
    base = torch.randn(16)
    a, b = base[:10].requires_grad_(), base[6:].requires_grad_()
    opt = fa.AdamW([a, b], backend=backend)
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    with pytest.raises(ValueError, match="overlap"):
        opt.step()


def test_integer_param_is_rejected():
    p = torch.zeros(4, dtype=torch.int32)
    opt = fa.SGD([p])
    p.grad = torch.ones(4, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.int32"):
        opt.step()


def test_grad_checks_name_the_argument():
    from fused_adamw.plan import Batch
    p = [torch.randn(4), torch.randn(4)]
    m = [torch.zeros(4), torch.zeros(4)]
    steps = [torch.zeros(()), torch.zeros(())]
    with pytest.raises(TypeError, match=r"grads\[1\] has dtype torch.float64"):
        Batch.adam(p, [torch.randn(4), torch.randn(4, dtype=torch.float64)], m, m, None, steps)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape \(5,\)"):
        Batch.adam(p, [torch.randn(5), torch.randn(4)], m, m, None, steps)
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta"):
        Batch.adam(p, [torch.randn(4), torch.empty(4, device="meta")], m, m, None, steps)


def test_state_dtype_for_fp64_params_is_rejected():
    p = torch.randn(4, dtype=torch.float64, requires_grad=True)
    opt = fa.AdamW([p], state_dtype=torch.float32)
    p.grad = torch.randn_like(p)
    with pytest.raises(TypeError, match="state_dtype"):
        opt.step()


def test_backend_device_mismatch_is_rejected():
    p = _params(1)
    with pytest.raises(ValueError, match="backend='cuda'"):
        opt = fa.AdamW(p, backend="cuda")
        p[0].grad = torch.randn_like(p[0])
        opt.step()


def test_unavailable_backend_raises_its_import_error(monkeypatch):
    monkeypatch.setitem(dispatch._MODULES, "triton", "fused_adamw._no_such_module")
    monkeypatch.setattr(dispatch, "_loaded", {k: v for k, v in dispatch._loaded.items() if k != "triton"})
    monkeypatch.setattr(dispatch, "_errors", {})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = _params(1)
    opt = fa.AdamW(p, backend="triton")
    p[0].grad = torch.randn_like(p[0])
    with pytest.raises(fa.BackendUnavailableError, match="No module named 'fused_adamw._no_such_module'"):
        opt.step()
    assert "triton" not in fa.available_backends("cpu")


def test_available_backends_on_cpu():
    names = fa.available_backends("cpu")
    assert names[0] == "cpu" and names[-1] == "torch"


# ---------------------------------------------------------------- behaviour

@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_and_zero_grad(backend):
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    opt = fa.AdamW(model.parameters(), lr=1e-2, backend=backend)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(30):
        last = float(opt.step(closure).detach())
    assert last < first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=12),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 1e-3, 1e-2, step_size_up=3,
                                                             cycle_momentum=False),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.5, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.8)], milestones=[3]),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1, factor=0.5),
}


def _advance(scheduler):
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(1.0)  # a plateau: lr drops every other step
    else:
        scheduler.step()


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_match_torch_and_the_paper(name):
    """decay_scaling="lr" tracks torch.optim.AdamW under the scheduler;
    "schedule" tracks the reference with eta_t = lr / initial_lr, so the decay
    follows the schedule multiplier and not the base lr."""
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(50, generator=gen, dtype=torch.float64)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(12)]
    kw = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.5)

    def run(make_opt):
        p = init.clone().requires_grad_()
        opt = make_opt([p])
        sch = SCHEDULERS[name](opt)
        lrs, betas = [], []
        for g in grads:
            p.grad = g.clone()
            lrs.append(float(opt.param_groups[0]["lr"]))
            betas.append(tuple(opt.param_groups[0]["betas"]))
            opt.step()
            _advance(sch)
        return p, lrs, betas, opt

    ours, lrs, betas, _ = run(lambda ps: fa.AdamW(ps, **kw))
    theirs, lrs_t, _, _ = run(lambda ps: torch.optim.AdamW(ps, **kw))
    assert lrs == lrs_t
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), **SAME_MATH[torch.float64].kw)

    sched, lrs_s, betas_s, opt = run(lambda ps: fa.AdamW(ps, **kw, decay_scaling="schedule"))
    initial = opt.param_groups[0].get("initial_lr", kw["lr"])
    ref = init.numpy().copy()
    state = {}
    for lr, b, g in zip(lrs_s, betas_s, grads):
        reference.adam_step(ref, g.numpy(), state, lr=lr, betas=b, eps=1e-8, weight_decay=0.5,
                            decoupled=True, decay_scaling="schedule", initial_lr=initial)
    np.testing.assert_allclose(sched.detach().numpy(), ref, **SAME_MATH[torch.float64].kw)


def test_schedule_scaling_is_algorithm_2_of_the_paper():
    """AdamW(decay_scaling="schedule") under a scheduler = Algorithm 2 with
    alpha = the base lr and eta_t = the scheduler's multiplier."""
    gen = torch.Generator().manual_seed(2)
    theta0 = torch.randn(40, generator=gen, dtype=torch.float64)
    grads = [torch.randn(40, generator=gen, dtype=torch.float64) for _ in range(15)]
    alpha, lam = 3e-3, 0.2
    factor = lambda t: 0.5 * (1 + np.cos(np.pi * t / 15))  # cosine annealing of eta_t
    p = theta0.clone().requires_grad_()
    opt = fa.AdamW([p], lr=alpha, betas=(0.9, 0.999), eps=1e-8, weight_decay=lam, decay_scaling="schedule")
    sch = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        sch.step()
    etas = [factor(t) for t in range(15)]
    traj = reference.paper_algorithm2(theta0.numpy(), lambda t, th: grads[t - 1].numpy(), alpha=alpha,
                                      beta1=0.9, beta2=0.999, eps=1e-8, lam=lam, etas=etas)
    np.testing.assert_allclose(p.detach().numpy(), traj[-1], **SAME_MATH[torch.float64].kw)
    # and the torch convention differs: it decays by alpha*eta_t*lam, not eta_t*lam
    q = theta0.clone().requires_grad_()
    opt2 = fa.AdamW([q], lr=alpha, betas=(0.9, 0.999), weight_decay=lam)
    sch2 = torch.optim.lr_scheduler.LambdaLR(opt2, factor)
    for g in grads:
        q.grad = g.clone()
        opt2.step()
        sch2.step()
    assert np.max(np.abs(q.detach().numpy() - traj[-1])) > 1e-3


def test_sgdw_at_constant_lr_is_algorithm_1_of_the_paper():
    gen = torch.Generator().manual_seed(3)
    theta0 = torch.randn(30, generator=gen, dtype=torch.float64)
    grads = [torch.randn(30, generator=gen, dtype=torch.float64) for _ in range(10)]
    p = theta0.clone().requires_grad_()
    opt = fa.SGDW([p], lr=0.05, momentum=0.9, weight_decay=0.1, decay_scaling="schedule")
    for g in grads:
        p.grad = g.clone()
        opt.step()
    traj = reference.paper_algorithm1(theta0.numpy(), lambda t, th: grads[t - 1].numpy(), alpha=0.05,
                                      beta1=0.9, lam=0.1, etas=[1.0] * 10)
    np.testing.assert_allclose(p.detach().numpy(), traj[-1], **SAME_MATH[torch.float64].kw)


def test_grad_scaler_step_matches_torch():
    """torch.amp.GradScaler drives our step through grad_scale / found_inf,
    and the result matches torch.optim.AdamW under the same scaler."""
    torch.manual_seed(4)
    models = [torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [fa.AdamW(models[0].parameters(), lr=1e-2), torch.optim.AdamW(models[1].parameters(), lr=1e-2)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)]
    x, y = torch.randn(8, 6), torch.randn(8, 4)
    for step in range(6):
        for m, o, s in zip(models, opts, scalers):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            if step == 3:
                loss = loss * float("inf")  # an overflow: both must skip and lower the scale
            s.scale(loss).backward()
            s.step(o)
            s.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0 ** 10
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, **TRAJECTORY[torch.float32].kw)
    assert all(float(opts[0].state[p]["step"]) == 5 for p in models[0].parameters())


def test_fp32_state_survives_a_state_dict_round_trip():
    p = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    opt = fa.AdamW([p], state_dtype=torch.float32)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        opt.step()
    sd = opt.state_dict()
    q = p.detach().clone().requires_grad_()
    opt2 = fa.AdamW([q], state_dtype=torch.float32)
    opt2.load_state_dict(sd)
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[q][key].dtype == torch.float32
        assert torch.equal(opt2.state[q][key], opt.state[p][key])
    assert opt2.param_groups[0]["state_dtype"] == torch.float32


def test_torch_state_dict_keeps_our_settings():
    """A dict saved by torch.optim has none of our keys: ours stay."""
    p = torch.randn(8, requires_grad=True)
    t = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    t.step()
    q = p.detach().clone().requires_grad_()
    ours = fa.AdamW([q], lr=1e-3, decay_scaling="schedule", backend="torch")
    ours.load_state_dict(t.state_dict())
    g = ours.param_groups[0]
    assert g["decay_scaling"] == "schedule" and g["backend"] == "torch" and g["first_lr"] == 1e-3
    assert ours.state[q]["step"].dtype == torch.float32 and float(ours.state[q]["step"]) == 1.0


def test_schedule_scaling_needs_a_positive_initial_lr():
    p = torch.randn(4, requires_grad=True)
    opt = fa.AdamW([p], lr=0.0, weight_decay=0.1, decay_scaling="schedule")
    p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="reference lr of eta_t"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_replacing_a_params_state_is_seen(backend):
    """Checkpoint surgery (a new dict for opt.state[p]) takes effect at once,
    though the step caches what it gathered from opt.state."""
    p = torch.randn(8, requires_grad=True)
    opt = fa.AdamW([p], lr=1e-2, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    old = opt.state[p]
    fresh = {k: v.clone() for k, v in old.items()}
    opt.state[p] = fresh
    before = fresh["exp_avg"].clone()
    opt.step()
    assert float(fresh["step"]) == 2 and float(old["step"]) == 1
    assert not torch.equal(fresh["exp_avg"], before)
    # and a state dict still holds plain dicts only
    assert type(opt.state_dict()["state"]) is dict


def test_optimizer_pickles():
    import pickle
    p = torch.randn(4, requires_grad=True)
    opt = fa.AdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    clone = pickle.loads(pickle.dumps(opt))
    assert float(next(iter(clone.state.values()))["step"]) == 1


# ---------------------------------------------------------------- decay_scaling="schedule" guards

def _decay_of_one_step(**kw):
    """The factor a zero-grad step multiplies the param by (Adam's update is
    0 there, so only the decoupled decay acts)."""
    p = torch.ones(4, dtype=torch.float64, requires_grad=True)
    opt = fa.AdamW([p], **kw)
    p.grad = torch.zeros_like(p)
    opt.step()
    return float(p.detach()[0])


def test_schedule_decay_base_lr_names_the_lr_of_eta_one():
    assert _decay_of_one_step(lr=0.01, weight_decay=0.004, decay_scaling="schedule") == pytest.approx(1 - 0.004)
    # eta_t = lr / decay_base_lr = 0.5
    assert _decay_of_one_step(lr=0.01, weight_decay=0.004, decay_scaling="schedule",
                              decay_base_lr=0.02) == pytest.approx(1 - 0.002)
    assert _decay_of_one_step(lr=0.01, weight_decay=0.004) == pytest.approx(1 - 0.01 * 0.004)


def test_schedule_warns_once_when_the_decay_is_torch_sized():
    p = torch.randn(4, requires_grad=True)
    opt = fa.AdamW([p], lr=1e-3, weight_decay=0.1, decay_scaling="schedule")
    with pytest.warns(fa.DecayScheduleWarning, match="0.1 per step") as record:
        for _ in range(3):
            p.grad = torch.randn(4)
            opt.step()
    assert len(record) == 1


def test_schedule_warns_when_a_scheduler_lifts_eta_above_one():
    p = torch.randn(4, requires_grad=True)
    opt = fa.AdamW([p], lr=1e-2, weight_decay=1e-4, decay_scaling="schedule")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    with pytest.warns(fa.DecayScheduleWarning, match="eta_t"):
        for _ in range(10):
            p.grad = torch.randn(4)
            opt.step()
            sched.step()
    # Naming the peak as the reference keeps eta_t <= 1: no warning.
    q = torch.randn(4, requires_grad=True)
    opt = fa.AdamW([q], lr=1e-2, weight_decay=1e-4, decay_scaling="schedule", decay_base_lr=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", fa.DecayScheduleWarning)
        for _ in range(10):
            q.grad = torch.randn(4)
            opt.step()
            sched.step()
