"""qtool.evaluate.qdot: K-quant weights times Q8_K activation codes, as integers, against a float64 product.

The bound. Each block's integer sums are exact; a row's result is then a float32 sum over its n/256 blocks of
(d_x * d_w) * sumi (- (d_x * dmin) * summs), each term rounded a few times, so |error| <= (n/256 + 4) * 2**-24 * S
with S = sum_j |x_j| |W_rj| (x the codes times their scales, W the decoded weights): 1.2e-6 S at n = 4096. The tests
use 1e-5 * S, as tests/test_matvec.py does for the float kernels, and check that a changed byte exceeds it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.evaluate import matvec, qdot
from qtool.evaluate.model import round_q8_0_, round_q8_k_
from qtool.quantize import formats

RELATIVE_BOUND = 1e-5
TYPES = list(qdot.SUPPORTED)                    # times Q8_K codes (any rows)
LEGACY = list(qdot.SUPPORTED_Q8_0)              # blocks of 32 times Q8_0 codes (one row)
FP16_OFFSETS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q8_0: (0,), T.Q4_0: (0,), T.Q5_0: (0,),
                T.Q4_1: (0, 2), T.Q5_1: (0, 2)}


def _activations(rng: np.random.Generator, n: int) -> np.ndarray:
    x = (rng.standard_normal(n) * np.exp2(rng.uniform(-4, 4, n // 256).repeat(256))).astype(np.float32)
    x[:256] = 0.0                                   # an all-zero block: d = 0
    x[300] = -40.0                                  # a block's largest magnitude gets the code -127:
    x[n - 12] = 25.0                                # negative or positive
    return x


def _stored(rng: np.random.Generator, qtype: T, n_out: int, n_in: int, random_bytes: bool) -> np.ndarray:
    """Quantized rows (spread scales, a zero row), or random bytes with finite fp16 scales: every code, scale and
    min pattern, the extreme ones included (Q6_K scales -128..127, six-bit codes 0 and 63)."""
    fmt = formats.format_for(qtype)
    if random_bytes:
        raw = rng.integers(0, 256, (n_out, fmt.row_bytes(n_in)), dtype=np.uint8)
        blocks = raw.reshape(n_out, -1, fmt.type_size)
        for o in FP16_OFFSETS[qtype]:
            blocks[:, :, o + 1] &= 0x3B                 # positive, finite, at most 2**-1 * 2: no float32 overflow
    else:
        w = rng.standard_normal((n_out, n_in)) * np.exp2(rng.uniform(-6, 6, (n_out, 1)))
        w[1] = 0.0
        raw = fmt.quantize(w.astype(np.float32))
    raw = np.ascontiguousarray(raw)
    raw.setflags(write=False)                           # as memory-mapped rows are
    return raw


def _codes(qtype: T, x: np.ndarray) -> qdot.Q8K | qdot.Q80:
    """x as the codes the kernel for `qtype` takes."""
    return qdot.quantize_q8_k(x) if qtype in TYPES else qdot.quantize_q8_0(x)


def _product(qtype: T, raw: np.ndarray, act: qdot.Q8K | qdot.Q80) -> np.ndarray:
    out = np.full((1, raw.shape[0]), np.nan, np.float32)
    (qdot.kernel_for(qtype) if qtype in TYPES else qdot.kernel_for_q8_0(qtype))(raw, act, out)
    return out[0]


def _values(act: qdot.Q8K | qdot.Q80) -> np.ndarray:
    """The codes' values q * d (float64), one row."""
    block = 256 if isinstance(act, qdot.Q8K) else 32
    return (act.q.reshape(-1, block).astype(np.float64) * act.d[:, None].astype(np.float64)).reshape(-1)


def _reference(qtype: T, raw: np.ndarray, act: qdot.Q8K | qdot.Q80) -> tuple[np.ndarray, np.ndarray]:
    """The float64 product of the decoded weights and the codes' values, and S (the bound's scale)."""
    w = formats.dequantize(raw, qtype, act.q.size).astype(np.float64)
    x = _values(act)
    return w @ x, np.abs(w) @ np.abs(x)


