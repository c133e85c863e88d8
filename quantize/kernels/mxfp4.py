"""MXFP4 (32-element blocks, 17 bytes): one E8M0 power-of-two scale byte, then 32 e2m1 (fp4) codes, value j in the
low nibble of byte j and value j+16 in its high nibble (docs/reference/quantization.md §1; OCP microscaling spec).

llama.cpp's ``quantize_mxfp4`` runs ``quantize_row_mxfp4_ref`` and ignores the importance matrix. Per block:
``e = amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0``, ``d = 2**(e - 128)`` (ggml_e8m0_to_fp32_half: the
code table holds the e2m1 values doubled), each value the nearest ``kvalues_mxfp4[i] * d``, first index on a tie.

The exponent is not the float's own exponent field: log2f rounds its result to float32, so an amax a few ulps
below a power of two (|log2| >= 2) gives the next integer, and floorf keeps it. The kernel therefore calls log2f
itself, as the C does (numba lowers ``math.log2`` of a float32 to libm's ``log2f``); once per block, it costs
nothing next to the 32 x 16 distance tests. Outside the normal range the C's conversion shows: an amax in
[2**-126, 2**-125) gives -1, stored as 0xFF (an E8M0 NaN, which llama-quantize's validation then rejects), and a
subnormal amax wraps to 232..254 (x86-64 converts through a 32-bit int and keeps the low byte).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .common import F32, MXFP4_BYTES, QK, c_float_to_int, float32_from_bits

# kvalues_mxfp4 of ggml-common.h (e2m1 doubled), as float32: the C multiplies them by the float scale.
MXFP4_VALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)


@njit(cache=True, inline="always")
def e8m0_to_fp32_half(e):
    """ggml_e8m0_to_fp32_half: 2**(e - 128), subnormal for e < 2 (exact)."""
    bits = (0x00200000 << e) if e < 2 else ((e - 1) << 23)
    return float32_from_bits(np.int32(bits))


@njit(cache=True, inline="always")
def block_exponent(amax):
    """The E8M0 byte of a block whose largest magnitude is the float32 ``amax`` (see the module note)."""
    if not amax > 0:
        return 0
    return c_float_to_int(np.floor(math.log2(amax)) - F32(2.0) + F32(127.0)) & 0xFF


@njit(cache=True, inline="always")
def _best_index(x, d):
    values = MXFP4_VALUES
    best = 0
    best_err = abs(values[0] * d - x)
    for i in range(1, 16):
        err = abs(values[i] * d - x)
        if err < best_err:
            best = i
            best_err = err
    return best


@njit(parallel=True, cache=True, error_model="numpy")
def quantize_mxfp4(x, imatrix, out):
    rows, n = x.shape
    for r in prange(rows):
        for ib in range(n // QK):
            xb = x[r, QK * ib:QK * (ib + 1)]
            blk = out[r, MXFP4_BYTES * ib:MXFP4_BYTES * (ib + 1)]
            amax = F32(0.0)
            for j in range(QK):
                a = abs(xb[j])
                if amax < a:
                    amax = a
            e = block_exponent(amax)
            d = e8m0_to_fp32_half(e)
            blk[0] = e
            for j in range(QK // 2):
                blk[1 + j] = _best_index(xb[j], d) | (_best_index(xb[j + QK // 2], d) << 4)


@njit(parallel=True, cache=True)
def decode_mxfp4(raw, out):
    """dequantize_row_mxfp4: value = kvalues_mxfp4[code] * d, in float32."""
    rows, n = out.shape
    for r in prange(rows):
        for ib in range(n // QK):
            blk = raw[r, MXFP4_BYTES * ib:MXFP4_BYTES * (ib + 1)]
            d = e8m0_to_fp32_half(np.int64(blk[0]))
            y = out[r, QK * ib:QK * (ib + 1)]
            for j in range(QK // 2):
                b = np.int64(blk[1 + j])
                y[j] = MXFP4_VALUES[b & 0xF] * d
                y[j + QK // 2] = MXFP4_VALUES[b >> 4] * d
