"""Tests of the precision models in fused_adamw.reference (issue 12).

What pins them down:
  * the generator: Philox-4x32-10 against Random123's known-answer vectors,
    the key/counter layout word by word, and Triton's own tl.randint /
    tl.philox (interpreted on CPU, compiled with a GPU) bit for bit;
  * rounding: round-to-nearest-even against torch's conversions bit for bit;
    stochastic rounding exactly (over all 2**16 random values the carry count
    is the dropped fraction) and as a distribution from the generator
    (neighbours only, binomial counts, unbiased mean), specials, determinism;
  * the options: bf16 state, master weights, stochastic rounding and Kahan
    summation over many small Adam/SGD updates against the float64 trajectory.

Run: python -m pytest tests/test_reference_precision.py -q
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from fused_adamw import reference as ref

SEED = 0x5EED_1234_ABCD_0042   # uses both key words
BETAS = (0.9, 0.999)
EPS = 1e-8
BF16_EPS = 2.0 ** -7           # spacing of bfloat16 in [1, 2)

# Random123's kat_vectors for philox4x32 R=10: counter words, key words, output.
# Copied from D. E. Shaw Research's fs123 (core123/ut/ut_philox.cpp), whose
# comment says they are cut and pasted from the kat_vectors file of Random123.
PHILOX4x32_10_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),   # the digits of pi
]


# --- the generator ---------------------------------------------------------

@pytest.mark.parametrize("counter,key,want", PHILOX4x32_10_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, want):
    got = ref.philox4x32(counter, key)
    assert tuple(int(w) for w in got) == want


@pytest.mark.parametrize("name,index", [("PHILOX_M4x32", 0), ("PHILOX_M4x32", 1),
                                        ("PHILOX_W32", 0), ("PHILOX_W32", 1)])
def test_a_wrong_constant_fails_the_known_answers(monkeypatch, name, index):
    consts = list(getattr(ref, name))
    consts[index] ^= 1 << 4
    monkeypatch.setattr(ref, name, tuple(consts))
    for counter, key, want in PHILOX4x32_10_KAT:
        assert tuple(int(w) for w in ref.philox4x32(counter, key)) != want


def test_random_bits_layout():
    """key = (seed lo, seed hi), counter = (element lo, element hi, tensor, step)."""
    elements = np.array([0, 1, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5], dtype=np.uint64)
    got = ref.random_bits(SEED, 77, 3, (5,), elements=elements)
    for i, e in enumerate(elements.tolist()):
        want = ref.philox4x32((e & 0xFFFFFFFF, e >> 32, 3, 77), (SEED & 0xFFFFFFFF, SEED >> 32))
        assert [int(w[i]) for w in got] == [int(w) for w in want]
    # Default element indices: storage order 0..numel-1, shaped like the tensor.
    grid = ref.random_bits(SEED, 77, 3, (2, 3))
    flat = ref.random_bits(SEED, 77, 3, (6,))
    for a, b in zip(grid, flat):
        assert a.shape == (2, 3) and a.dtype == np.uint32
        np.testing.assert_array_equal(a.reshape(-1), b)


def test_random_bits_streams_differ_by_every_counter_word():
    base = ref.random_bits(SEED, 5, 2, (4096,))[0]
    others = [ref.random_bits(SEED, 6, 2, (4096,))[0],          # step
              ref.random_bits(SEED, 5, 3, (4096,))[0],          # tensor
              ref.random_bits(SEED ^ (1 << 40), 5, 2, (4096,))[0],   # seed high word
              ref.random_bits(SEED ^ 1, 5, 2, (4096,))[0]]      # seed low word
    for o in others:
        # Independent 32-bit words agree with probability 2**-32 each.
        assert np.count_nonzero(base == o) <= 2
    np.testing.assert_array_equal(base, ref.random_bits(SEED, 5, 2, (4096,))[0])
    for bad in (dict(seed=-1), dict(seed=2 ** 64), dict(step=2 ** 32), dict(tensor_index=-1)):
        kw = dict(seed=SEED, step=1, tensor_index=0, shape=(3,)) | bad
        with pytest.raises(ValueError):
            ref.random_bits(**kw)


def _triton_device():
    triton = pytest.importorskip("triton")
    if torch.cuda.is_available():
        return triton, "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    return triton, "cpu"


_TRITON_KERNELS = {}


def _kernels():
    """Two tiny kernels, defined on first use (Triton reads TRITON_INTERPRET then)."""
    if _TRITON_KERNELS:
        return _TRITON_KERNELS["randint"], _TRITON_KERNELS["philox"]
    import triton
    import triton.language as tl

    @triton.jit
    def _randint(out_ptr, seed, base, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.randint(seed, offs.to(tl.int64) + base)
        tl.store(out_ptr + offs, x.to(tl.int32, bitcast=True), mask=offs < n)

    @triton.jit
    def _philox(out_ptr, seed, base, tensor_index, step, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        e = offs.to(tl.int64) + base
        lo = e.to(tl.uint32)
        hi = (e >> 32).to(tl.uint32)
        zero = lo * 0
        w0, w1, w2, w3 = tl.philox(seed, lo, hi, zero + tensor_index, zero + step)
        m = offs < n
        tl.store(out_ptr + 4 * offs + 0, w0.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + 4 * offs + 1, w1.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + 4 * offs + 2, w2.to(tl.int32, bitcast=True), mask=m)
        tl.store(out_ptr + 4 * offs + 3, w3.to(tl.int32, bitcast=True), mask=m)

    _TRITON_KERNELS.update(randint=_randint, philox=_philox)
    return _randint, _philox


def test_triton_randint_is_word0_with_tensor_and_step_zero():
    """tl.randint(seed, e) = key (seed lo, seed hi), counter (e lo, e hi, 0, 0), word 0."""
    triton, device = _triton_device()
    randint, _ = _kernels()
    n, base = 1000, 2 ** 32 - 300          # element indices cross the 32-bit boundary
    out = torch.empty(n, dtype=torch.int32, device=device)
    randint[(triton.cdiv(n, 256),)](out, SEED, base, n, BLOCK=256)
    got = out.cpu().numpy().view(np.uint32)
    want = ref.random_bits(SEED, 0, 0, (n,), elements=np.arange(n, dtype=np.uint64) + base)[0]
    np.testing.assert_array_equal(got, want)


def test_triton_philox_gives_all_four_words():
    """tl.philox(seed, e lo, e hi, tensor, step): the four words random_bits gives."""
    triton, device = _triton_device()
    _, philox = _kernels()
    n, base, tensor_index, step = 1000, 2 ** 32 - 300, 7, 123457
    out = torch.empty(4 * n, dtype=torch.int32, device=device)
    philox[(triton.cdiv(n, 256),)](out, SEED, base, tensor_index, step, n, BLOCK=256)
    got = out.cpu().numpy().view(np.uint32).reshape(n, 4)
    want = ref.random_bits(SEED, step, tensor_index, (n,),
                           elements=np.arange(n, dtype=np.uint64) + base)
    np.testing.assert_array_equal(got, np.stack(want, axis=1))


# --- rounding --------------------------------------------------------------

def _awkward_values(n=20000, seed=1):
    """Random magnitudes over the whole float32 range, plus ties, specials, edges."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * np.exp2(rng.uniform(-140, 128, n))
    bf16_max = float(torch.finfo(torch.bfloat16).max)
    ties = (np.arange(1, 200) * 2 + 1) * 2.0 ** -8 + 1.0   # exactly halfway between bf16 values
    edges = [0.0, -0.0, np.inf, -np.inf, np.nan, bf16_max, -bf16_max,
             bf16_max * (1 + 2.0 ** -9), bf16_max * (1 + 2.0 ** -8.5), 2.0 ** -133, 2.0 ** -140,
             65504.0, 65519.0, 65520.0, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1e39, -1e39]
    return np.concatenate([x, ties, -ties, edges])


