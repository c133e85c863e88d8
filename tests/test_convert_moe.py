"""qtool convert on the Qwen2-MoE and Qwen3-MoE fixtures: expert stacks, routers, keys, laziness, bad input.

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
from tests.fixtures.checkpoints import DROP, read_checkpoint_tensors

MOE = ["qwen2moe", "qwen3moe"]


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def converted(checkpoint_factory, tmp_path_factory):
    cache: dict[tuple, tuple[Path, GGUFFile, str]] = {}

    def get(variant: str, outtype: str) -> tuple[Path, GGUFFile, str]:
        if (variant, outtype) not in cache:
            d = checkpoint_factory(variant)
            out = tmp_path_factory.mktemp("out") / "m.gguf"
            code, stdout, stderr = run("convert", d, "--outfile", out, "--outtype", outtype)
            assert code == 0, stderr
            cache[variant, outtype] = d, read_gguf(out), stdout + stderr
        return cache[variant, outtype]
    return get


def expected_gguf(config: dict, hf: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array: experts stacked by index, everything else renamed."""
    simple = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
              "self_attn.v_proj.bias": "attn_v.bias",
              "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
              "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
              "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
              "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
              "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight"}
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"],
           "output.weight": hf["lm_head.weight"]}
    n_exp = config["num_experts"]
    for i in range(config["num_hidden_layers"]):
        for proj in ("gate", "up", "down"):
            experts = [hf[f"model.layers.{i}.mlp.experts.{x}.{proj}_proj.weight"] for x in range(n_exp)]
            out[f"blk.{i}.ffn_{proj}_exps.weight"] = np.stack(experts)
    for name, w in hf.items():
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers" and ".experts." not in name:
            out[f"blk.{parts[2]}.{simple[parts[3]]}"] = w
    return out


@pytest.mark.parametrize("variant", MOE)
def test_f32_tensors_equal_the_checkpoint(variant, converted):
    d, g, _ = converted(variant, "f32")
    config = json.loads((d / "config.json").read_text())
    want = expected_gguf(config, read_checkpoint_tensors(d))
    got = {t.name: t for t in g.tensors}
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].qtype == T.F32, name
        arr = g.array(got[name])
        assert arr.shape == w.shape, name
        assert np.array_equal(arr, w), name
    # every expert is its own: no two experts of a stack are equal
    for name, w in want.items():
        if "_exps." in name:
            assert len({w[x].tobytes() for x in range(w.shape[0])}) == w.shape[0], name


