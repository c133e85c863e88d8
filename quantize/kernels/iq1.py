"""IQ1_S and IQ1_M: 256-value super-blocks whose groups of eight values are points of a ternary grid (2048 of the
3**8 sign patterns -1, 0, +1), each group shifted by ±0.125 (IQ1S_DELTA) before scaling (ggml-common.h):

* IQ1_S, 50 bytes: fp16 d; 32 low bytes of the 11-bit grid indices; one little-endian uint16 per 32 values holding
  the four groups' high index bits (3 each), a 3-bit scale s at bit 12 and the shift's sign at bit 15. A value
  decodes as d·(2s+1)·(g ± 0.125).
* IQ1_M, 56 bytes: 32 low index bytes; one byte per 16 values with the two groups' high bits (bits 0-2, 4-6) and
  their shift signs (bits 3, 7); eight bytes of 3-bit scales, one per 16 values, four to a uint16, whose top
  nibbles together hold the fp16 d. Each 8-value half of a 16-value sub-block picks its own shift sign.

The encoders reproduce ggml-quants.c's quantize_row_iq1_s_impl / quantize_row_iq1_m_impl. With three levels per
value the sub-block's best split is found exhaustively: the values are sorted (glibc's qsort is a merge sort, so
equal values keep their order; a stable insertion sort does the same here), prefix sums of weight·x and weight give
every (lower boundary, upper boundary) split's least-squares fit for both shift signs (for IQ1_M, all four sign
pairs, from per-half prefix sums), and the first strictly better fit wins in C's order. A group whose ternary
pattern is not on the grid takes the neighbour (grid points at the three nearest distances, iq2xs_init_impl's
lists) with the least weighted squared error at the sub-block scale; if any group moved, the scale is fitted again.
IQ1_S stores d = max scale / 15 · 1.125; IQ1_M refits d over the whole super-block from the stored codes and
scales and stores d · 1.1125.

ggml refuses IQ1_S without an importance matrix (ggml_quantize_requires_imatrix); IQ1_M falls back to the weights
x² (llama-quantize still demands an imatrix for IQ1_M tensors: a file-type rule, quantize/mixtures.py).

The grid tables are built once from gguf-py's copy of ggml's kgrid_1bit_2048 and passed to the kernels as arguments.

Every float operation and its order are C's; the split search only computes all upper boundaries of one lower
boundary side by side before accepting them in C's order. On 4096x4096 with an imatrix, one thread each (noisy
2-core machine): IQ1_S 3.1 s against ggml_quantize_chunk's 20.6 s, IQ1_M 3.2 s against 3.8 s.
"""

from __future__ import annotations

from functools import cache

import gguf
import numpy as np
from numba import njit, prange

from qtool.errors import QtoolError

from .common import (F32, IQ1_M_BYTES, IQ1_S_BYTES, QK_K, block_sigma2, fp16_bits_to_fp32, fp32_to_fp16_bits,
                     importance_weights, nearest_int, store_fp16)

GRID_SIZE = 2048
KEY_SPACE = 1 << 16                   # a group's 8 ternary codes, 2 bits each
NEIGHBOUR_SHELLS = 3                  # nwant in iq2xs_init_impl for IQ1_S and IQ1_M
S_EPS, M_EPS = F32(1e-12), F32(1e-7)  # GROUP_MAX_EPS_IQ1_S / _M: sub-blocks below this are stored as zeros
FLT_MAX = F32(np.finfo(np.float32).max)
DELTA = F32(0.125)                    # IQ1S_DELTA == IQ1M_DELTA
# the three levels of a code 0, 1, 2 with the group shifted up (x_p) or down (x_m)
X_P = np.array([-1 + 0.125, 0.125, 1 + 0.125], np.float32)
X_M = np.array([-1 - 0.125, -0.125, 1 - 0.125], np.float32)
S_FUDGE, M_FUDGE = F32(1.125), F32(1.1125)


