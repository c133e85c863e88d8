"""Mat-vec kernels: a few activation rows times a quantized weight matrix, read straight from its stored blocks.

Decoding one token at a time multiplies 1 (up to MAX_ROWS) activation rows by every weight matrix of the model, a
product bound by reading the weights. Decoding the matrix to float32 first (formats.decode, then BLAS) writes and
reads four bytes per weight on top of the stored ones; these kernels decode each block in registers and
multiply-accumulate it at once, in parallel over weight rows (numba prange).

    kernel = kernel_for(qtype)       # None where the type has none (F32: the caller uses BLAS on the stored view)
    kernel(raw, x, out)              # raw uint8 [n_out, row_bytes], x float32 [B, n_in], out float32 [B, n_out]

out[b, r] = sum_j x[b, j] * W[r, j], W the decoded weights (formats.decode's values), 1 <= B <= 4, every element of
out written. Types: F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.

Values. Each weight is decoded with decode.py's float32 operations and helpers (`_half`, `_int8`, `_fifth_bits`,
`_group_scales`/`_scale_min_k4`), e.g. Q4_K (d*sc)*q - dmin*m, Q6_K (d*sc)*(q-32). Three pieces are this module's
own, each for vectorization and each exact: integer codes in 32-bit lanes (`_code`: numba computes in 64 bits,
which halves the vector width), fp16 without branches (`_f16_to_f32` for F16 rows, `_f16x4_to_f32` for the scales
of four legacy blocks at once; tests/test_matvec.py checks both against common.fp16_bits_to_fp32 on all 65536
patterns).

Summation order (the source's; fastmath={'contract'} only: LLVM may fuse a*b+c into one FMA, skipping one rounding,
e.g. of d*q before "- m", but never reassociates). A row is read in lanes: one vectorized iteration covers 16 or 32
lanes l and adds per lane a balanced tree of 8 (Q6_K 16) products x*w, taken from 8 sub-blocks of a super-block or
from 4 legacy blocks (F16/BF16: 8 runs of 32 values), into the lane's float32 accumulator, which lives on the stack
(`_lane_buffer`; registers, after LLVM's SROA). After the row's last block the lanes are summed pairwise. So there
is no horizontal reduction per block, and out[b, r] carries the error of a float32 sum of depth about
n_in/128 + 10, relative to sum_j |x[b, j] W[r, j]|.
Chosen by measurement (one thread, 11008x4096 Q4_K, 2.0 ms this way): the dot product of the integer codes per
sub-block times one scale, as ggml does, was slower with a horizontal reduction per sub-block (2.4-2.5 ms) and
with lane accumulators per sub-block (2.3 ms); letting fastmath reassociation vectorize the reductions instead of
the lanes ends each block in a serial chain of FMAs (2.6-4.3 ms).

B > 1. Each kernel is compiled for B = 1..4 (NB, a constant in its code): every value is decoded once and enters B
rows' lanes, without allocation in the parallel loop.

Small products (< PARALLEL_MIN_WEIGHTS weights) run on the calling thread, as evaluate/model.py's `_serial_twin`
kernels do: below that, waking the workers costs more than they save.
"""
from __future__ import annotations

import os
import types as pytypes
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from qtool.numba_start import drop_stale_kernels
from gguf import GGMLQuantizationType
from numba import carray, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic
import llvmlite.binding as llvm
from llvmlite import ir

from qtool.quantize.kernels import common as _common
from qtool.quantize.kernels import decode as _decode
from qtool.quantize.kernels.common import (F32, QK, QK_K, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES,
                                           Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES, float32_from_bits)
from qtool.quantize.kernels.decode import _fifth_bits, _group_scales, _half, _int8

T = GGMLQuantizationType
Kernel = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

