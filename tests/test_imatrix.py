"""`qtool imatrix`: collection against an independent float64 forward pass of the HF weights, llama.cpp's batch
shapes (and with them the 16-row rule), merging, both file formats, statistics, and bad input.
(llama-imatrix itself: test_interop_imatrix.py.)"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qtool.cli import main
from qtool.convert.converter import plan_conversion, write_plan
from qtool.errors import QtoolError
from qtool.evaluate.imatrix import (MIN_ROWS, ImatrixCollector, collect, compute_imatrix_file, micro_batches,
                                    summarize_imatrix, tensor_stats)
from qtool.evaluate.model import Model
from qtool.evaluate.tokenizer import Tokenizer
from qtool.evaluate.weights import GGUFWeights
from qtool.quantize.imatrix_file import Imatrix, ImatrixEntry, column_weights, read_imatrix, write_imatrix_gguf
from tests.conftest import SHARED
from tests.fixtures.checkpoints import read_checkpoint_tensors

WIKI_RAW = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(checkpoint_factory, tmp_path_factory):
    """variant -> (HF checkpoint dir, F32 GGUF), converted once per module."""
    cache: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("imatrix_models")

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in cache:
            ckpt = checkpoint_factory(variant)
            out = root / f"{variant}-f32.gguf"
            plan = plan_conversion(ckpt, "f32")
            try:
                write_plan(plan, out)
            finally:
                plan.close()
            cache[variant] = (ckpt, out)
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """A few KB of real text (tiny models tokenize it to a few hundred tokens per KB)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(WIKI_RAW.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return path


# --- the independent reference ------------------------------------------------------------------------------------

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def reference_matmul_inputs(config: dict, sd: dict[str, np.ndarray], tokens: np.ndarray) -> dict[str, np.ndarray]:
    """float64 inputs (T, n_in) of every linear layer of one sequence, by GGUF weight name, from the HF weights.

    Llama/Qwen2/Qwen3 the HF way: rotate_half rope on unpermuted q/k, repeated k/v heads, q/k norm for Qwen3.
    """
    n_head, eps = config["num_attention_heads"], config["rms_norm_eps"]
    n_kv = config.get("num_key_value_heads") or n_head
    hd = config.get("head_dim") or config["hidden_size"] // n_head
    T = len(tokens)
    assert not config.get("rope_scaling"), "the reference has no rope scaling"

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rotate_half(x):
        return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)

    inv = 1.0 / float(config.get("rope_theta", 10000.0)) ** (np.arange(0, hd, 2) / hd)
    angles = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    mask = np.triu(np.full((T, T), -np.inf), 1)
    seen: dict[str, np.ndarray] = {}

    def linear(hf_name: str, x: np.ndarray) -> np.ndarray:
        layer, module = hf_name.split(".", 3)[2], hf_name.split(".", 3)[3]
        seen[f"blk.{layer}.{HF_TO_GGUF[module]}.weight"] = x
        return x @ sd[hf_name + ".weight"].T + sd.get(hf_name + ".bias", 0.0)

    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = norm(x, sd[p + "input_layernorm.weight"])
        q, k, v = (linear(p + f"self_attn.{n}_proj", a) for n in "qkv")
        q = q.reshape(T, n_head, hd).transpose(1, 0, 2)
        k = k.reshape(T, n_kv, hd).transpose(1, 0, 2)
        v = v.reshape(T, n_kv, hd).transpose(1, 0, 2)
        if config["model_type"] == "qwen3":
            q, k = norm(q, sd[p + "self_attn.q_norm.weight"]), norm(k, sd[p + "self_attn.k_norm.weight"])
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, n_head // n_kv, axis=0), np.repeat(v, n_head // n_kv, axis=0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + linear(p + "self_attn.o_proj", (s @ v).transpose(1, 0, 2).reshape(T, n_head * hd))
        f = norm(x, sd[p + "post_attention_layernorm.weight"])
        g, u = linear(p + "mlp.gate_proj", f), linear(p + "mlp.up_proj", f)
        x = x + linear(p + "mlp.down_proj", g / (1 + np.exp(-g)) * u)
    if "lm_head.weight" in sd:
        seen["output.weight"] = norm(x, sd["model.norm.weight"])
    return seen


