"""The helpers of fused_adamw.param_groups, and the paper's warm restarts.

  * weight_decay_groups: which params are decayed, by module class (model
    given) and by name and shape (names only), tied weights, FSDP-style
    wrappers' prefixes, user patterns, and the groups training with both
    this package and torch.optim;
  * normalized_weight_decay: the paper's lambda = lambda_norm * sqrt(b / (B T))
    and its torch-convention form;
  * warm restarts: with decay_scaling="schedule" under torch's
    CosineAnnealingWarmRestarts, the decay applied each step is
    eta_t * lambda with eta_t = lr_t / initial_lr, so it jumps back to lambda
    at every restart (closed form, and the float64 oracle with grads).
"""
import math

import numpy as np
import pytest
import torch

import fused_adamw as fa
from fused_adamw import reference
from tolerances import SAME_MATH, TRAJECTORY


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = torch.nn.Embedding(10, 8)
        self.pos = torch.nn.Embedding(4, 8)           # an embedding whose name does not say so
        self.conv = torch.nn.Conv1d(8, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm1d(8)
        self.ln = torch.nn.LayerNorm(8)
        self.gn = torch.nn.GroupNorm(2, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.tok_embeddings.weight  # tied, as in GPT-2
        self.temperature = torch.nn.Parameter(torch.ones(()))
        self.frozen = torch.nn.Parameter(torch.ones(8, 8), requires_grad=False)

    def forward(self, idx):
        h = self.tok_embeddings(idx) + self.pos(torch.arange(idx.shape[1]))
        h = self.gn(self.conv(self.bn(h.transpose(1, 2)))).transpose(1, 2)
        return self.head(self.proj(self.ln(h))) * self.temperature


def _names(groups, model):
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [sorted(name_of[id(p)] for p in g["params"]) for g in groups]


def test_rule_with_a_model_goes_by_module_class():
    m = Block()
    groups = fa.weight_decay_groups(m.named_parameters(), 0.1, model=m)
    decay, keep = _names(groups, m)
    assert decay == ["conv.weight", "proj.weight"]
    assert keep == ["bn.bias", "bn.weight", "conv.bias", "gn.bias", "gn.weight", "ln.bias", "ln.weight",
                    "pos.weight", "proj.bias", "temperature", "tok_embeddings.weight"]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0


def test_rule_without_a_model_goes_by_name_and_shape():
    m = Block()
    decay, keep = _names(fa.weight_decay_groups(m.named_parameters(), 0.1), m)
    # pos.weight is 2-D and its name does not say embedding: only the model tells
    assert decay == ["conv.weight", "pos.weight", "proj.weight"]
    assert "tok_embeddings.weight" in keep and "ln.weight" in keep and "temperature" in keep


def test_names_only_gpt2_style_and_user_patterns():
    shapes = {"transformer.wte.weight": (50, 8), "transformer.wpe.weight": (16, 8),
              "transformer.h.0.attn.c_attn.weight": (8, 24), "transformer.h.0.attn.c_attn.bias": (24,),
              "transformer.h.0.ln_1.weight": (8,), "lm_head.weight": (50, 8), "cls_token": (1, 1, 8)}
    named = [(n, torch.nn.Parameter(torch.zeros(s))) for n, s in shapes.items()]
    groups = fa.weight_decay_groups(named, 0.05, no_decay=["cls_token"], lr=3e-4)
    got = [[n for n, p in named if any(p is q for q in g["params"])] for g in groups]
    assert got[0] == ["transformer.h.0.attn.c_attn.weight", "lm_head.weight"]
    assert got[1] == ["transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.bias",
                      "transformer.h.0.ln_1.weight", "cls_token"]
    assert all(g["lr"] == 3e-4 for g in groups)


def test_decay_1d_and_custom_module_classes():
    m = Block()
    groups = fa.weight_decay_groups(m.named_parameters(), 0.1, model=m, decay_1d=True,
                                    no_decay_modules=(torch.nn.LayerNorm,))
    decay, keep = _names(groups, m)
    # biases stay undecayed by name; only LayerNorm is excluded by class now
    assert keep == ["bn.bias", "conv.bias", "gn.bias", "ln.bias", "ln.weight", "proj.bias"]
    assert "bn.weight" in decay and "temperature" in decay and "tok_embeddings.weight" in decay


def test_names_with_a_wrapper_prefix_match_the_model_by_identity():
    """DDP and torch.compile prefix the names (module., _orig_mod.): the
    modules are found by param identity, not by name."""
    m = Block()
    wrapped = torch.nn.ModuleDict({"module": m})
    groups = fa.weight_decay_groups(wrapped.named_parameters(), 0.1, model=m)
    assert _names(groups, m)[0] == ["conv.weight", "proj.weight"]
    with pytest.raises(ValueError, match="not a parameter of the given model"):
        fa.weight_decay_groups([("x", torch.nn.Parameter(torch.zeros(2, 2)))], 0.1, model=m)


def test_bad_arguments():
    m = Block()
    with pytest.raises(TypeError, match=r"\(name, param\) pairs"):
        fa.weight_decay_groups(m.parameters(), 0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        fa.weight_decay_groups(m.named_parameters(), -1.0)
    with pytest.raises(ValueError, match="no parameters"):
        fa.weight_decay_groups([("frozen", m.frozen)], 0.1)


@pytest.mark.parametrize("make", [
    lambda g: fa.AdamW(g, lr=1e-2), lambda g: torch.optim.AdamW(g, lr=1e-2)], ids=["fused_adamw", "torch"])
def test_groups_train_and_leave_the_excluded_params_undecayed(make):
    """Zero grads: only the decay moves a param, so the excluded ones stay put
    and the decayed ones shrink by exactly (1 - lr * wd) per step."""
    m = Block()
    groups = fa.weight_decay_groups(m.named_parameters(), 0.5, model=m)
    opt = make(groups)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for _ in range(3):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for n, p in m.named_parameters():
        factor = (1 - 1e-2 * 0.5) ** 3 if n in ("conv.weight", "proj.weight") else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, **SAME_MATH[torch.float32].kw)


def test_groups_match_torch_over_a_training_run():
    torch.manual_seed(0)
    a = Block()
    b = Block()
    b.load_state_dict(a.state_dict())
    opt_a = fa.AdamW(fa.weight_decay_groups(a.named_parameters(), 0.1, model=a), lr=1e-2)
    opt_b = torch.optim.AdamW(fa.weight_decay_groups(b.named_parameters(), 0.1, model=b), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        idx = torch.randint(0, 4, (3, 4), generator=gen)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(idx).square().mean().backward()
            opt.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **TRAJECTORY[torch.float32].kw, msg=lambda s: f"{n}: {s}")


# ---------------------------------------------------------------- normalized weight decay

def test_normalized_weight_decay_is_the_papers_formula():
    # lambda = lambda_norm * sqrt(b / (B * T))  (arXiv:1711.05101v3, Appendix B.1)
    assert fa.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=100) == \
        pytest.approx(0.05 * math.sqrt(128 / (50_000 * 100)), rel=1e-15)
    # four times the updates (4x the epochs): half the decay per step
    one = fa.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=50)
    four = fa.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=200)
    assert four == pytest.approx(one / 2, rel=1e-15)
    # one batch pass over one batch-sized dataset: lambda_norm itself
    assert fa.normalized_weight_decay(0.05, batch_size=32, dataset_size=32, epochs=1) == 0.05
    # torch's convention: the weight_decay that lr multiplies, for the same decay at the base lr
    assert fa.normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=100, lr=1e-3) == \
        pytest.approx(0.05 * math.sqrt(128 / (50_000 * 100)) / 1e-3, rel=1e-15)


