"""Distributed training on CPU: DDP and FSDP2 with 2 processes on gloo.

What is checked, each against torch.optim under the same setup (same model,
same init, same batches per rank):

  * DDP: 12 steps of fused_adamw.AdamW equal torch.optim.AdamW, params after
    every step;
  * FSDP2 (torch.distributed.fsdp.fully_shard): 12 steps equal torch.optim
    (AdamW on the cpu and torch backends, AdamW with amsgrad, SGD with
    Nesterov momentum), full params after every step and the state at the
    end, with uneven shards and an empty shard (a 1-element param over 2
    ranks);
  * a torch.distributed.checkpoint (DCP) save after 6 steps and a resume into
    a fresh model and optimizer give exactly the uninterrupted run;
  * get_optimizer_state_dict / set_optimizer_state_dict round trips (sharded
    and full state dicts) give exactly the run without the round trip;
  * a DCP checkpoint saved by fused_adamw.AdamW resumes in torch.optim.AdamW
    and the other way round, equal to the uninterrupted run;
  * a group of DTensor params next to a group of plain params works; a
    DTensor param with plain state is a clear error;
  * one group whose DTensors live on two meshes (a 1-D mesh, and a 2-D
    HSDP-style mesh) equals torch.optim.

Each test spawns 2 processes (torch.multiprocessing, no torchrun) that meet
through a file store in the test's tmp_path (no port to pick, none to race
for). A failure in a process is re-raised here with its traceback.

    python -m pytest -q tests/test_distributed.py
"""
from __future__ import annotations

import copy
import datetime
import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 12
SAVE_AT = 6

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is needed")


# ---------------------------------------------------------------- launcher

def _entry(rank: int, fn_name: str, store: str, args: tuple) -> None:
    # Inside the spawned process: one CPU thread each (2 processes on 2 cores).
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        globals()[fn_name](rank, *args)
        # Both ranks done before either tears down, and nothing of the run
        # (FSDP state, a caught exception's frames) left for interpreter exit,
        # after the process group is gone.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(tmp_path, fn, *args) -> None:
    """Runs fn(rank, *args) in WORLD spawned processes; raises what they raise."""
    mp.spawn(_entry, args=(fn.__name__, str(tmp_path / "store"), args), nprocs=WORLD, join=True)


# ---------------------------------------------------------------- model and data

class Net(torch.nn.Module):
    """Small, with the shapes FSDP2 shards awkwardly: 11, 7 and 5 rows shard
    unevenly over 2 ranks, and `scale` (1 element) leaves rank 1 an empty shard.
    An embedding, a norm and biases, as in a real model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.l1 = torch.nn.Linear(6, 7)
        self.norm = torch.nn.LayerNorm(7)
        self.l2 = torch.nn.Linear(7, 5)
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx).mean(1)
        return self.l2(torch.relu(self.norm(self.l1(h)))) * self.scale


def _net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def _batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, 11, (4, 3), generator=g), torch.randn(4, 5, generator=g)


def _train_step(model, opt, rank: int, step: int) -> None:
    idx, target = _batch(rank, step)
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(idx), target).backward()
    opt.step()


def _shard(model: Net) -> Net:
    from torch.distributed.fsdp import fully_shard
    fully_shard(model.l1)
    fully_shard(model.l2)
    fully_shard(model)
    return model


def _full(model) -> list[torch.Tensor]:
    """Every param as a full tensor (an all-gather for DTensors)."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def _tol():
    from tolerances import TRAJECTORY  # tests/ is on the spawned processes' sys.path too
    return TRAJECTORY[torch.float32].kw


def _assert_params(a, b, what: str, exact: bool = False) -> None:
    for i, (x, y) in enumerate(zip(_full(a), _full(b))):
        if exact:
            assert torch.equal(x, y), f"{what}: param {i} differs (max |diff| {(x - y).abs().max()})"
        else:
            torch.testing.assert_close(x, y, **_tol(), msg=lambda m: f"{what}: param {i}: {m}")


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _assert_state(opt_a, opt_b, params_a, params_b, what: str, exact: bool = False) -> None:
    for i, (pa, pb) in enumerate(zip(params_a, params_b)):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert sorted(sa) == sorted(sb), f"{what}: state keys of param {i}: {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            x, y = _local(sa[k]).float(), _local(sb[k]).float()
            assert type(sa[k]) is type(sb[k]), f"{what}: state {k!r} of param {i}: {type(sa[k])} vs {type(sb[k])}"
            if exact:
                assert torch.equal(x, y), f"{what}: state {k!r} of param {i} differs"
            else:
                torch.testing.assert_close(x, y, **_tol(), msg=lambda m: f"{what}: state {k!r} of param {i}: {m}")


