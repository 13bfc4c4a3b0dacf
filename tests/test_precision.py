"""The precision options of the optimizers (issue 12): state_dtype=torch.bfloat16,
master_weights, stochastic_rounding, kahan_summation, seed.

What the optimizer layer promises around the kernels: clear errors for bad
combinations, the state each option keeps, state-dict round trips (ours to
ours at any option, continuing bit for bit; to and from torch.optim where
torch has the keys), the generator's key and tensor numbering, and params no
kernel takes (strided views) served with the same bits. The kernels' values
against the float64 model are tests/test_backend_suite.py's
test_precision_* (every backend).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fused_adamw as fa
from fused_adamw import reference

OPTIONS = ("master_weights", "stochastic_rounding", "kahan_summation")
CLASSES = {"AdamW": dict(lr=1e-2, weight_decay=0.1), "Adam": dict(lr=1e-2, amsgrad=True),
           "SGD": dict(lr=5e-2, momentum=0.9), "SGDW": dict(lr=5e-2, weight_decay=0.1)}


def _params(dtype=torch.bfloat16, seed=0, shapes=((33,), (4, 9), (1,))):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def _grads(params, step, seed=1):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _run(opt, params, steps, first=0):
    for t in range(first, first + steps):
        for p, g in zip(params, _grads(params, t)):
            p.grad = g
        opt.step()


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_two_options_are_an_error_naming_both(cls_name):
    cls = getattr(fa, cls_name)
    with pytest.raises(ValueError, match="master_weights and stochastic_rounding"):
        cls(_params(), master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="stochastic_rounding and kahan_summation"):
        cls(_params(), stochastic_rounding=True, kahan_summation=True)


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options_need_16_bit_params(option, dtype):
    with pytest.raises(ValueError, match=rf"{option}=True needs float16 or bfloat16 params.*params\[0\]"):
        fa.AdamW(_params(dtype), **{option: True})


def test_bf16_state_is_refused_for_float64_and_complex_params():
    with pytest.raises(ValueError, match="state_dtype=torch.bfloat16 is not supported for torch.float64"):
        fa.AdamW(_params(torch.float64), state_dtype=torch.bfloat16)
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex64"):
        fa.Adam([z], state_dtype=torch.bfloat16)


@pytest.mark.parametrize("bad, match", [
    (dict(state_dtype=torch.float16), "Invalid state_dtype"),
    (dict(master_weights=1), "master_weights must be True or False"),
    (dict(stochastic_rounding="yes"), "stochastic_rounding must be True or False"),
    (dict(seed=-1), "Invalid seed"),
    (dict(seed=2**63), "Invalid seed"),
    (dict(seed=1.5), "Invalid seed"),
])
def test_bad_values_name_the_argument(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fa.AdamW(_params(), **bad)


def test_an_option_switched_on_later_is_checked_at_the_step():
    params = _params(torch.float32)
    opt = fa.AdamW(params)
    _run(opt, params, 1)
    opt.param_groups[0]["kahan_summation"] = True
    with pytest.raises(ValueError, match="kahan_summation=True needs float16 or bfloat16 params"):
        _run(opt, params, 1)
    opt.param_groups[0]["kahan_summation"] = False
    opt.param_groups[0]["master_weights"] = opt.param_groups[0]["stochastic_rounding"] = True
    with pytest.raises(ValueError, match="cannot be combined"):
        _run(opt, params, 1)


def test_differentiable_and_sparse_grads_refuse_the_options():
    params = _params()
    opt = fa.Adam(params, differentiable=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="differentiable=True cannot be combined"):
        _run(opt, params, 1)
    p = torch.zeros(4, 3, dtype=torch.bfloat16, requires_grad=True)
    opt = fa.SGD([p], lr=0.1, kahan_summation=True)
    p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3, dtype=torch.bfloat16), (4, 3), check_invariants=True)
    with pytest.raises((TypeError, ValueError), match="sparse"):
        opt.step()


# ---------------------------------------------------------------- state

@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_state_each_option_keeps(cls_name):
    kw = CLASSES[cls_name]
    cls = getattr(fa, cls_name)
    for option, key, dtype in (("master_weights", "master_param", torch.float32),
                               ("kahan_summation", "kahan_comp", torch.bfloat16),
                               ("stochastic_rounding", "step", torch.float32)):
        params = _params()
        before = [p.detach().float().clone() for p in params]
        opt = cls(params, **kw, **{option: True})
        _run(opt, params, 2)
        for p, b in zip(params, before):
            st = opt.state[p]
            assert st[key].dtype == dtype, (option, key)
            if key == "step":
                assert float(st[key]) == 2.0
            else:
                assert st[key].shape == p.shape
        if option == "master_weights":
            # The param is the master copy rounded to nearest.
            for p in params:
                assert torch.equal(p.detach(), opt.state[p]["master_param"].to(torch.bfloat16))
                assert not torch.equal(opt.state[p]["master_param"], p.detach().float())


def test_bf16_state_halves_the_state_of_fp32_params():
    params = _params(torch.float32)
    opt = fa.AdamW(params, state_dtype=torch.bfloat16)
    _run(opt, params, 2)
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


def _snapshot(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("cls_name", list(CLASSES))
@pytest.mark.parametrize("option", OPTIONS + ("bf16-state",))
def test_state_dict_round_trip_continues_bit_for_bit(cls_name, option):
    """Save mid-run, load into a fresh optimizer on copies of the params: the
    next steps are the uninterrupted run's, bit for bit (stochastic rounding
    continues the same stream: seed and steps are in the dict)."""
    cls = getattr(fa, cls_name)
    kw = dict(CLASSES[cls_name], seed=1234)
    dtype = torch.bfloat16
    if option == "bf16-state":
        kw["state_dtype"], dtype = torch.bfloat16, torch.float32
    else:
        kw[option] = True
    params = _params(dtype)
    opt = cls(params, **kw)
    _run(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    at_save = _snapshot(params)
    _run(opt, params, 4, first=3)

    again = [p.clone().requires_grad_() for p in at_save]
    opt2 = cls(again, **{**kw, "seed": 99})  # the dict's seed wins
    opt2.load_state_dict(saved)
    _run(opt2, again, 4, first=3)
    for p, q in zip(params, again):
        assert torch.equal(p.detach(), q.detach())
        for key, val in opt.state[p].items():
            assert torch.equal(torch.as_tensor(val), torch.as_tensor(opt2.state[q][key])), key
            if isinstance(val, torch.Tensor):
                assert val.dtype == opt2.state[q][key].dtype, key


def test_seed_is_saved_only_with_stochastic_rounding():
    opt = fa.AdamW(_params(), seed=7)
    assert "seed" not in opt.state_dict()["param_groups"][0]
    opt = fa.AdamW(_params(), seed=7, stochastic_rounding=True)
    assert opt.state_dict()["param_groups"][0]["seed"] == 7


def test_default_seed_follows_torch_manual_seed_and_draws_nothing():
    torch.manual_seed(42)
    a = fa.AdamW(_params(), stochastic_rounding=True).param_groups[0]["seed"]
    after = torch.rand(1)
    torch.manual_seed(42)
    b = fa.AdamW(_params(), stochastic_rounding=True).param_groups[0]["seed"]
    assert a == b == 42
    torch.manual_seed(42)
    assert torch.equal(torch.rand(1), after)  # constructing the optimizer drew nothing


@pytest.mark.parametrize("option", ["master_weights", "kahan_summation"])
def test_load_from_torch_optim_and_back(option):
    """torch.optim.AdamW (bf16 params) -> ours with an option -> torch.optim:
    the moments and steps carry over; the option's state starts where a fresh
    run starts it (master: the param's value; compensation: zero)."""
    params = _params()
    t_opt = torch.optim.AdamW(params, lr=1e-2)
    _run(t_opt, params, 2)
    ours = fa.AdamW(params, lr=1e-2, **{option: True})
    ours.load_state_dict(t_opt.state_dict())
    for p in params:
        assert torch.equal(ours.state[p]["exp_avg"], t_opt.state[p]["exp_avg"])
        assert ours.state[p]["exp_avg"].dtype == torch.bfloat16
    before = _snapshot(params)
    _run(ours, params, 1, first=2)
    key = "master_param" if option == "master_weights" else "kahan_comp"
    for p in params:
        assert float(ours.state[p]["step"]) == 3.0
        assert ours.state[p][key].shape == p.shape
    assert not all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    back = torch.optim.AdamW(params, lr=1e-2)
    back.load_state_dict(ours.state_dict())
    _run(back, params, 1, first=3)
    for p in params:
        assert float(back.state[p]["step"]) == 4.0


def test_fp32_params_bf16_state_load_from_torch_keeps_bf16_state():
    params = _params(torch.float32)
    t_opt = torch.optim.AdamW(params, lr=1e-2)
    _run(t_opt, params, 2)
    ours = fa.AdamW(params, lr=1e-2, state_dtype=torch.bfloat16)
    ours.load_state_dict(t_opt.state_dict())
    for p in params:
        assert ours.state[p]["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(ours.state[p]["exp_avg"], t_opt.state[p]["exp_avg"].to(torch.bfloat16))


# ---------------------------------------------------------------- generator's numbering

def test_tensor_index_is_the_state_dict_number_across_groups():
    """SGD, lr 1, no momentum: p - g is exact in float32 on every backend, so
    each param's stochastic rounding is the model's with tensor_index = its
    number in state_dict(), whatever group it is in."""
    params = _params(shapes=((257,), (3, 5), (64,)))
    opt = fa.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=1.0, stochastic_rounding=True, seed=5)
    start = [p.detach().double().numpy().copy() for p in params]
    grads = _grads(params, 0)
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    prec = reference.Precision(param_dtype="bfloat16", stochastic_rounding=True)
    for k, (p, s, g) in enumerate(zip(params, start, grads)):
        ref = s.copy()
        reference.sgd_step_lp(ref, g.double().numpy(), {}, precision=prec, seed=5, tensor_index=k, lr=1.0)
        np.testing.assert_array_equal(p.detach().double().numpy(), ref, err_msg=f"params[{k}]")


@pytest.mark.parametrize("option", OPTIONS + ("bf16-state",))
def test_strided_views_get_the_dense_bits(option):
    """A param that is a strided view (no kernel takes it) goes to backend
    torch's code, element index = row-major position: the same values as a
    contiguous copy of it on backend torch."""
    base = torch.randn(6, 20).to(torch.bfloat16)
    view = base[:, ::2].requires_grad_()
    dense = view.detach().clone().requires_grad_()
    kw = dict(lr=1e-2, seed=3)
    if option == "bf16-state":
        view = base.float()[:, ::2].requires_grad_()
        dense = view.detach().clone().requires_grad_()
        kw["state_dtype"] = torch.bfloat16
    else:
        kw[option] = True
    o1, o2 = fa.AdamW([view], **kw), fa.AdamW([dense], **kw, backend="torch")
    for t in range(4):
        g = _grads([dense], t)[0]
        view.grad, dense.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(view.detach(), dense.detach())
    for key, val in o2.state[dense].items():
        assert torch.equal(o1.state[view][key], val), key
