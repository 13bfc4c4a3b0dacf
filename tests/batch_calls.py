"""Calling a backend module directly, as the plan does, from tensor lists.

The backends take a validated fused_adamw.plan.Batch (hyper.py's contract);
the kernel-level tests (test_cpu_native.py, test_triton_kernels.py,
test_adam_cuda.py) hold lists of tensors. These helpers build the batch, or
reuse the one kept in `cache` while the tensors are the same objects (then
only addresses are refreshed, as the plan does between steps), and pass a
tensor lr as hyper.lr.
"""
from __future__ import annotations

import operator
from dataclasses import replace

from fused_adamw.plan import Batch


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _batch(cache, key, lists, make):
    entry = cache.get(key) if cache is not None else None
    # Grads (lists[1]) may be new tensors each step; everything else must be the
    # same tensors, and the params at the same addresses (a param moved through
    # .data makes a new batch, as the plan rebuilds for it).
    ptrs = [p.data_ptr() for p in lists[0]]
    if (entry is not None and entry[2] == ptrs
            and all(_same(x, y) for k, (x, y) in enumerate(zip(entry[0], lists)) if k != 1)):
        batch = entry[1]
        batch.set_grads(list(lists[1]))
        return batch
    batch = make()
    if cache is not None:
        cache[key] = (tuple(list(x) if x is not None else None for x in lists), batch, ptrs)
    return batch


def adam_call(module, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper, *,
              lr_tensor=None, grad_scale=None, found_inf=None, cache=None):
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    batch = _batch(cache, "adam", lists, lambda: Batch.adam(*lists))
    if lr_tensor is not None:
        hyper = replace(hyper, lr=lr_tensor)
    module.adam_step(batch, hyper, grad_scale=grad_scale, found_inf=found_inf)
    return batch


def sgd_call(module, params, grads, momentum_buffers, first_step, hyper, *,
             lr_tensor=None, grad_scale=None, found_inf=None, cache=None):
    lists = (params, grads, momentum_buffers)
    batch = _batch(cache, "sgd", lists, lambda: Batch.sgd(params, grads, momentum_buffers, first_step))
    if list(batch.first_step) != [bool(f) for f in first_step]:
        batch.set_first_step([bool(f) for f in first_step])
    if lr_tensor is not None:
        hyper = replace(hyper, lr=lr_tensor)
    module.sgd_step(batch, hyper, grad_scale=grad_scale, found_inf=found_inf)
    return batch
