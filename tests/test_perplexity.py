"""llama-perplexity's chunking, BOS and scoring rules, KL-divergence statistics, the `qtool ppl` command.

The references here are deliberately slow and plain: one chunk at a time, the full logits of every position,
float64 math, and the scored positions spelled out the way perplexity.cpp's loop picks them.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qtool.cli import main
from qtool.convert.converter import plan_conversion, write_plan
from qtool.errors import QtoolError
from qtool.evaluate.model import Model
from qtool.evaluate.perplexity import (count_chunks, evaluate, group_size, kl_divergence, log_softmax_nll,
                                       mean_and_uncertainty, median, percentile, perplexity, run_perplexity,
                                       scored_per_chunk, summarize)
from qtool.evaluate.weights import GGUFWeights
from qtool.gguf_io import GGUFValueType, PlannedTensor, read_gguf, write_gguf


@pytest.fixture(scope="session")
def tiny(checkpoint_factory, tmp_path_factory):
    """GGUFs of tiny llama-spm checkpoints (same vocabulary): name -> path."""
    root = tmp_path_factory.mktemp("ppl_models")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            seed, outtype = {"base": (0, "f32"), "q8": (0, "q8_0"), "other": (1, "f32")}[name]
            plan = plan_conversion(checkpoint_factory("llama-spm", seed=seed), outtype)
            try:
                made[name] = write_plan(plan, root / f"{name}.gguf")[0]
            finally:
                plan.close()
        return made[name]

    return get


@pytest.fixture(scope="session")
def models(tiny):
    return {name: Model(GGUFWeights(tiny(name))) for name in ("base", "q8", "other")}


def random_stream(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 32000, size=n)


# --- the independent slow implementation --------------------------------------------------------------------------

def slow_chunk_nll(model, tokens: np.ndarray, n_ctx: int, max_chunks: int | None, bos: int | None):
    """Per scored token: (nll, float64 log-probs over the vocabulary), chunk by chunk as perplexity.cpp loops.
    `model`: a Model, or a function of a token window giving its logits at every position."""
    forward = model.forward if isinstance(model, Model) else model
    n_chunk = len(tokens) // n_ctx
    if max_chunks is not None:
        n_chunk = min(n_chunk, max_chunks)
    nll, logprobs = [], []
    for k in range(n_chunk):
        window = [int(t) for t in tokens[k * n_ctx:(k + 1) * n_ctx]]
        if bos is not None:
            window[0] = bos                                      # replaced for the pass only
        logits = forward(np.array(window)).astype(np.float64)   # every position
        for j in range(n_ctx // 2, n_ctx - 1):                   # second half, the last logits unused
            row = logits[j]
            lp = row - row.max() - math.log(np.exp(row - row.max()).sum())
            target = int(tokens[k * n_ctx + j + 1])              # the original text token
            nll.append(-lp[target])
            logprobs.append(lp)
    return np.array(nll), np.array(logprobs)


def slow_final_estimate(nll: np.ndarray) -> tuple[float, float]:
    n = len(nll)
    mean = sum(nll) / n
    mean2 = sum(x * x for x in nll) / n
    return math.exp(mean), math.exp(mean) * math.sqrt((mean2 - mean * mean) / (n - 1))


@pytest.mark.parametrize("n_ctx, n_tokens, max_chunks, bos, group", [
    (16, 16 * 5 + 7, None, 1, None),     # tail of 7 dropped, BOS replaces each chunk's first token
    (16, 16 * 5 + 7, None, None, 2),     # no BOS; groups of 2 do not divide 5 chunks
    (15, 15 * 4, 3, 1, 1),               # odd context: first = 7, 7 scored per chunk; --chunks 3
    (8, 8 * 3, None, 1, 3),
])
def test_scores_equal_the_slow_reference(models, checkpoint_factory, n_ctx, n_tokens, max_chunks, bos, group):
    """Against the float64 forward pass written from the HF checkpoint (tests/test_eval_model.hf_forward), not
    against qtool's own Model: the chunking, BOS and scoring rules and the forward pass are checked together."""
    from tests.test_eval_model import hf_forward

    ckpt = checkpoint_factory("llama-spm", seed=0)           # the "base" GGUF's checkpoint (converted to f32)
    tokens = random_stream(n_tokens, seed=n_ctx)
    ref_nll, _ = slow_chunk_nll(lambda window: hf_forward(ckpt, window), tokens, n_ctx, max_chunks, bos)
    (scores,) = evaluate([models["base"]], tokens, n_ctx, n_chunks=max_chunks, bos_id=bos, chunks_per_group=group)
    assert len(scores.nll) == len(ref_nll) == count_chunks(n_tokens, n_ctx, max_chunks) * scored_per_chunk(n_ctx)
    # measured: |nll - reference| <= 7.1e-8 on nll ~ 10.4 (float32 vs float64), i.e. ~7e-9 relative; 1e-6 leaves 100x
    np.testing.assert_allclose(scores.nll, ref_nll, rtol=1e-6)
    ppl, err = perplexity(scores.nll)
    ref_ppl, ref_err = slow_final_estimate(ref_nll)
    assert ppl == pytest.approx(ref_ppl, rel=1e-6) and err == pytest.approx(ref_err, rel=1e-4)