def test_round_bf16_is_torch_bit_for_bit():
    x = _awkward_values()
    with np.errstate(over="ignore"):
        x32 = torch.from_numpy(x.astype(np.float32))
    want = x32.bfloat16().view(torch.int16).numpy().view(np.uint16)
    got = ref.round_bf16(x, bits=True)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    # NaN: ours is always 0x7fc0 (c10's scalar conversion); torch's vectorised
    # CPU conversion writes 0xffff here (seen with torch 2.13), also a NaN.
    np.testing.assert_array_equal(got[nan], 0x7FC0)
    assert np.all(np.isnan(ref.round_bf16(x[nan])))


def test_round_fp16_is_torch():
    x = _awkward_values()
    with np.errstate(over="ignore"):
        want = torch.from_numpy(x.astype(np.float32)).half().double().numpy()
    np.testing.assert_array_equal(ref.round_fp16(x), want)


def _neighbours(x, dtype):
    """(toward zero, away from zero) representable neighbours of fp32(x), by torch."""
    t = torch.from_numpy(np.asarray(x, dtype=np.float32))
    lo_t = t.to(dtype)
    # torch rounds to nearest; step toward zero where it went away.
    away = lo_t.double().abs() > t.double().abs()
    toward = torch.where(away, torch.nextafter(lo_t, torch.zeros_like(lo_t)), lo_t)
    up = torch.nextafter(toward, torch.where(t < 0, -torch.inf, torch.inf).to(dtype))
    return toward.double().numpy(), up.double().numpy()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"], ids=["bf16", "fp16"])
