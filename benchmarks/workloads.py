"""Benchmark workloads: the parameter lists an optimizer step runs over.

A workload is a list of tensor shapes. Real models are described by their
parameter shapes only (no weights are downloaded): the harness allocates
torch.empty tensors of these shapes and fills them with random data
(make_tensors). Used by benchmarks/run.py; see benchmarks/README.md.

Shapes follow the models' reference definitions:
  gpt2        GPT-2 small (124M; Radford et al. 2019, the Hugging Face layout,
              lm_head tied to wte so it is not a separate parameter)
  llama-4blk  4 Llama-style decoder blocks at Llama-3.2-1B widths (dim 2048,
              32 heads, 8 KV heads, SwiGLU hidden 8192, RMSNorm weights; no
              embeddings): many large matrices of unequal size
  resnet50    torchvision's ResNet-50 (He et al. 2016, v1.5): 161 tensors,
              most of them small (BatchNorm weights and biases)
plus synthetic lists: 4x16M (4 tensors of 2**24; the CPU speed target),
2000x16K and 20000x1K (many small tensors: launch and per-tensor overhead),
and single-2^k (one tensor of 2**k elements, the size sweep).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: Tuple[Shape, ...]
    # "single" for the one-tensor size sweep (plotted as GB/s against size),
    # "model" for everything else (plotted as speedup per workload).
    kind: str = "model"

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257,
                n_ctx: int = 1024) -> List[Shape]:
    shapes: List[Shape] = [(vocab, d), (n_ctx, d)]  # wte, wpe
    for _ in range(n_layer):
        shapes += [
            (d,), (d,),                  # ln_1 weight, bias
            (d, 3 * d), (3 * d,),        # attn.c_attn (Conv1D: in x out)
            (d, d), (d,),                # attn.c_proj
            (d,), (d,),                  # ln_2
            (d, 4 * d), (4 * d,),        # mlp.c_fc
            (4 * d, d), (d,),            # mlp.c_proj
        ]
    shapes += [(d,), (d,)]               # ln_f
    return shapes


def llama_shapes(n_blocks: int = 4, dim: int = 2048, n_heads: int = 32,
                 n_kv_heads: int = 8, hidden: int = 8192) -> List[Shape]:
    kv_dim = dim // n_heads * n_kv_heads
    shapes: List[Shape] = []
    for _ in range(n_blocks):
        shapes += [
            (dim,),                      # attention RMSNorm weight
            (dim, dim), (kv_dim, dim), (kv_dim, dim), (dim, dim),  # wq wk wv wo
            (dim,),                      # MLP RMSNorm weight
            (hidden, dim), (hidden, dim), (dim, hidden),  # gate, up, down
        ]
    return shapes


def resnet50_shapes(layers: Sequence[int] = (3, 4, 6, 3),
                    n_classes: int = 1000) -> List[Shape]:
    def conv_bn(c_out: int, c_in: int, k: int) -> List[Shape]:
        return [(c_out, c_in, k, k), (c_out,), (c_out,)]

    shapes = conv_bn(64, 3, 7)
    c_in = 64
    for stage, n_blocks in enumerate(layers):
        width = 64 * 2 ** stage
        for block in range(n_blocks):
            shapes += conv_bn(width, c_in, 1)
            shapes += conv_bn(width, width, 3)
            shapes += conv_bn(4 * width, width, 1)
            if block == 0:  # projection shortcut
                shapes += conv_bn(4 * width, c_in, 1)
            c_in = 4 * width
    shapes += [(n_classes, c_in), (n_classes,)]
    return shapes


_MODELS: Dict[str, Callable[[], List[Shape]]] = {
    "gpt2": gpt2_shapes,
    "llama-4blk": llama_shapes,
    "resnet50": resnet50_shapes,
    "4x16M": lambda: [(2 ** 24,)] * 4,
    "2000x16K": lambda: [(16384,)] * 2000,
    "20000x1K": lambda: [(1024,)] * 20000,
}

MODEL_NAMES = tuple(_MODELS)
SINGLE = "single"


def single(exponent: int) -> Workload:
    return Workload(f"single-2^{exponent}", ((2 ** exponent,),), kind="single")


def model(name: str) -> Workload:
    if name not in _MODELS:
        raise ValueError(f"unknown workload {name!r}; known: {SINGLE}, {', '.join(MODEL_NAMES)}")
    return Workload(name, tuple(_MODELS[name]()))


def resolve(names: Sequence[str], exponents: Sequence[int]) -> List[Workload]:
    """Expand workload names ("single" becomes one workload per exponent)."""
    out: List[Workload] = []
    for name in names:
        if name == SINGLE:
            out += [single(e) for e in exponents]
        else:
            out.append(model(name))
    return out


def fill_param_(t: torch.Tensor, gen: torch.Generator) -> None:
    # Init-like scale: at |p| ~ 0.1 a bf16 ulp (2**-10) is ten times smaller
    # than the update (~lr = 1e-2), so the correctness check can tell a wrong
    # learning rate from rounding even in bf16.
    t.copy_(torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32).mul_(0.1))


def fill_grad_(t: torch.Tensor, gen: torch.Generator) -> None:
    # |g| >= 0.25 keeps (1 - beta2) * g**2 above fp16's smallest normal
    # number, so fp16 exp_avg_sq is not a pile of subnormals that every
    # implementation rounds differently.
    g = torch.randn(t.shape, generator=gen, device=t.device, dtype=torch.float32)
    g.add_(torch.copysign(torch.full_like(g, 0.25), g))
    t.copy_(g)


def make_tensors(workload: Workload, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Params (leaf tensors with requires_grad) and their grads, random-filled.

    The same seed gives every provider the same data.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params, grads = [], []
    for shape in workload.shapes:
        p = torch.empty(shape, device=device, dtype=dtype)
        g = torch.empty(shape, device=device, dtype=dtype)
        fill_param_(p, gen)
        fill_grad_(g, gen)
        p.requires_grad_(True)
        p.grad = g
        params.append(p)
        grads.append(g)
    return params, grads


def refill_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], seed: int = 0) -> None:
    """Refill params and grads in place with make_tensors' data for seed and
    re-attach the grads. The providers of a workload share one set of tensors;
    after a provider failed its check (it may have written NaN or replaced a
    grad) the next one starts from clean data."""
    gen = torch.Generator(device=params[0].device if params else "cpu")
    gen.manual_seed(seed)
    with torch.no_grad():
        for p, g in zip(params, grads):
            fill_param_(p, gen)
            fill_grad_(g, gen)
            p.grad = g