@pytest.mark.parametrize("variant", MOE)
def test_shapes_types_and_moe_keys(variant, converted):
    d, g, _ = converted(variant, "f16")
    c = json.loads((d / "config.json").read_text())
    H, n_exp, ff_exp, L = c["hidden_size"], c["num_experts"], c["moe_intermediate_size"], c["num_hidden_layers"]
    types = {t.name: t.qtype for t in g.tensors}
    shapes = {t.name: t.shape for t in g.tensors}
    for i in range(L):
        assert shapes[f"blk.{i}.ffn_gate_inp.weight"] == (n_exp, H)
        assert shapes[f"blk.{i}.ffn_gate_exps.weight"] == (n_exp, ff_exp, H)
        assert shapes[f"blk.{i}.ffn_up_exps.weight"] == (n_exp, ff_exp, H)
        assert shapes[f"blk.{i}.ffn_down_exps.weight"] == (n_exp, H, ff_exp)
        assert types[f"blk.{i}.ffn_gate_inp.weight"] == T.F32          # routers stay F32
        for proj in ("gate", "up", "down"):
            assert types[f"blk.{i}.ffn_{proj}_exps.weight"] == T.F16
        if variant == "qwen2moe":
            sh = c["shared_expert_intermediate_size"]
            assert shapes[f"blk.{i}.ffn_gate_inp_shexp.weight"] == (1, H)
            assert types[f"blk.{i}.ffn_gate_inp_shexp.weight"] == T.F32
            assert shapes[f"blk.{i}.ffn_gate_shexp.weight"] == (sh, H)
            assert shapes[f"blk.{i}.ffn_up_shexp.weight"] == (sh, H)
            assert shapes[f"blk.{i}.ffn_down_shexp.weight"] == (H, sh)
            assert shapes[f"blk.{i}.attn_q.bias"] == (H,)
        else:
            assert not any("shexp" in n for n in shapes)
            assert shapes[f"blk.{i}.attn_q_norm.weight"] == (c["head_dim"],)
        assert not any(n.startswith(f"blk.{i}.ffn_gate.") or n.startswith(f"blk.{i}.ffn_up.") for n in shapes)

    u32 = GGUFValueType.UINT32
    a = variant
    assert g.kv["general.architecture"].value == a
    want = {f"{a}.expert_count": n_exp, f"{a}.expert_used_count": c["num_experts_per_tok"],
            f"{a}.expert_feed_forward_length": ff_exp, f"{a}.feed_forward_length": c["intermediate_size"]}
    if variant == "qwen2moe":
        want[f"{a}.expert_shared_feed_forward_length"] = c["shared_expert_intermediate_size"]
    else:
        assert f"{a}.expert_shared_feed_forward_length" not in g.kv
        want[f"{a}.attention.key_length"] = c["head_dim"]
    for k, v in want.items():
        assert g.kv[k].value == v and g.kv[k].type == u32, k
    # the size label counts one expert's parameters, as gguf's naming does: "<n_expert>x<size>"
    assert g.kv["general.size_label"].value.startswith(f"{n_exp}x")


def test_q8_0_falls_back_to_f16_on_short_expert_rows(converted):
    _, g, out = converted("qwen2moe", "q8_0")      # moe_intermediate_size 48: down rows are not 32-blocks
    types = {t.name: t.qtype for t in g.tensors}
    assert types["blk.0.ffn_down_exps.weight"] == T.F16
    assert types["blk.0.ffn_gate_exps.weight"] == T.Q8_0
    assert types["blk.0.ffn_gate_inp.weight"] == T.F32
    assert "ffn_down_exps.weight: row length 48" in out


def test_experts_are_stacked_one_layer_at_a_time(checkpoint_factory, monkeypatch):
    """Planning reads no tensor data; writing one stack reads exactly that layer's experts of that projection."""
    from convert.checkpoint import Checkpoint
    from convert.converter import plan_conversion

    loaded: list[str] = []
    real_load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name: (loaded.append(name), real_load(self, name))[1])
    d = checkpoint_factory("qwen3moe")
    plan = plan_conversion(d, "f16")
    try:
        assert loaded == []
        t = next(t for t in plan.tensors if t.name == "blk.1.ffn_up_exps.weight")
        data = t.load()
        assert data.shape == t.shape == (8, 32, 64)
        assert loaded == [f"model.layers.1.mlp.experts.{x}.up_proj.weight" for x in range(8)]
    finally:
        plan.close()


def test_norm_topk_prob_that_llamacpp_ignores_is_said(checkpoint_factory, tmp_path):
    d = checkpoint_factory("qwen3moe", norm_topk_prob=False)
    code, stdout, stderr = run("convert", d, "--outfile", tmp_path / "m.gguf")
    assert code == 0, stderr
    assert "norm_topk_prob" in stdout + stderr and "always renormalises" in stdout + stderr


# --- bad input: one line, exit code 2, nothing written ------------------------------------------------------

@pytest.mark.parametrize("variant", MOE)
def test_missing_expert_tensor_is_named(variant, checkpoint_factory, tmp_path):
    d = single_file_copy(checkpoint_factory, variant, tmp_path)
    drop_tensor(d, "model.layers.1.mlp.experts.3.up_proj.weight")
    line = fails(d, tmp_path / "out", expect="'model.layers.1.mlp.experts.3.up_proj.weight' is missing")
    assert "more missing" not in line