def test_stochastic_rounding_over_all_random_values(dtype):
    """Exact: over r = 0 .. 2**16-1, SR(x) takes the two neighbours only, and the
    away-from-zero one exactly floor(2**16 * distance / spacing) times."""
    rng = np.random.default_rng(2)
    lim = 60.0 if dtype == "bfloat16" else 10.0
    x = (rng.standard_normal(48) * np.exp2(rng.uniform(-lim, lim, 48))).astype(np.float32)
    if dtype == "float16":
        x = np.concatenate([x, [3e-6, -5.1e-7, 65500.0, -70.3]]).astype(np.float32)
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    lo, hi = _neighbours(x, tdtype)
    r = np.arange(2 ** 16, dtype=np.uint32)[:, None]
    sr = ref.stochastic_round_to(np.broadcast_to(x, (2 ** 16, x.size)), dtype, r)
    assert np.all((sr == lo) | (sr == hi))
    count = np.count_nonzero(sr == hi, axis=0)
    dist = np.abs(x.astype(np.float64)) - np.abs(lo)
    want = np.floor(dist / (np.abs(hi) - np.abs(lo)) * 2 ** 16)
    np.testing.assert_array_equal(count, want)
    # The bit rule: the carry comes from the top, so r and the count are tied.
    assert np.all(sr[-1] == np.where(count > 0, hi, lo))
    assert np.all(sr[0] == np.where(count == 2 ** 16, hi, lo))


def test_stochastic_rounding_bf16_bit_rule_matches_arithmetic_rule():
    x = _awkward_values(seed=3)
    r = np.random.default_rng(4).integers(0, 2 ** 16, x.size)
    a = ref.stochastic_round_bf16(x, r)
    b = ref._stochastic_round(x, r, "bfloat16")
    np.testing.assert_array_equal(a, b)


