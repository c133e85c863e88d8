"""qtool convert vs llama.cpp's own convert_hf_to_gguf.py on the same tiny checkpoints.

Every tensor's bytes must be identical (f32 and f16) and every non-general.* key identical in order, type and
value. The llama.cpp tree comes from the llama-cpp-python sdist (python tests/fetch_llamacpp.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGUFReader

from qtool.cli import main
from tests.llamacpp import LlamaCppConvertError, interop_available, run_llamacpp_convert
from tests.interop import need_tool, unavailable

pytestmark = [pytest.mark.interop, pytest.mark.slow]


@pytest.fixture(scope="module", autouse=True)
def _need_llamacpp():
    if not interop_available():
        unavailable("llama.cpp tree or torch/transformers missing")


def fields(path):
    """(key, value types, value) in file order, read with gguf's own reader (independent of qtool's)."""
    r = GGUFReader(path)
    return r, [(k, [t.name for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")]


# Every --outtype, each on at least two families; `auto` on a float32 and on a bfloat16 checkpoint.
CASES = ([(v, t, "float32") for v in ("llama-spm", "llama-bpe", "qwen2", "qwen3") for t in ("f32", "f16")]
         + [(v, t, "float32") for v in ("llama-spm", "qwen2") for t in ("bf16", "q8_0")]
         + [("llama-spm", "auto", "float32"), ("qwen3", "auto", "bfloat16"), ("qwen3", "bf16", "bfloat16")]
         # MoE: per-layer expert stacks (one layer split across two shards), F32 routers, Q8_0's F16 fallback on
         # qwen2moe's 48-wide ffn_down_exps rows, and the NxM size label in general.*.
         + [(v, t, "float32") for v in ("qwen2moe", "qwen3moe") for t in ("f16", "q8_0")]
         + [("qwen3moe", "auto", "bfloat16"), ("qwen2moe", "bf16", "bfloat16"), ("qwen3moe", "f32", "float16")]
         # Qwen3.5 hybrids: DeltaNet + gated attention layers, V-head tiling, -exp(A_log), 1 + w norms, the MTP layer,
         # fused experts split into gate/up, the ConditionalGeneration layout with its vision tower skipped.
         + [(v, "f16", "float32") for v in ("qwen35", "qwen35moe", "qwen35-vl", "qwen35moe-vl")]
         + [("qwen35", "q8_0", "float32"), ("qwen35", "f32", "float16"), ("qwen35moe", "auto", "bfloat16"),
            ("qwen35-vl", "bf16", "bfloat16"), ("qwen35moe-per-expert", "f16", "float16")])


@pytest.mark.parametrize("variant, outtype, dtype", CASES)
def test_identical_to_llamacpp(variant, outtype, dtype, checkpoint_factory, tmp_path):
    # The same directory name for both, since general.name comes from it.
    d = tmp_path / variant
    shutil.copytree(checkpoint_factory(variant, dtype=dtype), d)
    theirs = run_llamacpp_convert(d, tmp_path / "theirs.gguf", outtype)
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "ours.gguf"),
                                       "--outtype", outtype], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr

    r_ours, ours = fields(tmp_path / "ours.gguf")
    r_theirs, theirs_kv = fields(theirs)
    non_general = lambda kvs: [kv for kv in kvs if not kv[0].startswith("general.")]  # noqa: E731
    assert [k for k, _, _ in non_general(ours)] == [k for k, _, _ in non_general(theirs_kv)]
    for (k, t1, v1), (_, t2, v2) in zip(non_general(ours), non_general(theirs_kv)):
        assert t1 == t2, k
        assert v1 == v2, k
    # general.file_type and quantization_version are part of what llama.cpp reads; check them too.
    g_ours, g_theirs = dict((k, v) for k, _, v in ours), dict((k, v) for k, _, v in theirs_kv)
    for k in ("general.architecture", "general.file_type", "general.quantization_version"):
        assert g_ours[k] == g_theirs[k], k

    assert [(t.name, t.tensor_type, list(t.shape)) for t in r_ours.tensors] == \
           [(t.name, t.tensor_type, list(t.shape)) for t in r_theirs.tensors]
    for a, b in zip(r_ours.tensors, r_theirs.tensors):
        assert a.data.tobytes() == b.data.tobytes(), a.name
    # and the claim itself: the same file, byte for byte (the checks above say where, when it is not)
    assert (tmp_path / "ours.gguf").read_bytes() == Path(theirs).read_bytes()


def test_qwen35_defaults_identical_to_llamacpp(checkpoint_factory, tmp_path):
    """A Qwen3.5 config without layer_types or mrope_section: transformers' derived layer types, llama.cpp's default
    full_attention_interval (4) and rope sections ([11, 11, 10, 0])."""
    from tests.fixtures.checkpoints import DROP

    d = tmp_path / "qwen35"
    shutil.copytree(checkpoint_factory("qwen35", layer_types=DROP,
                                       rope_parameters={"rope_type": "default", "rope_theta": 5000000}), d)
    theirs = run_llamacpp_convert(d, tmp_path / "theirs.gguf", "f16")
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "ours.gguf"), "--outtype", "f16"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "ours.gguf").read_bytes() == Path(theirs).read_bytes()


def test_llamacpp_converter_fails_on_qwen35_without_mtp_and_qtool_does_not(checkpoint_factory, tmp_path):
    """llama.cpp's converter asserts on a Qwen3.5 checkpoint with no MTP block unless told --no-mtp; with that flag
    it writes what qtool writes without it."""
    from tests.fixtures.checkpoints import DROP

    d = tmp_path / "qwen35"
    shutil.copytree(checkpoint_factory("qwen35", mtp_num_hidden_layers=DROP), d)
    with pytest.raises(LlamaCppConvertError) as e:
        run_llamacpp_convert(d, tmp_path / "theirs.gguf", "f16")
    assert "AssertionError" in e.value.stderr
    theirs = run_llamacpp_convert(d, tmp_path / "theirs.gguf", "f16", ["--no-mtp"])
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "ours.gguf"), "--outtype", "f16"])
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "ours.gguf").read_bytes() == Path(theirs).read_bytes()


@pytest.mark.parametrize("variant", ["qwen35", "qwen35moe-vl"])
def test_no_mtp_identical_to_llamacpp(variant, checkpoint_factory, tmp_path):
    """--no-mtp on a checkpoint with an MTP block: the same file as llama.cpp's converter with --no-mtp."""
    d = tmp_path / variant
    shutil.copytree(checkpoint_factory(variant), d)
    theirs = run_llamacpp_convert(d, tmp_path / "theirs.gguf", "f16", ["--no-mtp"])
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "ours.gguf"), "--outtype", "f16",
                                       "--no-mtp"])
    assert result.exit_code == 0, result.stderr
    assert not any("nextn" in t.name for t in GGUFReader(tmp_path / "ours.gguf").tensors)
    assert (tmp_path / "ours.gguf").read_bytes() == Path(theirs).read_bytes()


