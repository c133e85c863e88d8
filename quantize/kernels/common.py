"""Scalar building blocks shared by the kernels, each reproducing one piece of ggml-quants.c bit for bit.

Arithmetic rules (docs/reference/quantization.md §0, §2.8): everything is float32, every operation rounds on its own (no
fastmath, so LLVM never contracts a*b+c into an FMA), sums run sequentially in index order, and the
parenthesisation of the C source is kept. Numba promotes ``int64 op float32`` and Python float literals to
float64, so integers and constants are converted to float32 explicitly (``F32(...)`` or module-level
float32 constants); ``nearest_int`` refuses anything but a float32 at compile time, which catches a
float64 leaking into the integer codes. make_qkx_quants_8 runs 8 independent searches side by side in vector
registers (LLVM IR without fast-math flags: each lane's operations are the scalar ones, in the same order).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

F32 = np.float32

GROUP_MAX_EPS = F32(1e-15)
ROUNDING_MAGIC = F32(12582912.0)  # 1.5 * 2**23: adding it leaves round-to-nearest-even(f) in the low mantissa bits

# Block geometry (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES and quantize/formats.py's table
# state them (tests/test_kernels.py checks they agree). Numba freezes module globals into the compiled kernels, so
# they live here, where a change drops every cached kernel (see kernels/__init__.py).
QK = 32                 # legacy and IQ4_NL blocks
QK_K = 256              # k-quant, IQ4_XS and TQ1_0/TQ2_0 super-blocks
Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES = 18, 20, 22, 24, 34
Q2_K_BYTES, Q3_K_BYTES, Q4_K_BYTES, Q5_K_BYTES, Q6_K_BYTES = 84, 110, 144, 176, 210
IQ4_NL_BYTES, IQ4_XS_BYTES = 18, 136
QK1_0 = 128             # Q1_0 blocks
QK2_0 = 64              # Q2_0 blocks
TQ1_0_BYTES, TQ2_0_BYTES, Q1_0_BYTES, Q2_0_BYTES = 54, 66, 18, 18
IQ3_XXS_BYTES, IQ3_S_BYTES = 98, 110
IQ2_XXS_BYTES, IQ2_XS_BYTES, IQ2_S_BYTES = 66, 74, 82
IQ1_S_BYTES, IQ1_M_BYTES = 50, 56
MXFP4_BYTES = 17       # MXFP4: QK-element blocks

# kvalues_iq4nl of ggml-common.h, as float32 because the C compares and subtracts them as floats.
IQ4NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


@intrinsic
def fp16_widen(typingctx, h):
    """An fp16 bit pattern (uint16) as float32 by the CPU's conversion (fpext: vcvtph2ps with F16C, which a loop
    vectorizes): exact for every finite value, infinity and quiet NaN; a signaling NaN comes out quieted (callers
    that must keep its bits put them back: floats.decode_f16)."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def round_to_f16(typingctx, v):
    """The float32 v rounded to the nearest float16 (ties to even, inf past float16's range, float16 subnormals
    kept, NaN stays NaN) and widened back, as float32: fptrunc and fpext (vcvtps2ph / vcvtph2ps with F16C, which a
    loop vectorizes). numpy's astype(float16).astype(float32) bit for bit but for NaN payloads, and ggml's
    GGML_FP32_TO_FP16 rounding of a scale. No libm call (math.frexp and ldexp were: on a 576-wide prefill most of
    the time of rounding the activations to Q8_0)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(v), codegen


@intrinsic
def float32_bits(typingctx, value):
    """The IEEE bits of a float32 as an int32 (C's memcpy type pun)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits``."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(cache=True, inline='always')
def nearest_int(f):
    # The bit trick, not rint: for |f| > 4194303 (reachable in the refinement steps) C returns the trick's
    # garbage value, which callers then clamp; a byte-exact port has to produce the same garbage.
    bits = np.int64(float32_bits(f + ROUNDING_MAGIC))
    return (bits & 0x007FFFFF) - 0x00400000


@njit(cache=True, inline='always')
def c_float_to_int(v):
    """C's (int) conversion of a float as x86-64 performs it (cvttss2si): truncation toward zero, and the
    "integer indefinite" INT_MIN for NaN and out-of-range values. The legacy ref paths reach those with
    subnormal data (1/d overflows to inf); a plain numba cast would be undefined there."""
    if v != v or v >= F32(2147483648.0) or v < F32(-2147483648.0):
        return np.int64(-2147483648)
    return np.int64(np.int32(v))


@njit(cache=True, inline='always')
def c_float_to_int8(v):
    """(int8_t)v on x86-64: the low byte of the int conversion, read as signed."""
    return ((c_float_to_int(v) & 0xFF) ^ 0x80) - 0x80


@njit(cache=True, inline='always')
def fp32_to_fp16_bits(f):
    """ggml_compute_fp32_to_fp16: round to nearest even, subnormals, overflow to inf, NaN -> 0x7E00|sign.
    Every case is computed and one selected, without branches, so that F16 rows vectorize."""
    u = np.int64(float32_bits(f)) & 0xFFFFFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # A normal half: rebias the exponent, round the 13 dropped mantissa bits to even.
    m = a - 0x38000000
    normal = (m + 0xFFF + ((m >> 13) & 1)) >> 13
    # A subnormal half counts units of 2**-24: shift the whole significand down (by 14..24 where this case
    # is selected; clamped so the shift stays defined elsewhere) and round to even.
    shift = min(max(126 - (a >> 23), 14), 24)
    significand = (a & 0x7FFFFF) | 0x800000
    q = significand >> shift
    rest = significand & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    subnormal = q + ((rest > half) | ((rest == half) & ((q & 1) == 1)))
    if a > 0x7F800000:
        magnitude = 0x7E00
    elif a >= 0x477FF000:  # 65520 and above round to infinity
        magnitude = 0x7C00
    elif a >= 0x38800000:
        magnitude = normal
    elif a <= 0x33000000:  # at most 2**-25: rounds (ties to even) to zero
        magnitude = 0
    else:
        magnitude = subnormal
    return sign | magnitude


@njit(cache=True)
def fp16_bits_to_fp32(h):
    """GGML_FP16_TO_FP32 (exact)."""
    sign = (np.int64(h) & 0x8000) << 16
    exponent = (h >> 10) & 0x1F
    mantissa = h & 0x3FF
    if exponent == 0:  # zero or subnormal half: a normal float32 (or zero), exact
        bits = sign | (np.int64(float32_bits(F32(mantissa) * F32(2.0 ** -24))) & 0x7FFFFFFF)
    elif exponent == 31:
        bits = sign | 0x7F800000 | (mantissa << 13)
    else:
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13)
    return float32_from_bits(np.int32(bits - 0x100000000 if bits >= 0x80000000 else bits))


