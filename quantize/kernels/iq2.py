"""IQ2_XXS, IQ2_XS and IQ2_S: 256-element super-blocks whose groups of 8 magnitudes are points of a 2-bit lattice
grid (256, 512 or 1024 of the 3**8 points with coordinates 1, 3, 5), a sign per value and a 4-bit scale per 32
(IQ2_XXS) or 16 (IQ2_XS, IQ2_S) values (ggml-quants.c: quantize_row_iq2_{xxs,xs,s}_impl, dequantize_row_iq2_*).

Quantizing a group rounds it to the nearest lattice point; when that point is not on the grid the group takes the
grid point among the point's precomputed neighbours (the nearest one or two distance shells, as iq2xs_init_impl
builds them) with the least weighted error at the trial scale. The scale is searched over 13 (IQ2_XXS) or 19
candidates. IQ2_XXS and IQ2_XS store 7 signs per group and make the eighth implicit (an even count of negatives:
the least important value flips sign when the count is odd); IQ2_S stores all 8.

llama.cpp refuses IQ2_XXS and IQ2_XS without an importance matrix (ggml_quantize_requires_imatrix); IQ2_S falls
back to the weights 0.25*sigma2 + x**2.

The grids come from gguf-py (its dequantizers' tables, the 2-bit codes of ggml's kgrid_2bit_*); the on-grid index
and neighbour lists are built from them once per process, in numpy, and passed to the kernels as arguments (numba
would freeze them into every cached kernel otherwise). Public kernels are plain functions with the house signature
``kernel(x, imatrix, out)`` / ``kernel(raw, out)`` that hand the tables to the compiled row-parallel code.

Laid out for speed rather than as the C reads, with every float operation and its order kept: the candidate scales
of a sub-block are snapped side by side (one vectorized rounding loop across them), their least-squares sums run
together (independent chains overlap, each still in element order) before ggml's sequential choice among them,
and a neighbour search scores all candidates of a list at once from a coordinate-major copy of their points.
On one 4096x4096 matrix with an imatrix, one thread each, CPU time against ggml_quantize_chunk went from about
1.2x/1.0x/1.0x ggml's (IQ2_XXS/IQ2_XS/IQ2_S, a direct port) to 0.73x/0.53x/0.79x (2.75/4.04/2.14 s against
3.77/7.64/2.70 s, 2 busy cores); rows run in parallel on top of that.
"""

from __future__ import annotations

from typing import NamedTuple

import gguf
import numpy as np
from numba import njit, prange

from .common import (F32, GROUP_MAX_EPS, IQ2_S_BYTES, IQ2_XS_BYTES, IQ2_XXS_BYTES, QK_K, fp16_bits_to_fp32,
                     magnitudes_and_signs, make_qp_quants, nearest_int, store_fp16, sum_of_squares)

GROUP_MAX_EPS_IQ2_S = F32(1e-8)
FLT_MAX = F32(3.4028234663852886e38)
GRID_BYTE_VALUES = (0x08, 0x19, 0x2B)   # what a lattice coordinate 1, 3, 5 decodes to (iq2*_grid bytes)
KEY_SPACE = 1 << 16                     # a group's 8 codes, 2 bits each


class Lattice(NamedTuple):
    """One grid and what the encoder needs to search it."""

    points: np.ndarray            # int8 [grid, 8]: odd coordinates 1, 3, 5
    index_of: np.ndarray          # int32 [KEY_SPACE]: grid index of a packed key, or -1 off the grid
    neighbour_start: np.ndarray   # int32 [KEY_SPACE + 1]: CSR offsets into `neighbours` (empty on the grid)
    neighbours: np.ndarray        # int32: grid indices, nearest first, ties by index (qsort on (d2, index))
    # float32: the neighbours' coordinates, each key's list stored coordinate-major (all first coordinates, then
    # all second ones, ...) so that the search runs over the candidates in the inner, vectorizable loop
    neighbour_coords: np.ndarray
    longest: int                  # the longest neighbour list (scratch size)
    values: np.ndarray            # float32 [grid, 8]: the decoded bytes (0x08, 0x19, 0x2b)


