"""Training experiment of issue 12: does a small transformer language model
train as well with bf16 params (round to nearest, stochastic rounding, Kahan
summation, master weights) or bf16 optimizer state as with fp32 params and
state, and how many bytes per param does each option keep?

Setting. A decoder-only transformer (pre-LayerNorm GPT blocks, learned
positions, untied output layer; by default 4 layers, d_model 256, 4 heads,
context 128: 3.3M params) over bytes (vocabulary 256), trained on the
top-level .py files of this Python's standard library
(sysconfig.get_paths()["stdlib"]/*.py, sorted by name, concatenated; read
from disk, so the same bytes on every run with this Python: results.json
records their count and SHA-256). The last 10% of the bytes (the files at
the end of the alphabet) are the held-out set. Every run starts from the
same fp32 init (torch.manual_seed; bf16 runs round it to nearest once) and
sees the same batches (offsets drawn once from a seeded generator). AdamW
with nanoGPT's shakespeare_char settings (lr 1e-3, betas (0.9, 0.99),
weight decay 0.1 on the matrices of linear layers, none on embeddings,
LayerNorms and biases: fused_adamw.weight_decay_groups), a linear warmup
then a cosine down to lr / 10 (torch's LambdaLR), batch 16 x 128 tokens.
bf16 runs keep the whole model in bf16 (model.to(torch.bfloat16)): forward
and backward in bf16, bf16 grads; the cross-entropy is computed in fp32 from
the logits. All fused_adamw runs use the C++ CPU kernels (backend="cpu").

Runs (RUNS below): fused_adamw AdamW fp32 (the baseline), bf16 params with
round to nearest (bf16 state), with stochastic_rounding, kahan_summation,
master_weights, and fp32 params with state_dtype=torch.bfloat16; and, when
named in --runs, torch.optim.AdamW fp32, the baseline's math in another
rounding order: its distance to the baseline is the size of a difference
that float rounding alone makes.

What is counted as memory. "state B/param" is the sum of nbytes of every
tensor in opt.state (exp_avg, exp_avg_sq, master_param, kahan_comp and the
float32 scalar step of each param tensor) divided by the number of params;
"params + state B/param" adds the params' own nbytes. Grads (param dtype),
activations and the plans' small address tables are not counted.

Run from the repository root (the default, 6 runs in 2 processes, took 14.3 min
on 2 cores shared with compiles and test runs, load average about 7;
benchmarks/results/precision-lm/COMMAND.txt):
  python benchmarks/precision_lm.py                 # the six runs -> benchmarks/results/precision-lm/
  python benchmarks/precision_lm.py --runs torch-fp32   # adds the torch.optim reference to DIR
  python benchmarks/precision_lm.py --seed 1 --out benchmarks/results/precision-lm/seed-1   # other init + batches
  python benchmarks/precision_lm.py --runs fp32 bf16-rn --steps 50 --out DIR
  python benchmarks/precision_lm.py --replot        # table and figure from DIR/results.json only

Every run is written to DIR/results.json (and DIR/runs/<name>.csv: step,
lr, train loss, eval loss) as soon as it finishes; a rerun with the same
training settings skips the runs already there (--fresh discards them).
Then the script writes, over every run in results.json, DIR/table.md,
DIR/loss_curves.png and DIR/COMMAND.txt (commands, machine, versions, git
commit, wall time). --seed sets the init, the batches and the stochastic
rounding generator's key together.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import datetime
import glob
import hashlib
import json
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import sysconfig
import textwrap
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "precision-lm")

# The runs, in the order of the table and the legend. "params" is the dtype
# the model is trained in; "opt" is "torch" (torch.optim.AdamW) or "fused"
# (fused_adamw.AdamW, backend="cpu"); "kwargs" are the optimizer's issue-12
# options (state_dtype given by name, so the table is JSON).
RUNS: Dict[str, dict] = {
    "torch-fp32": dict(params="float32", opt="torch", kwargs={},
                       title="torch.optim.AdamW, fp32 params + fp32 state (reference)"),
    "fp32": dict(params="float32", opt="fused", kwargs={},
                 title="fp32 params + fp32 state (baseline)"),
    "bf16-rn": dict(params="bfloat16", opt="fused", kwargs={},
                    title="bf16 params, round to nearest (bf16 state)"),
    "bf16-sr": dict(params="bfloat16", opt="fused", kwargs=dict(stochastic_rounding=True),
                    title="bf16 params, stochastic_rounding (bf16 state)"),
    "bf16-kahan": dict(params="bfloat16", opt="fused", kwargs=dict(kahan_summation=True),
                       title="bf16 params, kahan_summation (bf16 state)"),
    "bf16-master": dict(params="bfloat16", opt="fused", kwargs=dict(master_weights=True),
                        title="bf16 params, master_weights (bf16 state)"),
    "fp32-bf16state": dict(params="float32", opt="fused", kwargs=dict(state_dtype="bfloat16"),
                           title="fp32 params, state_dtype=bfloat16"),
}
BASELINE = "fp32"
# The runs the issue asks for; torch-fp32 (the same math in torch.optim, so
# its distance to the baseline is what float rounding order alone does) is
# trained when named in --runs.
DEFAULT_RUNS = [n for n in RUNS if n != "torch-fp32"]

# Settings that change what a run computes; results.json records them and a
# rerun only reuses runs made with the same ones.
TRAIN_DEFAULTS = dict(layers=4, d_model=256, heads=4, context=128, batch_size=16, steps=400,
                      lr=1e-3, min_lr_ratio=0.1, warmup=40, betas=(0.9, 0.99), weight_decay=0.1,
                      eval_every=50, eval_seqs=128, eval_frac=0.1, seed=0)

# "final train loss" is the mean over this many last steps (the batches are
# the same for every run, so the means are paired); one step's loss is noisy.
FINAL_WINDOW = 50
# Trailing moving average of the plotted training loss.
SMOOTH = 20


# ----------------------------------------------------------------- data

_CORPUS: dict = {}


def corpus_files() -> List[str]:
    return sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))


def load_corpus(eval_frac: float):
    """The byte corpus as (train uint8 tensor, eval uint8 tensor, info):
    the top-level stdlib .py files in name order, each followed by a NUL
    byte; the last eval_frac of the bytes are held out."""
    key = eval_frac
    if key not in _CORPUS:
        import torch
        parts = []
        files = corpus_files()
        for path in files:
            with open(path, "rb") as f:
                parts.append(f.read() + b"\0")
        data = b"".join(parts)
        n_eval = int(len(data) * eval_frac)
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        info = dict(source=os.path.join(sysconfig.get_paths()["stdlib"], "*.py"), files=len(files),
                    bytes=len(data), train_bytes=len(data) - n_eval, eval_bytes=n_eval,
                    sha256=hashlib.sha256(data).hexdigest(), python=platform.python_version(),
                    first_eval_file=_file_at(files, parts, len(data) - n_eval))
        _CORPUS[key] = (t[:len(data) - n_eval].clone(), t[len(data) - n_eval:].clone(), info)
    return _CORPUS[key]


def _file_at(files, parts, offset: int) -> str:
    pos = 0
    for path, part in zip(files, parts):
        pos += len(part)
        if pos > offset:
            return os.path.basename(path)
    return ""


def train_offsets(cfg: dict, n_train: int):
    """[steps, batch] start offsets of the training windows: one draw from a
    generator seeded by cfg["seed"], shared by every run."""
    import torch
    gen = torch.Generator().manual_seed(cfg["seed"])
    return torch.randint(0, n_train - cfg["context"] - 1, (cfg["steps"], cfg["batch_size"]), generator=gen)


def windows(data, starts, context: int):
    """Inputs and next-byte targets [len(starts), context] (int64)."""
    import torch
    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


# ---------------------------------------------------------------- model

def build_model(cfg: dict):
    """A GPT-style decoder (pre-LN blocks, causal attention through
    scaled_dot_product_attention, GELU MLP of 4 x d_model, learned positions,
    untied head), GPT-2's init: N(0, 0.02), residual projections
    N(0, 0.02 / sqrt(2 * layers)), zero biases, LayerNorm (1, 0)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    d, h, L, T, V = cfg["d_model"], cfg["heads"], cfg["layers"], cfg["context"], 256

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc, self.fc_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            B, S, _ = x.shape
            q, k, v = self.qkv(self.ln1(x)).view(B, S, 3, h, d // h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(B, S, d))
            return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(V, d), nn.Embedding(T, d)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, V, bias=False)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                elif p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * L) if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
                    nn.init.normal_(p, 0.0, std)

        def forward(self, idx):
            x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
            for b in self.blocks:
                x = b(x)
            return self.head(self.ln_f(x))

    return TinyLM()


