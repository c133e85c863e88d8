"""quantize/formats.py: the format table, its checks, reconstruction error per type, and — marked interop — byte
identity with llama.cpp's ggml_quantize_chunk for every type, with and without an importance matrix."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.quantize import formats
from qtool.quantize.formats import FORMATS, format_for

ALL = list(FORMATS)
QUANTIZED = [t for t in ALL if t not in (T.F32, T.F16, T.BF16)]
# gguf-py's numpy ports of llama.cpp's reference quantizers (byte-exact by its own test against libggml).
GGUF_NUMPY = [T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]


def gaussian(rows: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


def needed_imatrix(qtype: T, n: int) -> np.ndarray | None:
    """A uniform importance matrix for the types that cannot be quantized without one (IQ2_XXS, IQ2_XS)."""
    return np.ones(n, np.float32) if FORMATS[qtype].needs_imatrix else None


# ------------------------------------------------------------------------------------------- the table

@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_table_entry_agrees_with_gguf(qtype):
    fmt = FORMATS[qtype]
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[qtype]
    assert fmt.qtype == qtype and fmt.name == qtype.name
    # ggml_quantize_requires_imatrix is true only for IQ2_XXS/IQ2_XS/IQ1_S
    assert fmt.needs_imatrix == (qtype in (T.IQ2_XXS, T.IQ2_XS, T.IQ1_S))
    assert all(0 <= offset <= fmt.type_size - 2 for offset in fmt.half_offsets)
    assert fmt.row_bytes(fmt.block_size * 3) == 3 * fmt.type_size
    assert fmt.bits_per_weight == 8 * fmt.type_size / fmt.block_size


def test_format_for_accepts_enum_id_and_any_case_name():
    assert format_for(T.Q4_K) is format_for(12) is format_for("q4_k") is format_for("Q4_K") is FORMATS[T.Q4_K]


@pytest.mark.parametrize("name, message", [("Q7_K", "unknown GGML type"), ("Q8_1", "does not write Q8_1"),
                                           ("Q8_K", "does not write Q8_K"), (999, "unknown GGML type")])
def test_format_for_refuses_types_we_do_not_write(name, message):
    with pytest.raises(QtoolError, match=message):
        format_for(name)


def test_a_missing_kernel_module_is_a_clear_error():
    with pytest.raises(QtoolError, match="Q9_K not available"):
        formats._load_kernel("no_such_kernel_module", "quantize_q9_k", "Q9_K")


# ------------------------------------------------------------------------------------------- input checks

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", [T.F16, T.Q8_0, T.Q4_K, T.IQ4_XS], ids=lambda t: t.name)
def test_non_finite_input_is_refused_naming_row_and_column(qtype, bad):
    x = gaussian(4, 256, 0)
    x[2, 17] = bad
    with pytest.raises(QtoolError, match=r"row 2 has a non-finite value \((nan|inf|-inf) at column 17\)"):
        formats.quantize(x, qtype)


def test_row_length_must_be_whole_blocks():
    with pytest.raises(QtoolError, match="whole number of 256-element blocks; this row has 576"):
        formats.quantize(np.zeros((2, 576), np.float32), T.Q4_K)
    with pytest.raises(QtoolError, match="32-element blocks"):
        formats.quantize(np.zeros(40, np.float32), T.Q4_0)


def test_non_float_input_is_refused():
    with pytest.raises(QtoolError, match="expected rows of floats"):
        formats.quantize(np.zeros((2, 32), np.int32), T.Q8_0)


def test_imatrix_must_have_one_finite_value_per_column():
    x = gaussian(2, 256, 1)
    with pytest.raises(QtoolError, match=r"shape \(128,\), expected one value per column \(256\)"):
        formats.quantize(x, T.Q4_K, np.ones(128, np.float32))
    w = np.ones(256, np.float32)
    w[9] = np.nan
    with pytest.raises(QtoolError, match=r"the importance matrix has a non-finite value \(nan at column 9\)"):
        formats.quantize(x, T.Q4_K, w)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.F16, T.BF16, T.F32, T.TQ1_0, T.TQ2_0, T.Q1_0, T.Q2_0, T.MXFP4],
                         ids=lambda t: t.name)
def test_types_that_ignore_the_imatrix_ignore_it(qtype):
    assert not FORMATS[qtype].uses_imatrix
    x = gaussian(3, 256, 2)
    w = np.random.default_rng(3).uniform(0, 5, 256).astype(np.float32)
    np.testing.assert_array_equal(formats.quantize(x, qtype, w), formats.quantize(x, qtype))


@pytest.mark.parametrize("qtype, value, where", [
    (T.F16, 70000.0, "row 1, column 5: a value overflows F16"),
    (T.BF16, 3.4e38, "row 1, column 5: a value overflows BF16"),
    (T.Q4_0, 1e6, "row 1, block 0: a block scale overflows fp16"),   # d = 1e6/8 > 65504
    (T.Q4_K, 1e9, "row 1, block 0: a block scale overflows fp16"),   # d = (1e9/15)/63
    (T.TQ1_0, 7e4, "row 1, block 0: a block scale overflows fp16"),  # d = max|x|
    (T.Q1_0, 1e7, "row 1, block 0: a block scale overflows fp16"),   # d = mean|x| > 1e7/128
    (T.Q2_0, 7e4, "row 1, block 0: a block scale overflows fp16"),   # d = max|x|
], ids=["F16", "BF16", "Q4_0", "Q4_K", "TQ1_0", "Q1_0", "Q2_0"])
def test_scales_beyond_fp16_are_refused_like_llama_quantize_does(qtype, value, where):
    x = gaussian(2, 256, 4)
    x[1, 5] = value
    with pytest.raises(QtoolError, match=where):
        formats.quantize(x, qtype)


# ------------------------------------------------------------------------------------------- shapes and decoding

@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_any_leading_shape_round_trips(qtype):
    fmt = FORMATS[qtype]
    x = gaussian(6, 512, 5).reshape(2, 3, 512)
    w = needed_imatrix(qtype, 512)
    raw = fmt.quantize(x, w)
    assert raw.dtype == np.uint8 and raw.shape == (2, 3, fmt.row_bytes(512))
    np.testing.assert_array_equal(raw.reshape(6, -1), fmt.quantize(x.reshape(6, 512), w))
    y = fmt.dequantize(raw, 512)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert fmt.quantize(x[0, 0], w).shape == (fmt.row_bytes(512),)


def test_dequantize_checks_the_byte_count():
    with pytest.raises(QtoolError, match="expected uint8 rows of 144 bytes for 256 elements"):
        formats.dequantize(np.zeros((2, 140), np.uint8), T.Q4_K, 256)


def test_dequantize_reads_types_qtool_does_not_write():
    # Evaluation reads GGUFs made elsewhere; gguf-py decodes e.g. NVFP4 even though qtool never writes it.
    raw = np.random.default_rng(6).integers(0, 256, (2, 4 * 36), dtype=np.uint8)
    np.testing.assert_array_equal(formats.dequantize(raw, "nvfp4", 256), gguf.quants.dequantize(raw, T.NVFP4))


# ------------------------------------------------------------------------------------------- correctness

def mixed_rows(seed: int) -> np.ndarray:
    x = gaussian(8, 1024, seed)
    rng = np.random.default_rng(seed + 1)
    x[1] = 0.0                                                        # the signed-zero scale cases
    x[2] = np.clip(rng.standard_t(2, 1024) * 100, -6e4, 6e4)          # heavy tails, kept inside fp16 scales
    x[3, :32] = 7.25                                                  # a constant block
    x[4] *= np.float32(1e-39)                                         # subnormal
    x[5, ::97] *= 1000                                                # outliers
    return x


@pytest.mark.parametrize("qtype", GGUF_NUMPY, ids=lambda t: t.name)
def test_matches_gguf_py_numpy_quantizers(qtype):
    x = mixed_rows(int(qtype))
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(x, qtype)
    np.testing.assert_array_equal(formats.quantize(x, qtype), expected.view(np.uint8))


# max |error| / block absmax on Gaussian data, from the format: Q8_0 d/2 = amax/254; Q4_0 clamps the far
# side at +7d = 7/8 amax; Q5_0 at 15/16; Q4_1/Q5_1 half a step of (max-min)/15 or /31 <= 2amax/30 or 2amax/62;
# plus a little for the fp16 rounding of the stored scales.
# The ternary types and Q2_0: d/2 (d = amax) plus the fp16 rounding of d; Q1_0 (±mean|x|): at most amax, by construction.
# MXFP4: amax in [2**E, 2**(E+1)) gets the grid 2**(E-2) * {0, .5, 1, 1.5, 2, 3, 4, 6}, whose top step is 2**(E-1)
# wide and whose top point 1.5 * 2**E clips the rest: at most amax/4.
MAX_ERROR_PER_BLOCK_ABSMAX = {T.MXFP4: 0.25, T.F16: 2 ** -11, T.BF16: 2 ** -8, T.Q8_0: 0.0045, T.Q4_0: 0.127, T.Q5_0: 0.0635,
                              T.Q4_1: 0.0685, T.Q5_1: 0.0332, T.TQ1_0: 0.5 + 2 ** -11, T.TQ2_0: 0.5 + 2 ** -11,
                              T.Q1_0: 1.0 + 2 ** -11, T.Q2_0: 0.5 + 2 ** -11}
# RMSE on N(0, 1) data; the searched types have no closed form: measured values (64x1024, seed 0) + ~10 %:
# Q2_K 0.296, Q3_K 0.151, Q4_K 0.0714, Q5_K 0.0363, Q6_K 0.0178, IQ4_NL 0.0765, IQ4_XS 0.0770, IQ3_XXS 0.213,
# IQ3_S 0.166, IQ2_XXS 0.344 and IQ2_XS 0.301 (uniform imatrix), IQ2_S 0.266, IQ1_S 0.487 (uniform imatrix), IQ1_M
# 0.583 (no imatrix: weights x², which favour the large values).
RMSE_BOUND = {T.Q2_K: 0.33, T.Q3_K: 0.17, T.Q4_K: 0.079, T.Q5_K: 0.040, T.Q6_K: 0.0196, T.IQ4_NL: 0.085,
              T.IQ4_XS: 0.085, T.IQ3_XXS: 0.235, T.IQ3_S: 0.183, T.IQ2_XXS: 0.38, T.IQ2_XS: 0.33, T.IQ2_S: 0.29,
              T.IQ1_S: 0.54, T.IQ1_M: 0.64}


@pytest.mark.parametrize("qtype", [t for t in ALL if t != T.F32], ids=lambda t: t.name)
def test_reconstruction_error_is_within_the_format_bound(qtype):
    fmt = FORMATS[qtype]
    x = gaussian(64, 1024, 0)
    y = fmt.dequantize(fmt.quantize(x, needed_imatrix(qtype, 1024)), 1024)
    if qtype in RMSE_BOUND:
        assert np.sqrt(np.mean((y - x) ** 2)) < RMSE_BOUND[qtype]
    else:
        block = max(fmt.block_size, 32)
        amax = np.abs(x.reshape(64, -1, block)).max(-1, keepdims=True)
        assert (np.abs(y - x).reshape(64, -1, block) / amax).max() <= MAX_ERROR_PER_BLOCK_ABSMAX[qtype]


def test_f32_is_stored_unchanged():
    x = mixed_rows(9)
    np.testing.assert_array_equal(formats.quantize(x, T.F32).view(np.float32), x)


# IQ2_XXS/IQ2_XS have no plain mode to compare with: tests/test_kernels_iq2.py compares them with a uniform imatrix.
@pytest.mark.parametrize("qtype", [t for t in QUANTIZED if FORMATS[t].uses_imatrix and not FORMATS[t].needs_imatrix],
                         ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error(qtype):
    """What an imatrix is for: with very uneven column weights, the weighted error drops (measured ratios
    0.52-0.81 for these types on this data)."""
    fmt = FORMATS[qtype]
    x = gaussian(64, 1024, 0)
    w = (np.random.default_rng(1).uniform(0, 1, 1024) ** 4 * 100).astype(np.float32)
    plain = np.mean(w * (fmt.dequantize(fmt.quantize(x), 1024) - x) ** 2)
    weighted = np.mean(w * (fmt.dequantize(fmt.quantize(x, w), 1024) - x) ** 2)
    assert weighted < 0.9 * plain


# ------------------------------------------------------------------------------------------- llama.cpp itself

def heavy_tailed(rows: int, n: int, seed: int) -> np.ndarray:
    """Student-t rows spanning ten orders of magnitude, kept where every type's fp16 scales stay finite."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(2, (rows, n)) * 10.0 ** rng.uniform(-7, 3, (rows, 1))
    return np.clip(x, -6e4, 6e4).astype(np.float32)