def _grid_keys(quant_class) -> np.ndarray:
    """kgrid_2bit_*: gguf-py stores each grid point as 4 hex digits, 2 bits per coordinate, low bits first, which
    is exactly ggml's packed key."""
    return np.frombuffer(bytes.fromhex(quant_class.grid_hex.decode()), dtype="<u2").astype(np.int64)


def _digits(keys: np.ndarray) -> np.ndarray:
    return (keys[:, None] >> (2 * np.arange(8))) & 3


def build_lattice(keys: np.ndarray, shells: int) -> Lattice:
    """What iq2xs_init_impl builds: for every lattice point off the grid, the grid points within its `shells`
    nearest distinct squared distances, sorted by (distance, index). Only keys with every code <= 2 are ever
    looked up (the encoder clamps codes to 0..2), so only those get lists."""
    size = len(keys)
    points = (2 * _digits(keys) + 1).astype(np.int8)
    index_of = np.full(KEY_SPACE, -1, np.int32)
    index_of[keys] = np.arange(size, dtype=np.int32)

    all_keys = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8) % 3) << (2 * np.arange(8))
    all_keys = all_keys.sum(axis=1)
    off_grid = np.sort(all_keys[index_of[all_keys] < 0])
    pos = (2 * _digits(off_grid) + 1).astype(np.float64)
    grid = points.astype(np.float64)
    # |p - g|^2 through one matrix product: exact, every term is a small integer
    d2 = ((pos ** 2).sum(1)[:, None] + (grid ** 2).sum(1)[None, :] - 2 * pos @ grid.T).round().astype(np.int64)
    order = np.sort(d2 * size + np.arange(size), axis=1)
    sorted_d2 = order // size
    threshold = sorted_d2[:, 0].copy()
    for _ in range(shells - 1):
        farther = np.where(sorted_d2 > threshold[:, None], sorted_d2, np.iinfo(np.int64).max)
        threshold = farther.min(axis=1)
    counts = (sorted_d2 <= threshold[:, None]).sum(axis=1)

    per_key = np.zeros(KEY_SPACE, np.int64)
    per_key[off_grid] = counts
    neighbour_start = np.zeros(KEY_SPACE + 1, np.int32)
    neighbour_start[1:] = np.cumsum(per_key)
    keep = np.arange(size)[None, :] < counts[:, None]
    neighbours = (order % size)[keep].astype(np.int32)   # row-major: key order, then (distance, index)

    coords = np.empty(8 * len(neighbours), np.float32)
    for key, count in zip(off_grid, counts):
        start = neighbour_start[key]
        coords[8 * start:8 * (start + count)] = points[neighbours[start:start + count]].T.reshape(-1)

    values = np.array(GRID_BYTE_VALUES, np.float32)[_digits(keys)]
    return Lattice(points, index_of, neighbour_start, neighbours, neighbour_coords=coords, longest=int(counts.max()),
                   values=values)


# nwant in iq2xs_init_impl: two distance shells for the 256- and 512-point grids, one for the 1024-point grid
XXS = build_lattice(_grid_keys(gguf.quants.IQ2_XXS), shells=2)
XS = build_lattice(_grid_keys(gguf.quants.IQ2_XS), shells=2)
S = build_lattice(_grid_keys(gguf.quants.IQ2_S), shells=1)

# ksigns_iq2xs: 7 stored sign bits, the eighth their parity (an even number of negatives)
SIGNS = np.array([i | (bin(i).count("1") & 1) << 7 for i in range(128)], np.uint8)


# ------------------------------------------------------------------------------------------- encoder pieces