def test_stochastic_rounding_specials():
    bf16_max = float(torch.finfo(torch.bfloat16).max)
    r = np.array([0, 1, 0x7FFF, 0xFFFF])
    for v in [0.0, 1.0, -3.0, 2.0 ** -133, bf16_max, -bf16_max, np.inf, -np.inf, 1.5 * 2.0 ** 100]:
        for dtype in ("bfloat16", "float16"):
            if dtype == "float16" and abs(v) not in (0.0, 1.0, 3.0, np.inf):
                continue
            got = ref.stochastic_round_to(np.full(4, v), dtype, r)
            np.testing.assert_array_equal(got, np.full(4, v))     # exact values stay exact
    z = ref.stochastic_round_bf16(np.array([0.0, -0.0]), np.array([0xFFFF, 0xFFFF]), bits=True)
    np.testing.assert_array_equal(z, [0x0000, 0x8000])             # zeros keep their sign
    nan = ref.stochastic_round_bf16(np.full(2, np.nan), np.array([0, 0xFFFF]), bits=True)
    np.testing.assert_array_equal(nan, [0x7FC0, 0x7FC0])
    # Above the largest bfloat16: it, or inf (in place of 2**128) with the distance ratio.
    above = bf16_max + 2.0 ** 118          # a quarter of the top spacing (2**120) above
    out = ref.stochastic_round_bf16(np.full(2 ** 16, above), np.arange(2 ** 16))
    assert set(np.unique(out)) == {bf16_max, np.inf}
    assert np.count_nonzero(np.isinf(out)) == 2 ** 14
    with pytest.raises(ValueError):
        ref.stochastic_round_bf16(np.ones(2), np.array([0, 2 ** 16]))
    with pytest.raises(ValueError):
        ref.stochastic_round_to(np.ones(2), "float32", np.zeros(2, dtype=np.int64))


def _sr_draws(x, draws):
    """SR of every x at steps 1..draws, bits from the generator (word 0, low 16)."""
    steps = np.arange(1, draws + 1, dtype=np.uint64)[:, None]
    e = np.arange(x.size, dtype=np.uint64)[None, :]
    w0 = ref.philox4x32((e, 0, 9, steps), (SEED & 0xFFFFFFFF, SEED >> 32))[0]
    return ref.stochastic_round_bf16(np.broadcast_to(x, w0.shape), w0 & np.uint32(0xFFFF))


def test_stochastic_rounding_distribution_from_the_generator():
    """The generator's bits make SR a fair coin between the neighbours.

    k, the number of draws (of n) that round away from zero, is Binomial(n, p)
    with p = (|x| - |lo|) / (|hi| - |lo|), exact to 2**-16 by the test above.
    Bound: |k - n p| <= 6 sqrt(n p (1 - p)) + 1 per value; a fair generator
    breaks it with probability ~2e-9 per value (normal tail at 6 sigma), 64
    values. The mean of SR(x) is lo + (k/n)(hi - lo), so the same bound makes
    it unbiased: |mean - x| <= 6 * spacing * sqrt(p (1 - p) / n) + spacing / n.
    """
    n = 4096
    rng = np.random.default_rng(5)
    x = (rng.uniform(1, 2, 64) * np.exp2(rng.integers(-20, 20, 64))).astype(np.float32)
    x = x.astype(np.float64)
    lo, hi = _neighbours(x, torch.bfloat16)
    sr = _sr_draws(x, n)
    assert np.all((sr == lo) | (sr == hi))
    p = (np.abs(x) - np.abs(lo)) / (np.abs(hi) - np.abs(lo))
    k = np.count_nonzero(sr == hi, axis=0)
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(k - n * p) <= 6 * sigma + 1), np.max(np.abs(k - n * p) / (sigma + 1e-9))
    spacing = np.abs(hi - lo)
    bias = np.abs(sr.mean(axis=0) - x)
    assert np.all(bias <= 6 * spacing * np.sqrt(p * (1 - p) / n) + spacing / n)
    # The bound has power: round-to-nearest (the same values, no randomness) fails it.
    rn_bias = np.abs(ref.round_bf16(x) - x)
    assert np.count_nonzero(rn_bias > 6 * spacing * np.sqrt(p * (1 - p) / n) + spacing / n) > 48