def test_bos_replacement_changes_the_scores(models):
    """Guards the test above: with and without BOS substitution the numbers differ."""
    tokens = random_stream(64)
    with_bos, = evaluate([models["base"]], tokens, 16, bos_id=1)
    without, = evaluate([models["base"]], tokens, 16, bos_id=None)
    assert np.abs(with_bos.nll - without.nll).max() > 1e-3


def test_chunk_counting():
    assert count_chunks(1000, 100) == 10
    assert count_chunks(1099, 100) == 10
    assert count_chunks(1000, 100, 3) == 3
    assert count_chunks(1000, 100, 30) == 10
    assert scored_per_chunk(512) == 255 and scored_per_chunk(15) == 7
    with pytest.raises(QtoolError, match="fewer than one chunk"):
        count_chunks(99, 100)
    with pytest.raises(QtoolError, match="--ctx 3 is too small"):
        count_chunks(99, 3)
    with pytest.raises(QtoolError, match="--chunks must be positive"):
        count_chunks(1000, 100, 0)
    assert group_size(512, 32000) == 4                       # llama-perplexity's n_seq = 2048 / 512
    assert group_size(4096, 32000) == 1
    assert group_size(512, 1_000_000) == 1                   # bounded by the kept base log-probs


# --- KL divergence and its statistics -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["q8", "other"])
def test_kld_and_token_statistics_equal_direct_computation(models, variant):
    base, var = models["base"], models[variant]
    tokens = random_stream(16 * 6 + 3, seed=5)
    base_nll, base_lp = slow_chunk_nll(base, tokens, 16, None, 1)
    var_nll, var_lp = slow_chunk_nll(var, tokens, 16, None, 1)
    p = np.exp(base_lp)
    direct_kld = (p * (base_lp - var_lp)).sum(axis=1)
    b, v = evaluate([base, var], tokens, 16, bos_id=1, chunks_per_group=4)
    assert b.kld is None and v.kld is not None
    # KLD of the 8-bit tiny model is ~1e-6; float32 logits (and batched vs single-sequence BLAS rounding,
    # ~2e-7 per logit) bound the absolute agreement near 1e-10
    np.testing.assert_allclose(v.kld, direct_kld, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(v.p_diff, np.exp(-var_nll) - np.exp(-base_nll), rtol=1e-4, atol=1e-9)
    np.testing.assert_array_equal(v.same_top1, base_lp.argmax(1) == var_lp.argmax(1))

    s = summarize(v, b, path="v.gguf", size_bytes=1, n_params=1, bpw=1.0)
    base_ppl = math.exp(base_nll.mean())
    assert s.ppl == pytest.approx(math.exp(var_nll.mean()), rel=1e-5)
    assert s.delta_ppl == pytest.approx(math.exp(var_nll.mean()) - base_ppl, rel=1e-3, abs=1e-6)
    assert s.delta_ppl_pct == pytest.approx(100 * (math.exp(var_nll.mean()) / base_ppl - 1), rel=1e-3, abs=1e-6)
    assert s.kld_mean == pytest.approx(direct_kld.mean(), rel=1e-5, abs=1e-9)
    assert s.kld_err == pytest.approx(direct_kld.std() / math.sqrt(len(direct_kld) - 1), rel=1e-3, abs=1e-9)
    assert s.kld_median == pytest.approx(np.median(direct_kld), rel=1e-5, abs=1e-9)
    assert s.kld_p99 == pytest.approx(np.percentile(direct_kld, 99), rel=1e-5, abs=1e-9)
    assert s.kld_p999 == pytest.approx(np.percentile(direct_kld, 99.9), rel=1e-5, abs=1e-9)
    assert s.kld_max == pytest.approx(direct_kld.max(), rel=1e-5, abs=1e-9)
    assert s.same_top1_pct == pytest.approx(100 * np.mean(base_lp.argmax(1) == var_lp.argmax(1)))
    dp = np.exp(-var_nll) - np.exp(-base_nll)
    assert s.rms_dp_pct == pytest.approx(100 * math.sqrt(np.mean(dp ** 2)), rel=1e-4)


def _direct_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    la = a.astype(np.float64) - a.max(-1, keepdims=True)
    lb = b.astype(np.float64) - b.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(-1)


@pytest.mark.parametrize("case", ["close", "far", "peaked", "outlier", "overflow"])
def test_kl_divergence_on_synthetic_logits(case):
    rng = np.random.default_rng(1)
    base = rng.normal(0, 2, (6, 5000)).astype(np.float32)
    other = {"close": base + rng.normal(0, 1e-3, base.shape),
             "far": rng.normal(0, 2, base.shape),
             "peaked": base + rng.normal(0, 1e-2, base.shape),
             "outlier": base.copy(),
             "overflow": base.copy()}[case].astype(np.float32)
    if case == "peaked":
        base[:, 7] += 25.0
        other[:, 7] += 24.9
    if case == "outlier":
        other[:, 3] += 40.0
    if case == "overflow":          # e^(l - l_base) beyond float32: the float64 fallback takes those rows
        other[::2, 11] += 200.0
    base_log_z, _, _ = log_softmax_nll(base, np.zeros(6, np.int64))
    ours = kl_divergence(base, base_log_z, other)
    ref = _direct_kl(base, other)
    assert np.all(np.isfinite(ours))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-12)


