"""qtool.evaluate.matvec: the mat-vec kernels against formats.decode + a float64 product.

The bound. A kernel decodes each weight with decode.py's float32 operations (an FMA may skip the rounding of
d*q before "- m") and sums the products x*w in float32 along a fixed order: per lane a balanced tree of 8 or 16
products, added into the lane's accumulator once per 128-256 columns, the lanes summed pairwise at the end, tiles
of columns added into out. For a row of n columns that is a float32 sum of depth at most
n/128 + 4 (tree) + 5 (lanes) + 3 (tiles) + 2 (decode), about 60 at n = 6464, so |error| <= 60 * 2**-24 * S = 3.6e-6 S
with S = sum_j |x_j| |W_rj| (the standard bound of a float32 sum, relative to the sum of absolute terms). The tests
use 1e-5 * S: the float32 bound with margin, and orders of magnitude below what a wrong value, block or row
changes (test_a_changed_byte_changes_the_product checks that such a change exceeds it).
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.evaluate import matvec
from qtool.quantize import formats

RELATIVE_BOUND = 1e-5


def _shapes(qtype: T) -> list[tuple[int, int]]:
    """(n_out, n_in): a small matrix (the serial kernels: < PARALLEL_MIN_WEIGHTS weights), a model-like one, and a
    wide one whose columns take two or more tiles for every B, with a tail of blocks (or values) after the last
    group of 256 where the type allows one."""
    block = formats.block_size(qtype)
    if block == 256:
        shapes = [(96, 512), (384, 2816), (260, 4096), (170, 6400)]
    elif block == 32:
        shapes = [(96, 512), (256, 4160), (164, 6464)]
    else:
        shapes = [(96, 520), (256, 4100), (164, 6405)]
    assert shapes[0][0] * shapes[0][1] < matvec.PARALLEL_MIN_WEIGHTS
    assert all(n_out * n_in >= matvec.PARALLEL_MIN_WEIGHTS for n_out, n_in in shapes[1:])
    return shapes


def _weights(rng: np.random.Generator, n_out: int, n_in: int) -> np.ndarray:
    """Rows with a spread of scales (2**-6 .. 2**6), columns with a spread too, an all-zero row and an outlier."""
    w = rng.standard_normal((n_out, n_in)) * np.exp2(rng.uniform(-6, 6, (n_out, 1)))
    w *= np.exp2(rng.uniform(-2, 2, (1, n_in)))
    w[1] = 0.0
    w[2, n_in // 3] = 1e3
    return w.astype(np.float32)


def _stored(rng: np.random.Generator, qtype: T, n_out: int, n_in: int) -> np.ndarray:
    raw = np.ascontiguousarray(formats.quantize(_weights(rng, n_out, n_in), qtype))
    raw.setflags(write=False)      # as the rows of a memory-mapped GGUF are (and the kernels' cached builds expect)
    return raw


def _check(kernel, raw: np.ndarray, qtype: T, x: np.ndarray) -> np.ndarray:
    n_out, n_in = raw.shape[0], x.shape[1]
    w = formats.decode(raw, qtype, n_in).astype(np.float64)
    out = np.full((x.shape[0], n_out), np.nan, np.float32)
    kernel(raw, x, out)
    exact = x.astype(np.float64) @ w.T
    bound = RELATIVE_BOUND * (np.abs(x).astype(np.float64) @ np.abs(w).T)
    error = np.abs(out.astype(np.float64) - exact)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (f"{qtype.name} {n_out}x{n_in} B={x.shape[0]}: out{list(worst)} = {out[worst]}, "
                                    f"exact {exact[worst]}, error {error[worst]:.3g} > bound {bound[worst]:.3g}")
    return out


@pytest.mark.slow          # numba compiles 8 builds per type (B = 1..4, parallel and serial): ~20-45 s each
@pytest.mark.parametrize("qtype", matvec.SUPPORTED, ids=lambda t: t.name)
def test_the_product_is_the_decoded_weights_product(qtype):
    rng = np.random.default_rng(int(qtype))
    kernel = matvec.kernel_for(qtype)
    assert kernel is not None
    for n_out, n_in in _shapes(qtype):
        raw = _stored(rng, qtype, n_out, n_in)
        for rows in range(1, matvec.MAX_ROWS + 1):
            x = rng.standard_normal((rows, n_in)).astype(np.float32) * np.exp2(rng.uniform(-3, 3, (rows, 1)))
            x = np.ascontiguousarray(x, dtype=np.float32)
            out = _check(kernel, raw, qtype, x)
            assert np.all(out[:, 1] == 0.0)           # the all-zero row: every product is an exact zero


@pytest.mark.parametrize("qtype", matvec.SUPPORTED, ids=lambda t: t.name)
def test_a_changed_byte_changes_the_product(qtype):
    """One stored byte changed (in the quants or in a block scale) moves that row's result by far more than the
    bound, to the product of the changed weights; no other row moves. A kernel reading a wrong byte, value or block
    fails the first test."""
    rng = np.random.default_rng(100 + int(qtype))
    n_out, n_in = _shapes(qtype)[0]
    raw = _stored(rng, qtype, n_out, n_in)
    x = (rng.choice([-1.0, 1.0], (1, n_in)) * (1 + rng.random((1, n_in)))).astype(np.float32)    # |x| in [1, 2)
    kernel = matvec.kernel_for(qtype)
    before = _check(kernel, raw, qtype, x)
    fmt = formats.format_for(qtype)
    middle = raw.shape[1] // fmt.type_size // 2 * fmt.type_size                  # first byte of a middle block
    offsets = [middle + fmt.type_size - 3]                                       # quants (F16/BF16: a value)
    offsets += [middle + h + 1 for h in fmt.half_offsets]                       # high byte of each fp16 scale
    w = formats.decode(raw, qtype, n_in).astype(np.float64)
    bound = RELATIVE_BOUND * float(np.abs(x[0]).astype(np.float64) @ np.abs(w[5]))
    for offset in offsets:
        for flip in (0x15, 0x01):                                                # 0x01 where 0x15 makes an inf
            changed = raw.copy()
            changed[5, offset] ^= flip
            changed.setflags(write=False)
            if np.all(np.isfinite(formats.decode(changed, qtype, n_in))):
                break
        after = _check(kernel, changed, qtype, x)
        assert abs(float(after[0, 5]) - float(before[0, 5])) > 10 * bound, offset
        np.testing.assert_array_equal(np.delete(after, 5, axis=1), np.delete(before, 5, axis=1))


def widening_differences() -> int:
    """The fp16 patterns whose widening by the kernels (scalar, and four at once for legacy block scales) differs
    from qtool's reference, common.fp16_bits_to_fp32, over all 65536 patterns: zeros, subnormals, normals,
    infinities, NaN payloads. Bit for bit, but where the kernels convert with F16C (matvec.HAS_F16C) a signalling
    NaN comes back quiet, as vcvtph2ps returns it; any other difference counts."""
    from numba import njit

    from qtool.quantize.kernels.common import fp16_bits_to_fp32

    @njit
    def widen_all(halves, reference, scalar, vector):
        for i in range(halves.size):
            reference[i] = fp16_bits_to_fp32(halves[i])
            scalar[i] = matvec._f16_to_f32(halves[i])
        for i in range(0, halves.size, 4):
            vector[i], vector[i + 1], vector[i + 2], vector[i + 3] = matvec._f16x4_to_f32(
                halves[i], halves[i + 1], halves[i + 2], halves[i + 3])

    halves = np.arange(1 << 16, dtype=np.uint16)
    reference, scalar, vector = (np.empty(1 << 16, np.float32) for _ in range(3))
    widen_all(halves, reference, scalar, vector)
    quiet = np.where(np.isnan(reference), np.uint32(0x00400000) if matvec.HAS_F16C else np.uint32(0), np.uint32(0))
    want = reference.view(np.uint32) | quiet
    return int(np.count_nonzero(scalar.view(np.uint32) != want) + np.count_nonzero(vector.view(np.uint32) != want))


def test_f16_widening_is_exact_for_every_pattern():
    """On this CPU; tests/test_qdot.py's portable check runs it without F16C."""
    assert widening_differences() == 0


def test_types_without_a_kernel():
    for qtype in (T.F32, T.IQ2_XXS, T.Q2_K, T.Q3_K, T.IQ4_XS):
        assert matvec.kernel_for(qtype) is None, qtype.name
    assert matvec.kernel_for(int(T.Q4_K)) is matvec.kernel_for(T.Q4_K)


def test_shapes_that_do_not_fit_are_refused():
    kernel = matvec.kernel_for(T.Q8_0)
    raw = np.zeros((8, 34 * 4), np.uint8)
    with pytest.raises(ValueError):
        kernel(raw, np.zeros((5, 128), np.float32), np.zeros((5, 8), np.float32))      # more rows than MAX_ROWS
    with pytest.raises(ValueError):
        kernel(raw, np.zeros((1, 96), np.float32), np.zeros((1, 8), np.float32))       # x narrower than the rows
    with pytest.raises(ValueError):
        kernel(raw, np.zeros((1, 128), np.float32), np.zeros((1, 7), np.float32))      # out too short
    with pytest.raises(ValueError):
        kernel(raw, np.zeros((1, 128), np.float64), np.zeros((1, 8), np.float32))      # x not float32