def lm_loss(model, x, y):
    """Mean next-byte cross-entropy, computed in fp32 from the logits
    (whatever the model's dtype)."""
    import torch.nn.functional as F
    logits = model(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def make_optimizer(name: str, model, cfg: dict):
    import torch
    import fused_adamw
    spec = RUNS[name]
    groups = fused_adamw.weight_decay_groups(model.named_parameters(), cfg["weight_decay"], model=model)
    common = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]))
    if spec["opt"] == "torch":
        return torch.optim.AdamW(groups, **common)
    kwargs = dict(spec["kwargs"])
    if "state_dtype" in kwargs:
        kwargs["state_dtype"] = getattr(torch, kwargs["state_dtype"])
    if kwargs.get("stochastic_rounding"):
        kwargs["seed"] = cfg["seed"]  # the generator's key; same bits every run
    return fused_adamw.AdamW(groups, backend="cpu", **common, **kwargs)


def lr_factor(step: int, cfg: dict) -> float:
    """Multiplier of the base lr at scheduler step `step` (0-based): linear
    warmup to 1 over cfg["warmup"] steps, then a cosine down to min_lr_ratio
    at the last step."""
    w, n, lo = cfg["warmup"], cfg["steps"], cfg["min_lr_ratio"]
    if step < w:
        return (step + 1) / w
    frac = min(1.0, (step - w) / max(1, n - 1 - w))
    return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))


