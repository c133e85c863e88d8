"""qtool convert on the Qwen3.5 fixtures (Gated DeltaNet hybrids): per-layer tensors, V-head tiling, keys, the MTP
layer, the multimodal layout, laziness, bad input, and the inverse transforms export-hf uses (the export itself:
tests/test_export_hf.py; evaluation: tests/test_eval_qwen35.py).

Byte identity with llama.cpp's converter is tests/test_interop_convert.py's job; here the expected tensors are
stated independently, from the HF tensors and config.json alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType

from qtool.cli import main
from qtool.gguf_io import GGUFFile, read_gguf
from tests.convert_checks import drop_tensor, edited, fails, single_file_copy
from tests.fixtures.checkpoints import DROP, read_checkpoint_tensors, write_safetensors

VARIANTS = ["qwen35", "qwen35moe", "qwen35-vl", "qwen35moe-vl"]

DELTANET = {"attn_qkv.weight", "attn_gate.weight", "ssm_a", "ssm_dt.bias", "ssm_alpha.weight", "ssm_beta.weight",
            "ssm_conv1d.weight", "ssm_norm.weight", "ssm_out.weight"}
ATTENTION = {"attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q_norm.weight",
             "attn_k_norm.weight"}
DENSE_FFN = {"ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}
MOE_FFN = {"ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight",
           "ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"}
NORMS = {"attn_norm.weight", "post_attention_norm.weight"}
NEXTN = {"nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight"}


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def converted(checkpoint_factory, tmp_path_factory):
    cache: dict[tuple, tuple[Path, GGUFFile, str]] = {}

    def get(variant: str, outtype: str, dtype: str = "float32") -> tuple[Path, GGUFFile, str]:
        if (variant, outtype, dtype) not in cache:
            d = checkpoint_factory(variant, dtype=dtype)
            out = tmp_path_factory.mktemp("out") / "m.gguf"
            code, stdout, stderr = run("convert", d, "--outfile", out, "--outtype", outtype)
            assert code == 0, stderr
            cache[variant, outtype, dtype] = d, read_gguf(out), stdout + stderr
        return cache[variant, outtype, dtype]
    return get


def text_config(d: Path) -> dict:
    c = json.loads((d / "config.json").read_text())
    return {**c, **c["text_config"]} if "text_config" in c else c


def tiled(w: np.ndarray, axis: int, nk: int, head: int) -> np.ndarray:
    """Grouped-by-key-head V heads -> tiled order, written as an index list: new head j*nk + k = old head k*r + j."""
    r = w.shape[axis] // (nk * head)
    heads = [k * r + j for j in range(r) for k in range(nk)]
    idx = np.concatenate([np.arange(h * head, (h + 1) * head) for h in heads])
    return np.take(w, idx, axis=axis)


def expected_gguf(c: dict, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array, from the HF tensors by the rules in convert/qwen35.py's docstring."""
    L, nk, dk, dv = c["num_hidden_layers"], c["linear_num_key_heads"], c["linear_key_head_dim"], c["linear_value_head_dim"]
    qk = 2 * nk * dk
    pre = "model.language_model." if "model.language_model.norm.weight" in hf else "model."
    plus1 = lambda w: w + np.float32(1)  # noqa: E731
    out = {"token_embd.weight": hf[pre + "embed_tokens.weight"], "output_norm.weight": plus1(hf[pre + "norm.weight"]),
           "output.weight": hf["lm_head.weight"]}
    rename = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
              "mlp.experts.down_proj": "ffn_down_exps.weight",
              "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
              "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
              "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
              "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
              "linear_attn.norm.weight": "ssm_norm.weight"}
    norms = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}

    def layer(i: int, p: str) -> None:
        for name, w in hf.items():
            if not name.startswith(p):
                continue
            rest = name[len(p):]
            b = f"blk.{i}."
            if rest in rename:
                out[b + rename[rest]] = w
            elif rest in norms:
                out[b + norms[rest]] = plus1(w)
            elif rest == "mlp.experts.gate_up_proj":
                ff = w.shape[1] // 2
                out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = w[:, :ff], w[:, ff:]
            elif rest == "linear_attn.in_proj_qkv.weight":
                out[b + "attn_qkv.weight"] = np.concatenate([w[:qk], tiled(w[qk:], 0, nk, dv)])
            elif rest == "linear_attn.in_proj_z.weight":
                out[b + "attn_gate.weight"] = tiled(w, 0, nk, dv)
            elif rest == "linear_attn.in_proj_a.weight":
                out[b + "ssm_alpha.weight"] = tiled(w, 0, nk, 1)
            elif rest == "linear_attn.in_proj_b.weight":
                out[b + "ssm_beta.weight"] = tiled(w, 0, nk, 1)
            elif rest == "linear_attn.dt_bias":
                out[b + "ssm_dt.bias"] = tiled(w, 0, nk, 1)
            elif rest == "linear_attn.A_log":
                out[b + "ssm_a"] = -np.exp(tiled(w, 0, nk, 1))
            elif rest == "linear_attn.conv1d.weight":
                w = w[:, 0, :]
                out[b + "ssm_conv1d.weight"] = np.concatenate([w[:qk], tiled(w[qk:], 0, nk, dv)])
            elif rest == "linear_attn.out_proj.weight":
                out[b + "ssm_out.weight"] = tiled(w, 1, nk, dv)
            else:
                raise AssertionError(f"test does not know {name}")

    for i in range(L):
        layer(i, f"{pre}layers.{i}.")
    layer(L, "mtp.layers.0.")
    out[f"blk.{L}.nextn.eh_proj.weight"] = hf["mtp.fc.weight"]
    out[f"blk.{L}.nextn.enorm.weight"] = plus1(hf["mtp.pre_fc_norm_embedding.weight"])
    out[f"blk.{L}.nextn.hnorm.weight"] = plus1(hf["mtp.pre_fc_norm_hidden.weight"])
    out[f"blk.{L}.nextn.shared_head_norm.weight"] = plus1(hf["mtp.norm.weight"])
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_tensors_follow_the_checkpoint(variant, converted):
    d, g, _ = converted(variant, "f32")
    want = expected_gguf(text_config(d), read_checkpoint_tensors(d))
    got = {t.name: t for t in g.tensors}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].qtype == T.F32, name
        arr = g.array(got[name])
        assert arr.shape == w.shape, name
        if name.endswith("ssm_a"):       # exp: torch's and numpy's may differ in the last bit
            np.testing.assert_allclose(arr, w, rtol=1e-6, err_msg=name)
        else:
            assert np.array_equal(arr, w), name


