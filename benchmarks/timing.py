"""Timing of whole optimizer steps and of the device's copy bandwidth.

GPU: one pair of CUDA events around each step; CPU: time.perf_counter around
each step (every CPU provider is synchronous). Before each timed step the last
level cache is flushed by writing a buffer larger than it, as
triton.testing.do_bench does on GPU: in training the optimizer finds its
tensors cold (the backward pass ran over everything else), and a cache-hot
small tensor would report a bandwidth no step reaches.

The providers of one workload are measured interleaved (measure_interleaved):
a round runs a few steps of each provider in turn (round-robin, the starting
provider rotating from round to round), and the rounds repeat, so a neighbour
that loads the machine for a while slows every provider alike instead of the
one that happened to run then. Each round gives one median per provider; a
row reports the median over rounds and the spread p20..p80 over rounds, and
the speedup is taken round by round (same round, same machine state).

Row time cap: the steps per round are planned from a warm-up step so that a
row's timed steps take about row_seconds in all. A provider leaves the
rounds once its timed steps have taken CAP_SLACK x row_seconds, or when
another round would take it past that and it has MIN_ROUNDS rounds; it
always runs at least one round. So a row's timed steps take at most about
CAP_SLACK x row_seconds plus one round; a provider whose single step is
slower than that gets one or two rounds, and the row says so.

Busy rule (busy_reason): a row is flagged "busy?" when its spread over rounds
says the machine was loaded, p80/p20 > BUSY_SPREAD of its milliseconds or of
its speedup, or when other processes used more than BUSY_OTHERS_CPU cores of
this process's CPUs during the workload's timed rounds (LoadMeter, from
/proc/stat; catches a load steady enough to leave no spread). On an idle
machine the round-to-round spread stays within a few percent. Used by
benchmarks/run.py.
"""
from __future__ import annotations

import glob
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    """One provider alone: warm up, then time between min_steps and max_steps
    steps, as many as fit in budget_s judged by the warm-up steps."""
    warm = time_steps(step, device, flush, max(warmup, 1))
    est_ms = max(statistics.median(warm), 1e-3)
    n = int(min(max_steps, max(min_steps, budget_s * 1e3 / est_ms)))
    return summarize(time_steps(step, device, flush, n))


# ---------------------------------------------------------------- interleaved

MIN_ROUNDS = 3
CAP_SLACK = 1.5
BUSY_SPREAD = 1.5
BUSY_OTHERS_CPU = 0.25


@dataclass
class Interleaved:
    """What measure_interleaved measured, per provider name."""
    round_ms: Dict[str, List[float]]      # one median per round it took part in (rounds 0, 1, ...)
    step_ms: Dict[str, List[float]]       # every timed step
    steps_per_round: Dict[str, int]
    timed_s: Dict[str, float]             # wall time of the timed steps (flushes included)
    warmup_s: Dict[str, float]
    planned_rounds: int
    errors: Dict[str, BaseException] = field(default_factory=dict)
    order: List[Tuple[int, str]] = field(default_factory=list)  # (round, provider) as run

    @property
    def rounds(self) -> int:
        """Rounds run (by the provider that ran most)."""
        return max((len(v) for v in self.round_ms.values()), default=0)

    def capped(self, name: str) -> bool:
        """True when the row cap (or an error) stopped this provider early."""
        return len(self.round_ms[name]) < self.planned_rounds


def round_order(names: Sequence[str], r: int) -> List[str]:
    """Round r runs the providers in turn starting from the (r mod n)-th, so
    no provider always runs first or always right after the same one."""
    names = list(names)
    if not names:
        return []
    k = r % len(names)
    return names[k:] + names[:k]


