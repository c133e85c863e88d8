"""The tiny HF checkpoints of tests.fixtures.checkpoints: they load, and have the shapes their
configs imply (shapes are recomputed here from the config, independently of the fixture code)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from tests.fixtures.checkpoints import (
    DROP,
    VARIANTS,
    load_state_dict_bin,
    make_checkpoint,
    read_checkpoint_tensors,
    tokenizer_vocab,
)
from tests.fixtures.conftest_helpers import checkpoint_factory  # noqa: F401  (session fixture)
from tests.interop import need_module

QWEN35 = ["qwen35", "qwen35moe", "qwen35-vl", "qwen35moe-vl"]     # checked against transformers' own modeling
ALL = sorted(v for v in VARIANTS if v not in QWEN35 and v != "qwen35moe-per-expert")


def _cfg(d: Path) -> dict:
    return json.loads((d / "config.json").read_text(encoding="utf-8"))


def _st_header(p: Path) -> dict:
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _expected(cfg: dict, has_inv_freq: bool) -> dict[str, tuple[int, ...]]:
    """Shapes straight from the HF modeling code of each family."""
    mt = cfg["model_type"]
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or H // nh
    ff = cfg["intermediate_size"]
    exp = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.get("tie_word_embeddings", False):
        exp["lm_head.weight"] = (V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        exp.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
        if mt in ("qwen2_moe", "qwen3_moe"):
            n_exp, ff_exp = cfg["num_experts"], cfg["moe_intermediate_size"]
            exp[p + "mlp.gate.weight"] = (n_exp, H)
            for x in range(n_exp):
                exp.update({p + f"mlp.experts.{x}.gate_proj.weight": (ff_exp, H),
                            p + f"mlp.experts.{x}.up_proj.weight": (ff_exp, H),
                            p + f"mlp.experts.{x}.down_proj.weight": (H, ff_exp)})
            if mt == "qwen2_moe":
                sh = cfg["shared_expert_intermediate_size"]
                exp.update({p + "mlp.shared_expert.gate_proj.weight": (sh, H),
                            p + "mlp.shared_expert.up_proj.weight": (sh, H),
                            p + "mlp.shared_expert.down_proj.weight": (H, sh),
                            p + "mlp.shared_expert_gate.weight": (1, H)})
        else:
            exp.update({p + "mlp.gate_proj.weight": (ff, H), p + "mlp.up_proj.weight": (ff, H),
                        p + "mlp.down_proj.weight": (H, ff)})
        if mt == "baichuan":
            exp[p + "self_attn.W_pack.weight"] = (3 * H, H)
            exp[p + "self_attn.o_proj.weight"] = (H, H)
        else:
            exp.update({p + "self_attn.q_proj.weight": (nh * hd, H),
                        p + "self_attn.k_proj.weight": (nkv * hd, H),
                        p + "self_attn.v_proj.weight": (nkv * hd, H),
                        p + "self_attn.o_proj.weight": (H, nh * hd)})
        if mt in ("qwen2", "qwen2_moe"):
            exp.update({p + "self_attn.q_proj.bias": (nh * hd,), p + "self_attn.k_proj.bias": (nkv * hd,),
                        p + "self_attn.v_proj.bias": (nkv * hd,)})
        if mt in ("qwen3", "qwen3_moe"):
            exp.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if has_inv_freq:
            exp[p + "self_attn.rotary_emb.inv_freq"] = (hd // 2,)
    return exp


@pytest.mark.parametrize("variant", ALL)
def test_default_checkpoint_shapes_and_config(variant, checkpoint_factory):  # noqa: F811
    d = checkpoint_factory(variant)
    cfg = _cfg(d)
    tensors = read_checkpoint_tensors(d)
    has_inv_freq = any(k.endswith("rotary_emb.inv_freq") for k in tensors)
    assert has_inv_freq == (variant in ("baichuan-7b", "baichuan2"))
    exp = _expected(cfg, has_inv_freq)
    assert {k: v.shape for k, v in tensors.items()} == exp
    for k, v in tensors.items():
        assert v.dtype == np.float32 and np.isfinite(v).all(), k

    # config realism
    for key in ("architectures", "model_type", "torch_dtype", "vocab_size", "bos_token_id",
                "eos_token_id", "rms_norm_eps", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size", "tie_word_embeddings"):
        assert key in cfg, key
    assert cfg["torch_dtype"] == "float32"
    n_tok = tokenizer_vocab(d)
    if cfg["model_type"] in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        assert cfg["vocab_size"] == 151936 and n_tok <= 151936
    else:
        assert cfg["vocab_size"] == n_tok
    assert (d / "generation_config.json").exists()
    assert (d / "tokenizer.model").exists() or (d / "tokenizer.json").exists()

    if variant == "llama-bpe":
        assert cfg["num_key_value_heads"] == 2 and cfg["num_attention_heads"] == 4
        assert cfg["rope_scaling"]["rope_type"] == "llama3" and cfg["tie_word_embeddings"] is True
    if variant == "qwen3":
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]
    if variant in ("qwen2moe", "qwen3moe"):
        assert 4 <= cfg["num_experts"] <= 8 and cfg["num_experts_per_tok"] == 2
        assert cfg["tie_word_embeddings"] is False
        experts = [tensors[f"model.layers.0.mlp.experts.{x}.up_proj.weight"] for x in range(cfg["num_experts"])]
        assert len({e.tobytes() for e in experts}) == len(experts)       # every expert distinct
        # a clear-cut top-k: the router's logits spread well beyond float rounding
        assert tensors["model.layers.0.mlp.gate.weight"].std() > 0.1
    if variant == "baichuan-7b":
        assert cfg["num_hidden_layers"] == 32 and (d / "pytorch_model.bin").exists()
    if variant == "baichuan-13b":
        assert cfg["num_hidden_layers"] == 40 and "model_max_length" in cfg
        assert "max_position_embeddings" not in cfg
    if variant == "baichuan2":
        assert "NormHead" in (d / "modeling_baichuan.py").read_text()
        norms = np.linalg.norm(tensors["lm_head.weight"], axis=1)
        assert not np.allclose(norms, 1.0, atol=1e-3)


@pytest.mark.parametrize("variant", QWEN35)
def test_qwen35_checkpoints_match_transformers(variant, checkpoint_factory):  # noqa: F811
    """Every text (and vision) tensor is named and shaped as transformers' Qwen3.5 classes name and shape them; the
    MTP block (which transformers does not load) repeats a full-attention layer, plus fc and its three norms."""
    need_module("transformers")
    torch = need_module("torch")
    import transformers

    d = checkpoint_factory(variant)
    config = transformers.AutoConfig.from_pretrained(d)
    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: v.shape for k, v in read_checkpoint_tensors(d).items()}
    text = lambda sd: {k: v for k, v in sd.items() if not k.startswith(("mtp.", "model.visual."))}  # noqa: E731
    assert text(got) == text(want)
    visual = {k: v for k, v in got.items() if k.startswith("model.visual.")}
    assert bool(visual) == variant.endswith("-vl")
    assert all(want[k] == v for k, v in visual.items())
    pre = "model.language_model." if variant.endswith("-vl") else "model."
    full = pre + "layers.1."          # the fixtures' first full-attention layer
    assert config.get_text_config().layer_types[1] == "full_attention"
    mtp_layer = {k[len("mtp.layers.0."):]: v for k, v in got.items() if k.startswith("mtp.layers.0.")}
    assert mtp_layer == {k[len(full):]: v for k, v in got.items() if k.startswith(full)}
    H = config.get_text_config().hidden_size
    assert {k: v for k, v in got.items() if k.startswith("mtp.") and not k.startswith("mtp.layers.")} == {
        "mtp.fc.weight": (H, 2 * H), "mtp.norm.weight": (H,), "mtp.pre_fc_norm_embedding.weight": (H,),
        "mtp.pre_fc_norm_hidden.weight": (H,)}


def test_qwen35moe_per_expert_is_the_fused_layout_split(checkpoint_factory):  # noqa: F811
    fused = {k: v.shape for k, v in read_checkpoint_tensors(checkpoint_factory("qwen35moe")).items()}
    split = {k: v.shape for k, v in read_checkpoint_tensors(checkpoint_factory("qwen35moe-per-expert")).items()}
    assert {k for k in split if ".experts." not in k} == {k for k in fused if ".experts." not in k}
    for p in ("model.layers.0.", "model.layers.3.", "mtp.layers.0."):
        n, f2, H = fused[p + "mlp.experts.gate_up_proj"]
        for x in range(n):
            assert split[f"{p}mlp.experts.{x}.gate_proj.weight"] == (f2 // 2, H)
            assert split[f"{p}mlp.experts.{x}.up_proj.weight"] == (f2 // 2, H)
            assert split[f"{p}mlp.experts.{x}.down_proj.weight"] == fused[p + "mlp.experts.down_proj"][1:]
        assert f"{p}mlp.experts.{n}.up_proj.weight" not in split


@pytest.mark.parametrize("variant,files", [
    ("llama-spm", ["model.safetensors"]),
    ("llama-bpe", ["model.safetensors"]),
    ("qwen2", ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json"]),
    ("qwen3", ["model.safetensors"]),
    ("qwen2moe", [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + ["model.safetensors.index.json"]),
    ("qwen3moe", [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + ["model.safetensors.index.json"]),
    ("baichuan-7b", ["pytorch_model.bin"]),
    ("baichuan-13b", ["model.safetensors"]),
    ("baichuan2", ["pytorch_model.bin"]),
])
def test_weight_files(variant, files, checkpoint_factory):  # noqa: F811
    d = checkpoint_factory(variant)
    weight_files = sorted(p.name for p in d.iterdir()
                          if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    assert weight_files == sorted(files)


def test_sharded_index_consistent(checkpoint_factory):  # noqa: F811
    d = checkpoint_factory("qwen2")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    seen: dict[str, str] = {}
    total = 0
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(d / shard), framework="numpy") as f:
            for k in f.keys():
                assert k not in seen
                seen[k] = shard
                total += f.get_tensor(k).nbytes
    assert seen == index["weight_map"]
    assert total == index["metadata"]["total_size"]
    assert all(len([s for s in seen.values() if s == sh]) > 0 for sh in set(seen.values()))


@pytest.mark.parametrize("dtype,st", [("float16", "F16"), ("bfloat16", "BF16")])
def test_dtypes_safetensors(dtype, st, checkpoint_factory):  # noqa: F811
    d = checkpoint_factory("llama-spm", dtype=dtype)
    assert _cfg(d)["torch_dtype"] == dtype
    header = _st_header(d / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {st}
    # the float32 checkpoint with the same seed, rounded, equals the stored values
    ref = read_checkpoint_tensors(checkpoint_factory("llama-spm"))["model.layers.0.mlp.up_proj.weight"]
    got = read_checkpoint_tensors(d)["model.layers.0.mlp.up_proj.weight"]
    if dtype == "float16":
        assert np.array_equal(got, ref.astype(np.float16).astype(np.float32))
    else:
        assert np.abs(got - ref).max() <= np.abs(ref).max() * 2 ** -8
        assert np.array_equal(got.view(np.uint32) & 0xFFFF, np.zeros_like(got, dtype=np.uint32))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_bin_dtypes(dtype, tmp_path):
    d = make_checkpoint("baichuan2", tmp_path / "b2", dtype=dtype, tokenizer=False, vocab_size=500,
                        num_hidden_layers=2)
    sd = load_state_dict_bin(d / "pytorch_model.bin")
    assert sd["model.layers.1.self_attn.W_pack.weight"].shape == (96, 32)
    import zipfile

    with zipfile.ZipFile(d / "pytorch_model.bin") as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    storage = {"float32": b"FloatStorage", "float16": b"HalfStorage", "bfloat16": b"BFloat16Storage"}[dtype]
    assert storage in pkl


def test_bin_loads_with_torch(tmp_path):
    torch = need_module("torch")
    d = make_checkpoint("baichuan-7b", tmp_path / "b7", dtype="bfloat16", tokenizer=False, vocab_size=300,
                        num_hidden_layers=2)
    sd = torch.load(d / "pytorch_model.bin", map_location="cpu", mmap=True, weights_only=True)
    mine = load_state_dict_bin(d / "pytorch_model.bin")
    assert list(sd) == list(mine)
    for k, v in sd.items():
        assert v.dtype == torch.bfloat16
        assert np.array_equal(v.float().numpy(), mine[k])


def test_overrides(tmp_path):
    d = make_checkpoint("qwen2", tmp_path / "q", tokenizer=False, vocab_size=1000, num_hidden_layers=3,
                        tie_word_embeddings=False, sliding_window=DROP, fmt="safetensors",
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    cfg = _cfg(d)
    assert "sliding_window" not in cfg and cfg["rope_scaling"]["type"] == "yarn"
    t = read_checkpoint_tensors(d)
    assert t["lm_head.weight"].shape == (1000, 64)
    assert "model.layers.2.self_attn.q_proj.bias" in t and "model.layers.3.mlp.up_proj.weight" not in t

    d2 = make_checkpoint("llama-spm", tmp_path / "l", tokenizer=False, vocab_size=500, tie_word_embeddings=True,
                         num_key_value_heads=2, attention_bias=True, mlp_bias=True, fmt="sharded", n_shards=3)
    t2 = read_checkpoint_tensors(d2)
    assert "lm_head.weight" not in t2
    assert t2["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert t2["model.layers.0.self_attn.o_proj.bias"].shape == (64,)
    assert t2["model.layers.1.mlp.down_proj.bias"].shape == (64,)
    assert len(list(d2.glob("model-*-of-00003.safetensors"))) == 3


def test_baichuan2_padded_vocab(tmp_path):
    d = make_checkpoint("baichuan2", tmp_path / "b2", vocab_size=125696, num_hidden_layers=2)
    assert tokenizer_vocab(d) == 64000 and _cfg(d)["vocab_size"] == 125696
    t = read_checkpoint_tensors(d)
    assert t["model.embed_tokens.weight"].shape == (125696, 32)
    assert t["lm_head.weight"].shape == (125696, 32)


def test_deterministic(tmp_path):
    def digest(d: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(d.iterdir()):
            h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    kw = dict(tokenizer=False, vocab_size=300)
    a = make_checkpoint("baichuan-13b", tmp_path / "a", **kw)
    b = make_checkpoint("baichuan-13b", tmp_path / "b", **kw)
    c = make_checkpoint("baichuan-13b", tmp_path / "c", seed=1, **kw)
    assert digest(a) == digest(b) != digest(c)


def test_vocab_size_below_tokenizer_rejected(tmp_path):
    with pytest.raises(ValueError):
        make_checkpoint("llama-spm", tmp_path / "x", vocab_size=100)