def test_log_softmax_kernel_against_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 4, (9, 3001)).astype(np.float32)
    logits[1] = 0.0                                  # all equal: argmax is the first index
    logits[2, [5, 17]] = 50.0                        # a tie at the top: the first one wins
    logits[3, 100] = 1e4                             # one huge outlier
    logits[4] *= 1e-30                               # denormal-sized differences
    targets = rng.integers(0, 3001, 9)
    log_z, nll, top = log_softmax_nll(logits, targets)
    x = logits.astype(np.float64)
    ref_log_z = x.max(1) + np.log(np.exp(x - x.max(1, keepdims=True)).sum(1))
    np.testing.assert_allclose(log_z, ref_log_z, rtol=1e-12, atol=1e-6)
    np.testing.assert_allclose(nll, ref_log_z - x[np.arange(9), targets], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(top, logits.argmax(1))
    assert top[1] == 0 and top[2] == 5 and top[3] == 100


def test_identical_models_have_zero_kld(models):
    b, v = evaluate([models["base"], models["base"]], random_stream(64, 2), 16, bos_id=1)
    assert np.all(v.kld == 0) and np.all(v.p_diff == 0) and v.same_top1.all()
    np.testing.assert_array_equal(b.nll, v.nll)


def test_statistics_helpers_follow_llama_cpp():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10, 11, 1000):
        x = np.sort(rng.exponential(size=n))
        assert median(x) == pytest.approx(np.median(x))
        for f in (0.0, 0.001, 0.01, 0.5, 0.9, 0.99, 0.999, 1.0):
            assert percentile(x, f) == pytest.approx(np.percentile(x, 100 * f), rel=1e-12)
        mean, unc = mean_and_uncertainty(x)
        assert mean == pytest.approx(x.mean())
        # llama.cpp reports no uncertainty for 10 values or fewer
        assert unc == (pytest.approx(x.std() / math.sqrt(n - 1)) if n > 10 else 0.0)
    assert perplexity(np.array([2.0, 2.0, 2.0])) == (pytest.approx(math.exp(2.0)), 0.0)


# --- whole runs: files, vocabularies, context, the command ---------------------------------------------------------

TEXT = " ".join(f"The number {i} follows {i - 1}, and the river runs past the old mill." for i in range(1, 120))


def _with_kv(src: Path, dst: Path, key: str, change) -> Path:
    """A copy of `src` whose metadata value `key` is replaced by change(old value)."""
    g = read_gguf(src)
    kvs = [(k, change(v.value) if k == key else v.value, v.type, v.sub_type)
           for k, v in g.kv.items() if k != "general.architecture"]
    write_gguf(dst, g.value("general.architecture"), kvs,
               [PlannedTensor(t.name, t.shape, t.qtype, (lambda t=t: g.array(t))) for t in g.tensors])
    return dst


def _renamed_token(tokens: list[str]) -> list[str]:
    tokens = list(tokens)
    tokens[500] = "<not-the-same>"
    return tokens


