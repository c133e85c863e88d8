"""Mixture-of-experts evaluation (Qwen2-MoE, Qwen3-MoE): the routed FFN against a plain per-token reference, the
whole pass against transformers, and ppl / imatrix against llama.cpp's tools, on the tiny checkpoints of
tests/fixtures/checkpoints.py (every expert distinct, routers spread like trained ones) converted by qtool."""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

from qtool.evaluate.imatrix import ImatrixCollector
from qtool.evaluate.model import KVCache, Model, Workspace, _Input, rms_norm
from qtool.evaluate.weights import GGUFWeights
from tests.conftest import SHARED
from tests.interop import need_module, need_tool, run_logged
from tests.test_eval_model import gguf_of, random_tokens  # noqa: F401  (gguf_of: the session fixture)

FAMILIES = ["qwen3moe", "qwen2moe"]
WIKI_RAW = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
CALIBRATION = SHARED / "data" / "calibration" / "groups_merged.txt"


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def naive_moe(w: GGUFWeights, p: str, x: np.ndarray, k: int, normalize: bool) -> np.ndarray:
    """The routed FFN one token at a time in float64 from the decoded tensors: softmax over every expert's router
    logit, the k best, their FFNs, weighted (renormalized or not) and summed; plus the sigmoid-gated shared
    expert when the model has one."""
    router = w.get(p + "ffn_gate_inp.weight").astype(np.float64)
    gate, up, down = (w.get(p + f"ffn_{n}_exps.weight").astype(np.float64) for n in ("gate", "up", "down"))
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    out = np.zeros((x.shape[0], down.shape[1]))
    for t, row in enumerate(x.astype(np.float64)):
        logits = router @ row
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = np.argsort(-probs, kind="stable")[:k]
        weights = probs[best] / (probs[best].sum() if normalize else 1.0)
        for e, wt in zip(best, weights):
            out[t] += wt * (down[e] @ (silu(gate[e] @ row) * (up[e] @ row)))
        if w.has(p + "ffn_gate_inp_shexp.weight"):
            g = w.get(p + "ffn_gate_inp_shexp.weight").reshape(-1).astype(np.float64) @ row
            sh = [w.get(p + f"ffn_{n}_shexp.weight").astype(np.float64) for n in ("gate", "up", "down")]
            out[t] += (1 / (1 + np.exp(-g))) * (sh[2] @ (silu(sh[0] @ row) * (sh[1] @ row)))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_ffn_equals_a_per_token_reference(family, gguf_of):
    _, path = gguf_of(family)
    model = Model(GGUFWeights(path), activations="float32")
    c = model.config
    assert c.n_expert > c.n_expert_used > 1 and (c.n_ff_shexp > 0) == (family == "qwen2moe")
    x = np.random.default_rng(3).normal(0, 1, (24, c.n_embd)).astype(np.float32)
    h = rms_norm(x, model.weights.get("blk.1.ffn_norm.weight"), c.rms_eps)
    ours = model._moe("blk.1.", _Input(h, Workspace()))
    ref = naive_moe(model.weights, "blk.1.", h, c.n_expert_used, c.expert_norm)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    # the routing is not degenerate: the tokens use most experts, and not all the same pair
    router = model.weights.get("blk.1.ffn_gate_inp.weight")
    chosen = np.argsort(-(h @ router.T), axis=1)[:, :c.n_expert_used]
    assert len(np.unique(chosen)) >= c.n_expert - 1 and len({tuple(sorted(r)) for r in chosen}) > 3


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_side_by_side_equal_experts_in_turn(family, gguf_of):
    """A batch runs its experts on worker threads (each serial, BLAS on one thread); one thread runs them in turn
    with the same kernels: the same bits, whatever the count of threads."""
    import numba

    from qtool.threads import single_threaded_blas

    assert numba.config.NUMBA_NUM_THREADS >= 2, "numba must be allowed 2 threads (NUMBA_NUM_THREADS)"
    _, path = gguf_of(family)
    model = Model(GGUFWeights(path))
    x = np.random.default_rng(4).normal(0, 1, (40, model.config.n_embd)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(2)
        side_by_side = model._moe("blk.0.", _Input(x, Workspace()))
        numba.set_num_threads(1)
        with single_threaded_blas():
            in_turn = model._moe("blk.0.", _Input(x, Workspace()))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(side_by_side, in_turn)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_q8_0_experts_multiply_codes_as_integers(family, gguf_of, tmp_path, monkeypatch):
    """Decoding (one token) through Q8_0 experts takes the integer kernels (Q8_0 codes, evaluate/qdot.py) for each
    routed expert's Q8_0 matrices, and gives the float kernels' result on the same rounded activations within float32
    rounding (the router, F32, routes both alike)."""
    from qtool.evaluate import qdot
    from qtool.quantize.mixtures import parse_file_type
    from qtool.quantize.quantizer import QuantizeOptions, quantize_model

    from qtool.evaluate import weights as weights_mod

    _, path = gguf_of(family)
    quantize_model(path, tmp_path / "q8.gguf", QuantizeOptions(parse_file_type("Q8_0")))
    monkeypatch.setattr(weights_mod, "SMALL_TENSOR_ELEMENTS", 0)    # the tiny fixture's experts stay stored
    model = Model(GGUFWeights(tmp_path / "q8.gguf"))
    q8_0 = [part for part in ("gate", "up", "down")
            if model.weights.qtype(f"blk.0.ffn_{part}_exps.weight").name == "Q8_0"]   # (rows too short: F16)
    assert {"gate", "up"} <= set(q8_0)
    x = np.random.default_rng(6).normal(0, 1, (1, model.config.n_embd)).astype(np.float32)
    calls: list[str] = []
    kernel_for_q8_0 = qdot.kernel_for_q8_0

    def counting(qtype):
        kernel = kernel_for_q8_0(qtype)
        return lambda raw, act, out: (calls.append(qtype.name), kernel(raw, act, out))

    monkeypatch.setattr(qdot, "kernel_for_q8_0", counting)
    integer = model._moe("blk.0.", _Input(x, Workspace()))
    shared = [part for part in ("gate", "up", "down") if model.weights.has(f"blk.0.ffn_{part}_shexp.weight")
              and model.weights.qtype(f"blk.0.ffn_{part}_shexp.weight").name == "Q8_0"]  # the shared expert's too
    assert len(calls) == len(q8_0) * model.config.n_expert_used + len(shared) and set(calls) == {"Q8_0"}
    monkeypatch.setattr(qdot, "SUPPORTED_Q8_0", ())
    floats = model._moe("blk.0.", _Input(x, Workspace()))
    np.testing.assert_allclose(integer, floats, rtol=0, atol=1e-5 * np.abs(floats).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_imatrix_counts_and_sums_per_expert(family, gguf_of):
    """Each expert's entry counts the (token, slot) pairs routed to it and sums their squared inputs; the counts of
    an expert tensor add up to tokens x experts used; dense weights keep one count."""
    _, path = gguf_of(family)
    collector = ImatrixCollector()
    model = Model(GGUFWeights(path), on_matmul_input=collector)
    tokens = random_tokens(model.n_vocab, 40, seed=5)
    model.forward(tokens[None])
    c = model.config
    for part in ("gate", "up", "down"):
        name = f"blk.0.ffn_{part}_exps.weight"
        sums, counts = collector.sums[name], collector.counts[name]
        assert sums.shape == (c.n_expert, c.n_ff_exp if part == "down" else c.n_embd)
        assert counts.sum() == 40 * c.n_expert_used and (counts > 0).sum() >= c.n_expert - 1
        assert ((sums > 0).any(axis=1) == (counts > 0)).all()
    np.testing.assert_array_equal(collector.counts["blk.0.ffn_gate_exps.weight"],
                                  collector.counts["blk.0.ffn_down_exps.weight"])
    assert collector.counts["blk.0.ffn_gate_inp.weight"].tolist() == [40]
    if c.n_ff_shexp:
        assert collector.counts["blk.0.ffn_gate_inp_shexp.weight"].tolist() == [40]


# --- against HF transformers --------------------------------------------------------------------------------------

@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_logits_equal_transformers(family, gguf_of):
    """The whole pass in float32 against transformers (max |Δ log-prob| < 1e-3), at once and through the KV cache."""
    logits_against_transformers(gguf_of, family, 48, [(0, 30), (30, 31), (31, 48)])


def logits_against_transformers(gguf_of, family: str, n_tokens: int, steps: list[tuple[int, int]]) -> None:
    """The family's fixture in float32: qtool's log-probs within 1e-3 (max abs) of transformers', for the whole
    sequence at once and fed through the cache in the pieces `steps` (token ranges)."""
    torch = need_module("torch")
    transformers = need_module("transformers")
    ckpt, path = gguf_of(family)
    model = Model(GGUFWeights(path), activations="float32")
    tokens = random_tokens(model.n_vocab, n_tokens, seed=7)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens[None])).logits[0].double().numpy()
    whole = model.forward(tokens)
    assert np.abs(log_softmax(whole) - log_softmax(ref)).max() < 1e-3
    cache = KVCache.allocate(model.config, batch=1, max_len=len(tokens))
    parts = [model.forward(tokens[None, a:b], cache=cache)[0] for a, b in steps]
    assert np.abs(log_softmax(np.concatenate(parts)) - log_softmax(ref)).max() < 1e-3