@njit(cache=True)
def store_fp16(out, offset, f):
    """Writes fp16(f) little-endian at out[offset:offset+2]; returns the stored bits."""
    h = fp32_to_fp16_bits(f)
    out[offset] = h & 0xFF
    out[offset + 1] = h >> 8
    return h


@njit(cache=True, inline='always')
def larger(a, b):
    """a if a > b else b: max(b, a) as numba's max takes it (a NaN a leaves b)."""
    return a if a > b else b


@njit(cache=True, inline='always')
def _entry(x, j, magnitudes):
    return abs(x[j]) if magnitudes else x[j]


@njit(cache=True, inline='always')
def running_max(x, start, stop, magnitudes):
    """max(x[start:stop]), stop > start, or with `magnitudes` max(0, |x[start:stop]|), as 8 running maxima:
    independent, so the compares overlap (a loop of one waits on each); the maximum is the same in any order."""
    first = F32(0.0) if magnitudes else x[start]
    t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = first
    j = start
    while j + 8 <= stop:
        t0, t1 = larger(_entry(x, j, magnitudes), t0), larger(_entry(x, j + 1, magnitudes), t1)
        t2, t3 = larger(_entry(x, j + 2, magnitudes), t2), larger(_entry(x, j + 3, magnitudes), t3)
        t4, t5 = larger(_entry(x, j + 4, magnitudes), t4), larger(_entry(x, j + 5, magnitudes), t5)
        t6, t7 = larger(_entry(x, j + 6, magnitudes), t6), larger(_entry(x, j + 7, magnitudes), t7)
        j += 8
    top = larger(larger(larger(t0, t1), larger(t2, t3)), larger(larger(t4, t5), larger(t6, t7)))
    for i in range(j, stop):
        top = larger(_entry(x, i, magnitudes), top)
    return top


