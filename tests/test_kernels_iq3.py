"""quantize/kernels/iq3.py (IQ3_XXS, IQ3_S): grid tables, byte identity with llama.cpp's own C code, decoders, error.

The encoders are checked against libggml itself (``ggml_quantize_chunk`` through tests/ggml_ref.py, marked interop):
their search (31 or 19 candidate scales, neighbour snapping, refits) has no shorter description than the C, so a
second Python copy of it would check little that libggml does not check better. What is independent of the C is
checked here without it: the grid tables against a plain-Python build that follows iq3xs_init_impl's loops, the
decoders against gguf-py, and the reconstruction error.
"""
from __future__ import annotations

import re
from functools import partial

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.quantize import formats
from qtool.quantize.kernels import iq3
from tests import block_data
from tests.block_data import EDGE_HALVES

TYPES = [T.IQ3_XXS, T.IQ3_S]
GRID_SIZE = {T.IQ3_XXS: 256, T.IQ3_S: 512}


# ------------------------------------------------------------------------------------------- grid tables

def reference_neighbours(grid_levels: np.ndarray, code: int, nwant: int) -> list[int]:
    """iq3xs_init_impl's neighbour list of one off-grid code, one grid point at a time: sort by (distance, index),
    keep every point at the `nwant` smallest distinct distances."""
    pos = [2 * ((code >> (3 * k)) & 7) + 1 for k in range(4)]
    dist = sorted((sum((2 * int(p[k]) + 1 - pos[k]) ** 2 for k in range(4)), j) for j, p in enumerate(grid_levels))
    kept, distinct, last = [], 1, dist[0][0]
    for d2, j in dist:
        if d2 > last:
            if distinct == nwant:
                break
            distinct, last = distinct + 1, d2
        kept.append(j)
    return kept


@pytest.mark.parametrize("grid_size", [256, 512])
def test_neighbour_tables_follow_ggml_init(grid_size):
    levels, index_of, start, neighbours = iq3.grid_tables(grid_size)
    assert levels.shape == (grid_size, 4) and levels.min() == 0 and levels.max() == 7
    on_grid = np.flatnonzero(index_of >= 0)
    assert on_grid.size == grid_size and sorted(index_of[on_grid]) == list(range(grid_size))
    for j, code in enumerate((levels.astype(np.int64) << (3 * np.arange(4))).sum(1)):
        assert index_of[code] == j
    assert np.all(start[1:][index_of >= 0] == start[:-1][index_of >= 0])          # no list for grid points
    nwant = 2 if grid_size == 256 else 3
    for code in range(0, 4096, 5):                                                  # a fifth of the codes, slowly
        expected = [] if index_of[code] >= 0 else reference_neighbours(levels, code, nwant)
        assert neighbours[start[code]:start[code + 1]].tolist() == expected, code


@pytest.mark.interop
@pytest.mark.parametrize("grid_size", [256, 512])
def test_grid_codes_are_ggml_kgrid(grid_size):
    """gguf-py's decode grids, read back as 3-bit codes, are ggml's kgrid_256 / kgrid_512 in ggml's order."""
    from tests.interop import unavailable
    from tests.llamacpp import llamacpp_dir

    tree = llamacpp_dir()
    if tree is None:
        unavailable("llama.cpp tree missing (its ggml-quants.c holds the grids)")
    source = next(tree.rglob("ggml-quants.c")).read_text()
    table = re.search(rf"kgrid_{grid_size}\[{grid_size}\] = \{{(.*?)\}};", source, re.S).group(1)
    kgrid = [int(v) for v in table.replace("\n", " ").split(",") if v.strip()]
    levels = iq3.grid_tables(grid_size)[0].astype(np.int64)
    assert (levels << (3 * np.arange(4))).sum(1).tolist() == kgrid


# ------------------------------------------------------------------------------------------- test data

gaussian, random_imatrix = block_data.gaussian, block_data.random_imatrix
DATA = {"gaussian": gaussian, "outliers": block_data.with_outliers,
        "zero-blocks": partial(block_data.zero_blocks, sub=32,
                               patterns=[[0], [3], [7], [1, 2], [0, 2, 4, 6], [0, 1, 2, 3, 4, 5, 6], list(range(8))]),
        "equal": block_data.equal_values,
        "tiny-and-huge": partial(block_data.tiny_and_huge, lowest=-9, pinned=[1e-39, 3e-9, 1e-8, 2e-8], clip=3e5)}


