"""The ctypes harness over llama.cpp's libggml-base agrees with gguf-py where gguf-py is known to be exact."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from tests import ggml_ref

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module", autouse=True)
def _need_ggml():
    ggml_ref.require()


def _data(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[1] = 0.0                                  # all-zero row: the signed-zero scale cases
    x[2, :32] = rng.standard_t(2, 32) * 1e3     # heavy tail in one block (kept below the fp16 range)
    return x


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1], ids=lambda t: t.name)
def test_quantize_matches_gguf_py(qtype):
    x = _data(8, 512, seed=int(qtype))
    ours = ggml_ref.ggml_quantize(qtype, x)
    assert ours.dtype == np.uint8 and ours.shape == (8, 512 // 32 * gguf.GGML_QUANT_SIZES[qtype][1])
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, qtype))


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS],
                         ids=lambda t: t.name)
def test_dequantize_round_trip(qtype):
    x = _data(4, 512, seed=7)
    raw = ggml_ref.ggml_quantize(qtype, x)
    y = ggml_ref.ggml_dequantize(qtype, raw, 512)
    assert y.shape == x.shape and y.dtype == np.float32
    np.testing.assert_array_equal(y, gguf.quants.dequantize(raw, qtype))
    # the quantizer really ran: reconstruction is close on the Gaussian rows, exact zeros stay zero
    assert np.all(y[1] == 0)
    assert np.abs(y[3] - x[3]).max() < 1.0


def test_imatrix_changes_the_result():
    x = _data(4, 256, seed=3)
    w = np.random.default_rng(4).uniform(0.0, 10.0, 256).astype(np.float32)
    plain = ggml_ref.ggml_quantize(T.Q4_K, x)
    weighted = ggml_ref.ggml_quantize(T.Q4_K, x, w)
    assert not np.array_equal(plain, weighted)
    # Q8_0 ignores the imatrix (docs/reference/quantization.md §2.1)
    np.testing.assert_array_equal(ggml_ref.ggml_quantize(T.Q8_0, x, w), ggml_ref.ggml_quantize(T.Q8_0, x))


def test_bad_shapes_are_refused_before_reaching_c():
    with pytest.raises(ValueError, match="multiple of 256"):
        ggml_ref.ggml_quantize(T.Q4_K, np.zeros((1, 100), np.float32))
    with pytest.raises(ValueError, match="imatrix shape"):
        ggml_ref.ggml_quantize(T.Q4_K, np.zeros((1, 256), np.float32), np.ones(128, np.float32))
