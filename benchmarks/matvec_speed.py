#!/usr/bin/env python3
"""Mat-vec speed (one token's product: B=1 row of x, or --rows) of qtool.evaluate.matvec against decode-then-BLAS:
for an 11008x4096 (Llama-2-7B FFN) and a 4096x4096 matrix of each type, seconds per product (best of --repeats
after a warm-up), as GB/s of stored bytes read and weights per second. The reference column is what
GGUFWeights.matmul does for types without a kernel: formats.decode into a float32 buffer, then np.matmul (F32:
np.matmul on the stored values). Results are checked against that reference (max error over the float32 bound
sum |x| |W|). For the K-quants with one row of x, a last column times qtool.evaluate.qdot (integer products with the
row's Q8_K codes, what decoding uses) against the float kernel.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/matvec_speed.py [--types Q4_K,Q6_K] [--repeats 5]
    python benchmarks/matvec_speed.py --crossover        # serial vs parallel time on small matrices

The 4096x4096 matrices of the 4-5 bit types fit in this machine's last-level cache; the 11008x4096 ones are the
closer picture of a model, whose weights never do.
"""
from __future__ import annotations

import argparse
import os
import time

import qtool  # noqa: F401  first: its OpenBLAS/OpenMP thread settings must precede numpy (else idle BLAS threads
#                            spin after every reference product and steal the cores from the next kernel call)
import numpy as np

TYPES = "F16,BF16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K"
SHAPES = ((11008, 4096), (4096, 4096))


def best(fn, repeats: int) -> float:
    fn()                                            # warm-up (compile or cache load, page faults)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def speed(args) -> int:
    import numba
    from gguf import GGMLQuantizationType as T

    from qtool.evaluate import matvec, qdot
    from qtool.quantize import formats

    print(f"cores {os.cpu_count()}, numba threads {numba.get_num_threads()} ({numba.threading_layer()}), "
          f"B = {args.rows} row(s) of x")
    rng = np.random.default_rng(0)
    n_rows = max(s[0] for s in SHAPES)
    n_in = SHAPES[0][1]
    w = (rng.standard_normal((n_rows, n_in)) * np.exp(rng.uniform(-2, 2, (n_rows, 1)))).astype(np.float32)
    x = rng.standard_normal((args.rows, n_in)).astype(np.float32)
    buffer = np.empty((n_rows, n_in), np.float32)
    print(f"{'type':5s} {'shape':>10s} {'MB':>6s} | {'matvec ms':>9s} {'GB/s':>6s} {'Gw/s':>6s} | "
          f"{'decode+matmul ms':>16s} {'GB/s':>6s} | {'speedup':>7s} {'max err/bound':>13s} | {'qdot ms':>7s} "
          f"{'GB/s':>6s} {'vs matvec':>9s}")
    names = ["F32"] + args.types.split(",")
    for name in names:
        qtype = T[name]
        full = np.ascontiguousarray(formats.quantize(w, qtype))
        full.setflags(write=False)                  # as a memory-mapped GGUF tensor is
        kernel = matvec.kernel_for(qtype)
        for n_out, _ in SHAPES:
            raw = full[:n_out]
            out = np.empty((args.rows, n_out), np.float32)
            ref_out = np.empty((args.rows, n_out), np.float32)
            tile = buffer[:n_out]

            def reference():
                dense = formats.decode(raw, qtype, n_in, out=None if qtype == T.F32 else tile)
                np.matmul(x, dense.T, out=ref_out)

            line = f"{name:5s} {n_out:5d}x{n_in:<4d} {raw.nbytes / 1e6:6.1f} | "
            if kernel is None:
                line += f"{'-':>9s} {'-':>6s} {'-':>6s} | "
            else:
                t = best(lambda: kernel(raw, x, out), args.repeats)
                line += f"{t * 1e3:9.3f} {raw.nbytes / t / 1e9:6.2f} {n_out * n_in / t / 1e9:6.2f} | "
            t_ref = best(reference, args.repeats)
            line += f"{t_ref * 1e3:16.3f} {raw.nbytes / t_ref / 1e9:6.2f} | "
            if kernel is not None:
                dense = formats.decode(raw, qtype, n_in).astype(np.float64)
                exact = x.astype(np.float64) @ dense.T
                bound = np.abs(x).astype(np.float64) @ np.abs(dense).T
                line += f"{t_ref / t:6.1f}x {np.max(np.abs(out - exact) / bound):13.1e}"
            integer = qdot.kernel_for(qtype)
            if integer is not None and args.rows == 1:
                act = qdot.quantize_q8_k(x[0])
                t_int = best(lambda: integer(raw, act, out), args.repeats)
                line += f" | {t_int * 1e3:7.3f} {raw.nbytes / t_int / 1e9:6.2f} {t / t_int:8.2f}x"
            print(line, flush=True)
    return 0


def crossover(args) -> int:
    """Serial vs parallel variant of each kernel on small square-ish matrices: where the threads start to pay."""
    import numba
    from gguf import GGMLQuantizationType as T

    from qtool.evaluate import matvec
    from qtool.quantize import formats

    print(f"numba threads {numba.get_num_threads()}; microseconds per product, best of {args.repeats * 20}")
    rng = np.random.default_rng(0)
    for name in args.types.split(","):
        qtype = T[name]
        par, ser = matvec._variants(qtype)
        for n_out, n_in in ((64, 256), (128, 512), (256, 512), (256, 1024), (512, 1024), (576, 1536), (1024, 1024),
                            (1536, 1536), (2048, 2048)):
            raw = np.ascontiguousarray(formats.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), qtype))
            raw.setflags(write=False)
            x = rng.standard_normal((1, n_in)).astype(np.float32)
            out = np.empty((1, n_out), np.float32)
            group = matvec._row_group(n_out, 1)
            t_par = best(lambda: par[0](raw, x, out, group), args.repeats * 20)
            t_ser = best(lambda: ser[0](raw, x, out, group), args.repeats * 20)
            print(f"{name:5s} {n_out:5d}x{n_in:<5d} {n_out * n_in:9d} weights: serial {t_ser * 1e6:8.1f}  "
                  f"parallel {t_par * 1e6:8.1f}  {'parallel' if t_par < t_ser else 'serial'} wins")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=TYPES)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (B, 1..4)")
    ap.add_argument("--crossover", action="store_true", help="time serial against parallel kernels on small matrices")
    args = ap.parse_args()
    return crossover(args) if args.crossover else speed(args)


if __name__ == "__main__":
    raise SystemExit(main())