# ------------------------------------------------------------ accounting

def memory_accounting(opt) -> dict:
    """Bytes the optimizer holds, from the tensors themselves: every tensor
    value of every opt.state entry (per key: dtype and total nbytes), the
    params' nbytes, and the number of param elements."""
    import torch
    params = [p for g in opt.param_groups for p in g["params"]]
    n = sum(p.numel() for p in params)
    by_key: dict = {}
    for st in opt.state.values():
        for k, v in st.items():
            if torch.is_tensor(v):
                e = by_key.setdefault(k, dict(dtypes=set(), bytes=0, tensors=0))
                e["dtypes"].add(str(v.dtype).replace("torch.", ""))
                e["bytes"] += v.nbytes
                e["tensors"] += 1
    state_bytes = sum(e["bytes"] for e in by_key.values())
    param_bytes = sum(p.nbytes for p in params)
    return dict(n_params=n, param_bytes=param_bytes, state_bytes=state_bytes,
                state_bytes_per_param=state_bytes / n, total_bytes_per_param=(state_bytes + param_bytes) / n,
                state_by_key={k: dict(e, dtypes=sorted(e["dtypes"])) for k, e in sorted(by_key.items())})


# -------------------------------------------------------------- training

def evaluate(model, data, cfg: dict) -> float:
    """Mean loss over cfg["eval_seqs"] windows evenly spaced over the held-out
    bytes (the same windows for every run and every evaluation)."""
    import torch
    T = cfg["context"]
    starts = torch.linspace(0, len(data) - T - 2, cfg["eval_seqs"]).long()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(starts), cfg["batch_size"]):
            x, y = windows(data, starts[i:i + cfg["batch_size"]], T)
            total += lm_loss(model, x, y).item() * len(x)
    return total / len(starts)