@njit(cache=True, inline='always')
def first_absmax(x, start, n):
    """Signed value of the first element with the largest |x| (strict >, ties keep the first); 0 if all 0.
    Returns (that value, its magnitude). NaN-free input (formats.py refuses NaN)."""
    # For non-NaN floats the order of |x| is the integer order of the sign-cleared bits: an integer max
    # vectorizes, the float compare-and-keep-the-value loop does not. A second short scan finds the first hit.
    top = np.int32(0)
    for i in range(start, start + n):
        b = float32_bits(x[i]) & np.int32(0x7FFFFFFF)
        top = b if b > top else top
    if top == 0:
        return F32(0.0), F32(0.0)  # all (signed) zeros: C's max keeps its +0 initial value
    for i in range(start, start + n):
        if float32_bits(x[i]) & np.int32(0x7FFFFFFF) == top:
            return x[i], abs(x[i])
    return F32(0.0), F32(0.0)


@njit(cache=True, inline='always')
def best_index_int8(x):
    """Index of the kvalues_iq4nl entry nearest to x; an exact tie goes to the upper index (C's binary search
    of best_index_int8, written without branches so that loops over it vectorize)."""
    values = IQ4NL_VALUES
    # upper = first index whose value exceeds x, kept within 1..15; the ends fall out of the final test:
    # x <= values[0] picks 0 and x >= values[15] picks 15, as C's early returns do.
    upper = 1
    for k in range(1, 15):
        upper += values[k] <= x
    pick_lower = (x - values[upper - 1]) < (values[upper] - x)
    index = upper - 1 if pick_lower else upper
    return index if x == x else 15  # NaN (inf*0 with subnormal data) fails all of C's tests and ends at 15


QX_STEPS = 18  # the candidate scales -(nmax + 0.1*step)/max, step = -9..9 without 0
QX_SCRATCH = 3 * QX_STEPS


@njit(cache=True, inline='always')
def make_qx_quants(n, nmax, x, xs, L, ls, w, ws, scratch=None):
    """Symmetric signed quantization of x[xs:xs+n] to L[ls:ls+n] in 0..2*nmax-1 (rmse_type 1) with weights
    w[ws:ws+n], searching 19 candidate scales; returns the (signed) least-squares scale. ``scratch``: float32
    [QX_SCRATCH] reused across calls (allocated per call when omitted)."""
    if scratch is None:
        scratch = np.empty(QX_SCRATCH, np.float32)
    # Views indexed by range() counters let LLVM drop numba's negative-index checks.
    xb = x[xs:xs + n]
    Lb = L[ls:ls + n]
    wb = w[ws:ws + n]
    vmax, amax = first_absmax(xb, 0, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            Lb[i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = -fnmax / vmax
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * xb[i])))
        Lb[i] = l + nmax
        fl = F32(l)
        sumlx += (wb[i] * xb[i]) * fl
        suml2 += (wb[i] * fl) * fl
    scale = sumlx / suml2 if suml2 != 0 else F32(0.0)
    best = scale * sumlx
    # The 18 candidates' sums do not depend on which candidate wins, only the choice does. So all are
    # accumulated in one sweep with the step loop innermost: each sum still adds its terms in element order
    # (identical rounding), but 36 independent chains pipeline (and vectorize) where C waits on two.
    iscales = scratch[0:QX_STEPS]
    step_lx = scratch[QX_STEPS:2 * QX_STEPS]
    step_l2 = scratch[2 * QX_STEPS:3 * QX_STEPS]
    for k in range(QX_STEPS):
        step = k - 9 if k < 9 else k - 8
        iscales[k] = -(fnmax + F32(0.1) * F32(step)) / vmax
        step_lx[k] = F32(0.0)
        step_l2[k] = F32(0.0)
    lo = np.int32(-nmax)
    hi = np.int32(nmax - 1)
    for i in range(n):
        xi = xb[i]
        wi = wb[i]
        wx = wi * xi
        for k in range(QX_STEPS):
            bits = float32_bits(iscales[k] * xi + ROUNDING_MAGIC)  # nearest_int, in int32 to vectorize
            fl = F32(max(lo, min(hi, (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000))))
            step_lx[k] += wx * fl
            step_l2[k] += (wi * fl) * fl
    winner = -1
    for k in range(QX_STEPS):  # C's sequential acceptance, in C's step order
        if step_l2[k] > 0 and step_lx[k] * step_lx[k] > best * step_l2[k]:
            scale = step_lx[k] / step_l2[k]
            best = scale * step_lx[k]
            winner = k
    if winner >= 0:
        for i in range(n):
            Lb[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscales[winner] * xb[i])))
    return scale