def test_stochastic_rounding_is_deterministic_per_counter():
    x = np.random.default_rng(6).standard_normal(2048)
    w = ref.random_bits(SEED, 3, 1, x.shape)[0] & np.uint32(0xFFFF)
    w_again = ref.random_bits(SEED, 3, 1, x.shape)[0] & np.uint32(0xFFFF)
    w_next = ref.random_bits(SEED, 4, 1, x.shape)[0] & np.uint32(0xFFFF)
    a = ref.stochastic_round_bf16(x, w, bits=True)
    np.testing.assert_array_equal(a, ref.stochastic_round_bf16(x, w_again, bits=True))
    b = ref.stochastic_round_bf16(x, w_next, bits=True)
    # Each element differs with probability 2 p (1 - p), ~1/3 on average.
    assert np.count_nonzero(a != b) > 400


# --- the options -----------------------------------------------------------

def test_precision_validation():
    for kw, words in [
        (dict(param_dtype="bfloat16", master_weights=True, stochastic_rounding=True),
         ("master_weights", "stochastic_rounding")),
        (dict(param_dtype="float16", stochastic_rounding=True, kahan_summation=True),
         ("stochastic_rounding", "kahan_summation")),
        (dict(param_dtype="float32", kahan_summation=True), ("kahan_summation", "float32")),
        (dict(param_dtype="float64", master_weights=True), ("master_weights", "float64")),
        (dict(param_dtype="float64", state_dtype="bfloat16"), ("state_dtype", "float64")),
        (dict(param_dtype="int8"), ("param_dtype",)),
        (dict(param_dtype="float32", state_dtype="float16"), ("state_dtype",)),
    ]:
        with pytest.raises(ValueError) as e:
            ref.Precision(**kw)
        for w in words:
            assert w in str(e.value)
    prec = ref.Precision(param_dtype="bfloat16")
    with pytest.raises(ValueError, match="bfloat16 cannot store"):
        ref.adam_step_lp(np.array([1.0 + 2.0 ** -10]), np.ones(1), {}, precision=prec,
                         lr=1e-3, betas=BETAS, eps=EPS, weight_decay=0.0)


ADAM_KW = dict(betas=BETAS, eps=EPS, weight_decay=0.1, decay_scaling="lr")


def _problem(steps, shape=(512,), seed=7):
    """bf16 params in [1, 2) (spacing 2**-7); grads of mean 1 (a steady drift)."""
    rng = np.random.default_rng(seed)
    p0 = ref.round_bf16(1.0 + rng.uniform(0.0, 1.0, shape))
    grads = [[1.0 + 0.5 * rng.standard_normal(shape)] for _ in range(steps)]
    return [p0], grads


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_bf16_state_is_the_rounded_fp64_state(amsgrad):
    """state_dtype=bfloat16: each step is adam_step from the stored values, then
    the state rounded to nearest (or stochastically with words 1, 2, 3)."""
    rng = np.random.default_rng(8)
    p = rng.standard_normal(300).astype(np.float32).astype(np.float64)
    for sr in (False, True):
        prec = ref.Precision(param_dtype="bfloat16" if sr else "float32", state_dtype="bfloat16",
                             stochastic_rounding=sr)
        param = ref.round_to(p, prec.param_dtype)
        state: dict = {}
        for t in range(1, 6):
            g = rng.standard_normal(300)
            want_p, want_s = param.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v)
                                            for k, v in state.items()}
            ref.adam_step(want_p, g, want_s, lr=1e-2, amsgrad=amsgrad, **ADAM_KW)
            ref.adam_step_lp(param, g, state, precision=prec, seed=SEED, tensor_index=4,
                             lr=1e-2, amsgrad=amsgrad, **ADAM_KW)
            words = ref.random_bits(SEED, t, 4, p.shape)
            assert state["step"] == t
            for key, word in (("exp_avg", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 3)):
                if key not in want_s:
                    assert key not in state
                    continue
                r = (words[word] & np.uint32(0xFFFF)) if sr else None
                np.testing.assert_array_equal(state[key], ref.round_to(want_s[key], "bfloat16", r))
            r0 = (words[0] & np.uint32(0xFFFF)) if sr else None
            np.testing.assert_array_equal(param, ref.round_to(want_p, prec.param_dtype, r0))


def _run(prec, steps, lr, **kw):
    params, grads = _problem(steps)
    return ref.run_adam_lp(params, grads, lr, precision=prec, seed=SEED, **ADAM_KW, **kw)