def reference_imatrix(model_dir: Path, gguf_path: Path, text: str, n_ctx: int, n_chunks: int,
                      positions: slice = slice(None),
                      process_output: bool = False) -> dict[str, tuple[np.ndarray, int]]:
    """Σx² per column and token count over chunks, as llama-imatrix defines them, from the reference pass.

    Chunk k is tokens[k*n_ctx:(k+1)*n_ctx] of the whole text tokenized with BOS when the vocabulary adds
    one, with its first token replaced by BOS; only `positions` of each chunk count.
    """
    tok = Tokenizer.from_gguf(GGUFWeights(gguf_path).gguf)
    tokens = np.array(tok.encode(text, add_special=True, parse_special=False))
    config = json.loads((model_dir / "config.json").read_text())
    sd = {k: v.astype(np.float64) for k, v in read_checkpoint_tensors(model_dir).items()}
    out: dict[str, tuple[np.ndarray, int]] = {}
    for c in range(n_chunks):
        chunk = tokens[c * n_ctx:(c + 1) * n_ctx].copy()
        assert len(chunk) == n_ctx
        if tok.add_bos:
            chunk[0] = tok.bos_id
        for name, x in reference_matmul_inputs(config, sd, chunk).items():
            if name == "output.weight" and not process_output:
                continue
            x = x[positions]
            s, n = out.get(name, (0.0, 0))
            out[name] = (s + (x * x).sum(axis=0), n + len(x))
    return out


def assert_matches_reference(im: Imatrix, ref: dict[str, tuple[np.ndarray, int]]) -> None:
    assert sorted(im.entries) == sorted(ref)
    for name, (sums, count) in ref.items():
        e = im.entries[name]
        assert e.counts.tolist() == [count], name
        err = np.abs(e.sums[0].astype(np.float64) - sums) / sums
        assert err.max() < 2e-4, (name, err.max())


# --- collection ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, process_output", [
    ("llama-spm", True),     # BOS replaces each chunk's first token; a separate output.weight is collected
    ("qwen2", True),         # no BOS; GQA; biases; tied output (token_embd.weight) is never collected
])
def test_collection_equals_an_independent_float64_forward_pass(variant, process_output, tiny, calibration, tmp_path):
    ckpt, model = tiny(variant)
    n_ctx, n_chunks = 48, 3
    run = compute_imatrix_file(model, str(calibration), tmp_path / "i.gguf", n_ctx=n_ctx, n_chunks=n_chunks,
                               process_output=process_output)
    im = read_imatrix(run.path)
    ref = reference_imatrix(ckpt, model, calibration.read_text(), n_ctx, n_chunks, process_output=process_output)
    assert ("output.weight" in ref) == (variant == "llama-spm")
    assert_matches_reference(im, ref)
    assert (im.datasets, im.chunk_count, im.chunk_size) == ([str(calibration)], n_chunks, n_ctx)
    assert (run.n_chunks, run.n_tokens, run.n_entries) == (n_chunks, n_chunks * n_ctx, len(ref))
    # q, k and v read the same input, as gate and up do
    e = im.entries
    assert np.array_equal(e["blk.1.attn_q.weight"].sums, e["blk.1.attn_v.weight"].sums)
    assert np.array_equal(e["blk.1.ffn_gate.weight"].sums, e["blk.1.ffn_up.weight"].sums)


def test_output_weight_only_with_process_output(tiny, calibration, tmp_path):
    _, model = tiny("llama-spm")
    run = compute_imatrix_file(model, str(calibration), tmp_path / "i.gguf", n_ctx=32, n_chunks=1)
    names = set(read_imatrix(run.path).entries)
    assert "output.weight" not in names and "token_embd.weight" not in names
    assert names == {f"blk.{i}.{t}.weight" for i in range(2)
                     for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}