# numba compiles for the host CPU; QTOOL_QDOT_PORTABLE=1 (tests) takes the code for CPUs without F16C here too
HAS_F16C = os.environ.get("QTOOL_QDOT_PORTABLE") != "1" and bool(llvm.get_host_cpu_features().get("f16c", False))
MAX_ROWS = 4                     # activation rows one call handles (the B = 1..4 specializations)
# Below this many weights a product runs on the calling thread. benchmarks/matvec_speed.py --crossover (2 cores,
# AVX2, with qtool's GOMP_SPINCOUNT, so the workers spin a little before they sleep): a parallel call costs a few
# us more than a serial one; every type breaks even between 16K weights (64x256: F16 serial 2.4 us, parallel 3.0;
# Q4_0 3.2 and 4.8) and 64K (128x512: F16 5.9 and 5.2, Q8_0 13.4 and 9.5). Passive workers (no spinning) cost
# 30-40 us a call and moved it to 1M.
PARALLEL_MIN_WEIGHTS = 1 << 16
LANE_BUFFER = MAX_ROWS * 32      # float32 accumulators per call frame: 32 lanes (or 16) per activation row
# Weight rows per parallel work item for B >= 3 (B <= 2: one). The same machine code, reading the same bytes in the
# same order, ran B = 3, 4 up to 1.5x faster with groups of 64 (Q4_K, Q8_0, F16; Q6_K 10-15% slower) and B = 2 2x
# slower (all four), in interleaved runs in one process (11008x4096, one thread). The cause was not found (the VM
# it was measured on has no hardware counters). Tiling the columns of x so that the B rows of a tile stay in L1
# was tried too (16-64 KB tiles): no measurable effect.
ROW_GROUP = 64
FASTMATH = {"contract"}          # FMA allowed; no reassociation (the summation order is the source's)
# The templates' constants: each variant (_variant) is compiled with its own values of these. Only a template's own
# code sees them; a helper it calls sees these module values, so templates pass them on as arguments.
NB = 1                                          # rows of x the variant handles
BLOCK_BYTES, M_OFFSET, QH_OFFSET = 0, -1, -1    # _legacy: block bytes; where the fp16 min and the fifth bits sit
_values = _convert = None                       # _legacy: the type's decoded values; _halves: its widening


# these kernels inline helpers of quantize/kernels/common.py and decode.py: an edit of those alone drops the cached
# kernels of this module
drop_stale_kernels(Path(__file__).parent / "__pycache__", [Path(_common.__file__), Path(_decode.__file__)],
                   "matvec.helpers.sha256", lambda name: name.startswith("matvec."))


# --- building blocks --------------------------------------------------------------------------------------------

@intrinsic
def _lane_buffer(typingctx):
    """A pointer to LANE_BUFFER float32 in the caller's stack frame: an alloca in its entry block, made once per
    call of the function, which for a prange body is once per thread's share of the rows, never per row. (numba
    has no stack arrays, and np.empty in the loop would be a malloc per row.)"""
    def codegen(context, builder, signature, args):
        buffer = cgutils.alloca_once(builder, ir.FloatType(), size=LANE_BUFFER)
        buffer.align = 64       # whole cache lines, for where LLVM keeps the lanes in memory (B > 1) and not in
        return buffer           # registers: a 64-byte vector access split over two lines is slower

    return types.CPointer(types.float32)(), codegen


def _widen_ir(builder, halves, width):
    """LLVM IR: fp16 bit patterns (i32, or <width x i32>) -> float32, exactly as common.fp16_bits_to_fp32.

    Where the CPU has F16C (every x86 CPU with AVX2): fpext, which LLVM turns into vcvtph2ps, 8 values per
    instruction; the one difference is that a signalling NaN comes back quiet (its quiet bit set). Elsewhere without
    branches: exponent and mantissa shifted into float32 position and scaled by 2**112 (exact for normal and
    subnormal halves), the all-ones exponent (inf, NaN) mapped to float32's, the sign put back. On an AVX2 CPU
    without AVX-512 (11008x4096 F16, one thread) the first took 4.9 ms, the second 11.3."""
    i32, f32 = ir.IntType(32), ir.FloatType()
    if width > 1:
        i32, f32 = ir.VectorType(i32, width), ir.VectorType(f32, width)
    if HAS_F16C:
        i16, half = (ir.VectorType(ir.IntType(16), width), ir.VectorType(ir.HalfType(), width)) if width > 1 else \
            (ir.IntType(16), ir.HalfType())
        return builder.fpext(builder.bitcast(builder.trunc(halves, i16), half), f32)

    def const(ty, value):
        return ir.Constant(ty, [value] * width if width > 1 else value)

    magnitude = builder.shl(builder.and_(halves, const(i32, 0x7FFF)), const(i32, 13))
    finite = builder.fmul(builder.bitcast(magnitude, f32), const(f32, 2.0 ** 112))
    special = builder.icmp_unsigned("==", builder.and_(halves, const(i32, 0x7C00)), const(i32, 0x7C00))
    bits = builder.select(special, builder.or_(magnitude, const(i32, 0x7F800000)), builder.bitcast(finite, i32))
    bits = builder.or_(bits, builder.shl(builder.and_(halves, const(i32, 0x8000)), const(i32, 16)))
    return builder.bitcast(bits, f32)


def _as_i32(builder, value, ty):
    i32 = ir.IntType(32)
    if ty.bitwidth > 32:
        return builder.trunc(value, i32)
    if ty.bitwidth < 32:
        return builder.sext(value, i32) if ty.signed else builder.zext(value, i32)
    return value