def train_one(cfg: dict, name: str) -> dict:
    """One run; returns its per-step losses, eval points, memory and times."""
    import torch
    t0 = time.perf_counter()
    spec = RUNS[name]
    train, held_out, _ = load_corpus(cfg["eval_frac"])
    offsets = train_offsets(cfg, len(train))
    torch.manual_seed(cfg["seed"])  # the same fp32 init for every run
    model = build_model(cfg)
    if spec["params"] == "bfloat16":
        model.to(torch.bfloat16)
    opt = make_optimizer(name, model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    params = [p for g in opt.param_groups for p in g["params"]]
    eval_steps = set(range(cfg["eval_every"], cfg["steps"] + 1, cfg["eval_every"])) | {cfg["steps"]}
    train_loss, lrs, evals, unchanged = [], [], [[0, evaluate(model, held_out, cfg)]], []
    opt_seconds = 0.0
    memory = None
    for step in range(cfg["steps"]):
        x, y = windows(train, offsets[step], cfg["context"])
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [p.detach().clone() for p in params] if step + 1 in eval_steps else None
        lrs.append(opt.param_groups[0]["lr"])
        ts = time.perf_counter()
        opt.step()
        opt_seconds += time.perf_counter() - ts
        sched.step()
        train_loss.append(loss.item())
        if memory is None:
            memory = memory_accounting(opt)  # the state exists after the first step
        if before is not None:
            # Elements whose stored value this step left as it was: for bf16
            # params, updates smaller than half a bf16 spacing (lost under
            # round to nearest; kept in the compensation or master copy, or
            # taken with some probability, by the other options).
            same = sum(int((b == p.detach()).sum()) for b, p in zip(before, params))
            unchanged.append([step + 1, same / memory["n_params"]])
            evals.append([step + 1, evaluate(model, held_out, cfg)])
        if not math.isfinite(train_loss[-1]):
            break
    w = train_loss[-FINAL_WINDOW:]
    return dict(train_loss=train_loss, lr=lrs, eval=evals, unchanged_fraction=unchanged,
                final_train_loss=sum(w) / len(w), final_eval_loss=evals[-1][1], steps_done=len(train_loss),
                memory=memory, seconds=time.perf_counter() - t0, opt_step_seconds=opt_seconds,
                threads=torch.get_num_threads(), package=package_info())


def _init_worker() -> None:
    # One thread per process and one process per core (as paper_figure.py):
    # small matmuls scale better across processes than threads, and a run's
    # numbers do not depend on how many threads split its reductions.
    import torch
    torch.set_num_threads(1)


def _work(args):
    cfg, name = args
    return name, train_one(cfg, name)


# ------------------------------------------------------------ bookkeeping

def package_info() -> dict:
    """Which fused_adamw the run imported: its folder and a SHA-256 over its
    .py and native module files, so runs made with different versions of the
    package (the options were being written while this script was) are told
    apart."""
    import fused_adamw
    folder = os.path.dirname(fused_adamw.__file__)
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "*.py")) + glob.glob(os.path.join(folder, "*.so"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return dict(folder=folder, sha256=h.hexdigest()[:16])


def _json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_json_safe(obj), f, indent=1, sort_keys=True, allow_nan=False)
    os.replace(tmp, path)


def write_run_csv(out: str, name: str, run: dict) -> str:
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    path = os.path.join(out, "runs", f"{name}.csv")
    evals = {s: v for s, v in run["eval"]}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "train_loss", "eval_loss"])
        # Row 0 is the init's eval loss; row s the loss of step s's batch
        # (before its update), the lr it used, the eval loss after it.
        w.writerow([0, "", "", f"{evals[0]:.6f}"])
        for i, (lr, loss) in enumerate(zip(run["lr"], run["train_loss"]), start=1):
            w.writerow([i, f"{lr:.6g}", f"{loss:.6f}", f"{evals[i]:.6f}" if i in evals else ""])
    return path