# --- against llama.cpp ----------------------------------------------------------------------------------------------

def _llama_ppl(path, chunks: int, ctx: int) -> float:
    exe = need_tool("llama-perplexity")
    final = r"Final estimate: PPL = ([\d.]+)"
    proc = run_logged([exe, "-m", path, "-f", WIKI_RAW, "-c", ctx, "--chunks", chunks, "-t", "2"], expect=(final,),
                      timeout=1800)
    log = proc.stdout.decode("utf-8", "replace") + proc.stderr.decode("utf-8", "replace")
    return float(re.search(final, log).group(1))


def ppl_against_llama(gguf_of, family: str, outtype: str, tmp_path) -> None:
    """qtool's PPL within 0.3 % of llama-perplexity's (4 chunks of 128) on the family's fixture, converted to
    outtype (lower case) or quantized from F16 to it (a file type)."""
    from qtool.evaluate.perplexity import run_perplexity
    from qtool.quantize.mixtures import parse_file_type
    from qtool.quantize.quantizer import QuantizeOptions, quantize_model
    _, path = gguf_of(family, outtype if outtype.islower() else "f16")
    if not outtype.islower():
        quantize_model(path, tmp_path / "q.gguf", QuantizeOptions(parse_file_type(outtype)))
        path = tmp_path / "q.gguf"
    text = WIKI_RAW.read_text(encoding="utf-8")
    ours = run_perplexity(path, [], text, dataset_name="wikitext", n_ctx=128, n_chunks=4).models[0].ppl
    theirs = _llama_ppl(path, 4, 128)
    print(f"{family} {outtype}: qtool PPL {ours:.4f}, llama-perplexity {theirs:.4f} ({ours / theirs - 1:+.3%})")
    assert ours == pytest.approx(theirs, rel=0.003)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("outtype", ["f32", "f16", "Q8_0", "Q4_K_M"])
