"""The 2- and 3-bit K-quants, Q2_K and Q3_K (docs/reference/quantization.md §2.4), byte-identical to ggml_quantize_chunk.

Both work on super-blocks of 256 values split into 16 sub-blocks of 16. Without an importance matrix llama.cpp
runs the ``quantize_row_q*_K_ref`` paths; with one, the ``quantize_row_q*_K_impl`` paths, which search
differently (weighted by ``imatrix * sqrt(sigma2 + x²)``) and quantize the sub-block scales with a weighted
search too. In every path the final 2/3-bit codes are recomputed from the fp16-rounded super-scale times the
integer sub-scale, except in sub-blocks whose effective scale is exactly zero: those keep the codes of the
sub-block search (§2.6), which is why the search's codes are kept in ``codes`` until packing.

Layouts (§1.2): Q2_K = scales[16] (scale nibble | min nibble << 4), qs[64], d, dmin (fp16, at the end);
Q3_K = hmask[32], qs[64], 12 bytes of 6-bit signed scales (+32), d (fp16, at the end).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import (F32, GROUP_MAX_EPS, LANE_SCRATCH, Q2_K_BYTES, Q3_K_BYTES, QK_K, fp16_bits_to_fp32,
                     make_qkx_quants_8, make_qp_quants, make_qx_quants, nearest_int, store_fp16)

SUB = 16  # elements per sub-block

# Search parameters of the two paths (C literals are float32).
Q2_REF_RMIN, Q2_REF_RDELTA, Q2_REF_NSTEP = F32(-0.5), F32(0.1), 15
Q2_IMATRIX_RMIN, Q2_IMATRIX_RDELTA, Q2_IMATRIX_NSTEP = F32(-0.9), F32(0.05), 36


@njit(cache=True, error_model="numpy")
def _check_shapes(x, imatrix, out, block_bytes):
    rows, n_per_row = x.shape
    if n_per_row % QK_K != 0:
        raise ValueError("row length is not a multiple of 256")
    if imatrix.size != 0 and imatrix.size != n_per_row:
        raise ValueError("imatrix length differs from the row length")
    if out.shape[0] != rows or out.shape[1] != (n_per_row // QK_K) * block_bytes:
        raise ValueError("output buffer has the wrong shape")


@njit(cache=True, error_model="numpy")
def _pack_2bit(out, offset, codes):
    """qs[32h + l] = q[128h+l] | q[128h+l+32] << 2 | q[128h+l+64] << 4 | q[128h+l+96] << 6 (low 2 bits)."""
    for h in range(2):
        for l in range(32):
            e = 128 * h + l
            out[offset + 32 * h + l] = ((codes[e] & 3) | ((codes[e + 32] & 3) << 2)
                                        | ((codes[e + 64] & 3) << 4) | ((codes[e + 96] & 3) << 6))


@njit(cache=True, error_model="numpy")
def _block_sigma2(x, start):
    sum_x2 = F32(0.0)
    for j in range(QK_K):
        sum_x2 += x[start + j] * x[start + j]
    return sum_x2


# ---------------------------------------------------------------------------------------------------- Q2_K

@njit(cache=True, error_model="numpy")
def _q2_k_requantize_and_pack(x, xs, out, ob, byte_scales, d, dmin, codes):
    """Stores d/dmin, re-derives every code from the fp16-rounded scales, packs; shared by both paths."""
    d_stored = fp16_bits_to_fp32(store_fp16(out, ob + 80, d))
    dmin_stored = fp16_bits_to_fp32(store_fp16(out, ob + 82, dmin))
    for j in range(SUB):
        out[ob + j] = byte_scales[j]
        dd = d_stored * F32(byte_scales[j] & 0xF)
        if dd == 0:
            continue  # keeps the search's codes (§2.6)
        dm = dmin_stored * F32(byte_scales[j] >> 4)
        for i in range(SUB):
            codes[SUB * j + i] = max(0, min(3, nearest_int((x[xs + SUB * j + i] + dm) / dd)))
    _pack_2bit(out, ob + 16, codes)


@njit(cache=True, error_model="numpy")
def _q2_k_block_ref(x, xs, out, ob, codes, aux, weights, scales, mins, byte_scales, lanes):
    """The sub-blocks' searches 8 at a time (make_qkx_quants_8; weights |x|, absolute errors)."""
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for i in range(QK_K):
        weights[i] = abs(x[xs + i])
    for h in range(0, SUB, 8):
        make_qkx_quants_8(SUB, 3, x, xs + SUB * h, weights[SUB * h:], codes, SUB * h, lanes, aux, Q2_REF_RMIN,
                          Q2_REF_RDELTA, Q2_REF_NSTEP, True, scales[h:h + 8], mins[h:h + 8])
    for j in range(SUB):
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    d = F32(0.0)
    dmin = F32(0.0)
    for j in range(SUB):
        byte_scales[j] = 0
    if max_scale > 0:
        iscale = F32(15.0) / max_scale
        for j in range(SUB):
            byte_scales[j] = nearest_int(iscale * scales[j]) & 0xFF
        d = max_scale / F32(15.0)
    if max_min > 0:
        iscale = F32(15.0) / max_min
        for j in range(SUB):
            byte_scales[j] = (byte_scales[j] | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
        dmin = max_min / F32(15.0)
    _q2_k_requantize_and_pack(x, xs, out, ob, byte_scales, d, dmin, codes)


@njit(cache=True, error_model="numpy")
def _q2_k_block_imatrix(x, xs, qw, out, ob, codes, aux, weights, scales, mins, byte_scales, sw, Ls, Lm, lanes):
    sigma2 = _block_sigma2(x, xs) / F32(QK_K)  # unlike Q3_K..Q5_K, no factor 2 here
    for j in range(SUB):
        sw[j] = F32(0.0)
        for i in range(SUB * j, SUB * (j + 1)):
            v = x[xs + i]
            weights[i] = qw[xs + i] * np.sqrt(sigma2 + v * v)
        for i in range(SUB * j, SUB * (j + 1)):
            sw[j] += weights[i]
    for h in range(0, SUB, 8):
        make_qkx_quants_8(SUB, 3, x, xs + SUB * h, weights[SUB * h:], codes, SUB * h, lanes, aux, Q2_IMATRIX_RMIN,
                          Q2_IMATRIX_RDELTA, Q2_IMATRIX_NSTEP, False, scales[h:h + 8], mins[h:h + 8])
    d = make_qp_quants(SUB, 15, scales, Ls, sw)
    dmin = make_qp_quants(SUB, 15, mins, Lm, sw)
    for j in range(SUB):
        byte_scales[j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    _q2_k_requantize_and_pack(x, xs, out, ob, byte_scales, d, dmin, codes)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q2_k(x, imatrix, out):
    """Q2_K: float32 x[rows, n_per_row] → out[rows, n_per_row/256*84]; imatrix float32[n_per_row] or empty."""
    _check_shapes(x, imatrix, out, Q2_K_BYTES)
    rows, n_per_row = x.shape
    n_blocks = n_per_row // QK_K
    with_imatrix = imatrix.size != 0
    for r in prange(rows):
        xr = x[r]
        outr = out[r]
        codes = np.zeros(QK_K, dtype=np.int64)
        aux = np.zeros(2 * QK_K, dtype=np.uint8)
        weights = np.zeros(QK_K, dtype=np.float32)
        lanes = np.zeros(LANE_SCRATCH, dtype=np.float32)
        scales = np.zeros(SUB, dtype=np.float32)
        mins = np.zeros(SUB, dtype=np.float32)
        byte_scales = np.zeros(SUB, dtype=np.int64)
        sw = np.zeros(SUB, dtype=np.float32)
        Ls = np.zeros(SUB, dtype=np.uint8)  # uint8 as in C: make_qp_quants' codes wrap like C's conversion
        Lm = np.zeros(SUB, dtype=np.uint8)
        for b in range(n_blocks):
            if with_imatrix:
                _q2_k_block_imatrix(xr, b * QK_K, imatrix, outr, b * Q2_K_BYTES, codes, aux, weights, scales,
                                    mins, byte_scales, sw, Ls, Lm, lanes)
            else:
                _q2_k_block_ref(xr, b * QK_K, outr, b * Q2_K_BYTES, codes, aux, weights, scales, mins,
                                byte_scales, lanes)


# ---------------------------------------------------------------------------------------------------- Q3_K

@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, xs, L, ls):
    """Q3_K ref sub-block search (make_q3_quants with do_rmse): symmetric codes L[ls:ls+n] in 0..2*nmax-1
    (all 0 for an all-zero group) from weights x², refined coordinate-wise; returns the signed scale."""
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[xs + i])
        if ax > amax:
            amax = ax
            vmax = x[xs + i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[ls + i] = 0
        return F32(0.0)
    iscale = F32(-nmax) / vmax
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        v = x[xs + i]
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
        L[ls + i] = l
        w = v * v
        fl = F32(l)
        sumlx += (w * v) * fl
        suml2 += (w * fl) * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            v = x[xs + i]
            w = v * v
            fl = F32(L[ls + i])
            slx = sumlx - (w * v) * fl
            if slx > 0:
                sl2 = suml2 - (w * fl) * fl
                new_l = max(-nmax, min(nmax - 1, nearest_int((v * sl2) / slx)))
                if new_l != L[ls + i]:
                    fnew = F32(new_l)
                    slx += (w * v) * fnew
                    sl2 += (w * fnew) * fnew
                    if sl2 > 0 and (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[ls + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[ls + i] += nmax
    return sumlx / suml2 if suml2 > 0 else F32(0.0)


@njit(cache=True, error_model="numpy")
def _q3_k_requantize_and_pack(x, xs, out, ob, scale_codes, d, codes):
    """Packs the 6-bit scale codes, stores d, re-derives the codes from fp16(d) × (code − 32), splits each
    3-bit code into its hmask bit and 2 low bits; shared by both paths."""
    for k in range(12):
        out[ob + 96 + k] = 0
    for j in range(SUB):
        c = scale_codes[j]
        if j < 8:
            out[ob + 96 + j] = c & 0xF
        else:
            out[ob + 96 + j - 8] |= (c & 0xF) << 4
        out[ob + 96 + 8 + j % 4] |= (c >> 4) << (2 * (j // 4))
    d_stored = fp16_bits_to_fp32(store_fp16(out, ob + 108, d))
    for j in range(SUB):
        dd = d_stored * F32(scale_codes[j] - 32)
        if dd == 0:
            continue  # keeps the search's codes (§2.6)
        for i in range(SUB):
            codes[SUB * j + i] = max(-4, min(3, nearest_int(x[xs + SUB * j + i] / dd))) + 4
    for k in range(32):
        out[ob + k] = 0
    for e in range(QK_K):
        if codes[e] > 3:
            out[ob + e % 32] |= 1 << (e // 32)
            codes[e] -= 4
    _pack_2bit(out, ob + 32, codes)


@njit(cache=True, error_model="numpy")
def _q3_k_block_ref(x, xs, out, ob, codes, scales, scale_codes):
    max_scale = F32(0.0)
    amax = F32(0.0)
    for j in range(SUB):
        scales[j] = make_q3_quants(SUB, 4, x, xs + SUB * j, codes, SUB * j)
        a = abs(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
    d = F32(0.0)
    for j in range(SUB):
        scale_codes[j] = 0
    if max_scale != 0:
        iscale = F32(-32.0) / max_scale
        for j in range(SUB):
            l = nearest_int(iscale * scales[j])
            l = ((l + 128) & 0xFF) - 128  # C stores it in an int8_t before clamping
            scale_codes[j] = max(-32, min(31, l)) + 32
        d = F32(1.0) / iscale
    _q3_k_requantize_and_pack(x, xs, out, ob, scale_codes, d, codes)


@njit(cache=True, error_model="numpy")
def _q3_k_block_imatrix(x, xs, qw, out, ob, codes, scales, scale_codes, weights, sw):
    sigma2 = (F32(2.0) * _block_sigma2(x, xs)) / F32(QK_K)
    for j in range(SUB):
        for i in range(SUB):
            v = x[xs + SUB * j + i]
            weights[i] = qw[xs + SUB * j + i] * np.sqrt(sigma2 + v * v)
        total = F32(0.0)
        for i in range(SUB):
            total += weights[i]
        sw[j] = total
        scales[j] = make_qx_quants(SUB, 4, x, xs + SUB * j, codes, SUB * j, weights, 0)
    d = make_qx_quants(SUB, 32, scales, 0, scale_codes, 0, sw, 0)  # codes come out as signed + 32
    _q3_k_requantize_and_pack(x, xs, out, ob, scale_codes, d, codes)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q3_k(x, imatrix, out):
    """Q3_K: float32 x[rows, n_per_row] → out[rows, n_per_row/256*110]; imatrix float32[n_per_row] or empty."""
    _check_shapes(x, imatrix, out, Q3_K_BYTES)
    rows, n_per_row = x.shape
    n_blocks = n_per_row // QK_K
    with_imatrix = imatrix.size != 0
    for r in prange(rows):
        xr = x[r]
        outr = out[r]
        codes = np.zeros(QK_K, dtype=np.int64)
        scales = np.zeros(SUB, dtype=np.float32)
        scale_codes = np.zeros(SUB, dtype=np.int64)
        weights = np.zeros(SUB, dtype=np.float32)
        sw = np.zeros(SUB, dtype=np.float32)
        for b in range(n_blocks):
            if with_imatrix:
                _q3_k_block_imatrix(xr, b * QK_K, imatrix, outr, b * Q3_K_BYTES, codes, scales, scale_codes,
                                    weights, sw)
            else:
                _q3_k_block_ref(xr, b * QK_K, outr, b * Q3_K_BYTES, codes, scales, scale_codes)