def test_micro_batches_under_16_rows_are_skipped_and_the_rest_use_the_kv_cache(tiny, calibration):
    """-b 40 -ub 16 -c 40: one chunk per pass in micro-batches of 16, 16 and 8 tokens; the last is ignored."""
    ckpt, model_path = tiny("llama-spm")
    n_ctx, n_chunks = 40, 2
    assert micro_batches(n_ctx, 1, batch_tokens=40, ubatch_tokens=16) == [(0, 16), (16, 16), (32, 8)]
    collector = ImatrixCollector()
    model = Model(GGUFWeights(model_path), on_matmul_input=collector)
    tok = Tokenizer.from_gguf(model.weights.gguf)
    tokens = np.array(tok.encode(calibration.read_text(), add_special=True, parse_special=False))
    collect(model, tokens, n_ctx, n_chunks, tok.bos_id, collector, batch_tokens=40, ubatch_tokens=16)
    im = Imatrix({n: ImatrixEntry(*e) for n, e in collector.entries().items()}, chunk_size=n_ctx)
    assert_matches_reference(im, reference_imatrix(ckpt, model_path, calibration.read_text(), n_ctx, n_chunks,
                                                   positions=slice(0, 32)))


def test_short_chunks_collect_only_when_a_pass_has_16_rows(tiny, calibration, tmp_path):
    _, model = tiny("llama-spm")
    # one chunk of 8 tokens: every product has 8 rows, so llama-imatrix would collect nothing
    with pytest.raises(QtoolError, match="nothing was collected"):
        compute_imatrix_file(model, str(calibration), tmp_path / "a.gguf", n_ctx=8, n_chunks=1)
    assert not (tmp_path / "a.gguf").exists()
    # two chunks of 8 run as one batch of two sequences: 16 rows
    run = compute_imatrix_file(model, str(calibration), tmp_path / "b.gguf", n_ctx=8, n_chunks=2)
    assert read_imatrix(run.path).entries["blk.0.attn_q.weight"].counts.tolist() == [16]


