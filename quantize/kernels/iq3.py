"""IQ3_XXS and IQ3_S: 256-value super-blocks of eight 32-value sub-blocks, each sub-block eight groups of four
magnitudes, each group one point of a fixed grid of 3-bit codes l (value 2l+1): 256 points for IQ3_XXS, 512 for
IQ3_S. Signs, a 4-bit scale per sub-block and one fp16 super-scale d complete a block (ggml-common.h):

* IQ3_XXS, 98 bytes: d; 64 grid indices (8 per sub-block); one little-endian uint32 per sub-block holding four 7-bit
  sign fields and the scale s in its top 4 bits. The eighth sign of each group of eight is the parity of the other
  seven (the encoder flips the least important value to make the count of negatives even). A value decodes as
  d·(0.5+s)·0.5·g, g from a decode grid of 4·(2l+1) (62 for l = 7).
* IQ3_S, 110 bytes: d; 64 low bytes of the 9-bit grid indices; 8 bytes of their high bits (bit k of byte b: group k
  of sub-block b); 32 sign bytes, one bit per value; 4 bytes of two 4-bit scales. A value decodes as d·(1+2s)·(2l+1).

The encoders reproduce ggml-quants.c's quantize_row_iq3_xxs_impl / quantize_row_iq3_s_impl: weights are
imatrix·sqrt(sigma2 + x²), or x² without an imatrix (ggml does not require one for either type); the sub-block's
magnitudes are fitted over candidate scales (31 for IQ3_XXS, 19 for IQ3_S), each value rounded to the nearest odd
level and a group that misses the grid replaced by the best of its precomputed neighbours (the grid points at the two
(IQ3_XXS) or three (IQ3_S) nearest distances, judged with sqrt(weight)); the best weighted least-squares fit wins,
its off-grid groups are re-fitted at the winning scale and the scale fitted once more. d is the largest sub-block
scale / 31 times a fudge factor (1.0125, 1.033), stored fp16, and each sub-block scale is rounded to an odd multiple
of the unrounded d.

One quirk is reproduced on purpose: IQ3_S's encoder moves its grid-index and sign cursors past a sub-block only when
that sub-block is not all zeros, so after an all-zero sub-block the later sub-blocks' low index bytes and signs sit one
slot early (the high index bits do not move). The zero sub-block then decodes to the next one's shape at scale d, and
the last slot stays zero. llama-quantize writes those bytes, so byte identity needs them too.

The grid tables (codes, code -> grid index, off-grid code -> neighbours) are built once, as iq3xs_init_impl builds them
at ggml's start-up, from gguf-py's copies of the grids, and passed to the kernels as arguments.
"""

from __future__ import annotations

from functools import cache

import gguf
import numpy as np
from numba import njit, prange

from .common import (F32, IQ3_S_BYTES, IQ3_XXS_BYTES, QK_K, block_sigma2, fp16_bits_to_fp32, importance_weights,
                     magnitudes_and_signs, nearest_int, store_fp16)

XXS_EPS = F32(1e-8)          # GROUP_MAX_EPS_IQ3_XXS: sub-blocks below this are stored as zeros (IQ3_S tests == 0)
FLT_MAX = F32(np.finfo(np.float32).max)
XXS_STEPS, S_STEPS = 15, 9   # the candidate scales (15 + 0.2·step) / max for step in -STEPS..STEPS
XXS_FUDGE, S_FUDGE = F32(1.0125), F32(1.033)
CODES = 4096                 # four 3-bit codes


