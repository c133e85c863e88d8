"""Integer products: k-quant weights times 8-bit activations, as llama.cpp multiplies them.

llama.cpp's CPU backend rounds a product's input rows to Q8_K (per 256 values a float scale d and int8 codes q, plus
the sums of each 16 codes) before multiplying them by K-quant weights, and then multiplies integers: per super-block
`d_x * d_w * sum_j sc_j * dot(codes_j, q_j)` (minus the mins' term, from the sums). These kernels do the same, 64
values per step:

    u8 codes x s8 activations, adjacent pairs summed to int16   (vpmaddubsw; the codes are < 64: never saturates)
    int16 sums x the sub-block's scale, pairs summed to int32    (vpmaddwd, fused with the add: vpdpwssd on VNNI)

then, per block, 8 int32 lanes times d_x * d (the fp16 converted by fpext: vcvtph2ps) into 8 float32 lanes, and the
mins' term into the same lanes, kept in registers; a row ends with one pairwise sum of the lanes. Every integer sum is
exact, so a result differs from the exact product of the rounded activations and the decoded weights only by the
float32 rounding of the per-block terms and of the lanes' sums (tests/test_qdot.py bounds it).

One activation row (decoding a token): one weight row per step, parallel over rows. On one 11008x4096 matrix, one
thread: Q4_K 0.72 ms, Q5_K 0.91, Q6_K 0.93 against the float kernels of evaluate/matvec.py 1.7, 2.1, 2.3
(benchmarks/matvec_speed.py). Several rows (a prompt, a perplexity chunk): groups of weight rows in parallel; each
group's blocks are unpacked once (codes, per-step scale vectors: "unpacked blocks" below) into the worker's
scratch, then read against every tile of TOKENS activation rows, 8 blocks of a row at a time for all the group's
rows (the tile's activations stay in the L1 cache); each row's arithmetic stays its own (a row's result is bit for
bit its one-row result). On 4096x4096 times 512 rows, one thread, about 230 GOPS (Q4_K, Q6_K) and 200 (Q5_K) on a
Zen 5 (AVX-512), against 210 GFLOP/s for OpenBLAS's sgemm on weights decoded beforehand (before the unpacking);
in a 7B prefill the decode tiles and the float rounding of the activations go too. On a Zen 3 (AVX2) 49 / 46 / 47
GMAC/s (Q4_K / Q5_K / Q6_K; 40 / 36 / 41 before the steps were kept in order by _in_order, which stopped the codes'
spills). On a Zen 4 (AVX-512, one thread, 7B shapes times 512 rows, blocks unpacked in the loop / unpacked once /
and 8 blocks at a time): Q4_K 11008x4096 57-62 / 65-74 / 73-76 GMAC/s; Q6_K 4096x11008 52-60 / 52-60 / 65-70
(tests of the same build side by side in one process; this machine varies by ~15 % from minute to minute).

With AVX-512 VNNI, several rows go to another kernel (section "interleaved weight rows"): 16 weight rows in the
lanes of a register, vpdpbusd adding 4 products to each row's lane per instruction, the scales applied once per
sub-block; on this Zen 4, one thread, 7B shapes times 512 rows: Q4_K 147-148 GMAC/s (75-76 above), Q6_K 130-136
(78-82). Blocks of 32 (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1) times several rows of Q8_0 codes too: Q8_0 133-145, where
they were OpenBLAS's sgemm on decoded tiles (~45 per thread). Its float32 order is its own (within the same
bound), so there a row's result is not bit for bit its one-row result.

    kernel = kernel_for(qtype)          # None where there is none (the caller decodes tiles for BLAS)
    kernel(raw, act, out)               # raw uint8 [n_out, row_bytes], act = quantize_q8_k(x), out float32 [rows, n_out]

The vector code is LLVM IR (numba intrinsics). The u8 x s8 multiply is llvm.x86.avx512.pmaddubs.w.512 with
AVX-512BW, two llvm.x86.avx2.pmadd.ub.sw with AVX2, elsewhere the same integers in portable IR (LLVM picks the
instructions). Types: Q4_K, Q5_K, Q6_K.

Blocks of 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) times one row of Q8_0 codes (int8), for decoding: vpmaddubsw (signed
weight codes through vpsignb, as ggml) and vpmaddwd with AVX2, the same integers in portable IR elsewhere; see the
section "blocks of 32".

    kernel = kernel_for_q8_0(qtype)     # None where there is none
    kernel(raw, quantize_q8_0(x), out)  # x float32 [n_in], out float32 [1, n_out]; with VNNI (ROWS_Q8_0) also
                                        # x [rows, n_in], out [rows, n_out]
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Callable

import llvmlite.binding as llvm
import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from qtool.numba_start import drop_stale_kernels
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import carray, get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qtool.evaluate import matvec
from qtool.evaluate.matvec import PARALLEL_MIN_WEIGHTS, _lane_buffer, _variant
from qtool.quantize.kernels import common as _common
from qtool.quantize.kernels.common import (F32, QK_K, Q4_0_BYTES, Q4_1_BYTES, Q4_K_BYTES, Q5_0_BYTES, Q5_1_BYTES,
                                           Q5_K_BYTES, Q6_K_BYTES, Q8_0_BYTES, ir_constant, ir_data, ir_load,
                                           round_to_f16, running_max)

# These kernels inline helpers of matvec.py (the lanes' buffer, the variants' options) and the kernels' common.py
# (block sizes): an edit of those alone drops the cached kernels of this module.
drop_stale_kernels(Path(__file__).parent / "__pycache__", [Path(matvec.__file__), Path(_common.__file__)],
                   "qdot.helpers.sha256", lambda name: name.startswith("qdot."))

T = GGMLQuantizationType
Kernel = Callable[[np.ndarray, "Q8K", np.ndarray], None]

I8, I16, I32, F = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
# vpmaddubsw exists from AVX2 on; numba compiles for the host CPU, so this is the CPU the kernels will run on.
# QTOOL_QDOT_PORTABLE=1 forces the portable IR (tests/test_qdot.py checks it gives the same products).
_FEATURES = {} if os.environ.get("QTOOL_QDOT_PORTABLE") == "1" else llvm.get_host_cpu_features()
HAS_AVX2 = bool(_FEATURES.get("avx2", False))
HAS_AVX512BW = bool(_FEATURES.get("avx512bw", False))
HAS_VNNI = HAS_AVX512BW and bool(_FEATURES.get("avx512vnni", False))
TOKEN_LANES = 8                 # float32 accumulators per token: d * sums - dmin * mins, 8 lanes
# A block's integer sums go to 8 int32 lanes per token. With AVX-512 they are kept in 16 (one register) and folded
# once per block; with AVX2 (16 registers of 8 lanes) they are folded at every 64-value step, so that the unpacked
# codes, their scales and every token's sums stay in registers. Integer sums are exact: the results are the same.
FOLD_EACH_STEP = not HAS_AVX512BW
TOKENS = 4                      # activation rows the products kernel takes per unpacked weight block


@dataclass
class Q8K:
    """One activation row rounded as ggml's quantize_row_q8_K: codes q (int8 [n]), per 256 the scale d (float32),
    per 16 the sum of the codes (int16)."""
    q: np.ndarray
    d: np.ndarray
    bsums: np.ndarray


@njit(cache=True, inline="always")
def q8_k_scale(x, b):
    """Per 256 values from b: the value of largest magnitude m (the first), then iscale = -127/m and d = 1/iscale;
    (0, 0) for an all-zero block."""
    amax = F32(0.0)
    signed_max = F32(0.0)
    for j in range(b, b + QK_K):
        if abs(x[j]) > amax:
            amax = abs(x[j])
            signed_max = x[j]
    if amax == 0:
        return F32(0.0), F32(0.0)
    iscale = F32(-127.0) / signed_max
    return iscale, F32(1.0) / iscale


@njit(cache=True)
def _quantize_q8_k(x, q, d, bsums):
    for ib in range(x.shape[0] // QK_K):
        b = QK_K * ib
        iscale, d[ib] = q8_k_scale(x, b)
        for j in range(b, b + QK_K):
            q[j] = np.int8(min(F32(127.0), np.rint(iscale * x[j])))
        for s in range(16):
            total = 0
            for j in range(b + 16 * s, b + 16 * s + 16):
                total += q[j]
            bsums[16 * ib + s] = total


@njit(parallel=True, cache=True)
def _quantize_q8_k_rows(x, q, d, bsums):
    for r in prange(x.shape[0]):
        _quantize_q8_k(x[r], q[r], d[r], bsums[r])


def quantize_q8_k(x: np.ndarray) -> Q8K:
    """A float32 row (n a multiple of 256) as Q8_K, or each row of a 2-D x (the arrays then 2-D, one row per row);
    the values q * d are model.round_q8_k_'s."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        x = x.reshape(-1)
    n = x.shape[-1]
    if n % QK_K:
        raise ValueError(f"Q8_K needs a multiple of {QK_K} values, got {n}")
    lead = x.shape[:-1]
    act = Q8K(np.empty(x.shape, np.int8), np.empty(lead + (n // QK_K,), np.float32),
              np.empty(lead + (n // 16,), np.int16))
    (_quantize_q8_k_rows if x.ndim == 2 else _quantize_q8_k)(x, act.q, act.d, act.bsums)
    return act


@dataclass
class Q80:
    """One activation row rounded as ggml's quantize_row_q8_0: per 32 values the scale d (its fp16, as float32), the
    codes q (int8 [n], each in -127..127) and their sum s (int32, per 32: the min's term of Q4_1 / Q5_1 weights)."""
    q: np.ndarray
    d: np.ndarray
    s: np.ndarray


@njit(cache=True, inline="always")
def q8_0_scale(x, b):
    """ggml's quantize_row_q8_0 (x86) for the 32 values from b: (127 / amax, d = amax / 127 rounded to fp16); (0, 0)
    for an all-zero block. The codes are rint(x * 127 / amax), the values codes * d."""
    amax = running_max(x, b, b + 32, True)
    d = round_to_f16(amax / F32(127.0))
    return (F32(127.0) / amax if amax != 0 else F32(0.0)), d


@njit(cache=True)
def _quantize_q8_0(x, q, d, s):
    for ib in range(x.shape[0] // 32):
        inv, d[ib] = q8_0_scale(x, 32 * ib)
        total = 0
        for j in range(32 * ib, 32 * ib + 32):
            code = np.int8(np.rint(x[j] * inv))
            q[j] = code
            total += code
        s[ib] = total


@njit(parallel=True, cache=True)
def _quantize_q8_0_rows(x, q, d, s):
    for r in prange(x.shape[0]):
        _quantize_q8_0(x[r], q[r], d[r], s[r])


def quantize_q8_0(x: np.ndarray) -> Q80:
    """A float32 row (n a multiple of 32) as Q8_0, or each row of a 2-D x (the arrays then 2-D, one row per row);
    the values q * d are model.round_q8_0_'s."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        x = x.reshape(-1)
    n = x.shape[-1]
    if n % 32:
        raise ValueError(f"Q8_0 needs a multiple of 32 values, got {n}")
    lead = x.shape[:-1]
    act = Q80(np.empty(x.shape, np.int8), np.empty(lead + (n // 32,), np.float32),
              np.empty(lead + (n // 32,), np.int32))
    (_quantize_q8_0_rows if x.ndim == 2 else _quantize_q8_0)(x, act.q, act.d, act.s)
    return act


# --- LLVM IR pieces ---------------------------------------------------------------------------------------------

def _pick(builder, vec, lanes):
    """vec's lanes in the given order (a splat when all are one lane)."""
    return builder.shuffle_vector(vec, ir.Constant(vec.type, ir.Undefined),
                                  ir.Constant(ir.VectorType(I32, len(lanes)), list(lanes)))


def _pairs(builder, vec, n):
    """Adjacent lanes of an n-lane vector summed: n/2 lanes."""
    return builder.add(_pick(builder, vec, range(0, n, 2)), _pick(builder, vec, range(1, n, 2)))


def _concat(builder, a, b):
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n))))


def _half_of(builder, vec, h):
    n = vec.type.count // 2
    return _pick(builder, vec, range(h * n, (h + 1) * n))


def _maddubs32(builder, u, s):
    """AVX2's vpmaddubsw: <32 x u8> u times <32 x s8> s, adjacent pairs summed (saturating) to <16 x i16>."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VectorType(I16, 16), [ir.VectorType(I8, 32)] * 2),
        "llvm.x86.avx2.pmadd.ub.sw")
    return builder.call(fn, [u, s])


def _codes_times_x(builder, codes, x):
    """<64 x u8> codes times <64 x s8> x, adjacent pairs summed: <32 x i16> (exact: |pair| <= 2*63*128; vpmaddubsw,
    which saturates, never does here)."""
    if HAS_AVX512BW:
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VectorType(I16, 32), [ir.VectorType(I8, 64)] * 2),
            "llvm.x86.avx512.pmaddubs.w.512")
        return builder.call(fn, [codes, x])
    if HAS_AVX2:
        return _concat(builder, *(_maddubs32(builder, _half_of(builder, codes, h), _half_of(builder, x, h))
                                  for h in range(2)))
    return _pairs(builder, builder.mul(builder.zext(codes, ir.VectorType(I16, 64)),
                                       builder.sext(x, ir.VectorType(I16, 64))), 64)


def _times_scales(builder, sums, scales):
    """<2n x i16> sums times <2n x i16> scales, adjacent pairs summed: <n x i32> (vpmaddwd)."""
    n = sums.type.count
    return _pairs(builder, builder.mul(builder.sext(sums, ir.VectorType(I32, n)),
                                       builder.sext(scales, ir.VectorType(I32, n))), n)


def _splat(builder, value, n):
    """The scalar value in each of n lanes."""
    one = builder.insert_element(ir.Constant(ir.VectorType(value.type, 1), ir.Undefined), value, ir.Constant(I32, 0))
    return _pick(builder, one, [0] * n)


def _accumulate(builder, acc, lanes, factor, ints):
    """acc[lanes] (float32) += factor * float(ints), ints an <n x i32>, acc[lanes:lanes + n] in the caller's frame."""
    n = ints.type.count
    where = builder.bitcast(builder.gep(acc, [ir.Constant(I32, lanes)]), ir.PointerType(ir.VectorType(F, n)))
    splat = _splat(builder, factor, n)
    total = builder.fadd(builder.load(where), builder.fmul(splat, builder.sitofp(ints, ir.VectorType(F, n))))
    builder.store(total, where)


def _k4_scales_and_mins(builder, bp):
    """The 8 six-bit scales and 8 mins of a Q4_K/Q5_K block (bytes 4..15), as <8 x i16> each: for sub-block j < 4
    the low 6 bits of bytes j and j + 4; for j >= 4 the nibbles of byte j + 4 with the top 2 bits of bytes j - 4 and
    j above them."""
    a, b, c = (ir_load(builder, bp, 4 + 4 * k, I8, 4) for k in range(3))
    low6, nibble, two = ir_constant(I8, 4, 63), ir_constant(I8, 4, 15), ir_constant(I8, 4, 6)
    sc_hi = builder.or_(builder.and_(c, nibble), builder.shl(builder.lshr(a, two), ir_constant(I8, 4, 4)))
    m_hi = builder.or_(builder.lshr(c, ir_constant(I8, 4, 4)), builder.shl(builder.lshr(b, two), ir_constant(I8, 4, 4)))
    eight = ir.Constant(ir.VectorType(I32, 8), list(range(8)))
    scales = builder.shuffle_vector(builder.and_(a, low6), sc_hi, eight)
    mins = builder.shuffle_vector(builder.and_(b, low6), m_hi, eight)
    return builder.zext(scales, ir.VectorType(I16, 8)), builder.zext(mins, ir.VectorType(I16, 8))


def _fp16(builder, bp, offset):
    """The fp16 at bp[offset:offset + 2] as float32 (fpext: exact; vcvtph2ps where the CPU has F16C)."""
    where = builder.bitcast(builder.gep(bp, [ir.Constant(I32, offset)]), ir.PointerType(ir.HalfType()))
    return builder.fpext(builder.load(where, align=1), F)


def _step_sums(builder, total, part):
    """total + part, part an <16 x i32>: total has 8 lanes (the halves of part added) where FOLD_EACH_STEP."""
    return builder.add(total, _fold_halves(builder, part) if FOLD_EACH_STEP else part)


def _block_sums(builder, total):
    """A block's integer sums in 8 lanes."""
    return total if FOLD_EACH_STEP else _fold_halves(builder, total)


def _in_order(builder, values):
    """`values` unchanged, passed through an empty asm statement with side effects where FOLD_EACH_STEP (AVX2): LLVM
    then computes a 64-value step's codes only after the previous step's sums, instead of unpacking every step's
    codes first and spilling them (measured: 47 ymm moves, most of them spills, in a Q4_K block of 4 tokens)."""
    if not (FOLD_EACH_STEP and HAS_AVX2):
        return values
    if len(values) == 1:                # (an asm statement of one output returns it, not a struct)
        return [builder.asm(ir.FunctionType(values[0].type, [values[0].type]), "", "=x,0", values, True)]
    ty = ir.LiteralStructType([v.type for v in values])
    n = len(values)
    constraint = ",".join(["=x"] * n + [str(i) for i in range(n)])
    packed = builder.asm(ir.FunctionType(ty, [v.type for v in values]), "", constraint, values, True)
    return [builder.extract_value(packed, i) for i in range(n)]


def _k4_steps(builder, bp, with_fifth_bit):
    """A stored Q4_K (Q5_K) block's 64-value steps: step(g, values) -> (codes <64 x u8>, scales <32 x i16>, values),
    and its rest: () -> (mins <16 x i16>, d, dmin). Sub-blocks 2g, 2g + 1 are the low and high nibbles of
    qs[32g:32g + 32] (plus bits 2g, 2g + 1 of qh[0:32] as bit 4), so step g takes qs[32g:32g + 32] and
    x[64g:64g + 64]; `values` (the tokens' sums) go through _in_order with the step's bytes."""
    scales, mins = _k4_scales_and_mins(builder, bp)
    qs_at = 48 if with_fifth_bit else 16
    qh = ir_load(builder, bp, 16, I8, 32) if with_fifth_bit else None

    def step(g, values):
        qs, *values = _in_order(builder, [ir_load(builder, bp, qs_at + 32 * g, I8, 32), *values])
        low, high = builder.and_(qs, ir_constant(I8, 32, 15)), builder.lshr(qs, ir_constant(I8, 32, 4))
        if with_fifth_bit:
            # bit 4 of the code where bit j of qh is set: a test and a select (x86 has no byte shifts)
            zero, sixteen = ir_constant(I8, 32, 0), ir_constant(I8, 32, 16)
            fifth = [builder.select(builder.icmp_unsigned("!=", builder.and_(qh, ir_constant(I8, 32, 1 << (2 * g + h))),
                                                          zero), sixteen, zero)
                     for h in range(2)]
            low, high = builder.or_(low, fifth[0]), builder.or_(high, fifth[1])
        lanes = [2 * g] * 16 + [2 * g + 1] * 16                                 # sub-blocks 2g, 2g + 1
        return _concat(builder, low, high), _pick(builder, scales, lanes), values

    def rest():
        return _pick(builder, mins, [j // 2 for j in range(16)]), _fp16(builder, bp, 0), _fp16(builder, bp, 2)

    return step, rest


def _block_products(builder, tokens, step):
    """Per token, a block's integer sums (sum of scale x dot(codes, x) over its 4 steps, in lanes): the step's codes
    and scale vector (step(g, sums)) once for all the tokens."""
    sums = [ir_constant(I32, 8 if FOLD_EACH_STEP else 16, 0)] * len(tokens)
    for g in range(4):
        codes, scales, sums = step(g, sums)
        for t, (xp, _, _) in enumerate(tokens):
            products = _codes_times_x(builder, codes, ir_load(builder, xp, 64 * g, I8, 64))
            sums[t] = _step_sums(builder, sums[t], _times_scales(builder, products, scales))
    return sums


def _k4_terms(builder, acc, tokens, step, rest):
    """Per token t of `tokens` ((xp, sp, dx): its codes, its sums of 16, its scale), acc[8t:8t + 8] += d * (scale_j *
    dot(codes_j, x_j) in 8 lanes), then += -dmin * (min_j * sum(x_j)) of a Q4_K (Q5_K) block given by its steps
    (_k4_steps, or _unpacked_steps). The weights are unpacked once for all the tokens; each token's arithmetic is
    the same as when it is alone."""
    sums = _block_products(builder, tokens, step)
    mins16, d, dmin = rest()
    for t, (_, sp, dx) in enumerate(tokens):
        _accumulate(builder, acc, TOKEN_LANES * t, builder.fmul(dx, d), _block_sums(builder, sums[t]))
        min_terms = _times_scales(builder, ir_load(builder, sp, 0, I16, 16), mins16)   # min_j * (sums of 32)
        _accumulate(builder, acc, TOKEN_LANES * t, builder.fneg(builder.fmul(dx, dmin)), min_terms)


def _block_intrinsic(body):
    """A numba intrinsic f(acc, block bytes, q, q offset, bsums, bsums offset, d_x) from an IR `body`: acc a
    float32 pointer into the caller's frame (matvec._lane_buffer), d_x the activations' float32 scale."""
    @intrinsic
    def block(typingctx, acc, blk, q, q_at, bsums, bsums_at, dx):
        def codegen(context, builder, signature, args):
            bp = ir_data(context, builder, signature.args[1], args[1])
            xp = ir_data(context, builder, signature.args[2], args[2], args[3])
            sp = ir_data(context, builder, signature.args[4], args[4], args[5])
            body(builder, args[0], bp, [(xp, sp, args[6])])
            return context.get_dummy_value()

        return types.void(acc, blk, q, q_at, bsums, bsums_at, dx), codegen

    return block


def _tile_intrinsic(body, n_tokens):
    """As _block_intrinsic for `n_tokens` consecutive rows of 2-D activations: f(acc, block bytes, q, q offset,
    bsums, bsums offset, d, d offset), the offsets (in elements) those of the first row's block; token t's lanes
    start at acc[32t]."""
    @intrinsic
    def tile(typingctx, acc, blk, q, q_at, bsums, bsums_at, d, d_at):
        def codegen(context, builder, signature, args):
            bp = ir_data(context, builder, signature.args[1], args[1])
            arrays = [context.make_array(signature.args[i])(context, builder, args[i]) for i in (2, 4, 6)]
            q_row, s_row, d_row = (builder.extract_value(a.strides, 0) for a in arrays)    # bytes per row
            tokens = []
            for t in range(n_tokens):
                shift = [builder.mul(stride, ir.Constant(stride.type, t)) for stride in (q_row, s_row, d_row)]
                xp = builder.gep(ir_data(context, builder, signature.args[2], args[2], args[3]), [shift[0]])
                sp = builder.gep(ir_data(context, builder, signature.args[4], args[4], args[5]), [shift[1]])
                dp = builder.gep(ir_data(context, builder, signature.args[6], args[6], args[7]), [shift[2]])
                tokens.append((xp, sp, builder.load(builder.bitcast(dp, ir.PointerType(F)))))
            body(builder, args[0], bp, tokens)
            return context.get_dummy_value()

        return types.void(acc, blk, q, q_at, bsums, bsums_at, d, d_at), codegen

    return tile


def _q6_k_steps(builder, bp):
    """A stored Q6_K block's steps, as _k4_steps gives a Q4_K block's: codes 0..63, per half hf, ql[64hf:],
    qh[128 + 32hf:], values 128hf + 32t + l (t = 0..3, l < 32) are the low (t < 2) or high nibble of ql[32(t % 2) +
    l] with bits 2t, 2t + 1 of qh[l] above, in sub-blocks of 16 with scales[8hf + 2t + l // 16]; step 2hf + s is
    t = 2s, 2s + 1 of half hf. rest() -> (the 16 scales <16 x i16>, d, None)."""
    scales = builder.sext(ir_load(builder, bp, 192, I8, 16), ir.VectorType(I16, 16))

    def step(g, values):
        hf, half_step = divmod(g, 2)
        low0, low1, qh, *values = _in_order(builder, [ir_load(builder, bp, 64 * hf, I8, 32),
                                                      ir_load(builder, bp, 64 * hf + 32, I8, 32),
                                                      ir_load(builder, bp, 128 + 32 * hf, I8, 32), *values])
        low = _concat(builder, low0, low1)
        nibbles = (builder.and_(low, ir_constant(I8, 64, 15)) if half_step == 0
                   else builder.lshr(low, ir_constant(I8, 64, 4)))
        high = [builder.and_(builder.lshr(qh, ir_constant(I8, 32, 2 * t)), ir_constant(I8, 32, 3))
                for t in (2 * half_step, 2 * half_step + 1)]
        codes = builder.or_(nibbles, builder.shl(_concat(builder, *high), ir_constant(I8, 64, 4)))
        s = 4 * g
        return codes, _pick(builder, scales, [s] * 8 + [s + 1] * 8 + [s + 2] * 8 + [s + 3] * 8), values

    return step, lambda: (scales, _fp16(builder, bp, 208), None)


def _q6_k_terms(builder, acc, tokens, step, rest):
    """Per token t, acc[8t:8t + 8] += d * (scale_i * dot(codes_i - 32, x_i) in 8 lanes) of a Q6_K block given by
    its steps; the 32 is taken off with Q8_K's sums of 16."""
    sums = _block_products(builder, tokens, step)
    scales, d, _ = rest()
    for t, (_, sp, dx) in enumerate(tokens):
        offsets = _times_scales(builder, ir_load(builder, sp, 0, I16, 16), scales)     # scale_i * sum(x_i), 8 lanes
        thirty_two = builder.mul(offsets, ir_constant(I32, 8, 32))
        _accumulate(builder, acc, TOKEN_LANES * t, builder.fmul(dx, d),
                    builder.sub(_block_sums(builder, sums[t]), thirty_two))


# --- unpacked blocks ---------------------------------------------------------------------------------------------
# In a product with many activation rows each weight block is read once per tile of TOKENS rows (128 times for a
# 512-token chunk), and unpacking it (nibbles, fifth bits, six-bit scales, their per-step vectors) took about a fifth
# of the kernel's time. The products kernel unpacks each group of weight rows once into a scratch buffer, UNPACKED
# bytes a block: the 4 steps' codes (64 bytes each), the 4 steps' scales (32 x int16 each), the 16 int16 of the
# block's rest (Q4_K / Q5_K: the mins of each pair of 16; Q6_K: the 16 scales) and its fp16 factors (d, dmin or d):
# then the tiles' loop only multiplies. The integers are the same, so the results are bit for bit those of the
# stored blocks.
UNPACKED = 576
# blocks of a row taken at a time for a group's rows: the TOKENS rows of their activations (8 KB) stay in the L1
CHUNK_BLOCKS = 8
_REST_AT, _FACTORS_AT = 512, 544


def _unpacked_steps(builder, up):
    def step(g, values):
        return ir_load(builder, up, 64 * g, I8, 64), ir_load(builder, up, 256 + 64 * g, I16, 32), values

    return step, lambda: (ir_load(builder, up, _REST_AT, I16, 16), _fp16(builder, up, _FACTORS_AT),
                          _fp16(builder, up, _FACTORS_AT + 2))


def _unpack_ir(steps, factors):
    """IR writing a stored block's unpacked form at `up` (an i8 pointer); factors: (offset, bytes) of its fp16s."""
    def unpack(builder, up, bp):
        step, rest = steps(builder, bp)
        values = [(64 * g + 256 * i, v) for g in range(4) for i, v in enumerate(step(g, [])[:2])]
        values += [(_REST_AT, rest()[0]), (_FACTORS_AT, ir_load(builder, bp, factors[0], I8, factors[1]))]
        for at, value in values:
            where = builder.gep(up, [ir.Constant(I32, at)])
            builder.store(value, builder.bitcast(where, ir.PointerType(value.type)), align=1)
    return unpack


def _unpack_intrinsic(unpack):
    """f(destination bytes, stored block bytes): unpacks the block (UNPACKED bytes from the destination's start)."""
    @intrinsic
    def unpack_block(typingctx, dst, blk):
        def codegen(context, builder, signature, args):
            unpack(builder, ir_data(context, builder, signature.args[0], args[0]),
                   ir_data(context, builder, signature.args[1], args[1]))
            return context.get_dummy_value()

        return types.void(dst, blk), codegen

    return unpack_block


# --- kernels: one weight row per iteration, parallel over rows ---------------------------------------------------
# Templates: `_variant` compiles them with their type's block intrinsics and bytes per block as constants.
_block = _tile = _unpack = None
BLOCK_BYTES = 0
ACC_LANES = TOKEN_LANES


def _rows(raw, q, d, bsums, out):
    """out[0, r] = the sum over row r's blocks of each block's terms, accumulated in 8 float32 lanes (registers)."""
    n_out = raw.shape[0]
    for r in prange(n_out):
        acc_ptr = _lane_buffer()
        acc = carray(acc_ptr, ACC_LANES)
        for i in range(ACC_LANES):
            acc[i] = F32(0.0)
        row = raw[r]
        for ib in range(d.shape[0]):
            _block(acc_ptr, row[BLOCK_BYTES * ib:BLOCK_BYTES * (ib + 1)], q, QK_K * ib, bsums, 16 * ib, d[ib])
        out[0, r] = _pairwise8(acc, 0)


@njit(inline="always")
def _pairwise8(acc, s):
    return ((acc[s] + acc[s + 4]) + (acc[s + 2] + acc[s + 6])) + ((acc[s + 1] + acc[s + 5]) + (acc[s + 3] + acc[s + 7]))


def _stack_floats(n: int):
    """An intrinsic f() -> a pointer to n float32 in the caller's stack frame, 64-byte aligned (as
    matvec._lane_buffer)."""
    @intrinsic
    def lanes(typingctx):
        def codegen(context, builder, signature, args):
            buffer = cgutils.alloca_once(builder, ir.FloatType(), size=n)
            buffer.align = 64
            return buffer

        return types.CPointer(types.float32)(), codegen

    return lanes


_token_lanes = _stack_floats(TOKENS * TOKEN_LANES)


@njit(inline="always")
def _work(raw, q, d, scratch, row_group):
    """(weight rows, activation rows, blocks a row, activation rows in whole tiles of TOKENS, workers, groups of
    row_group weight rows) of a product."""
    n_out, n_tok = raw.shape[0], q.shape[0]
    return n_out, n_tok, d.shape[1], n_tok // TOKENS * TOKENS, scratch.shape[0], (n_out + row_group - 1) // row_group


def _products(raw, q, d, bsums, out, row_group, chunk_blocks, scratch, lanes):
    """out[t, r] for every row t of the activations: per group of `row_group` weight rows, the group's blocks
    unpacked once (_unpack) into the worker's row of `scratch` (uint8 [workers, row_group * blocks * UNPACKED]; worker
    w, in parallel, takes groups w, w + workers, ...), then per tile of TOKENS activation rows, per weight row, its
    unpacked blocks times the tile's rows (_tile); the rows past the last whole tile one at a time against the stored
    blocks (_block). Rows of more than `chunk_blocks` blocks are taken chunk_blocks at a time for all the group's rows
    (so that the tile's activations stay in the L1 cache), their lanes kept in `lanes` (float32 [workers, row_group *
    TOKENS * TOKEN_LANES]) in between. Each out[t, r] is summed exactly as _rows sums it."""
    n_out, n_tok, n_blocks, whole, workers, n_groups = _work(raw, q, d, scratch, row_group)
    row_unpacked = n_blocks * UNPACKED
    for w in prange(workers):
        buf = scratch[w]
        acc_ptr = _token_lanes()
        acc = carray(acc_ptr, TOKENS * TOKEN_LANES)
        for g in range(w, n_groups, workers):
            first = g * row_group
            last = min(n_out, first + row_group)
            if whole:
                for r in range(first, last):
                    row = raw[r]
                    at = (r - first) * row_unpacked
                    for ib in range(n_blocks):
                        _unpack(buf[at + UNPACKED * ib:at + UNPACKED * (ib + 1)],
                                row[BLOCK_BYTES * ib:BLOCK_BYTES * (ib + 1)])
            for t0 in range(0, whole, TOKENS):
                qt, st, dt = q[t0:], bsums[t0:], d[t0:]
                for c0 in range(0, n_blocks, chunk_blocks):
                    c1 = min(n_blocks, c0 + chunk_blocks)
                    for r in range(first, last):
                        kept = (r - first) * TOKENS * TOKEN_LANES
                        for i in range(TOKENS * TOKEN_LANES):
                            acc[i] = F32(0.0) if c0 == 0 else lanes[w, kept + i]
                        at = (r - first) * row_unpacked
                        for ib in range(c0, c1):
                            _tile(acc_ptr, buf[at + UNPACKED * ib:at + UNPACKED * (ib + 1)], qt, QK_K * ib, st,
                                  16 * ib, dt, ib)
                        if c1 < n_blocks:
                            for i in range(TOKENS * TOKEN_LANES):
                                lanes[w, kept + i] = acc[i]
                        else:
                            for t in range(TOKENS):
                                out[t0 + t, r] = _pairwise8(acc, TOKEN_LANES * t)
            for t in range(whole, n_tok):
                qt, st, dt = q[t], bsums[t], d[t]
                for r in range(first, last):
                    for i in range(ACC_LANES):
                        acc[i] = F32(0.0)
                    row = raw[r]
                    for ib in range(n_blocks):
                        _block(acc_ptr, row[BLOCK_BYTES * ib:BLOCK_BYTES * (ib + 1)], qt, QK_K * ib, st, 16 * ib,
                               dt[ib])
                    out[t, r] = _pairwise8(acc, 0)


def _scratch(workers: int, row_bytes: int, zeros: bool = False) -> np.ndarray:
    """uint8 [workers, row_bytes], each row starting on a 64-byte boundary (row_bytes a multiple of 64)."""
    flat = (np.zeros if zeros else np.empty)(workers * row_bytes + 64, np.uint8)
    skip = -flat.ctypes.data % 64
    return flat[skip:skip + workers * row_bytes].reshape(workers, row_bytes)


# --- interleaved weight rows: 16 rows in the lanes of a register (AVX-512 VNNI) ----------------------------------
# The kernel above multiplies a token's 64 values of one weight row per step, two multiplies (u8 x s8 pairs, then
# the pairs times their scales) per 64 products, and sums each block's lanes for its token. With VNNI a group of 16
# weight rows is laid out so that a register holds 4 consecutive codes of each of the 16 rows, one row per 32-bit
# lane: vpdpbusd of that register and 4 codes of a token broadcast to every lane adds 64 products, 4 to each row's
# lane, in one instruction; a sub-block's dot (8 of them for Q4_K's 32 values, 4 for Q6_K's 16) is then multiplied
# by the 16 rows' scales once (vpmulld). The mins' (Q4_K, Q5_K) or the 32 offset's (Q6_K) term goes the same way
# with int16 pairs: per pair of 16 values, vpdpwssd of the rows' two (min or scale) values and the token's two sums
# of 16 (Q8_K's bsums). Then one conversion and a multiply-add by the rows' d (and dmin) times d_x, per block and
# token, in 16 float32 lanes that are the 16 rows' results. Every integer sum is exact, as in the kernel above; the
# float32 order differs (one sum over the blocks, not 8 lanes and a pairwise sum), within the same bound. One
# thread, 4096 x 4096 times 512 rows, an idealised C loop of these instructions on this Zen 4: 175 GMAC/s, against
# 73-76 for the kernel above. Where the CPU has no VNNI the same integers come from portable IR (tests), and
# kernel_for keeps the kernel above.
GROUP_ROWS = 16
_G_SCALES_AT = 4096             # per sub-block j: the 16 rows' scales, <16 x i32>
_G_PAIRS_AT = 5120              # per pair p of 16 values: the rows' two mins (Q4_K, Q5_K) or scales (Q6_K), int16
_G_D_AT, _G_DMIN_AT = 5632, 5664        # the 16 rows' fp16 d and dmin
GROUP_BLOCK = 5696              # bytes of a block of 16 interleaved rows (codes: value v of row r at 64 (v // 4) +
                                # 4 r + v % 4)
# type -> (sub-blocks per block, with a min)
_GROUP_SPECS = {T.Q4_K: (8, True), T.Q5_K: (8, True), T.Q6_K: (16, False)}


def _vnni(builder, name, acc, a, b):
    """The AVX-512 VNNI instruction `name` (vpdpbusd, vpdpwssd): acc <16 x i32> plus a's and b's products."""
    v16 = ir.VectorType(I32, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), f"llvm.x86.avx512.{name}.512")
    return builder.call(fn, [acc, builder.bitcast(a, v16), builder.bitcast(b, v16)])


def _dpbusd(builder, acc, u8, s8):
    """acc <16 x i32> + the sums of 4 adjacent u8 x s8 products of two <64 x i8> (vpdpbusd; exact, no saturation)."""
    if HAS_VNNI:
        return _vnni(builder, "vpdpbusd", acc, u8, s8)
    wide = ir.VectorType(I32, 64)
    products = builder.mul(builder.zext(u8, wide), builder.sext(s8, wide))
    quads = [_pick(builder, products, range(k, 64, 4)) for k in range(4)]
    return builder.add(acc, builder.add(builder.add(quads[0], quads[1]), builder.add(quads[2], quads[3])))


def _dpwssd(builder, acc, a, b):
    """acc <16 x i32> + the sums of adjacent int16 products of two <32 x i16> (vpdpwssd)."""
    return _vnni(builder, "vpdpwssd", acc, a, b) if HAS_VNNI else builder.add(acc, _times_scales(builder, a, b))


def _splat32(builder, ptr, byte_offset):
    """The 4 bytes at ptr + byte_offset in each of 16 int32 lanes."""
    one = ir_load(builder, ptr, byte_offset, I32, 1)
    return _pick(builder, one, [0] * 16)


def _group_terms(n_sub, with_min):
    """IR of one block of 16 interleaved rows (at gp) times each token of `tokens` ((xp, sp, dx): its codes, its
    sums of 16, its scale): acc[16t + r] += row r's block term for token t."""
    per = QK_K // n_sub                     # values per sub-block

    def body(builder, acc, gp, tokens):
        sums = [ir_constant(I32, 16, 0)] * len(tokens)
        for j in range(n_sub):
            codes = [ir_load(builder, gp, 64 * (per // 4 * j + s), I8, 64) for s in range(per // 4)]
            scales = ir_load(builder, gp, _G_SCALES_AT + 64 * j, I32, 16)
            for t, (xp, _, _) in enumerate(tokens):
                dot = ir_constant(I32, 16, 0)
                for s, c in enumerate(codes):
                    dot = _dpbusd(builder, dot, c, builder.bitcast(_splat32(builder, xp, per * j + 4 * s),
                                                                   ir.VectorType(I8, 64)))
                sums[t] = builder.add(sums[t], builder.mul(dot, scales))
        terms = [ir_constant(I32, 16, 0)] * len(tokens)
        for p in range(8):
            pair = ir_load(builder, gp, _G_PAIRS_AT + 64 * p, I16, 32)
            for t, (_, sp, _) in enumerate(tokens):
                bsums = builder.bitcast(_splat32(builder, sp, 4 * p), ir.VectorType(I16, 32))
                terms[t] = _dpwssd(builder, terms[t], pair, bsums)
        f16 = ir.VectorType(F, 16)
        d = _fp16x16(builder, gp, _G_D_AT)
        dmin = _fp16x16(builder, gp, _G_DMIN_AT) if with_min else None
        for t, (_, _, dx) in enumerate(tokens):
            where = builder.bitcast(builder.gep(acc, [ir.Constant(I32, 16 * t)]), ir.PointerType(f16))
            dxs = _splat(builder, dx, 16)
            if with_min:
                total = builder.fadd(builder.load(where), builder.fmul(builder.fmul(dxs, d),
                                                                       builder.sitofp(sums[t], f16)))
                total = builder.fsub(total, builder.fmul(builder.fmul(dxs, dmin), builder.sitofp(terms[t], f16)))
            else:
                ints = builder.sub(sums[t], builder.mul(terms[t], ir_constant(I32, 16, 32)))
                total = builder.fadd(builder.load(where), builder.fmul(builder.fmul(dxs, d), builder.sitofp(ints, f16)))
            builder.store(total, where)

    return body


def _interleave_ir(steps, n_sub, factors):
    """IR writing a stored block of row r into a block of 16 interleaved rows at gp: its codes (from its steps), its
    sub-block scales as int32, its 16 pair values (the steps' rest) as int16, its fp16 d (and dmin)."""
    def interleave(builder, gp, bp, r):
        step, rest = steps(builder, bp)

        def store(at, value, row_bytes=4):
            _store_row(builder, gp, r, at, value, row_bytes)

        step_scales = []
        for g in range(4):
            codes, scales, _ = step(g, [])
            words = builder.bitcast(codes, ir.VectorType(I32, 16))
            for k in range(16):                 # values 64g + 4k .. + 3
                store(64 * (16 * g + k), builder.extract_element(words, ir.Constant(I32, k)))
            step_scales.append(scales)
        pairs = rest()[0]
        for j in range(n_sub):
            if n_sub == 8:          # Q4_K / Q5_K: step g's scales are sub-blocks 2g (lanes 0..15) and 2g + 1
                scale = builder.extract_element(step_scales[j // 2], ir.Constant(I32, 16 * (j % 2)))
            else:                   # Q6_K: the 16 scales are the rest
                scale = builder.extract_element(pairs, ir.Constant(I32, j))
            store(_G_SCALES_AT + 64 * j, builder.sext(scale, I32))
        for i in range(16):
            store(_G_PAIRS_AT + 64 * (i // 2) + 2 * (i % 2), builder.extract_element(pairs, ir.Constant(I32, i)))
        at, n = factors
        for k in range(n // 2):
            half = builder.extract_element(ir_load(builder, bp, at + 2 * k, I16, 1), ir.Constant(I32, 0))
            store((_G_D_AT, _G_DMIN_AT)[k], half, row_bytes=2)
    return interleave


def _interleave_intrinsic(interleave):
    """f(group bytes, byte offset, stored block bytes, r): the block as row r of the 16 at the offset."""
    @intrinsic
    def interleave_block(typingctx, dst, at, blk, r):
        def codegen(context, builder, signature, args):
            gp = ir_data(context, builder, signature.args[0], args[0])
            gp = builder.gep(gp, [args[1]])
            interleave(builder, gp, ir_data(context, builder, signature.args[2], args[2]), args[3])
            return context.get_dummy_value()

        return types.void(dst, at, blk, r), codegen

    return interleave_block


# Blocks of 32 the same way (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1 weights times Q8_0 codes): the 16 rows' codes in 8
# registers as u8, signed codes plus 128 (c ^ 0x80), then the rows' fp16 d and (Q4_1, Q5_1) m. Per block and token
# the dot of signed codes starts from -128 * (the token's sum of its 32 codes), which takes the 128 off again,
# exactly; a min adds m * d_x * that sum.
GROUP_BLOCK_32 = 576
_G32_D_AT, _G32_M_AT = 512, 544


def _fp16x16(builder, gp, at):
    """The 16 fp16 at gp + at as <16 x float>."""
    where = builder.bitcast(builder.gep(gp, [ir.Constant(I32, at)]), ir.PointerType(ir.VectorType(ir.HalfType(), 16)))
    return builder.fpext(builder.load(where, align=1), ir.VectorType(F, 16))


def _store_row(builder, gp, r, at, value, row_bytes):
    """value at gp + at + r * row_bytes (r: an integer value)."""
    where = builder.gep(gp, [builder.add(builder.mul(r, ir.Constant(r.type, row_bytes)), ir.Constant(r.type, at))])
    builder.store(value, builder.bitcast(where, ir.PointerType(value.type)), align=1)


def _group32_terms(with_min):
    def body(builder, acc, gp, tokens):
        """IR of one block of 32 of 16 interleaved rows times each token ((xp, sp, dx): its codes, its block's sum
        of them (int32), its block's scale): acc[16t + r] += d_r * d_x * dot(codes_r, x) (+ m_r * d_x * sum(x))."""
        codes = [ir_load(builder, gp, 64 * s, I8, 64) for s in range(8)]
        f16 = ir.VectorType(F, 16)
        d = _fp16x16(builder, gp, _G32_D_AT)
        m = _fp16x16(builder, gp, _G32_M_AT) if with_min else None
        for t, (xp, sp, dx) in enumerate(tokens):
            sums = _splat32(builder, sp, 0)
            dot = ir_constant(I32, 16, 0) if with_min else builder.mul(sums, ir_constant(I32, 16, -128))
            for s, c in enumerate(codes):
                dot = _dpbusd(builder, dot, c, builder.bitcast(_splat32(builder, xp, 4 * s), ir.VectorType(I8, 64)))
            lanes = builder.bitcast(builder.gep(acc, [ir.Constant(I32, 16 * t)]), ir.PointerType(f16))
            dxs = _splat(builder, dx, 16)
            total = builder.fadd(builder.load(lanes), builder.fmul(builder.fmul(dxs, d), builder.sitofp(dot, f16)))
            if with_min:
                total = builder.fadd(total, builder.fmul(builder.fmul(dxs, m), builder.sitofp(sums, f16)))
            builder.store(total, lanes)
    return body


def _interleave32_ir(qtype):
    def interleave(builder, gp, bp, r):
        """IR writing a stored block of 32 of row r into a block of 16 interleaved rows at gp."""
        codes, m_at = _block32_codes(builder, bp, qtype)
        if m_at is None:                                    # signed: plus 128, as u8
            codes = builder.xor(codes, ir_constant(I8, 32, -128))
        words = builder.bitcast(codes, ir.VectorType(I32, 8))
        for s in range(8):
            _store_row(builder, gp, r, 64 * s, builder.extract_element(words, ir.Constant(I32, s)), 4)
        for at, to in ((0, _G32_D_AT),) + (((m_at, _G32_M_AT),) if m_at is not None else ()):
            half = builder.extract_element(ir_load(builder, bp, at, I16, 1), ir.Constant(I32, 0))
            _store_row(builder, gp, r, to, half, 2)
    return interleave


_group_lanes = _stack_floats(TOKENS * GROUP_ROWS)
_interleave = _group_tile = _group_one = None
GROUP_BYTES = VALUES = SUMS = 0


def _group_products(raw, q, d, bsums, out, scratch):
    """out[t, r] for every row t of the activations (Q8_K: q, d, bsums; or Q8_0: q, d, s), blocks of VALUES values
    taking SUMS of the sums each: per group of GROUP_ROWS weight rows (worker w, in parallel,
    takes groups w, w + workers, ...), the group's blocks interleaved once (_interleave) into the worker's row of
    `scratch` (uint8 [workers, blocks * GROUP_BYTES], zeros at first: the lanes of a last group's missing rows stay
    finite), then per tile of TOKENS activation rows all the blocks (_group_tile), the rows past the last whole tile
    one at a time (_group_one)."""
    n_out, n_tok, n_blocks, whole, workers, n_groups = _work(raw, q, d, scratch, GROUP_ROWS)
    for w in prange(workers):
        buf = scratch[w]
        acc_ptr = _group_lanes()
        acc = carray(acc_ptr, TOKENS * GROUP_ROWS)
        for g in range(w, n_groups, workers):
            first, last = g * GROUP_ROWS, min(n_out, (g + 1) * GROUP_ROWS)
            for r in range(first, last):
                row = raw[r]
                for ib in range(n_blocks):
                    _interleave(buf, GROUP_BYTES * ib, row[BLOCK_BYTES * ib:BLOCK_BYTES * (ib + 1)], r - first)
            for t0 in range(0, n_tok, TOKENS):
                n = TOKENS if t0 < whole else 1
                for t1 in range(t0, min(n_tok, t0 + TOKENS), n):
                    for i in range(n * GROUP_ROWS):
                        acc[i] = F32(0.0)
                    qt, st, dt = q[t1:], bsums[t1:], d[t1:]
                    for ib in range(n_blocks):
                        if n == TOKENS:
                            _group_tile(acc_ptr, buf[GROUP_BYTES * ib:GROUP_BYTES * (ib + 1)], qt, VALUES * ib, st,
                                        SUMS * ib, dt, ib)
                        else:
                            _group_one(acc_ptr, buf[GROUP_BYTES * ib:GROUP_BYTES * (ib + 1)], qt, VALUES * ib, st,
                                       SUMS * ib, dt, ib)
                    for t in range(n):
                        for r in range(first, last):
                            out[t1 + t, r] = acc[GROUP_ROWS * t + r - first]


# --- blocks of 32 times Q8_0 activations: one activation row ----------------------------------------------------
# llama.cpp multiplies Q8_0, Q4_0 and Q5_0 weights by Q8_0 activations, Q4_1 and Q5_1 by Q8_1 (the same codes and
# scales, plus d * sum of the codes): per block d_w * d_x * dot(codes_w, codes_x), plus m_w * d_x * sum(codes_x)
# where the block has a min. The dot, as ggml's AVX2 code takes it: the 32 weight codes (int8) times the activation
# codes (int8), u8 x s8 with adjacent pairs summed to int16 (vpmaddubsw; signed weight codes as |w| times x with w's
# sign, vpsignb), pairs of those to int32 (vpmaddwd): 8 int32 lanes, times d_w * d_x into 8 float32 lanes; the mins'
# term, m_w * d_x * (the block's sum of x codes, made with them), into a ninth. On an AVX2 CPU (Zen 3, one thread,
# 1536x576 in cache, medians of 7 alternating rounds) against the earlier int16 codes (codes widened, vpmaddwd):
# Q4_0 15.1 vs 13.5 GMAC/s, Q5_0 12.4 vs 9.4, Q4_1 13.8 vs 10.1, Q5_1 11.4 vs 7.6; Q8_0 the same (0.97-0.99x the time).

def _block32_codes(builder, bp, qtype):
    """(<32 x i8> codes, the fp16 min's byte offset or None) of a block at bp (its fp16 scale is at byte 0), value
    j from the low nibbles of qs[0:16] then the high ones: Q4_1 those (0..15), Q5_1 with bit j of the 32-bit qh as
    bit 4 (0..31); signed where the block has no min: Q8_0 the stored bytes, Q4_0 the nibble less 8, Q5_0 the
    nibble less 16 unless bit j is set (the nibble with 0xF0 or-ed in is that, as int8)."""
    if qtype == T.Q8_0:
        return ir_load(builder, bp, 2, I8, 32), None
    with_min = qtype in (T.Q4_1, T.Q5_1)
    qh_at = {T.Q5_0: 2, T.Q5_1: 4}.get(qtype)
    qs_at = {T.Q4_0: 2, T.Q4_1: 4, T.Q5_0: 6, T.Q5_1: 8}[qtype]
    qs = ir_load(builder, bp, qs_at, I8, 16)
    codes = _concat(builder, builder.and_(qs, ir_constant(I8, 16, 15)), builder.lshr(qs, ir_constant(I8, 16, 4)))
    if qh_at is not None:
        # byte j // 8 of qh to lane j, its bit j % 8 tested (a shuffle, an and, a compare: x86 has no byte shifts)
        spread = _pick(builder, ir_load(builder, bp, qh_at, I8, 4), [j // 8 for j in range(32)])
        bit = builder.and_(spread, ir.Constant(ir.VectorType(I8, 32), [1 << (j % 8) for j in range(32)]))
        is_set = builder.icmp_unsigned("!=", bit, ir_constant(I8, 32, 0))
        high = (builder.select(is_set, ir_constant(I8, 32, 16), ir_constant(I8, 32, 0)) if with_min else
                builder.select(is_set, ir_constant(I8, 32, 0), ir_constant(I8, 32, -16)))
        codes = builder.or_(codes, high)
    elif qtype == T.Q4_0:
        codes = builder.sub(codes, ir_constant(I8, 32, 8))
    return codes, 2 if with_min else None


def _fold_halves(builder, vec):
    """The two halves of a vector added lane by lane."""
    return builder.add(_half_of(builder, vec, 0), _half_of(builder, vec, 1))


def _pairs32(builder, w, x, signed):
    """<32 x i8> codes w times <32 x s8> x, adjacent pairs summed: <16 x i16>, exact (|w| <= 128, |x| <= 127). With
    AVX2 as ggml multiplies them, u8 x s8 (vpmaddubsw): unsigned codes as they are; signed ones as |w| (vpsignb w, w)
    times x with w's sign (vpsignb x, w)."""
    if HAS_AVX2:
        if signed:
            ty = ir.VectorType(I8, 32)
            sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty]),
                                                  "llvm.x86.avx2.psign.b")
            w, x = builder.call(sign, [w, w]), builder.call(sign, [x, w])
        return _maddubs32(builder, w, x)
    wide = ir.VectorType(I16, 32)
    return _pairs(builder, builder.mul(builder.sext(w, wide) if signed else builder.zext(w, wide),
                                       builder.sext(x, wide)), 32)


def _block32_ir(qtype):
    def body(builder, acc, bp, xp, dx, sx):
        """acc[0:8] += d_w * d_x * (sums of codes_w * codes_x, 4 products a lane); with a min, acc[8] += m_w * d_x *
        sum(codes_x)."""
        codes, m_at = _block32_codes(builder, bp, qtype)
        x = ir_load(builder, xp, 0, I8, 32)
        pairs = _pairs32(builder, codes, x, signed=m_at is None)   # Q4_1 / Q5_1 (a min): unsigned codes
        dots = _times_scales(builder, pairs, ir_constant(I16, 16, 1))
        _accumulate(builder, acc, 0, builder.fmul(_fp16(builder, bp, 0), dx), dots)
        if m_at is not None:
            where = builder.gep(acc, [ir.Constant(I32, 8)])
            term = builder.fmul(builder.fmul(_fp16(builder, bp, m_at), dx), builder.sitofp(sx, F))
            builder.store(builder.fadd(builder.load(where), term), where)
    return body


def _block32_intrinsic(body):
    """f(acc, block bytes, q, q offset, d_x, s_x): q the int8 codes of Q80, s_x the block's sum of them."""
    @intrinsic
    def block(typingctx, acc, blk, q, q_at, dx, sx):
        def codegen(context, builder, signature, args):
            bp = ir_data(context, builder, signature.args[1], args[1])
            xp = ir_data(context, builder, signature.args[2], args[2], args[3])
            body(builder, args[0], bp, xp, args[4], args[5])
            return context.get_dummy_value()

        return types.void(acc, blk, q, q_at, dx, sx), codegen

    return block


def _rows32(raw, q, d, s, out):
    """out[0, r] = the sum over row r's blocks of 32 of each block's terms, in 8 float32 lanes (registers), plus a
    ninth for the mins' terms."""
    n_out = raw.shape[0]
    for r in prange(n_out):
        acc_ptr = _lane_buffer()
        acc = carray(acc_ptr, 9)
        for i in range(9):
            acc[i] = F32(0.0)
        row = raw[r]
        for ib in range(d.shape[0]):
            _block(acc_ptr, row[BLOCK_BYTES * ib:BLOCK_BYTES * (ib + 1)], q, 32 * ib, d[ib], s[ib])
        out[0, r] = _pairwise8(acc, 0) + acc[8]


# type -> (bytes per block, its steps from the stored bytes, its terms, (offset, bytes) of its fp16 factors)
_SPECS = {T.Q4_K: (Q4_K_BYTES, lambda builder, bp: _k4_steps(builder, bp, False), _k4_terms, (0, 4)),
          T.Q5_K: (Q5_K_BYTES, lambda builder, bp: _k4_steps(builder, bp, True), _k4_terms, (0, 4)),
          T.Q6_K: (Q6_K_BYTES, _q6_k_steps, _q6_k_terms, (208, 2))}
SUPPORTED = tuple(_SPECS)
PRODUCT_ROW_GROUP = 16          # weight rows per parallel work item of the products kernel


def kernel_for(qtype: GGMLQuantizationType, interleaved: bool | None = None) -> Kernel | None:
    """The integer kernel for weights of `qtype` times Q8_K activations (one row, or 2-D: several), or None.
    `interleaved`: for several rows, 16 weight rows in the lanes of a register (True) or one row at a time (False);
    None: interleaved where the CPU has AVX-512 VNNI."""
    if qtype not in _SPECS:
        return None
    return _kernel(T(qtype), HAS_VNNI if interleaved is None else interleaved)


@cache
def _builds(qtype: GGMLQuantizationType) -> tuple[dict, dict]:
    """({parallel?: one-row build}, {parallel?: several-rows build}) of the kernel for `qtype` times Q8_K."""
    type_size, steps, terms, factors = _SPECS[qtype]
    stored = lambda builder, acc, bp, tokens: terms(builder, acc, tokens, *steps(builder, bp))
    unpacked = lambda builder, acc, up, tokens: terms(builder, acc, tokens, *_unpacked_steps(builder, up))
    consts = {"_block": _block_intrinsic(stored), "_tile": _tile_intrinsic(unpacked, TOKENS),
              "_unpack": _unpack_intrinsic(_unpack_ir(steps, factors)), "BLOCK_BYTES": type_size}
    name = f"_{qtype.name.lower()}_q8_k"
    return ({p: _variant(_rows, name, 1, p, consts) for p in (True, False)},
            {p: _variant(_products, name, TOKENS, p, consts) for p in (True, False)})


@cache
def _group_builds(qtype: GGMLQuantizationType) -> dict:
    """{parallel?: build} of the interleaved-rows products kernel for `qtype` times Q8_K (several rows)."""
    type_size, steps, _, factors = _SPECS[qtype]
    n_sub, with_min = _GROUP_SPECS[qtype]
    body = _group_terms(n_sub, with_min)
    consts = {"_interleave": _interleave_intrinsic(_interleave_ir(steps, n_sub, factors)),
              "_group_tile": _tile_intrinsic(body, TOKENS), "_group_one": _tile_intrinsic(body, 1),
              "BLOCK_BYTES": type_size, "GROUP_BYTES": GROUP_BLOCK, "VALUES": QK_K, "SUMS": 16}
    name = f"_{qtype.name.lower()}_q8_k_rows_in_lanes" + ("_vnni" if HAS_VNNI else "")
    return {p: _variant(_group_products, name, TOKENS, p, consts) for p in (True, False)}


def row_builds(qtype: GGMLQuantizationType) -> dict:
    """{parallel?: numba build} of the one-row kernel for `qtype` weights (raw, q, d, bsums or s, out): Q8_K codes
    for the K-quants, Q8_0 codes for blocks of 32, without the checks of kernel_for's wrapper (compiled callers,
    evaluate/step.py, check the shapes once)."""
    qtype = T(qtype)
    return _builds(qtype)[0] if qtype in _SPECS else _builds32(qtype)


@cache
def _kernel(qtype: GGMLQuantizationType, interleaved: bool) -> Kernel:
    type_size = _SPECS[qtype][0]
    one, many = _builds(qtype)
    grouped = _group_builds(qtype) if interleaved else None
    parallel, serial = one[True], one[False]

    def kernel(raw: np.ndarray, act: Q8K, out: np.ndarray) -> None:
        """out[t, r] = sum_j (q_tj * d_t) * W[r, j] for the stored rows `raw` of W and the Q8_K rows t of `act`
        (one row: act's arrays 1-D, out (1, n_out); see qtool.evaluate.qdot)."""
        n_in = act.q.shape[-1]
        n_out = raw.shape[0]
        lead = act.q.shape[:-1]
        n_tok = lead[0] if lead else 1
        # The kernels do not check bounds: a wrong shape would read or write outside the arrays.
        if (raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] * QK_K != n_in * type_size or act.q.ndim > 2
                or act.d.shape != lead + (n_in // QK_K,) or act.bsums.shape != lead + (n_in // 16,)
                or out.shape != (n_tok, n_out) or out.dtype != np.float32 or act.q.dtype != np.int8
                or act.d.dtype != np.float32 or act.bsums.dtype != np.int16 or raw.strides[1] != 1
                or not all(a.flags.c_contiguous for a in (act.q, act.d, act.bsums))):
            raise ValueError(f"{qtype.name} x Q8_K: raw {raw.dtype}{raw.shape}, activations {act.q.shape}, "
                             f"out {out.dtype}{out.shape} do not fit")
        # small products, and those of threads that run them side by side (MoE experts), on the calling thread
        parallel_call = n_out * n_in * n_tok >= PARALLEL_MIN_WEIGHTS and get_num_threads() > 1
        if not lead:
            (parallel if parallel_call else serial)(raw, act.q, act.d, act.bsums, out)
        elif n_tok and grouped is not None:
            workers = get_num_threads() if parallel_call else 1
            grouped[parallel_call](raw, act.q, act.d, act.bsums, out,
                                   _scratch(workers, GROUP_BLOCK * (n_in // QK_K), zeros=True))
        elif n_tok:
            workers = get_num_threads() if parallel_call else 1
            scratch = _scratch(workers, PRODUCT_ROW_GROUP * (n_in // QK_K) * UNPACKED)
            lanes = np.empty((workers, PRODUCT_ROW_GROUP * TOKENS * TOKEN_LANES), np.float32)
            many[parallel_call](raw, act.q, act.d, act.bsums, out, PRODUCT_ROW_GROUP, CHUNK_BLOCKS, scratch, lanes)

    kernel.__name__ = kernel.__qualname__ = f"qdot_{qtype.name.lower()}" + ("_interleaved" if interleaved else "")
    return kernel


# weight type -> bytes per block of 32, for the kernels that take Q8_0 activations
_SPECS32 = {T.Q8_0: Q8_0_BYTES, T.Q4_0: Q4_0_BYTES, T.Q4_1: Q4_1_BYTES, T.Q5_0: Q5_0_BYTES, T.Q5_1: Q5_1_BYTES}
SUPPORTED_Q8_0 = tuple(_SPECS32)


def kernel_for_q8_0(qtype: GGMLQuantizationType, interleaved: bool | None = None) -> Kernel | None:
    """The integer kernel for weights of `qtype` (blocks of 32) times one row of Q8_0 activations, or None.
    `interleaved`: it also takes several rows (2-D activations), 16 weight rows in the lanes of a register; None:
    where the CPU has AVX-512 VNNI (ROWS_Q8_0)."""
    if qtype not in _SPECS32:
        return None
    return _kernel32(T(qtype), HAS_VNNI if interleaved is None else interleaved)


# the weight types whose Q8_0 kernel takes several activation rows on this CPU
ROWS_Q8_0 = SUPPORTED_Q8_0 if HAS_VNNI else ()


@cache
def _builds32(qtype: GGMLQuantizationType) -> dict:
    consts = {"_block": _block32_intrinsic(_block32_ir(qtype)), "BLOCK_BYTES": _SPECS32[qtype]}
    return {p: _variant(_rows32, f"_{qtype.name.lower()}_q8_0", 1, p, consts) for p in (True, False)}


@cache
def _group_builds32(qtype: GGMLQuantizationType) -> dict:
    """{parallel?: build} of the interleaved-rows products kernel for `qtype` (blocks of 32) times Q8_0 rows."""
    body = _group32_terms(qtype in (T.Q4_1, T.Q5_1))
    consts = {"_interleave": _interleave_intrinsic(_interleave32_ir(qtype)),
              "_group_tile": _tile_intrinsic(body, TOKENS), "_group_one": _tile_intrinsic(body, 1),
              "BLOCK_BYTES": _SPECS32[qtype], "GROUP_BYTES": GROUP_BLOCK_32, "VALUES": 32, "SUMS": 1}
    name = f"_{qtype.name.lower()}_q8_0_rows_in_lanes" + ("_vnni" if HAS_VNNI else "")
    return {p: _variant(_group_products, name, TOKENS, p, consts) for p in (True, False)}


@cache
def _kernel32(qtype: GGMLQuantizationType, interleaved: bool) -> Kernel:
    type_size = _SPECS32[qtype]
    one = _builds32(qtype)
    parallel, serial = one[True], one[False]
    grouped = _group_builds32(qtype) if interleaved else None

    def kernel(raw: np.ndarray, act: Q80, out: np.ndarray) -> None:
        """out[t, r] = sum_j (q_tj * d_t) * W[r, j] for the stored rows `raw` of W and the Q8_0 row `act` (out (1,
        n_out)), or its rows (2-D: the interleaved kernel)."""
        n_in = act.q.shape[-1]
        n_out = raw.shape[0]
        lead = act.q.shape[:-1]
        n_tok = lead[0] if lead else 1
        # The kernels do not check bounds: a wrong shape would read or write outside the arrays.
        if (raw.ndim != 2 or raw.dtype != np.uint8 or raw.shape[1] * 32 != n_in * type_size
                or act.q.ndim > (2 if grouped is not None else 1)
                or act.d.shape != lead + (n_in // 32,) or act.s.shape != lead + (n_in // 32,)
                or out.shape != (n_tok, n_out) or out.dtype != np.float32 or act.q.dtype != np.int8
                or act.d.dtype != np.float32 or act.s.dtype != np.int32 or raw.strides[1] != 1
                or not all(a.flags.c_contiguous for a in (act.q, act.d, act.s))):
            raise ValueError(f"{qtype.name} x Q8_0: raw {raw.dtype}{raw.shape}, activations {act.q.dtype}"
                             f"{act.q.shape}, out {out.dtype}{out.shape} do not fit")
        parallel_call = n_out * n_in * n_tok >= PARALLEL_MIN_WEIGHTS and get_num_threads() > 1
        if not lead:
            (parallel if parallel_call else serial)(raw, act.q, act.d, act.s, out)
        elif n_tok:
            workers = get_num_threads() if parallel_call else 1
            grouped[parallel_call](raw, act.q, act.d, act.s, out,
                                   _scratch(workers, GROUP_BLOCK_32 * (n_in // 32), zeros=True))

    kernel.__name__ = kernel.__qualname__ = (f"qdot_{qtype.name.lower()}_q8_0"
                                             + ("_interleaved" if grouped is not None else ""))
    return kernel
