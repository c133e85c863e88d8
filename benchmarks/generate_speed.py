"""Side-by-side benchmark: ``qtool generate`` prefill and decode tokens/s against llama.cpp's ``llama-bench``.

Same GGUF files (SmolLM2-135M-Instruct F16, and Q8_0 / Q4_K_M made by llama-quantize; tests/fixtures/smollm2.py),
same threads. qtool: `qtool generate --greedy` on a prompt of the first lines of wiki.test.raw, its own timings
(`prompt eval` = prefill of the whole prompt in one batch, `eval` = one token at a time with the KV cache).
llama.cpp: `llama-bench -p N -n M` with N = qtool's prompt token count and M = the tokens qtool generated
(`pp` and `tg` tests; llama-bench uses random tokens, which costs the same). Prints both and the ratios.

llama-bench's `tg` decodes from an empty context, while qtool's decoding after its N-token prompt attends to N more
positions at each token. So each decode speed is compared like for like, at two depths: qtool's decoding after a
one-word prompt (`--short-prompt`, "tg@0" in the table) against llama-bench's plain `tg`, and qtool's decoding after
the N-token prompt ("tg@N") against `llama-bench -p 0 -n M -d N` (`tg` at depth N).
The numpy side runs without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (see benchmarks/README.md).

    python benchmarks/generate_speed.py                       # F16, Q8_0, Q4_K_M; 64 new tokens; 2 threads
    python benchmarks/generate_speed.py --kinds F16 -n 32     # quick
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks._measure import clean_env, qtool_env, run_measured  # noqa: E402
from tests.build_llamacpp import tool_path  # noqa: E402
from tests.conftest import SHARED  # noqa: E402
from tests.fixtures.smollm2 import smollm2_gguf  # noqa: E402

WIKI_RAW = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
TIMING = re.compile(r"^(prompt eval|eval)\s+([\d.]+) ms /\s+(\d+) (?:tokens|runs)\s+\(\s*([\d.]+) tokens per second\)",
                    re.MULTILINE)


def prompt_text(n_lines: int) -> str:
    lines = [l for l in WIKI_RAW.read_text(encoding="utf-8").splitlines() if l.strip()]
    return "\n".join(lines[:n_lines])


def run_qtool(model: Path, prompt: str, n_gen: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "qtool.cli", "generate", str(model), "-p", prompt, "-n", str(n_gen), "--greedy"]
    rc, wall, rss, text = run_measured(cmd, qtool_env(threads))
    if rc != 0:
        raise SystemExit(f"qtool generate failed ({rc}):\n{text[-2000:]}")
    found = {m.group(1): (int(m.group(3)), float(m.group(4))) for m in TIMING.finditer(text)}
    if set(found) != {"prompt eval", "eval"}:
        raise SystemExit(f"no timings in qtool's output:\n{text[-2000:]}")
    return {"prompt_tokens": found["prompt eval"][0], "pp": found["prompt eval"][1],
            "gen_tokens": found["eval"][0] + 1, "tg": found["eval"][1], "wall": wall, "rss": rss}


def run_llamacpp(model: Path, n_prompt: int, n_gen: int, threads: int, repeats: int) -> dict:
    exe = tool_path("llama-bench")
    result: dict[str, float] = {}
    for repack in ("1", "0"):
        proc = subprocess.run([str(exe), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
                               "-r", str(repeats), "--repack", repack, "-o", "json"], capture_output=True, text=True,
                              env=clean_env())
        if proc.returncode == 0:
            for test in json.loads(proc.stdout):
                key = "pp" if test["n_prompt"] and not test["n_gen"] else "tg"
                result[key] = float(test["avg_ts"])
            result["repack"] = repack == "1"
            deep = subprocess.run([str(exe), "-m", str(model), "-p", "0", "-n", str(n_gen), "-d", str(n_prompt),
                                   "-t", str(threads), "-r", str(repeats), "--repack", repack, "-o", "json"],
                                  capture_output=True, text=True, env=clean_env())
            if deep.returncode != 0:
                raise SystemExit(f"llama-bench -d failed on {model.name}:\n{deep.stderr[-2000:]}")
            result["tg_depth"] = float(json.loads(deep.stdout)[0]["avg_ts"])
            return result
    raise SystemExit(f"llama-bench failed on {model.name}:\n{proc.stderr[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="F16,Q8_0,Q4_K_M")
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("--prompt-lines", type=int, default=6, help="first non-empty lines of wiki.test.raw")
    ap.add_argument("--short-prompt", default="The", help="the prompt of the decode-from-empty run (tg@0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="llama-bench -r")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-bench-ppl"))
    args = ap.parse_args()
    if tool_path("llama-bench") is None or tool_path("llama-quantize") is None:
        print("llama.cpp tools are not built: python tests/build_llamacpp.py")
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    prompt = prompt_text(args.prompt_lines)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; {args.threads} threads")
    rows = []
    for kind in [k.strip().upper() for k in args.kinds.split(",") if k.strip()]:
        model = smollm2_gguf(args.workdir, kind)
        q = run_qtool(model, prompt, args.n_gen, args.threads)
        short = run_qtool(model, args.short_prompt, q["gen_tokens"], args.threads)
        if short["gen_tokens"] != q["gen_tokens"]:
            raise SystemExit(f"qtool stopped after {short['gen_tokens']} tokens on {args.short_prompt!r} "
                             f"(an end-of-generation token): choose another --short-prompt")
        lc = run_llamacpp(model, q["prompt_tokens"], q["gen_tokens"], args.threads, args.repeats)
        rows.append((kind, q, short, lc))
        print(f"  {kind}: prompt {q['prompt_tokens']} tokens, generated {q['gen_tokens']}; qtool pp {q['pp']:.1f} "
              f"tg@0 {short['tg']:.1f} tg@N {q['tg']:.1f} t/s; llama.cpp pp {lc['pp']:.1f} tg {lc['tg']:.1f} "
              f"tg@N {lc['tg_depth']:.1f} t/s{'' if lc['repack'] else ' (--repack 0)'}", flush=True)
    print()
    print(f"N = the prompt's tokens; tg@0: qtool after {args.short_prompt!r} "
          f"({rows[0][2]['prompt_tokens'] if rows else '?'} tokens) against llama-bench's plain tg")
    print(f"{'model':8s} {'N':>4s} {'qtool pp':>9s} {'llama pp':>9s} {'ratio':>6s} {'qtool tg@0':>11s} "
          f"{'llama tg':>9s} {'ratio':>6s} {'qtool tg@N':>11s} {'llama tg@N':>11s} {'ratio':>6s}   (tokens/s)")
    for kind, q, short, lc in rows:
        print(f"{kind:8s} {q['prompt_tokens']:4d} {q['pp']:9.1f} {lc['pp']:9.1f} {q['pp'] / lc['pp']:6.2f} "
              f"{short['tg']:11.1f} {lc['tg']:9.1f} {short['tg'] / lc['tg']:6.2f} {q['tg']:11.1f} "
              f"{lc['tg_depth']:11.1f} {q['tg'] / lc['tg_depth']:6.2f}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
