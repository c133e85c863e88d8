"""Greedy `qtool generate` against llama.cpp's greedy decoding on a real model: SmolLM2-135M-Instruct as F16 (from
the shipped Q4_1) and as Q8_0 (llama-quantize of that F16), three prompts, the first 32 tokens.

llama.cpp's side is `llama-completion` (tools/completion, the classic llama-cli), run with `--temp 0`: its
default chain then keeps only the best logit, i.e. greedy. It prints the generated tokens' pieces (special tokens
as empty text) and nothing else on stdout (`--no-display-prompt`; logs go to stderr), so the comparison is on the
bytes of the 32 pieces, plus the count of tokens llama.cpp sampled (its "eval ... runs" timing line). Equal bytes
from two different token sequences would need the greedy paths to split the same text differently at the same
place, which does not happen by accident over 32 steps; a real divergence shows as different text.

`--no-repack` keeps llama.cpp off its AMX / repacked weight buffers: on CPUs with AMX_INT8 the Q8_0 file
segfaults in ggml's AMX matmul otherwise (ggml-org/llama.cpp#20824); the plain CPU kernels compute the same products.

The numbers are not bit-identical (llama.cpp runs F16 weights with F16 activations and Q8_0 with Q8_0
activations; qtool computes in float32), so greedy paths may split where two logits are nearly tied. The failure
message then names the step, both candidates and their logit gap in our float32 logits.
"""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from qtool.evaluate.generate import Sampler, SamplingParams, decode_steps, prompt_tokens
from qtool.evaluate.model import Model
from qtool.evaluate.tokenizer import Tokenizer
from qtool.evaluate.weights import GGUFWeights
from tests.interop import need_tool, smollm2_files, unavailable

pytestmark = [pytest.mark.interop, pytest.mark.slow]

N_TOKENS = 32
THREADS = 2
PROMPTS = ["The meaning of life and the universe is",
           "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return smollm2_files(tmp_path_factory.mktemp("smollm2"), ("F16", "Q8_0"))


def llama_greedy(model_path, prompt: str) -> tuple[bytes, int, bool]:
    """(bytes of the generated pieces, tokens sampled, stopped at end of generation) from llama-completion."""
    exe = need_tool("llama-completion")
    proc = subprocess.run([str(exe), "-m", str(model_path), "-p", prompt, "-n", str(N_TOKENS), "--temp", "0",
                           "--seed", "1", "-t", str(THREADS), "-c", "512", "-no-cnv", "--no-display-prompt",
                           "--no-warmup", "--no-repack"], capture_output=True, timeout=1800)
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr[-3000:]
    text = proc.stdout
    assert text.endswith(b"\n\n"), text[-100:]      # completion.cpp ends its output with "\n\n"
    text = text[:-2]
    eog = text.endswith(b" [end of text]\n")
    if eog:
        text = text[:-len(b" [end of text]\n")]
    runs = re.search(r"\beval time =.*?/\s*(\d+) runs", stderr)
    assert runs, stderr[-2000:]
    # one token is sampled from the prompt's logits, then one per decode run
    return text, int(runs.group(1)) + 1, eog


def divergence(tok: Tokenizer, steps, theirs: bytes) -> str:
    """Where our greedy path leaves llama.cpp's text, and how close llama.cpp's candidates were in our logits.

    llama.cpp's token at that step is one whose piece starts the rest of its text; every such token among our
    top 50 is listed with its rank and its logit gap to our choice.
    """
    done = b""
    for k, step in enumerate(steps):
        piece = tok.token_piece(step.token, special=False)
        if theirs.startswith(done + piece):
            done += piece
            continue
        rest = theirs[len(done):]
        order = np.argsort(-step.logits)
        theirs_could_be = []
        for rank, t in enumerate(order[:50].tolist(), start=1):
            p = tok.token_piece(t, special=False)
            if p and rest.startswith(p):
                theirs_could_be.append(f"{p!r} (id {t}, rank {rank}, gap {step.logits[step.token] - step.logits[t]:.4f})")
        return (f"step {k}: ours {piece!r} (id {step.token}, logit {step.logits[step.token]:.4f}); llama.cpp's text "
                f"goes on {rest[:30]!r}; its token is one of: {', '.join(theirs_could_be) or 'none of our top 50'}")
    return f"ours is a prefix of llama.cpp's text, which goes on with {theirs[len(done):][:40]!r}"


@pytest.mark.parametrize("kind", ["F16", "Q8_0"])
def test_greedy_tokens_equal_llama_cpp(smollm2, kind):
    path = smollm2[kind]
    weights = GGUFWeights(path)
    tok = Tokenizer.from_gguf(weights.gguf)
    model = Model(weights)
    failures = []
    for prompt in PROMPTS:
        ids = prompt_tokens(tok, prompt, None)
        steps = list(decode_steps(model, ids, Sampler(SamplingParams(temperature=0.0)), N_TOKENS, tok.eot_ids))
        tokens = [s.token for s in steps if s.token not in tok.eot_ids]
        ours = b"".join(tok.token_piece(t, special=False) for t in tokens)
        theirs, n_sampled, eog = llama_greedy(path, prompt)
        if ours != theirs or len(steps) != n_sampled:
            failures.append(f"{prompt!r}: {divergence(tok, steps, theirs)} (ours {len(steps)} tokens, "
                            f"llama.cpp {n_sampled})")
            continue
        # the acceptance asks for 32 tokens: a prompt that ends early would test less
        assert len(tokens) == N_TOKENS and not eog, f"{prompt!r} stopped after {len(tokens)} tokens"
    assert not failures, "\n".join(failures)


def test_llama_rng_matches_libstdcxx(tmp_path):
    """LlamaRng's uniform draws equal std::uniform_real_distribution<double>(0, 1) over std::mt19937, compiled here."""
    from shutil import which

    from qtool.evaluate.generate import LlamaRng

    cxx = which("c++") or which("g++")
    if cxx is None:
        unavailable("no C++ compiler")
    src = tmp_path / "draws.cpp"
    src.write_text("#include <cstdio>\n#include <random>\nint main() {\n"
                   "  for (unsigned seed : {0u, 1u, 42u, 4294967295u}) {\n"
                   "    std::mt19937 rng(seed); std::uniform_real_distribution<double> u(0.0, 1.0);\n"
                   "    for (int i = 0; i < 1000; i++) std::printf(\"%.17g\\n\", u(rng));\n  }\n}\n")
    exe = tmp_path / "draws"
    subprocess.run([cxx, "-O1", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=300)
    theirs = [float(x) for x in subprocess.run([str(exe)], check=True, capture_output=True, text=True,
                                                timeout=300).stdout.split()]
    ours = []
    for seed in (0, 1, 42, 2**32 - 1):
        rng = LlamaRng(seed)
        ours += [rng.uniform() for _ in range(1000)]
    assert ours == theirs