@njit(cache=True, inline='always')
def make_qkx_quants(n, nmax, x, xs, w, L, ls, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) quantization of x[xs:xs+n] to L[ls:ls+n] in 0..nmax with weights w[0:n]
    (make_qkx2_quants / make_qkx3_quants, identical for non-NULL weights). Returns (scale, the_min) with
    x ≈ scale*L - the_min."""
    xb = x[xs:xs + n]
    Lb = L[ls:ls + n]
    vmin = xb[0]
    vmax = xb[0]
    sum_w = w[0]
    sum_x = sum_w * xb[0]
    for i in range(1, n):
        v = xb[i]
        if v < vmin:
            vmin = v
        if v > vmax:
            vmax = v
        sum_w += w[i]
        sum_x += w[i] * v
    if vmin > 0:
        vmin = F32(0.0)
    if vmax == vmin:
        for i in range(n):
            Lb[i] = 0
        return F32(0.0), -vmin
    fnmax = F32(nmax)
    iscale = fnmax / (vmax - vmin)
    scale = F32(1.0) / iscale
    best_error = F32(0.0)
    for i in range(n):
        l = max(0, min(nmax, nearest_int(iscale * (xb[i] - vmin))))
        Lb[i] = l
        diff = ((scale * F32(l)) + vmin) - xb[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += w[i] * diff
    for step in range(nstep + 1):
        iscale = ((rmin + rdelta * F32(step)) + fnmax) / (vmax - vmin)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = max(0, min(nmax, nearest_int(iscale * (xb[i] - vmin))))
            Laux[i] = l
            fl = F32(l)
            sum_l += w[i] * fl
            sum_l2 += (w[i] * fl) * fl
            sum_xl += (w[i] * fl) * xb[i]
        D = (sum_w * sum_l2) - (sum_l * sum_l)
        if D > 0:
            this_scale = ((sum_w * sum_xl) - (sum_x * sum_l)) / D
            this_min = ((sum_l2 * sum_x) - (sum_l * sum_xl)) / D
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F32(0.0)
            for i in range(n):
                diff = ((this_scale * F32(Laux[i])) + this_min) - xb[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += w[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    Lb[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, -vmin


# --- LLVM IR helpers: the lane kernels below and evaluate/qdot.py's ------------------------------------------------

def ir_constant(ty, n, value):
    """An <n x ty> vector constant with `value` in every lane."""
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


def ir_data(context, builder, ty, array, offset=None):
    """An i8* to an array's data (plus `offset` elements of its type): ty is the array's numba type."""
    data = context.make_array(ty)(context, builder, array).data
    if offset is not None:
        data = builder.gep(data, [offset])
    return builder.bitcast(data, ir.PointerType(ir.IntType(8)))


def ir_at(builder, ptr, byte_offset, ty, n):
    """An <n x ty>* at the i8* ptr plus byte_offset."""
    where = builder.gep(ptr, [ir.Constant(ir.IntType(32), byte_offset)])
    return builder.bitcast(where, ir.PointerType(ir.VectorType(ty, n)))


def ir_load(builder, ptr, byte_offset, ty, n, align=1):
    """The <n x ty> at the i8* ptr plus byte_offset."""
    return builder.load(ir_at(builder, ptr, byte_offset, ty, n), align=align)


# --- make_qkx_quants for 8 sub-blocks at once ------------------------------------------------------------------
# Its search is 20-36 steps of sequential float32 sums over 32 values, each bound by its adds' latency one sub-block
# at a time (about 88 % of Q4_K's quantizing time). The 8 sub-blocks of a super-block are independent, so they run
# side by side in the 8 lanes of vector registers: each lane's operations are the scalar version's, in its order
# (no fast-math flags, every operation rounded on its own), so the bits are the same. The IR below is that loop
# for rows of n values (32: Q4_K and Q5_K; 16: Q2_K) laid out lane-major (value i of row j at 8 i + j); per-lane
# state lives in a float32 scratch [LANE_STATS, LANES]: its rows are the _S_* indices.
LANES = 8
_S_VMIN, _S_VMAX, _S_SUM_W, _S_SUM_X, _S_SCALE, _S_BEST, _S_FLAT = range(7)
LANE_STATS = 7


def _lane_rows(context, builder, signature, args):
    """i8* pointers to the data of the arrays among an intrinsic's arguments (None for the others)."""
    return [ir_data(context, builder, t, a) if isinstance(t, types.Array) else None
            for t, a in zip(signature.args, args)]


