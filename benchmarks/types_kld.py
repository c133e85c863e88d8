#!/usr/bin/env python3
"""What each file type costs on a real model: SmolLM2-135M-Instruct quantized by qtool to every file type it writes
(with an importance matrix from groups_merged.txt, never the evaluation text), then evaluated in one lockstep
`qtool ppl` pass against the F16 base on wiki.test.raw. Prints the README's types table.

    python benchmarks/types_kld.py                    # 20 chunks of 512 tokens, imatrix from 40 chunks
    python benchmarks/types_kld.py --chunks 4 --types Q4_K_M,IQ2_XXS

Read the table with SmolLM2's two quirks in mind: its weights sit on a Q4_1 grid (Q4_1 is lossless on it, so it is
left out), and its hidden size 576 is not a multiple of 256, so the 256-block types (K-quants, IQ2/IQ3, TQ) fall
back to 32-block types on most tensors: the "fallback" column gives the share of weights that did. On such a model
the i-quants say little about themselves; their rows measure the fallbacks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.conftest import SHARED  # noqa: E402

WIKI_RAW = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
CALIBRATION = SHARED / "data" / "calibration" / "groups_merged.txt"


def main() -> int:
    from qtool.errors import QtoolError
    from qtool.evaluate.imatrix import compute_imatrix_file
    from qtool.evaluate.perplexity import run_perplexity
    from qtool.quantize.mixtures import FileType, is_writable, list_file_types
    from qtool.quantize.quantizer import QuantizeOptions, quantize_model
    from tests.fixtures.smollm2 import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-types"))
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--imatrix-chunks", type=int, default=40)
    ap.add_argument("--types", default="", help="comma-separated file types (default: every one qtool writes)")
    args = ap.parse_args()
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    base = smollm2_gguf(wd, "F16")
    imatrix = wd / "imatrix.gguf"
    if not imatrix.exists():
        compute_imatrix_file(base, str(CALIBRATION), imatrix, n_ctx=512, n_chunks=args.imatrix_chunks)
    skip = {FileType.F16, FileType.F32, FileType.COPY, FileType.Q4_1}
    names = [n for n, f in list_file_types() if f.name == n and f not in skip and is_writable(f)]
    if args.types:
        names = [n.strip().upper() for n in args.types.split(",") if n.strip()]
    rows, paths = {}, []
    for name in names:
        ftype = FileType[name]
        out = wd / f"SmolLM2-{name}.gguf"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            report = quantize_model(base, out, QuantizeOptions(ftype, imatrix=str(imatrix)))
        except QtoolError as e:  # a type that cannot be made for this model (Q1_0: 576 is no multiple of 128)
            print(f"{name}: not made ({e})", flush=True)
            continue
        fell = sum(t.choice.n_elements for t in report.tensors if t.choice.fallback is not None)
        rows[name] = dict(bpw=report.bits_per_weight, fallback=fell / report.n_params,
                          seconds=time.perf_counter() - t0)
        paths.append(out)
        print(f"{name}: {report.bits_per_weight:.3f} bpw, {100 * fell / report.n_params:.0f}% of weights fell back, "
              f"{rows[name]['seconds']:.1f} s", flush=True)
    text = WIKI_RAW.read_text(encoding="utf-8")
    run = run_perplexity(base, paths, text, dataset_name="wiki.test.raw", n_ctx=512, n_chunks=args.chunks)
    print(f"\nSmolLM2-135M-Instruct, imatrix from {args.imatrix_chunks} chunks of groups_merged.txt, "
          f"{args.chunks} chunks of wiki.test.raw (`python benchmarks/types_kld.py`):\n")
    print("| type | bpw (whole model) | weights that fell back | PPL | ΔPPL % | mean KLD | same top-1 % |")
    print("|---|---|---|---|---|---|---|")
    print(f"| F16 (base) | 16.00 | – | {run.models[0].ppl:.4f} | – | – | – |")
    for name, m in zip(rows, run.models[1:]):
        r = rows[name]
        print(f"| {name} | {r['bpw']:.3f} | {100 * r['fallback']:.0f} % | {m.ppl:.4f} | {m.delta_ppl_pct:+.2f} | "
              f"{m.kld_mean:.5f} | {m.same_top1_pct:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