@intrinsic
def _code(typingctx, lo, lo_shift, hi, hi_shift, hi_mask, bias):
    """An integer code as int32: ((lo >> lo_shift) & 15 | ((hi >> hi_shift) & hi_mask) << 4) - bias, for the byte
    `lo` and the bits `hi` (a byte, or the 32 bits of _fifth_bits). The same integers as decode.py's int64
    expressions, computed in 32 bits: numba widens every integer operation to 64 bits and LLVM narrows such chains
    back only sometimes, and 64-bit lanes halve the vector width."""
    if not all(isinstance(t, types.Integer) for t in (lo, lo_shift, hi, hi_shift, hi_mask, bias)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        lo_, lo_shift_, hi_, hi_shift_, hi_mask_, bias_ = (_as_i32(builder, v, t) for v, t in zip(args, signature.args))
        low = builder.and_(builder.lshr(lo_, lo_shift_), ir.Constant(i32, 15))
        high = builder.shl(builder.and_(builder.lshr(hi_, hi_shift_), hi_mask_), ir.Constant(i32, 4))
        return builder.sub(builder.or_(low, high), bias_)

    return types.int32(lo, lo_shift, hi, hi_shift, hi_mask, bias), codegen


@intrinsic
def _f16_to_f32(typingctx, h):
    """The fp16 bit pattern h (an integer) as float32, exactly (_widen_ir). Scalar code that the lane loops of F16
    rows vectorize; common.fp16_bits_to_fp32 has branches, and they do not."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return _widen_ir(builder, _as_i32(builder, args[0], signature.args[0]), 1)

    return types.float32(h), codegen


@intrinsic
def _f16x4_to_f32(typingctx, h0, h1, h2, h3):
    """Four fp16 bit patterns as four float32, exactly (_widen_ir), converted as one vector: the block scales of a
    group of four legacy blocks. decode.py's `_half` one by one (branches, scalar) took as long as the rest of
    the group's work: Q4_1 (two scales per block) 1.5x slower."""
    if not all(isinstance(t, types.Integer) for t in (h0, h1, h2, h3)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        vector = ir.Constant(ir.VectorType(i32, 4), ir.Undefined)
        for i, (value, ty) in enumerate(zip(args, signature.args)):
            vector = builder.insert_element(vector, _as_i32(builder, value, ty), ir.Constant(i32, i))
        widened = _widen_ir(builder, vector, 4)
        return context.make_tuple(builder, signature.return_type,
                                  [builder.extract_element(widened, ir.Constant(i32, i)) for i in range(4)])

    return types.UniTuple(types.float32, 4)(h0, h1, h2, h3), codegen


@njit(inline="always")
def _u16(blk, offset):
    return np.int64(blk[offset]) | (np.int64(blk[offset + 1]) << 8)


@njit(inline="always")
def _bf16_to_f32(h):
    return float32_from_bits(np.int32(np.int64(h) << 16))


@njit(inline="always")
def _tree8(xr, o, stride, l, w0, w1, w2, w3, w4, w5, w6, w7):
    """sum_k xr[o + stride*k + l] * w_k, k = 0..7, as a balanced tree."""
    return (((xr[o + l] * w0 + xr[o + stride + l] * w1) + (xr[o + 2 * stride + l] * w2 + xr[o + 3 * stride + l] * w3))
            + ((xr[o + 4 * stride + l] * w4 + xr[o + 5 * stride + l] * w5)
               + (xr[o + 6 * stride + l] * w6 + xr[o + 7 * stride + l] * w7)))


@njit(inline="always")
def _tree2(xr, l, w0, w1):
    return xr[l] * w0 + xr[16 + l] * w1


@njit(inline="always")
def _accumulate8(acc, lanes, x0, x1, x2, x3, nb, o, stride, l, w0, w1, w2, w3, w4, w5, w6, w7):
    """Lane l of each of the nb rows of x: += the tree of 8 products with the decoded w_k at o + stride*k + l."""
    acc[l] += _tree8(x0, o, stride, l, w0, w1, w2, w3, w4, w5, w6, w7)
    if nb > 1:
        acc[lanes + l] += _tree8(x1, o, stride, l, w0, w1, w2, w3, w4, w5, w6, w7)
    if nb > 2:
        acc[2 * lanes + l] += _tree8(x2, o, stride, l, w0, w1, w2, w3, w4, w5, w6, w7)
    if nb > 3:
        acc[3 * lanes + l] += _tree8(x3, o, stride, l, w0, w1, w2, w3, w4, w5, w6, w7)


@njit(inline="always")
def _spans(x0, x1, x2, x3, nb, o, n):
    """x0..x3[o:o + n] (the rows a variant for nb rows reads). Kernels index these slices from 0, with indices LLVM
    can see are not negative: an index it cannot prove non-negative gets numba's wraparound test, and the loads
    become gathers (8x slower)."""
    return (x0[o:o + n], x1[o:o + n] if nb > 1 else x0[o:o + n], x2[o:o + n] if nb > 2 else x0[o:o + n],
            x3[o:o + n] if nb > 3 else x0[o:o + n])


@njit(inline="always")
def _rows(x, nb):
    """The first four rows of x (row 0 standing in for those a variant for nb rows never reads)."""
    return x[0], x[1 if nb > 1 else 0], x[2 if nb > 2 else 0], x[3 if nb > 3 else 0]


@njit(inline="always")
def _zero(acc, n):
    for i in range(n):
        acc[i] = F32(0.0)


@njit(inline="always")
def _fold(acc, s, h):
    for l in range(h):
        acc[s + l] += acc[s + l + h]


@njit(inline="always")
def _lane_total(acc, s, lanes):
    """Pairwise sum of acc[s:s+lanes] (lanes = 16 or 32)."""
    if lanes == 32:
        _fold(acc, s, 16)
    _fold(acc, s, 8)
    _fold(acc, s, 4)
    _fold(acc, s, 2)
    _fold(acc, s, 1)
    return acc[s]


@njit(inline="always")
def _store(out, r, acc, nb, lanes):
    """out[b, r] = the lane total of row b."""
    for b in range(nb):
        out[b, r] = _lane_total(acc, b * lanes, lanes)


# Every kernel below is a template: `_variant` compiles it with NB (and the type's helpers, for the shared ones)
# as constants. The loop nest is the same everywhere:
#
#   for each group of weight rows (prange):
#       for each row r of the group:
#           lanes = 0;  for each (group of) block(s): lanes += trees of decoded values * x;  out[:, r] = sum(lanes)


# --- F16 / BF16: one value per 16-bit word, lanes of 32 --------------------------------------------------------

def _halves(raw, x, out, group):
    """_convert: the type's widening. 256 values per iteration (a tree of 8 per lane), then 32 at a time, then the
    last < 32."""
    n_out = raw.shape[0]
    n_in = x.shape[1]
    words = raw.view(np.uint16)
    x0, x1, x2, x3 = _rows(x, NB)
    for g in prange((n_out + group - 1) // group):
        acc = carray(_lane_buffer(), LANE_BUFFER)
        for r in range(g * group, min(n_out, (g + 1) * group)):
            _zero(acc, 32 * NB)
            row = words[r]
            j = 0
            while j + 256 <= n_in:
                h = row[j:j + 256]
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, j, 256)
                for l in range(32):
                    _accumulate8(acc, 32, y0, y1, y2, y3, NB, 0, 32, l,
                                 _convert(h[l]), _convert(h[32 + l]), _convert(h[64 + l]), _convert(h[96 + l]),
                                 _convert(h[128 + l]), _convert(h[160 + l]), _convert(h[192 + l]),
                                 _convert(h[224 + l]))
                j += 256
            while j < n_in:
                m = min(32, n_in - j)
                h = row[j:j + m]
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, j, m)
                for l in range(m):
                    w = _convert(h[l])
                    acc[l] += y0[l] * w
                    if NB > 1:
                        acc[32 + l] += y1[l] * w
                    if NB > 2:
                        acc[64 + l] += y2[l] * w
                    if NB > 3:
                        acc[96 + l] += y3[l] * w
                j += m
            _store(out, r, acc, NB, 32)


# --- legacy blocks of 32: lanes of 16 (value l and l + 16 of each block), four blocks per iteration --------------
# Each type: M_OFFSET / QH_OFFSET, where its fp16 min and its 32 fifth bits sit in a block (-1: none), and
# _values(blk, o, l, d, m, qh) -> the decoded values l and l + 16 of the block at blk[o:], with decode.py's float32
# operations (its d, m and qh given).

@njit(inline="always")
def _q8_0_values(blk, o, l, d, m, qh):
    return F32(np.int32(_int8(blk[o + 2 + l]))) * d, F32(np.int32(_int8(blk[o + 18 + l]))) * d


@njit(inline="always")
def _q4_0_values(blk, o, l, d, m, qh):
    b = blk[o + 2 + l]
    return F32(_code(b, 0, 0, 0, 0, 8)) * d, F32(_code(b, 4, 0, 0, 0, 8)) * d


@njit(inline="always")
def _q4_1_values(blk, o, l, d, m, qh):
    b = blk[o + 4 + l]
    return F32(_code(b, 0, 0, 0, 0, 0)) * d + m, F32(_code(b, 4, 0, 0, 0, 0)) * d + m


@njit(inline="always")
def _q5_0_values(blk, o, l, d, m, qh):
    b = blk[o + 6 + l]       # bit l of qh is the 5th bit of value l, bit l + 16 that of value l + 16
    return F32(_code(b, 0, qh, l, 1, 16)) * d, F32(_code(b, 4, qh, l + 16, 1, 16)) * d


@njit(inline="always")
def _q5_1_values(blk, o, l, d, m, qh):
    b = blk[o + 8 + l]
    return F32(_code(b, 0, qh, l, 1, 0)) * d + m, F32(_code(b, 4, qh, l + 16, 1, 0)) * d + m


@njit(inline="always")
def _legacy_params(blk, m_offset, qh_offset):
    """(d, m, qh) of one block (m = 0, qh = 0 where the type has none, offset -1), with decode.py's helpers."""
    m = _half(blk, m_offset) if m_offset >= 0 else F32(0.0)
    qh = _fifth_bits(blk, qh_offset) if qh_offset >= 0 else np.int64(0)
    return _half(blk, 0), m, qh


def _legacy(raw, x, out, group):
    """M_OFFSET, QH_OFFSET, _values, BLOCK_BYTES: the type's."""
    n_out = raw.shape[0]
    n_in = x.shape[1]
    x0, x1, x2, x3 = _rows(x, NB)
    bb = BLOCK_BYTES
    for g in prange((n_out + group - 1) // group):
        acc = carray(_lane_buffer(), LANE_BUFFER)
        for r in range(g * group, min(n_out, (g + 1) * group)):
            _zero(acc, 16 * NB)
            row = raw[r]
            ib = 0
            last = n_in // QK
            while ib + 4 <= last:
                blk = row[bb * ib:bb * (ib + 4)]                     # four blocks
                d0, d1, d2, d3 = _f16x4_to_f32(_u16(blk, 0), _u16(blk, bb), _u16(blk, 2 * bb), _u16(blk, 3 * bb))
                m0 = m1 = m2 = m3 = F32(0.0)
                if M_OFFSET >= 0:
                    m0, m1, m2, m3 = _f16x4_to_f32(_u16(blk, M_OFFSET), _u16(blk, bb + M_OFFSET),
                                                   _u16(blk, 2 * bb + M_OFFSET), _u16(blk, 3 * bb + M_OFFSET))
                h0 = h1 = h2 = h3 = np.int64(0)
                if QH_OFFSET >= 0:
                    h0, h1 = _fifth_bits(blk, QH_OFFSET), _fifth_bits(blk, bb + QH_OFFSET)
                    h2, h3 = _fifth_bits(blk, 2 * bb + QH_OFFSET), _fifth_bits(blk, 3 * bb + QH_OFFSET)
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, QK * ib, 4 * QK)
                for l in range(16):
                    w0, w1 = _values(blk, 0, l, d0, m0, h0)
                    w2, w3 = _values(blk, bb, l, d1, m1, h1)
                    w4, w5 = _values(blk, 2 * bb, l, d2, m2, h2)
                    w6, w7 = _values(blk, 3 * bb, l, d3, m3, h3)
                    _accumulate8(acc, 16, y0, y1, y2, y3, NB, 0, 16, l, w0, w1, w2, w3, w4, w5, w6, w7)
                ib += 4
            while ib < last:                                          # the last < 4 blocks of the row
                blk = row[bb * ib:bb * (ib + 1)]
                d0, m0, h0 = _legacy_params(blk, M_OFFSET, QH_OFFSET)
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, QK * ib, QK)
                for l in range(16):
                    w0, w1 = _values(blk, 0, l, d0, m0, h0)
                    acc[l] += _tree2(y0, l, w0, w1)
                    if NB > 1:
                        acc[16 + l] += _tree2(y1, l, w0, w1)
                    if NB > 2:
                        acc[32 + l] += _tree2(y2, l, w0, w1)
                    if NB > 3:
                        acc[48 + l] += _tree2(y3, l, w0, w1)
                ib += 1
            _store(out, r, acc, NB, 16)