@cache
def grid_tables(grid_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(levels int8 [grid_size, 4], index_of int32 [4096], neighbour_start int32 [4097], neighbours int32 [...]) for
    the 256-point (IQ3_XXS) or 512-point (IQ3_S) grid. ``index_of[code]`` is the grid point with those four codes
    (code = l0 | l1<<3 | l2<<6 | l3<<9) or -1; an off-grid code's neighbours are
    ``neighbours[neighbour_start[code]:neighbour_start[code + 1]]``: every grid point whose squared distance to it
    (in odd levels 2l+1) is among the two (256) or three (512) smallest, nearest first, ties by grid index (ggml's
    qsort on (distance, index))."""
    quant = {256: gguf.quants.IQ3_XXS, 512: gguf.quants.IQ3_S}[grid_size]
    quant.init_grid()
    # gguf-py stores the decode values; their rank in its grid_map is the 3-bit code (checked against
    # ggml's kgrid_256/kgrid_512 in tests/test_kernels_iq3.py).
    levels = np.searchsorted(np.asarray(quant.grid_map, np.float32), quant.grid.reshape(grid_size, 4)).astype(np.int8)
    shifts = 3 * np.arange(4)
    index_of = np.full(CODES, -1, np.int32)
    index_of[(levels.astype(np.int64) << shifts).sum(1)] = np.arange(grid_size)

    points = 2 * levels.astype(np.int64) + 1
    code_points = 2 * ((np.arange(CODES)[:, None] >> shifts) & 7) + 1
    dist2 = ((points[None, :, :] - code_points[:, None, :]) ** 2).sum(-1)          # [4096, grid_size]
    order = np.argsort(dist2, axis=1, kind="stable")                                 # ties: lower index first
    ranked = np.take_along_axis(dist2, order, axis=1)
    distinct_rank = np.concatenate([np.ones((CODES, 1), np.int64),
                                    1 + np.cumsum(ranked[:, 1:] > ranked[:, :-1], axis=1)], axis=1)
    wanted = (distinct_rank <= (2 if grid_size == 256 else 3)) & (index_of < 0)[:, None]
    neighbour_start = np.zeros(CODES + 1, np.int32)
    neighbour_start[1:] = np.cumsum(wanted.sum(1))
    neighbours = order[wanted].astype(np.int32)                                      # row by row, nearest first
    return levels, index_of, neighbour_start, neighbours


@cache
def decode_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IQ3_XXS decode grid float32 [256, 4], IQ3_S decode grid float32 [512, 4], ksigns uint8 [128]): gguf-py's."""
    for quant in (gguf.quants.IQ3_XXS, gguf.quants.IQ3_S):
        quant.init_grid()
    return (np.ascontiguousarray(gguf.quants.IQ3_XXS.grid.reshape(256, 4), np.float32),
            np.ascontiguousarray(gguf.quants.IQ3_S.grid.reshape(512, 4), np.float32),
            np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8).copy())


# ------------------------------------------------------------------------------------------- encoding

@njit(cache=True, inline="always")
def _odd_level(inv_scale, v):
    """The code l of the odd level 2l+1 nearest to v·inv_scale, clamped to 0..7."""
    return max(0, min(7, nearest_int(F32(0.5) * (inv_scale * v - F32(1.0)))))


@njit(cache=True)
def _snap_to_neighbour(code, g, xval, waux, scale, levels, neighbour_start, neighbours, L):
    """Replaces the off-grid group g (codes L[4g:4g+4] = `code`) by the neighbour nearest to xval at `scale`,
    distance weighted by waux; the first of equals wins. ggml aborts when no neighbour has a finite distance (an
    inf weight); here the first neighbour is taken."""
    best_d2 = FLT_MAX
    best = neighbours[neighbour_start[code]]
    for t in range(neighbour_start[code], neighbour_start[code + 1]):
        j = neighbours[t]
        d2 = F32(0.0)
        for i in range(4):
            diff = scale * F32(2 * levels[j, i] + 1) - xval[4 * g + i]
            d2 += (waux[4 * g + i] * diff) * diff
        if d2 < best_d2:
            best_d2 = d2
            best = j
    for i in range(4):
        L[4 * g + i] = levels[best, i]


@njit(cache=True, inline="always")
def _group_code(L, g):
    return L[4 * g] | (L[4 * g + 1] << 3) | (L[4 * g + 2] << 6) | (L[4 * g + 3] << 9)