@njit(cache=True, inline="always")
def _round_to_lattice(x, inv_scale):
    """The lattice code 0..2 of a magnitude at scale 1/inv_scale: x ~ scale * (2*code + 1)."""
    return max(0, min(2, nearest_int(F32(0.5) * (inv_scale * x - F32(1.0)))))


@njit(cache=True, inline="always")
def _best_neighbour(xval, waux, off, scale, key, tables, d2):
    """The grid point, among the off-grid `key`'s neighbours, with the least sum of (waux*(scale*q - x))*(scale*q - x)
    over xval[off:off+8]: each candidate's sum in coordinate order as ggml adds it, the candidates side by side (the
    vectorizable inner loop; d2 is scratch), ties to the first listed. `tables`: (points, index_of,
    neighbour_start, neighbours, coords) of a Lattice."""
    neighbour_start, neighbours, coords = tables[2], tables[3], tables[4]
    start = neighbour_start[key]
    count = neighbour_start[key + 1] - start
    for t in range(count):
        d2[t] = F32(0.0)
    for i in range(8):
        xi = xval[off + i]
        wi = waux[off + i]
        q = coords[8 * start + i * count:8 * start + (i + 1) * count]
        for t in range(count):
            diff = scale * q[t] - xi
            d2[t] += (wi * diff) * diff
    best = FLT_MAX
    pick = 0            # every distance inf/NaN: ggml aborts (GGML_ASSERT); unreachable for fp16-range data
    for t in range(count):
        if d2[t] < best:
            best = d2[t]
            pick = t
    return neighbours[start + pick]


@njit(cache=True, inline="always")
def _snap_group(xval, waux, off, inv_scale, scale, codes, tables, d2):
    """Rounds the 8 magnitudes xval[off:off+8] to lattice codes (written to codes[off:off+8]); off the grid,
    replaces them by the best neighbour at `scale`."""
    key = 0
    for i in range(8):
        l = _round_to_lattice(xval[off + i], inv_scale)
        codes[off + i] = l
        key |= l << (2 * i)
    if tables[1][key] < 0:
        g = _best_neighbour(xval, waux, off, scale, key, tables, d2)
        for i in range(8):
            codes[off + i] = (tables[0][g, i] - 1) // 2


@njit(cache=True, inline="always")
def _snap_trials(xval, waux, off, inv_scales, scales, trials, keys, on_grid, group, tables, d2):
    """_snap_group for every trial scale at once: trials[off + i, t] receives the codes of trial t (trials
    side by side, so the rounding runs vectorized across them); on_grid[t, group] whether its rounded point was
    on the grid."""
    steps = inv_scales.shape[0]
    for t in range(steps):
        keys[t] = 0
    for i in range(8):
        x = xval[off + i]
        for t in range(steps):
            l = _round_to_lattice(x, inv_scales[t])
            trials[off + i, t] = l
            keys[t] |= l << (2 * i)
    for t in range(steps):
        on_grid[t, group] = tables[1][keys[t]] >= 0
        if not on_grid[t, group]:
            g = _best_neighbour(xval, waux, off, scales[t], keys[t], tables, d2)
            for i in range(8):
                trials[off + i, t] = (tables[0][g, i] - 1) // 2


@njit(cache=True, inline="always")
def _fit(weight, xval, codes, n):
    """The weighted least-squares sums of x against the lattice values q = 2*code + 1."""
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(n):
        w = weight[i]
        q = F32(2 * codes[i] + 1)
        sumqx += (w * xval[i]) * q
        sumq2 += (w * q) * q
    return sumqx, sumq2


@njit(cache=True, inline="always")
def _fit_trials(weight, xval, trials, n, sums):
    """_fit for every trial (column of `trials`) at once, into sums[0] (sum q*x) and sums[1] (sum q*q): each sum
    still runs in element order, as ggml's does, but the trials' independent chains overlap."""
    steps = trials.shape[1]
    for t in range(steps):
        sums[0, t] = F32(0.0)
        sums[1, t] = F32(0.0)
    for i in range(n):
        w = weight[i]
        wx = w * xval[i]
        for t in range(steps):
            q = F32(2 * trials[i, t] + 1)
            sums[0, t] += wx * q
            sums[1, t] += (w * q) * q