def test_run_tokenizes_with_the_base_vocabulary_and_summarizes(tiny):
    from qtool.evaluate.tokenizer import Tokenizer

    run = run_perplexity(tiny("base"), [tiny("q8")], TEXT, dataset_name="t", n_ctx=32, n_chunks=5)
    tokens = Tokenizer.from_gguf(read_gguf(tiny("base"))).encode(TEXT)
    assert tokens[0] == 1                                         # SPM adds BOS
    assert run.n_chunks == min(5, len(tokens) // 32) == 5
    assert run.n_tokens_scored == 5 * 15
    assert [Path(m.path).name for m in run.models] == ["base.gguf", "q8.gguf"]
    base, q8 = run.models
    assert base.delta_ppl is None and q8.delta_ppl is not None
    assert base.bpw == pytest.approx(32.0) and 8 < q8.bpw < 32
    assert q8.size_bytes == tiny("q8").stat().st_size
    assert 0 < q8.kld_mean < 0.01 and q8.same_top1_pct > 90


def test_vocabulary_and_context_errors(tiny, checkpoint_factory, tmp_path):
    plan = plan_conversion(checkpoint_factory("llama-spm", vocab_size=32064), "f32")
    try:
        padded = write_plan(plan, tmp_path / "padded.gguf")[0]
    finally:
        plan.close()
    with pytest.raises(QtoolError, match=r"padded.gguf: vocabulary differs from the base .*base.gguf \(32064 tokens vs 32000\)"):
        run_perplexity(tiny("base"), [padded], TEXT, dataset_name="t", n_ctx=32)
    renamed = _with_kv(tiny("base"), tmp_path / "renamed.gguf", "tokenizer.ggml.tokens", _renamed_token)
    with pytest.raises(QtoolError, match=r"vocabulary differs from the base .*\(same size, different tokens\)"):
        run_perplexity(tiny("base"), [tiny("q8"), renamed], TEXT, dataset_name="t", n_ctx=32)
    bpe = _with_kv(tiny("base"), tmp_path / "bpe.gguf", "tokenizer.ggml.model", lambda _: "gpt2")
    with pytest.raises(QtoolError, match="tokenizer model 'gpt2' differs from the base's 'llama'"):
        run_perplexity(tiny("base"), [bpe], TEXT, dataset_name="t", n_ctx=32)
    with pytest.raises(QtoolError, match="--ctx 8192 exceeds base.gguf's context length 4096"):
        run_perplexity(tiny("base"), [], TEXT, dataset_name="t", n_ctx=8192)
    with pytest.raises(QtoolError, match="fewer than one chunk of --ctx 2048"):
        run_perplexity(tiny("base"), [], "A short text.", dataset_name="t", n_ctx=2048)


def test_ppl_command_writes_json_and_markdown(tiny, tmp_path):
    data = tmp_path / "eval.txt"
    data.write_text(TEXT + "\n")
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    result = CliRunner().invoke(main, ["ppl", str(tiny("base")), str(tiny("q8")), str(tiny("other")),
                                       "--dataset", str(data), "--ctx", "32", "--chunks", "4",
                                       "--json", str(out_json), "--markdown", str(out_md)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out_json.read_text())
    assert {"dataset", "n_ctx", "n_chunks", "n_tokens_scored", "wall_seconds", "tokens_per_second",
            "models"} <= set(doc)
    assert (doc["dataset"], doc["n_ctx"], doc["n_chunks"], doc["n_tokens_scored"]) == (str(data), 32, 4, 60)
    assert [Path(m["path"]).name for m in doc["models"]] == ["base.gguf", "q8.gguf", "other.gguf"]
    variant_keys = {"delta_ppl", "delta_ppl_pct", "kld_mean", "kld_err", "kld_median", "kld_p99", "kld_p999",
                    "same_top1_pct", "rms_dp_pct"}
    for i, m in enumerate(doc["models"]):
        assert {"path", "size_bytes", "bpw", "ppl", "ppl_err"} <= set(m)
        assert all((m[k] is None) == (i == 0) for k in variant_keys)
    assert doc["models"][2]["kld_mean"] > doc["models"][1]["kld_mean"]
    # the same run through the API gives the same numbers (the text file loses its trailing newline)
    run = run_perplexity(tiny("base"), [tiny("q8"), tiny("other")], TEXT, dataset_name="x", n_ctx=32, n_chunks=4)
    for m, api in zip(doc["models"], run.models):
        assert m["ppl"] == pytest.approx(api.ppl, rel=1e-6)
    md = out_md.read_text()
    assert md.count("\n| ") == 4 and "q8.gguf" in md and "KLD 99.9%" in md
    assert "q8.gguf" in result.output


@pytest.mark.parametrize("args, message", [
    (["--dataset", "/nonexistent/x.txt"], "dataset '/nonexistent/x.txt' not found"),
    (["--ctx", "8192"], "exceeds base.gguf's context length 4096"),
    (["--json", "/nonexistent/dir/r.json"], "output directory /nonexistent/dir does not exist"),
])
def test_ppl_command_bad_input_is_one_line_exit_2(tiny, tmp_path, args, message):
    data = tmp_path / "eval.txt"
    data.write_text(TEXT)
    result = CliRunner().invoke(main, ["ppl", str(tiny("base")), "--dataset", str(data), *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
