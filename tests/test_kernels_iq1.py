"""quantize/kernels/iq1.py (IQ1_S, IQ1_M): grid tables, byte identity with llama.cpp's own C code, decoders, error.

The encoders are checked against libggml itself (``ggml_quantize_chunk`` through tests/ggml_ref.py, marked interop):
their exhaustive split search, neighbour snapping and refits have no shorter description than the C. What is
independent of the C is checked here without it: the neighbour tables against a plain-Python build that follows
iq2xs_init_impl's loops, the decoders against gguf-py, and the reconstruction error.
"""
from __future__ import annotations

import re
from functools import partial

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.quantize import formats
from qtool.quantize.kernels import iq1
from tests import block_data
from tests.block_data import EDGE_HALVES

TYPES = [T.IQ1_S, T.IQ1_M]


def imatrix_modes(qtype: T) -> list[bool]:
    """ggml refuses IQ1_S without an importance matrix; IQ1_M has a fallback weighting."""
    return [True] if qtype == T.IQ1_S else [False, True]


# ------------------------------------------------------------------------------------------- grid tables

def reference_neighbours(codes: np.ndarray, key: int) -> list[int]:
    """iq2xs_init_impl's neighbour list of one off-grid key, one grid point at a time: sort by (distance, index),
    keep every point at the three smallest distinct distances."""
    pos = [2 * ((key >> (2 * k)) & 3) + 1 for k in range(8)]
    dist = sorted((sum((2 * int(p[k]) + 1 - pos[k]) ** 2 for k in range(8)), j) for j, p in enumerate(codes))
    kept, distinct, last = [], 1, dist[0][0]
    for d2, j in dist:
        if d2 > last:
            if distinct == 3:
                break
            distinct, last = distinct + 1, d2
        kept.append(j)
    return kept


def test_neighbour_tables_follow_ggml_init():
    codes, index_of, start, neighbours = iq1.grid_tables()
    assert codes.shape == (2048, 8) and codes.min() == 0 and codes.max() == 2
    on_grid = np.flatnonzero(index_of >= 0)
    assert on_grid.size == 2048 and sorted(index_of[on_grid]) == list(range(2048))
    for j, key in enumerate((codes.astype(np.int64) << (2 * np.arange(8))).sum(1)):
        assert index_of[key] == j
    assert np.all(start[1:][index_of >= 0] == start[:-1][index_of >= 0])          # no list for grid points
    ternary = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3
    keys = (ternary << (2 * np.arange(8))).sum(1)
    for key in keys[::97]:                                                           # 68 of the 6561 keys, slowly
        expected = [] if index_of[key] >= 0 else reference_neighbours(codes, int(key))
        assert neighbours[start[key]:start[key + 1]].tolist() == expected, key


@pytest.mark.interop
def test_grid_codes_are_ggml_kgrid():
    """gguf-py's grid, read as 2-bit codes, is ggml's kgrid_1bit_2048 in ggml's order."""
    from tests.interop import unavailable
    from tests.llamacpp import llamacpp_dir

    tree = llamacpp_dir()
    if tree is None:
        unavailable("llama.cpp tree missing (its ggml-quants.c holds the grid)")
    source = next(tree.rglob("ggml-quants.c")).read_text()
    table = re.search(r"kgrid_1bit_2048\[NGRID_IQ1S\] = \{(.*?)\};", source, re.S).group(1)
    kgrid = [int(v) for v in table.replace("\n", " ").split(",") if v.strip()]
    codes = iq1.grid_tables()[0].astype(np.int64)
    assert (codes << (2 * np.arange(8))).sum(1).tolist() == kgrid


# ------------------------------------------------------------------------------------------- test data

gaussian, random_imatrix = block_data.gaussian, block_data.random_imatrix
DATA = {"gaussian": gaussian, "outliers": block_data.with_outliers,
        "zero-blocks": partial(block_data.zero_blocks, sub=16, patterns=[[0], [3], [15], [1, 2], [0, 2, 4, 6],
                                                                         list(range(15)), list(range(16)), [6, 7]]),
        "equal": block_data.equal_values,
        "tiny-and-huge": partial(block_data.tiny_and_huge, lowest=-13, pinned=[1e-39, 5e-13, 2e-12, 5e-8, 2e-7],
                                 clip=3e4)}


# ------------------------------------------------------------------------------------------- llama.cpp itself

@pytest.mark.interop
@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("qtype, use_imatrix", [(t, m) for t in TYPES for m in imatrix_modes(t)],
                         ids=lambda v: v.name if isinstance(v, T) else ("imatrix" if v else "no-imatrix"))
def test_bytes_identical_to_ggml_quantize_chunk(ggml, qtype, use_imatrix, data):
    n = 2048
    seed = 100 * int(qtype) + 10 * use_imatrix + list(DATA).index(data)
    x = DATA[data](48, n, seed)
    w = random_imatrix(n, seed) if use_imatrix else None
    ours = formats.quantize(x, qtype, w)
    theirs = ggml.ggml_quantize(qtype, x, w)
    size = formats.FORMATS[qtype].type_size
    differing = (ours.reshape(-1, size) != theirs.reshape(-1, size)).any(axis=1)
    assert not differing.any(), f"{differing.sum()} of {differing.size} {qtype.name} blocks differ"