@cache
def grid_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(codes int8 [2048, 8] (0, 1, 2 for -1, 0, +1), index_of int32 [KEY_SPACE], neighbour_start int32
    [KEY_SPACE + 1], neighbours int32 [...]). A group's key packs its codes 2 bits each, first value lowest;
    ``index_of[key]`` is its grid index or -1; an off-grid key's neighbours are
    ``neighbours[neighbour_start[key]:neighbour_start[key + 1]]``: every grid point whose squared distance (in odd
    levels 2c+1) is among the three smallest, nearest first, ties by grid index (ggml's qsort on (distance, index)).
    Only keys with every code <= 2 get lists: the encoder never forms others."""
    keys = np.frombuffer(bytes.fromhex(gguf.quants.IQ1_S.grid_hex.decode()), dtype="<u2").astype(np.int64)
    shifts = 2 * np.arange(8)
    codes = ((keys[:, None] >> shifts) & 3).astype(np.int8)
    index_of = np.full(KEY_SPACE, -1, np.int32)
    index_of[keys] = np.arange(GRID_SIZE, dtype=np.int32)

    ternary = (np.arange(3 ** 8)[:, None] // 3 ** np.arange(8)) % 3
    all_keys = (ternary << shifts).sum(1)
    off_grid = np.sort(all_keys[index_of[all_keys] < 0])
    pos = 2 * ((off_grid[:, None] >> shifts) & 3) + 1
    grid = 2 * codes.astype(np.int64) + 1
    d2 = (pos ** 2).sum(1)[:, None] + (grid ** 2).sum(1)[None, :] - 2 * pos @ grid.T       # exact small integers
    order = np.sort(d2 * GRID_SIZE + np.arange(GRID_SIZE), axis=1)                         # (distance, index)
    ranked = order // GRID_SIZE
    distinct_rank = np.concatenate([np.ones((len(off_grid), 1), np.int64),
                                    1 + np.cumsum(ranked[:, 1:] > ranked[:, :-1], axis=1)], axis=1)
    keep = distinct_rank <= NEIGHBOUR_SHELLS
    per_key = np.zeros(KEY_SPACE, np.int64)
    per_key[off_grid] = keep.sum(1)
    neighbour_start = np.zeros(KEY_SPACE + 1, np.int32)
    neighbour_start[1:] = np.cumsum(per_key)
    neighbours = (order % GRID_SIZE)[keep].astype(np.int32)                               # key order, nearest first
    return codes, index_of, neighbour_start, neighbours


@cache
def decode_grid() -> np.ndarray:
    """gguf-py's float32 grid [2048, 8] of -1, 0, +1."""
    gguf.quants.IQ1_S.init_grid()
    return np.ascontiguousarray(gguf.quants.IQ1_S.grid.reshape(GRID_SIZE, 8), np.float32)


# ------------------------------------------------------------------------------------------- encoder pieces

@njit(cache=True, inline="always")
def _absmax(xb):
    vmax = abs(xb[0])
    for i in range(1, xb.shape[0]):
        a = abs(xb[i])
        vmax = vmax if vmax > a else a    # C's MAX(max, fabsf(x))
    return vmax


@njit(cache=True, inline="always")
def _sort_order(xb, order):
    """order[j]: the index of the j-th smallest value, equal values in index order (glibc's merge sort)."""
    n = xb.shape[0]
    for j in range(n):
        k = j
        v = xb[j]
        while k > 0 and xb[order[k - 1]] > v:
            order[k] = order[k - 1]
            k -= 1
        order[k] = j


@njit(cache=True, inline="always")
def _codes_from_split(order, i1, i2, L):
    n = order.shape[0]
    for j in range(n):
        L[order[j]] = 0 if j < i1 else (1 if j < i2 else 2)


@njit(cache=True, inline="always")
def _group_key(L, off):
    key = 0
    for i in range(8):
        key |= np.int64(L[off + i]) << (2 * i)
    return key


@njit(cache=True)
def _snap_group(L, off, xb, weight, scale, levels, codes, index_of, neighbour_start, neighbours):
    """The grid index of the group L[off:off+8]; off the grid, the neighbour with the least sum of
    weight·(scale·level - x)² (first of equals), whose codes replace L's. ggml aborts when no neighbour has a finite
    error (an inf or NaN weight, unreachable with finite data and imatrix); here the first neighbour is taken."""
    key = _group_key(L, off)
    grid_index = index_of[key]
    if grid_index >= 0:
        return grid_index, True
    best_d2 = FLT_MAX
    grid_index = neighbours[neighbour_start[key]]
    for t in range(neighbour_start[key], neighbour_start[key + 1]):
        j = neighbours[t]
        d2 = F32(0.0)
        for i in range(8):
            diff = scale * levels[codes[j, i]] - xb[off + i]
            d2 += (weight[off + i] * diff) * diff
        if d2 < best_d2:
            best_d2 = d2
            grid_index = j
    for i in range(8):
        L[off + i] = codes[grid_index, i]
    return grid_index, False


@njit(cache=True, inline="always")
def _refit(xb, weight, L, levels_lo, levels_hi, scale):
    """The least-squares scale of the final codes (first half of the sub-block on levels_lo, second on levels_hi),
    kept only when both sums are positive."""
    n = xb.shape[0]
    sumqx = F32(0.0)
    sumq2 = F32(0.0)
    for i in range(n):
        q = levels_lo[L[i]] if i < n // 2 else levels_hi[L[i]]
        w = weight[i]
        sumqx += (w * q) * xb[i]
        sumq2 += (w * q) * q
    if sumqx > 0 and sumq2 > 0:
        return sumqx / sumq2
    return scale


@njit(cache=True, inline="always")
def _scale_code(inv_d, scale):
    return max(0, min(7, nearest_int(F32(0.5) * (inv_d * scale - F32(1.0)))))


# ------------------------------------------------------------------------------------------- IQ1_S

@njit(cache=True)
def _best_split_s(xb, weight, order, sumx, sumw, qx, q2):
    """The exhaustive search over the 32 sorted values: (scale, i1, i2, shift) of the first strictly best fit, codes
    0 below i1, 1 up to i2, 2 above, shift +1 (levels X_P) or -1 (X_M); shift 0 when nothing fits. Every split's
    sums are computed side by side over i2 (vectorizable), then accepted in C's order (i2, then + before -).
    Scratch: sumx, sumw [33], qx, q2 [2, 33]."""
    n = 32
    sumx[0] = F32(0.0)
    sumw[0] = F32(0.0)
    for j in range(n):
        i = order[j]
        sumx[j + 1] = sumx[j] + weight[i] * xb[i]
        sumw[j + 1] = sumw[j] + weight[i]
    p0, p1, p2 = X_P[0], X_P[1], X_P[2]
    m0, m1, m2 = X_M[0], X_M[1], X_M[2]
    total_x = sumx[n]
    total_w = sumw[n]
    best = -FLT_MAX
    scale = _absmax(xb)
    best_i1 = -1
    best_i2 = -1
    best_shift = 0
    for i1 in range(n + 1):
        lo_x = sumx[i1] - sumx[0]
        lo_w = sumw[i1] - sumw[0]
        for i2 in range(i1, n + 1):
            mid_x = sumx[i2] - sumx[i1]
            hi_x = total_x - sumx[i2]
            mid_w = sumw[i2] - sumw[i1]
            hi_w = total_w - sumw[i2]
            qx[0, i2] = lo_x * p0 + mid_x * p1 + hi_x * p2
            q2[0, i2] = lo_w * p0 * p0 + mid_w * p1 * p1 + hi_w * p2 * p2
            qx[1, i2] = lo_x * m0 + mid_x * m1 + hi_x * m2
            q2[1, i2] = lo_w * m0 * m0 + mid_w * m1 * m1 + hi_w * m2 * m2
        for i2 in range(i1, n + 1):
            for s in range(2):
                sumqx = qx[s, i2]
                sumq2 = q2[s, i2]
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    best_i1 = i1
                    best_i2 = i2
                    best_shift = 1 - 2 * s
    return scale, best_i1, best_i2, best_shift


@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq1_s(x, imatrix, out, codes, index_of, neighbour_start, neighbours):
    rows, n = x.shape
    for r in prange(rows):
        weight = np.empty(32, np.float32)
        order = np.empty(32, np.int64)
        L = np.empty(32, np.int64)
        sumx = np.empty(33, np.float32)
        sumw = np.empty(33, np.float32)
        qx = np.empty((2, 33), np.float32)
        q2 = np.empty((2, 33), np.float32)
        scales = np.empty(8, np.float32)
        shifts = np.empty(8, np.int64)
        index = np.empty(4, np.int64)
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ1_S_BYTES * ibl:IQ1_S_BYTES * (ibl + 1)]   # d, qs [32], qh [8 x uint16]
            for b in range(IQ1_S_BYTES):
                blk[b] = 0
            sigma2 = block_sigma2(xs)
            max_scale = F32(0.0)
            for ib in range(8):
                xb = xs[32 * ib:32 * (ib + 1)]
                importance_weights(xb, imatrix[QK_K * ibl + 32 * ib:QK_K * ibl + 32 * (ib + 1)], True, sigma2, weight)
                scales[ib] = F32(0.0)
                shifts[ib] = 1
                if _absmax(xb) < S_EPS:
                    continue
                _sort_order(xb, order)
                scale, i1, i2, shift = _best_split_s(xb, weight, order, sumx, sumw, qx, q2)
                if i1 < 0 or i2 < 0 or shift == 0:
                    continue
                _codes_from_split(order, i1, i2, L)
                if scale < 0:
                    for j in range(32):
                        L[j] = 2 - L[j]
                    scale = -scale
                    shift = -shift
                levels = X_P if shift == 1 else X_M
                all_on_grid = True
                for k in range(4):
                    index[k], on_grid = _snap_group(L, 8 * k, xb, weight, scale, levels, codes, index_of,
                                                    neighbour_start, neighbours)
                    all_on_grid &= on_grid
                if not all_on_grid:
                    scale = _refit(xb, weight, L, levels, levels, scale)
                h = 0
                for k in range(4):
                    blk[2 + 4 * ib + k] = index[k] & 0xFF
                    h |= (index[k] >> 8) << (3 * k)
                blk[34 + 2 * ib] = h & 0xFF
                blk[35 + 2 * ib] = h >> 8
                scales[ib] = scale
                shifts[ib] = shift
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == 0:
                continue
            d = max_scale / F32(15.0)
            store_fp16(blk, 0, d * S_FUDGE)
            inv_d = F32(1.0) / d
            for ib in range(8):
                code = _scale_code(inv_d, scales[ib]) | (8 if shifts[ib] == -1 else 0)
                blk[35 + 2 * ib] |= code << 4


