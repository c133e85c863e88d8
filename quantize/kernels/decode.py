"""Block decoders for the evaluation's hot path: stored rows (uint8 [rows, row bytes]) -> float32 [rows, n], parallel
over rows, bit-identical to gguf-py's `dequantize` (tests/test_kernels.py checks every one) and so to ggml's
`dequantize_row_*` (docs/reference/quantization.md §1.2 for the layouts). gguf-py stays the decoder of every other
type; these serve the types quantized models are mostly made of, where its single-threaded numpy was the slow part
of every evaluation pass that does not keep a float32 copy.

Every kernel has the signature ``kernel(raw, out)``. Types: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, Q1_0, Q2_0 (gguf-py has no decoder for Q1_0 and Q2_0: tests/test_kernels_lowbit.py
checks those against numpy ports of ggml's `dequantize_row_q1_0` / `_q2_0`). Each value is computed with gguf-py's
float32 operations in its order: a sub-block scale is ``d * float(scale)`` rounded to float32 first, then multiplied
by the code (and the min subtracted), never fused.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import (F32, IQ4_NL_BYTES, IQ4_XS_BYTES, IQ4NL_VALUES, QK, QK1_0, QK2_0, QK_K, Q1_0_BYTES, Q2_0_BYTES,
                     Q2_K_BYTES, Q3_K_BYTES, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q5_K_BYTES,
                     Q6_K_BYTES, Q8_0_BYTES, TQ1_0_BYTES, TQ2_0_BYTES, fp16_bits_to_fp32)


@njit(cache=True, inline="always")
def _half(blk, offset):
    return fp16_bits_to_fp32(np.int64(blk[offset]) | (np.int64(blk[offset + 1]) << 8))


@njit(cache=True, inline="always")
def _int8(byte):
    v = np.int64(byte)
    return v - 256 if v >= 128 else v


@njit(parallel=True, cache=True)
def decode_q8_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, Q8_0_BYTES * ib:Q8_0_BYTES * (ib + 1)]
            d = _half(blk, 0)
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK):
                y[j] = F32(_int8(blk[2 + j])) * d


@njit(parallel=True, cache=True)
def decode_q4_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, Q4_0_BYTES * ib:Q4_0_BYTES * (ib + 1)]
            d = _half(blk, 0)
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK // 2):
                b = np.int64(blk[2 + j])
                y[j] = F32((b & 0xF) - 8) * d
                y[j + QK // 2] = F32((b >> 4) - 8) * d


@njit(cache=True, inline="always")
def _scale_min_k4(j, scales):
    if j < 4:
        return np.int64(scales[j]) & 63, np.int64(scales[j + 4]) & 63
    d = (np.int64(scales[j + 4]) & 0xF) | ((np.int64(scales[j - 4]) >> 6) << 4)
    m = (np.int64(scales[j + 4]) >> 4) | ((np.int64(scales[j]) >> 6) << 4)
    return d, m


@njit(cache=True, inline="always")
def _group_scales(d, dmin, scales, g):
    """Q4_K/Q5_K: (scale, min) of the two 32-value sub-blocks of 64-value group g, as float32."""
    sc, m = _scale_min_k4(2 * g, scales)
    sc2, m2 = _scale_min_k4(2 * g + 1, scales)
    return d * F32(sc), dmin * F32(m), d * F32(sc2), dmin * F32(m2)


@njit(parallel=True, cache=True)
def decode_q4_k(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, Q4_K_BYTES * ib:Q4_K_BYTES * (ib + 1)]
            d, dmin = _half(blk, 0), _half(blk, 2)
            scales = blk[4:16]
            qs = blk[16:]
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for g in range(4):                     # 64 values: 32 low nibbles, then 32 high nibbles
                d1, m1, d2, m2 = _group_scales(d, dmin, scales, g)
                for l in range(32):
                    q = np.int64(qs[32 * g + l])
                    y[64 * g + l] = d1 * F32(q & 0xF) - m1
                    y[64 * g + 32 + l] = d2 * F32(q >> 4) - m2


@njit(parallel=True, cache=True)
def decode_q6_k(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, Q6_K_BYTES * ib:Q6_K_BYTES * (ib + 1)]
            d = _half(blk, 208)
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for half in range(2):                  # 128 values each: ql[64], qh[32], scales[8]
                ql = blk[64 * half:64 * half + 64]
                qh = blk[128 + 32 * half:128 + 32 * half + 32]
                for l in range(32):
                    s = 192 + 8 * half + l // 16
                    h = np.int64(qh[l])
                    q1 = ((np.int64(ql[l]) & 0xF) | ((h & 3) << 4)) - 32
                    q2 = ((np.int64(ql[l + 32]) & 0xF) | (((h >> 2) & 3) << 4)) - 32
                    q3 = ((np.int64(ql[l]) >> 4) | (((h >> 4) & 3) << 4)) - 32
                    q4 = ((np.int64(ql[l + 32]) >> 4) | (((h >> 6) & 3) << 4)) - 32
                    base = 128 * half + l
                    y[base] = (d * F32(_int8(blk[s]))) * F32(q1)
                    y[base + 32] = (d * F32(_int8(blk[s + 2]))) * F32(q2)
                    y[base + 64] = (d * F32(_int8(blk[s + 4]))) * F32(q3)
                    y[base + 96] = (d * F32(_int8(blk[s + 6]))) * F32(q4)


@njit(cache=True, inline="always")
def _fifth_bits(blk, offset):
    return (np.int64(blk[offset]) | (np.int64(blk[offset + 1]) << 8) | (np.int64(blk[offset + 2]) << 16)
            | (np.int64(blk[offset + 3]) << 24))


@njit(parallel=True, cache=True)
def decode_q4_1(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, Q4_1_BYTES * ib:Q4_1_BYTES * (ib + 1)]
            d, m = _half(blk, 0), _half(blk, 2)
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK // 2):
                b = np.int64(blk[4 + j])
                y[j] = F32(b & 0xF) * d + m
                y[j + QK // 2] = F32(b >> 4) * d + m


@njit(parallel=True, cache=True)
def decode_q5_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, Q5_0_BYTES * ib:Q5_0_BYTES * (ib + 1)]
            d = _half(blk, 0)
            qh = _fifth_bits(blk, 2)
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK // 2):
                b = np.int64(blk[6 + j])
                y[j] = F32(((b & 0xF) | (((qh >> j) << 4) & 0x10)) - 16) * d
                y[j + QK // 2] = F32(((b >> 4) | ((qh >> (j + 12)) & 0x10)) - 16) * d


@njit(parallel=True, cache=True)
def decode_q5_1(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, Q5_1_BYTES * ib:Q5_1_BYTES * (ib + 1)]
            d, m = _half(blk, 0), _half(blk, 2)
            qh = _fifth_bits(blk, 4)
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK // 2):
                b = np.int64(blk[8 + j])
                y[j] = F32((b & 0xF) | (((qh >> j) << 4) & 0x10)) * d + m
                y[j + QK // 2] = F32((b >> 4) | ((qh >> (j + 12)) & 0x10)) * d + m


@njit(parallel=True, cache=True)
def decode_q5_k(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, Q5_K_BYTES * ib:Q5_K_BYTES * (ib + 1)]
            d, dmin = _half(blk, 0), _half(blk, 2)
            scales = blk[4:16]
            qh = blk[16:48]
            ql = blk[48:]
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for g in range(4):                     # 64 values: low nibbles + bit 2g, high nibbles + bit 2g+1
                d1, m1, d2, m2 = _group_scales(d, dmin, scales, g)
                for l in range(32):
                    q = np.int64(ql[32 * g + l])
                    h = np.int64(qh[l])
                    y[64 * g + l] = d1 * F32((q & 0xF) + (16 if (h >> (2 * g)) & 1 else 0)) - m1
                    y[64 * g + 32 + l] = d2 * F32((q >> 4) + (16 if (h >> (2 * g + 1)) & 1 else 0)) - m2


@njit(parallel=True, cache=True)
def decode_q2_k(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, Q2_K_BYTES * ib:Q2_K_BYTES * (ib + 1)]
            d, dmin = _half(blk, 80), _half(blk, 82)   # scales[16] (low nibble scale, high nibble min), qs[64]
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for half in range(2):                      # 128 values: 2-bit fields 0..3 of qs[32 * half:32 * half + 32]
                for s in range(4):
                    for k in range(2):                 # two 16-value sub-blocks per (half, field)
                        sc = np.int64(blk[8 * half + 2 * s + k])
                        dl = d * F32(sc & 0xF)
                        ml = dmin * F32(sc >> 4)
                        for l in range(16 * k, 16 * k + 16):
                            q = (np.int64(blk[16 + 32 * half + l]) >> (2 * s)) & 3
                            y[128 * half + 32 * s + l] = dl * F32(q) - ml


@njit(cache=True, inline="always")
def _q3_k_scale(scales, i):
    """Q3_K: the 6-bit scale of 16-value sub-block i (low 4 bits from bytes 0..7, high 2 from bytes 8..11), less 32."""
    low = (np.int64(scales[i % 8]) >> (4 * (i // 8))) & 0xF
    high = (np.int64(scales[8 + i % 4]) >> (2 * (i // 4))) & 3
    return (low | (high << 4)) - 32


@njit(parallel=True, cache=True)
def decode_q3_k(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, Q3_K_BYTES * ib:Q3_K_BYTES * (ib + 1)]
            d = _half(blk, 108)                        # hmask[32], qs[64], scales[12], d
            scales = blk[96:108]
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for half in range(2):                      # 128 values: 2-bit fields 0..3 of qs, hmask bits 4*half + field
                for s in range(4):
                    for k in range(2):
                        dl = d * F32(_q3_k_scale(scales, 8 * half + 2 * s + k))
                        for l in range(16 * k, 16 * k + 16):
                            q = (np.int64(blk[32 + 32 * half + l]) >> (2 * s)) & 3
                            if not (np.int64(blk[l]) >> (4 * half + s)) & 1:
                                q -= 4                 # the high bit is stored inverted: clear means -4
                            y[128 * half + 32 * s + l] = dl * F32(q)


@njit(parallel=True, cache=True)
def decode_iq4_nl(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, IQ4_NL_BYTES * ib:IQ4_NL_BYTES * (ib + 1)]
            d = _half(blk, 0)
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK // 2):
                b = np.int64(blk[2 + j])
                y[j] = d * IQ4NL_VALUES[b & 0xF]
                y[j + QK // 2] = d * IQ4NL_VALUES[b >> 4]


@njit(parallel=True, cache=True)
def decode_iq4_xs(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, IQ4_XS_BYTES * ib:IQ4_XS_BYTES * (ib + 1)]
            d = _half(blk, 0)                          # d, scales_h (uint16), scales_l[4], qs[128]
            scales_h = np.int64(blk[2]) | (np.int64(blk[3]) << 8)
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for s in range(QK_K // 32):                # eight 32-value sub-blocks with 6-bit scales
                low = (np.int64(blk[4 + s // 2]) >> (4 * (s % 2))) & 0xF
                high = (scales_h >> (2 * s)) & 3
                dl = d * F32((low | (high << 4)) - 32)
                for j in range(16):
                    b = np.int64(blk[8 + 16 * s + j])
                    y[32 * s + j] = dl * IQ4NL_VALUES[b & 0xF]
                    y[32 * s + 16 + j] = dl * IQ4NL_VALUES[b >> 4]


@njit(cache=True, inline="always")
def _trit_of(byte, power):
    """The trit `power` places from the top of a TQ1_0 byte: the byte times 3^power wraps to 8 bits (the fraction's
    remaining digits), times 3, high byte: -1, 0 or 1."""
    return ((((np.int64(byte) * power) & 0xFF) * 3) >> 8) - 1


@njit(parallel=True, cache=True)
def decode_tq1_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, TQ1_0_BYTES * ib:TQ1_0_BYTES * (ib + 1)]
            d = _half(blk, 52)
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            power = 1
            for t in range(5):
                for m in range(32):
                    y[32 * t + m] = F32(_trit_of(blk[m], power)) * d
                for m in range(16):
                    y[160 + 16 * t + m] = F32(_trit_of(blk[32 + m], power)) * d
                if t < 4:
                    for m in range(4):
                        y[240 + 4 * t + m] = F32(_trit_of(blk[48 + m], power)) * d
                power *= 3


@njit(parallel=True, cache=True)
def decode_tq2_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            blk = raw[r, TQ2_0_BYTES * ib:TQ2_0_BYTES * (ib + 1)]
            d = _half(blk, 64)
            y = out[r, QK_K * ib:QK_K * (ib + 1)]
            for half in range(2):
                for k in range(4):
                    for m in range(32):
                        y[128 * half + 32 * k + m] = F32(((np.int64(blk[32 * half + m]) >> (2 * k)) & 3) - 1) * d


@njit(parallel=True, cache=True)
def decode_q1_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK1_0):
            blk = raw[r, Q1_0_BYTES * ib:Q1_0_BYTES * (ib + 1)]
            d = _half(blk, 0)
            y = out[r, QK1_0 * ib:QK1_0 * (ib + 1)]
            for j in range(QK1_0):
                y[j] = d if (np.int64(blk[2 + j // 8]) >> (j % 8)) & 1 else -d


@njit(parallel=True, cache=True)
def decode_q2_0(raw, out):
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK2_0):
            blk = raw[r, Q2_0_BYTES * ib:Q2_0_BYTES * (ib + 1)]
            d = _half(blk, 0)
            y = out[r, QK2_0 * ib:QK2_0 * (ib + 1)]
            for j in range(QK2_0):
                y[j] = F32(((np.int64(blk[2 + j // 4]) >> (2 * (j % 4))) & 3) - 1) * d