def test_many_small_updates_kahan_master_and_sr_track_fp64_plain_rounding_does_not():
    """bf16 params in [1, 2) (spacing s = 2**-7), Adam with lr 2e-4 and grads of
    mean 1: each update is ~2e-4, under half a spacing (3.9e-3), so
    round-to-nearest never moves a param, while 400 steps move the float64
    trajectory by D ~ 0.08.

    Against that trajectory: plain rounding's error is the whole drift D.
    Kahan's and master weights' stay within one spacing of every element (what
    a stored bf16 cannot resolve), 10x and more below plain's. Stochastic
    rounding is unbiased but random: each step adds variance s^2 p (1 - p) <=
    s * |update| (p = |update| / s), so an element's error after drifting D
    has a standard deviation sigma <= sqrt(s * D); its RMS over 512 elements
    stays under 1.5 sigma (a chi-square of 512 degrees of freedom exceeds 1.5^2
    times its mean with negligible probability), and the mean error over the
    elements under 6 sigma / sqrt(512), far below plain's D.
    """
    steps, lr = 400, 2e-4
    params, grads = _problem(steps)
    want, _ = ref.run_adam(params, grads, lr, **ADAM_KW)
    drift = np.abs(want[0] - params[0])
    assert drift.min() > 0.05
    err, got = {}, {}
    bf16 = dict(param_dtype="bfloat16", state_dtype="float32")
    for name, prec in [("plain", ref.Precision(**bf16)),
                       ("kahan", ref.Precision(**bf16, kahan_summation=True)),
                       ("master", ref.Precision(**bf16, master_weights=True)),
                       ("sr", ref.Precision(**bf16, stochastic_rounding=True))]:
        out, states = _run(prec, steps, lr)
        got[name] = out[0]
        err[name] = float(np.max(np.abs(out[0] - want[0])))
        if name == "master":
            np.testing.assert_array_equal(out[0], ref.round_bf16(states[0]["master_param"]))
            # One float32 rounding (half an ulp, 2**-24 relative) of the master
            # and of the state per step, at worst adding up.
            np.testing.assert_allclose(states[0]["master_param"], want[0], rtol=steps * 2.0 ** -24)
        if name == "kahan":
            # p + c resolves the trajectory finer than a bf16 p can: c's own
            # rounding (up to 2**-17 a step, accumulating like a random walk)
            # is what is left; measured 2.2e-4 (~2**-12) here.
            total = out[0] + states[0]["kahan_comp"]
            assert np.max(np.abs(total - want[0])) < 2.0 ** -10
    np.testing.assert_array_equal(got["plain"], params[0])           # stuck
    assert err["plain"] == drift.max()
    assert err["kahan"] <= BF16_EPS and err["master"] <= BF16_EPS
    assert 10 * max(err["kahan"], err["master"]) <= err["plain"], err
    sigma = math.sqrt(BF16_EPS * drift.max())
    sr_err = got["sr"] - want[0]
    rms, mean = float(np.sqrt(np.mean(sr_err ** 2))), float(np.mean(sr_err))
    assert rms <= 1.5 * sigma and abs(mean) <= 6 * sigma / math.sqrt(sr_err.size)
    assert 10 * abs(mean) <= drift.mean()
    print(f"max |error| against float64: {err}; sr rms {rms:.3g}, mean {mean:.3g}, "
          f"sigma bound {sigma:.3g}, drift {drift.mean():.3g}")