@njit(cache=True, inline="always")
def _fit_sums(weight, xval, L):
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(32):
        w = weight[i]
        q = F32(2 * L[i] + 1)
        sumqx += (w * xval[i]) * q
        sumq2 += (w * q) * q
    return sumqx, sumq2


@njit(cache=True)
def _fit_sub_block(xval, weight, waux, vmax, steps, refit_every_group, levels, index_of, neighbour_start, neighbours,
                   L, on_grid, candidate_codes, candidate_on_grid, sums):
    """Grid codes L[0:32] and the scale for the magnitudes xval of one sub-block (vmax their max). IQ3_XXS re-fits
    only the groups the winning candidate had to snap to a neighbour (and counts every group as on the grid when no
    candidate wins); IQ3_S (``refit_every_group``) re-fits all eight once any is off the grid, or none won.
    Scratch: candidate_codes int32 [2·steps+1, 32], candidate_on_grid bool [2·steps+1, 8], sums float32
    [2, 2·steps+1]."""
    candidates = 2 * steps + 1
    for c in range(candidates):
        inv_scale = (F32(15.0) + F32(c - steps) * F32(0.2)) / vmax
        this_scale = F32(1.0) / inv_scale
        codes = candidate_codes[c]
        for i in range(32):
            codes[i] = _odd_level(inv_scale, xval[i])
        for g in range(8):
            code = _group_code(codes, g)
            candidate_on_grid[c, g] = index_of[code] >= 0
            if not candidate_on_grid[c, g]:
                _snap_to_neighbour(code, g, xval, waux, this_scale, levels, neighbour_start, neighbours, codes)
    # No candidate's sums depend on another's outcome: all are accumulated in one sweep, candidates innermost, each
    # sum still in value order (C's rounding), so the chains pipeline where C waits on two at a time.
    sumqx = sums[0, :candidates]
    sumq2 = sums[1, :candidates]
    sumqx[:] = F32(0.0)
    sumq2[:] = F32(0.0)
    for i in range(32):
        w = weight[i]
        wx = w * xval[i]
        for c in range(candidates):
            q = F32(2 * candidate_codes[c, i] + 1)
            sumqx[c] += wx * q
            sumq2[c] += (w * q) * q
    best = F32(0.0)
    scale = vmax / F32(15.0)
    winner = -1
    for c in range(candidates):   # C's sequential acceptance, in C's order
        if sumq2[c] > 0 and sumqx[c] * sumqx[c] > best * sumq2[c]:
            scale = sumqx[c] / sumq2[c]
            best = scale * sumqx[c]
            winner = c
    for i in range(32):
        L[i] = candidate_codes[winner, i] if winner >= 0 else 0
    for g in range(8):
        on_grid[g] = candidate_on_grid[winner, g] if winner >= 0 else not refit_every_group
    off_grid = 0
    for g in range(8):
        off_grid += not on_grid[g]
    if off_grid > 0 and scale > 0:
        inv_scale = F32(1.0) / scale
        for g in range(8):
            if on_grid[g] and not refit_every_group:
                continue
            for i in range(4):
                L[4 * g + i] = _odd_level(inv_scale, xval[4 * g + i])
            code = _group_code(L, g)
            if index_of[code] < 0:
                _snap_to_neighbour(code, g, xval, waux, scale, levels, neighbour_start, neighbours, L)
        sumqx_final, sumq2_final = _fit_sums(weight, xval, L)
        if sumq2_final > 0:
            scale = sumqx_final / sumq2_final
    return scale


@njit(cache=True, inline="always")
def _fill_weights(xb, qw, use_imatrix, sigma2, weight, waux):
    importance_weights(xb, qw, use_imatrix, sigma2, weight)
    for i in range(32):
        waux[i] = np.sqrt(weight[i])


@njit(cache=True, inline="always")
def _largest(xval):
    vmax = xval[0]
    for i in range(1, 32):
        vmax = vmax if vmax > xval[i] else xval[i]
    return vmax