@pytest.mark.interop
def test_imatrix_requirement_mirrors_ggml(ggml):
    lib = ggml.load()
    assert lib.ggml_quantize_requires_imatrix(int(T.IQ1_S)) is True
    assert lib.ggml_quantize_requires_imatrix(int(T.IQ1_M)) is False
    assert formats.FORMATS[T.IQ1_S].needs_imatrix and not formats.FORMATS[T.IQ1_M].needs_imatrix


def test_iq1_s_without_an_imatrix_is_refused_naming_qtool_imatrix():
    x = gaussian(2, 256, 1)
    with pytest.raises(QtoolError, match="IQ1_S requires an importance matrix.*`qtool imatrix`"):
        formats.quantize(x, T.IQ1_S)
    out = np.empty((2, 50), np.uint8)
    with pytest.raises(QtoolError, match="`qtool imatrix`"):                      # the kernel itself too
        iq1.quantize_iq1_s(x, np.empty(0, np.float32), out)


def test_iq1_m_scale_overflow_is_refused_as_llama_quantize_does():
    x = gaussian(3, 512, 2)
    x[1, 300:316] *= 1e6                                   # d = max scale / 15 overflows fp16
    with pytest.raises(QtoolError, match="IQ1_M: row 1, block 1: a block scale overflows fp16"):
        formats.quantize(x, T.IQ1_M)


# ------------------------------------------------------------------------------------------- decoders



def set_halves(raw: np.ndarray, qtype: T, halves: np.ndarray) -> None:
    """Writes one fp16 d per block: IQ1_S's at bytes 0-1, IQ1_M's as the top nibbles of its four scale words."""
    blocks = raw.reshape(-1, formats.FORMATS[qtype].type_size)
    if qtype == T.IQ1_S:
        blocks[:, :2].view(np.uint16)[:, 0] = halves
        return
    for s in range(4):
        blocks[:, 49 + 2 * s] = (blocks[:, 49 + 2 * s] & 0x0F) | (((halves >> (4 * s)) & 0xF) << 4)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decoders_are_bit_identical_to_gguf_py(qtype):
    fmt = formats.FORMATS[qtype]
    w = np.ones(512, np.float32)
    quantized = np.concatenate([fmt.quantize(DATA[name](6, 512, 3), w) for name in DATA])
    rng = np.random.default_rng(5)
    random_bytes = rng.integers(0, 256, (24, fmt.row_bytes(512)), dtype=np.uint8)
    set_halves(random_bytes, qtype, np.resize(EDGE_HALVES, 48))
    for raw in (quantized, random_bytes):
        with np.errstate(all="ignore"):
            expected = gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], 512)
        ours = formats.decode(raw, qtype, 512)
        np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


# ------------------------------------------------------------------------------------------- reconstruction

# On N(0, 1) rows (64 x 2048, seed 3), uniform imatrix, measured: largest |error| / super-block absmax 0.679 (IQ1_S)
# and 0.749 (IQ1_M); relative RMSE per super-block 0.485 / 0.450 on average. Three levels per value and a grid of
# 2048 of the 6561 patterns have no closed-form bound, so these are the measured values + ~10 %.
MAX_ERROR_PER_ABSMAX = {T.IQ1_S: 0.75, T.IQ1_M: 0.83}
MEAN_RELATIVE_RMSE = {T.IQ1_S: 0.535, T.IQ1_M: 0.495}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_of_encode_is_within_the_measured_error(qtype):
    x = gaussian(64, 2048, 3)
    y = formats.decode(formats.quantize(x, qtype, np.ones(2048, np.float32)), qtype, 2048)
    err = (y - x).reshape(64, -1, 256)
    blocks = x.reshape(64, -1, 256)
    assert (np.abs(err).max(-1) / np.abs(blocks).max(-1)).max() < MAX_ERROR_PER_ABSMAX[qtype]
    relative = np.sqrt((err ** 2).mean(-1) / (blocks ** 2).mean(-1))
    assert relative.mean() < MEAN_RELATIVE_RMSE[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zero_rows_decode_to_zero_and_signs_survive(qtype):
    x = gaussian(3, 512, 9)
    x[1] = 0.0
    y = formats.decode(formats.quantize(x, qtype, np.ones(512, np.float32)), qtype, 512)
    assert np.all(y[1] == 0)
    big = np.abs(x) > 1.5                                   # values well above the step keep their sign
    assert np.mean(np.sign(y[big]) == np.sign(x[big])) > 0.95


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_imatrix_moves_the_error_to_unimportant_columns(qtype):
    x = gaussian(32, 1024, 2)
    w = np.ones(1024, np.float32)
    w[::2] = 1e-3
    y = formats.decode(formats.quantize(x, qtype, w), qtype, 1024)
    err = (y - x) ** 2
    assert err[:, 1::2].mean() < 0.8 * err[:, ::2].mean()
