"""quantize/kernels/lowbit.py (TQ1_0, TQ2_0, Q1_0, Q2_0) and their decoders against slow references.

The references are plain Python over numpy float32 scalars, written from ggml-quants.c's quantize_row_*_ref and
dequantize_row_* (docs/reference/quantization.md): per block, one value at a time, with C's rounding (lroundf: half
away from zero; x86-64's conversion of inf/NaN, whose low 32 bits are 0). gguf-py quantizes and decodes TQ1_0 and
TQ2_0 too (byte-exact by its own test against libggml) and is a second reference for them; it has no Q1_0 or Q2_0.
Byte identity with llama.cpp's own C code is checked in test_formats.py (ggml_quantize_chunk, interop) and
test_interop_quantize.py (whole files from llama-quantize).
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.quantize import formats
from qtool.quantize.kernels import lowbit

f32 = np.float32
NO_IMATRIX = np.empty(0, dtype=np.float32)
KERNELS = {T.TQ1_0: lowbit.quantize_tq1_0, T.TQ2_0: lowbit.quantize_tq2_0, T.Q1_0: lowbit.quantize_q1_0,
           T.Q2_0: lowbit.quantize_q2_0}
BLOCK = {T.TQ1_0: 256, T.TQ2_0: 256, T.Q1_0: 128, T.Q2_0: 64}
BYTES = {T.TQ1_0: 54, T.TQ2_0: 66, T.Q1_0: 18, T.Q2_0: 18}
TYPES = list(KERNELS)


# ------------------------------------------------------------------------------------------- references

def fp16_bytes(v) -> bytes:
    with np.errstate(over="ignore"):
        return np.float16(f32(v)).tobytes()


def c_lround_plus_one(v) -> int:
    """(int)lroundf(v) + 1 on x86-64."""
    v = f32(v)
    if not np.isfinite(v):
        return 1                       # lroundf -> LONG_MIN, whose low 32 bits are 0
    t = f32(np.trunc(v))
    if abs(float(v) - float(t)) >= 0.5:
        t = t + (1 if v > 0 else -1)
    return int(t) + 1


def absmax_and_inverse(block):
    amax = f32(0.0)
    for v in block:
        amax = max(amax, f32(abs(v)))
    with np.errstate(divide="ignore", over="ignore"):
        inv = f32(f32(1.0) / amax) if amax != 0 else f32(0.0)
    return amax, inv


def ref_tq2_0(block) -> bytes:
    d, inv = absmax_and_inverse(block)
    out = bytearray(66)
    with np.errstate(all="ignore"):
        for j in range(0, 64, 32):
            for m in range(32):
                q = 0
                for n in range(4):
                    q += (c_lround_plus_one(block[4 * j + m + 32 * n] * inv) & 3) << (2 * n)
                out[j + m] = q
    out[64:] = fp16_bytes(d)
    return bytes(out)


def ref_tq1_0(block) -> bytes:
    d, inv = absmax_and_inverse(block)
    out = bytearray(54)
    pos = 0
    with np.errstate(all="ignore"):
        for count, stride in ((32, 32), (16, 16)):           # qs: five values per byte
            for m in range(count):
                q = 0
                for n in range(5):
                    q = q * 3 + c_lround_plus_one(block[pos + m + n * stride] * inv)
                out[(0 if count == 32 else 32) + m] = (q * 256 + 242) // 243
            pos += 5 * stride
        for j in range(4):                                     # qh: four values per byte, shifted one trit up
            q = 0
            for m in range(4):
                q = q * 3 + c_lround_plus_one(block[pos + j + 4 * m] * inv)
            out[48 + j] = (q * 3 * 256 + 242) // 243
    out[52:] = fp16_bytes(d)
    return bytes(out)


def ref_q1_0(block) -> bytes:
    total = f32(0.0)
    for v in block:
        total = f32(total + f32(abs(v)))
    out = bytearray(18)
    out[:2] = fp16_bytes(f32(total / f32(128)))
    for j, v in enumerate(block):
        if v >= 0:
            out[2 + j // 8] |= 1 << (j % 8)
    return bytes(out)


def c_roundf_to_int_plus_one(v) -> int:
    """(int)roundf(v) + 1 on x86-64: roundf rounds half away from zero; inf/NaN convert to INT_MIN."""
    v = f32(v)
    if not np.isfinite(v):
        return -(2 ** 31) + 1
    return c_lround_plus_one(v)


def ref_q2_0(block) -> bytes:
    d, inv = absmax_and_inverse(block)
    out = bytearray(18)
    out[:2] = fp16_bytes(d)
    with np.errstate(all="ignore"):
        for j, v in enumerate(block):
            q = min(max(c_roundf_to_int_plus_one(f32(v * inv)), 0), 3)
            out[2 + j // 4] |= q << (2 * (j % 4))
    return bytes(out)


REFERENCE = {T.TQ1_0: ref_tq1_0, T.TQ2_0: ref_tq2_0, T.Q1_0: ref_q1_0, T.Q2_0: ref_q2_0}


def reference_quantize(qtype, x) -> np.ndarray:
    size = BLOCK[qtype]
    rows = [b"".join(REFERENCE[qtype](row[b:b + size]) for b in range(0, len(row), size)) for row in x]
    return np.frombuffer(b"".join(rows), np.uint8).reshape(x.shape[0], -1)


def kernel_quantize(qtype, x) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.full((x.shape[0], x.shape[1] // BLOCK[qtype] * BYTES[qtype]), 0xA5, np.uint8)  # catches unwritten bytes
    KERNELS[qtype](x, NO_IMATRIX, out)
    return out


def half(raw, offset) -> np.float32:
    return f32(np.frombuffer(bytes(raw[offset:offset + 2]), np.float16)[0])


def ref_dequantize(raw: np.ndarray, n: int, block: int, value) -> np.ndarray:
    """ggml's dequantize_row_* for a block of an fp16 d and then codes: `value(blk, j, d)` is value j of a block."""
    out = np.empty((raw.shape[0], n), np.float32)
    for r in range(raw.shape[0]):
        for b in range(n // block):
            blk = raw[r, 18 * b:18 * (b + 1)]
            d = half(blk, 0)
            for j in range(block):
                out[r, block * b + j] = value(blk, j, d)
    return out


def ref_dequantize_q1_0(raw: np.ndarray, n: int) -> np.ndarray:
    """dequantize_row_q1_0: bit ? d : -d."""
    return ref_dequantize(raw, n, 128, lambda blk, j, d: d if (blk[2 + j // 8] >> (j % 8)) & 1 else -d)


def ref_dequantize_q2_0(raw: np.ndarray, n: int) -> np.ndarray:
    """dequantize_row_q2_0: ((int)q - 1) * d."""
    return ref_dequantize(raw, n, 64, lambda blk, j, d: f32(int((blk[2 + j // 4] >> (2 * (j % 4))) & 3) - 1) * d)


# ------------------------------------------------------------------------------------------- data

def edge_rows(rng) -> dict[str, np.ndarray]:
    """Rows of 512 values (two 256-blocks, four 128-blocks)."""
    g = lambda: rng.standard_normal(512).astype(np.float32)  # noqa: E731
    cases = {"gaussian": g(), "all zero": np.zeros(512, np.float32)}
    z = g()
    z[256:] = 0
    z[100:140] = -0.0
    cases["zero blocks and negative zeros"] = z
    o = g()
    o[300] = 1e4
    cases["one huge outlier"] = o
    o = g() * f32(1e-3)
    o[5] = -50.0
    cases["one negative outlier"] = o
    cases["constant positive"] = np.full(512, 0.75, np.float32)
    cases["constant negative"] = np.full(512, -3.0, np.float32)
    # exact halves of a power-of-two maximum: x/d = ±0.5 rounds away from zero
    h = rng.choice(np.float32([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]), 512).astype(np.float32)
    h[0] = h[256] = 2.0
    cases["ties at half the maximum"] = h
    cases["just below half"] = np.where(rng.random(512) < 0.5, np.nextafter(f32(0.5), f32(0)), f32(1.0)).astype(f32)
    cases["subnormal (1/d overflows)"] = g() * f32(1e-41)
    s = g()
    s[:256] *= f32(1e-39)
    cases["subnormal block beside normal"] = s
    cases["positive only"] = np.abs(g())
    cases["small integers"] = rng.integers(-8, 8, 512).astype(np.float32)
    return cases


EDGE_NAMES = list(edge_rows(np.random.default_rng(0)))


# ------------------------------------------------------------------------------------------- encoders

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference_on_random_rows(qtype):
    rng = np.random.default_rng(10 + int(qtype))
    x = rng.standard_normal((4, 512)).astype(np.float32) * np.float32([[1.0], [0.02], [30.0], [1e-5]])
    np.testing.assert_array_equal(kernel_quantize(qtype, x), reference_quantize(qtype, x))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_matches_reference_on_edge_cases(qtype):
    cases = edge_rows(np.random.default_rng(20 + int(qtype)))
    x = np.stack(list(cases.values()))
    ours, ref = kernel_quantize(qtype, x), reference_quantize(qtype, x)
    for name, a, b in zip(cases, ours, ref):
        np.testing.assert_array_equal(a, b, err_msg=f"{qtype.name} {name}")


@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_ternary_kernels_match_gguf_py(qtype):
    """gguf-py's numpy ports agree wherever they are defined (not where 1/d overflows: numpy's cast of inf)."""
    rng = np.random.default_rng(30 + int(qtype))
    cases = {k: v for k, v in edge_rows(rng).items() if not k.startswith("subnormal")}
    x = np.concatenate([np.stack(list(cases.values())), rng.standard_normal((16, 512)).astype(np.float32)])
    np.testing.assert_array_equal(kernel_quantize(qtype, x), gguf.quants.quantize(x, qtype))


# §1.2's byte patterns for an all-zero block, by hand: every code is the middle one (trit 0, code 1), d = +0.
ZERO_BLOCKS = {
    T.TQ2_0: bytes([0x55]) * 64 + bytes(2),
    # five trits "11111" in base 3 = 121, ceil(121*256/243) = 128; four "1111" then one up = 120, -> 127
    T.TQ1_0: bytes([128]) * 48 + bytes([127]) * 4 + bytes(2),
    T.Q1_0: bytes(2) + bytes([0xFF]) * 16,               # 0 >= 0: every sign bit set
    T.Q2_0: bytes(2) + bytes([0x55]) * 16,               # code 1 (the value 0) in every 2 bits
}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_all_zero_block_bytes(qtype):
    assert kernel_quantize(qtype, np.zeros((1, BLOCK[qtype]), np.float32))[0].tobytes() == ZERO_BLOCKS[qtype]


def test_subnormal_block_stores_zero_codes_like_x86():
    """max|x| subnormal: 1/d = inf, the products ±inf/NaN, and x86's lroundf gives trit 0 for all (the bytes of
    an all-zero block, but for d itself, which rounds to fp16 +0 too). Q2_0's (int)roundf gives INT_MIN: code 0
    (clamped), and d is fp16 +0: every byte 0."""
    x = np.full((1, 256), f32(1e-41), np.float32)
    x[0, ::2] *= -1
    for qtype in (T.TQ1_0, T.TQ2_0):
        assert kernel_quantize(qtype, x)[0].tobytes() == ZERO_BLOCKS[qtype]
    assert kernel_quantize(T.Q2_0, x)[0].tobytes() == bytes(4 * 18)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_rows_are_independent_of_how_the_tensor_is_split(qtype):
    x = np.random.default_rng(40 + int(qtype)).standard_normal((9, 512)).astype(np.float32)
    whole = kernel_quantize(qtype, x)
    np.testing.assert_array_equal(np.concatenate([kernel_quantize(qtype, x[:4]), kernel_quantize(qtype, x[4:])]),
                                  whole)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_the_imatrix_changes_nothing(qtype):
    """llama.cpp's quantize_tq*/q1_0/q2_0 run the _ref path with or without quant_weights."""
    rng = np.random.default_rng(50 + int(qtype))
    x = rng.standard_normal((3, 512)).astype(np.float32)
    w = rng.uniform(0, 10, 512).astype(np.float32)
    np.testing.assert_array_equal(formats.quantize(x, qtype, w), formats.quantize(x, qtype))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_non_finite_input_is_refused(qtype):
    x = np.zeros((2, 256), np.float32)
    x[1, 9] = np.nan
    with pytest.raises(QtoolError, match="row 1 has a non-finite value"):
        formats.quantize(x, qtype)


def test_q1_0_needs_rows_of_128():
    with pytest.raises(QtoolError, match="Q1_0 needs rows that are a whole number of 128-element blocks"):
        formats.quantize(np.zeros((2, 576), np.float32), T.Q1_0)


# ------------------------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("qtype", [T.TQ1_0, T.TQ2_0], ids=lambda t: t.name)
def test_ternary_decoders_equal_gguf_py(qtype):
    """Quantized rows and random bytes (every byte value: TQ1_0 bytes above 242 are not produced by the encoder but
    decode all the same), bit for bit."""
    rng = np.random.default_rng(60 + int(qtype))
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[3] = 0.0
    quantized = formats.quantize(x, qtype)
    random_bytes = rng.integers(0, 256, (16, formats.format_for(qtype).row_bytes(512)), dtype=np.uint8)
    for raw in (quantized, random_bytes):
        with np.errstate(invalid="ignore", over="ignore"):
            want = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(raw.shape[0], 512)
        got = formats.decode(raw, qtype, 512)
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("qtype, block, reference",
                         [(T.Q1_0, 128, ref_dequantize_q1_0), (T.Q2_0, 64, ref_dequantize_q2_0)], ids=["Q1_0", "Q2_0"])
def test_decoders_without_a_gguf_py_one_equal_reference(qtype, block, reference):
    """gguf-py has no Q1_0/Q2_0 decoder: formats.decode and formats.dequantize both use ours; against ggml's loop."""
    rng = np.random.default_rng(70 + int(qtype))
    n = 4 * block
    raw = rng.integers(0, 256, (12, 4 * 18), dtype=np.uint8)
    halves = raw.reshape(12, 4, 18)
    halves[:, :, 1] &= 0x7B                                   # finite scales (no all-ones exponent)
    halves[0, 0, :2] = (0x01, 0x00)                           # the smallest subnormal
    halves[0, 1, :2] = (0x00, 0x80)                           # -0
    want = reference(raw, n)
    for got in (formats.decode(raw, qtype, n), formats.dequantize(raw, qtype, n)):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    strided = np.zeros((12, 2 * n), np.float32)[:, ::2]
    formats.decode(raw, qtype, n, out=strided)                # a strided buffer goes through Format.dequantize
    np.testing.assert_array_equal(strided.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_of_encode_is_within_the_format_bound(qtype):
    """TQ*, Q2_0: each value is round(x/d)·fp16(d), so |x - y| <= d/2 + |d - fp16(d)| (d = block max|x|). Q1_0: the
    value is ±fp16(mean|x|) with x's sign (x >= 0 positive)."""
    rng = np.random.default_rng(80 + int(qtype))
    x = (rng.standard_normal((32, 1024)) * rng.uniform(1e-3, 100, (32, 1))).astype(np.float32)
    y = formats.decode(formats.quantize(x, qtype), qtype, 1024)
    blocks, yb = x.reshape(32, -1, BLOCK[qtype]).astype(np.float64), y.reshape(32, -1, BLOCK[qtype])
    if qtype == T.Q1_0:
        mean = np.abs(blocks).astype(np.float32).mean(-1, keepdims=True)
        assert np.array_equal(yb >= 0, blocks >= 0)
        np.testing.assert_allclose(np.abs(yb), np.broadcast_to(mean, yb.shape), rtol=2 ** -10)
    else:
        d = np.abs(blocks).max(-1, keepdims=True)
        d16 = d.astype(np.float16).astype(np.float64)
        assert (np.abs(yb - blocks) <= d / 2 + np.abs(d - d16) + 1e-6 * d).all()
        assert set(np.unique(np.round(yb / d16).astype(int))) <= {-1, 0, 1}