def imatrix_like(n: int, seed: int) -> np.ndarray:
    """Mean squared activations: mostly O(1), a few huge, some exactly zero (never-activated inputs)."""
    rng = np.random.default_rng(seed)
    w = (rng.lognormal(0, 2, n) ** 2).astype(np.float32)
    w[rng.random(n) < 0.05] = 0.0
    w[:32] = 0.0
    return w


@pytest.mark.interop
@pytest.mark.parametrize("data", ["gaussian", "heavy-tailed", "mixed"])
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_bytes_identical_to_ggml_quantize_chunk(ggml, qtype, use_imatrix, data):
    n = 1024
    seed = 1000 * int(qtype) + 10 * use_imatrix
    x = {"gaussian": lambda: gaussian(96, n, seed), "heavy-tailed": lambda: heavy_tailed(96, n, seed),
         "mixed": lambda: mixed_rows(seed)}[data]()
    w = imatrix_like(n, seed) if use_imatrix else None
    if w is None and FORMATS[qtype].needs_imatrix:     # both refuse (ggml would abort the process: ggml_ref raises)
        with pytest.raises(QtoolError, match="requires an importance matrix"):
            formats.quantize(x, qtype)
        with pytest.raises(ValueError, match="requires an imatrix"):
            ggml.ggml_quantize(qtype, x)
        return
    ours = formats.quantize(x, qtype, w)
    theirs = ggml.ggml_quantize(qtype, x, w)
    fmt = FORMATS[qtype]
    differing = (ours.reshape(-1, fmt.type_size) != theirs.reshape(-1, fmt.type_size)).any(axis=1)
    assert not differing.any(), f"{differing.sum()} of {differing.size} {qtype.name} blocks differ"


@pytest.mark.interop
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_identical_to_ggml(ggml, qtype):
    x = mixed_rows(int(qtype))
    raw = ggml.ggml_quantize(qtype, x, needed_imatrix(qtype, x.shape[1]))
    np.testing.assert_array_equal(formats.dequantize(raw, qtype, x.shape[1]).view(np.uint32),
                                  ggml.ggml_dequantize(qtype, raw, x.shape[1]).view(np.uint32))