def quantize_iq1_s(x: np.ndarray, imatrix: np.ndarray, out: np.ndarray) -> None:
    if imatrix.shape[0] == 0:   # ggml asserts; formats.py refuses earlier, with the same advice
        raise QtoolError("IQ1_S requires an importance matrix (llama.cpp refuses it without one too); make one "
                         "with `qtool imatrix` and pass it")
    _encode_iq1_s(x, imatrix, out, *grid_tables())


# ------------------------------------------------------------------------------------------- IQ1_M

@njit(cache=True)
def _best_split_m(xb, weight, order, px, pw, qx, q2):
    """IQ1_M's search over the 16 sorted values, each 8-value half with its own shift: (scale, i1, i2, k) of the
    first strictly best fit, k = 2·(first half shifted down) + (second half shifted down), or k = -1. The sums are
    ggml's per-half prefix-sum form (sum over a half = total·level₂ - prefix(i1) - prefix(i2)).
    Scratch: px, pw [2, 17]; qx, q2 [4, 17]."""
    n = 16
    px[0, 0] = F32(0.0)
    px[1, 0] = F32(0.0)
    pw[0, 0] = F32(0.0)
    pw[1, 0] = F32(0.0)
    for j in range(n):
        i = order[j]
        h = 0 if i < n // 2 else 1
        px[h, j + 1] = px[h, j] + weight[i] * xb[i]
        px[1 - h, j + 1] = px[1 - h, j]
        pw[h, j + 1] = pw[h, j] + weight[i]
        pw[1 - h, j + 1] = pw[1 - h, j]
    p2 = X_P[2]
    m2 = X_M[2]
    cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1]
    cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1]
    cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2]
    tx_p0 = px[0, n] * p2
    tx_p1 = px[1, n] * p2
    tx_m0 = px[0, n] * m2
    tx_m1 = px[1, n] * m2
    tw_p0 = (pw[0, n] * p2) * p2
    tw_p1 = (pw[1, n] * p2) * p2
    tw_m0 = (pw[0, n] * m2) * m2
    tw_m1 = (pw[1, n] * m2) * m2
    best = -FLT_MAX
    scale = _absmax(xb)
    best_i1 = -1
    best_i2 = -1
    best_k = -1
    for i1 in range(n + 1):
        x0 = px[0, i1]
        x1 = px[1, i1]
        w_p0 = tw_p0 + pw[0, i1] * cp1
        w_p1 = tw_p1 + pw[1, i1] * cp1
        w_m0 = tw_m0 + pw[0, i1] * cm1
        w_m1 = tw_m1 + pw[1, i1] * cm1
        for i2 in range(i1, n + 1):
            sx0 = x0 + px[0, i2]
            sx1 = x1 + px[1, i2]
            qx_p0 = tx_p0 - sx0
            qx_p1 = tx_p1 - sx1
            qx_m0 = tx_m0 - sx0
            qx_m1 = tx_m1 - sx1
            q2_p0 = w_p0 + pw[0, i2] * cp2
            q2_p1 = w_p1 + pw[1, i2] * cp2
            q2_m0 = w_m0 + pw[0, i2] * cm2
            q2_m1 = w_m1 + pw[1, i2] * cm2
            qx[0, i2] = qx_p0 + qx_p1
            qx[1, i2] = qx_p0 + qx_m1
            qx[2, i2] = qx_m0 + qx_p1
            qx[3, i2] = qx_m0 + qx_m1
            q2[0, i2] = q2_p0 + q2_p1
            q2[1, i2] = q2_p0 + q2_m1
            q2[2, i2] = q2_m0 + q2_p1
            q2[3, i2] = q2_m0 + q2_m1
        for i2 in range(i1, n + 1):
            for k in range(4):
                sumqx = qx[k, i2]
                sumq2 = q2[k, i2]
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    best_i1 = i1
                    best_i2 = i2
                    best_k = k
    return scale, best_i1, best_i2, best_k