def test_normalized_weight_decay_drives_both_conventions_alike():
    """The helper's two outputs decay a param by the same amount per step at the base lr."""
    lam = fa.normalized_weight_decay(1.0, batch_size=10, dataset_size=1000, epochs=4)
    wd_torch = fa.normalized_weight_decay(1.0, batch_size=10, dataset_size=1000, epochs=4, lr=0.01)
    p, q = torch.ones(4, dtype=torch.float64, requires_grad=True), torch.ones(4, dtype=torch.float64, requires_grad=True)
    opts = [fa.AdamW([p], lr=0.01, weight_decay=lam, decay_scaling="schedule"),
            torch.optim.AdamW([q], lr=0.01, weight_decay=wd_torch)]
    for t, opt in zip((p, q), opts):
        t.grad = torch.zeros_like(t)
        opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), 1 - lam, dtype=torch.float64), **SAME_MATH[torch.float64].kw)
    torch.testing.assert_close(q.detach(), p.detach(), **SAME_MATH[torch.float64].kw)


@pytest.mark.parametrize("kwargs, exc", [
    (dict(batch_size=0, dataset_size=10, epochs=1), ValueError),
    (dict(batch_size=2.0, dataset_size=10, epochs=1), ValueError),
    (dict(batch_size=20, dataset_size=10, epochs=1), ValueError),
    (dict(batch_size=2, dataset_size=10, epochs=0), ValueError),
    (dict(batch_size=2, dataset_size=10, epochs="3"), TypeError),
    (dict(batch_size=2, dataset_size=10, epochs=1, lr=0.0), ValueError),
])
def test_normalized_weight_decay_checks_its_arguments(kwargs, exc):
    with pytest.raises(exc):
        fa.normalized_weight_decay(0.05, **kwargs)


