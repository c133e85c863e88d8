"""IQ4_NL (32-element blocks) and IQ4_XS (256-element super-blocks): 4-bit indices into the non-linear
kvalues_iq4nl table (docs/reference/quantization.md §2.5). llama-quantize runs quantize_row_iq4_nl_impl with ntry = 7 for both,
with or without an imatrix (without one the weights are x²)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import (F32, GROUP_MAX_EPS, IQ4_NL_BYTES, IQ4_XS_BYTES, IQ4NL_VALUES, best_index_int8, block_sigma2,
                     first_absmax, importance_weights, nearest_int, store_fp16)

NTRY = 7


CANDIDATES = 2 * NTRY + 2  # the first guess, then itry = -NTRY..NTRY
SCRATCH = 3 * CANDIDATES


@njit(cache=True)
def _sub_block_scale(xb, weight, scratch):
    """Best float scale for the 32 values xb (0 for an all-zero block). The provisional codes are not kept:
    both formats re-derive them from the final scale."""
    vmax, amax = first_absmax(xb, 0, 32)
    if amax < GROUP_MAX_EPS:
        return F32(0.0)
    values = IQ4NL_VALUES
    inv = scratch[0:CANDIDATES]
    sumqx = scratch[CANDIDATES:2 * CANDIDATES]
    sumq2 = scratch[2 * CANDIDATES:3 * CANDIDATES]
    inv[0] = F32(1.0) / ((-vmax) / values[0])
    for k in range(1, CANDIDATES):
        inv[k] = F32(k - 1 - NTRY - 127) / vmax
    for k in range(CANDIDATES):
        sumqx[k] = F32(0.0)
        sumq2[k] = F32(0.0)
    # No candidate's sums depend on another's outcome: accumulate all of them in one sweep, candidates
    # innermost, each sum still in element order (same rounding as C), so the 32 chains pipeline/vectorize.
    for j in range(32):
        xj = xb[j]
        wj = weight[j]
        for k in range(CANDIDATES):
            q = values[best_index_int8(inv[k] * xj)]
            sumqx[k] += (wj * q) * xj
            sumq2[k] += (wj * q) * q
    d = sumqx[0] / sumq2[0] if sumq2[0] > 0 else F32(0.0)
    best = d * sumqx[0]
    for k in range(1, CANDIDATES):
        if sumq2[k] > 0 and sumqx[k] * sumqx[k] > best * sumq2[k]:
            d = sumqx[k] / sumq2[k]
            best = d * sumqx[k]
    return d


@njit(cache=True)
def _pack_codes(qs, L):
    for i in range(L.shape[0] // 32):
        for j in range(16):
            qs[16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_iq4_nl(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(32, np.uint8)
        weight = np.empty(32, np.float32)
        scratch = np.empty(SCRATCH, np.float32)
        for ib in range(n // 32):
            xb = x[r, 32 * ib:32 * (ib + 1)]
            blk = out[r, IQ4_NL_BYTES * ib:IQ4_NL_BYTES * (ib + 1)]
            importance_weights(xb, imatrix[32 * ib:32 * (ib + 1)], use_imatrix, block_sigma2(xb), weight)
            d = _sub_block_scale(xb, weight, scratch)
            store_fp16(blk, 0, d)
            inv = F32(1.0) / d if d != 0 else F32(0.0)
            for j in range(32):
                L[j] = best_index_int8(inv * xb[j])
            _pack_codes(blk[2:], L)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_iq4_xs(x, imatrix, out):
    rows, n = x.shape
    use_imatrix = imatrix.shape[0] > 0
    for r in prange(rows):
        L = np.empty(256, np.uint8)
        weight = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        scratch = np.empty(SCRATCH, np.float32)
        for ibl in range(n // 256):
            xs = x[r, 256 * ibl:256 * (ibl + 1)]
            qw = imatrix[256 * ibl:256 * (ibl + 1)]
            blk = out[r, IQ4_XS_BYTES * ibl:IQ4_XS_BYTES * (ibl + 1)]
            sigma2 = block_sigma2(xs)
            max_scale = F32(0.0)
            amax_scale = F32(0.0)
            for ib in range(8):
                importance_weights(xs[32 * ib:32 * (ib + 1)], qw[32 * ib:32 * (ib + 1)], use_imatrix, sigma2, weight)
                scales[ib] = _sub_block_scale(xs[32 * ib:32 * (ib + 1)], weight, scratch)
                if abs(scales[ib]) > amax_scale:
                    amax_scale = abs(scales[ib])
                    max_scale = scales[ib]
            d = -max_scale / F32(32.0)
            store_fp16(blk, 0, d)
            inv = F32(1.0) / d if d != 0 else F32(0.0)
            scales_h = 0
            for k in range(4):
                blk[4 + k] = 0
            for ib in range(8):
                l = max(-32, min(31, nearest_int(inv * scales[ib])))
                # The codes use the fp32 d times the integer sub-scale, not the fp16-rounded d.
                dl = d * F32(l)
                idl = F32(1.0) / dl if dl != 0 else F32(0.0)
                for j in range(32):
                    L[32 * ib + j] = best_index_int8(idl * xs[32 * ib + j])
                code = l + 32
                blk[4 + ib // 2] |= (code & 0xF) << (4 * (ib % 2))
                scales_h |= (code >> 4) << (2 * ib)
            blk[2] = scales_h & 0xFF
            blk[3] = scales_h >> 8
            _pack_codes(blk[8:], L)