def test_v_head_tiling_on_a_small_example():
    from convert.qwen35 import tile_v_heads

    # 2 key heads, 3 value heads each, head size 2: rows are (key head, value head, element)
    w = np.array([f"k{k}v{v}e{e}" for k in range(2) for v in range(3) for e in range(2)])
    got = tile_v_heads(w, 0, 2, 2)
    assert list(got) == [f"k{k}v{v}e{e}" for v in range(3) for k in range(2) for e in range(2)]
    cols = tile_v_heads(np.stack([w, w]), 1, 2, 2)
    assert list(cols[1]) == list(got)


@pytest.mark.parametrize("variant", ["qwen35", "qwen35moe"])
def test_layers_shapes_types_and_keys(variant, converted):
    d, g, _ = converted(variant, "f16")
    c = text_config(d)
    L, H, hd = c["num_hidden_layers"], c["hidden_size"], c["head_dim"]
    nk, nv, dk, dv = (c["linear_num_key_heads"], c["linear_num_value_heads"], c["linear_key_head_dim"],
                      c["linear_value_head_dim"])
    conv = 2 * nk * dk + nv * dv
    moe = variant == "qwen35moe"
    shapes = {t.name: t.shape for t in g.tensors}
    types = {t.name: t.qtype for t in g.tensors}
    ffn = MOE_FFN if moe else DENSE_FFN
    for i in range(L + 1):
        names = {n.split(".", 2)[2] for n in shapes if n.startswith(f"blk.{i}.")}
        recurrent = i < L and c["layer_types"][i] == "linear_attention"
        assert names == (DELTANET if recurrent else ATTENTION) | ffn | NORMS | (NEXTN if i == L else set()), i
        b = f"blk.{i}."
        if recurrent:
            assert shapes[b + "attn_qkv.weight"] == (conv, H)
            assert shapes[b + "attn_gate.weight"] == (nv * dv, H)
            assert shapes[b + "ssm_conv1d.weight"] == (conv, c["linear_conv_kernel_dim"])
            assert shapes[b + "ssm_alpha.weight"] == shapes[b + "ssm_beta.weight"] == (nv, H)
            assert shapes[b + "ssm_a"] == shapes[b + "ssm_dt.bias"] == (nv,)
            assert shapes[b + "ssm_norm.weight"] == (dv,)
            assert shapes[b + "ssm_out.weight"] == (H, nv * dv)
            for n in ("ssm_conv1d.weight", "ssm_a", "ssm_dt.bias", "ssm_norm.weight"):
                assert types[b + n] == T.F32, n
            for n in ("attn_qkv.weight", "attn_gate.weight", "ssm_alpha.weight", "ssm_out.weight"):
                assert types[b + n] == T.F16, n
        else:
            assert shapes[b + "attn_q.weight"] == (2 * c["num_attention_heads"] * hd, H)   # query + output gate
            assert shapes[b + "attn_k.weight"] == (c["num_key_value_heads"] * hd, H)
            assert shapes[b + "attn_output.weight"] == (H, c["num_attention_heads"] * hd)
            assert types[b + "attn_q_norm.weight"] == T.F32
        if moe:
            x, fe = c["num_experts"], c["moe_intermediate_size"]
            assert shapes[b + "ffn_gate_exps.weight"] == shapes[b + "ffn_up_exps.weight"] == (x, fe, H)
            assert shapes[b + "ffn_down_exps.weight"] == (x, H, fe)
            assert types[b + "ffn_gate_inp.weight"] == types[b + "ffn_gate_inp_shexp.weight"] == T.F32
    assert shapes[f"blk.{L}.nextn.eh_proj.weight"] == (H, 2 * H)

    a = variant
    u32 = GGUFValueType.UINT32
    want = {f"{a}.block_count": L + 1, f"{a}.nextn_predict_layers": 1, f"{a}.ssm.conv_kernel": 4,
            f"{a}.ssm.state_size": dk, f"{a}.ssm.group_count": nk, f"{a}.ssm.time_step_rank": nv,
            f"{a}.ssm.inner_size": nv * dv, f"{a}.full_attention_interval": c["full_attention_interval"],
            f"{a}.rope.dimension_count": hd // 4, f"{a}.attention.key_length": hd}
    for k, v in want.items():
        assert g.kv[k].value == v and g.kv[k].type == u32, k
    assert g.kv[f"{a}.attention.recurrent_layers"].value == [t == "linear_attention" for t in c["layer_types"]] + [False]
    assert g.kv[f"{a}.rope.dimension_sections"].value == c["rope_parameters"]["mrope_section"] + [0]
    assert g.kv[f"{a}.rope.freq_base"].value == 1e7
    if moe:
        assert f"{a}.feed_forward_length" not in g.kv
        assert g.kv[f"{a}.expert_shared_feed_forward_length"].value == c["shared_expert_intermediate_size"]
        assert g.kv["general.size_label"].value.startswith(f"{c['num_experts']}x")
    else:
        assert g.kv[f"{a}.feed_forward_length"].value == c["intermediate_size"]


def test_multimodal_checkpoint_gives_the_text_model(converted):
    """The ConditionalGeneration layout converts to the same tensors and keys as the text-only one, vision skipped."""
    _, text, _ = converted("qwen35", "f16")
    d, vl, out = converted("qwen35-vl", "f16")
    assert [(t.name, t.shape, t.qtype) for t in vl.tensors] == [(t.name, t.shape, t.qtype) for t in text.tensors]
    strip = lambda g: {k: kv.value for k, kv in g.kv.items() if not k.startswith(("general.", "tokenizer."))}  # noqa: E731
    assert strip(vl) == strip(text)
    assert vl.kv["general.architecture"].value == "qwen35"
    assert "5 vision tensor(s) skipped" in out


def test_defaults_when_the_config_leaves_them_out(checkpoint_factory, tmp_path):
    """No layer_types: transformers derives them from full_attention_interval and drops that key, so llama.cpp (and
    qtool) write its default interval 4; no mrope_section: the default sections [11, 11, 10, 0]."""
    d = checkpoint_factory("qwen35", layer_types=DROP,
                           rope_parameters={"rope_type": "default", "rope_theta": 5000000})
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf")
    assert code == 0, stderr
    g = read_gguf(tmp_path / "m.gguf")
    assert g.kv["qwen35.full_attention_interval"].value == 4
    assert g.kv["qwen35.attention.recurrent_layers"].value == [True, False, True, False, False]
    assert g.kv["qwen35.rope.dimension_sections"].value == [11, 11, 10, 0]
    assert g.kv["qwen35.rope.dimension_count"].value == 8


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(dtype, converted):
    """1 + w and -exp(A_log) happen in the stored dtype for float16 (bf16 arrives widened to float32)."""
    d, g, _ = converted("qwen35", "f32", dtype)
    hf = {k: v for k, v in read_checkpoint_tensors(d).items()}
    got = {t.name: g.array(t) for t in g.tensors}
    w = hf["model.layers.0.input_layernorm.weight"]
    if dtype == "float16":
        assert np.array_equal(got["blk.0.attn_norm.weight"], (w.astype(np.float16) + np.float16(1)).astype(np.float32))
    else:
        assert np.array_equal(got["blk.0.attn_norm.weight"], w + np.float32(1))
    assert got["blk.0.ssm_a"].dtype == np.float32 and (got["blk.0.ssm_a"] < 0).all()


def test_tensors_are_read_one_at_a_time(checkpoint_factory, monkeypatch):
    """Planning reads no tensor data; the fused experts of one layer are read once for both their halves."""
    from convert.checkpoint import Checkpoint
    from convert.converter import plan_conversion

    loaded: list[str] = []
    real_load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name: (loaded.append(name), real_load(self, name))[1])
    plan = plan_conversion(checkpoint_factory("qwen35moe-vl"), "f16")
    try:
        assert loaded == []
        by_name = {t.name: t for t in plan.tensors}
        gate, up = by_name["blk.1.ffn_gate_exps.weight"].load(), by_name["blk.1.ffn_up_exps.weight"].load()
        assert gate.shape == up.shape == (8, 32, 64)
        assert loaded == ["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    finally:
        plan.close()


# --- the inverse transforms (export-hf) -----------------------------------------------------------------------

@pytest.mark.parametrize("axis, head", [(0, 2), (1, 3), (0, 1)])
def test_untile_v_heads_inverts_tile_v_heads(axis, head):
    from convert.qwen35 import tile_v_heads, untile_v_heads

    w = np.random.default_rng(axis + head).standard_normal((2 * 3 * head, 2 * 3 * head, 5)).astype(np.float32)
    tiled = tile_v_heads(w, axis, 2, head)
    assert not np.array_equal(tiled, w)
    assert np.array_equal(untile_v_heads(tiled, axis, 2, head), w)
    assert np.array_equal(tile_v_heads(untile_v_heads(w, axis, 2, head), axis, 2, head), w)


def test_untransform_inverts_transform(checkpoint_factory):
    """For every tensor of the fixture: transform(untransform(g)) == g bit for bit (so the GGUF round-trips), and
    untransform(transform(w)) == w except for the last bits that 1 + w / -exp(A_log) rounded away; also on norm
    values far from 1 and A_log values over the real models' range, where those roundings drop the most."""
    from convert.models import model_spec
    from convert.qwen35 import canonical_name, transform, untransform

    d = checkpoint_factory("qwen35")
    c = json.loads((d / "config.json").read_text())
    spec = model_spec(c)
    hs = spec.hybrid
    rng = np.random.default_rng(0)
    hf = {canonical_name(n, spec.n_layer): w for n, w in read_checkpoint_tensors(d).items()}
    hf["model.layers.0.input_layernorm.weight"] = rng.standard_normal(4096).astype(np.float32) * np.float32(3)
    hf["model.layers.2.linear_attn.A_log"] = np.log(rng.uniform(0.01, 16, 4)).astype(np.float32)
    n_lossy = 0
    for name, w in hf.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            continue      # split into two GGUF tensors by the converter, fused again by export_hf
        g = transform(name, w, hs)
        back = untransform(name, g, hs)
        assert back.dtype == np.float32 and back.shape == w.shape, name
        assert np.array_equal(transform(name, back, hs), g), name
        if name.endswith(("norm.weight", "A_log")) and not name.endswith("linear_attn.norm.weight"):
            np.testing.assert_allclose(back, w, rtol=2.0 ** -22, atol=2.0 ** -23, err_msg=name)
            n_lossy += int(np.count_nonzero(back != w))
        else:
            assert np.array_equal(back, w), name
    assert n_lossy > 0


def test_norm_preimage_where_no_float_gives_the_stored_value():
    """A stored 1 + w that no float32 w produces (not from a converter): the nearest one, no endless search."""
    from convert.qwen35 import HybridSpec, plus_one, untransform

    hs = HybridSpec(["full_attention"], 0, 4, 1, 1, 4, 4, 1, 8, None)
    stored = np.array([1e-9, 0.3, 2.5], dtype=np.float32)
    w = untransform("model.norm.weight", stored, hs)
    assert np.array_equal(plus_one(w)[1:], stored[1:])
    assert abs(float(plus_one(w)[0]) - 1e-9) <= 2.0 ** -25


def test_dry_run_lists_the_plan(checkpoint_factory):
    code, stdout, stderr = run("convert", checkpoint_factory("qwen35-vl"), "--dry-run")
    assert code == 0, stderr
    assert "blk.0.ssm_a " in stdout + stderr and "qwen35.ssm.conv_kernel" in stdout + stderr
    assert "5 vision tensor(s) skipped" in stdout + stderr


def test_checkpoint_without_mtp(checkpoint_factory, tmp_path):
    """No mtp_num_hidden_layers and no mtp.* tensors: the text layers alone (llama.cpp's converter asserts here)."""
    d = checkpoint_factory("qwen35", mtp_num_hidden_layers=DROP)
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf")
    assert code == 0, stderr
    g = read_gguf(tmp_path / "m.gguf")
    assert g.kv["qwen35.block_count"].value == 4 and "qwen35.nextn_predict_layers" not in g.kv
    assert g.kv["qwen35.attention.recurrent_layers"].value == [True, False, True, False]
    assert not any("nextn" in t.name or t.name.startswith("blk.4.") for t in g.tensors)


@pytest.mark.parametrize("flag", ["--no-mtp", "--no-nextn"])
def test_no_mtp_leaves_the_mtp_layer_out(flag, checkpoint_factory, tmp_path):
    """--no-mtp (llama.cpp's flag, alias --no-nextn): the text layers alone, as from a checkpoint without MTP, the
    left-out tensors said; the same file as with the MTP layer otherwise, less that layer."""
    d = checkpoint_factory("qwen35moe-vl")
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf", flag)
    assert code == 0, stderr
    assert "MTP tensor(s) left out (--no-mtp)" in stderr
    g = read_gguf(tmp_path / "m.gguf")
    assert g.kv["qwen35moe.block_count"].value == 4 and "qwen35moe.nextn_predict_layers" not in g.kv
    assert len(g.kv["qwen35moe.attention.recurrent_layers"].value) == 4
    assert not any("nextn" in t.name or t.name.startswith("blk.4.") for t in g.tensors)
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "full.gguf")
    assert code == 0, stderr
    full = read_gguf(tmp_path / "full.gguf")
    kept = {t.name: t for t in full.tensors if not t.name.startswith("blk.4.")}
    assert [t.name for t in g.tensors] == list(kept)
    for t in g.tensors:
        assert np.array_equal(g.raw(t), full.raw(kept[t.name])), t.name


