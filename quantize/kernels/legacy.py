"""The 32-element legacy formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (docs/reference/quantization.md §2.3).

Without an importance matrix llama.cpp uses the ``quantize_row_*_ref`` paths (one scale from the block's
extreme values, codes from the unrounded fp32 scale); with one, the ``quantize_row_*_impl`` paths, which are
different algorithms (a weighted scale search, codes straight from the search). Q8_0 ignores the imatrix.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import (F32, QK, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, QX_SCRATCH, c_float_to_int,
                     c_float_to_int8, first_absmax, make_qkx_quants, make_qx_quants, store_fp16)
RMIN_IMATRIX = F32(-0.9)
RDELTA_IMATRIX = F32(0.05)
NSTEP_IMATRIX = 36
FLT_MAX = F32(3.4028234663852886e38)


@njit(cache=True)
def _row_sigma2(xr):
    # Sequential over the whole row, divided by (float)n_per_row: the impl paths' "typical magnitude".
    sum_x2 = F32(0.0)
    for j in range(xr.shape[0]):
        sum_x2 += xr[j] * xr[j]
    return sum_x2 / F32(xr.shape[0])


@njit(cache=True)
def _fill_weights(xb, qw, sigma2, weight):
    for j in range(QK):
        weight[j] = qw[j] * np.sqrt(sigma2 + xb[j] * xb[j])


@njit(cache=True)
def _pack_nibbles(qs, L):
    for j in range(16):
        qs[j] = (L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4)


@njit(cache=True)
def _pack_fifth_bits(qh, L):
    bits = 0
    for j in range(QK):
        bits |= ((L[j] >> 4) & 1) << j
    for k in range(4):
        qh[k] = (bits >> (8 * k)) & 0xFF


@njit(cache=True)
def _symmetric_ref_codes(xb, divisor, offset, cap, L):
    """Q4_0/Q5_0 ref: d = max/divisor, code = MIN(cap, (int8)(x*id + offset)); returns d."""
    vmax, _ = first_absmax(xb, 0, QK)
    d = vmax / divisor
    inv = F32(1.0) / d if d != 0 else F32(0.0)
    if abs(inv) <= FLT_MAX:
        # |x*id| <= |divisor| (+ rounding), so every operand lies in [0.49, 2*|divisor|+0.51]: a plain
        # truncating conversion is exact, and this loop vectorizes.
        for j in range(QK):
            L[j] = min(cap, np.int32(xb[j] * inv + offset))
    else:  # d subnormal: 1/d is inf, the operands inf/NaN, and C's conversion gives x86's INT_MIN byte
        for j in range(QK):
            L[j] = min(cap, c_float_to_int8(xb[j] * inv + offset))
    return d


@njit(cache=True)
def _asymmetric_ref_codes(xb, steps, L):
    """Q4_1/Q5_1 ref: d = (max-min)/steps, codes from the unrounded min and 1/d; returns (d, min)."""
    vmin = FLT_MAX
    vmax = -FLT_MAX
    for j in range(QK):
        if xb[j] < vmin:
            vmin = xb[j]
        if xb[j] > vmax:
            vmax = xb[j]
    d = (vmax - vmin) / F32(steps)
    inv = F32(1.0) / d if d != 0 else F32(0.0)
    if abs(inv) <= FLT_MAX:  # operands within [0.5, steps+0.51], see _symmetric_ref_codes
        for j in range(QK):
            L[j] = min(steps, np.int32(((xb[j] - vmin) * inv) + F32(0.5)))
    else:
        for j in range(QK):
            v = ((xb[j] - vmin) * inv) + F32(0.5)
            # Q4_1 converts to int8 and caps at 15; Q5_1 converts to uint8 without a cap.
            L[j] = min(15, c_float_to_int8(v)) if steps == 15 else c_float_to_int(v) & 0xFF
    return d, vmin


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q4_0(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK, np.int8)
        weight = np.empty(QK, np.float32)
        scratch = np.empty(QX_SCRATCH, np.float32)
        sigma2 = _row_sigma2(x[r]) if use_imatrix else F32(0.0)
        for ib in range(n // QK):
            xb = x[r, QK * ib:QK * (ib + 1)]
            blk = out[r, Q4_0_BYTES * ib:Q4_0_BYTES * (ib + 1)]
            if use_imatrix:
                _fill_weights(xb, imatrix[QK * ib:QK * (ib + 1)], sigma2, weight)
                d = make_qx_quants(QK, 8, xb, 0, L, 0, weight, 0, scratch)
            else:
                d = _symmetric_ref_codes(xb, F32(-8.0), F32(8.5), 15, L)
            store_fp16(blk, 0, d)
            _pack_nibbles(blk[2:], L)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q5_0(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK, np.int8)
        weight = np.empty(QK, np.float32)
        scratch = np.empty(QX_SCRATCH, np.float32)
        sigma2 = _row_sigma2(x[r]) if use_imatrix else F32(0.0)
        for ib in range(n // QK):
            xb = x[r, QK * ib:QK * (ib + 1)]
            blk = out[r, Q5_0_BYTES * ib:Q5_0_BYTES * (ib + 1)]
            if use_imatrix:
                _fill_weights(xb, imatrix[QK * ib:QK * (ib + 1)], sigma2, weight)
                d = make_qx_quants(QK, 16, xb, 0, L, 0, weight, 0, scratch)
            else:
                d = _symmetric_ref_codes(xb, F32(-16.0), F32(16.5), 31, L)
            store_fp16(blk, 0, d)
            _pack_fifth_bits(blk[2:6], L)
            _pack_nibbles(blk[6:], L)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q4_1(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK, np.uint8)
        Laux = np.empty(QK, np.uint8)
        weight = np.empty(QK, np.float32)
        sigma2 = _row_sigma2(x[r]) if use_imatrix else F32(0.0)
        for ib in range(n // QK):
            xb = x[r, QK * ib:QK * (ib + 1)]
            blk = out[r, Q4_1_BYTES * ib:Q4_1_BYTES * (ib + 1)]
            if use_imatrix:
                _fill_weights(xb, imatrix[QK * ib:QK * (ib + 1)], sigma2, weight)
                d, the_min = make_qkx_quants(QK, 15, xb, 0, weight, L, 0, Laux,
                                             RMIN_IMATRIX, RDELTA_IMATRIX, NSTEP_IMATRIX, False)
                m = -the_min
            else:
                d, m = _asymmetric_ref_codes(xb, 15, L)
            store_fp16(blk, 0, d)
            store_fp16(blk, 2, m)
            _pack_nibbles(blk[4:], L)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q5_1(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(QK, np.uint8)
        Laux = np.empty(QK, np.uint8)
        weight = np.empty(QK, np.float32)
        sigma2 = _row_sigma2(x[r]) if use_imatrix else F32(0.0)
        for ib in range(n // QK):
            xb = x[r, QK * ib:QK * (ib + 1)]
            blk = out[r, Q5_1_BYTES * ib:Q5_1_BYTES * (ib + 1)]
            if use_imatrix:
                _fill_weights(xb, imatrix[QK * ib:QK * (ib + 1)], sigma2, weight)
                d, the_min = make_qkx_quants(QK, 31, xb, 0, weight, L, 0, Laux,
                                             RMIN_IMATRIX, RDELTA_IMATRIX, NSTEP_IMATRIX, False)
                m = -the_min
            else:
                d, m = _asymmetric_ref_codes(xb, 31, L)
            store_fp16(blk, 0, d)
            store_fp16(blk, 2, m)
            _pack_fifth_bits(blk[4:8], L)
            _pack_nibbles(blk[8:], L)


@njit(cache=True, inline="always")
def _round_half_away(v):
    # C's roundf. floor(v + 0.5) would round 0.49999997 up, because the addition itself rounds.
    t = np.trunc(v)
    if abs(v - t) >= F32(0.5):
        t += F32(1.0) if v > 0 else F32(-1.0)
    return t


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q8_0(x, imatrix, out):
    rows, n = x.shape
    for r in prange(rows):
        for ib in range(n // QK):
            xb = x[r, QK * ib:QK * (ib + 1)]
            blk = out[r, Q8_0_BYTES * ib:Q8_0_BYTES * (ib + 1)]
            amax = F32(0.0)
            for j in range(QK):
                ax = abs(xb[j])
                amax = amax if amax > ax else ax
            d = amax / F32(127.0)
            inv = F32(1.0) / d if d != 0 else F32(0.0)
            store_fp16(blk, 0, d)
            if abs(inv) <= FLT_MAX:  # |x*id| <= 127.0001: roundf then a plain conversion
                for j in range(QK):
                    blk[2 + j] = np.int32(_round_half_away(xb[j] * inv)) & 0xFF
            else:  # d subnormal, 1/d = inf: x86's conversion of inf/NaN
                for j in range(QK):
                    blk[2 + j] = c_float_to_int(_round_half_away(xb[j] * inv)) & 0xFF