def _lanes_at(builder, ptr, byte_offset, ty):
    return ir_at(builder, ptr, byte_offset, ty, LANES)


def _f8(value):
    return ir_constant(ir.FloatType(), LANES, value)


def _i32x(value):
    return ir_constant(ir.IntType(32), LANES, value)


class _LaneIR:
    """Loads and stores of one lane-major block of n values a row (xt, wt: float32; codes uint8) and of the state
    rows."""

    def __init__(self, builder, sp, xp, wp, n):
        self.b, self.sp, self.xp, self.wp, self.n = builder, sp, xp, wp, n

    def row(self, k):
        return self.b.load(_lanes_at(self.b, self.sp, 4 * LANES * k, ir.FloatType()), align=4)

    def set_row(self, k, value):
        self.b.store(value, _lanes_at(self.b, self.sp, 4 * LANES * k, ir.FloatType()), align=4)

    def x(self, i):
        return self.b.load(_lanes_at(self.b, self.xp, 4 * LANES * i, ir.FloatType()), align=4)

    def w(self, i):
        return self.b.load(_lanes_at(self.b, self.wp, 4 * LANES * i, ir.FloatType()), align=4)

    def codes(self, cp, iscale, vmin, nmax, with_sums):
        """Each value's code max(0, min(nmax, nearest_int(iscale * (x - vmin)))) stored at cp (uint8, lane-major);
        with_sums: the sums of w*l, w*l*l and w*l*x in index order."""
        b = self.b
        sums = [_f8(0.0)] * 3
        for i in range(self.n):
            x = self.x(i)
            bits = b.bitcast(b.fadd(b.fmul(iscale, b.fsub(x, vmin)), _f8(float(ROUNDING_MAGIC))),
                             ir.VectorType(ir.IntType(32), LANES))
            code = b.sub(b.and_(bits, _i32x(0x007FFFFF)), _i32x(0x00400000))
            code = b.select(b.icmp_signed("<", nmax, code), nmax, code)
            code = b.select(b.icmp_signed(">", _i32x(0), code), _i32x(0), code)
            b.store(b.trunc(code, ir.VectorType(ir.IntType(8), LANES)), _lanes_at(b, cp, LANES * i, ir.IntType(8)),
                    align=1)
            if with_sums:
                fl = b.sitofp(code, ir.VectorType(ir.FloatType(), LANES))
                wl = b.fmul(self.w(i), fl)
                sums = [b.fadd(sums[0], wl), b.fadd(sums[1], b.fmul(wl, fl)), b.fadd(sums[2], b.fmul(wl, x))]
        return sums

    def error(self, cp, scale, the_min, use_mad):
        """The sum of w * diff**2 (|diff| with use_mad), diff = (scale * l + the_min) - x, over the codes at cp."""
        b = self.b
        f8 = ir.VectorType(ir.FloatType(), LANES)
        err = _f8(0.0)
        for i in range(self.n):
            code = b.load(_lanes_at(b, cp, LANES * i, ir.IntType(8)), align=1)
            diff = b.fsub(b.fadd(b.fmul(scale, b.uitofp(code, f8)), the_min), self.x(i))
            if use_mad:
                name = f"llvm.fabs.v{LANES}f32"
                fabs = b.module.globals.get(name) or ir.Function(b.module, ir.FunctionType(f8, [f8]), name)
                diff = b.call(fabs, [diff])
            else:
                diff = b.fmul(diff, diff)
            err = b.fadd(err, b.fmul(self.w(i), diff))
        return err

    def nmax(self, value):
        top = self.b.insert_element(_i32x(0), self.b.trunc(value, ir.IntType(32)), ir.Constant(ir.IntType(32), 0))
        return self.b.shuffle_vector(top, top, _i32x(0))


