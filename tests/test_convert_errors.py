"""Bad input to qtool convert: one line naming the problem, exit code 2, and no output file left behind."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qtool.cli import main
from tests.convert_checks import fails


@pytest.fixture(scope="module")
def pristine(checkpoint_factory):
    return checkpoint_factory


@pytest.fixture
def model(pristine, tmp_path):
    """A fresh, writable copy of a tiny checkpoint, to be broken by the test."""
    def get(variant: str = "qwen3") -> Path:
        d = tmp_path / "model"
        shutil.copytree(pristine(variant), d)
        return d
    return get


def test_missing_model_dir(tmp_path):
    fails(tmp_path / "nope", tmp_path / "out", expect="nope")


def test_missing_config(model, tmp_path):
    d = model()
    (d / "config.json").unlink()
    fails(d, tmp_path / "out", expect="config.json")


def test_unknown_architecture_lists_supported(model, tmp_path):
    d = model()
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    line = fails(d, tmp_path / "out", expect="GPTNeoXForCausalLM")
    assert "Qwen2ForCausalLM" in line and "BaichuanForCausalLM" in line


def test_missing_tokenizer_files(model, tmp_path):
    d = model()
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (d / name).unlink(missing_ok=True)
    fails(d, tmp_path / "out", expect="tokenizer")


def test_truncated_safetensors(model, tmp_path):
    d = model()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    fails(d, tmp_path / "out", expect="truncated")


def test_corrupt_safetensors_header(model, tmp_path):
    d = model()
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    fails(d, tmp_path / "out", expect="model.safetensors")


def _rewrite_tensors(d: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f)


def test_missing_tensor(model, tmp_path):
    d = model()
    _rewrite_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    fails(d, tmp_path / "out", expect="model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(model, tmp_path):
    d = model()
    _rewrite_tensors(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros((4, 4), np.float32)))
    fails(d, tmp_path / "out", expect="model.layers.0.mlp.extra.weight")


def test_wrong_shape(model, tmp_path):
    d = model()

    def edit(t):
        t["model.layers.0.mlp.gate_proj.weight"] = t["model.layers.0.mlp.gate_proj.weight"][:-1]
    _rewrite_tensors(d, edit)
    line = fails(d, tmp_path / "out", expect="model.layers.0.mlp.gate_proj.weight")
    assert "shape" in line


def test_config_disagrees_with_weights(model, tmp_path):
    d = model()
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 32
    (d / "config.json").write_text(json.dumps(cfg))
    fails(d, tmp_path / "out", expect="shape")


def test_nan_in_a_weight_names_the_tensor(model, tmp_path):
    d = model()

    def edit(t):
        w = t["model.layers.1.self_attn.o_proj.weight"].copy()
        w[3, 5] = np.nan
        t["model.layers.1.self_attn.o_proj.weight"] = w
    _rewrite_tensors(d, edit)
    fails(d, tmp_path / "out", expect="model.layers.1.self_attn.o_proj.weight")


def test_inf_in_a_weight(model, tmp_path):
    d = model()

    def edit(t):
        w = t["model.norm.weight"].copy()
        w[0] = np.inf
        t["model.norm.weight"] = w
    _rewrite_tensors(d, edit)
    fails(d, tmp_path / "out", expect="model.norm.weight")


def test_unwritable_output_dir(model, tmp_path):
    """A user's read-only folder; as root (which ignores file modes) a read-only mount of the folder instead."""
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        fails(model(), out, expect="not writable")
        return
    cli = [sys.executable, "-c", "from qtool.cli import main; main()",
           "convert", str(model()), "--outfile", str(out / "m.gguf")]
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(out), *cli],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not writable" in lines[0], r.stderr
    assert list(out.iterdir()) == []


def test_missing_output_dir(model, tmp_path):
    d = model()
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "no" / "such" / "m.gguf")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_output_dir_is_a_file(model, tmp_path):
    d = model()
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(tmp_path / "afile" / "m.gguf")])
    assert result.exit_code == 2 and "afile" in result.stderr


def test_malicious_pickle_is_refused_and_never_runs(model, tmp_path):
    import pickle

    d = model("baichuan-7b")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (d / "pytorch_model.bin").unlink()
    with zipfile.ZipFile(d / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model.embed_tokens.weight": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    line = fails(d, tmp_path / "out", expect="system")
    assert "refus" in line
    assert not marker.exists()


def test_bad_outtype_and_split_size(model, tmp_path):
    d = model()
    r = CliRunner().invoke(main, ["convert", str(d), "--outtype", "q4_0"])
    assert r.exit_code == 2 and "q4_0" in r.stderr
    fails(d, tmp_path / "out", "--split-max-size", "lots", expect="lots")


def test_unwritable_output_location_even_as_root(model, tmp_path):
    # /proc refuses new files for every user, root included: the error path a read-only mount would take.
    d = model()
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", "/proc/qtool-test.gguf"])
    assert result.exit_code == 2, result.stderr
    assert "/proc" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_name_that_looks_like_an_emoji_code_is_printed_as_written(model, tmp_path):
    d = model()
    target = tmp_path / "out:thumbs_up:dir" / "m.gguf"
    result = CliRunner().invoke(main, ["convert", str(d), "--outfile", str(target)])
    assert result.exit_code == 2 and "out:thumbs_up:dir" in result.stderr, result.stderr