def test_moe_ppl_equals_llama_perplexity(family, outtype, gguf_of, tmp_path):
    ppl_against_llama(gguf_of, family, outtype, tmp_path)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_imatrix_equals_llama_imatrix(family, gguf_of, tmp_path):
    """Per-expert counts equal llama-imatrix's; sums within 1e-3 (L1, relative) on every entry."""
    from qtool.evaluate.imatrix import compute_imatrix_file
    from qtool.quantize.imatrix_file import read_imatrix
    _, path = gguf_of(family)
    calib = str(CALIBRATION)
    exe = need_tool("llama-imatrix")
    theirs = tmp_path / "llama.gguf"
    proc = subprocess.run([str(exe), "-m", str(path), "-f", calib, "-c", "128", "--chunks", "4", "-t", "2",
                           "-o", str(theirs), "--no-ppl"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = tmp_path / "qtool.gguf"
    compute_imatrix_file(path, calib, ours, n_ctx=128, n_chunks=4)
    a, b = read_imatrix(theirs).entries, read_imatrix(ours).entries
    assert set(a) == set(b) and any("_exps" in n for n in a)
    for name, (sums, counts) in a.items():
        np.testing.assert_array_equal(np.asarray(b[name][1]), np.asarray(counts), err_msg=name)
        diff = np.abs(np.asarray(b[name][0], np.float64) - np.asarray(sums, np.float64)).sum()
        assert diff <= 1e-3 * np.abs(np.asarray(sums, np.float64)).sum(), name