def _qkx_intrinsics(n, use_mad):
    @intrinsic
    def start(typingctx, st, xt, wt, Lt, nmax):
        """make_qkx_quants up to its search: each row's min (at most 0), max, sum of w, sum of w*x, flat (max ==
        min), scale = 1 / iscale, its first codes (to Lt) and their error (best)."""
        def codegen(context, builder, signature, args):
            sp, xp, wp, lp, _ = _lane_rows(context, builder, signature, args)
            b, lane = builder, _LaneIR(builder, sp, xp, wp, n)
            x0, w0 = lane.x(0), lane.w(0)
            vmin, vmax, sum_w, sum_x = x0, x0, w0, b.fmul(w0, x0)
            for i in range(1, n):
                v, w = lane.x(i), lane.w(i)
                vmin = b.select(b.fcmp_ordered("<", v, vmin), v, vmin)
                vmax = b.select(b.fcmp_ordered(">", v, vmax), v, vmax)
                sum_w = b.fadd(sum_w, w)
                sum_x = b.fadd(sum_x, b.fmul(w, v))
            vmin = b.select(b.fcmp_ordered(">", vmin, _f8(0.0)), _f8(0.0), vmin)
            flat = b.select(b.fcmp_ordered("==", vmax, vmin), _f8(1.0), _f8(0.0))
            iscale = b.fdiv(b.sitofp(lane.nmax(args[4]), vmin.type), b.fsub(vmax, vmin))
            scale = b.fdiv(_f8(1.0), iscale)
            lane.codes(lp, iscale, vmin, lane.nmax(args[4]), False)
            best = lane.error(lp, scale, vmin, use_mad)
            for k, value in ((_S_VMIN, vmin), (_S_VMAX, vmax), (_S_SUM_W, sum_w), (_S_SUM_X, sum_x),
                             (_S_SCALE, scale), (_S_BEST, best), (_S_FLAT, flat)):
                lane.set_row(k, value)
            return context.get_dummy_value()

        return types.void(st, xt, wt, Lt, nmax), codegen

    @intrinsic
    def step(typingctx, st, xt, wt, Lt, aux, nmax, factor):
        """One step of the search, iscale = factor / (max - min): codes to aux, the least-squares scale and min
        (the min clamped to 0, the scale then sum(w*l*x) / sum(w*l*l)), their error; where D > 0, the row is not
        flat and the error is below best, they replace scale, min, best and the codes in Lt."""
        def codegen(context, builder, signature, args):
            sp, xp, wp, lp, ap, _, _ = _lane_rows(context, builder, signature, args)
            b, lane = builder, _LaneIR(builder, sp, xp, wp, n)
            vmin, vmax, sum_w, sum_x = (lane.row(k) for k in (_S_VMIN, _S_VMAX, _S_SUM_W, _S_SUM_X))
            factor = b.insert_element(_f8(0.0), args[6], ir.Constant(ir.IntType(32), 0))
            factor = b.shuffle_vector(factor, factor, _i32x(0))
            iscale = b.fdiv(factor, b.fsub(vmax, vmin))
            sum_l, sum_l2, sum_xl = lane.codes(ap, iscale, vmin, lane.nmax(args[5]), True)
            D = b.fsub(b.fmul(sum_w, sum_l2), b.fmul(sum_l, sum_l))
            this_scale = b.fdiv(b.fsub(b.fmul(sum_w, sum_xl), b.fmul(sum_x, sum_l)), D)
            this_min = b.fdiv(b.fsub(b.fmul(sum_l2, sum_x), b.fmul(sum_l, sum_xl)), D)
            clamped = b.fcmp_ordered(">", this_min, _f8(0.0))
            this_scale = b.select(clamped, b.fdiv(sum_xl, sum_l2), this_scale)
            this_min = b.select(clamped, _f8(0.0), this_min)
            err = lane.error(ap, this_scale, this_min, use_mad)
            best = lane.row(_S_BEST)
            wins = b.and_(b.and_(b.fcmp_ordered(">", D, _f8(0.0)), b.fcmp_ordered("==", lane.row(_S_FLAT), _f8(0.0))),
                          b.fcmp_ordered("<", err, best))
            lane.set_row(_S_BEST, b.select(wins, err, best))
            lane.set_row(_S_SCALE, b.select(wins, this_scale, lane.row(_S_SCALE)))
            lane.set_row(_S_VMIN, b.select(wins, this_min, vmin))
            for i in range(n):
                new = b.load(_lanes_at(b, ap, LANES * i, ir.IntType(8)), align=1)
                old = b.load(_lanes_at(b, lp, LANES * i, ir.IntType(8)), align=1)
                b.store(b.select(wins, new, old), _lanes_at(b, lp, LANES * i, ir.IntType(8)), align=1)
            return context.get_dummy_value()

        return types.void(st, xt, wt, Lt, aux, nmax, factor), codegen

    return start, step


_qkx_start_32, _qkx_step_32 = _qkx_intrinsics(32, False)        # Q4_K, Q5_K: sub-blocks of 32, squared errors
_qkx_start_16, _qkx_step_16 = _qkx_intrinsics(16, False)        # Q2_K with an imatrix
_qkx_start_16_mad, _qkx_step_16_mad = _qkx_intrinsics(16, True)  # Q2_K without: absolute errors


