#!/usr/bin/env python3
"""qtool against llama.cpp's tools at the size users quantize: a synthetic model with Llama-2-7B's shapes.

    python benchmarks/scale.py                                  # 7B shapes, all steps, --threads 1 and all cores
    python benchmarks/scale.py --threads 2 --steps ppl,generate # some steps, one thread count
    python benchmarks/scale.py --layers 2 --threads 2           # smoke run (2 of the 32 layers)

The model: hidden 4096, 32 layers, 32 heads, FFN 11008, the real 32000-token Llama SentencePiece vocabulary
(shared/data/vocab/ggml-vocab-llama-spm.gguf, whose metadata is Llama-2-7B's), random weights (normal, std 0.02;
norms 1). Its F16 GGUF (13.5 GB) is written once into --workdir, tensor by tensor (one tensor in memory at a
time), then quantized to Q4_K_M (by both tools: the `quantize` step) and Q8_0 (by qtool; byte-identical to
llama-quantize's, which tests/test_interop_quantize.py checks). Later runs reuse the files.

Steps (`--steps`), each qtool and llama.cpp as child processes with the same thread count, one after the other:
- quantize: F16 -> Q4_K_M, `llama-quantize` vs `qtool quantize`; the outputs must be byte-identical.
- ppl: 2 chunks of 512 tokens of wiki.test.raw on F16, Q8_0 and Q4_K_M: `llama-perplexity -c 512 --chunks 2` vs
  `qtool ppl --ctx 512 --chunks 2`; both PPLs are printed (random weights: PPL near the vocabulary size).
- imatrix: 2 chunks of groups_merged.txt on Q8_0: `llama-imatrix --no-ppl` vs `qtool imatrix`.
- generate: a 512-token prompt then 32 tokens, Q4_K_M: `llama-bench -p 512 -n 32 -r 1` vs
  `qtool generate --greedy` (its prompt-eval and eval rates); the whole-process columns are qtool's only.
With `--repeats N` the two tools of ppl, imatrix and generate alternate N times (llama, qtool, llama, qtool, ...;
generate: qtool first) and the table gives each round's ratio and the medians: on a machine whose speed drifts by
10-20 % from minute to minute (a shared VM), one pair of runs can land on either side of a target.
- kld: `qtool ppl F16 Q8_0 Q4_K_M --chunks 2` in lockstep (qtool only: peak RSS, target <= 16 GB).
- moe: a mixture-of-experts model with Qwen3-30B-A3B's shapes (hidden 2048, 32 heads / 4 KV heads of 128, 128
  experts of width 768, top-8) but --moe-layers of its 48 layers (default 4: 2.5 G parameters, 5 GB F16; each layer
  is the same work), the same vocabulary: F16 -> Q4_K_M by both tools (byte comparison), then `ppl` (2 chunks)
  side by side on the Q4_K_M.
- moe-full: the same shape with all 48 layers (--moe-full-layers) as a Q4_K_M of random blocks (18.6 GB; per-tensor
  types from llama-quantize's rules, codes random, no F16 and no quantizing): `ppl` (2 chunks) side by side.

Before each run the GGUF files it reads are read once (warm_page_cache), so both tools start from a warm page cache.
Per run: whole-process wall time, peak RSS (the child's high-water mark, file-backed pages of the memory-mapped
model included; see _measure.py), CPU % (user+sys over wall), and the ratios qtool / llama.cpp. qtool runs under
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` with --threads N; the BLAS kernel in use is printed
(threadpoolctl). llama.cpp's tools run in the environment without what importing qtool adds (clean_env).
Results are also written to WORKDIR/scale.json. Exit code 0 when every run succeeded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks._measure import BLAS_LIBRARY_PROBE, clean_env, measure, qtool_env  # noqa: E402
from tests.build_llamacpp import tool_path  # noqa: E402
from tests.conftest import SHARED  # noqa: E402

WIKI_RAW = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
CALIBRATION = SHARED / "data" / "calibration" / "groups_merged.txt"
VOCAB = SHARED / "data" / "vocab" / "ggml-vocab-llama-spm.gguf"
STEPS = ("quantize", "ppl", "imatrix", "generate", "kld", "moe", "moe-full")
# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B)
MOE_SHAPE = dict(n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_expert=128, n_expert_used=8, n_ff_exp=768,
                 n_ff=6144)
GB = 1e9


def log(msg: str = "") -> None:
    print(msg, flush=True)


# --- the model -----------------------------------------------------------------------------------------------------

def matrix(seed: int, *shape: int):
    """A loader of random weights (normal, std 0.02) from a fixed seed: one tensor in memory at a time."""
    def load() -> np.ndarray:
        w = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        w *= np.float32(0.02)
        return w
    return load


def ones(n: int):
    return lambda: np.ones(n, np.float32)


def write_model(path: Path, n_layer: int) -> None:
    """The 7B-shaped F16 GGUF, streamed tensor by tensor (random weights from a fixed seed)."""
    from gguf import GGMLQuantizationType as T, GGUFValueType as V

    from qtool.gguf_io import KV, PlannedTensor, read_gguf, write_gguf

    vocab = read_gguf(VOCAB)
    kvs = [KV(k, v.value, v.type, v.sub_type) for k, v in vocab.kv.items() if k != "general.architecture"]
    kvs = [kv if kv.key != "llama.block_count" else KV(kv.key, n_layer, V.UINT32) for kv in kvs]
    kvs = [kv if kv.key != "general.name" else KV(kv.key, f"synthetic-llama2-7b-{n_layer}L", V.STRING) for kv in kvs]
    h = {k: vocab.value(k) for k in ("llama.embedding_length", "llama.feed_forward_length", "llama.vocab_size")}
    n_embd, n_ff, n_vocab = h["llama.embedding_length"], h["llama.feed_forward_length"], h["llama.vocab_size"]

    tensors = [PlannedTensor("token_embd.weight", (n_vocab, n_embd), T.F16, matrix(1, n_vocab, n_embd))]
    for il in range(n_layer):
        p, s = f"blk.{il}.", 100 + 10 * il
        tensors += [
            PlannedTensor(p + "attn_norm.weight", (n_embd,), T.F32, ones(n_embd)),
            PlannedTensor(p + "attn_q.weight", (n_embd, n_embd), T.F16, matrix(s, n_embd, n_embd)),
            PlannedTensor(p + "attn_k.weight", (n_embd, n_embd), T.F16, matrix(s + 1, n_embd, n_embd)),
            PlannedTensor(p + "attn_v.weight", (n_embd, n_embd), T.F16, matrix(s + 2, n_embd, n_embd)),
            PlannedTensor(p + "attn_output.weight", (n_embd, n_embd), T.F16, matrix(s + 3, n_embd, n_embd)),
            PlannedTensor(p + "ffn_norm.weight", (n_embd,), T.F32, ones(n_embd)),
            PlannedTensor(p + "ffn_gate.weight", (n_ff, n_embd), T.F16, matrix(s + 4, n_ff, n_embd)),
            PlannedTensor(p + "ffn_up.weight", (n_ff, n_embd), T.F16, matrix(s + 5, n_ff, n_embd)),
            PlannedTensor(p + "ffn_down.weight", (n_embd, n_ff), T.F16, matrix(s + 6, n_embd, n_ff)),
        ]
    tensors += [PlannedTensor("output_norm.weight", (n_embd,), T.F32, ones(n_embd)),
                PlannedTensor("output.weight", (n_vocab, n_embd), T.F16, matrix(2, n_vocab, n_embd))]
    write_gguf(path, "llama", kvs, tensors)


def write_moe_model(path: Path, n_layer: int, random_blocks: str | None = None) -> None:
    """The Qwen3-30B-A3B-shaped F16 GGUF (qwen3moe), streamed tensor by tensor: experts stacked per layer.

    `random_blocks` (a file type, e.g. "Q4_K_M"): instead, every tensor in the type llama-quantize's rules give it
    for that file type (qtool's mixture, the same rules), filled with random blocks (random codes, fp16 scales
    fixed so that the weights are of the F16 model's size): the whole 48-layer model without its 61 GB F16 and
    without quantizing it."""
    from gguf import GGMLQuantizationType as T, GGUFValueType as V

    from qtool.gguf_io import KV, PlannedTensor, read_gguf, write_gguf

    vocab = read_gguf(VOCAB)
    m = MOE_SHAPE
    n_embd, hd, n_vocab = m["n_embd"], m["head_dim"], vocab.value("llama.vocab_size")
    a = "qwen3moe"
    kvs = [KV(k, v.value, v.type, v.sub_type) for k, v in vocab.kv.items() if k.startswith("tokenizer.")]
    kvs = [KV("general.name", f"synthetic-qwen3-30b-a3b-{n_layer}L", V.STRING)] + kvs + [
        KV(f"{a}.block_count", n_layer, V.UINT32), KV(f"{a}.context_length", 4096, V.UINT32),
        KV(f"{a}.embedding_length", n_embd, V.UINT32), KV(f"{a}.feed_forward_length", m["n_ff"], V.UINT32),
        KV(f"{a}.attention.head_count", m["n_head"], V.UINT32),
        KV(f"{a}.attention.head_count_kv", m["n_head_kv"], V.UINT32),
        KV(f"{a}.rope.freq_base", 1e6, V.FLOAT32), KV(f"{a}.attention.layer_norm_rms_epsilon", 1e-6, V.FLOAT32),
        KV(f"{a}.expert_count", m["n_expert"], V.UINT32), KV(f"{a}.expert_used_count", m["n_expert_used"], V.UINT32),
        KV(f"{a}.attention.key_length", hd, V.UINT32), KV(f"{a}.attention.value_length", hd, V.UINT32),
        KV(f"{a}.expert_feed_forward_length", m["n_ff_exp"], V.UINT32), KV("general.file_type", 1, V.UINT32)]

    q, kv, e, f = m["n_head"] * hd, m["n_head_kv"] * hd, m["n_expert"], m["n_ff_exp"]
    tensors = [PlannedTensor("token_embd.weight", (n_vocab, n_embd), T.F16, matrix(1, n_vocab, n_embd))]
    for il in range(n_layer):
        p, s = f"blk.{il}.", 100 + 10 * il
        tensors += [
            PlannedTensor(p + "attn_norm.weight", (n_embd,), T.F32, ones(n_embd)),
            PlannedTensor(p + "attn_q.weight", (q, n_embd), T.F16, matrix(s, q, n_embd)),
            PlannedTensor(p + "attn_k.weight", (kv, n_embd), T.F16, matrix(s + 1, kv, n_embd)),
            PlannedTensor(p + "attn_v.weight", (kv, n_embd), T.F16, matrix(s + 2, kv, n_embd)),
            PlannedTensor(p + "attn_output.weight", (n_embd, q), T.F16, matrix(s + 3, n_embd, q)),
            PlannedTensor(p + "attn_q_norm.weight", (hd,), T.F32, ones(hd)),
            PlannedTensor(p + "attn_k_norm.weight", (hd,), T.F32, ones(hd)),
            PlannedTensor(p + "ffn_norm.weight", (n_embd,), T.F32, ones(n_embd)),
            PlannedTensor(p + "ffn_gate_inp.weight", (e, n_embd), T.F32, matrix(s + 4, e, n_embd)),
            PlannedTensor(p + "ffn_gate_exps.weight", (e, f, n_embd), T.F16, matrix(s + 5, e, f, n_embd)),
            PlannedTensor(p + "ffn_up_exps.weight", (e, f, n_embd), T.F16, matrix(s + 6, e, f, n_embd)),
            PlannedTensor(p + "ffn_down_exps.weight", (e, n_embd, f), T.F16, matrix(s + 7, e, n_embd, f)),
        ]
    tensors += [PlannedTensor("output_norm.weight", (n_embd,), T.F32, ones(n_embd)),
                PlannedTensor("output.weight", (n_vocab, n_embd), T.F16, matrix(2, n_vocab, n_embd))]
    if random_blocks is not None:
        tensors, kvs = _as_random_blocks(tensors, kvs, a, n_layer, random_blocks)
    write_gguf(path, a, kvs, tensors)


# fp16 block scales of the random blocks: weights of roughly the F16 model's size (std ~0.02)
_RANDOM_SCALES = {"Q4_K": (8e-5, 6e-4), "Q5_K": (4e-5, 6e-4), "Q6_K": (2e-5,), "Q8_0": (3e-4,), "Q5_0": (2.5e-3,),
                  "Q4_0": (5e-3,)}


def _as_random_blocks(tensors, kvs, arch: str, n_layer: int, file_type: str):
    from gguf import GGUFValueType as V

    from qtool.gguf_io import KV, PlannedTensor
    from qtool.quantize import formats
    from qtool.quantize.mixtures import FileType, ModelInfo, choose_tensor_types

    m = MOE_SHAPE
    ftype = FileType[file_type]
    info = ModelInfo(arch, n_layer, m["n_head"], m["n_head_kv"], m["n_expert"])
    choices = choose_tensor_types([(t.name, t.shape, t.qtype) for t in tensors], ftype, info)
    by_name = {t.name: t for t in tensors}

    def blocks(name: str, qtype, seed: int):
        def load() -> np.ndarray:
            fmt = formats.format_for(qtype)
            shape = by_name[name].shape
            raw = np.random.default_rng(seed).integers(0, 256, (int(np.prod(shape[:-1])), fmt.row_bytes(shape[-1])),
                                                      dtype=np.uint8)
            cells = raw.reshape(raw.shape[0], -1, fmt.type_size)
            for offset, scale in zip(fmt.half_offsets, _RANDOM_SCALES[qtype.name]):
                cells[:, :, offset:offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
            return raw
        return load

    out = []
    for i, c in enumerate(choices):
        t = by_name[c.name]
        if c.target_type == t.qtype:
            out.append(t)
        else:
            out.append(PlannedTensor(c.name, t.shape, c.target_type, blocks(c.name, c.target_type, 1000 + i)))
    kvs = [kv if kv.key != "general.file_type" else KV(kv.key, int(ftype), V.UINT32) for kv in kvs]
    return out, kvs


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# --- running the tools ---------------------------------------------------------------------------------------------

@dataclass
class Result:
    step: str
    model: str
    tool: str
    threads: int
    ok: bool
    wall: float
    peak_rss: int
    cpu_pct: float
    extra: dict


def warm_page_cache(cmd: list[str]) -> None:
    """Read every GGUF the command reads (not one it writes: after -o) once, so that each tool starts with the
    model in the page cache. Otherwise whichever tool runs first would also time the disk reads (llama-bench's
    warm-up run hides them from its rates; qtool generate's prompt eval includes them)."""
    for i, arg in enumerate(cmd):
        path = Path(arg)
        if arg.endswith(".gguf") and (i == 0 or cmd[i - 1] != "-o") and path.is_file():
            with open(path, "rb", buffering=0) as f:
                buffer = bytearray(16 << 20)
                while f.readinto(buffer):
                    pass


def run(step: str, model: str, tool: str, threads: int, cmd: list[str], env: dict, parse=None) -> Result:
    warm_page_cache(cmd)
    m = measure(cmd, env)
    extra = {}
    ok = m.rc == 0
    if ok and parse is not None:
        try:
            extra = parse(m.text)
        except (AttributeError, KeyError, ValueError, json.JSONDecodeError) as e:
            ok, extra = False, {"error": f"could not parse the output: {e}"}
    if not ok:
        extra.setdefault("error", f"exit {m.rc}: {m.text[-1500:]}")
    r = Result(step, model, tool, threads, ok, m.wall, m.peak_rss, 100.0 * m.cpu / m.wall if m.wall else 0.0, extra)
    shown = {k: v for k, v in extra.items() if k != "error"}
    log(f"  {step:8s} {model:7s} {tool:6s} t={threads}: {'ok' if ok else 'FAILED'} wall {m.wall:7.1f} s  "
        f"peak RSS {m.peak_rss / GB:5.2f} GB  CPU {r.cpu_pct:4.0f} %  {shown if shown else ''}")
    if not ok:
        log("    " + extra["error"].replace("\n", "\n    "))
    return r


def qtool_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "qtool.cli", *args]


def _ppl_llama(text: str) -> dict:
    return {"ppl": float(re.search(r"Final estimate: PPL = ([\d.]+)", text).group(1))}


def _ppl_qtool(path: Path):
    def parse(text: str) -> dict:
        data = json.loads(path.read_text())
        return {"ppl": [round(m["ppl"], 4) for m in data["models"]],
                "kld": [m.get("kld_mean") for m in data["models"][1:]], "tok_s": round(data["tokens_per_second"], 2)}
    return parse


TIMING = re.compile(r"^(prompt eval|eval)\s+([\d.]+) ms /\s+(\d+) (?:tokens|runs)\s+\(\s*([\d.]+) tokens per second\)",
                    re.MULTILINE)


def _generate_qtool(text: str) -> dict:
    found = {m.group(1): (int(m.group(3)), float(m.group(4))) for m in TIMING.finditer(text)}
    return {"prompt_tokens": found["prompt eval"][0], "pp_tok_s": found["prompt eval"][1],
            "tg_tok_s": found["eval"][1], "decoded": found["eval"][0]}


def _bench_llama(text: str) -> dict:
    tests = json.loads(text[text.index("["):text.rindex("]") + 1])
    out = {}
    for t in tests:
        out["pp_tok_s" if t["n_prompt"] and not t["n_gen"] else "tg_tok_s"] = round(float(t["avg_ts"]), 3)
    return out


def prompt_of(n_tokens: int, model: Path) -> str:
    """Text from wiki.test.raw that tokenizes to n_tokens - 1 tokens (BOS makes n_tokens)."""
    from qtool.evaluate.tokenizer import Tokenizer
    from qtool.gguf_io import read_gguf

    tok = Tokenizer.from_gguf(read_gguf(model))
    ids = tok.encode(WIKI_RAW.read_text(encoding="utf-8")[:20000], add_special=False, parse_special=False)
    return tok.decode(ids[:n_tokens - 1])


def run_moe(wd: Path, n_layer: int, threads: int, chunks: int, q_env: dict, l_env: dict) -> list[Result]:
    tag = f"qwen3moe-30b-a3b-{n_layer}L"
    f16, q4 = wd / f"{tag}-F16.gguf", wd / f"{tag}-Q4_K_M.gguf"
    if not f16.exists():
        t0 = time.perf_counter()
        write_moe_model(f16, n_layer)
        log(f"wrote {f16} ({f16.stat().st_size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    t = str(threads)
    out_l = wd / f"llama-{tag}-Q4_K_M.gguf"
    q4.unlink(missing_ok=True)
    out = [run("moe quantize", "F16", "llama", threads,
               [str(tool_path("llama-quantize")), str(f16), str(out_l), "Q4_K_M", t], l_env),
           run("moe quantize", "F16", "qtool", threads,
               qtool_cmd("quantize", str(f16), str(q4), "--type", "Q4_K_M", "--threads", t), q_env)]
    same = out_l.exists() and q4.exists() and digest(out_l) == digest(q4)
    out[-1].extra["identical"] = same
    log(f"  outputs byte-identical: {same}")
    out_l.unlink(missing_ok=True)
    js = wd / f"ppl-{tag}.json"
    out.append(run("moe ppl", "Q4_K_M", "llama", threads,
                   [str(tool_path("llama-perplexity")), "-m", str(q4), "-f", str(WIKI_RAW), "-c", "512",
                    "--chunks", str(chunks), "-t", t], l_env, _ppl_llama))
    out.append(run("moe ppl", "Q4_K_M", "qtool", threads,
                   qtool_cmd("ppl", str(q4), "--dataset", str(WIKI_RAW), "--ctx", "512", "--chunks", str(chunks),
                             "--threads", t, "--json", str(js)), q_env, _ppl_qtool(js)))
    return out


def run_moe_full(wd: Path, n_layer: int, threads: int, chunks: int, q_env: dict, l_env: dict) -> list[Result]:
    """The whole Qwen3-30B-A3B shape in Q4_K_M, of random blocks (write_moe_model): ppl side by side."""
    q4 = wd / f"qwen3moe-30b-a3b-{n_layer}L-random-Q4_K_M.gguf"
    if not q4.exists():
        t0 = time.perf_counter()
        write_moe_model(q4, n_layer, random_blocks="Q4_K_M")
        log(f"wrote {q4} ({q4.stat().st_size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    t, js = str(threads), wd / f"ppl-moe-full-{n_layer}L.json"
    return [run("moe-full ppl", "Q4_K_M", "llama", threads,
                [str(tool_path("llama-perplexity")), "-m", str(q4), "-f", str(WIKI_RAW), "-c", "512",
                 "--chunks", str(chunks), "-t", t], l_env, _ppl_llama),
            run("moe-full ppl", "Q4_K_M", "qtool", threads,
                qtool_cmd("ppl", str(q4), "--dataset", str(WIKI_RAW), "--ctx", "512", "--chunks", str(chunks),
                          "--threads", t, "--json", str(js)), q_env, _ppl_qtool(js))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-scale"))
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B shape (32: the whole model)")
    ap.add_argument("--threads", default="1,all", help="comma-separated thread counts ('all': every core)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"some of {','.join(STEPS)}")
    ap.add_argument("--ppl-models", default="Q4_K_M,Q8_0,F16")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1,
                    help="ppl, imatrix, generate: rounds of both tools, one after the other (median ratios)")
    ap.add_argument("--moe-layers", type=int, default=4, help="layers of the 30B-A3B shape for the moe step (of 48)")
    ap.add_argument("--moe-full-layers", type=int, default=48,
                    help="layers of the 30B-A3B shape for the moe-full step (48: the whole model, 18.6 GB)")
    args = ap.parse_args()
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if set(steps) - set(STEPS):
        ap.error(f"unknown step(s) {sorted(set(steps) - set(STEPS))}")
    cores = len(os.sched_getaffinity(0))
    thread_counts = [cores if t.strip() == "all" else int(t) for t in args.threads.split(",")]
    for tool in ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-bench"):
        if tool_path(tool) is None:
            log(f"{tool} is not built: python tests/build_llamacpp.py")
            return 1
    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    tag = "7b" if args.layers == 32 else f"7b-{args.layers}L"
    files = {"F16": wd / f"{tag}-F16.gguf", "Q8_0": wd / f"{tag}-Q8_0.gguf", "Q4_K_M": wd / f"{tag}-Q4_K_M.gguf"}

    probe = subprocess.run([sys.executable, "-c", BLAS_LIBRARY_PROBE + "\nprint(json.dumps(out))"],
                           env=qtool_env(cores), capture_output=True, text=True, timeout=120)
    log(f"{cores} cores; load average {os.getloadavg()[0]:.2f}; numpy BLAS in qtool's environment: "
        f"{probe.stdout.strip() or probe.stderr.strip()[-300:]}")

    moe_only = not set(steps) - {"moe", "moe-full"}
    if moe_only:
        pass
    elif not files["F16"].exists():
        t0 = time.perf_counter()
        write_model(files["F16"], args.layers)
        log(f"wrote {files['F16']} ({files['F16'].stat().st_size / GB:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    env_all = qtool_env(cores)
    if not moe_only and not files["Q8_0"].exists():
        subprocess.run(qtool_cmd("quantize", str(files["F16"]), str(files["Q8_0"]), "--type", "Q8_0"),
                       env=env_all, check=True, capture_output=True, timeout=3600)
    results: list[Result] = []
    for threads in thread_counts:
        q_env, l_env = qtool_env(threads), clean_env()
        t = str(threads)
        log(f"\n--- {threads} thread(s) ---")
        if "quantize" in steps or (not files["Q4_K_M"].exists() and not moe_only):
            out_l, out_q = wd / "llama-Q4_K_M.gguf", files["Q4_K_M"]
            for p in (out_l, out_q):
                p.unlink(missing_ok=True)
            results.append(run("quantize", "F16", "llama", threads,
                               [str(tool_path("llama-quantize")), str(files["F16"]), str(out_l), "Q4_K_M", t], l_env))
            results.append(run("quantize", "F16", "qtool", threads,
                               qtool_cmd("quantize", str(files["F16"]), str(out_q), "--type", "Q4_K_M",
                                         "--threads", t), q_env))
            same = out_l.exists() and out_q.exists() and digest(out_l) == digest(out_q)
            results[-1].extra["identical"] = same
            log(f"  outputs byte-identical: {same}")
            out_l.unlink(missing_ok=True)
        if "ppl" in steps:
            for kind in [k.strip() for k in args.ppl_models.split(",") if k.strip()]:
                for _ in range(max(1, args.repeats)):
                    results.append(run("ppl", kind, "llama", threads,
                                       [str(tool_path("llama-perplexity")), "-m", str(files[kind]), "-f",
                                        str(WIKI_RAW), "-c", "512", "--chunks", str(args.chunks), "-t", t],
                                       l_env, _ppl_llama))
                    js = wd / f"ppl-{kind}.json"
                    results.append(run("ppl", kind, "qtool", threads,
                                       qtool_cmd("ppl", str(files[kind]), "--dataset", str(WIKI_RAW), "--ctx", "512",
                                                 "--chunks", str(args.chunks), "--threads", t, "--json", str(js)),
                                       q_env, _ppl_qtool(js)))
        if "imatrix" in steps:
            for _ in range(max(1, args.repeats)):
                results.append(run("imatrix", "Q8_0", "llama", threads,
                                   [str(tool_path("llama-imatrix")), "-m", str(files["Q8_0"]), "-f", str(CALIBRATION),
                                    "-c", "512", "--chunks", str(args.chunks), "-t", t, "--no-ppl",
                                    "-o", str(wd / "imatrix-llama.gguf")], l_env))
                results.append(run("imatrix", "Q8_0", "qtool", threads,
                                   qtool_cmd("imatrix", str(files["Q8_0"]), "--dataset", str(CALIBRATION), "--ctx",
                                             "512", "--chunks", str(args.chunks), "--threads", t, "--force",
                                             "-o", str(wd / "imatrix-qtool.gguf")), q_env))
        if "generate" in steps:
            prompt = prompt_of(512, files["Q4_K_M"])
            for _ in range(max(1, args.repeats)):
                q = run("generate", "Q4_K_M", "qtool", threads,
                        qtool_cmd("generate", str(files["Q4_K_M"]), "-p", prompt, "-n", "32", "--greedy",
                                  "--threads", t), q_env, _generate_qtool)
                results.append(q)
                n_prompt = q.extra.get("prompt_tokens", 512)
                results.append(run("generate", "Q4_K_M", "llama", threads,
                                   [str(tool_path("llama-bench")), "-m", str(files["Q4_K_M"]), "-p", str(n_prompt),
                                    "-n", "32", "-r", "1", "-t", t, "-o", "json"], l_env, _bench_llama))
        if "moe" in steps:
            results += run_moe(wd, args.moe_layers, threads, args.chunks, q_env, l_env)
        if "moe-full" in steps:
            results += run_moe_full(wd, args.moe_full_layers, threads, args.chunks, q_env, l_env)
        if "kld" in steps:
            js = wd / "kld.json"
            results.append(run("kld", "3 models", "qtool", threads,
                               qtool_cmd("ppl", str(files["F16"]), str(files["Q8_0"]), str(files["Q4_K_M"]),
                                         "--dataset", str(WIKI_RAW), "--ctx", "512", "--chunks", str(args.chunks),
                                         "--threads", t, "--json", str(js)), q_env, _ppl_qtool(js)))

    log("\n| step | model | threads | llama wall s | qtool wall s | wall ratio | llama RSS GB | qtool RSS GB "
        "| RSS ratio | CPU % llama/qtool | notes |")
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    pairs: dict[tuple, dict[str, Result]] = {}
    rounds: dict[tuple, list[tuple[Result, Result]]] = {}       # (qtool, llama) per round: two runs in a row
    for r in results:
        pairs.setdefault((r.step, r.model, r.threads), {})[r.tool] = r
    i = 1
    while i < len(results):
        a, b = results[i - 1], results[i]
        key = (b.step, b.model, b.threads)
        if (a.step, a.model, a.threads) == key and {a.tool, b.tool} == {"qtool", "llama"}:
            if a.ok and b.ok:
                rounds.setdefault(key, []).append((a, b) if a.tool == "qtool" else (b, a))
            i += 2
        else:
            i += 1
    for (step, model, threads), by_tool in pairs.items():
        lr, qr = by_tool.get("llama"), by_tool.get("qtool")
        if step == "generate" and (step, model, threads) in rounds:
            both = rounds[(step, model, threads)]
            parts = []
            for key, name in (("pp_tok_s", "pp"), ("tg_tok_s", "tg")):
                ours = [q.extra[key] for q, _ in both]
                theirs = [l.extra[key] for _, l in both]
                ratios = [a / b for a, b in zip(ours, theirs)]
                part = (f"{name} {float(np.median(ours)):.2f} vs {float(np.median(theirs)):.2f} tok/s "
                        f"({float(np.median(ratios)):.2f}x")
                parts.append(part + (f" median of {len(both)}: " + ", ".join(f"{x:.2f}" for x in ratios) + ")"
                                     if len(both) > 1 else ")"))
            walls = [q.wall for q, _ in both]
            log(f"| {step} | {model} | {threads} | - | {float(np.median(walls)):.1f} | - | - | "
                f"{max(q.peak_rss for q, _ in both) / GB:.2f} | - | - / {qr.cpu_pct:.0f} | {'; '.join(parts)} |")
            continue
        note = "; ".join(f"{k} {v}" for r in (lr, qr) if r for k, v in r.extra.items() if k != "error")
        if len(rounds.get((step, model, threads), [])) > 1:      # medians over the rounds, each round's ratio
            both = rounds[(step, model, threads)]
            ratios = [q.wall / l.wall for q, l in both]
            lw, qw = (float(np.median([pair[k].wall for pair in both])) for k in (1, 0))
            lm, qm = (max(pair[k].peak_rss for pair in both) for k in (1, 0))
            log(f"| {step} | {model} | {threads} | {lw:.1f} | {qw:.1f} | {float(np.median(ratios)):.2f} | "
                f"{lm / GB:.2f} | {qm / GB:.2f} | {qm / lm:.2f} | {lr.cpu_pct:.0f} / {qr.cpu_pct:.0f} | "
                f"medians of {len(both)} rounds, wall ratios " + ", ".join(f"{x:.2f}" for x in ratios)
                + f"; {note} |")
        elif lr and qr:
            log(f"| {step} | {model} | {threads} | {lr.wall:.1f} | {qr.wall:.1f} | {qr.wall / lr.wall:.2f} | "
                f"{lr.peak_rss / GB:.2f} | {qr.peak_rss / GB:.2f} | {qr.peak_rss / lr.peak_rss:.2f} | "
                f"{lr.cpu_pct:.0f} / {qr.cpu_pct:.0f} | {note} |")
        else:
            r = qr or lr
            log(f"| {step} | {model} | {threads} | - | {r.wall:.1f} | - | - | {r.peak_rss / GB:.2f} | - | "
                f"{r.cpu_pct:.0f} | {note} |")
    if len(thread_counts) > 1:
        log("\nqtool speed-up from 1 thread to the most:")
        lo, hi = min(thread_counts), max(thread_counts)
        for (step, model, threads), by_tool in pairs.items():
            if threads == lo and "qtool" in by_tool and (step, model, hi) in pairs:
                a, b = by_tool["qtool"], pairs[(step, model, hi)].get("qtool")
                if (step, model, lo) in rounds and (step, model, hi) in rounds:      # medians over the rounds
                    walls = [float(np.median([q.wall for q, _ in rounds[(step, model, n)]])) for n in (lo, hi)]
                    log(f"  {step} {model}: {walls[0] / walls[1]:.2f}x")
                elif b and a.ok and b.ok:
                    log(f"  {step} {model}: {a.wall / b.wall:.2f}x")
    (wd / "scale.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    log(f"\nload average at end: {os.getloadavg()[0]:.2f}; results in {wd / 'scale.json'}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