def test_llamacpp_converter_fails_on_baichuan_and_qtool_does_not(checkpoint_factory, tmp_path):
    """The reason qtool converts Baichuan itself: llama.cpp's converter recurses forever on it."""
    d = checkpoint_factory("baichuan-13b")
    with pytest.raises(LlamaCppConvertError) as e:
        run_llamacpp_convert(d, tmp_path / "theirs.gguf", "f16")
    assert "RecursionError" in e.value.stderr
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "ours.gguf")])
    assert result.exit_code == 0, result.stderr


def test_split_files_merge_back_with_llamacpp_gguf_split(checkpoint_factory, tmp_path):
    """llama.cpp's own gguf-split --merge reads our shards and gives back the unsplit file's tensors and keys."""
    import subprocess

    tool = need_tool("llama-gguf-split")
    d = checkpoint_factory("qwen3")
    whole, split = tmp_path / "whole.gguf", tmp_path / "split.gguf"
    for out, extra in ((whole, []), (split, ["--split-max-tensors", "9"])):
        r = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(out), "--outtype", "f16", *extra])
        assert r.exit_code == 0, r.stderr
    shards = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(shards) >= 2
    first = shards[0]
    merged = tmp_path / "merged.gguf"
    subprocess.run([str(tool), "--merge", str(first), str(merged)], check=True, capture_output=True, timeout=300)
    r_whole, kv_whole = fields(whole)
    r_merged, kv_merged = fields(merged)
    strip = lambda kvs: [kv for kv in kvs if not kv[0].startswith("split.")]  # noqa: E731
    assert strip(kv_merged) == strip(kv_whole)
    assert [(t.name, t.data.tobytes()) for t in r_merged.tensors] == [(t.name, t.data.tobytes()) for t in r_whole.tensors]
