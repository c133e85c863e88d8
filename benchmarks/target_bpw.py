"""`--target-bpw` against llama.cpp's hand-written mixes on SmolLM2-135M (issue 8's measurement).

    nice -n 5 python benchmarks/target_bpw.py [--workdir DIR] [--chunks 50] [--calib-chunks 1] [--calib-ctx 512]
                                              [--imatrix-chunks N]

1. F16 from the shipped Q4_1 (tests/fixtures/smollm2.py, as the interop tests make it);
2. one imatrix, `qtool imatrix` on calibration/groups_merged.txt (never on WikiText), used by both sides;
3. llama.cpp's Q4_K_M, Q3_K_M and Q2_K made by qtool quantize (byte-identical to llama-quantize; see
   tests/test_interop_quantize.py) with that imatrix;
4. one sensitivity measurement (calibration: groups_merged.txt), candidates = the defaults without Q4_1 (this
   base's weights sit on a Q4_1 grid, so Q4_1 would be lossless here for the wrong reason);
5. for each llama.cpp mix, the --target-bpw mix at that mix's bits per weight (its file size, within 1%);
   (--exclude Q4_1,Q5_1 also leaves out Q5_1, whose grid contains every Q4_1 grid at half the step: on this base
   its measured error is exactly 0 on every 32-column block tensor, the same artefact);
6. `qtool ppl`'s run_perplexity on WikiText-2 test, all seven models in lockstep: mean KLD, ΔPPL, same top-1.

Prints the table (Markdown) and writes it, with the raw numbers, to DIR/target_bpw.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path("/work/shared")
CALIBRATION = SHARED / "data" / "calibration" / "groups_merged.txt"
WIKITEXT = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
LLAMA_MIXES = ("Q4_K_M", "Q3_K_M", "Q2_K")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-target-bpw"))
    ap.add_argument("--chunks", type=int, default=50, help="WikiText-2 chunks of 512 tokens")
    ap.add_argument("--calib-chunks", type=int, default=1, help="calibration chunks for the sensitivity")
    ap.add_argument("--calib-ctx", type=int, default=512, help="tokens per calibration chunk")
    ap.add_argument("--imatrix-chunks", type=int, default=None, help="imatrix chunks (default: the whole text)")
    ap.add_argument("--exclude", default="Q4_1", help="candidates left out of the choice (default: Q4_1)")
    args = ap.parse_args()

    from gguf import GGMLQuantizationType as T

    from qtool.evaluate.datasets import load_eval_text
    from qtool.evaluate.imatrix import compute_imatrix_file
    from qtool.evaluate.perplexity import run_perplexity
    from qtool.quantize.mix import DEFAULT_CANDIDATES, parse_candidates, write_mix
    from qtool.quantize.mixtures import FileType
    from qtool.quantize.quantizer import QuantizeOptions, quantize_model
    from qtool.sensitivity import choose_mix, measure_sensitivity, mix_rows
    from tests.fixtures.smollm2 import smollm2_gguf

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    f16 = smollm2_gguf(work, "F16")
    imatrix = work / "imatrix-groups_merged.gguf"
    if not imatrix.is_file():
        log("imatrix on groups_merged.txt")
        compute_imatrix_file(f16, str(CALIBRATION), imatrix, n_ctx=512, n_chunks=args.imatrix_chunks)

    theirs: dict[str, tuple[Path, float]] = {}
    for name in LLAMA_MIXES:
        path = work / f"SmolLM2-135M-{name}.gguf"
        report = quantize_model(f16, path, QuantizeOptions(FileType[name], imatrix=imatrix, force=True))
        theirs[name] = (path, report.bits_per_weight)
        log(f"{name}: {report.bits_per_weight:.4f} bpw")

    candidates = [t for t in DEFAULT_CANDIDATES if t != T.Q4_1]
    log(f"sensitivity: candidates {','.join(t.name for t in candidates)}, {args.calib_chunks} chunk(s) of "
        f"{args.calib_ctx} tokens")
    # the measurement is kept, so a rerun (e.g. with more evaluation chunks) does not repeat it
    cache = work / f"sensitivity-{args.calib_chunks}x{args.calib_ctx}.pickle"
    if cache.is_file():
        sens, sens_seconds = pickle.loads(cache.read_bytes())
        log(f"sensitivity: reused {cache}")
    else:
        t0 = time.perf_counter()
        sens = measure_sensitivity(f16, imatrix=imatrix, calibration=str(CALIBRATION), candidates=candidates,
                                   n_chunks=args.calib_chunks, n_ctx=args.calib_ctx)
        sens_seconds = time.perf_counter() - t0
        cache.write_bytes(pickle.dumps((sens, sens_seconds)))
    log(f"sensitivity: {sens_seconds:.0f} s (errors {sens.error_seconds:.0f} s, gains {sens.gain_seconds:.0f} s)")

    # measured once with every default candidate but Q4_1; further exclusions only narrow the choice
    excluded = set(parse_candidates(args.exclude))
    sens = sens.restricted([t for t in candidates if t not in excluded])
    candidates = sens.candidates
    log(f"choosing among {','.join(t.name for t in candidates)}")

    ours: dict[str, tuple[Path, float, float]] = {}
    for name, (_, bpw) in theirs.items():
        choice = choose_mix(sens, bpw)
        mix = choice.mix_file()
        path = work / f"SmolLM2-135M-target-{name}-without-{'-'.join(sorted(t.name for t in excluded))}.gguf"
        write_mix(mix, path.with_suffix(".mix.toml"), force=True)
        report = quantize_model(f16, path, QuantizeOptions(choice.file_type, imatrix=imatrix, force=True,
                                                           tensor_type_map=choice.types))
        ours[name] = (path, report.bits_per_weight, choice.predicted_kld)
        log(f"target {bpw:.4f}: {report.bits_per_weight:.4f} bpw, predicted KLD {choice.predicted_kld:.5f}")
        for cls, row in mix_rows(choice.types):
            log(f"    {cls:12s} {row}")

    variants = [p for name in LLAMA_MIXES for p in (theirs[name][0], ours[name][0])]
    log(f"perplexity: F16 + {len(variants)} variants, {args.chunks} chunks of WikiText-2")
    text = load_eval_text(str(WIKITEXT))
    labels = ["F16"] + [f"{side}{name}" for name in LLAMA_MIXES for side in ("", "target@")]

    def progress(p) -> None:
        log(f"  {p.chunks_done}/{p.n_chunks} chunks, running PPL: "
            + ", ".join(f"{label} {x:.3f}" for label, x in zip(labels, p.running_ppl)))

    run = run_perplexity(f16, variants, text.text, dataset_name=text.name, n_chunks=args.chunks, progress=progress)
    log(f"perplexity: {run.wall_seconds:.0f} s for {len(variants) + 1} models")
    per_model = run.wall_seconds / (len(variants) + 1)
    by_path = {m.path: m for m in run.models}
    base = run.models[0]

    rows = []
    for name in LLAMA_MIXES:
        for side, path, pred in ((f"llama.cpp {name}", theirs[name][0], None),
                                 (f"--target-bpw at {name}", ours[name][0], ours[name][2])):
            m = by_path[str(path)]
            rows.append({"model": side, "size_bytes": path.stat().st_size, "bpw": m.bpw, "kld_mean": m.kld_mean,
                         "kld_err": m.kld_err, "delta_ppl": m.delta_ppl, "delta_ppl_pct": m.delta_ppl_pct,
                         "same_top1_pct": m.same_top1_pct, "predicted_kld": pred})
    lines = [f"SmolLM2-135M-Instruct (F16 from the shipped Q4_1), WikiText-2 test, {run.n_chunks} chunks × 512, "
             f"base PPL {base.ppl:.4f}; imatrix and sensitivity on groups_merged.txt; candidates "
             f"{','.join(t.name for t in candidates)}", "",
             "| model | size MB | bpw | mean KLD | ΔPPL | same top-1 % | predicted KLD | KLD vs llama.cpp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rows):
        versus = ""
        if i % 2:
            ref = rows[i - 1]
            versus = f"{100 * (r['kld_mean'] / ref['kld_mean'] - 1):+.1f} %"
        size_note = "" if i % 2 == 0 else f" ({100 * (r['size_bytes'] / rows[i - 1]['size_bytes'] - 1):+.2f} %)"
        lines.append(f"| {r['model']} | {r['size_bytes'] / 1e6:.2f}{size_note} | {r['bpw']:.4f} | "
                     f"{r['kld_mean']:.5f} ± {r['kld_err']:.5f} | {r['delta_ppl']:+.4f} ({r['delta_ppl_pct']:+.2f} %) | "
                     f"{r['same_top1_pct']:.2f} | {'' if r['predicted_kld'] is None else format(r['predicted_kld'], '.5f')} "
                     f"| {versus} |")
    lines += ["", f"sensitivity measurement: {sens_seconds:.0f} s (quantization errors {sens.error_seconds:.0f} s, "
                  f"gains {sens.gain_seconds:.0f} s: {len(sens.tensors)} forward passes of {sens.calibration_tokens} "
                  f"tokens); one perplexity run of one model over these {run.n_chunks} chunks: {per_model:.0f} s "
                  f"(the lockstep run's {run.wall_seconds:.0f} s / {len(variants) + 1} models)"]
    table = "\n".join(lines)
    print(table)
    stem = f"target_bpw-without-{'-'.join(sorted(t.name for t in excluded))}"
    (work / f"{stem}.md").write_text(table + "\n")
    (work / f"{stem}.json").write_text(json.dumps({"rows": rows, "sensitivity_seconds": sens_seconds,
                                                      "error_seconds": sens.error_seconds,
                                                      "gain_seconds": sens.gain_seconds,
                                                      "ppl_wall_seconds": run.wall_seconds,
                                                      "n_chunks": run.n_chunks, "base_ppl": base.ppl}, indent=1))


if __name__ == "__main__":
    main()
