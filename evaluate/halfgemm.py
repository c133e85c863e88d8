"""Batched products with F16 and BF16 weights, widened in registers: no float32 tile of the weights.

The tiled path of weights.py decodes a tile of rows to float32 (4 bytes per weight written, then read again by
BLAS) and hands it to sgemm. For 16-bit floats the widening is one instruction (vcvtph2ps; BF16: a shift), so this
module multiplies the stored halves directly, as a small GEMM of its own in the layout BLAS libraries use (the
GotoBLAS scheme):

- x (M rows, K) is packed into panels of MR = 6 rows, KC columns at a time (`panels`, float32, rows past M zero),
  once per input: the model's q, k and v products share one packing, gate and up another;
- each parallel task takes NB weight rows and packs them, as halves, into strips of NR = 16 rows, k-major (16
  consecutive halves are the 16 rows' values at one k), then runs the micro-kernel over blocks of MB rows of x and
  KC columns, so that the strips' slice (NB x KC halves), x's panels (MB x KC) and the block of out (MB x NB) stay
  in the core's L2;
- the micro-kernel (`_tile_intrinsic`, LLVM IR) holds a 6 x 16 block of out in 12 vector registers: per k it
  widens 16 halves to two float32 vectors, broadcasts the 6 x values and does 12 FMAs. One Zen 3 core runs it at
  81-90 GFLOP/s on data in L1 (2 FMAs of 8 lanes per cycle at ~2.8 GHz), a whole 1024 x 4096 x 4096 product at
  71-76 (OpenBLAS's sgemm of the same shape, already float32: 68-84; this VM varies by ~10 % minute to minute).

Values. Each out[m, n] is the float32 sum over k of x[m, k] * w[n, k] (w widened exactly), fused multiply-adds in
k order within each block of KC columns, the blocks' sums added in order: the same numbers whatever the thread
count, and within float32 rounding of the decode-and-BLAS product (tests/test_halfgemm.py checks both against a
float64 product).

So the float32 tile's writing and reading (~3 % of a 7B F16 perplexity pass) is gone, and its 32 MB with it; on
these 2 cores the products run at about the speed of decode + sgemm (five 7B products of 1024 rows, 2 threads,
8 alternating rounds: 2.470 s against 2.471 s best, 2.608 against 2.657 median), with the more to gain where
many cores share the memory bandwidth that the tiles used. Measured end to end: benchmarks/README.md.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from qtool.numba_start import drop_stale_kernels
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qtool.quantize.kernels import common as _common
from qtool.quantize.kernels.common import ir_data
from qtool.evaluate.matvec import specialize

# The micro-kernel's IR is built by common.py's helpers: an edit there drops this module's cached kernels.
drop_stale_kernels(Path(__file__).parent / "__pycache__", [Path(_common.__file__)],
                   "halfgemm.helpers.sha256", lambda name: name.startswith("halfgemm."))

T = GGMLQuantizationType
SUPPORTED = (T.F16, T.BF16)
MR = 6          # rows of x per micro-kernel call (12 accumulators + 2 widened vectors + 1 broadcast: 15 registers)
NR = 16         # weight rows per strip: two 8-lane vectors
KC = 256        # columns per block
MB = 96         # rows of x per block (16 micro-kernel calls per strip)
UNROLL = 4      # k steps per loop iteration of the micro-kernel (84.9-89.4 against 78.3-88.0 GFLOP/s unrolled once, one Zen 3 core)
NB = 256        # weight rows per parallel task, about (task_count)


def _widen(builder, halves, bf16: bool):
    """<NR x i16> -> <NR x float>: F16 by fpext (vcvtph2ps), BF16 as the upper half of a float32."""
    v = ir.VectorType(ir.FloatType(), NR)
    if bf16:
        wide = builder.shl(builder.zext(halves, ir.VectorType(ir.IntType(32), NR)),
                           ir.Constant(ir.VectorType(ir.IntType(32), NR), [16] * NR))
        return builder.bitcast(wide, v)
    return builder.fpext(builder.bitcast(halves, ir.VectorType(ir.HalfType(), NR)), v)


def _tile_intrinsic(bf16: bool):
    @intrinsic
    def tile(typingctx, a, a_off, b, b_off, kn, c, c_off, ldc, accumulate, rows):
        """c[r, 0:16] (+)= sum over k < kn of a[a_off + MR k + r] * widen(b[b_off + NR k : +NR]) for r < rows: a
        float32 panel of MR rows (k-major), b a strip of NR weight rows (k-major halves), c float32 with row stride
        ldc (elements); `accumulate` adds to c, else c is overwritten."""
        sig = types.void(a, a_off, b, b_off, kn, c, c_off, ldc, accumulate, rows)

        def codegen(context, builder, signature, args):
            a_, a_off_, b_, b_off_, kn_, c_, c_off_, ldc_, acc_, rows_ = args
            i64 = ir.IntType(64)
            v = ir.VectorType(ir.FloatType(), NR)
            ap = ir_data(context, builder, signature.args[0], a_, a_off_)
            bp = ir_data(context, builder, signature.args[2], b_, b_off_)
            cp = ir_data(context, builder, signature.args[5], c_, c_off_)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v, [v, v, v]), "llvm.fma.v16f32")
            sums = [cgutils.alloca_once_value(builder, ir.Constant(v, [0.0] * NR)) for _ in range(MR)]
            lane0 = ir.Constant(ir.IntType(32), 0)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), NR), [0] * NR)

            def step(k):
                halves = builder.load(builder.bitcast(builder.gep(bp, [builder.mul(k, ir.Constant(i64, 2 * NR))]),
                                                      ir.PointerType(ir.VectorType(ir.IntType(16), NR))), align=2)
                w = _widen(builder, halves, bf16)
                base = builder.mul(k, ir.Constant(i64, 4 * MR))
                for r in range(MR):
                    where = builder.gep(ap, [builder.add(base, ir.Constant(i64, 4 * r))])
                    xv = builder.load(builder.bitcast(where, ir.PointerType(ir.FloatType())), align=4)
                    xs = builder.shuffle_vector(builder.insert_element(ir.Constant(v, ir.Undefined), xv, lane0),
                                                ir.Constant(v, ir.Undefined), splat)
                    builder.store(builder.call(fma, [xs, w, builder.load(sums[r])]), sums[r])

            n = builder.sext(kn_, i64) if kn_.type != i64 else kn_
            whole = builder.udiv(n, ir.Constant(i64, UNROLL))
            with cgutils.for_range(builder, whole) as loop:          # UNROLL steps per iteration
                for u in range(UNROLL):
                    step(builder.add(builder.mul(loop.index, ir.Constant(i64, UNROLL)), ir.Constant(i64, u)))
            done = builder.mul(whole, ir.Constant(i64, UNROLL))
            with cgutils.for_range(builder, builder.sub(n, done)) as loop:
                step(builder.add(done, loop.index))
            row_bytes = builder.mul(builder.sext(ldc_, i64) if ldc_.type != i64 else ldc_, ir.Constant(i64, 4))
            n_rows = builder.sext(rows_, i64) if rows_.type != i64 else rows_
            for r in range(MR):
                with builder.if_then(builder.icmp_signed("<", ir.Constant(i64, r), n_rows)):
                    ptr = builder.bitcast(builder.gep(cp, [builder.mul(row_bytes, ir.Constant(i64, r))]),
                                          ir.PointerType(v))
                    total = builder.load(sums[r])
                    with builder.if_else(cgutils.is_true(builder, acc_)) as (add, put):
                        with add:
                            builder.store(builder.fadd(builder.load(ptr, align=4), total), ptr, align=4)
                        with put:
                            builder.store(total, ptr, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile_f16 = _tile_intrinsic(False)
_tile_bf16 = _tile_intrinsic(True)


@njit(parallel=True, cache=True)
def pack_rows(x, packed):
    """x float32 (M, K) -> panels: for each block of KC columns (k0), for each group of MR rows (g), the block's
    values k-major, MR per k (rows past M zero), at k0 * n_groups * MR + g * kn * MR."""
    m, k_all = x.shape
    groups = (m + MR - 1) // MR
    for kb in prange((k_all + KC - 1) // KC):
        k0 = kb * KC
        kn = min(KC, k_all - k0)
        for g in range(groups):
            base = k0 * groups * MR + g * kn * MR
            for r in range(MR):
                row = g * MR + r
                if row < m:
                    for k in range(kn):
                        packed[base + k * MR + r] = x[row, k0 + k]
                else:
                    for k in range(kn):
                        packed[base + k * MR + r] = np.float32(0.0)


@njit(cache=True, inline="always")
def _pack_strips(halves, quads, n0, strips, strip):
    """Weight rows n0 .. n0 + NR strips -> strips of NR rows, k-major: the NR rows' halves at k are consecutive.
    Rows are read four halves at a time where K allows (a quarter of the loads: this packing was ~3 % of a
    product)."""
    k_all = halves.shape[1]
    for s in range(strips):
        base = s * k_all * NR
        for j in range(NR):
            if quads.shape[0]:
                w4 = quads[n0 + s * NR + j]
                for q in range(k_all // 4):
                    v = w4[q]
                    at = base + 4 * q * NR + j
                    strip[at] = np.uint16(v & 0xFFFF)
                    strip[at + NR] = np.uint16((v >> 16) & 0xFFFF)
                    strip[at + 2 * NR] = np.uint16((v >> 32) & 0xFFFF)
                    strip[at + 3 * NR] = np.uint16(v >> 48)
            else:
                w = halves[n0 + s * NR + j]
                for k in range(k_all):
                    strip[base + k * NR + j] = w[k]


tile = None  # the micro-kernel (_tile_f16 or _tile_bf16): a global of each build of _product_template, set below


def _product_template(packed, m, halves, quads, out, tasks, strips_buffer):
    """out (m, N) = x @ W.T from x's panels (pack_rows) and W's halves (N, K) uint16 (`quads`: the same rows as
    uint64, or empty when K is not a multiple of 4), N a multiple of NR. The N / NR strips are shared out as
    evenly as can be among `tasks` tasks, a multiple of the threads (strips_buffer's rows: each thread packs
    its tasks' strips into its own row, made once per run, as fresh pages for every task cost more than the
    packing)."""
    n_all, k_all = halves.shape
    groups = (m + MR - 1) // MR
    n_blocks = (k_all + KC - 1) // KC
    n_strips = n_all // NR
    threads = strips_buffer.shape[0]
    for worker in prange(threads):
        for t in range(worker * tasks // threads, (worker + 1) * tasks // threads):
            first_strip = t * n_strips // tasks
            strips = (t + 1) * n_strips // tasks - first_strip
            n0 = first_strip * NR
            strip = strips_buffer[worker]
            _pack_strips(halves, quads, n0, strips, strip)
            for g0 in range(0, groups, MB // MR):
                g1 = min(groups, g0 + MB // MR)
                for kb in range(n_blocks):
                    k0 = kb * KC
                    kn = min(KC, k_all - k0)
                    for g in range(g0, g1):
                        first = g * MR
                        for s in range(strips):
                            tile(packed, k0 * groups * MR + g * kn * MR, strip, (s * k_all + k0) * NR, kn,
                                 out, first * n_all + n0 + s * NR, n_all, kb > 0, min(MR, m - first))


# One build per type, the micro-kernel a global of each (specialize): a closure over it would be pickled into numba's
# cache key differently by every process, so the kernel would be compiled again (~6 s) at every start.
_product_f16 = specialize(_product_template, "product_f16", {"tile": _tile_f16}, parallel=True)
_product_bf16 = specialize(_product_template, "product_bf16", {"tile": _tile_bf16}, parallel=True)


_NO_QUADS = np.zeros((0, 0), np.uint64)
_NO_QUADS.setflags(write=False)


_buffers: dict[tuple[str, int, int], np.ndarray] = {}


def _held(kind: str, rows: int, elements: int, dtype) -> np.ndarray:
    """A (rows, >= elements) buffer of `kind`, kept and grown for the run, one per calling thread (products called
    from several threads never share one): x's panels (rows 1), the packed weight strips (a row per thread: fresh
    pages for every task cost more than the packing)."""
    key = (kind, threading.get_ident(), rows)
    held = _buffers.get(key)
    if held is None or held.shape[1] < elements:
        held = _buffers[key] = np.empty((rows, elements), dtype)
    return held


def supports(qtype: GGMLQuantizationType, n_out: int) -> bool:
    """Whether `product` takes weights of this type and row count (whole strips of NR rows)."""
    return qtype in SUPPORTED and n_out % NR == 0 and n_out > 0


def packed_elements(rows: int, n_in: int) -> int:
    """The float32 elements of x's panels (`panels`) for x of (rows, n_in)."""
    return (rows + MR - 1) // MR * MR * n_in


