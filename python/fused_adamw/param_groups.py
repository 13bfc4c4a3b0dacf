"""Helpers users otherwise write by hand: which params get weight decay, and
how strong the decay should be for a given training budget.

    from fused_adamw import AdamW, weight_decay_groups, normalized_weight_decay
    lam = normalized_weight_decay(0.05, batch_size=128, dataset_size=50_000, epochs=100)
    opt = AdamW(weight_decay_groups(model.named_parameters(), lam, model=model),
                lr=1e-3, decay_scaling="schedule")

`weight_decay_groups` splits params into a decayed and a non-decayed group
(biases, normalization weights and embeddings are not decayed; the rule is
in its docstring). `normalized_weight_decay` is the paper's normalized weight
decay (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
arXiv:1711.05101v3, Appendix B.1): lambda = lambda_norm * sqrt(b / (B * T)).
Tests: tests/test_param_groups.py.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = ["weight_decay_groups", "normalized_weight_decay", "NO_DECAY_MODULES"]


def _norm_and_embedding_classes() -> tuple:
    nn = torch.nn
    classes = [nn.modules.batchnorm._NormBase,   # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d, lazy ones
               nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Embedding, nn.EmbeddingBag]
    if hasattr(nn, "RMSNorm"):
        classes.append(nn.RMSNorm)
    return tuple(classes)


# Module classes whose own params are never decayed (rule 3 of weight_decay_groups).
NO_DECAY_MODULES: tuple = _norm_and_embedding_classes()

# Names that mark an embedding when no model is given (rule 4): a dotted
# component containing "embed" (embed_tokens, tok_embeddings, pos_embed,
# word_embeddings ...), or GPT-2's wte / wpe.
_EMBEDDING_NAMES = ("wte", "wpe")


def _is_embedding_name(name: str) -> bool:
    return any("embed" in part.lower() or part in _EMBEDDING_NAMES for part in name.split("."))


def weight_decay_groups(named_parameters: Iterable[tuple[str, torch.Tensor]], weight_decay: float, *,
                        model: Optional[torch.nn.Module] = None,
                        no_decay_modules: Sequence[type] = NO_DECAY_MODULES,
                        no_decay: Sequence[str] = (), decay_1d: bool = False,
                        **group_options: Any) -> list[dict[str, Any]]:
    """Param groups for any torch or fused_adamw optimizer: one with
    `weight_decay`, one with weight_decay=0.0.

    named_parameters: (name, param) pairs, as `model.named_parameters()`
    yields them (FSDP2's DTensor params too). Params with requires_grad=False
    are left out, as the optimizer would never update them.

    The rule. A param is NOT decayed when any of these holds, checked in order:
      1. its name matches a pattern of `no_decay` (fnmatch, on the full
         dotted name: "*.pos_embed", "lm_head.*");
      2. its name's last dotted component is "bias" (any shape);
      3. with `model` given: it is an own parameter (not one of a child's) of
         a module that is an instance of a class in `no_decay_modules`;
         by default the normalization layers (BatchNorm*, SyncBatchNorm,
         InstanceNorm*, LayerNorm, GroupNorm, RMSNorm, LocalResponseNorm)
         and the embeddings (Embedding, EmbeddingBag). A param shared by
         several modules (tied weights, such as an embedding tied to the
         output layer) is not decayed if any of its owners says so. The
         modules are matched to the given pairs by param identity, so the
         names may come from any prefix or wrapper;
      4. without `model`: a dotted component of its name contains "embed"
         (case-insensitive) or is "wte" or "wpe" (GPT-2's names);
      5. unless `decay_1d=True`: it has at most one dimension (norm scales
         and shifts, biases, per-channel scales, scalars, whatever their
         names or module classes; for a DTensor its global shape counts).
    Every other param is decayed: the weights of linear, convolution and
    attention projections, and any other tensor of two or more dimensions.

    Returns the groups that have params, decayed first:
    [{"params": [...], "weight_decay": weight_decay, **group_options},
     {"params": [...], "weight_decay": 0.0, **group_options}],
    the params in the order given. `group_options` (lr=..., say) go into both.
    """
    if not isinstance(weight_decay, (int, float)) or isinstance(weight_decay, bool) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    owners: dict[int, bool] = {}
    if model is not None:
        classes = tuple(no_decay_modules)
        for module in model.modules():
            excluded = isinstance(module, classes)
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), False) or excluded
    decay, keep = [], []
    seen: set[int] = set()
    for item in named_parameters:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise TypeError("weight_decay_groups takes (name, param) pairs, as model.named_parameters() yields "
                            f"them; got {type(item).__name__}")
        name, p = item
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(p).__name__}, expected a tensor")
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if model is not None and id(p) not in owners:
            raise ValueError(f"{name!r} is not a parameter of the given model")
        excluded = (any(fnmatch.fnmatchcase(name, pat) for pat in no_decay)
                    or name.rsplit(".", 1)[-1] == "bias"
                    or (owners[id(p)] if model is not None else _is_embedding_name(name))
                    or (not decay_1d and p.dim() <= 1))
        (keep if excluded else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay), **group_options})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0, **group_options})
    if not groups:
        raise ValueError("weight_decay_groups got no parameters that require grad")
    return groups


def normalized_weight_decay(weight_decay_norm: float, *, batch_size: int, dataset_size: int, epochs: float,
                            lr: Optional[float] = None) -> float:
    """The paper's normalized weight decay: the decay per step for a training
    budget, from one normalized value.

        lambda = lambda_norm * sqrt(b / (B * T))

    b: the batch size, B: the number of training points, T: the number of
    epochs (Loshchilov & Hutter, arXiv:1711.05101v3, Appendix B.1,
    "Normalized weight decay"; the copy of the paper in this project's
    shared/paper lacks the appendices, so the formula is cited from the arXiv
    version). B * T / b is the number of steps: the more updates a run
    makes, the smaller its best decay per step, which is the paper's
    observation that the optimal weight decay depends on the total number of
    batch passes (its Introduction). lambda_norm is then the decay a run of a
    single batch pass would use, and it transfers across budgets.

    Returns the paper's lambda: the `weight_decay` of this package's
    decay_scaling="schedule" (p <- p * (1 - eta_t * lambda); Algorithm 2,
    line 12). With `lr` (the base lr alpha) it returns lambda / lr instead,
    the weight_decay of torch's convention (decay_scaling="lr",
    p <- p * (1 - lr_t * weight_decay)) that decays by lambda per step at
    lr_t = alpha. For warm restarts the paper's T is the length in epochs
    of the run the decay is meant for (with restarts, one could use each
    period's length); this helper does not guess.
    """
    for what, v in (("weight_decay_norm", weight_decay_norm), ("epochs", epochs)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{what} must be a finite number, got {v!r}")
    for what, v in (("batch_size", batch_size), ("dataset_size", dataset_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    if weight_decay_norm < 0:
        raise ValueError(f"weight_decay_norm must be >= 0, got {weight_decay_norm}")
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    if batch_size > dataset_size:
        raise ValueError(f"batch_size={batch_size} is larger than dataset_size={dataset_size}")
    lam = weight_decay_norm * math.sqrt(batch_size / (dataset_size * epochs))
    if lr is None:
        return lam
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    return lam / lr
