"""The 1- and 2-bit formats: TQ1_0 and TQ2_0 (ternary weights, BitNet b1.58 / TriLM), Q1_0 (signs) and Q2_0.

All four are one absolute scale per block and codes from it, with no search: llama.cpp's ``quantize_tq1_0``,
``quantize_tq2_0``, ``quantize_q1_0`` and ``quantize_q2_0`` run their ``_ref`` row function whether or not an
importance matrix is given, so the imatrix never changes a byte (the format table marks them so).

* TQ2_0 (256 values, 66 bytes): d = max|x|, each value -> round(x/d) in {-1, 0, 1}, stored +1 in 2 bits; byte m of
  each 32-byte half holds values m, m+32, m+64, m+96 of that half's 128, lowest bits first; fp16 d last.
* TQ1_0 (256 values, 54 bytes): the same trits packed five to a byte (3^5 = 243 <= 256) as a base-3 fraction:
  the byte is ceil(q * 256 / 243) of the base-3 number q, first value most significant, so that a decoder gets
  each trit back with one multiply and a shift. 32 bytes of five values (strided by 32), 16 of five (strided by
  16), then 4 bytes of four values (strided by 4, shifted up one trit); fp16 d last.
* Q1_0 (128 values, 18 bytes): fp16 d = mean |x| first, then one bit per value, set for x >= 0 (so -0.0 too).
* Q2_0 (64 values, 18 bytes): fp16 d = max |x| first, then round(x/d) clamped to -1..2, stored +1 in 2 bits,
  four values per byte in order, lowest bits first: the codes mean -d, 0, d, 2d (2d is never chosen, since
  |x| <= d).

The C rounds with ``lroundf``: half away from zero. Where the block's largest magnitude is a float32 subnormal,
1/d overflows to inf and every product is ±inf or NaN; x86-64 converts those to the "integer indefinite" value,
whose low 32 bits are 0 after lroundf (a long). The kernels reproduce that: such a block stores the trit 0
everywhere. Q2_0 rounds with roundf and converts to an int: inf/NaN become INT_MIN, so such a block stores the code
0 (-d) everywhere.

The `gguf` package has no Q2_0 yet (type 42): qtool/ggml_types.py adds it.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import F32, QK1_0, QK2_0, QK_K, Q1_0_BYTES, Q2_0_BYTES, TQ1_0_BYTES, TQ2_0_BYTES, store_fp16

@njit(cache=True, inline="always")
def _round_half_away(v):
    t = np.trunc(v)
    if abs(v - t) >= F32(0.5):  # exact: v - trunc(v) is representable for every float32
        t += F32(1.0) if v > 0 else F32(-1.0)
    return np.int64(t)


@njit(cache=True, inline="always")
def _trit(v):
    """lroundf(v) + 1 as the ternary encoders compute it: 0, 1, 2 for -1, 0, 1; 1 for inf/NaN (see above)."""
    if not np.isfinite(v):
        return np.int64(1)
    return _round_half_away(v) + 1


@njit(cache=True, inline="always")
def _absmax(xb):
    amax = F32(0.0)
    for j in range(xb.shape[0]):
        a = abs(xb[j])
        amax = a if a > amax else amax
    return amax


@njit(cache=True, inline="always")
def _trits(xb, start, stride, count, inv):
    """The base-3 number of `count` values (first most significant)."""
    q = np.int64(0)
    for k in range(count):
        q = q * 3 + _trit(xb[start + k * stride] * inv)
    return q


@njit(cache=True, inline="always")
def _base3_byte(q):
    return (q * 256 + 242) // 243  # ceiling of q * 256 / 243


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_tq1_0(x, imatrix, out):
    rows, n = x.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            xb = x[r, QK_K * ib:QK_K * (ib + 1)]
            blk = out[r, TQ1_0_BYTES * ib:TQ1_0_BYTES * (ib + 1)]
            d = _absmax(xb)
            inv = F32(1.0) / d if d != 0 else F32(0.0)
            for m in range(32):                      # values 0..159: five per byte, strided by 32
                blk[m] = _base3_byte(_trits(xb, m, 32, 5, inv))
            for m in range(16):                      # values 160..239: five per byte, strided by 16
                blk[32 + m] = _base3_byte(_trits(xb, 160 + m, 16, 5, inv))
            for m in range(4):                       # values 240..255: four per byte, strided by 4
                blk[48 + m] = _base3_byte(3 * _trits(xb, 240 + m, 4, 4, inv))
            store_fp16(blk, 52, d)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_tq2_0(x, imatrix, out):
    rows, n = x.shape
    for r in prange(rows):
        for ib in range(n // QK_K):
            xb = x[r, QK_K * ib:QK_K * (ib + 1)]
            blk = out[r, TQ2_0_BYTES * ib:TQ2_0_BYTES * (ib + 1)]
            d = _absmax(xb)
            inv = F32(1.0) / d if d != 0 else F32(0.0)
            for half in range(2):
                for m in range(32):
                    q = np.int64(0)
                    for k in range(4):
                        q |= (_trit(xb[128 * half + 32 * k + m] * inv) & 3) << (2 * k)
                    blk[32 * half + m] = q
            store_fp16(blk, 64, d)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q1_0(x, imatrix, out):
    rows, n = x.shape
    for r in prange(rows):
        for ib in range(n // QK1_0):
            xb = x[r, QK1_0 * ib:QK1_0 * (ib + 1)]
            blk = out[r, Q1_0_BYTES * ib:Q1_0_BYTES * (ib + 1)]
            sum_abs = F32(0.0)
            for j in range(QK1_0):                   # sequential, as the C sums
                sum_abs += abs(xb[j])
            store_fp16(blk, 0, sum_abs / F32(QK1_0))
            for byte in range(QK1_0 // 8):
                bits = 0
                for k in range(8):
                    bits |= (1 if xb[8 * byte + k] >= 0 else 0) << k
                blk[2 + byte] = bits


@njit(cache=True, inline="always")
def _q2_0_code(v):
    """(int)roundf(v) + 1 clamped to 0..3, as quantize_row_q2_0_ref computes it (inf/NaN -> INT_MIN -> 0)."""
    if not np.isfinite(v):
        return np.int64(0)
    return min(max(_round_half_away(v) + 1, 0), 3)


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_q2_0(x, imatrix, out):
    rows, n = x.shape
    for r in prange(rows):
        for ib in range(n // QK2_0):
            xb = x[r, QK2_0 * ib:QK2_0 * (ib + 1)]
            blk = out[r, Q2_0_BYTES * ib:Q2_0_BYTES * (ib + 1)]
            d = _absmax(xb)
            inv = F32(1.0) / d if d > 0 else F32(0.0)
            store_fp16(blk, 0, d)
            for byte in range(QK2_0 // 4):
                q = np.int64(0)
                for k in range(4):
                    q |= _q2_0_code(xb[4 * byte + k] * inv) << (2 * k)
                blk[2 + byte] = q
