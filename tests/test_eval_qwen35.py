"""Evaluation of the Qwen3.5 hybrids (Gated DeltaNet layers + gated full attention; qwen35 dense, qwen35moe routed):
the delta-rule kernel against a plain reference, the MTP layer left out, prefill against decoding, the whole pass
against transformers, and ppl / greedy generation / imatrix against llama.cpp's tools, on the tiny checkpoints of
tests/fixtures/checkpoints.py converted by qtool."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from qtool.cli import main
from qtool.evaluate.deltanet import gated_delta_rule_
from qtool.evaluate.model import KVCache, Model
from qtool.evaluate.weights import GGUFWeights
from tests.interop import LLAMA_FLOAT32, need_tool
from tests.test_eval_model import gguf_of, random_tokens  # noqa: F401  (gguf_of: the session fixture)
from tests.test_eval_moe import CALIBRATION, logits_against_transformers, ppl_against_llama

FAMILIES = ["qwen35", "qwen35moe"]


# --- the recurrence -------------------------------------------------------------------------------------------------

def naive_delta_rule(q, k, v, g, beta, state):
    """The gated delta rule one token and one value head at a time in float64, as transformers'
    torch_recurrent_gated_delta_rule writes it (value head h reads key head h % n_k: the converter's tiled order)."""
    B, T, n_k, _ = q.shape
    n_v = v.shape[2]
    s = state.astype(np.float64)
    out = np.zeros(v.shape)
    for b in range(B):
        for t in range(T):
            for h in range(n_v):
                qt, kt = q[b, t, h % n_k].astype(np.float64), k[b, t, h % n_k].astype(np.float64)
                s[b, h] *= np.exp(np.float64(g[b, t, h]))
                delta = (v[b, t, h] - kt @ s[b, h]) * beta[b, t, h]
                s[b, h] += np.outer(kt, delta)
                out[b, t, h] = qt @ s[b, h]
    return out, s


@pytest.mark.parametrize("T", [1, 7])
def test_delta_rule_kernel_equals_a_per_token_reference(T):
    """From a non-zero state, several sequences, fewer key heads than value heads, d_k != d_v."""
    rng = np.random.default_rng(T)
    B, n_k, n_v, d_k, d_v = 2, 2, 6, 8, 5

    def unit(shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q, k = unit((B, T, n_k, d_k)) * np.float32(d_k ** -0.5), unit((B, T, n_k, d_k))
    v = rng.standard_normal((B, T, n_v, d_v)).astype(np.float32)
    g = -rng.uniform(0.0, 2.0, (B, T, n_v)).astype(np.float32)
    beta = rng.uniform(0.0, 1.0, (B, T, n_v)).astype(np.float32)
    state = rng.standard_normal((B, n_v, d_k, d_v)).astype(np.float32)
    ref_out, ref_state = naive_delta_rule(q, k, v, g, beta, state)
    out = np.empty_like(v)
    gated_delta_rule_(q, k, v, g, beta, state, out)
    np.testing.assert_allclose(out, ref_out, rtol=0, atol=2e-5 * np.abs(ref_out).max())
    np.testing.assert_allclose(state, ref_state, rtol=0, atol=2e-5 * np.abs(ref_state).max())


# --- the model ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_the_mtp_layer_is_not_evaluated(family, gguf_of):
    """The converter writes the MTP block as one more layer (nextn_predict_layers = 1); like llama.cpp's main pass,
    evaluation runs the other layers only: DeltaNet where recurrent_layers says so, gated attention elsewhere."""
    _, path = gguf_of(family)
    seen: list[str] = []
    model = Model(GGUFWeights(path), on_matmul_input=lambda name, x, **_: seen.append(name))
    c = model.config
    assert model.weights.value(f"{family}.block_count") == 5 and model.weights.has("blk.4.nextn.eh_proj.weight")
    assert c.n_layer == 4 and c.recurrent == (True, False, True, False)
    model.forward(random_tokens(model.n_vocab, 20)[None])
    assert not any(n.startswith("blk.4.") for n in seen)
    assert {"blk.0.attn_qkv.weight", "blk.0.ssm_out.weight", "blk.1.attn_q.weight",
            "blk.3.attn_output.weight"} <= set(seen)
    assert not any(n.startswith(("blk.0.attn_q.", "blk.1.attn_qkv.")) for n in seen)


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_with_the_recurrent_state_equals_the_whole_pass(family, gguf_of):
    """Prefill in pieces and token by token through the cache (conv and delta-rule state, KV of the attention
    layers) gives the logits of one pass; two sequences in one batch give each one's own; a pass at position 0
    starts the state afresh."""
    _, path = gguf_of(family)
    model = Model(GGUFWeights(path), activations="float32")
    a, b = random_tokens(model.n_vocab, 24, seed=1), random_tokens(model.n_vocab, 24, seed=2)
    whole = model.forward(np.stack([a, b]))
    np.testing.assert_allclose(model.forward(a), whole[0], rtol=0, atol=1e-5)
    cache = KVCache.allocate(model.config, batch=2, max_len=24)
    for _ in range(2):          # the second round reuses the cache from position 0
        cache.length = 0
        steps = [(0, 10), *((t, t + 1) for t in range(10, 16)), (16, 24)]
        parts = np.concatenate([model.forward(np.stack([a, b])[:, s:e], cache=cache) for s, e in steps], axis=1)
        np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5)


def test_ppl_generate_and_imatrix_run_from_the_command_line(gguf_of, tmp_path):
    _, path = gguf_of("qwen35", "f16")
    text = tmp_path / "t.txt"
    text.write_text("Some text to evaluate on, with enough words to make a few chunks of context.\n" * 40)
    for args in (["ppl", path, "--dataset", text, "--ctx", "64", "--chunks", "2"],
                 ["generate", path, "--prompt", "hi", "-n", "4", "--greedy"],
                 ["imatrix", path, "--dataset", text, "--ctx", "64", "--chunks", "2", "-o", tmp_path / "i.gguf"]):
        result = CliRunner().invoke(main, [str(x) for x in args])
        assert result.exit_code == 0, (args[0], result.output, result.stderr)
    assert (tmp_path / "i.gguf").exists()


# --- against HF transformers --------------------------------------------------------------------------------------

@pytest.mark.reference
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family, gguf_of):
    """The whole pass in float32 against transformers (its chunked delta rule; max |Δ log-prob| < 1e-3), at once and
    through the cache: a prefill, then token by token (the recurrent form), then a second prefill."""
    logits_against_transformers(gguf_of, family, 40, [(0, 20), *((t, t + 1) for t in range(20, 30)), (30, 40)])