def environment(argv: Sequence[str]) -> dict:
    import torch
    cpu = platform.processor() or ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = sorted(l[3:] for l in dirty if l.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return dict(git_commit=commit, git_modified_tracked_files=dirty, cpu_model=cpu, cpu_count=os.cpu_count(),
                torch_version=torch.__version__, python=platform.python_version(), package=package_info(),
                utc_time=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/precision_lm.py", *argv]))


# ---------------------------------------------------------------- output

SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16"}


def fmt_state(run: dict) -> str:
    """The state's keys grouped by dtype ("exp_avg, exp_avg_sq bf16;
    master_param fp32"); the float32 step scalars are left out."""
    by_dtype: dict = {}
    for k, e in run["memory"]["state_by_key"].items():
        if k != "step":
            by_dtype.setdefault("/".join(SHORT_DTYPE.get(d, d) for d in e["dtypes"]), []).append(k)
    return "; ".join(f"{', '.join(ks)} {d}" for d, ks in by_dtype.items())


def table(results: dict, names: Sequence[str]) -> str:
    runs = results["runs"]
    base = runs.get(BASELINE)
    lines = ["| run | params | optimizer state (dtypes) | final train loss | final eval loss "
             "| eval vs baseline | state B/param | params + state B/param | run time s | opt.step ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        r = runs[name]
        d = f"{r['final_eval_loss'] - base['final_eval_loss']:+.4f}" if base else ""
        m = r["memory"]
        lines.append(f"| {name}: {RUNS[name]['title']} | {SHORT_DTYPE[RUNS[name]['params']]} "
                     f"| {fmt_state(r)} | {r['final_train_loss']:.4f} | {r['final_eval_loss']:.4f} | {d} "
                     f"| {m['state_bytes_per_param']:.2f} | {m['total_bytes_per_param']:.2f} "
                     f"| {r['seconds']:.0f} | {1e3 * r['opt_step_seconds'] / r['steps_done']:.1f} |")
    return "\n".join(lines)


def describe(cfg: dict, corpus: dict, n_params: Optional[int]) -> str:
    return (f"byte-level GPT, {cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['heads']} heads, "
            f"context {cfg['context']}" + (f", {n_params / 1e6:.2f}M params" if n_params else "")
            + f"; {cfg['steps']} steps of {cfg['batch_size']} x {cfg['context']} tokens; AdamW lr {cfg['lr']:g}, "
            f"betas {tuple(cfg['betas'])}, wd {cfg['weight_decay']:g} (matrices), warmup {cfg['warmup']} "
            f"+ cosine to {cfg['min_lr_ratio']:g} x lr; data: {corpus['files']} stdlib .py files, "
            f"{corpus['bytes'] / 1e6:.2f} MB ({corpus['eval_bytes'] / 1e6:.2f} MB held out, from "
            f"{corpus['first_eval_file']} on), sha256 {corpus['sha256'][:12]}")


def smooth(v: Sequence[float], k: int = SMOOTH) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(v):
        acc += x
        if i >= k:
            acc -= v[i - k]
        out.append(acc / min(i + 1, k))
    return out


STYLES = {"torch-fp32": dict(color="0.55", ls=":"), "fp32": dict(color="black", ls="-"),
          "bf16-rn": dict(color="tab:red", ls="-"), "bf16-sr": dict(color="tab:blue", ls="-"),
          "bf16-kahan": dict(color="tab:green", ls="-"), "bf16-master": dict(color="tab:purple", ls="-"),
          "fp32-bf16state": dict(color="tab:orange", ls="--")}


def plot(results: dict, names: Sequence[str], path: str, subtitle: str = "") -> None:
    """Left: the training loss (trailing mean over SMOOTH steps) and the eval
    points of every run, log y. Middle: the last 60% of the steps, each run's
    eval loss minus the baseline's at the same step (its train-loss
    difference, smoothed, as a thin line). Right: the fraction of param
    elements whose stored value the step left unchanged."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = results["runs"]
    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(19, 6.6), gridspec_kw=dict(width_ratios=[1.25, 1.1, 0.8]))
    for name in names:
        r, st = runs[name], STYLES.get(name, {})
        steps = range(1, len(r["train_loss"]) + 1)
        ax.plot(steps, smooth(r["train_loss"]), lw=1.3, label=f"{name}: {RUNS[name]['title']}", **st)
        ex, ey = zip(*r["eval"])
        ax.plot(ex, ey, "o", ms=4.5, color=st.get("color"), mfc="white")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"training loss (trailing mean of {SMOOTH} steps) and held-out loss (circles)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    base = runs.get(BASELINE)
    if base:
        n = len(base["train_loss"])
        start = int(0.4 * n)
        sb = smooth(base["train_loss"])
        for name in names:
            r, st = runs[name], STYLES.get(name, {})
            sr = smooth(r["train_loss"])
            m = min(len(sr), len(sb))
            ax2.plot(range(start + 1, m + 1), [sr[i] - sb[i] for i in range(start, m)], lw=0.8, alpha=0.6,
                     color=st.get("color"), ls=st.get("ls", "-"))
            be = dict(base["eval"])
            pts = [(s, v - be[s]) for s, v in r["eval"] if s in be and s > start]
            if pts:
                ax2.plot(*zip(*pts), marker="o", ms=5, lw=1.5, label=name, **st)
        ax2.axhline(0.0, color="black", lw=0.8)
        ax2.set_xlabel("step")
        ax2.set_ylabel(f"loss minus {BASELINE} baseline's")
        ax2.set_title("difference to the baseline, last 60% of steps\n"
                      "(circles: held-out loss; thin lines: smoothed training loss)")
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
    for name in names:
        pts = runs[name].get("unchanged_fraction")
        if pts:
            ax3.plot(*zip(*[(s, 100 * v) for s, v in pts]), marker="o", ms=4, lw=1.2, label=name,
                     **STYLES.get(name, {}))
    ax3.set_xlabel("step")
    ax3.set_ylabel("% of param elements")
    ax3.set_ylim(bottom=0)
    ax3.set_title("param elements whose stored value\nthe step at that point left unchanged")
    ax3.grid(True, alpha=0.3)
    ax3.legend(fontsize=8)
    fig.suptitle("Issue 12: bf16 params and bf16 optimizer state on a small byte-level transformer LM\n"
                 + "\n".join(textwrap.wrap(subtitle, 200)), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def command_txt(results: dict, names: Sequence[str], table_md: str) -> str:
    envs = results.get("environments", [])
    last = envs[-1] if envs else {}
    pkgs = sorted({(n, results["runs"][n]["package"]["sha256"]) for n in names}, key=lambda t: t[0])
    lines = ["commands (from the repository root), in order, with their start (UTC):"]
    lines += [f"  {e.get('command', '')}    # {e.get('utc_time', '')}" for e in envs]
    lines += [f"wall time of each command that trained runs: {results.get('wall_seconds', [])} s",
             f"git HEAD: {last.get('git_commit')}; tracked files modified in the working tree: "
             f"{', '.join(last.get('git_modified_tracked_files') or []) or 'none'}",
             f"fused_adamw imported from {last.get('package', {}).get('folder')}; package digest per run "
             "(sha256 of its .py and .so files, first 16 hex digits): "
             + ", ".join(f"{n} {h}" for n, h in pkgs),
             f"machine: {last.get('cpu_model')} (lscpu 'Model name'), {last.get('cpu_count')} cores shared with "
             "other jobs; each run in its own process with 1 thread",
             f"software: Python {last.get('python')}, torch {last.get('torch_version')}",
             "data: " + json.dumps(results.get("corpus", {})),
             "settings: " + json.dumps(results["train_cfg"], sort_keys=True),
             "files: results.json (every run: per-step train loss and lr, eval points, memory by state key, "
             "times, package digest; the environments), runs/<run>.csv (step, lr, train_loss, eval_loss), "
             "table.md, loss_curves.png, stdout.log (stdout of the command), COMMAND.txt (this file)",
             "", table_md]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS),
                    help="runs to train (default: %(default)s); the table and figure show every run "
                         "in DIR/results.json")
    for k, v in TRAIN_DEFAULTS.items():
        if k == "betas":
            ap.add_argument("--betas", type=float, nargs=2, default=list(v))
        else:
            ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="processes of 1 thread each (1 = in this process)")
    ap.add_argument("--fresh", action="store_true", help="discard DIR/results.json instead of resuming")
    ap.add_argument("--replot", action="store_true", help="only write the table and figure from DIR/results.json")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    train_cfg = {k: getattr(args, k) for k in TRAIN_DEFAULTS}
    train_cfg["betas"] = list(train_cfg["betas"])
    results = None
    if os.path.exists(path) and not args.fresh:
        with open(path) as f:
            results = json.load(f)
        if results.get("train_cfg") != train_cfg:
            if args.replot:
                train_cfg = results["train_cfg"]
            else:
                sys.exit(f"{path} holds runs made with {results.get('train_cfg')}, not {train_cfg}: "
                         "pass the same settings to resume, or --fresh, or another --out")
    if results is None:
        if args.replot:
            sys.exit(f"--replot: no {path}")
        results = dict(train_cfg=train_cfg, runs={})
    results["corpus"] = load_corpus(train_cfg["eval_frac"])[2]
    if not args.replot:
        results.setdefault("environments", []).append(environment(argv_list))
    todo = [n for n in args.runs if n not in results["runs"]]
    t0 = time.perf_counter()
    trained = 0
    if todo and not args.replot:
        print(f"{len(todo)} of {len(args.runs)} runs to train ({len(args.runs) - len(todo)} already in {path}); "
              f"{args.workers} worker(s)", flush=True)

        def record(name, res):
            nonlocal trained
            results["runs"][name] = dict(RUNS[name], **res)
            write_json_atomic(path, results)
            write_run_csv(args.out, name, results["runs"][name])
            trained += 1
            print(f"  {name:15s} train {res['final_train_loss']:.4f}  eval {res['final_eval_loss']:.4f}  "
                  f"state {res['memory']['state_bytes_per_param']:.2f} B/param  {res['seconds']:.0f} s  "
                  f"(opt.step {1e3 * res['opt_step_seconds'] / res['steps_done']:.1f} ms/step)", flush=True)

        if args.workers <= 1:
            import torch
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the workers; restored for the caller
            try:
                for name in todo:
                    record(name, train_one(train_cfg, name))
            finally:
                torch.set_num_threads(threads)
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked torch state
            with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker) as ex:
                futures = [ex.submit(_work, (train_cfg, n)) for n in todo]
                try:
                    for fut in cf.as_completed(futures):
                        record(*fut.result())
                except KeyboardInterrupt:
                    for fut in futures:
                        fut.cancel()
                    raise
    elapsed = time.perf_counter() - t0
    if trained:
        results.setdefault("wall_seconds", []).append(round(elapsed, 1))
        write_json_atomic(path, results)
    names = [n for n in RUNS if n in results["runs"]]
    n_params = results["runs"][names[0]]["memory"]["n_params"] if names else None
    cfg_line = describe(train_cfg, results["corpus"], n_params)
    md = table(results, names)
    print(cfg_line)
    print(f"trained {trained} runs in {elapsed:.0f} s")
    print(md)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(cfg_line + "\n\n" + md + "\n\n"
                f"final train loss: mean over the last {FINAL_WINDOW} steps (the same batches in every run); "
                "final eval loss: after the last step, on "
                f"{train_cfg['eval_seqs']} x {train_cfg['context']} held-out bytes; state B/param: nbytes of all "
                "tensors in opt.state (moments, master copy, Kahan compensation, step scalars) / params; "
                "params + state adds the params' nbytes (grads not counted); run time: the whole run "
                "(training + evaluations) in a process of 1 thread; opt.step ms/step: time inside opt.step().\n")
    if names:
        with open(os.path.join(args.out, "COMMAND.txt"), "w") as f:
            f.write(command_txt(results, names, md))
    if not args.no_plot and names:
        plot(results, names, os.path.join(args.out, "loss_curves.png"), subtitle=cfg_line)
    return dict(trained=trained, path=path, names=names, results=results)


if __name__ == "__main__":
    main()