def test_missing_router_is_named(checkpoint_factory, tmp_path):
    d = single_file_copy(checkpoint_factory, "qwen2moe", tmp_path)
    drop_tensor(d, "model.layers.0.mlp.shared_expert_gate.weight")
    fails(d, tmp_path / "out", expect="'model.layers.0.mlp.shared_expert_gate.weight' is missing")


def test_more_experts_in_the_checkpoint_than_the_config_says(checkpoint_factory, tmp_path):
    d = edited(checkpoint_factory, "qwen3moe", tmp_path, num_experts=7)
    fails(d, tmp_path / "out", expect="unexpected tensor 'model.layers.0.mlp.experts.7.")


def test_expert_width_disagreeing_with_config(checkpoint_factory, tmp_path):
    d = edited(checkpoint_factory, "qwen3moe", tmp_path, moe_intermediate_size=64)
    fails(d, tmp_path / "out", expect="mlp.experts.0.down_proj.weight' has shape [64, 32], but config.json implies [64, 64]")


@pytest.mark.parametrize("variant, changes, expect", [
    ("qwen3moe", {"num_experts_per_tok": 9}, "num_experts_per_tok 9 is more than num_experts 8"),
    ("qwen2moe", {"num_experts_per_tok": 0}, "num_experts_per_tok must be a positive integer"),
    ("qwen2moe", {"num_experts": "six"}, "num_experts must be a positive integer"),
    ("qwen3moe", {"mlp_only_layers": [1]}, "layer 1 would be dense"),
    ("qwen2moe", {"decoder_sparse_step": 2}, "layer 0 would be dense"),
    # transformers' defaults fill the missing MoE keys (as llama.cpp's converter sees them): 128 experts of 768
    ("qwen3moe", {"num_experts": DROP, "moe_intermediate_size": DROP}, "is missing from the checkpoint"),
])
def test_bad_moe_config(variant, changes, expect, checkpoint_factory, tmp_path):
    fails(edited(checkpoint_factory, variant, tmp_path, **changes), tmp_path / "out", expect=expect)


def test_tied_qwen2moe_is_refused(checkpoint_factory, tmp_path):
    """llama.cpp's qwen2moe loader requires output.weight (no tied fallback), so a tied checkpoint is an error."""
    fails(checkpoint_factory("qwen2moe", tie_word_embeddings=True), tmp_path / "out",
          expect="'lm_head.weight' is missing")


# --- the converted MoE files quantize as llama-quantize quantizes them -------------------------------------------

@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("variant, ftype", [("qwen3moe", "Q4_K_M"), ("qwen3moe", "Q2_K"), ("qwen2moe", "Q3_K_M"),
                                            ("qwen3moe", "Q8_0"), ("qwen2moe", "Q8_0"),
                                            ("qwen3moe", "MXFP4_MOE"), ("qwen2moe", "MXFP4_MOE")])