@njit(cache=True, inline="always")
def _sub_block_scale_code(inv_d, scale):
    return max(0, min(15, nearest_int(F32(0.5) * (inv_d * scale - F32(1.0)))))


@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq3_xxs(x, imatrix, out, levels, index_of, neighbour_start, neighbours):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        L = np.empty(32, np.int32)
        on_grid = np.empty(8, np.bool_)
        candidate_codes = np.empty((2 * XXS_STEPS + 1, 32), np.int32)
        candidate_on_grid = np.empty((2 * XXS_STEPS + 1, 8), np.bool_)
        sums = np.empty((2, 2 * XXS_STEPS + 1), np.float32)
        signs = np.empty(4, np.int64)
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ3_XXS_BYTES * ibl:IQ3_XXS_BYTES * (ibl + 1)]   # d, grid indices [64], sign words [8 x 4]
            for b in range(IQ3_XXS_BYTES):
                blk[b] = 0
            sigma2 = block_sigma2(xs)
            max_scale = F32(0.0)
            for ib in range(8):
                xb = xs[32 * ib:32 * (ib + 1)]
                _fill_weights(xb, imatrix[QK_K * ibl + 32 * ib:QK_K * ibl + 32 * (ib + 1)], use_imatrix, sigma2,
                              weight, waux)
                magnitudes_and_signs(xb, weight, xval, signs, True)
                vmax = _largest(xval)
                if vmax < XXS_EPS:
                    scales[ib] = F32(0.0)
                    continue
                scale = _fit_sub_block(xval, weight, waux, vmax, XXS_STEPS, False, levels, index_of, neighbour_start,
                                       neighbours, L, on_grid, candidate_codes, candidate_on_grid, sums)
                if scale < 0:   # cannot happen with ggml's search, kept as ggml keeps it
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k] & 127
                for g in range(8):
                    blk[2 + 8 * ib + g] = index_of[_group_code(L, g)]
                word = signs[0] | (signs[1] << 7) | (signs[2] << 14) | (signs[3] << 21)
                for b in range(4):
                    blk[66 + 4 * ib + b] = (word >> (8 * b)) & 0xFF
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == 0:
                for b in range(IQ3_XXS_BYTES):
                    blk[b] = 0
                continue
            d = max_scale / F32(31.0)
            store_fp16(blk, 0, d * XXS_FUDGE)
            inv_d = F32(1.0) / d
            for ib in range(8):
                blk[69 + 4 * ib] |= _sub_block_scale_code(inv_d, scales[ib]) << 4


@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq3_s(x, imatrix, out, levels, index_of, neighbour_start, neighbours):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        weight = np.empty(32, np.float32)
        waux = np.empty(32, np.float32)
        xval = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        L = np.empty(32, np.int32)
        on_grid = np.empty(8, np.bool_)
        candidate_codes = np.empty((2 * S_STEPS + 1, 32), np.int32)
        candidate_on_grid = np.empty((2 * S_STEPS + 1, 8), np.bool_)
        sums = np.empty((2, 2 * S_STEPS + 1), np.float32)
        signs = np.empty(4, np.int64)
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ3_S_BYTES * ibl:IQ3_S_BYTES * (ibl + 1)]   # d, qs [64], qh [8], signs [32], scales [4]
            for b in range(IQ3_S_BYTES):
                blk[b] = 0
            sigma2 = block_sigma2(xs)
            max_scale = F32(0.0)
            slot = 0   # where the next sub-block's low index bytes and signs go (see the module note)
            for ib in range(8):
                xb = xs[32 * ib:32 * (ib + 1)]
                _fill_weights(xb, imatrix[QK_K * ibl + 32 * ib:QK_K * ibl + 32 * (ib + 1)], use_imatrix, sigma2,
                              weight, waux)
                magnitudes_and_signs(xb, weight, xval, signs, False)
                vmax = _largest(xval)
                if vmax == 0:
                    scales[ib] = F32(0.0)
                    continue
                scale = _fit_sub_block(xval, weight, waux, vmax, S_STEPS, True, levels, index_of, neighbour_start,
                                       neighbours, L, on_grid, candidate_codes, candidate_on_grid, sums)
                if scale < 0:   # cannot happen (the magnitudes are >= 0), kept as ggml keeps it
                    scale = -scale
                    for k in range(4):
                        signs[k] = ~signs[k] & 0xFF
                for g in range(8):
                    grid_index = index_of[_group_code(L, g)]
                    blk[2 + 8 * slot + g] = grid_index & 0xFF
                    blk[66 + ib] |= (grid_index >> 8) << g
                for k in range(4):
                    blk[74 + 4 * slot + k] = signs[k]
                slot += 1
                scales[ib] = scale
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == 0:
                continue
            d = max_scale / F32(31.0)
            store_fp16(blk, 0, d * S_FUDGE)
            inv_d = F32(1.0) / d
            for ib in range(0, 8, 2):
                blk[106 + ib // 2] = _sub_block_scale_code(inv_d, scales[ib]) | (
                    _sub_block_scale_code(inv_d, scales[ib + 1]) << 4)


