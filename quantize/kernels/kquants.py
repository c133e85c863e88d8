"""K-quants on 256-element super-blocks: Q4_K, Q5_K (scale + min per 32) and Q6_K (signed scale per 16)
(docs/reference/quantization.md §2.4).

Shape of every K-quant: search a float scale (and min) per sub-block with provisional codes, quantize the
sub-block scales to small integers under fp16 super-scale(s), then re-derive each code from the fp16-rounded
super-scale times the integer sub-scale — except in sub-blocks whose effective scale is exactly 0, which keep
the provisional codes. Without an imatrix llama.cpp runs the ``_ref`` searches, with one the ``_impl`` ones.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import (F32, GROUP_MAX_EPS, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES, QK_K, QX_SCRATCH, fp16_bits_to_fp32,
                     LANE_SCRATCH, make_qkx_quants_8, make_qp_quants, make_qx_quants, nearest_int, store_fp16)

RMIN_IMATRIX = F32(-0.9)
RDELTA_IMATRIX = F32(0.05)
NSTEP_IMATRIX = 36
RDELTA_REF = F32(0.1)


@njit(cache=True)
def _get_scale_min_k4(packed, j):
    if j < 4:
        return packed[j] & 63, packed[j + 4] & 63
    return ((packed[j + 4] & 0xF) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))


@njit(cache=True)
def _search_scales_mins(xb, qw, use_imatrix, nmax, rmin_ref, nstep_ref, cap_imatrix_codes, L, weights, scales,
                        mins, sw, scale_codes, min_codes, laux, lanes):
    """Steps (1)-(2) of a Q4_K/Q5_K super-block xb: provisional codes in L and the 6-bit scale/min codes.
    Returns (d, dmin) as float32, to be stored as fp16."""
    if use_imatrix:
        sum_x2 = F32(0.0)
        for l in range(QK_K):
            sum_x2 += xb[l] * xb[l]
        sigma2 = F32(2.0) * sum_x2 / F32(QK_K)
        for j in range(8):
            sumw = F32(0.0)
            for l in range(32):
                v = xb[32 * j + l]
                weights[32 * j + l] = qw[32 * j + l] * np.sqrt(sigma2 + v * v)
                sumw += weights[32 * j + l]
            sw[j] = sumw
        make_qkx_quants_8(32, nmax, xb, 0, weights, L, 0, lanes, laux, RMIN_IMATRIX, RDELTA_IMATRIX, NSTEP_IMATRIX,
                             False, scales, mins)
        d = make_qp_quants(8, 63, scales, scale_codes, sw)
        dmin = make_qp_quants(8, 63, mins, min_codes, sw)
        if cap_imatrix_codes:  # Q5_K caps at 63, Q4_K does not (a no-op for non-negative scales)
            for j in range(8):
                scale_codes[j] = min(63, scale_codes[j])
                min_codes[j] = min(63, min_codes[j])
        return d, dmin
    for j in range(8):
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 += xb[32 * j + l] * xb[32 * j + l]
        av_x = np.sqrt(sum_x2 / F32(32.0))
        for l in range(32):
            weights[32 * j + l] = av_x + abs(xb[32 * j + l])
    make_qkx_quants_8(32, nmax, xb, 0, weights, L, 0, lanes, laux, rmin_ref, RDELTA_REF, nstep_ref, False, scales, mins)
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
    for j in range(8):
        # (uint8_t)nearest_int(...) wraps before the MIN, as in C.
        scale_codes[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        min_codes[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    return max_scale / F32(63.0), max_min / F32(63.0)


@njit(cache=True)
def _scale_min_block(xb, qw, use_imatrix, nmax, rmin_ref, nstep_ref, cap_imatrix_codes, blk, L, weights, scales,
                     mins, sw, scale_codes, min_codes, laux, lanes):
    """Steps (1)-(3) of Q4_K/Q5_K: writes d, dmin and the packed scales into blk[0:16] and leaves the final
    codes (0..nmax) in L; the caller packs them."""
    d, dmin = _search_scales_mins(xb, qw, use_imatrix, nmax, rmin_ref, nstep_ref, cap_imatrix_codes, L, weights,
                                  scales, mins, sw, scale_codes, min_codes, laux, lanes)
    d_stored = fp16_bits_to_fp32(store_fp16(blk, 0, d))
    dmin_stored = fp16_bits_to_fp32(store_fp16(blk, 2, dmin))
    packed = blk[4:16]
    _pack_scale_min_k4(packed, scale_codes, min_codes)
    # Re-derive the codes from what was stored (decoded back, as C does through get_scale_min_k4).
    for j in range(8):
        sc, mn = _get_scale_min_k4(packed, j)
        dd = d_stored * F32(sc)
        if dd == 0:
            continue
        dm = dmin_stored * F32(mn)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, nearest_int((xb[32 * j + i] + dm) / dd)))


@njit(cache=True)
def _pack_scale_min_k4(packed, scale_codes, min_codes):
    """The 12-byte 6-bit scale/min packing shared by Q4_K and Q5_K."""
    for j in range(12):
        packed[j] = 0
    for j in range(8):
        ls = scale_codes[j]
        lm = min_codes[j]
        if j < 4:
            packed[j] = ls
            packed[j + 4] = lm
        else:
            packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            packed[j - 4] |= (ls >> 4) << 6
            packed[j] |= (lm >> 4) << 6


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q4_k(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK_K, np.uint8)
        weights = np.empty(QK_K, np.float32)
        laux = np.empty(2 * QK_K, np.uint8)
        lanes = np.empty(LANE_SCRATCH, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        scale_codes = np.empty(8, np.uint8)
        min_codes = np.empty(8, np.uint8)
        for i in range(n // QK_K):
            blk = out[r, Q4_K_BYTES * i:Q4_K_BYTES * (i + 1)]
            _scale_min_block(x[r, QK_K * i:QK_K * (i + 1)], imatrix[QK_K * i:QK_K * (i + 1)], use_imatrix, 15,
                             F32(-1.0), 20, False, blk, L, weights, scales, mins, sw, scale_codes, min_codes, laux,
                             lanes)
            for c in range(4):
                for l in range(32):
                    blk[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q5_k(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK_K, np.uint8)
        weights = np.empty(QK_K, np.float32)
        laux = np.empty(2 * QK_K, np.uint8)
        lanes = np.empty(LANE_SCRATCH, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        scale_codes = np.empty(8, np.uint8)
        min_codes = np.empty(8, np.uint8)
        for i in range(n // QK_K):
            blk = out[r, Q5_K_BYTES * i:Q5_K_BYTES * (i + 1)]
            _scale_min_block(x[r, QK_K * i:QK_K * (i + 1)], imatrix[QK_K * i:QK_K * (i + 1)], use_imatrix, 31,
                             F32(-0.5), 15, True, blk, L, weights, scales, mins, sw, scale_codes, min_codes, laux,
                             lanes)
            for l in range(32):
                qh = 0
                for c in range(8):
                    qh |= (L[32 * c + l] >> 4) << c
                blk[16 + l] = qh
            for c in range(4):
                for l in range(32):
                    blk[48 + 32 * c + l] = (L[64 * c + l] & 0xF) | ((L[64 * c + 32 + l] & 0xF) << 4)


@njit(cache=True)
def _q6_k_block(xb, weights, blk, L, scales, scratch):
    max_scale = F32(0.0)
    max_abs_scale = F32(0.0)
    for ib in range(16):
        scales[ib] = make_qx_quants(16, 32, xb, 16 * ib, L, 16 * ib, weights, 16 * ib, scratch)
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(Q6_K_BYTES):
            blk[k] = 0
        return
    iscale = F32(-128.0) / max_scale
    d_stored = fp16_bits_to_fp32(store_fp16(blk, 208, F32(1.0) / iscale))
    for ib in range(16):
        # Stored as int8: C's conversion wraps, and the wrapped value is what the re-quantization uses.
        code = ((min(127, nearest_int(iscale * scales[ib])) & 0xFF) ^ 0x80) - 0x80
        blk[192 + ib] = code & 0xFF
        dd = d_stored * F32(code)
        if dd == 0:
            continue
        for i in range(16):
            L[16 * ib + i] = max(-32, min(31, nearest_int(xb[16 * ib + i] / dd))) + 32
    for h in range(2):
        for l in range(32):
            q1 = L[128 * h + l]
            q2 = L[128 * h + l + 32]
            q3 = L[128 * h + l + 64]
            q4 = L[128 * h + l + 96]
            blk[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            blk[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            blk[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q6_k(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK_K, np.int8)
        weights = np.empty(QK_K, np.float32)
        scales = np.empty(16, np.float32)
        scratch = np.empty(QX_SCRATCH, np.float32)
        for i in range(n // QK_K):
            xb = x[r, QK_K * i:QK_K * (i + 1)]
            # Q6_K's imatrix path weights by the raw imatrix values (the sigma2 factor is commented out in C).
            for l in range(QK_K):
                weights[l] = imatrix[QK_K * i + l] if use_imatrix else xb[l] * xb[l]
            _q6_k_block(xb, weights, out[r, Q6_K_BYTES * i:Q6_K_BYTES * (i + 1)], L, scales, scratch)