# ---------------------------------------------------------------- warm restarts

def _warm_restart_run(decay_scaling, grads, theta0, alpha, lam, T_0=4, T_mult=2):
    p = theta0.clone().requires_grad_()
    opt = fa.AdamW([p], lr=alpha, weight_decay=lam, decay_scaling=decay_scaling)
    sch = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=T_0, T_mult=T_mult)
    lrs, trace = [], []
    for g in grads:
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = g.clone()
        opt.step()
        sch.step()
        trace.append(p.detach().clone())
    return lrs, trace


def test_schedule_decay_follows_the_warm_restarts_closed_form():
    """Zero grads: the Adam step is 0, so p_t = p_{t-1} * (1 - eta_t * lambda)
    with eta_t = lr_t / initial_lr read from the scheduler each step: the
    decay restarts at full strength with the lr (steps 0, 4, 12 for T_0=4,
    T_mult=2), independent of alpha."""
    theta0 = torch.linspace(-2, 2, 9, dtype=torch.float64)
    lam, n = 0.05, 16
    zeros = [torch.zeros(9, dtype=torch.float64)] * n
    for alpha in (1e-3, 0.3):
        lrs, trace = _warm_restart_run("schedule", zeros, theta0, alpha, lam)
        etas = [lr / alpha for lr in lrs]
        restarts = [t for t, eta in enumerate(etas) if eta == 1.0]
        assert restarts == [0, 4, 12]
        assert all(etas[t] < etas[t - 1] for t in range(1, n) if t not in restarts)  # annealing in between
        prev = theta0
        for t, p in enumerate(trace):
            torch.testing.assert_close(p, prev * (1 - etas[t] * lam), **SAME_MATH[torch.float64].kw)
            prev = p
        want = theta0 * math.prod(1 - eta * lam for eta in etas)
        torch.testing.assert_close(trace[-1], want, **SAME_MATH[torch.float64].kw)
    # torch's convention under the same scheduler decays by lr_t * lambda instead: far less at alpha=1e-3
    _, torch_style = _warm_restart_run("lr", zeros, theta0, 1e-3, lam)
    assert (trace[-1] - torch_style[-1]).abs().max() > 0.1


def test_schedule_decay_follows_the_warm_restarts_against_the_oracle():
    """With grads: the whole AdamW step against the float64 oracle, fed the
    scheduler's lr_t per step and initial_lr = alpha."""
    gen = torch.Generator().manual_seed(5)
    theta0 = torch.randn(33, generator=gen, dtype=torch.float64)
    grads = [torch.randn(33, generator=gen, dtype=torch.float64) for _ in range(14)]
    alpha, lam = 2e-2, 0.1
    lrs, trace = _warm_restart_run("schedule", grads, theta0, alpha, lam, T_0=3, T_mult=1)
    params, _ = reference.run_adam([theta0.numpy()], [[g.numpy()] for g in grads], lrs, betas=(0.9, 0.999),
                                   eps=1e-8, weight_decay=lam, decoupled=True, decay_scaling="schedule",
                                   initial_lr=alpha)
    np.testing.assert_allclose(trace[-1].numpy(), params[0], **TRAJECTORY[torch.float64].kw)
    assert [t for t, lr in enumerate(lrs) if lr == alpha] == [0, 3, 6, 9, 12]