# --- k-quants: super-blocks of 256 ------------------------------------------------------------------------------

@njit(inline="always")
def _k_scales(blk):
    """Q4_K/Q5_K: (scale, min) of the 8 sub-blocks of 32, as decode.py computes them (float32). (Unpacking the 6-bit
    codes 4 at a time in 32-bit words and converting all 16 in one vector, as ggml does, measured no faster.)"""
    d, dmin = _half(blk, 0), _half(blk, 2)
    scales = blk[4:16]
    a0, m0, a1, m1 = _group_scales(d, dmin, scales, 0)
    a2, m2, a3, m3 = _group_scales(d, dmin, scales, 1)
    a4, m4, a5, m5 = _group_scales(d, dmin, scales, 2)
    a6, m6, a7, m7 = _group_scales(d, dmin, scales, 3)
    return a0, m0, a1, m1, a2, m2, a3, m3, a4, m4, a5, m5, a6, m6, a7, m7


def _q4_k(raw, x, out, group):
    """Lanes of 32: lane l of sub-block k (32 values) is value 32k + l; sub-blocks 2g and 2g+1 are the low and high
    nibbles of qs[32g + l]."""
    n_out = raw.shape[0]
    n_in = x.shape[1]
    x0, x1, x2, x3 = _rows(x, NB)
    for g in prange((n_out + group - 1) // group):
        acc = carray(_lane_buffer(), LANE_BUFFER)
        for r in range(g * group, min(n_out, (g + 1) * group)):
            _zero(acc, 32 * NB)
            row = raw[r]
            for ib in range(n_in // QK_K):
                blk = row[Q4_K_BYTES * ib:Q4_K_BYTES * (ib + 1)]
                a0, m0, a1, m1, a2, m2, a3, m3, a4, m4, a5, m5, a6, m6, a7, m7 = _k_scales(blk)
                qs = blk[16:]
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, QK_K * ib, QK_K)
                for l in range(32):
                    c0_, c1_, c2_, c3_ = qs[l], qs[32 + l], qs[64 + l], qs[96 + l]
                    _accumulate8(acc, 32, y0, y1, y2, y3, NB, 0, 32, l,
                                 a0 * F32(_code(c0_, 0, 0, 0, 0, 0)) - m0, a1 * F32(_code(c0_, 4, 0, 0, 0, 0)) - m1,
                                 a2 * F32(_code(c1_, 0, 0, 0, 0, 0)) - m2, a3 * F32(_code(c1_, 4, 0, 0, 0, 0)) - m3,
                                 a4 * F32(_code(c2_, 0, 0, 0, 0, 0)) - m4, a5 * F32(_code(c2_, 4, 0, 0, 0, 0)) - m5,
                                 a6 * F32(_code(c3_, 0, 0, 0, 0, 0)) - m6, a7 * F32(_code(c3_, 4, 0, 0, 0, 0)) - m7)
            _store(out, r, acc, NB, 32)


def _q5_k(raw, x, out, group):
    """As Q4_K, plus bit k of qh[l] (16) in sub-block k's code."""
    n_out = raw.shape[0]
    n_in = x.shape[1]
    x0, x1, x2, x3 = _rows(x, NB)
    for g in prange((n_out + group - 1) // group):
        acc = carray(_lane_buffer(), LANE_BUFFER)
        for r in range(g * group, min(n_out, (g + 1) * group)):
            _zero(acc, 32 * NB)
            row = raw[r]
            for ib in range(n_in // QK_K):
                blk = row[Q5_K_BYTES * ib:Q5_K_BYTES * (ib + 1)]
                a0, m0, a1, m1, a2, m2, a3, m3, a4, m4, a5, m5, a6, m6, a7, m7 = _k_scales(blk)
                qh = blk[16:48]
                ql = blk[48:]
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, QK_K * ib, QK_K)
                for l in range(32):
                    h = qh[l]
                    c0_, c1_, c2_, c3_ = ql[l], ql[32 + l], ql[64 + l], ql[96 + l]
                    _accumulate8(acc, 32, y0, y1, y2, y3, NB, 0, 32, l,
                                 a0 * F32(_code(c0_, 0, h, 0, 1, 0)) - m0, a1 * F32(_code(c0_, 4, h, 1, 1, 0)) - m1,
                                 a2 * F32(_code(c1_, 0, h, 2, 1, 0)) - m2, a3 * F32(_code(c1_, 4, h, 3, 1, 0)) - m3,
                                 a4 * F32(_code(c2_, 0, h, 4, 1, 0)) - m4, a5 * F32(_code(c2_, 4, h, 5, 1, 0)) - m5,
                                 a6 * F32(_code(c3_, 0, h, 6, 1, 0)) - m6, a7 * F32(_code(c3_, 4, h, 7, 1, 0)) - m7)
            _store(out, r, acc, NB, 32)


@njit(inline="always")
def _q6_scale(blk, d, s):
    return d * F32(np.int32(_int8(blk[192 + s])))


@njit(inline="always")
def _q6_scales(blk):
    """The 16 sub-block scales d * scales[i] of a Q6_K block, as decode.py computes them."""
    d = _half(blk, 208)
    return (_q6_scale(blk, d, 0), _q6_scale(blk, d, 1), _q6_scale(blk, d, 2), _q6_scale(blk, d, 3),
            _q6_scale(blk, d, 4), _q6_scale(blk, d, 5), _q6_scale(blk, d, 6), _q6_scale(blk, d, 7),
            _q6_scale(blk, d, 8), _q6_scale(blk, d, 9), _q6_scale(blk, d, 10), _q6_scale(blk, d, 11),
            _q6_scale(blk, d, 12), _q6_scale(blk, d, 13), _q6_scale(blk, d, 14), _q6_scale(blk, d, 15))


@njit(inline="always")
def _q6_accumulate(acc, x0, x1, x2, x3, nb, o, blk, hf, l, s0, s1, s2, s3, s4, s5, s6, s7):
    """Lane l (0..15) of Q6_K half `hf` (values 128hf..128hf+127, at o in x): sub-block of 16 i = 2t + hh (quarter t,
    lane half hh) holds value 128hf + 32t + 16hh + l, scale s_i; its low 4 bits are a nibble of ql[32(t%2) + 16hh + l]
    (low for t < 2), its high 2 bits bits 2t..2t+1 of qh[16hh + l]."""
    ql = blk[64 * hf:64 * hf + 64]
    qh = blk[128 + 32 * hf:128 + 32 * hf + 32]
    la, lb, lc, ld = ql[l], ql[32 + l], ql[16 + l], ql[48 + l]
    ha, hc = qh[l], qh[16 + l]
    _accumulate8(acc, 16, x0, x1, x2, x3, nb, o + 128 * hf, 16, l,
                 s0 * F32(_code(la, 0, ha, 0, 3, 32)), s1 * F32(_code(lc, 0, hc, 0, 3, 32)),    # t = 0: hh = 0, 1
                 s2 * F32(_code(lb, 0, ha, 2, 3, 32)), s3 * F32(_code(ld, 0, hc, 2, 3, 32)),    # t = 1
                 s4 * F32(_code(la, 4, ha, 4, 3, 32)), s5 * F32(_code(lc, 4, hc, 4, 3, 32)),    # t = 2
                 s6 * F32(_code(lb, 4, ha, 6, 3, 32)), s7 * F32(_code(ld, 4, hc, 6, 3, 32)))    # t = 3


def _q6_k(raw, x, out, group):
    """Lanes of 16: lane l of sub-block i (16 values, scale i) is value 16i + l."""
    n_out = raw.shape[0]
    n_in = x.shape[1]
    x0, x1, x2, x3 = _rows(x, NB)
    for g in prange((n_out + group - 1) // group):
        acc = carray(_lane_buffer(), LANE_BUFFER)
        for r in range(g * group, min(n_out, (g + 1) * group)):
            _zero(acc, 16 * NB)
            row = raw[r]
            for ib in range(n_in // QK_K):
                blk = row[Q6_K_BYTES * ib:Q6_K_BYTES * (ib + 1)]
                s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15 = _q6_scales(blk)
                y0, y1, y2, y3 = _spans(x0, x1, x2, x3, NB, QK_K * ib, QK_K)
                for l in range(16):
                    _q6_accumulate(acc, y0, y1, y2, y3, NB, 0, blk, 0, l, s0, s1, s2, s3, s4, s5, s6, s7)
                    _q6_accumulate(acc, y0, y1, y2, y3, NB, 0, blk, 1, l, s8, s9, s10, s11, s12, s13, s14, s15)
            _store(out, r, acc, NB, 16)


# --- variants and dispatch --------------------------------------------------------------------------------------

def specialize(template, qualname: str, consts: dict, **options):
    """A cached numba build of `template` with `consts` as globals under the name `qualname`, which must tell the
    builds of one template apart: it is the build's cache entry."""
    scope = dict(template.__globals__)
    scope.update(consts)
    fn = pytypes.FunctionType(template.__code__, scope, qualname, template.__defaults__, template.__closure__)
    fn.__qualname__ = qualname
    fn.__doc__ = template.__doc__
    return njit(cache=True, **options)(fn)


def _variant(template, name: str, nb: int, parallel: bool, consts: dict):
    """A numba build of `template` for `nb` rows of x with the type's `consts` as globals, under its own name (so
    that every variant has its own cache entry): parallel over weight rows, or serial (prange as range)."""
    qualname = f"{name}_b{nb}" + ("" if parallel else "_serial")
    return specialize(template, qualname, {**consts, "NB": nb}, parallel=parallel, fastmath=FASTMATH)


# type -> (template, block size, bytes per block, the template's globals)
_SPECS = {
    T.F16: (_halves, 1, 2, {"_convert": _f16_to_f32}),
    T.BF16: (_halves, 1, 2, {"_convert": _bf16_to_f32}),
    T.Q8_0: (_legacy, QK, Q8_0_BYTES, {"_values": _q8_0_values, "BLOCK_BYTES": Q8_0_BYTES, "M_OFFSET": -1,
                                       "QH_OFFSET": -1}),
    T.Q4_0: (_legacy, QK, Q4_0_BYTES, {"_values": _q4_0_values, "BLOCK_BYTES": Q4_0_BYTES, "M_OFFSET": -1,
                                       "QH_OFFSET": -1}),
    T.Q4_1: (_legacy, QK, Q4_1_BYTES, {"_values": _q4_1_values, "BLOCK_BYTES": Q4_1_BYTES, "M_OFFSET": 2,
                                       "QH_OFFSET": -1}),
    T.Q5_0: (_legacy, QK, Q5_0_BYTES, {"_values": _q5_0_values, "BLOCK_BYTES": Q5_0_BYTES, "M_OFFSET": -1,
                                       "QH_OFFSET": 2}),
    T.Q5_1: (_legacy, QK, Q5_1_BYTES, {"_values": _q5_1_values, "BLOCK_BYTES": Q5_1_BYTES, "M_OFFSET": 2,
                                       "QH_OFFSET": 4}),
    T.Q4_K: (_q4_k, QK_K, Q4_K_BYTES, {}),
    T.Q5_K: (_q5_k, QK_K, Q5_K_BYTES, {}),
    T.Q6_K: (_q6_k, QK_K, Q6_K_BYTES, {}),
}

SUPPORTED = tuple(_SPECS)


def kernel_for(qtype: GGMLQuantizationType) -> Kernel | None:
    """The mat-vec kernel for weights of `qtype`, or None where there is none (F32 included: use BLAS)."""
    try:
        qtype = T(qtype)
    except ValueError:
        return None
    return _kernel(qtype) if qtype in _SPECS else None


def _row_group(n_out: int, rows: int) -> int:
    """Weight rows per parallel work item: 1 for 1-2 rows of x, else ROW_GROUP or fewer so that every thread gets
    about four items."""
    return 1 if rows <= 2 else max(1, min(ROW_GROUP, n_out // (4 * get_num_threads())))


@cache
def _variants(qtype: GGMLQuantizationType) -> tuple[tuple, tuple]:
    """(parallel, serial) builds for B = 1..MAX_ROWS; each is compiled (or loaded from numba's cache) on its first
    call."""
    template, _, _, consts = _SPECS[qtype]
    name = f"_{qtype.name.lower()}"
    return (tuple(_variant(template, name, nb, True, consts) for nb in range(1, MAX_ROWS + 1)),
            tuple(_variant(template, name, nb, False, consts) for nb in range(1, MAX_ROWS + 1)))


@cache
def _kernel(qtype: GGMLQuantizationType) -> Kernel:
    _, block, type_size, _ = _SPECS[qtype]
    parallel, serial = _variants(qtype)

    def kernel(raw: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
        """out[b, r] = sum_j x[b, j] * W[r, j] for the stored rows `raw` of W (see qtool.evaluate.matvec)."""
        rows, n_in = x.shape
        n_out = raw.shape[0]
        # The kernels do not check bounds: a wrong shape would read or write outside the arrays.
        if (not 1 <= rows <= MAX_ROWS or n_in % block or raw.ndim != 2 or raw.shape[1] * block != n_in * type_size
                or out.shape != (rows, n_out) or raw.dtype != np.uint8 or x.dtype != np.float32
                or out.dtype != np.float32):
            raise ValueError(f"{qtype.name} mat-vec: raw {raw.dtype}{raw.shape}, x {x.dtype}{x.shape}, "
                             f"out {out.dtype}{out.shape} do not fit (1..{MAX_ROWS} rows of x, whole blocks)")
        if n_out * n_in >= PARALLEL_MIN_WEIGHTS:
            parallel[rows - 1](raw, x, out, _row_group(n_out, rows))
        else:
            serial[rows - 1](raw, x, out, _row_group(n_out, rows))

    kernel.__name__ = kernel.__qualname__ = f"matvec_{qtype.name.lower()}"
    return kernel