def simulate_llama_imatrix_ubatches(n_ctx: int, n_seqs: int, batch: int, ubatch: int) -> list[tuple[int, int]]:
    """Token by token, the batch allocator of llama.cpp as llama-imatrix drives it, for the last pass of a run
    with `n_seqs` chunks in it: (first position, tokens per sequence) of each micro-batch."""
    n_seq_max = max(1, batch // n_ctx)
    n_batch = min(batch, n_seq_max * n_ctx)              # llama-imatrix: params.n_batch = min(n_batch, n_kv)
    n_ubatch = min(n_batch, ubatch)                       # llama_context: n_ubatch = min(n_batch, n_ubatch)
    out = []
    for j in range((n_ctx + n_batch - 1) // n_batch):    # llama_decode calls of one pass
        size = min(n_ctx - j * n_batch, n_batch)
        seq_of = [s for s in range(n_seqs) for _ in range(size)]
        pos_of = [j * n_batch + k for _ in range(n_seqs) for k in range(size)]
        used = [False] * len(seq_of)
        while not all(used):
            if n_seq_max == 1:                            # one KV stream: split_simple
                idx = [i for i in range(len(used)) if not used[i]][:n_ubatch]
            else:                                         # one stream per sequence: split_equal(sequential)
                seqs = sorted({seq_of[i] for i in range(len(used)) if not used[i]})
                queues = {s: [i for i in range(len(used)) if not used[i] and seq_of[i] == s] for s in seqs}
                idx, taken = [], 0
                while all(taken < len(queues[s]) for s in seqs):
                    idx += [queues[s][taken] for s in seqs]
                    taken += 1
                    if (taken + 1) * len(seqs) > n_ubatch:
                        break
            for i in idx:
                used[i] = True
            per_seq = len(idx) // (1 if n_seq_max == 1 else n_seqs)
            out.append((min(pos_of[i] for i in idx), per_seq))
    return out


@pytest.mark.parametrize("n_ctx", [4, 8, 16, 100, 300, 512, 600, 1000, 1030, 2048, 2100, 5000])
def test_micro_batches_follow_llama_cpp_batch_allocator(n_ctx):
    n_seq_max = max(1, 2048 // n_ctx)
    for n_seqs in sorted({1, 2, 3, n_seq_max}):
        if n_seqs <= n_seq_max:
            assert micro_batches(n_ctx, n_seqs) == simulate_llama_imatrix_ubatches(n_ctx, n_seqs, 2048, 512), n_seqs
    assert micro_batches(40, 1, 40, 16) == simulate_llama_imatrix_ubatches(40, 1, 40, 16)
    assert micro_batches(10, 3, 40, 16) == simulate_llama_imatrix_ubatches(10, 3, 40, 16)


def test_progress_reports_tokens_chunks_and_rate(tiny, calibration, tmp_path):
    _, model = tiny("qwen2")
    seen = []
    compute_imatrix_file(model, str(calibration), tmp_path / "i.gguf", n_ctx=32, n_chunks=3, progress=seen.append)
    assert seen[-1].chunks_done == seen[-1].n_chunks == 3
    assert seen[-1].tokens_done == seen[-1].n_tokens == 96
    assert all(a.tokens_done < b.tokens_done for a, b in zip(seen, seen[1:]))
    assert seen[-1].tokens_per_second > 0 and seen[-1].eta_seconds == 0


# --- the collector in isolation ---------------------------------------------------------------------------------

def test_collector_filters_names_and_small_batches():
    rng = np.random.default_rng(1)
    c = ImatrixCollector(process_output=False)
    x = rng.standard_normal((MIN_ROWS, 8)).astype(np.float32)
    c("blk.0.attn_q.weight", x)
    c("blk.0.ffn_down.weight", x[:MIN_ROWS - 1])     # 15 rows: ignored
    c("output.weight", x)
    c("token_embd.weight", x)
    assert list(c.sums) == ["blk.0.attn_q.weight"]
    np.testing.assert_allclose(c.sums["blk.0.attn_q.weight"][0], (x.astype(np.float64) ** 2).sum(0), rtol=1e-6)
    assert c.counts["blk.0.attn_q.weight"].tolist() == [MIN_ROWS]
    with_output = ImatrixCollector(process_output=True)
    with_output("output.weight", x)
    with_output("token_embd.weight", x)
    assert list(with_output.sums) == ["output.weight"]


def test_collector_sums_many_calls_like_float64():
    rng = np.random.default_rng(2)
    c = ImatrixCollector()
    xs = [rng.standard_normal((rows, 32)).astype(np.float32) * scale
          for rows, scale in ((16, 1.0), (500, 3.0), (40, 1e-3), (2048, 10.0))]
    for x in xs:
        c("blk.3.ffn_up.weight", x)
    ref = sum((x.astype(np.float64) ** 2).sum(0) for x in xs)
    np.testing.assert_allclose(c.sums["blk.3.ffn_up.weight"][0], ref, rtol=1e-5)
    assert c.counts["blk.3.ffn_up.weight"].tolist() == [16 + 500 + 40 + 2048]
    assert c.chunk_count(512) == (16 + 500 + 40 + 2048) // 512


def test_collector_refuses_non_finite_activations():
    c = ImatrixCollector()
    x = np.ones((16, 4), np.float32)
    x[3, 2] = np.inf
    with pytest.raises(QtoolError, match="non-finite.*blk.0.attn_q.weight"):
        c("blk.0.attn_q.weight", x)
    # finite inputs whose float32 sum overflows are refused too
    big = ImatrixCollector()
    big("blk.0.attn_q.weight", np.full((16, 4), 4e18, np.float32))
    with pytest.raises(QtoolError, match="non-finite"):
        big("blk.0.attn_q.weight", np.full((16, 4), 4e18, np.float32))


def _file(entries: dict, legacy: bool = False, datasets=("a.txt",)) -> Imatrix:
    return Imatrix({n: ImatrixEntry(np.asarray(s, np.float32).reshape(len(c), -1), np.asarray(c, np.int64))
                    for n, (s, c) in entries.items()}, list(datasets), 0, 0 if legacy else 512, legacy)


def test_merging_adds_gguf_sums_and_rescales_legacy_values():
    c = ImatrixCollector()
    c.add_file(_file({"blk.0.attn_q.weight": ([1.0, 2.0, 4.0], [100])}), chunk_size=512)
    c.add_file(_file({"blk.0.attn_q.weight": ([3.0, 0.5, 1.0], [28]),
                      "blk.0.ffn_up_exps.weight": ([[1.0, 1.0], [2.0, 2.0]], [5, 0])}, datasets=("b.txt",)), 512)
    # legacy values are mean * ncall: back to raw sums with ncall * chunk_size tokens
    c.add_file(_file({"blk.0.attn_q.weight": ([0.25, 0.5, 1.0], [2])}, legacy=True, datasets=("c.txt",)), 512)
    assert c.sums["blk.0.attn_q.weight"].tolist() == [[4.0 + 128.0, 2.5 + 256.0, 5.0 + 512.0]]
    assert c.counts["blk.0.attn_q.weight"].tolist() == [128 + 1024]
    assert c.counts["blk.0.ffn_up_exps.weight"].tolist() == [5, 0]
    assert c.datasets == ["a.txt", "b.txt", "c.txt"]
    # an old file's single count is spread over the experts of a newer one
    c2 = ImatrixCollector()
    c2.add_file(_file({"e": ([1.0, 1.0, 1.0, 1.0], [7])}), 512)
    c2.add_file(_file({"e": ([[1.0, 1.0], [1.0, 1.0]], [1, 2])}), 512)
    assert c2.counts["e"].tolist() == [8, 9]
    with pytest.raises(QtoolError, match="has 2 values, earlier files have 3"):
        c.add_file(_file({"blk.0.attn_q.weight": ([1.0, 2.0], [1])}), 512, "bad.gguf")
    with pytest.raises(QtoolError, match="has 4 counts, earlier files have 2"):
        c2.add_file(_file({"e": ([[1.0]] * 4, [1, 1, 1, 1])}), 512)


def test_collecting_onto_a_merged_entry():
    c = ImatrixCollector()
    c.add_file(_file({"blk.0.attn_q.weight": ([1.0] * 8, [10])}), 512)
    x = np.full((16, 8), 2.0, np.float32)
    c("blk.0.attn_q.weight", x)
    assert c.sums["blk.0.attn_q.weight"].tolist() == [[65.0] * 8] and c.counts["blk.0.attn_q.weight"].tolist() == [26]
    with pytest.raises(QtoolError, match="another model"):
        c("blk.0.attn_q.weight", np.ones((16, 4), np.float32))


# --- files ------------------------------------------------------------------------------------------------------

def _collected(seed: int = 3) -> ImatrixCollector:
    rng = np.random.default_rng(seed)
    c = ImatrixCollector()
    for name, cols in (("blk.0.attn_q.weight", 64), ("blk.0.ffn_down.weight", 96), ("blk.1.attn_q.weight", 64)):
        for _ in range(3):
            c(name, (rng.standard_normal((512, cols)) * rng.gamma(1.0, 1.0, cols)).astype(np.float32))
    c.sums["blk.0.ffn_down.weight"][0, 5] = 0.0        # a dead column
    c.datasets.append("calib.txt")
    return c


def test_round_trip_gguf_and_dat(tmp_path):
    from qtool.evaluate.imatrix import write_collected

    c = _collected()
    im = read_imatrix(write_collected(c, tmp_path / "i.gguf", "gguf", 512, force=False))
    assert (im.legacy, im.datasets, im.chunk_count, im.chunk_size) == (False, ["calib.txt"], 3, 512)
    for name, (sums, counts) in c.entries().items():
        assert np.array_equal(im.entries[name].sums, sums) and np.array_equal(im.entries[name].counts, counts)
    dat = read_imatrix(write_collected(c, tmp_path / "i.dat", "dat", 512, force=False))
    assert (dat.legacy, dat.datasets, dat.chunk_count) == (True, ["calib.txt"], 3)
    for name, (sums, counts) in c.entries().items():
        # the legacy format stores mean * ncall, ncall = ceil(count / chunk size)
        assert dat.entries[name].counts.tolist() == [3]
        expected = (sums / np.float32(counts[0])) * np.float32(3)
        assert np.array_equal(dat.entries[name].sums, expected)
    w_gguf, _ = column_weights(im)
    w_dat, _ = column_weights(dat)
    for name in w_gguf:
        np.testing.assert_allclose(w_dat[name], w_gguf[name], rtol=1e-6)


def test_dat_and_gguf_convert_into_each_other_through_in_file(tmp_path):
    from qtool.evaluate.imatrix import write_collected

    dat = write_collected(_collected(), tmp_path / "a.dat", "dat", 512, force=False)
    r = CliRunner().invoke(main, ["imatrix", "--in-file", str(dat), "-o", str(tmp_path / "b.gguf")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["imatrix", "--in-file", str(tmp_path / "b.gguf"), "-o", str(tmp_path / "c.dat")])
    assert r.exit_code == 0, r.output
    a, b, c = (read_imatrix(tmp_path / n) for n in ("a.dat", "b.gguf", "c.dat"))
    assert (b.legacy, c.legacy) == (False, True)
    assert b.datasets == c.datasets == ["calib.txt"] and b.chunk_count == c.chunk_count == 3
    assert all(e.counts.tolist() == [3 * 512] for e in b.entries.values())
    wa, wb, wc = (column_weights(m)[0] for m in (a, b, c))
    for name in wa:
        np.testing.assert_allclose(wb[name], wa[name], rtol=1e-6)
        np.testing.assert_allclose(wc[name], wa[name], rtol=1e-6)


def test_format_follows_the_name_unless_given(tmp_path):
    src = tmp_path / "src.gguf"
    write_imatrix_gguf(src, _collected().entries(), datasets=["x"], chunk_count=3, chunk_size=512)
    for name, fmt, legacy in (("a.dat", None, True), ("b.imatrix", None, False), ("c.dat", "gguf", False),
                              ("d.gguf", "dat", True)):
        args = ["imatrix", "--in-file", str(src), "-o", str(tmp_path / name)] + (["--format", fmt] if fmt else [])
        assert CliRunner().invoke(main, args).exit_code == 0
        assert read_imatrix(tmp_path / name).legacy is legacy, name


# --- statistics -------------------------------------------------------------------------------------------------

def test_stats_of_gguf_and_legacy_files(tmp_path):
    from qtool.evaluate.imatrix import write_collected

    c = _collected()
    c.add_file(_file({"blk.2.attn_q.weight": ([0.0, 4.0, 8.0], [512])}), 512)    # fewer tokens, a zero column
    path = write_collected(c, tmp_path / "i.gguf", "gguf", 512, force=False)
    stats = {s.name: s for s in tensor_stats(read_imatrix(path))}
    assert [s.name for s in tensor_stats(read_imatrix(path))] == [
        "blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_q.weight", "blk.2.attn_q.weight"]
    means = c.sums["blk.0.ffn_down.weight"][0].astype(np.float64) / 1536
    s = stats["blk.0.ffn_down.weight"]
    assert (s.tokens, s.coverage, s.zero_columns, s.n_cols) == (1536, 1.0, 1, 96)
    assert s.total == pytest.approx(means.sum(), rel=1e-9) and s.max == pytest.approx(means.max(), rel=1e-9)
    assert s.mean == pytest.approx(means.mean(), rel=1e-9) and s.min == 0.0
    s2 = stats["blk.2.attn_q.weight"]
    assert (s2.tokens, s2.zero_columns) == (512, 1)
    assert s2.coverage == pytest.approx(1 / 3) and s2.total == pytest.approx(12 / 512)
    dat_stats = {s.name: s for s in tensor_stats(read_imatrix(write_collected(c, tmp_path / "i.dat", "dat", 512,
                                                                                 force=False)))}
    assert dat_stats["blk.0.ffn_down.weight"].total == pytest.approx(s.total, rel=1e-6)
    assert dat_stats["blk.2.attn_q.weight"].chunks == 1 and dat_stats["blk.0.attn_q.weight"].chunks == 3


def test_show_prints_the_table_and_warns(tiny, tmp_path):
    from qtool.evaluate.imatrix import write_collected

    _, model = tiny("llama-spm")
    c = _collected()
    c.sums = {k: v for k, v in c.sums.items() if k != "blk.1.attn_q.weight"}
    path = write_collected(c, tmp_path / "i.gguf", "gguf", 512, force=False)
    r = CliRunner().invoke(main, ["imatrix", "--show", str(path), str(model)])
    assert r.exit_code == 0, r.output
    assert "blk.0.ffn_down.weight" in r.output and "calib.txt" in r.output
    assert "1 columns in 1 tensors" in r.output
    # the model's matmul weights without an entry: all but blk.0.attn_q and blk.0.ffn_down
    assert "12 matrices of the model have no entry" in r.output
    missing = summarize_imatrix(path, model).missing
    assert len(missing) == 12 and "blk.1.attn_q.weight" in missing and "blk.0.attn_q.weight" not in missing


# --- bad input ----------------------------------------------------------------------------------------------------

def _cli(*args: str):
    return CliRunner().invoke(main, ["imatrix", *args])


def _one_line_error(r, pattern: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    assert pattern in lines[0], lines[0]


def test_in_file_that_is_not_an_imatrix(tiny, calibration, tmp_path):
    _, model = tiny("llama-spm")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(struct.pack("<i", 3) + b"\x00" * 5)
    _one_line_error(_cli(str(model), "-f", str(calibration), "--in-file", str(junk), "-o", str(tmp_path / "o.gguf")),
                    "not an imatrix file")
    # a model is a GGUF but not an imatrix
    _one_line_error(_cli("--in-file", str(model), "-o", str(tmp_path / "o.gguf")), "not an imatrix file")
    _one_line_error(_cli("--show", str(junk)), "not an imatrix file")
    assert not (tmp_path / "o.gguf").exists()


def test_calibration_text_shorter_than_one_chunk(tiny, tmp_path):
    _, model = tiny("llama-spm")
    short = tmp_path / "short.txt"
    short.write_text("Just a few words.")
    _one_line_error(_cli(str(model), "-f", str(short), "-o", str(tmp_path / "o.gguf")), "fewer than one chunk")
    assert not (tmp_path / "o.gguf").exists()


def test_in_file_from_another_model(tiny, calibration, tmp_path):
    _, llama = tiny("llama-spm")
    _, qwen2 = tiny("qwen2")
    other = tmp_path / "qwen2.gguf"
    compute_imatrix_file(qwen2, str(calibration), other, n_ctx=32, n_chunks=1)
    # the same tensor names, but qwen2's ffn_down takes 160 inputs and llama-spm's 176
    _one_line_error(_cli(str(llama), "-f", str(calibration), "--ctx", "32", "--in-file", str(other),
                         "-o", str(tmp_path / "o.gguf")), "the imatrix was computed on another model")
    alien = tmp_path / "alien.gguf"
    write_imatrix_gguf(alien, {"blk.7.attn_q.weight": (np.ones(64, np.float32), [16])}, datasets=[], chunk_count=0,
                       chunk_size=512)
    _one_line_error(_cli(str(llama), "--in-file", str(alien), "-o", str(tmp_path / "o.gguf")),
                    "names no tensor of")
    assert not (tmp_path / "o.gguf").exists()


def test_existing_output_needs_force_and_is_checked_before_collecting(tiny, calibration, tmp_path):
    _, model = tiny("llama-spm")
    out = tmp_path / "i.gguf"
    out.write_bytes(b"old")
    _one_line_error(_cli(str(model), "-f", str(calibration), "--ctx", "32", "-o", str(out)), "already exists")
    assert out.read_bytes() == b"old"
    r = _cli(str(model), "-f", str(calibration), "--ctx", "32", "--chunks", "2", "-o", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert read_imatrix(out).chunk_count == 2


def test_other_bad_arguments(tiny, calibration, tmp_path):
    _, model = tiny("llama-spm")
    _one_line_error(_cli(str(model), "-o", str(tmp_path / "o.gguf")), "missing --dataset")
    _one_line_error(_cli(str(model), "-f", str(calibration), "--chunks", "0", "-o", str(tmp_path / "o.gguf")),
                    "--chunks must be positive")
    _one_line_error(_cli(str(model), "-f", str(calibration), "-o", str(tmp_path / "no" / "o.gguf")),
                    "does not exist")
    imx = write_imatrix_gguf(tmp_path / "x.gguf", _collected().entries(), datasets=[], chunk_count=0, chunk_size=512)
    _one_line_error(_cli(str(imx), "-f", str(calibration), "-o", str(tmp_path / "o.gguf")),
                    "is an imatrix file, not a model")
    _one_line_error(_cli("-f", str(calibration), "-o", str(tmp_path / "o.gguf")), "needs a MODEL")


def test_cli_collects_and_reports(tiny, calibration, tmp_path):
    _, model = tiny("qwen2")
    out = tmp_path / "i.dat"
    r = _cli(str(model), "--dataset", str(calibration), "--ctx", "32", "--chunks", "2", "-o", str(out))
    assert r.exit_code == 0, r.output
    assert str(out) in r.output and "2 chunks of 32 tokens" in r.output
    im = read_imatrix(out)
    assert im.legacy and im.chunk_count == 2 and im.datasets == [str(calibration)]