@njit(cache=True, inline="always")
def _half_levels(k, half):
    """The levels of half 0 or 1 of an IQ1_M sub-block with sign pair k."""
    down = k >= 2 if half == 0 else k % 2 == 1
    return X_M if down else X_P


M_SHIFT_BITS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)   # qh bits 3 / 7: first / second half shifted down


@njit(parallel=True, cache=True, error_model="numpy")
def _encode_iq1_m(x, imatrix, out, codes, index_of, neighbour_start, neighbours):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        weights = np.empty(QK_K, np.float32)
        order = np.empty(16, np.int64)
        L = np.empty(16, np.int64)
        px = np.empty((2, 17), np.float32)
        pw = np.empty((2, 17), np.float32)
        qx = np.empty((4, 17), np.float32)
        q2 = np.empty((4, 17), np.float32)
        scales = np.empty(16, np.float32)
        shifts = np.empty(16, np.int64)
        packed = np.empty(4, np.int64)
        for ibl in range(n // QK_K):
            xs = x[r, QK_K * ibl:QK_K * (ibl + 1)]
            blk = out[r, IQ1_M_BYTES * ibl:IQ1_M_BYTES * (ibl + 1)]   # qs [32], qh [16], scales [4 x uint16]
            for b in range(IQ1_M_BYTES):
                blk[b] = 0
            sigma2 = block_sigma2(xs)
            importance_weights(xs, imatrix[QK_K * ibl:QK_K * (ibl + 1)], use_imatrix, sigma2, weights)
            max_scale = F32(0.0)
            for ib in range(16):
                xb = xs[16 * ib:16 * (ib + 1)]
                weight = weights[16 * ib:16 * (ib + 1)]
                scales[ib] = F32(0.0)
                shifts[ib] = 0
                if _absmax(xb) < M_EPS:
                    continue
                _sort_order(xb, order)
                scale, i1, i2, k = _best_split_m(xb, weight, order, px, pw, qx, q2)
                if i1 < 0 or i2 < 0 or k < 0:
                    continue
                _codes_from_split(order, i1, i2, L)
                if scale < 0:
                    for j in range(16):
                        L[j] = 2 - L[j]
                    scale = -scale
                    k = 3 - k
                index0, on_grid0 = _snap_group(L, 0, xb, weight, scale, _half_levels(k, 0), codes, index_of,
                                               neighbour_start, neighbours)
                index1, on_grid1 = _snap_group(L, 8, xb, weight, scale, _half_levels(k, 1), codes, index_of,
                                               neighbour_start, neighbours)
                all_on_grid = on_grid0 and on_grid1
                if not all_on_grid:
                    scale = _refit(xb, weight, L, _half_levels(k, 0), _half_levels(k, 1), scale)
                blk[2 * ib] = index0 & 0xFF
                blk[2 * ib + 1] = index1 & 0xFF
                blk[32 + ib] = (index0 >> 8) | ((index1 >> 8) << 4)
                scales[ib] = scale
                shifts[ib] = k
                max_scale = max_scale if max_scale > scale else scale
            if max_scale == 0:
                continue
            # the super-block scale is fitted once more, over every stored code and sub-block scale (zero
            # sub-blocks included: grid point 0 at scale code 0)
            d = max_scale / F32(15.0)
            inv_d = F32(1.0) / d
            sumqx = F32(0.0)
            sumq2 = F32(0.0)
            packed[:] = 0
            for ib in range(16):
                l = _scale_code(inv_d, scales[ib])
                packed[ib // 4] |= l << (3 * (ib % 4))
                blk[32 + ib] |= M_SHIFT_BITS[shifts[ib]]
                multiple = F32(2 * l + 1)
                for half in range(2):
                    levels = _half_levels(shifts[ib], half)
                    grid_index = np.int64(blk[2 * ib + half]) | ((np.int64(blk[32 + ib]) >> (4 * half) & 7) << 8)
                    for j in range(8):
                        i = 16 * ib + 8 * half + j
                        w = weights[i]
                        q = levels[codes[grid_index, j]] * multiple
                        sumqx += (w * q) * xs[i]
                        sumq2 += (w * q) * q
            if sumq2 > 0:
                d = sumqx / sumq2
            h = fp32_to_fp16_bits(d * M_FUDGE)
            for s in range(4):
                word = packed[s] | (((h >> (4 * s)) & 0xF) << 12)
                blk[48 + 2 * s] = word & 0xFF
                blk[49 + 2 * s] = word >> 8


@njit(cache=True, inline="always")
def _packed_half(blk):
    """IQ1_M's fp16 d: the top nibbles of the four little-endian scale words, first word lowest."""
    h = 0
    for s in range(4):
        h |= (np.int64(blk[49 + 2 * s]) >> 4) << (4 * s)
    return h


@njit(cache=True)
def _first_bad_iq1_m_scale(out):
    """(row, block) of the first IQ1_M block whose packed fp16 d is inf or NaN, or (-1, -1)."""
    rows, nbytes = out.shape
    for r in range(rows):
        for b in range(nbytes // IQ1_M_BYTES):
            blk = out[r, IQ1_M_BYTES * b:IQ1_M_BYTES * (b + 1)]
            if (_packed_half(blk) & 0x7C00) == 0x7C00:
                return r, b
    return -1, -1


def quantize_iq1_m(x: np.ndarray, imatrix: np.ndarray, out: np.ndarray) -> None:
    _encode_iq1_m(x, imatrix, out, *grid_tables())
    # formats.py validates fp16 fields at fixed offsets; IQ1_M's d is spread over four nibbles, so it is checked
    # here, as ggml_validate_row_data checks it
    row, block = _first_bad_iq1_m_scale(out)
    if row >= 0:
        raise QtoolError(f"IQ1_M: row {row}, block {block}: a block scale overflows fp16 (values too large for "
                         "this type); llama-quantize rejects this too")


# ------------------------------------------------------------------------------------------- decoding
# gguf-py's float32 values, as ggml's dequantize_row_iq1_*: dl = d·(2s+1), then dl·(g + delta).

@njit(parallel=True, cache=True)
def _decode_iq1_s(raw, out, grid):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ1_S_BYTES * ibl:IQ1_S_BYTES * (ibl + 1)]
            d = fp16_bits_to_fp32(np.int64(blk[0]) | (np.int64(blk[1]) << 8))
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for ib in range(8):
                qh = np.int64(blk[34 + 2 * ib]) | (np.int64(blk[35 + 2 * ib]) << 8)
                dl = d * F32(2 * ((qh >> 12) & 7) + 1)
                delta = -DELTA if qh & 0x8000 else DELTA
                for k in range(4):
                    point = np.int64(blk[2 + 4 * ib + k]) | (((qh >> (3 * k)) & 7) << 8)
                    for j in range(8):
                        y[32 * ib + 8 * k + j] = dl * (grid[point, j] + delta)


@njit(parallel=True, cache=True)
def _decode_iq1_m(raw, out, grid):
    rows, n = out.shape
    for r in prange(rows):
        for ibl in range(n // QK_K):
            blk = raw[r, IQ1_M_BYTES * ibl:IQ1_M_BYTES * (ibl + 1)]
            d = fp16_bits_to_fp32(_packed_half(blk))
            y = out[r, QK_K * ibl:QK_K * (ibl + 1)]
            for ib in range(16):
                word = np.int64(blk[48 + 2 * (ib // 4)]) | (np.int64(blk[49 + 2 * (ib // 4)]) << 8)
                dl = d * F32(2 * ((word >> (3 * (ib % 4))) & 7) + 1)
                qh = np.int64(blk[32 + ib])
                for half in range(2):
                    bits = qh >> (4 * half)
                    point = np.int64(blk[2 * ib + half]) | ((bits & 7) << 8)
                    delta = -DELTA if bits & 8 else DELTA
                    for j in range(8):
                        y[16 * ib + 8 * half + j] = dl * (grid[point, j] + delta)


def decode_iq1_s(raw: np.ndarray, out: np.ndarray) -> None:
    _decode_iq1_s(raw, out, decode_grid())


def decode_iq1_m(raw: np.ndarray, out: np.ndarray) -> None:
    _decode_iq1_m(raw, out, decode_grid())
