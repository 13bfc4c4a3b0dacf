"""Timing of whole optimizer steps and of the device's copy bandwidth.

GPU: one pair of CUDA events around each step; CPU: time.perf_counter around
each step (every CPU provider is synchronous). Before each timed step the last
level cache is flushed by writing a buffer larger than it, as
triton.testing.do_bench does on GPU: in training the optimizer finds its
tensors cold (the backward pass ran over everything else), and a cache-hot
small tensor would report a bandwidth no step reaches. Results are the median,
p20 and p80 in milliseconds. Used by benchmarks/run.py.
"""
from __future__ import annotations

import glob
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class Timing:
    ms_median: float
    p20: float
    p80: float
    steps: int


def quantile(xs: List[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(ms: List[float]) -> Timing:
    return Timing(statistics.median(ms), quantile(ms, 0.2), quantile(ms, 0.8), len(ms))


def last_level_cache_bytes() -> int:
    """Largest CPU cache this process sees (sysfs), 32 MiB if unknown."""
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        mult = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 * 2 ** 20


class CacheFlusher:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.buf: Optional[torch.Tensor] = None
        if enabled:
            if device.type == "cuda":
                # Above the L2 of any current GPU (H200: 60 MiB).
                nbytes = 256 * 2 ** 20
            else:
                nbytes = 2 * last_level_cache_bytes()
            self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.fill_(1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, flush: CacheFlusher,
               n: int) -> List[float]:
    """Milliseconds of n calls to step, each after a cache flush."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            flush()
            starts[i].record()
            step()
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    out = []
    for _ in range(n):
        flush()
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure(step: Callable[[], None], device: torch.device, flush: CacheFlusher, *,
            warmup: int, min_steps: int, max_steps: int, budget_s: float) -> Timing:
    """Warm up, then time between min_steps and max_steps steps, as many as
    fit in budget_s judged by the warm-up steps."""
    warm = time_steps(step, device, flush, max(warmup, 1))
    est_ms = max(statistics.median(warm), 1e-3)
    n = int(min(max_steps, max(min_steps, budget_s * 1e3 / est_ms)))
    return summarize(time_steps(step, device, flush, n))


def copy_bandwidth_gbps(device: torch.device, numel: int, repeats: int = 15) -> float:
    """GB/s of dst.copy_(src) for numel float32 elements, counting 2 x size
    bytes (read src, write dst). CPUs without streaming stores also read dst
    before writing it, so a kernel that reads every line it writes can exceed
    this figure on CPU."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    flush = CacheFlusher(device, enabled=False)  # the copy is far larger than any cache
    t = measure(lambda: dst.copy_(src), device, flush, warmup=3,
                min_steps=repeats, max_steps=repeats, budget_s=0.0)
    nbytes = 2 * numel * src.element_size()
    del src, dst
    return nbytes / (t.ms_median * 1e-3) / 1e9