# ------------------------------------------------------------------------------------------- llama.cpp itself

@pytest.mark.interop
@pytest.mark.parametrize("data", list(DATA))
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
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
def test_ggml_does_not_require_an_imatrix_for_iq3(ggml):
    lib = ggml.load()
    for qtype in TYPES:
        assert lib.ggml_quantize_requires_imatrix(int(qtype)) is False
        assert not formats.FORMATS[qtype].needs_imatrix


def test_iq3_s_places_later_sub_blocks_one_slot_early_after_a_zero_one():
    """ggml's IQ3_S encoder skips its cursor over an all-zero sub-block (module note of iq3.py); the bytes show it:
    the last slot of low index bytes and signs stays empty although sub-block 7 is not zero."""
    x = gaussian(1, 256, 11)
    x[0, 64:96] = 0.0                                     # sub-block 2
    raw = formats.quantize(x, T.IQ3_S)[0]
    qs, signs = raw[2:66], raw[74:106]
    assert np.all(qs[56:64] == 0) and np.all(signs[28:32] == 0)
    alone = x.copy()
    alone[0, :96] = 0.0                                   # sub-blocks 3.. alone start in slot 0
    assert np.count_nonzero(qs[:16]) > 0 and np.count_nonzero(formats.quantize(alone, T.IQ3_S)[0, 2:66][40:]) == 0


# ------------------------------------------------------------------------------------------- decoders



@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decoders_are_bit_identical_to_gguf_py(qtype):
    fmt = formats.FORMATS[qtype]
    quantized = np.concatenate([fmt.quantize(DATA[name](6, 512, 3)) for name in DATA])
    rng = np.random.default_rng(5)
    random_bytes = rng.integers(0, 256, (24, fmt.row_bytes(512)), dtype=np.uint8)
    random_bytes.reshape(-1, fmt.type_size)[:, :2].view(np.uint16)[:, 0] = np.resize(EDGE_HALVES, 48)
    for raw in (quantized, random_bytes):
        with np.errstate(all="ignore"):
            expected = gguf.quants.dequantize(raw, qtype).reshape(raw.shape[0], 512)
        ours = formats.decode(raw, qtype, 512)
        np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))


# ------------------------------------------------------------------------------------------- reconstruction

# Without an imatrix, on N(0, 1) rows (64 x 2048, seed 3), measured: largest |error| / super-block absmax 0.503
# (IQ3_XXS) and 0.381 (IQ3_S); relative RMSE per super-block 0.213 / 0.165 on average. The grid has no closed-form
# bound (a group off the grid moves to a neighbour several levels away), so these are the measured values + ~10 %.
MAX_ERROR_PER_ABSMAX = {T.IQ3_XXS: 0.56, T.IQ3_S: 0.42}
MEAN_RELATIVE_RMSE = {T.IQ3_XXS: 0.235, T.IQ3_S: 0.182}


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_decode_of_encode_is_within_the_measured_error(qtype):
    x = gaussian(64, 2048, 3)
    y = formats.decode(formats.quantize(x, qtype), qtype, 2048)
    err = (y - x).reshape(64, -1, 256)
    blocks = x.reshape(64, -1, 256)
    assert (np.abs(err).max(-1) / np.abs(blocks).max(-1)).max() < MAX_ERROR_PER_ABSMAX[qtype]
    relative = np.sqrt((err ** 2).mean(-1) / (blocks ** 2).mean(-1))
    assert relative.mean() < MEAN_RELATIVE_RMSE[qtype]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zero_rows_decode_to_zero_and_signs_survive(qtype):
    x = gaussian(3, 512, 9)
    x[1] = 0.0
    y = formats.decode(formats.quantize(x, qtype), qtype, 512)
    assert np.all(y[1] == 0)
    big = np.abs(x) > 1.0                                   # values well above the step keep their sign
    assert np.mean(np.sign(y[big]) == np.sign(x[big])) > 0.99


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_imatrix_moves_the_error_to_unimportant_columns(qtype):
    x = gaussian(32, 1024, 2)
    w = np.ones(1024, np.float32)
    w[::2] = 1e-3
    y = formats.decode(formats.quantize(x, qtype, w), qtype, 1024)
    err = (y - x) ** 2
    assert err[:, 1::2].mean() < 0.8 * err[:, ::2].mean()