def test_no_mtp_is_refused_for_other_architectures(checkpoint_factory, tmp_path):
    code, _, stderr = run("convert", checkpoint_factory("qwen2"), "--outfile", tmp_path / "m.gguf", "--no-mtp")
    assert code != 0 and not (tmp_path / "m.gguf").exists()
    assert "--no-mtp applies only to Qwen3.5 checkpoints" in stderr and "Traceback" not in stderr


def test_tied_checkpoint_has_no_output_tensor(checkpoint_factory, tmp_path):
    d = checkpoint_factory("qwen35-vl", tie_word_embeddings=True)
    code, _, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf")
    assert code == 0, stderr
    names = {t.name for t in read_gguf(tmp_path / "m.gguf").tensors}
    assert "token_embd.weight" in names and "output.weight" not in names


# --- bad input: one line, exit code 2, nothing written ------------------------------------------------------

@pytest.mark.parametrize("variant, changes, expect", [
    ("qwen35", {"layer_types": ["linear_attention", "full_attention"]},
     "layer_types has 2 entries, expected num_hidden_layers (4)"),
    ("qwen35", {"layer_types": ["linear_attention", "full_attention", "sliding_attention", "full_attention"]},
     "layer_types must list 'linear_attention' or 'full_attention'"),
    ("qwen35", {"linear_num_value_heads": 3}, "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    ("qwen35", {"layer_types": ["full_attention"] * 4}, "unexpected tensor 'model.layers.0.linear_attn."),
    ("qwen35", {"mtp_num_hidden_layers": 2}, "'mtp.layers.1.self_attn.q_proj.weight' is missing"),
    ("qwen35", {"mtp_num_hidden_layers": DROP}, "unexpected tensor 'mtp."),
    ("qwen35", {"linear_value_head_dim": 32}, "has shape [128, 1, 4], but config.json implies [192, 1, 4]"),
    ("qwen35", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ("qwen35", {"full_attention_interval": 0}, "full_attention_interval must be a positive integer"),
    ("qwen35moe", {"num_experts": 4}, "mlp.experts.down_proj' has shape [8, 64, 32], but config.json implies [4, 64, 32]"),
])
def test_bad_config(variant, changes, expect, checkpoint_factory, tmp_path):
    fails(edited(checkpoint_factory, variant, tmp_path, **changes), tmp_path / "out", expect=expect)


def test_missing_deltanet_tensor_is_named(checkpoint_factory, tmp_path):
    d = single_file_copy(checkpoint_factory, "qwen35", tmp_path)
    drop_tensor(d, "model.layers.2.linear_attn.A_log")
    line = fails(d, tmp_path / "out", expect="'model.layers.2.linear_attn.A_log' is missing")
    assert "more missing" not in line


def test_missing_tensors_are_named_as_the_checkpoint_names_them(checkpoint_factory, tmp_path):
    d = single_file_copy(checkpoint_factory, "qwen35-vl", tmp_path)
    tensors = read_checkpoint_tensors(d)
    k_norm = tensors.pop("model.language_model.layers.1.self_attn.k_norm.weight")
    del tensors["mtp.pre_fc_norm_hidden.weight"]
    write_safetensors(d / "model.safetensors", tensors)
    fails(d, tmp_path / "out", expect="'model.language_model.layers.1.self_attn.k_norm.weight' is missing from the "
                                      "checkpoint (1 more missing)")
    tensors["model.language_model.layers.1.self_attn.k_norm.weight"] = k_norm
    write_safetensors(d / "model.safetensors", tensors)
    fails(d, tmp_path / "out2", expect="tensor 'mtp.pre_fc_norm_hidden.weight' is missing from the checkpoint")


def test_per_expert_layout_gives_the_same_tensors(converted):
    """Experts stored one by one are stacked per layer into the same ffn_*_exps tensors the fused layout gives."""
    d, g, _ = converted("qwen35moe-per-expert", "f32")
    _, fused, _ = converted("qwen35moe", "f32")
    assert [(t.name, t.shape, t.qtype) for t in g.tensors if "_exps" in t.name] == \
           [(t.name, t.shape, t.qtype) for t in fused.tensors if "_exps" in t.name]
    hf = read_checkpoint_tensors(d)
    got = {t.name: g.array(t) for t in g.tensors}
    for i, p in ((0, "model.layers.0."), (4, "mtp.layers.0.")):
        for proj in ("gate", "up", "down"):
            want = np.stack([hf[f"{p}mlp.experts.{x}.{proj}_proj.weight"] for x in range(8)])
            assert np.array_equal(got[f"blk.{i}.ffn_{proj}_exps.weight"], want), (i, proj)


def test_per_expert_stacks_are_read_one_layer_at_a_time(checkpoint_factory, monkeypatch):
    from convert.checkpoint import Checkpoint
    from convert.converter import plan_conversion

    loaded: list[str] = []
    real_load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name: (loaded.append(name), real_load(self, name))[1])
    plan = plan_conversion(checkpoint_factory("qwen35moe-per-expert"), "f16")
    try:
        assert loaded == []
        t = next(t for t in plan.tensors if t.name == "blk.2.ffn_up_exps.weight")
        assert t.load().shape == t.shape == (8, 32, 64)
        assert loaded == [f"model.layers.2.mlp.experts.{x}.up_proj.weight" for x in range(8)]
    finally:
        plan.close()


def test_mixed_expert_layouts_are_refused(checkpoint_factory, tmp_path):
    d = single_file_copy(checkpoint_factory, "qwen35moe", tmp_path)
    tensors = read_checkpoint_tensors(d)
    fused = tensors.pop("model.layers.0.mlp.experts.gate_up_proj")
    for x in range(fused.shape[0]):
        tensors[f"model.layers.0.mlp.experts.{x}.gate_proj.weight"] = fused[x, :32]
    write_safetensors(d / "model.safetensors", tensors)
    fails(d, tmp_path / "out", expect="unexpected tensor 'model.layers.0.mlp.experts.down_proj'")


# --- the converted files quantize as llama-quantize quantizes them -------------------------------------------

# Rows of 256 so that the K-quants run as K-quants (the default fixture's 64-wide rows fall back).
WIDE = dict(hidden_size=256, head_dim=64, linear_key_head_dim=64, linear_value_head_dim=64,
            rope_parameters={"mrope_interleaved": True, "mrope_section": [3, 3, 2], "rope_type": "default",
                             "rope_theta": 10000000, "partial_rotary_factor": 0.25})


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("variant, ftype", [("qwen35", "Q8_0"), ("qwen35", "Q4_K_M"), ("qwen35moe", "Q8_0"),
                                            ("qwen35moe", "Q4_K_M")])
def test_qwen35_gguf_quantizes_like_llama_quantize(variant, ftype, checkpoint_factory, tmp_path):
    import subprocess

    from tests.interop import need_tool
    from tests.test_interop_quantize import assert_same_file

    tool = need_tool("llama-quantize")
    extra = (dict(moe_intermediate_size=256, shared_expert_intermediate_size=256) if variant == "qwen35moe"
             else dict(intermediate_size=256))
    d = checkpoint_factory(variant, **WIDE, **extra)
    f16 = tmp_path / "f16.gguf"
    code, _, stderr = run("convert", d, "--outfile", f16, "--outtype", "f16")
    assert code == 0, stderr
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    proc = subprocess.run([str(tool), str(f16), str(theirs), ftype, "2"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, _, stderr = run("quantize", f16, ours, "--type", ftype)
    assert code == 0, stderr
    assert_same_file(ours, theirs)
    if ftype == "Q4_K_M":
        assert any(t.qtype == T.Q4_K for t in read_gguf(ours).tensors if t.name.endswith("ssm_out.weight"))