def quantize_iq3_xxs(x: np.ndarray, imatrix: np.ndarray, out: np.ndarray) -> None:
    _encode_iq3_xxs(x, imatrix, out, *grid_tables(256))


def quantize_iq3_s(x: np.ndarray, imatrix: np.ndarray, out: np.ndarray) -> None:
    _encode_iq3_s(x, imatrix, out, *grid_tables(512))


# ------------------------------------------------------------------------------------------- decoding
# gguf-py's float32 values: the sub-block scale first, then (scale·grid)·(±1). The sign goes on the (finite) grid
# value instead, which gives the same bits: negation is exact, and a NaN scale passes through a product unchanged on
# x86, where LLVM would turn "times -1" into a negation that flips the NaN's sign bit.

@njit(cache=True, inline="always")
def _half(blk, offset):
    return fp16_bits_to_fp32(np.int64(blk[offset]) | (np.int64(blk[offset + 1]) << 8))


@njit(parallel=True, cache=True)
def _decode_iq3_xxs(raw, out, grid, ksigns):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ3_XXS_BYTES * ibl:IQ3_XXS_BYTES * (ibl + 1)]
            d = _half(blk, 0)
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for ib in range(8):
                word = np.int64(0)
                for b in range(4):
                    word |= np.int64(blk[66 + 4 * ib + b]) << (8 * b)
                db = (d * (F32(0.5) + F32(word >> 28))) * F32(0.5)
                for k in range(4):
                    signs = np.int64(ksigns[(word >> (7 * k)) & 127])
                    for half in range(2):
                        point = blk[2 + 8 * ib + 2 * k + half]
                        for j in range(4):
                            g = grid[point, j]
                            y[32 * ib + 8 * k + 4 * half + j] = db * (-g if (signs >> (4 * half + j)) & 1 else g)


@njit(parallel=True, cache=True)
def _decode_iq3_s(raw, out, grid):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ3_S_BYTES * ibl:IQ3_S_BYTES * (ibl + 1)]
            d = _half(blk, 0)
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for ib in range(8):
                db = d * F32(1 + 2 * ((np.int64(blk[106 + ib // 2]) >> (4 * (ib % 2))) & 0xF))
                high = np.int64(blk[66 + ib])
                for g in range(8):
                    point = np.int64(blk[2 + 8 * ib + g]) | (((high >> g) & 1) << 8)
                    signs = np.int64(blk[74 + 4 * ib + g // 2])
                    for j in range(4):
                        v = grid[point, j]
                        y[32 * ib + 4 * g + j] = db * (-v if (signs >> (4 * (g % 2) + j)) & 1 else v)


def decode_iq3_xxs(raw: np.ndarray, out: np.ndarray) -> None:
    grid, _, ksigns = decode_tables()
    _decode_iq3_xxs(raw, out, grid, ksigns)


def decode_iq3_s(raw: np.ndarray, out: np.ndarray) -> None:
    _decode_iq3_s(raw, out, decode_tables()[1])