def task_count(n_out: int, threads: int) -> int:
    """Parallel tasks for n_out weight rows: of about NB rows each, a multiple of the thread count (so that every
    thread gets the same number of strips, give or take one; at least one task a thread, maybe empty)."""
    threads = max(1, threads)
    return threads * -(-n_out // (threads * NB))


def panels(x: np.ndarray, buffer: np.ndarray | None = None) -> np.ndarray:
    """x float32 (rows, n_in) packed for `product`, into `buffer` (float32, at least packed_elements(rows, n_in))
    or into this thread's own buffer, valid until its next `panels` or `product` without panels. The products of
    one input (q, k and v; gate and up) share one packing."""
    need = packed_elements(*x.shape)
    packed = buffer[:need] if buffer is not None else _held("panels", 1, need, np.float32)[0, :need]
    pack_rows(np.ascontiguousarray(x, dtype=np.float32), packed)
    return packed


def product(raw: np.ndarray, qtype: GGMLQuantizationType, x: np.ndarray, out: np.ndarray,
            packed: np.ndarray | None = None) -> np.ndarray:
    """out = x @ W.T for W's stored rows `raw` (uint8 [n_out, 2 n_in], F16 or BF16; n_out a multiple of NR), x
    float32 (rows, n_in), out float32 (rows, n_out). `packed`: x's panels (`panels`), else x is packed here."""
    rows, n_in = x.shape
    n_out = raw.shape[0]
    halves = raw.view(np.uint16).reshape(n_out, n_in)
    if packed is None:
        packed = panels(x)
    kernel = _product_bf16 if qtype == T.BF16 else _product_f16
    target = out if out.flags.c_contiguous else np.empty(out.shape, np.float32)
    quads = halves.view(np.uint64) if n_in % 4 == 0 and halves.ctypes.data % 8 == 0 else _NO_QUADS
    threads = get_num_threads()
    tasks = task_count(n_out, threads)
    strips = _held("strips", threads, max(-(-(n_out // NR) // tasks) * NR * n_in, NB * 4096), np.uint16)
    kernel(packed, rows, halves, quads, target, tasks, strips)
    if target is not out:
        out[...] = target
    return out