@njit(cache=True, inline='always')
def make_qkx_quants_lanes(n, nmax, xt, wt, Lt, aux, rmin, rdelta, nstep, use_mad, scales, mins, st):
    """make_qkx_quants of LANES independent rows of n values at once (n = 32 with squared errors, or 16), for the
    same bits: row j's value i at
    xt[LANES * i + j] (its weights in wt, its codes 0..nmax written to Lt, the same way; aux a uint8 scratch of that
    size), its scale to scales[j] and its -min to mins[j]; st a float32 scratch [LANE_STATS, LANES]. A row with no
    range (max == min) runs the search on garbage and keeps (0, -min) and zero codes, as the scalar version returns
    early."""
    if n == 32:
        _qkx_start_32(st, xt, wt, Lt, nmax)
    elif use_mad:
        _qkx_start_16_mad(st, xt, wt, Lt, nmax)
    else:
        _qkx_start_16(st, xt, wt, Lt, nmax)
    fnmax = F32(nmax)
    for step in range(nstep + 1):
        factor = (rmin + rdelta * F32(step)) + fnmax
        if n == 32:
            _qkx_step_32(st, xt, wt, Lt, aux, nmax, factor)
        elif use_mad:
            _qkx_step_16_mad(st, xt, wt, Lt, aux, nmax, factor)
        else:
            _qkx_step_16(st, xt, wt, Lt, aux, nmax, factor)
    for j in range(LANES):
        flat = st[_S_FLAT, j] > 0
        scales[j] = F32(0.0) if flat else st[_S_SCALE, j]
        mins[j] = -st[_S_VMIN, j]
        if flat:
            for i in range(n):
                Lt[LANES * i + j] = 0


LANE_SCRATCH = 2 * LANES * 32 + LANE_STATS * LANES     # float32 scratch of make_qkx_quants_8


@njit(cache=True, inline='always')
def make_qkx_quants_8(n, nmax, x, xs, w, L, ls, scratch, codes, rmin, rdelta, nstep, use_mad, scales, mins):
    """make_qkx_quants of the 8 consecutive sub-blocks of n values at x[xs:xs + 8 n] (weights w[0:8 n], codes to
    L[ls:ls + 8 n], scales[j] and mins[j] for sub-block j), all 8 at once (make_qkx_quants_lanes: n = 32 with
    squared errors, or 16); scratch float32 [LANE_SCRATCH], codes uint8 [2 * 256]."""
    xt = scratch[:LANES * n]
    wt = scratch[LANES * 32:LANES * (32 + n)]
    for j in range(LANES):
        for i in range(n):
            xt[LANES * i + j] = x[xs + n * j + i]
            wt[LANES * i + j] = w[n * j + i]
    Lt = codes[:LANES * n]
    make_qkx_quants_lanes(n, nmax, xt, wt, Lt, codes[LANES * 32:LANES * (32 + n)], rmin, rdelta, nstep, use_mad,
                          scales, mins, scratch[2 * LANES * 32:].reshape(LANE_STATS, LANES))
    for j in range(LANES):
        for i in range(n):
            L[ls + n * j + i] = Lt[LANES * i + j]


@njit(cache=True)
def make_qp_quants(n, nmax, x, L, qw):
    """Quantizes the non-negative x[0:n] (sub-block scales or mins) to L in 0..nmax with weights qw; returns
    the super-scale. L is uint8 as in C, so out-of-range codes wrap the way C's conversion does."""
    vmax = F32(0.0)
    for i in range(n):
        vmax = vmax if vmax > x[i] else x[i]
    if vmax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = fnmax / vmax
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = F32(1.0) / iscale
    best_mse = F32(0.0)
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        best_mse += (qw[i] * diff) * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_step = (F32(0.1) * F32(step) + fnmax) / vmax
        scale_step = F32(1.0) / iscale_step
        mse = F32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_step * x[i]))
            diff = x[i] - scale_step * F32(l)
            mse += (qw[i] * diff) * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_step
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        # The sums use the int code, L keeps its uint8 image (they differ only for a negative input).
        fl = F32(l)
        sumlx += (qw[i] * x[i]) * fl
        suml2 += (qw[i] * fl) * fl
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = qw[i]
            fl = F32(L[i])
            slx = sumlx - (w * x[i]) * fl
            sl2 = suml2 - (w * fl) * fl
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int((x[i] * sl2) / slx))
                if new_l != L[i]:
                    fnew = F32(new_l)
                    slx += (w * x[i]) * fnew
                    sl2 += (w * fnew) * fnew
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F32(0.0)