@njit(cache=True, inline="always")
def _group_max(xval, n):
    vmax = xval[0]
    for i in range(1, n):
        vmax = vmax if vmax > xval[i] else xval[i]
    return vmax


@njit(cache=True, inline="always")
def _imatrix_weights(xb, qw, sigma2, weight, waux):
    for i in range(xb.shape[0]):
        weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i])
        waux[i] = np.sqrt(weight[i])


@njit(cache=True, inline="always")
def _scale_code(inv_d, scale):
    """The 4-bit sub-block scale: scale ~ d * (2*code + 1)."""
    return max(0, min(15, nearest_int(F32(0.5) * (inv_d * scale - F32(1.0)))))


@njit(cache=True, inline="always")
def _trial_scales(first, center, denominator, scratch):
    """Candidate scales 1/inv with inv = (5 + 0.1*step)/denominator, step = first .. first + count - 1."""
    inv_scales, scales = scratch[2], scratch[3]
    for t in range(inv_scales.shape[0]):
        inv_scales[t] = (center + F32(first + t) * F32(0.1)) / denominator
        scales[t] = F32(1.0) / inv_scales[t]


@njit(cache=True, inline="always")
def _pick_trial(sums, best, scale):
    """ggml's sequential choice among the trials: the first strictly better sum_qx^2/sum_q2. Returns the trial (or
    -1: none) and its scale."""
    chosen = -1
    for t in range(sums.shape[1]):
        sumqx = sums[0, t]
        sumq2 = sums[1, t]
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            chosen = t
    return chosen, scale


@njit(cache=True, error_model="numpy")
def _fit_32(xval, weight, waux, codes, scratch, qp_codes, tables, d2):
    """IQ2_XXS sub-block of 32: the scale (codes in `codes`), or (0, False) for a sub-block stored as zeros.
    The 13 candidates are spread around make_qp_quants' estimate; the winner's scale then re-snaps every group.
    `scratch`: (trials [32, 13], sums [2, 13], inverse scales [13], scales [13], keys [13], on-grid flags [13, 4])."""
    if _group_max(xval, 32) < GROUP_MAX_EPS:
        return F32(0.0), False
    scale = make_qp_quants(32, 4, xval, qp_codes, weight)
    eff_max = scale * F32(3.0)
    if eff_max <= 0:
        return F32(0.0), False
    trials, sums, inv_scales, scales, keys, on_grid = scratch
    _trial_scales(-6, F32(5.0), eff_max, scratch)
    for k in range(4):
        _snap_trials(xval, waux, 8 * k, inv_scales, scales, trials, keys, on_grid, k, tables, d2)
    _fit_trials(weight, xval, trials, 32, sums)
    chosen, scale = _pick_trial(sums, F32(0.0), scale)
    if chosen >= 0:
        codes[:32] = trials[:, chosen]
    if scale > 0:
        inv = F32(1.0) / scale
        for k in range(4):
            _snap_group(xval, waux, 8 * k, inv, scale, codes, tables, d2)
        sumqx, sumq2 = _fit(weight, xval, codes, 32)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale, True