# --- against llama.cpp ----------------------------------------------------------------------------------------------

@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outtype", ["f32", "Q8_0", "Q4_K_M"])
def test_ppl_equals_llama_perplexity(family, outtype, gguf_of, tmp_path):
    ppl_against_llama(gguf_of, family, outtype, tmp_path)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_greedy_tokens_follow_llama_cpp(family, outtype, gguf_of):
    """llama-completion's greedy 32 tokens fed back through decode_steps (one-token passes on the recurrent state).
    F32 weights with float32 attention in llama.cpp (LLAMA_FLOAT32): every one of its tokens, for each of the three
    prompts, is our best (measured: 96 of 96 for each family, also with llama.cpp's default attention). F16: each is
    our best token or within GAP_TOL of it, and nearly all are our best."""
    from tests.test_interop_generate import GAP_TOL, MIN_AGREEMENT, PROMPTS, follow_llama_cpp
    exact = outtype == "f32"
    problems, agree, total = follow_llama_cpp(gguf_of(family, outtype)[1], PROMPTS if exact else PROMPTS[:1], GAP_TOL,
                                              LLAMA_FLOAT32 if exact else ())
    assert not problems, "\n".join(problems)
    assert agree >= (1.0 if exact else MIN_AGREEMENT) * total, \
        f"llama.cpp's token was our best in {agree} of {total} steps"


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("llama_attention", ["float32", "default"])
def test_imatrix_equals_llama_imatrix(family, llama_attention, gguf_of, tmp_path):
    """The same entries as llama-imatrix (the DeltaNet projections, no MTP layer).

    float32 attention in llama.cpp (LLAMA_FLOAT32): every count equal, per-expert counts included, and every entry's
    sums within 1e-5 (L1, relative; measured at most 5.6e-7).
    llama-imatrix's defaults: the dense counts equal and sums within 1e-3. Its half-precision attention moves the
    layer-1 attention output by ~6e-5 (relative), and the qwen35moe fixture's layer-1 router has a near-tie (the
    smallest gap between its 2nd and 3rd logit over the 512 tokens is 0.0016), so one token of 512 goes to another
    expert there: expert counts may differ by one token per expert, with equal totals, and those experts' sums by
    up to 2e-3. The float32 run shows that this is the rounding and not the routing."""
    import subprocess

    from qtool.evaluate.imatrix import compute_imatrix_file
    from qtool.quantize.imatrix_file import read_imatrix
    _, path = gguf_of(family)
    exe = need_tool("llama-imatrix")
    theirs = tmp_path / "llama.gguf"
    options = LLAMA_FLOAT32 if llama_attention == "float32" else ()
    proc = subprocess.run([str(exe), "-m", str(path), "-f", str(CALIBRATION), "-c", "128", "--chunks", "4", "-t", "2",
                           "-o", str(theirs), "--no-ppl", *options], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = tmp_path / "qtool.gguf"
    compute_imatrix_file(path, str(CALIBRATION), ours, n_ctx=128, n_chunks=4)
    a, b = read_imatrix(theirs).entries, read_imatrix(ours).entries
    assert set(a) == set(b)
    assert {"blk.0.attn_qkv.weight", "blk.0.attn_gate.weight", "blk.0.ssm_alpha.weight", "blk.0.ssm_beta.weight",
            "blk.0.ssm_out.weight", "blk.1.attn_q.weight"} <= set(a) and not any(n.startswith("blk.4.") for n in a)
    assert (family == "qwen35moe") == any("_exps" in n for n in a)
    for name, (sums, counts) in a.items():
        ours_sums, ours_counts = np.asarray(b[name][0], np.float64), np.asarray(b[name][1])
        counts, sums = np.asarray(counts), np.asarray(sums, np.float64)
        rel = np.abs(ours_sums - sums).sum() / np.abs(sums).sum()
        if llama_attention == "float32":
            np.testing.assert_array_equal(ours_counts, counts, err_msg=name)
            assert rel <= 1e-5, (name, rel)
        elif "_exps" in name:
            assert ours_counts.sum() == counts.sum() and np.abs(ours_counts - counts).max() <= 1, name
            assert rel <= 1e-2, name
        else:
            np.testing.assert_array_equal(ours_counts, counts, err_msg=name)
            assert rel <= 1e-3, name