@njit(parallel=True, cache=True)
def first_non_finite(x):
    """(row, column) of the first NaN/inf in the 2-D float32 x, or (-1, -1): one pass, no temporary array."""
    rows, n = x.shape
    bad_rows = np.zeros(rows, np.bool_)
    for r in prange(rows):
        # An all-ones exponent marks inf/NaN; an integer max over the exponent fields vectorizes, float tests don't.
        top = np.int32(0)
        for j in range(n):
            e = float32_bits(x[r, j]) & np.int32(0x7F800000)
            top = e if e > top else top
        bad_rows[r] = top == np.int32(0x7F800000)
    for r in range(rows):
        if bad_rows[r]:
            for j in range(n):
                if not np.isfinite(x[r, j]):
                    return r, j
    return -1, -1


@njit(cache=True)
def first_bad_block_scale(blocks, offsets):
    """(row, block) of the first block in the 3-D uint8 ``blocks`` [rows, blocks, type_size] with an inf/NaN fp16
    at one of the byte ``offsets`` (its scales), or (-1, -1). One thread: a byte or two per block is less work
    than waking the others."""
    rows, nb = blocks.shape[0], blocks.shape[1]
    for r in range(rows):
        for b in range(nb):
            for o in offsets:
                if (blocks[r, b, o + 1] & 0x7C) == 0x7C:      # exponent bits of the little-endian high byte
                    return r, b
    return -1, -1


@njit(parallel=True, cache=True)
def first_all_ones_exponent(halves, exponent_mask):
    """(row, column) of the first 16-bit float in the 2-D uint16 ``halves`` whose exponent field (given by
    ``exponent_mask``: 0x7C00 for F16, 0x7F80 for BF16) is all ones — an inf or NaN — or (-1, -1)."""
    rows, n = halves.shape
    bad_rows = np.zeros(rows, np.bool_)
    for r in prange(rows):
        top = 0
        for j in range(n):
            top = max(top, halves[r, j] & exponent_mask)  # an integer max vectorizes
        bad_rows[r] = top == exponent_mask
    for r in range(rows):
        if bad_rows[r]:
            for j in range(n):
                if halves[r, j] & exponent_mask == exponent_mask:
                    return r, j
    return -1, -1


# --- pieces the i-quant searches share (iq1.py, iq2.py, iq3.py, iq4.py) ---------------------------------------------

@njit(cache=True, inline="always")
def sum_of_squares(xs):
    """Σ x² in value order, float32 (the C's loop)."""
    total = F32(0.0)
    for i in range(xs.shape[0]):
        total += xs[i] * xs[i]
    return total


@njit(cache=True, inline="always")
def block_sigma2(xs):
    """2 Σ x² / n: the σ² that ggml's i-quants add to x² in their importance weights (n a power of two: exact)."""
    return (F32(2.0) * sum_of_squares(xs)) / F32(xs.shape[0])


@njit(cache=True, inline="always")
def importance_weights(xb, qw, use_imatrix, sigma2, weight):
    """weight = qw √(σ² + x²) with an importance matrix, else x²."""
    for i in range(xb.shape[0]):
        weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i]) if use_imatrix else xb[i] * xb[i]


@njit(cache=True, inline="always")
def magnitudes_and_signs(xb, weight, xval, signs, even_parity):
    """Magnitudes (xval = |x|, -0.0 kept as the C keeps it) and a sign code per group of 8 (bit set: negative).

    even_parity (IQ2_XXS, IQ2_XS, IQ3_XXS): 7-bit codes whose eighth sign is implied by parity; with an odd count of
    negatives, the value of least weight·x² keeps its wrong sign (its magnitude is stored negated). Without it
    (IQ3_S), all eight sign bits are kept and `weight` is not read."""
    for k in range(xb.shape[0] // 8):
        s = 0
        flips = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= 0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                flips += 1
                s |= 1 << i
        if even_parity and flips % 2:
            imin = 0
            least = (weight[8 * k] * xb[8 * k]) * xb[8 * k]
            for i in range(1, 8):
                ax = (weight[8 * k + i] * xb[8 * k + i]) * xb[8 * k + i]
                if ax < least:
                    least = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if even_parity else s
