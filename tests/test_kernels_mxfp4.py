"""quantize/kernels/mxfp4.py (MXFP4): the encoder against a plain-numpy port of ggml's quantize_row_mxfp4_ref and
against libggml itself, the block exponent at every power of two, rounding ties of the e2m1 grid, and the decoder
against gguf-py.

The reference computes ``floorf(log2f(amax))`` without log2f: the float64 log2 rounded to float32. That is the
correctly rounded log2f wherever the floor can change (an amax a few ulps below a power of two lies at least
~2**-20 ulp from a rounding midpoint, far beyond a float64 log2's error), so it checks the kernel's libm call
independently; ``test_block_exponent_at_every_power_of_two`` compares both with libm's log2f as well.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.quantize import formats
from qtool.quantize.kernels import mxfp4

KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)


# ------------------------------------------------------------------------------------------- the reference

def reference_exponent(amax: np.ndarray) -> np.ndarray:
    """``amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0``; the uint8 conversion as x86-64 does it (through
    a 32-bit int, low byte kept), which matters for subnormal amax."""
    amax = np.asarray(amax, np.float32)
    with np.errstate(divide="ignore"):
        log2 = np.log2(amax.astype(np.float64)).astype(np.float32)
    e = np.where(amax > 0, np.floor(log2) - np.float32(2) + np.float32(127), np.float32(0))
    return (e.astype(np.int64) & 0xFF).astype(np.uint8)


def e8m0_half(e: np.ndarray) -> np.ndarray:
    e = np.asarray(e, np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - np.uint32(1)) << np.uint32(23)).astype(np.uint32)
    return bits.view(np.float32)


def reference_quantize(x: np.ndarray) -> np.ndarray:
    """quantize_row_mxfp4_ref in numpy: float32 [rows, n] -> uint8 [rows, n / 32 * 17]."""
    rows, n = x.shape
    blocks = x.reshape(-1, 32).astype(np.float32)
    e = reference_exponent(np.abs(blocks).max(axis=1))
    d = e8m0_half(e)
    with np.errstate(over="ignore"):            # 8*d and 12*d overflow to inf near FLT_MAX, as in the C
        errors = np.abs(KVALUES[None, None, :] * d[:, None, None] - blocks[:, :, None])   # float32 throughout
    codes = np.argmin(errors, axis=-1).astype(np.uint8)          # first minimum: C's strict `<` scan
    out = np.empty((blocks.shape[0], 17), np.uint8)
    out[:, 0] = e
    out[:, 1:] = codes[:, :16] | (codes[:, 16:] << 4)
    return out.reshape(rows, n // 32 * 17)


def kernel_quantize(x: np.ndarray) -> np.ndarray:
    """The kernel without formats.py's validation (which refuses an 0xFF scale, as llama-quantize does)."""
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty((x.shape[0], x.shape[1] // 32 * 17), np.uint8)
    mxfp4.quantize_mxfp4(x, np.empty(0, np.float32), out)
    return out


# ------------------------------------------------------------------------------------------- test data

def gaussian(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, n)) * 10.0 ** rng.uniform(-4, 2, (rows, 1))).astype(np.float32)