@njit(cache=True, error_model="numpy")
def _fit_16(xval, weight, waux, codes, scratch, eps, tables, d2):
    """IQ2_XS / IQ2_S sub-block of 16: the scale (codes in `codes`), or (0, False) for one stored as zeros. The
    19 candidates are spread around max/5; only groups the winner had to move off their rounding are re-snapped.
    `scratch`: (trials [16, 19], sums [2, 19], inverse scales [19], scales [19], keys [19], on-grid flags [19, 2])."""
    for i in range(16):
        codes[i] = 0
    vmax = _group_max(xval, 16)
    if vmax < eps:
        return F32(0.0), False
    trials, sums, inv_scales, scales, keys, on_grid = scratch
    _trial_scales(-9, F32(5.0), vmax, scratch)
    for k in range(2):
        _snap_trials(xval, waux, 8 * k, inv_scales, scales, trials, keys, on_grid, k, tables, d2)
    _fit_trials(weight, xval, trials, 16, sums)
    chosen, scale = _pick_trial(sums, F32(0.0), vmax / F32(5.0))
    moved0 = False
    moved1 = False
    if chosen >= 0:
        codes[:16] = trials[:, chosen]
        moved0 = not on_grid[chosen, 0]
        moved1 = not on_grid[chosen, 1]
    if (moved0 or moved1) and scale > 0:
        inv = F32(1.0) / scale
        if moved0:
            _snap_group(xval, waux, 0, inv, scale, codes, tables, d2)
        if moved1:
            _snap_group(xval, waux, 8, inv, scale, codes, tables, d2)
        sumqx, sumq2 = _fit(weight, xval, codes, 16)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale, True


@njit(cache=True, inline="always")
def _trial_scratch(n, steps, groups):
    return (np.zeros((n, steps), np.int64), np.empty((2, steps), np.float32), np.empty(steps, np.float32),
            np.empty(steps, np.float32), np.empty(steps, np.int64), np.empty((steps, groups), np.bool_))


@njit(cache=True, inline="always")
def _grid_index(codes, off, index_of):
    key = 0
    for i in range(8):
        key |= np.int64(codes[off + i]) << (2 * i)
    return index_of[key]


# ------------------------------------------------------------------------------------------- encoders

@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq2_xxs(x, imatrix, out, tables, longest):
    rows, n = x.shape
    for r in prange(rows):
        d2 = np.empty(longest, np.float32)
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        codes = np.zeros(32, np.int64)
        scratch = _trial_scratch(32, 13, 4)
        qp_codes = np.empty(32, np.uint8)
        signs = np.empty(4, np.int64)
        scales = np.empty(8, np.float32)
        words = np.empty(16, np.int64)        # per 32 values: 4 grid bytes, then 4x7 sign bits | scale << 28
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ2_XXS_BYTES * ibl:IQ2_XXS_BYTES * (ibl + 1)]
            sigma2 = sum_of_squares(xs) / F32(QK_K)
            words[:] = 0
            max_scale = F32(0.0)
            for ib in range(8):
                xb = xs[32 * ib:32 * (ib + 1)]
                _imatrix_weights(xb, imatrix[QK_K * ibl + 32 * ib:QK_K * ibl + 32 * (ib + 1)], sigma2, weight, waux)
                magnitudes_and_signs(xb, weight, xval, signs, True)
                scale, kept = _fit_32(xval, weight, waux, codes, scratch, qp_codes, tables, d2)
                if not kept:
                    scales[ib] = F32(0.0)
                    continue
                if scale < 0:   # "should never happen" in ggml; it flips the stored signs to keep the scale positive
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k] & 127
                for k in range(4):
                    words[2 * ib] |= np.int64(_grid_index(codes, 8 * k, tables[1])) << (8 * k)
                    words[2 * ib + 1] |= signs[k] << (7 * k)
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            blk[0] = 0
            blk[1] = 0
            if max_scale == 0:
                blk[2:] = 0
                continue
            d = max_scale / F32(31.0)
            store_fp16(blk, 0, d)
            inv_d = F32(1.0) / d
            for ib in range(8):
                words[2 * ib + 1] |= np.int64(_scale_code(inv_d, scales[ib])) << 28
            for w in range(16):
                for b in range(4):
                    blk[2 + 4 * w + b] = (words[w] >> (8 * b)) & 0xFF


