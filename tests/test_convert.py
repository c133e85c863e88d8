"""qtool convert on tiny checkpoints of every variant: names, shapes, types, values, metadata, tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from qtool.cli import main
from qtool.gguf_io import GGUFFile, read_gguf
from tests.fixtures.checkpoints import make_checkpoint, read_checkpoint_tensors

VARIANTS = ["llama-spm", "llama-bpe", "qwen2", "qwen3", "baichuan-7b", "baichuan-13b", "baichuan2"]
VOCAB_OF = {"llama-spm": "llama-spm", "llama-bpe": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2",
            "baichuan-7b": "baichuan", "baichuan-13b": "baichuan", "baichuan2": "baichuan"}
ARCH_OF = {"llama-spm": "llama", "llama-bpe": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
           "baichuan-7b": "baichuan", "baichuan-13b": "baichuan", "baichuan2": "baichuan"}


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def ckpt_cache(checkpoint_factory):
    return checkpoint_factory


def convert(model_dir: Path, out: Path, *extra: str) -> GGUFFile:
    code, stdout, stderr = run("convert", model_dir, "--outfile", out, *extra)
    assert code == 0, stderr
    assert str(out) in stdout
    return read_gguf(out)


def kv(g: GGUFFile) -> dict:
    return {name: v.value for name, v in g.kv.items()}


@pytest.fixture(scope="module")
def converted(ckpt_cache, tmp_path_factory):
    """(model dir, GGUF) for a variant and outtype, converted once per module."""
    cache: dict[tuple, tuple[Path, GGUFFile]] = {}

    def get(variant: str, outtype: str) -> tuple[Path, GGUFFile]:
        if (variant, outtype) not in cache:
            d = ckpt_cache(variant)
            cache[variant, outtype] = d, convert(d, tmp_path_factory.mktemp("out") / "m.gguf", "--outtype", outtype)
        return cache[variant, outtype]
    return get


# --- an independent statement of the HF -> GGUF mapping (not imported from qtool) ---------------------------

def permute_ref(w: np.ndarray, n_head: int) -> np.ndarray:
    """W'[h*d + 2i + j] = W[h*d + j*d/2 + i], written out with explicit indices."""
    rows = w.shape[0]
    d = rows // n_head
    out = np.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = w[h * d + j * (d // 2) + i]
    return out


def expected_gguf(variant: str, config: dict, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, from the HF tensors and the config alone."""
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    arch = ARCH_OF[variant]
    simple = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
              "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.q_proj.bias": "attn_q.bias",
              "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
              "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    out: dict[str, np.ndarray] = {}
    for name, w in hf.items():
        w = w.astype(np.float32)
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name == "model.embed_tokens.weight":
            out["token_embd.weight"] = w
        elif name == "model.norm.weight":
            out["output_norm.weight"] = w
        elif name == "lm_head.weight":
            if variant == "baichuan2":
                w = w / np.linalg.norm(w.astype(np.float64), axis=1, keepdims=True).astype(np.float32)
            out["output.weight"] = w
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest == "self_attn.W_pack.weight":
                e = config["hidden_size"]
                out[f"blk.{layer}.attn_q.weight"] = permute_ref(w[:e], n_head)
                out[f"blk.{layer}.attn_k.weight"] = permute_ref(w[e:2 * e], n_head)
                out[f"blk.{layer}.attn_v.weight"] = w[2 * e:]
                continue
            if arch == "llama" and rest.startswith("self_attn.q_proj"):
                w = permute_ref(w, n_head)
            elif arch == "llama" and rest.startswith("self_attn.k_proj"):
                w = permute_ref(w, n_kv)
            out[f"blk.{layer}.{simple[rest]}"] = w
    return out


def tensors(g: GGUFFile) -> dict:
    return {t.name: t for t in g.tensors}


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_tensors_equal_the_checkpoint(variant, converted):
    d, g = converted(variant, "f32")
    config = json.loads((d / "config.json").read_text())
    want = expected_gguf(variant, config, read_checkpoint_tensors(d))
    got = tensors(g)
    if variant == "llama-bpe":
        assert "rope_freqs.weight" in got
        got.pop("rope_freqs.weight")
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        t = got[name]
        assert t.qtype == T.F32, name
        arr = g.array(t)
        assert arr.shape == w.shape, name
        if variant == "baichuan2" and name == "output.weight":
            np.testing.assert_allclose(arr, w, rtol=1e-6, atol=1e-7)
        else:
            assert np.array_equal(arr, w), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_metadata_and_tokenizer_match_sources(variant, converted, vocab_dir):
    d, g = converted(variant, "f16")
    config = json.loads((d / "config.json").read_text())
    meta = kv(g)
    arch = ARCH_OF[variant]
    assert meta["general.architecture"] == arch
    assert meta["general.file_type"] == 1
    assert meta[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert meta[f"{arch}.embedding_length"] == config["hidden_size"]
    assert meta[f"{arch}.feed_forward_length"] == config["intermediate_size"]
    assert meta[f"{arch}.attention.head_count"] == config["num_attention_heads"]
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    ctx = config.get("max_position_embeddings", config.get("model_max_length"))
    assert meta[f"{arch}.context_length"] == ctx
    if arch == "baichuan":
        assert meta["baichuan.rope.dimension_count"] == config["hidden_size"] // config["num_attention_heads"]
        assert "baichuan.rope.freq_base" not in meta
    else:
        assert meta[f"{arch}.attention.head_count_kv"] == config.get("num_key_value_heads", config["num_attention_heads"])
        assert meta[f"{arch}.rope.freq_base"] == pytest.approx(config.get("rope_theta", 10000.0))

    # The tokenizer arrays equal the llama.cpp vocabulary the fixture tokenizer was rebuilt from.
    src = kv(read_gguf(vocab_dir / f"ggml-vocab-{VOCAB_OF[variant]}.gguf"))
    # Past the tokenizer's own tokens, vocab_size padding: llama.cpp's converter writes "[PAD{i}]" with type
    # UNUSED today (the older converter that made the shared vocab files wrote USER_DEFINED).
    n_src = sum(1 for tok in src["tokenizer.ggml.tokens"] if not tok.startswith("[PAD"))
    assert all(t == f"[PAD{i}]" for i, t in enumerate(meta["tokenizer.ggml.tokens"]) if i >= n_src)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"]
    assert tokens[:n_src] == src["tokenizer.ggml.tokens"][:n_src]
    assert meta["tokenizer.ggml.model"] == src["tokenizer.ggml.model"]
    if src["tokenizer.ggml.model"] == "gpt2":
        assert meta["tokenizer.ggml.merges"] == src["tokenizer.ggml.merges"]
        assert meta["tokenizer.ggml.pre"] == src["tokenizer.ggml.pre"]
    else:
        assert meta["tokenizer.ggml.pre"] == "default"
        np.testing.assert_array_equal(np.float32(meta["tokenizer.ggml.scores"][:n_src]),
                                      np.float32(src["tokenizer.ggml.scores"][:n_src]))
    assert meta["tokenizer.ggml.token_type"][:n_src] == src["tokenizer.ggml.token_type"][:n_src]

    # F16 for 2-D weights, F32 for norms, biases and generated 1-D tensors.
    for t in g.tensors:
        want = T.F32 if (len(t.shape) == 1 or t.name.endswith("_norm.weight") or t.name.endswith(".bias")) else T.F16
        assert t.qtype == want, t.name


def test_llama3_rope_freqs(converted):
    d, g = converted("llama-bpe", "f16")
    config = json.loads((d / "config.json").read_text())
    assert g.tensors[0].name == "rope_freqs.weight"     # generated tensors come first, as in llama.cpp
    rs = config["rope_scaling"]
    dim = config["head_dim"]
    inv = config["rope_theta"] ** -(np.arange(0, dim, 2) / dim)
    wavelen = 2 * np.pi / inv
    lo_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    hi_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    smooth = (rs["original_max_position_embeddings"] / wavelen - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
    want = np.where(wavelen < hi_wl, 1.0, np.where(wavelen > lo_wl, rs["factor"], 1 / ((1 - smooth) / rs["factor"] + smooth)))
    np.testing.assert_allclose(g.array(g.tensors[0]), want, rtol=1e-5)
    meta = kv(g)
    assert not any(k.startswith("llama.rope.scaling") for k in meta)


def test_baichuan2_normhead_rows_have_unit_norm_and_can_be_forced_off(ckpt_cache, tmp_path):
    d = ckpt_cache("baichuan2")
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "a.gguf", "--outtype", "f32")
    assert code == 0 and "NormHead" in stderr
    g = read_gguf(tmp_path / "a.gguf")
    norms = np.linalg.norm(g.array(tensors(g)["output.weight"]).astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    g = convert(d, tmp_path / "b.gguf", "--outtype", "f32", "--no-normhead")
    assert not np.allclose(np.linalg.norm(g.array(tensors(g)["output.weight"]), axis=1), 1.0)


def test_baichuan_7b_is_not_normheaded_and_13b_uses_model_max_length(ckpt_cache, tmp_path):
    code, _, stderr = run("convert", ckpt_cache("baichuan-7b"), "--outfile", tmp_path / "a.gguf", "--outtype", "f32")
    assert code == 0 and "NormHead" not in stderr and "RoPE" in stderr
    code, _, stderr = run("convert", ckpt_cache("baichuan-13b"), "--outfile", tmp_path / "b.gguf")
    assert code == 0 and "ALiBi" in stderr


def test_baichuan_other_depth_warns_loudly(ckpt_cache, tmp_path):
    d = ckpt_cache("baichuan-7b", num_hidden_layers=3)
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "a.gguf")
    assert code == 0
    assert "WARNING" in stderr and "NO position encoding" in stderr


@pytest.mark.parametrize("dtype,outtype,weight_type", [("bfloat16", "auto", T.BF16), ("float16", "auto", T.F16),
                                                       ("float32", "auto", T.F16), ("float32", "bf16", T.BF16),
                                                       ("float16", "q8_0", T.Q8_0)])
def test_outtypes(dtype, outtype, weight_type, ckpt_cache, tmp_path):
    d = ckpt_cache("qwen2", dtype=dtype)
    out = tmp_path / "m.gguf"
    g = convert(d, out, "--outtype", outtype)
    types = {t.name: t.qtype for t in g.tensors}
    assert types["blk.0.ffn_up.weight"] == weight_type
    assert types["token_embd.weight"] == weight_type
    assert types["blk.0.attn_norm.weight"] == T.F32 and types["blk.0.attn_q.bias"] == T.F32
    hf = read_checkpoint_tensors(d)["model.layers.0.mlp.up_proj.weight"].astype(np.float32)
    got = g.array(tensors(g)["blk.0.ffn_up.weight"])
    tol = {T.BF16: 1e-2, T.F16: 1e-3, T.Q8_0: 1e-2}[weight_type]
    np.testing.assert_allclose(got, hf, atol=tol * np.abs(hf).max())


def test_q8_0_falls_back_to_f16_when_rows_are_not_multiples_of_32(ckpt_cache, tmp_path):
    d = ckpt_cache("qwen2", intermediate_size=200)    # ffn_down rows are 200 long
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf", "--outtype", "q8_0")
    assert code == 0 and "ffn_down" in stderr and "F16" in stderr
    types = {t.name: t.qtype for t in read_gguf(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == T.F16 and types["blk.0.ffn_up.weight"] == T.Q8_0


def test_default_name_lands_in_model_dir(ckpt_cache, tmp_path):
    import shutil
    d = tmp_path / "Qwen2-tiny"
    shutil.copytree(ckpt_cache("qwen2"), d)
    code, stdout, _ = run("convert", d, "--outtype", "f16")
    assert code == 0
    written = Path(stdout.strip())
    assert written.parent == d and written.name.endswith("-F16.gguf") and written.exists()
    assert not [p for p in d.iterdir() if p.name.startswith(".qtool-tmp")]


def test_refuses_to_overwrite_without_force(ckpt_cache, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    code, _, stderr = run("convert", ckpt_cache("qwen3"), "--outfile", out)
    assert code == 2 and "already exists" in stderr and "--force" in stderr
    assert out.read_bytes() == b"precious"
    code, _, _ = run("convert", ckpt_cache("qwen3"), "--outfile", out, "--force")
    assert code == 0 and out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_split_outputs_are_gguf_split_files(converted, tmp_path):
    d, whole = converted("qwen3", "f16")
    code, stdout, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf", "--outtype", "f16",
                               "--split-max-tensors", "7")
    assert code == 0, stderr
    paths = [Path(p) for p in stdout.split()]
    n = len(paths)
    assert n == -(-len(whole.tensors) // 7)
    assert [p.name for p in paths] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    seen = []
    for i, p in enumerate(paths):
        r = read_gguf(p)
        meta = kv(r)
        assert meta["split.no"] == i and meta["split.count"] == n
        assert meta["split.tensors.count"] == len(whole.tensors)
        assert r.kv["split.no"].type.name == "UINT16" and r.kv["split.count"].type.name == "UINT16"
        assert r.kv["split.tensors.count"].type.name == "INT32"
        assert ("tokenizer.ggml.tokens" in meta) == (i == 0)    # only the first shard carries the metadata
        seen += [(t.name, r.raw(t).tobytes()) for t in r.tensors]
    assert seen == [(t.name, whole.raw(t).tobytes()) for t in whole.tensors]
    # by size: every shard but the last stays under the limit
    code, stdout, stderr = run("convert", d, "--outfile", tmp_path / "s.gguf", "--outtype", "f16",
                               "--split-max-size", "200K")
    assert code == 0, stderr
    assert len(stdout.split()) > 1


def test_dry_run_writes_nothing(ckpt_cache, tmp_path):
    code, stdout, _ = run("convert", ckpt_cache("llama-spm"), "--outfile", tmp_path / "m.gguf", "--dry-run")
    assert code == 0
    assert "blk.1.attn_q.weight" in stdout and "llama.block_count" in stdout and "would write" in stdout
    assert list(tmp_path.iterdir()) == []


def test_vocab_only(ckpt_cache, tmp_path):
    g = convert(ckpt_cache("llama-bpe"), tmp_path / "v.gguf", "--vocab-only")
    assert len(g.tensors) == 0
    assert "tokenizer.ggml.tokens" in kv(g)


def test_info_summarizes_a_converted_file(ckpt_cache, tmp_path):
    out = tmp_path / "m.gguf"
    convert(ckpt_cache("qwen2"), out, "--outtype", "q8_0")
    code, stdout, _ = run("info", out, "--json")
    assert code == 0
    s = json.loads(stdout)
    assert s["architecture"] == "qwen2" and s["file_type"] == "MOSTLY_Q8_0"
    assert set(s["types"]) == {"Q8_0", "F32"}
    assert s["tokenizer"]["model"] == "gpt2" and s["tokenizer"]["pre"] == "qwen2"
    assert 8.0 < s["bits_per_weight"] < 8.6
    assert s["file_size"] == out.stat().st_size
    code, stdout, _ = run("info", out)
    assert code == 0 and "bits per weight" in stdout and "Q8_0" in stdout


def test_hub_repo_id_from_an_offline_cache(ckpt_cache, tmp_path):
    """A Hub cache laid out by hand; HF_HUB_OFFLINE=1 so nothing touches the network."""
    import os
    import shutil
    import subprocess
    import sys
    src = ckpt_cache("qwen3")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-qwen3"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "qtool.cli", "convert", "acme/tiny-qwen3", "--outtype", "f16"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    written = Path(res.stdout.strip())
    assert written.parent == tmp_path and written.exists()
    assert kv(read_gguf(written))["general.name"].lower().startswith("acme")
    res = subprocess.run([sys.executable, "-m", "qtool.cli", "convert", "acme/not-there"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "acme/not-there" in res.stderr and "Traceback" not in res.stderr