def steps_per_round(est_step_s: float, row_seconds: float, rounds: int, max_steps: int) -> int:
    """Steps one provider takes per round: as many as make its row's timed
    steps last row_seconds over `rounds` rounds (est_step_s: wall time of one
    step, flush included), at least 1, at most max_steps over all rounds."""
    fit = int(row_seconds / (rounds * max(est_step_s, 1e-9)))
    return max(1, min(fit, max(1, max_steps // rounds)))


def takes_part(timed_s: float, r: int, cap_s: float) -> bool:
    """Whether a provider whose timed steps took timed_s over rounds 0..r-1
    runs round r under the row cap cap_s (module docstring)."""
    if r == 0:
        return True
    if timed_s > cap_s:
        return False
    return r < MIN_ROUNDS or timed_s * (r + 1) / r <= cap_s


def measure_interleaved(steps: Dict[str, Callable[[], None]], device: torch.device,
                        flush: CacheFlusher, *, rounds: int, row_seconds: float,
                        max_steps: int, warmup: int = 2,
                        step_hint_s: Optional[Dict[str, float]] = None,
                        clock: Callable[[], float] = time.perf_counter) -> Interleaved:
    """Time the providers of one workload interleaved (see the module
    docstring). steps maps provider name to its step function; step_hint_s,
    seconds per step already seen (the correctness check's steps): a
    provider slower than row_seconds / 2 gets no warm-up step. A provider
    whose step raises leaves the rounds; its exception is in .errors and its
    completed rounds stay."""
    rounds = max(rounds, MIN_ROUNDS)
    cap_s = CAP_SLACK * row_seconds
    names = list(steps)
    res = Interleaved({n: [] for n in names}, {n: [] for n in names}, {}, {n: 0.0 for n in names},
                      {n: 0.0 for n in names}, rounds)
    active = []
    for n in names:
        t0 = clock()
        try:
            hint = (step_hint_s or {}).get(n)
            if hint is not None and hint > row_seconds / 2:
                est = hint  # slow: the check's steps were the warm-up
            else:
                time_steps(steps[n], device, flush, 1)
                est = clock() - t0
                # More warm-up steps only where they are cheap.
                if warmup > 1 and est < row_seconds / (2 * rounds):
                    t1 = clock()
                    time_steps(steps[n], device, flush, warmup - 1)
                    est = (clock() - t1) / (warmup - 1)
        except Exception as e:  # noqa: BLE001 - reported per provider by the caller
            res.errors[n] = e
            continue
        finally:
            res.warmup_s[n] = clock() - t0
        res.steps_per_round[n] = steps_per_round(est, row_seconds, rounds, max_steps)
        active.append(n)

    for r in range(rounds):
        active = [n for n in active if takes_part(res.timed_s[n], r, cap_s)]
        if not active:
            break
        for n in round_order(active, r):
            res.order.append((r, n))
            t0 = clock()
            try:
                ms = time_steps(steps[n], device, flush, res.steps_per_round[n])
            except Exception as e:  # noqa: BLE001 - e.g. out of memory in one provider
                res.errors[n] = e
                active.remove(n)
                continue
            finally:
                res.timed_s[n] += clock() - t0
            res.round_ms[n].append(statistics.median(ms))
            res.step_ms[n] += ms
    return res


def spread(xs: Sequence[float]) -> Optional[float]:
    """p80 / p20 of xs (None for fewer than two values or a p20 of 0)."""
    if len(xs) < 2:
        return None
    lo = quantile(list(xs), 0.2)
    return quantile(list(xs), 0.8) / lo if lo > 0 else None


def busy_reason(round_ms: Sequence[float], speedup_rounds: Sequence[float] = (),
                others_cpu: Optional[float] = None) -> str:
    """Why a row looks measured on a loaded machine, or "" (module docstring)."""
    why = []
    if len(round_ms) < MIN_ROUNDS:
        why.append(f"only {len(round_ms)} round(s) within the row cap: no spread to judge")
    s = spread(round_ms)
    if s is not None and s > BUSY_SPREAD:
        why.append(f"ms p80/p20 over rounds {s:.2f} > {BUSY_SPREAD}")
    s = spread(speedup_rounds)
    if s is not None and s > BUSY_SPREAD:
        why.append(f"speedup p80/p20 over rounds {s:.2f} > {BUSY_SPREAD}")
    if others_cpu is not None and others_cpu > BUSY_OTHERS_CPU:
        why.append(f"other processes used {others_cpu:.2f} cores > {BUSY_OTHERS_CPU}")
    return "; ".join(why)


class LoadMeter:
    """CPU time that other processes (and the hypervisor, as steal time) took
    on this process's CPUs between start() and stop(), in cores: the busy
    jiffies of those CPUs in /proc/stat minus this process's own CPU time,
    over the wall time. None where /proc/stat is not readable (not Linux)."""

    def __init__(self) -> None:
        try:
            self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        except (AttributeError, OSError):
            self.cpus = set()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start: Optional[Tuple[float, float, float]] = None

    def _busy_s(self) -> Optional[float]:
        try:
            with open("/proc/stat") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        busy = 0
        seen = False
        for line in lines:
            parts = line.split()
            if parts and parts[0] in self.cpus:
                # user nice system idle iowait irq softirq steal (guest is inside user)
                v = [int(x) for x in parts[1:9]]
                busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
                seen = True
        return busy / self.tick if seen else None

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system

    def start(self) -> None:
        self._start = (time.monotonic(), self._busy_s(), self._own_s())

    def stop(self) -> Optional[float]:
        if self._start is None or self._start[1] is None:
            return None
        wall0, busy0, own0 = self._start
        busy1 = self._busy_s()
        wall = time.monotonic() - wall0
        if busy1 is None or wall <= 0:
            return None
        # Ticks are 10 ms: clamp what the rounding leaves outside 0..CPUs.
        others = max(0.0, (busy1 - busy0) - (self._own_s() - own0)) / wall
        return min(others, float(len(self.cpus)))


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