@pytest.mark.parametrize("kind", ["q8_K", "q8_0"])
def test_codes_are_the_rounded_values(kind):
    """q * d is model.round_q8_k_'s (round_q8_0_'s) value; an all-zero block has d = 0 and zero codes; a block's
    largest magnitude gets -127 in Q8_K, +-127 by its sign in Q8_0; Q8_K's bsums are the sums of 16 codes."""
    quantize, round_, block = ((qdot.quantize_q8_k, round_q8_k_, 256) if kind == "q8_K" else
                               (qdot.quantize_q8_0, round_q8_0_, 32))
    x = _activations(np.random.default_rng(1), 2048)
    act = quantize(x)
    rounded = np.empty((1, x.size), np.float32)
    round_(x[None], rounded)
    np.testing.assert_array_equal(_values(act).astype(np.float32), rounded[0])     # q * d is exact in float64
    assert not act.d[:256 // block].any() and not act.q[:256].any()
    assert act.q[300] == -127 and act.q[-12] == (-127 if kind == "q8_K" else 127)
    if kind == "q8_K":
        np.testing.assert_array_equal(act.bsums, act.q.astype(np.int32).reshape(-1, 16).sum(axis=1))
    else:
        assert act.q.dtype == np.int8 and np.abs(act.q).max() == 127
        np.testing.assert_array_equal(act.s, act.q.astype(np.int32).reshape(-1, 32).sum(axis=1))
    with pytest.raises(ValueError, match=f"multiple of {block}"):
        quantize(np.zeros(300, np.float32))


SHAPES = {"serial": (96, 512), "parallel": (384, 4096), "576-wide": (1536, 576)}


@pytest.mark.parametrize("random_bytes", [False, True], ids=["quantized", "random-bytes"])
@pytest.mark.parametrize("qtype,shape", [(t, name) for t in TYPES + LEGACY for name in SHAPES
                                         if SHAPES[name][1] % formats.block_size(t) == 0],
                         ids=lambda v: v.name if isinstance(v, T) else v)
def test_the_product_is_the_decoded_weights_times_the_codes(qtype, shape, random_bytes):
    """Blocks of 32 also at SmolLM2's width, 576, which K-quant rows cannot have."""
    n_out, n_in = SHAPES[shape]
    rng = np.random.default_rng(int(qtype) + n_in + random_bytes)
    raw = _stored(rng, qtype, n_out, n_in, random_bytes)
    x = _activations(rng, n_in) if n_in % 256 == 0 else rng.standard_normal(n_in).astype(np.float32)
    act = _codes(qtype, x)
    exact, scale = _reference(qtype, raw, act)
    got = _product(qtype, raw, act)
    assert np.isfinite(got).all()
    assert (np.abs(got - exact) <= RELATIVE_BOUND * scale).all(), np.max(np.abs(got - exact) / scale)


# a sub-block scale (Q4_K: with a min's top bits); blocks of 32: a byte of the fifth bits, or the first quant byte
SCALE_BYTE = {T.Q4_K: 6, T.Q5_K: 13, T.Q6_K: 200, T.Q5_0: 3, T.Q5_1: 5, T.Q8_0: 2, T.Q4_0: 2, T.Q4_1: 4}


@pytest.mark.parametrize("qtype", TYPES + LEGACY, ids=lambda t: t.name)
def test_a_changed_byte_changes_the_product(qtype):
    """One stored byte changed (a quant, a sub-block scale, the high byte of an fp16 scale) moves that row's result
    by far more than the bound, and no other row: a kernel reading a wrong byte, code or block fails."""
    rng = np.random.default_rng(100 + int(qtype))
    raw = _stored(rng, qtype, 96, 1024, random_bytes=False)
    x = (rng.choice([-1.0, 1.0], 1024) * (1 + rng.random(1024))).astype(np.float32)         # |x| in [1, 2)
    act = _codes(qtype, x)
    before = _product(qtype, raw, act)
    size = formats.format_for(qtype).type_size
    middle = 2 * size                                                            # the third of four blocks
    offsets = [middle + size - 3, middle + SCALE_BYTE[qtype]] + [middle + h + 1 for h in FP16_OFFSETS[qtype]]
    _, scale = _reference(qtype, raw, act)
    for offset in offsets:
        changed = raw.copy()
        # the quant byte's high bits (a Q8_0 code moving by 5 would stay within the bound: 5 of 127 * 1024), all 8
        # fifth bits of a Q5_0 / Q5_1 byte
        flips = {offsets[0]: 0x50, offsets[1]: 0xFF if qtype in (T.Q5_0, T.Q5_1) else 0x05}
        changed[5, offset] ^= flips.get(offset, 0x05)
        changed.setflags(write=False)
        after = _product(qtype, changed, act)
        assert abs(float(after[5]) - float(before[5])) > 10 * RELATIVE_BOUND * scale[5], offset
        np.testing.assert_array_equal(np.delete(after, 5), np.delete(before, 5))


@pytest.mark.parametrize("qtype", TYPES + LEGACY, ids=lambda t: t.name)
def test_it_agrees_with_the_float_kernel(qtype):
    """evaluate/matvec.py's float kernel on the same rounded activations: the same product within both bounds."""
    rng = np.random.default_rng(50 + int(qtype))
    raw = _stored(rng, qtype, 512, 2048, random_bytes=False)
    act = _codes(qtype, _activations(rng, 2048))
    x = _values(act).astype(np.float32)[None]
    float_out = np.empty((1, 512), np.float32)
    matvec.kernel_for(qtype)(raw, x, float_out)
    _, scale = _reference(qtype, raw, act)
    assert (np.abs(_product(qtype, raw, act) - float_out[0]) <= 2 * RELATIVE_BOUND * scale).all()


@pytest.mark.parametrize("n_tok", [2, 4, 11])
@pytest.mark.parametrize("shape", [(40, 512), (272, 4096), (200, 2816)], ids=["serial", "parallel", "11-blocks"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_several_rows_give_each_rows_own_product(qtype, shape, n_tok):
    """2-D activations (prefill, perplexity), one weight row at a time: each row's result is bit for bit the one-row
    kernel's (the weights are unpacked once for all the rows, each row's arithmetic is its own), whole tiles of four
    rows and the rest alike, rows of 11 blocks (taken 8 and 3 at a time) and a last group of 8 weight rows too; and
    within the bound of the float64 product."""
    n_out, n_in = shape
    rng = np.random.default_rng(7 * int(qtype) + n_tok + n_in)
    raw = _stored(rng, qtype, n_out, n_in, random_bytes=n_tok == 11)
    x = np.stack([_activations(rng, n_in) for _ in range(n_tok)])
    act = qdot.quantize_q8_k(x)
    assert act.q.shape == (n_tok, n_in) and act.d.shape == (n_tok, n_in // 256) and act.bsums.shape == (n_tok, n_in // 16)
    out = np.full((n_tok, n_out), np.nan, np.float32)
    qdot.kernel_for(qtype, interleaved=False)(raw, act, out)
    for t in range(n_tok):
        one = qdot.quantize_q8_k(x[t])
        np.testing.assert_array_equal(one.q, act.q[t])
        np.testing.assert_array_equal(one.d, act.d[t])
        np.testing.assert_array_equal(one.bsums, act.bsums[t])
        np.testing.assert_array_equal(out[t], _product(qtype, raw, one))
        exact, scale = _reference(qtype, raw, one)
        assert (np.abs(out[t] - exact) <= RELATIVE_BOUND * scale).all()


@pytest.mark.parametrize("n_tok", [2, 4, 11])
@pytest.mark.parametrize("shape", [(40, 512), (272, 4096), (200, 2816)], ids=["serial", "parallel", "11-blocks"])
@pytest.mark.parametrize("qtype", TYPES + LEGACY, ids=lambda t: t.name)
def test_interleaved_rows_give_the_product(qtype, shape, n_tok):
    """2-D activations, 16 weight rows in the lanes of a register (the default with AVX-512 VNNI; portable IR
    elsewhere), K-quants times Q8_K codes and blocks of 32 times Q8_0 codes: each row's codes are those of the one-row
    rounding; within the bound of the float64 product for every row and token (random bytes: every code, fifth bit
    and min; Q8_0 codes -128..127), whole tiles of four tokens and the rest, a last group of 8 (200 rows) or 8 + 16
    (40) weight rows; a token's result does not depend on the tokens beside it (a token alone, the rest after no
    whole tile, gives the bits it gives in a whole tile)."""
    n_out, n_in = shape
    rng = np.random.default_rng(11 * int(qtype) + n_tok + n_in)
    raw = _stored(rng, qtype, n_out, n_in, random_bytes=n_tok != 4)
    x = np.stack([_activations(rng, n_in) for _ in range(n_tok)])
    act = _codes(qtype, x)
    kernel = (qdot.kernel_for(qtype, interleaved=True) if qtype in TYPES
              else qdot.kernel_for_q8_0(qtype, interleaved=True))
    out = np.full((n_tok, n_out), np.nan, np.float32)
    kernel(raw, act, out)
    for t in range(n_tok):
        one = _codes(qtype, x[t])
        for name, rows in vars(act).items():                    # q, d and bsums (Q8_K) or s (Q8_0)
            np.testing.assert_array_equal(getattr(one, name), rows[t])
        exact, scale = _reference(qtype, raw, one)
        assert (np.abs(out[t] - exact) <= RELATIVE_BOUND * scale).all(), (t, np.max(np.abs(out[t] - exact) / scale))
    alone = np.full((1, n_out), np.nan, np.float32)
    kernel(raw, _codes(qtype, x[:1]), alone)
    np.testing.assert_array_equal(alone[0], out[0])


def test_shapes_that_do_not_fit_are_refused():
    raw = np.zeros((4, 2 * 144), np.uint8)
    act = qdot.quantize_q8_k(np.ones(512, np.float32))
    kernel = qdot.kernel_for(T.Q4_K)
    with pytest.raises(ValueError, match="do not fit"):
        kernel(raw[:, :144], act, np.empty((1, 4), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        kernel(raw, act, np.empty((2, 4), np.float32))
    rows = qdot.quantize_q8_k(np.ones((3, 512), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        kernel(raw, rows, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        kernel(raw, qdot.Q8K(rows.q, rows.d[:2], rows.bsums), np.empty((3, 4), np.float32))
    assert qdot.kernel_for(T.Q8_0) is None and qdot.kernel_for(T.IQ4_XS) is None
    kernel = qdot.kernel_for_q8_0(T.Q8_0)
    act = qdot.quantize_q8_0(np.ones(64, np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        kernel(np.zeros((4, 34), np.uint8), act, np.empty((1, 4), np.float32))        # one block per row, not two
    with pytest.raises(ValueError, match="do not fit"):
        kernel(np.zeros((4, 68), np.uint8), act, np.empty((2, 4), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        kernel(np.zeros((4, 68), np.uint8), qdot.Q80(act.q.astype(np.int16), act.d, act.s), np.empty((1, 4), np.float32))
    rows = qdot.quantize_q8_0(np.ones((2, 64), np.float32))      # several rows: the interleaved kernel only
    with pytest.raises(ValueError, match="do not fit"):
        qdot.kernel_for_q8_0(T.Q4_0, interleaved=True)(np.zeros((4, 36), np.uint8), rows, np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        qdot.kernel_for_q8_0(T.Q8_0, interleaved=False)(np.zeros((4, 68), np.uint8), rows, np.empty((2, 4), np.float32))
    assert qdot.kernel_for_q8_0(T.Q4_K) is None and qdot.kernel_for_q8_0(T.F16) is None


PORTABLE_CHECK = """
import numpy as np
from qtool.evaluate import matvec, qdot
from qtool.quantize import formats
from tests.test_matvec import widening_differences
from tests.test_qdot import LEGACY, RELATIVE_BOUND, TYPES, _codes, _product, _reference, _stored
assert not qdot.HAS_AVX2 and not qdot.HAS_VNNI and not matvec.HAS_F16C
assert widening_differences() == 0
rng = np.random.default_rng(3)
for qtype in TYPES + LEGACY:
    raw = _stored(rng, qtype, 8, 512, random_bytes=True)
    act = _codes(qtype, rng.standard_normal(512).astype(np.float32))
    exact, scale = _reference(qtype, raw, act)
    assert (np.abs(_product(qtype, raw, act) - exact) <= RELATIVE_BOUND * scale).all(), qtype.name
    block = 256 if qtype in TYPES else 32
    rows = (qdot.quantize_q8_k if block == 256 else qdot.quantize_q8_0)(rng.standard_normal((6, 512)).astype(np.float32))
    w = formats.dequantize(raw, qtype, 512).astype(np.float64)
    x = (rows.q.reshape(6, -1, block) * rows.d[:, :, None].astype(np.float64)).reshape(6, -1)
    kernels = ([qdot.kernel_for(qtype, interleaved=i) for i in (False, True)] if block == 256
               else [qdot.kernel_for_q8_0(qtype, interleaved=True)])
    for kernel in kernels:
        out = np.empty((6, 8), np.float32)
        kernel(raw, rows, out)
        assert (np.abs(out - x @ w.T) <= RELATIVE_BOUND * (np.abs(x) @ np.abs(w).T)).all(), kernel.__name__
print("ok")
"""


def test_the_portable_ir_gives_the_same_products(tmp_path):
    """Where the CPU has no AVX2 the kernels use portable IR for the u8 x s8 products, and matvec widens fp16 without
    F16C: forced here, in a process with its own (empty) numba cache so that nothing compiled for AVX2 is loaded."""
    env = dict(os.environ, QTOOL_QDOT_PORTABLE="1", NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