def test_moe_gguf_quantizes_like_llama_quantize(variant, ftype, converted, tmp_path):
    """qtool quantize and llama-quantize agree byte for byte on an MoE file: the per-tensor rules that count
    experts (n_expert >= 8 raises attn_v/attn_k) and the 3-D expert stacks. The fixtures' 64-wide rows make the
    K-quant types fall back to 32-element ones, so this checks the choices more than the K-quant kernels."""
    import subprocess

    from tests.interop import need_tool
    from tests.test_interop_quantize import assert_same_file

    tool = need_tool("llama-quantize")
    _, g, _ = converted(variant, "f16")
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    proc = subprocess.run([str(tool), str(g.path), str(theirs), ftype, "2"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code, _, stderr = run("quantize", g.path, ours, "--type", ftype)
    assert code == 0, stderr
    assert_same_file(ours, theirs)
    if ftype == "MXFP4_MOE":        # the expert stacks took MXFP4 where their rows fit its 32-blocks (else F16)
        tensors = [t for t in read_gguf(ours).tensors if "_exps." in t.name]
        assert tensors and all(t.qtype == (T.MXFP4 if t.shape[-1] % 32 == 0 else T.F16) for t in tensors)
        assert any(t.qtype == T.MXFP4 for t in tensors)


def test_fixture_splits_a_layer_across_shards(checkpoint_factory):
    """As in the real repos, one layer's experts sit in two shard files: the stacks must gather across them."""
    d = checkpoint_factory("qwen3moe")
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    files = {weight_map[f"model.layers.1.mlp.experts.{x}.{p}_proj.weight"]
             for x in range(8) for p in ("gate", "up", "down")}
    assert len(files) == 2


# --- with an importance matrix: llama-imatrix's per-expert file, applied as llama-quantize applies it ------------

# Rows of 256 (so that IQ2_XXS runs as itself, not a fallback) on each family's fixture.
WIDE_MOE = {
    "qwen3moe": dict(hidden_size=256, head_dim=64, moe_intermediate_size=256),
    "qwen2moe": dict(hidden_size=256, moe_intermediate_size=256, shared_expert_intermediate_size=256),
}


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qwen3moe", "qwen2moe", "qwen35", "qwen35moe"])
def test_imatrix_type_quantizes_like_llama_quantize(variant, checkpoint_factory, tmp_path):
    """A type that uses the imatrix, with the one llama-imatrix computed on the same F16 file (one entry per expert
    for the stacks): byte-identical to llama-quantize's. IQ2_XXS for the MoE families (the expert stacks really are
    IQ2_XXS). The hybrids' MTP layer never runs, so it has no imatrix entries and both tools refuse IQ2_XXS, naming
    its first tensor; IQ4_XS (which takes an imatrix where there is one) is compared instead."""
    import subprocess

    from tests.interop import need_tool
    from tests.test_convert_qwen35 import WIDE
    from tests.test_eval_moe import CALIBRATION
    from tests.test_interop_quantize import assert_same_file

    if variant in WIDE_MOE:
        overrides = WIDE_MOE[variant]
    else:
        overrides = dict(WIDE, **(dict(moe_intermediate_size=256, shared_expert_intermediate_size=256)
                                  if variant == "qwen35moe" else dict(intermediate_size=256)))
    d = checkpoint_factory(variant, **overrides)
    f16 = tmp_path / "f16.gguf"
    code, _, stderr = run("convert", d, "--outfile", f16, "--outtype", "f16")
    assert code == 0, stderr
    imatrix = tmp_path / "imatrix.gguf"
    proc = subprocess.run([str(need_tool("llama-imatrix")), "-m", str(f16), "-f", str(CALIBRATION), "-c", "128",
                           "--chunks", "2", "-t", "2", "-o", str(imatrix), "--no-ppl"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def both(ftype: str, check: bool = True):
        theirs, ours = tmp_path / f"theirs-{ftype}.gguf", tmp_path / f"ours-{ftype}.gguf"
        proc = subprocess.run([str(need_tool("llama-quantize")), "--imatrix", str(imatrix), str(f16), str(theirs),
                               ftype, "2"], capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0 or not check, proc.stderr[-2000:]
        return proc, run("quantize", f16, ours, "--type", ftype, "--imatrix", imatrix), ours, theirs

    hybrid = variant.startswith("qwen35")
    proc, (code, _, stderr), ours, theirs = both("IQ2_XXS", check=not hybrid)
    if hybrid:
        mtp = f"blk.{len([t for t in read_gguf(f16).tensors if t.name.endswith('attn_norm.weight')]) - 1}."
        assert proc.returncode != 0 and f"Missing importance matrix for tensor {mtp}" in proc.stderr, proc.stderr[-500:]
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and mtp in lines[0] and "needs an imatrix entry" in lines[0], stderr
        assert not ours.exists()
        _, (code, _, stderr), ours, theirs = both("IQ4_XS")
    assert code == 0, stderr
    assert_same_file(ours, theirs)
    stacks = [t for t in read_gguf(ours).tensors if "_exps." in t.name]
    assert variant == "qwen35" or any(t.qtype == (T.IQ4_XS if hybrid else T.IQ2_XXS) for t in stacks), \
        [(t.name, t.qtype) for t in stacks]