def test_kahan_update_rule_one_step():
    """c' = RN(u - (p' - p)), p' = RN(p + u), u = c + (x - p): checked by hand."""
    prec = ref.Precision(param_dtype="bfloat16", kahan_summation=True)
    p = np.array([1.0, 1.0, -2.0])
    c = np.array([0.0, 2.0 ** -9, -2.0 ** -9])
    state = {"momentum_buffer": np.zeros(3), "kahan_comp": c.copy()}
    g = np.array([2.0 ** -10, -2.0 ** -9, 2.0 ** -8])
    param = p.copy()
    ref.sgd_step_lp(param, g, state, precision=prec, lr=1.0, momentum=0.5)
    x = p - 0.5 * 0.0 - g                      # buf = 0.5 * 0 + g; p - lr * buf
    u = c + (x - p)
    new = ref.round_bf16(p + u)
    np.testing.assert_array_equal(param, new)
    np.testing.assert_array_equal(state["kahan_comp"], ref.round_bf16(u - (new - p)))
    # The first element: u = -2**-10 is under half a spacing, p stays, c keeps it.
    assert param[0] == 1.0 and state["kahan_comp"][0] == -2.0 ** -10


def test_sgd_stochastic_rounding_keeps_a_step_and_uses_word0():
    prec = ref.Precision(param_dtype="bfloat16", stochastic_rounding=True)
    rng = np.random.default_rng(9)
    param = ref.round_bf16(rng.standard_normal(257))
    state: dict = {}
    for t in (1, 2, 3):
        g = rng.standard_normal(257)
        want = param.copy()
        want_s = {"momentum_buffer": state["momentum_buffer"].copy()} if state else {}
        ref.sgd_step(want, g, want_s, lr=1e-3, momentum=0.9)
        ref.sgd_step_lp(param, g, state, precision=prec, seed=SEED, tensor_index=2,
                        lr=1e-3, momentum=0.9)
        words = ref.random_bits(SEED, t, 2, param.shape)
        assert state["step"] == t
        np.testing.assert_array_equal(param, ref.stochastic_round_bf16(want, words[0] & 0xFFFF))
        np.testing.assert_array_equal(state["momentum_buffer"],
                                      ref.stochastic_round_bf16(want_s["momentum_buffer"],
                                                                words[1] & 0xFFFF))


def test_runs_are_reproducible_and_seeded():
    prec = ref.Precision(param_dtype="bfloat16", state_dtype="bfloat16", stochastic_rounding=True)
    a, sa = _run(prec, 20, 1e-3)
    b, sb = _run(prec, 20, 1e-3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(sa[0]["exp_avg"], sb[0]["exp_avg"])
    params, grads = _problem(20)
    c, _ = ref.run_adam_lp(params, grads, 1e-3, precision=prec, seed=SEED + 1, **ADAM_KW)
    assert np.count_nonzero(a[0] != c[0]) > 10


def test_found_inf_changes_nothing_and_plain_precision_is_the_reference():
    prec = ref.Precision(param_dtype="bfloat16", master_weights=True)
    param = ref.round_bf16(np.linspace(-1, 1, 9))
    state: dict = {}
    ref.adam_step_lp(param, np.ones(9), state, precision=prec, lr=1e-3, **ADAM_KW)
    snap = param.copy(), {k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in state.items()}
    ref.adam_step_lp(param, np.ones(9), state, precision=prec, lr=1e-3, found_inf=True, **ADAM_KW)
    np.testing.assert_array_equal(param, snap[0])
    assert state.keys() == snap[1].keys() and state["step"] == snap[1]["step"] == 1
    for k in ("exp_avg", "exp_avg_sq", "master_param"):
        np.testing.assert_array_equal(state[k], snap[1][k])
    # float64 params, no options: exactly adam_step / sgd_step.
    params, grads = _problem(10)
    want, ws = ref.run_adam(params, grads, 1e-3, amsgrad=True, **ADAM_KW)
    got, gs = ref.run_adam_lp(params, grads, 1e-3, precision=ref.Precision(), amsgrad=True,
                              **ADAM_KW)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(gs[0]["max_exp_avg_sq"], ws[0]["max_exp_avg_sq"])
    want, _ = ref.run_sgd(params, grads, 1e-2, momentum=0.9, nesterov=True)
    got, gs = ref.run_sgd_lp(params, grads, 1e-2, precision=ref.Precision(), momentum=0.9,
                             nesterov=True)
    np.testing.assert_array_equal(got[0], want[0])
    assert "step" not in gs[0]