def with_outliers(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = gaussian(rows, n, seed)
    hits = rng.random((rows, n)) < 0.02
    x[hits] *= rng.uniform(20, 1e4, hits.sum()).astype(np.float32)
    x[0, 3] = 3.4e38                                       # near FLT_MAX: log2f rounds up to 128, 8*d is inf
    x[1, 40] = -3.0e38
    x[2, 70] = 1e30
    return x


def zero_blocks(rows: int, n: int, seed: int) -> np.ndarray:
    x = gaussian(rows, n, seed)
    x[:, 32:64] = 0.0
    x[::2, 96:128] = -0.0
    x[-1] = 0.0
    return x


def equal_values(rows: int, n: int, seed: int) -> np.ndarray:
    x = np.empty((rows, n), np.float32)
    x[...] = np.random.default_rng(seed).uniform(-50, 50, rows).astype(np.float32)[:, None]
    x[0], x[1] = 1.0, -1.0
    x[2, ::2], x[2, 1::2] = 2.5, -2.5
    x[3] = 2.0 ** -149                                     # the smallest subnormal everywhere
    return x


def tiny(rows: int, n: int, seed: int) -> np.ndarray:
    """Subnormal block maxima (the exponent byte wraps to 232..254) and the normal range just above them, but not
    [2**-126, 2**-125), whose 0xFF byte llama-quantize refuses (test_a_nan_scale_byte_is_refused)."""
    rng = np.random.default_rng(seed)
    scale = 2.0 ** rng.uniform(-150, -124, (rows, n // 32, 1))
    scale[(scale >= 2.0 ** -127) & (scale < 2.0 ** -124)] = 2.0 ** -124
    x = (rng.uniform(-1, 1, (rows, n // 32, 32)) * scale).astype(np.float32).reshape(rows, n)
    return x


def near_powers_of_two(rows: int, n: int, seed: int) -> np.ndarray:
    """Block maxima one to a few ulps below and at powers of two: where log2f rounds up past the float's exponent."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(-1, 1, (rows * n // 32, 32)).astype(np.float32)
    k = rng.integers(-100, 100, blocks.shape[0])
    below = rng.integers(0, 40, blocks.shape[0]).astype(np.uint32)
    amax = (np.ldexp(np.float32(1), k).astype(np.float32).view(np.uint32) - below).view(np.float32)
    blocks *= amax[:, None]
    blocks[np.arange(blocks.shape[0]), rng.integers(0, 32, blocks.shape[0])] = amax * rng.choice([-1, 1],
                                                                                                  blocks.shape[0])
    return blocks.reshape(rows, n)


def grid_ties(rows: int, n: int, seed: int) -> np.ndarray:
    """Every block has amax 2**E exactly (so d = 2**(E-3)) and its other values on the grid, on the midpoints between
    neighbouring grid values (exact ties: the first index in kvalues order wins) and one ulp either side of them."""
    rng = np.random.default_rng(seed)
    grid = np.array([0, 1, 2, 3, 4, 6, 8, 12], np.float64)
    mids = (grid[1:] + grid[:-1]) / 2
    candidates = np.concatenate([grid, mids, -grid, -mids]) / 8       # in units of 2**E
    blocks = rng.choice(candidates, (rows * n // 32, 32))
    blocks[:, 0] = rng.choice([-1.0, 1.0], blocks.shape[0])
    E = rng.integers(-60, 60, (blocks.shape[0], 1))
    x = np.ldexp(blocks, E).astype(np.float32)
    nudge = rng.integers(-1, 2, x.shape).astype(np.int32)
    nudge[:, 0] = 0
    nudged = (x.view(np.int32) + nudge * (x != 0)).view(np.float32)
    x = np.where(rng.random(x.shape) < 0.5, x, nudged)
    return x.reshape(rows, n)


DATA = {"gaussian": gaussian, "outliers": with_outliers, "zero-blocks": zero_blocks, "equal": equal_values,
        "tiny": tiny, "near-powers-of-two": near_powers_of_two, "grid-ties": grid_ties}


# ------------------------------------------------------------------------------------------- the encoder

@pytest.mark.parametrize("data", list(DATA))
def test_encoder_equals_the_numpy_port_of_ggml(data):
    x = DATA[data](16, 1024, list(DATA).index(data))
    ours, ref = kernel_quantize(x), reference_quantize(x)
    differing = (ours.reshape(-1, 17) != ref.reshape(-1, 17)).any(axis=1)
    assert not differing.any(), f"{differing.sum()} of {differing.size} blocks differ"


def test_block_exponent_at_every_power_of_two():
    """floorf(log2f(amax)) at, just below and just above every power of two from subnormal to FLT_MAX: the kernel,
    the reference and libm's log2f agree, and below a power of two |k| >= 2 the result is k, not the float's own
    exponent k - 1."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.log2f.restype, libm.log2f.argtypes = ctypes.c_float, [ctypes.c_float]
    values = []
    for k in range(-149, 128):
        p = np.float32(2.0 ** k)
        bits = int(p.view(np.uint32))
        values += [np.uint32(bits + d).view(np.float32) for d in range(-40, 4) if 0 < bits + d < 0x7F800000]
    values = np.array(values + [np.float32(3.4028235e38)], np.float32)
    libm_e = np.array([int(np.floor(np.float32(libm.log2f(float(v))))) - 2 + 127 & 0xFF for v in values])
    kernel_e = np.array([mxfp4.block_exponent(v) for v in values])
    np.testing.assert_array_equal(kernel_e, libm_e)
    np.testing.assert_array_equal(reference_exponent(values), libm_e)
    just_below = np.nextafter(np.float32(16.0), np.float32(0))
    assert mxfp4.block_exponent(just_below) == 4 - 2 + 127 and mxfp4.block_exponent(np.float32(15.0)) == 3 - 2 + 127
    assert mxfp4.block_exponent(np.float32(0.0)) == 0


def test_ties_go_to_the_first_index_in_table_order():
    """amax 1 (d = 1/8): the midpoint 0.1875 between 1/8 and 2/8 takes code 1, -0.1875 code 9 (-1/8), 0.0625
    (between 0 and 1/8) code 0 (not 8, -0), 0.625 (between 4/8 and 6/8) code 4."""
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [1.0, 0.1875, -0.1875, 0.0625, 0.625, -0.0]
    raw = formats.quantize(x, T.MXFP4)[0]
    codes = np.concatenate([raw[1:] & 0xF, raw[1:] >> 4])
    assert raw[0] == 125 and codes[:6].tolist() == [6, 1, 9, 0, 4, 0]
    np.testing.assert_array_equal(raw[None], reference_quantize(x))


def test_a_nan_scale_byte_is_refused_like_llama_quantize_does():
    """An amax in [2**-126, 2**-125) gives the exponent -1, stored as 0xFF: E8M0's NaN, which
    ggml_validate_row_data rejects."""
    x = np.full((2, 64), 1.5 * 2.0 ** -126, np.float32)
    x[0] = 1.0
    assert kernel_quantize(x)[1, 0] == 0xFF
    with pytest.raises(QtoolError, match="MXFP4: row 1, block 0: the block scale is out of the E8M0 range"):
        formats.quantize(x, T.MXFP4)


def test_the_imatrix_changes_nothing():
    x = gaussian(4, 256, 1)
    w = np.random.default_rng(2).uniform(0, 10, 256).astype(np.float32)
    assert not formats.FORMATS[T.MXFP4].uses_imatrix
    np.testing.assert_array_equal(formats.quantize(x, T.MXFP4, w), formats.quantize(x, T.MXFP4))


# ------------------------------------------------------------------------------------------- llama.cpp itself

@pytest.mark.interop
@pytest.mark.parametrize("data", list(DATA))
def test_bytes_identical_to_ggml_quantize_chunk(ggml, data):
    x = DATA[data](48, 2048, 50 + list(DATA).index(data))
    ours, theirs = kernel_quantize(x), ggml.ggml_quantize(T.MXFP4, x)
    differing = (ours.reshape(-1, 17) != theirs.reshape(-1, 17)).any(axis=1)
    assert not differing.any(), f"{differing.sum()} of {differing.size} blocks differ"


@pytest.mark.interop
def test_nan_scale_byte_and_decoder_match_ggml(ggml):
    x = np.full((1, 32), 1.5 * 2.0 ** -126, np.float32)
    np.testing.assert_array_equal(kernel_quantize(x), ggml.ggml_quantize(T.MXFP4, x))
    raw = np.random.default_rng(3).integers(0, 256, (8, 17 * 16), dtype=np.uint8)
    raw[:, ::17] = np.arange(128, dtype=np.uint8).reshape(8, 16) * 2        # every even exponent byte, 0 included
    ours = formats.decode(raw, T.MXFP4, 512)
    np.testing.assert_array_equal(ours.view(np.uint32), ggml.ggml_dequantize(T.MXFP4, raw, 512).view(np.uint32))


# ------------------------------------------------------------------------------------------- the decoder

def test_decoder_is_bit_identical_to_gguf_py():
    fmt = formats.FORMATS[T.MXFP4]
    quantized = np.concatenate([kernel_quantize(DATA[name](4, 512, 9)) for name in DATA])
    random_bytes = np.random.default_rng(5).integers(0, 256, (16, fmt.row_bytes(512)), dtype=np.uint8)
    random_bytes.reshape(-1, 17)[:, 0] = np.arange(256, dtype=np.uint8)      # every exponent byte, 0xFF too
    for raw in (quantized, random_bytes):
        with np.errstate(over="ignore"):                                     # 12 * 2**127 from the 0xFF byte
            expected = gguf.quants.dequantize(raw, T.MXFP4).reshape(raw.shape[0], 512)
            via_format = fmt.dequantize(raw, 512)
        ours = formats.decode(raw, T.MXFP4, 512)
        np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
        np.testing.assert_array_equal(via_format.view(np.uint32), expected.view(np.uint32))


def test_round_trip_error_is_at_most_a_quarter_of_the_block_maximum():
    x = gaussian(32, 1024, 4)
    y = formats.dequantize(formats.quantize(x, T.MXFP4), T.MXFP4, 1024)
    amax = np.abs(x.reshape(32, -1, 32)).max(-1, keepdims=True)
    assert (np.abs(y - x).reshape(32, -1, 32) / amax).max() <= 0.25