@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq2_xs(x, imatrix, out, tables, longest):
    rows, n = x.shape
    for r in prange(rows):
        d2 = np.empty(longest, np.float32)
        weight = np.empty(16, np.float32)
        waux = np.empty(16, np.float32)
        xval = np.empty(16, np.float32)
        codes = np.zeros(16, np.int64)
        scratch = _trial_scratch(16, 19, 2)
        signs = np.empty(2, np.int64)
        scales = np.empty(16, np.float32)
        groups = np.empty(32, np.int64)      # per 8 values: grid index (9 bits) | signs << 9
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ2_XS_BYTES * ibl:IQ2_XS_BYTES * (ibl + 1)]
            sigma2 = sum_of_squares(xs) / F32(QK_K)
            groups[:] = 0
            max_scale = F32(0.0)
            for ib in range(16):
                xb = xs[16 * ib:16 * (ib + 1)]
                _imatrix_weights(xb, imatrix[QK_K * ibl + 16 * ib:QK_K * ibl + 16 * (ib + 1)], sigma2, weight, waux)
                magnitudes_and_signs(xb, weight, xval, signs, True)
                scale, kept = _fit_16(xval, weight, waux, codes, scratch, GROUP_MAX_EPS, tables, d2)
                if not kept:
                    scales[ib] = F32(0.0)
                    continue
                if scale < 0:
                    scale = -scale
                    for k in range(2):
                        signs[k] = ~signs[k] & 127
                for k in range(2):
                    groups[2 * ib + k] = np.int64(_grid_index(codes, 8 * k, tables[1])) | (signs[k] << 9)
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            blk[:] = 0
            if max_scale == 0:
                continue
            d = max_scale / F32(31.0)
            store_fp16(blk, 0, d)
            inv_d = F32(1.0) / d
            for g in range(32):
                blk[2 + 2 * g] = groups[g] & 0xFF
                blk[3 + 2 * g] = groups[g] >> 8
            for ib in range(16):
                blk[66 + ib // 2] |= _scale_code(inv_d, scales[ib]) << (4 * (ib % 2))


@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq2_s(x, imatrix, out, tables, longest):
    # block: d, qs[32] (low 8 bits of the grid index per group), signs[32], qh[8] (2 high bits each), scales[8]
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        d2 = np.empty(longest, np.float32)
        weight = np.empty(16, np.float32)
        waux = np.empty(16, np.float32)
        xval = np.empty(16, np.float32)
        codes = np.zeros(16, np.int64)
        scratch = _trial_scratch(16, 19, 2)
        scales = np.empty(16, np.float32)
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ2_S_BYTES * ibl:IQ2_S_BYTES * (ibl + 1)]
            blk[:] = 0
            sigma2 = F32(2.0) * sum_of_squares(xs) / F32(QK_K)
            max_scale = F32(0.0)
            for ib in range(16):
                xb = xs[16 * ib:16 * (ib + 1)]
                if use_imatrix:
                    _imatrix_weights(xb, imatrix[QK_K * ibl + 16 * ib:QK_K * ibl + 16 * (ib + 1)], sigma2,
                                     weight, waux)
                else:
                    for i in range(16):
                        weight[i] = F32(0.25) * sigma2 + xb[i] * xb[i]
                        waux[i] = np.sqrt(weight[i])
                for i in range(16):
                    xval[i] = xb[i] if xb[i] >= 0 else -xb[i]
                scale, kept = _fit_16(xval, weight, waux, codes, scratch, GROUP_MAX_EPS_IQ2_S, tables, d2)
                if not kept:
                    scales[ib] = F32(0.0)
                    continue
                flip = 0
                if scale < 0:
                    scale = -scale
                    flip = 0xFF
                for k in range(2):
                    g = 2 * ib + k
                    index = np.int64(_grid_index(codes, 8 * k, tables[1]))
                    s = 0
                    for i in range(8):
                        if xb[8 * k + i] < 0:
                            s |= 1 << i
                    blk[2 + g] = index & 0xFF
                    blk[66 + g // 4] |= (index >> 8) << (2 * (g % 4))
                    blk[34 + g] = s ^ flip
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == 0:
                continue   # groups already stored stay, under a zero d
            d = max_scale / F32(31.0)
            store_fp16(blk, 0, d * F32(0.9875))
            inv_d = F32(1.0) / d
            for ib in range(16):
                blk[74 + ib // 2] |= _scale_code(inv_d, scales[ib]) << (4 * (ib % 2))


def _with(lattice: Lattice):
    return (lattice.points, lattice.index_of, lattice.neighbour_start, lattice.neighbours,
            lattice.neighbour_coords), lattice.longest


def quantize_iq2_xxs(x, imatrix, out):
    _encode_iq2_xxs(x, imatrix, out, *_with(XXS))


def quantize_iq2_xs(x, imatrix, out):
    _encode_iq2_xs(x, imatrix, out, *_with(XS))


def quantize_iq2_s(x, imatrix, out):
    _encode_iq2_s(x, imatrix, out, *_with(S))


# ------------------------------------------------------------------------------------------- decoders

@njit(cache=True, inline="always")
def _half(blk, offset):
    return fp16_bits_to_fp32(np.int64(blk[offset]) | (np.int64(blk[offset + 1]) << 8))


@njit(cache=True, inline="always")
def _put_group(y, off, dl, values, g, signs):
    for j in range(8):
        v = dl * values[g, j]
        y[off + j] = -v if (signs >> j) & 1 else v


@njit(cache=True, inline="always")
def _sub_scale(d, code):
    return d * (F32(0.5) + F32(code)) * F32(0.25)


@njit(parallel=True, cache=True)
def _decode_iq2_xxs(raw, out, values, sign_table):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ2_XXS_BYTES * ibl:IQ2_XXS_BYTES * (ibl + 1)]
            d = _half(blk, 0)
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for ib in range(8):
                base = 2 + 8 * ib
                word = (np.int64(blk[base + 4]) | (np.int64(blk[base + 5]) << 8) | (np.int64(blk[base + 6]) << 16)
                        | (np.int64(blk[base + 7]) << 24))
                dl = _sub_scale(d, word >> 28)
                for k in range(4):
                    _put_group(y, 32 * ib + 8 * k, dl, values, blk[base + k], sign_table[(word >> (7 * k)) & 127])


@njit(parallel=True, cache=True)
def _decode_iq2_xs(raw, out, values, sign_table):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ2_XS_BYTES * ibl:IQ2_XS_BYTES * (ibl + 1)]
            d = _half(blk, 0)
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for g in range(32):
                group = np.int64(blk[2 + 2 * g]) | (np.int64(blk[3 + 2 * g]) << 8)
                dl = _sub_scale(d, (np.int64(blk[66 + g // 4]) >> (4 * ((g // 2) % 2))) & 0xF)
                _put_group(y, 8 * g, dl, values, group & 511, sign_table[group >> 9])


@njit(parallel=True, cache=True)
def _decode_iq2_s(raw, out, values):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ2_S_BYTES * ibl:IQ2_S_BYTES * (ibl + 1)]
            d = _half(blk, 0)
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for g in range(32):
                index = np.int64(blk[2 + g]) | (((np.int64(blk[66 + g // 4]) >> (2 * (g % 4))) & 3) << 8)
                dl = _sub_scale(d, (np.int64(blk[74 + g // 4]) >> (4 * ((g // 2) % 2))) & 0xF)
                _put_group(y, 8 * g, dl, values, index, np.int64(blk[34 + g]))


def decode_iq2_xxs(raw, out):
    _decode_iq2_xxs(raw, out, XXS.values, SIGNS)


def decode_iq2_xs(raw, out):
    _decode_iq2_xs(raw, out, XS.values, SIGNS)


def decode_iq2_s(raw, out):
    _decode_iq2_s(raw, out, S.values)
