#!/usr/bin/env python3
"""Decoding speed of the block types on one Llama-2-7B FFN matrix (11008 x 4096): qtool's parallel decoders
(formats.decode) against gguf-py's numpy dequantize, the decoder the evaluation used before. An inner-loop rate
(seconds per matrix, best of --repeats), not a whole-process ratio; the outputs are checked equal bit for bit.

    python benchmarks/decode_speed.py [--repeats 3]
        [--types Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS,BF16]
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,IQ4_NL,IQ4_XS,BF16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import gguf
    import numba

    from qtool.quantize import formats

    print(f"cores {os.cpu_count()}, numba threads {numba.get_num_threads()}")
    x = np.random.default_rng(0).standard_normal((11008, 4096)).astype(np.float32)
    out = np.empty_like(x)
    for name in args.types.split(","):
        qtype = gguf.GGMLQuantizationType[name]
        raw = np.ascontiguousarray(formats.quantize(x, qtype))
        formats.decode(raw[:4], qtype, 4096)                       # kernel loaded (compiled once, cached)
        ref = best(lambda: gguf.quants.dequantize(raw, qtype), args.repeats)
        ours = best(lambda: formats.decode(raw, qtype, 4096, out=out), args.repeats)
        same = np.array_equal(np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(out.shape), out)
        print(f"{name:6s} gguf-py {ref:6.3f} s   qtool {ours:6.3f} s   {ref / ours:5.1f}x faster   identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