# The optimizers compared, as (name, fused factory, torch factory).
def _pairs():
    import fused_adamw as fa
    adamw = dict(lr=1e-2, weight_decay=0.1)
    return [
        ("AdamW cpu", lambda p: fa.AdamW(p, **adamw), lambda p: torch.optim.AdamW(p, **adamw)),
        ("AdamW torch-backend", lambda p: fa.AdamW(p, **adamw, backend="torch"),
         lambda p: torch.optim.AdamW(p, **adamw)),
        ("AdamW amsgrad", lambda p: fa.AdamW(p, **adamw, amsgrad=True),
         lambda p: torch.optim.AdamW(p, **adamw, amsgrad=True)),
        ("SGD nesterov", lambda p: fa.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
    ]


def _fused(params):
    import fused_adamw as fa
    return fa.AdamW(params, lr=1e-2, weight_decay=0.1)


def _torch(params):
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


# ---------------------------------------------------------------- DDP

def _ddp_matches_torch(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    base = _net()
    for name, make_fused, make_torch in _pairs():
        a, b = DDP(copy.deepcopy(base)), DDP(copy.deepcopy(base))
        opt_a, opt_b = make_fused(a.parameters()), make_torch(b.parameters())
        for step in range(STEPS):
            _train_step(a, opt_a, rank, step)
            _train_step(b, opt_b, rank, step)
            _assert_params(a, b, f"DDP {name}, step {step}")
        _assert_state(opt_a, opt_b, list(a.parameters()), list(b.parameters()), f"DDP {name}")


def test_ddp_training_equals_torch_optim(tmp_path):
    _launch(tmp_path, _ddp_matches_torch)


# ---------------------------------------------------------------- FSDP2

def _fsdp_matches_torch(rank: int) -> None:
    from torch.distributed.tensor import DTensor
    for name, make_fused, make_torch in _pairs():
        a, b = _shard(_net()), _shard(_net())
        assert all(isinstance(p, DTensor) for p in a.parameters())
        opt_a, opt_b = make_fused(a.parameters()), make_torch(b.parameters())
        for step in range(STEPS):
            _train_step(a, opt_a, rank, step)
            _train_step(b, opt_b, rank, step)
            _assert_params(a, b, f"FSDP2 {name}, step {step}")
        # The state is held as torch.optim holds it under FSDP2: DTensors
        # shaped and placed like their params (and a plain step count).
        _assert_state(opt_a, opt_b, list(a.parameters()), list(b.parameters()), f"FSDP2 {name}")


def test_fsdp2_training_equals_torch_optim(tmp_path):
    _launch(tmp_path, _fsdp_matches_torch)


def _shard_on_two_meshes(model: Net) -> Net:
    """l1 sharded over a 1-D mesh of both ranks (Shard(0)); l2 on a 2-D mesh
    (2 x 1: replicated over the ranks, sharded over a dimension of size 1, as
    HSDP lays it out); the rest on the 1-D mesh. One param group then holds
    DTensors of two meshes and two placements."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    flat = init_device_mesh("cpu", (WORLD,))
    hsdp = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("replicate", "shard"))
    fully_shard(model.l1, mesh=flat)
    fully_shard(model.l2, mesh=hsdp)
    fully_shard(model, mesh=flat)
    return model


def _mixed_meshes(rank: int) -> None:
    import fused_adamw as fa
    a, b = _shard_on_two_meshes(_net()), _shard_on_two_meshes(_net())
    meshes = {p.device_mesh.ndim for p in a.parameters()}
    assert meshes == {1, 2}, meshes
    opt_a = fa.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(STEPS):
        _train_step(a, opt_a, rank, step)
        _train_step(b, opt_b, rank, step)
        _assert_params(a, b, f"two meshes, step {step}")
    _assert_state(opt_a, opt_b, list(a.parameters()), list(b.parameters()), "two meshes")


def test_fsdp2_params_on_two_meshes_in_one_group_equal_torch_optim(tmp_path):
    _launch(tmp_path, _mixed_meshes)


def _run(make_opt, steps, model=None, opt=None, start=0, rank=0):
    """Trains `steps` steps from step `start`; returns the model, the
    optimizer and the full params after every step."""
    model = model if model is not None else _shard(_net())
    opt = opt if opt is not None else make_opt(model.parameters())
    trace = []
    for step in range(start, start + steps):
        _train_step(model, opt, rank, step)
        trace.append(_full(model))
    return model, opt, trace


def _save(model, opt, path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _load(make_opt, path):
    """A fresh model (another init) and optimizer, resumed from a DCP checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model = _shard(_net(seed=123))
    opt = make_opt(model.parameters())
    msd, osd = get_state_dict(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    return model, opt


def _compare_traces(ours, want, what, exact) -> None:
    for step, (xs, ys) in enumerate(zip(ours, want)):
        for i, (x, y) in enumerate(zip(xs, ys)):
            if exact:
                assert torch.equal(x, y), f"{what}: step {step}, param {i} differs (max |diff| {(x - y).abs().max()})"
            else:
                torch.testing.assert_close(x, y, **_tol(), msg=lambda m: f"{what}: step {step}, param {i}: {m}")


def _dcp_resume(rank: int, ckpt: str) -> None:
    model, opt, _ = _run(_fused, SAVE_AT, rank=rank)
    _save(model, opt, ckpt)
    _, _, uninterrupted = _run(_fused, STEPS - SAVE_AT, model, opt, start=SAVE_AT, rank=rank)
    model2, opt2 = _load(_fused, ckpt)
    _, _, resumed = _run(_fused, STEPS - SAVE_AT, model2, opt2, start=SAVE_AT, rank=rank)
    _compare_traces(resumed, uninterrupted, "DCP resume", exact=True)
    # the resumed state is the uninterrupted one's
    _assert_state(opt2, opt, list(model2.parameters()), list(model.parameters()), "DCP resume", exact=True)


def test_fsdp2_dcp_save_and_resume_equals_uninterrupted_run(tmp_path):
    _launch(tmp_path, _dcp_resume, str(tmp_path / "ckpt"))


def _state_dict_round_trip(rank: int) -> None:
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)
    for full in (False, True):
        options = StateDictOptions(full_state_dict=full)
        model, opt, _ = _run(_fused, SAVE_AT, rank=rank)
        msd, osd = get_model_state_dict(model, options=options), get_optimizer_state_dict(model, opt, options=options)
        if not full:
            assert any(isinstance(v, torch.Tensor) and hasattr(v, "to_local")
                       for st in osd["state"].values() for v in st.values()), "sharded state should be DTensors"
        model2 = _shard(_net(seed=7))
        opt2 = _fused(model2.parameters())
        set_model_state_dict(model2, msd, options=options)
        set_optimizer_state_dict(model2, opt2, osd, options=options)
        what = f"get/set_optimizer_state_dict (full_state_dict={full})"
        _assert_state(opt2, opt, list(model2.parameters()), list(model.parameters()), what, exact=True)
        _, _, want = _run(_fused, STEPS - SAVE_AT, model, opt, start=SAVE_AT, rank=rank)
        _, _, got = _run(_fused, STEPS - SAVE_AT, model2, opt2, start=SAVE_AT, rank=rank)
        _compare_traces(got, want, what, exact=True)


def test_fsdp2_optimizer_state_dict_round_trip(tmp_path):
    _launch(tmp_path, _state_dict_round_trip)


def _dcp_moves(rank: int, ckpt: str) -> None:
    for src, dst, name in ((_fused, _torch, "fused_adamw -> torch.optim"), (_torch, _fused, "torch.optim -> fused_adamw")):
        path = f"{ckpt}-{src.__name__}"
        model, opt, _ = _run(src, SAVE_AT, rank=rank)
        _save(model, opt, path)
        _, _, uninterrupted = _run(src, STEPS - SAVE_AT, model, opt, start=SAVE_AT, rank=rank)
        model2, opt2 = _load(dst, path)
        _, _, moved = _run(dst, STEPS - SAVE_AT, model2, opt2, start=SAVE_AT, rank=rank)
        _compare_traces(moved, uninterrupted, f"DCP checkpoint {name}", exact=False)


def test_fsdp2_dcp_checkpoint_moves_between_fused_adamw_and_torch_optim(tmp_path):
    _launch(tmp_path, _dcp_moves, str(tmp_path / "ckpt"))


def _mixed_groups(rank: int) -> None:
    import fused_adamw as fa
    # A sharded model and a plain (replicated by hand) param in another group.
    a, b = _shard(_net()), _shard(_net())
    extra_a, extra_b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt_a = fa.AdamW([{"params": a.parameters()}, {"params": [extra_a], "weight_decay": 0.0}],
                     lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW([{"params": b.parameters()}, {"params": [extra_b], "weight_decay": 0.0}],
                              lr=1e-2, weight_decay=0.1)
    for step in range(STEPS):
        for m, extra, opt in ((a, extra_a, opt_a), (b, extra_b, opt_b)):
            idx, target = _batch(rank, step)
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(m(idx), target).backward()
            extra.grad = torch.full((3,), float(step + 1))   # the same on both ranks
            opt.step()
        _assert_params(a, b, f"mixed groups, step {step}")
        torch.testing.assert_close(extra_a.detach(), extra_b.detach(), **_tol())
    _mismatched_state_is_a_clear_error(next(a.parameters()))


def _mismatched_state_is_a_clear_error(p) -> None:
    """A DTensor param whose state is a plain tensor (a state dict loaded the
    wrong way): a ValueError naming it, not a kernel handed a null address.
    No collective runs here, so both ranks stay in step."""
    import fused_adamw as fa
    opt = fa.AdamW([p], lr=1e-2)
    p.grad = torch.zeros_like(p)
    opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros(p.shape), "exp_avg_sq": torch.zeros_like(p)}
    with pytest.raises(ValueError, match=r"state 'exp_avg' of params\[0\] is a plain tensor but params\[0\] is a DTensor"):
        opt.step()
    p.grad = None


def test_fsdp2_dtensor_and_plain_groups_and_a_clear_error_for_mismatched_state(tmp_path):
    _launch(tmp_path, _mixed_groups)
