"""Kernel throughput: ``python -m qtool.quantize.kernels.bench [--rows 4096] [--cols 4096] [--threads 1 2] [TYPE ...]``.

Prints MB/s of float32 input per type (best of --repeat runs, compile excluded), with and without an imatrix.
``--gguf`` adds gguf-py's numpy quantizers where they exist; ``--ggml`` (run from the repository root, needs
tests/ggml_ref.py's library) adds llama.cpp's own single-threaded ``ggml_quantize_chunk`` on the same data.
"""

from __future__ import annotations

import argparse
import time

import gguf
import numba
import numpy as np

from qtool.quantize.formats import FORMATS, format_for

GGUF_NUMPY = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"}


def _best_seconds(run, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="GGML type names (default: every type in the table)")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gguf", action="store_true", help="also time gguf-py's numpy quantizers")
    parser.add_argument("--ggml", action="store_true", help="also time llama.cpp's C (tests/ggml_ref.py)")
    args = parser.parse_args()
    ggml = None
    if args.ggml:
        from tests import ggml_ref as ggml  # a development tool: only from a repository checkout

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.cols), dtype=np.float32)
    imatrix = rng.uniform(0.1, 2.0, args.cols).astype(np.float32)
    megabytes = x.nbytes / 1e6
    names = args.types or [f.name for f in FORMATS.values()]
    print(f"input {args.rows}x{args.cols} float32 = {megabytes:.0f} MB; MB/s of input, best of {args.repeat}")
    header = "type     " + "".join(f"{'t=' + str(t):>10}{'t=' + str(t) + '+im':>12}" for t in args.threads)
    print(header + ("   gguf-numpy" if args.gguf else "") + ("      C t=1   C t=1+im" if ggml else ""))
    for name in names:
        fmt = format_for(name)
        try:
            fmt.quantize(x[:2], imatrix)  # compile or load the cached kernel outside the timing
        except Exception as exc:  # noqa: BLE001 - a missing kernel module is reported, not fatal
            print(f"{fmt.name:8s} unavailable: {exc}")
            continue
        cells = []
        for threads in args.threads:
            numba.set_num_threads(threads)
            for weights in (None, imatrix):
                seconds = _best_seconds(lambda: fmt.quantize(x, weights), args.repeat)
                cells.append(f"{megabytes / seconds:{10 if weights is None else 12}.0f}")
        line = f"{fmt.name:8s}" + "".join(cells)
        if args.gguf and fmt.name in GGUF_NUMPY:
            seconds = _best_seconds(lambda: gguf.quants.quantize(x, fmt.qtype), 1)
            line += f"{megabytes / seconds:13.0f}"
        elif args.gguf:
            line += " " * 13
        if ggml:
            for weights in (None, imatrix):
                seconds = _best_seconds(lambda: ggml.ggml_quantize(fmt.qtype, x, weights), args.repeat)
                line += f"{megabytes / seconds:{11 if weights is None else 11}.0f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
