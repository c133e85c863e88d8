"""qtool run end to end on a tiny model: stages, manifest skipping, gates, resume, reports."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtool.cli import main
from qtool.errors import QtoolError
from qtool.pipeline import run_recipe
from qtool.recipe import load_recipe
from tests.conftest import SHARED

RECIPE = """
[source]
path = "ckpt"
[quantize]
types = ["Q8_0", "Q4_0"]
[eval]
dataset = "eval.txt"
ctx = 64
chunks = 3
[gates]
default = { max_kld = 5.0, min_same_top1_pct = 1.0 }
[output]
dir = "out"
"""


@pytest.fixture
def workdir(checkpoint_factory, tmp_path) -> Path:
    shutil.copytree(checkpoint_factory("llama-spm"), tmp_path / "ckpt")
    raw = (SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    (tmp_path / "eval.txt").write_text(raw[:20000], encoding="utf-8")
    (tmp_path / "recipe.toml").write_text(RECIPE)
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_end_to_end_then_nothing_to_do(workdir):
    r = invoke("run", workdir / "recipe.toml")
    assert r.exit_code == 0, r.stderr
    assert "eval: 3/3 chunks" in r.stderr                  # the long stage shows it is moving
    out = workdir / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert [m["type"] for m in report["models"]] == ["base", "Q8_0", "Q4_0"]
    q8, q4 = report["models"][1:]
    assert 0 <= q8["kld_mean"] < q4["kld_mean"]           # more bits, closer to the base
    assert q8["bpw"] > q4["bpw"]
    assert (out / "report.md").read_text().count("| Q") == 2
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["evaluation"]["n_chunks"] == 3

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")}
    r = invoke("run", workdir / "recipe.toml")
    assert r.exit_code == 0, r.stderr
    assert "ran: nothing" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == before

    # A changed option reruns only what depends on it.
    r = invoke("run", workdir / "recipe.toml", "--set", "eval.chunks=2")
    assert r.exit_code == 0, r.stderr
    assert "ran: eval" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.gguf")} == before


def test_failed_gate_exits_1_and_says_which(workdir):
    r = invoke("run", workdir / "recipe.toml", "--set", "gates.Q4_0.max_kld=0.0000001")
    assert r.exit_code == 1
    assert "gate failed" in r.stderr and "Q4_0" in r.stderr and "mean KLD" in r.stderr
    assert "Q8_0" not in r.stderr.split("gate failed")[1]
    report = json.loads((workdir / "out" / "report.json").read_text())
    assert report["passed"] is False
    assert [g["type"] for g in report["gates"] if not g["passed"]] == ["Q4_0"]


def test_resume_after_an_interrupted_stage(workdir, monkeypatch):
    import qtool.quantize.quantizer as quantizer
    real = quantizer.quantize_model
    calls = []

    def flaky(inp, out, options, **kw):
        calls.append(options.file_type.name)
        if len(calls) == 2:
            raise KeyboardInterrupt          # the machine went away half-way through the second type
        return real(inp, out, options, **kw)

    monkeypatch.setattr(quantizer, "quantize_model", flaky)
    recipe = load_recipe(workdir / "recipe.toml")
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe)
    out = workdir / "out"
    assert not (out / "ckpt-Q4_0.gguf").exists()
    assert not list(out.glob(".*tmp*"))            # no half-written file under any name
    monkeypatch.setattr(quantizer, "quantize_model", real)
    result = run_recipe(load_recipe(workdir / "recipe.toml"))
    assert result.stages_run == ["quantize Q4_0", "eval"]
    assert "convert" in result.stages_skipped and "quantize Q8_0" in result.stages_skipped


def test_only_needs_earlier_stages(workdir):
    with pytest.raises(QtoolError, match="--only eval"):
        run_recipe(load_recipe(workdir / "recipe.toml"), only="eval")


def test_a_mix_with_a_prediction_reports_predicted_beside_measured_kld(workdir):
    """A recipe type quantized with a mix file that carries a predicted KLD: the report shows both."""
    import numpy as np
    from gguf import GGMLQuantizationType as T

    from qtool.gguf_io import PREDICTED_KLD_KEY, read_gguf
    from qtool.quantize.mix import MixFile, write_mix

    r = invoke("run", workdir / "recipe.toml")
    assert r.exit_code == 0, r.stderr
    (base,) = (workdir / "out").glob("*-F16.gguf")
    tensors = {t.name: (T.Q8_0 if t.shape[-1] % 32 == 0 else T.F16)
               for t in read_gguf(base).tensors if len(t.shape) == 2}
    write_mix(MixFile(tensors, provenance={"predicted_kld": 0.0123}), workdir / "mix.toml")
    text = RECIPE.replace('types = ["Q8_0", "Q4_0"]', 'types = ["Q8_0", "Q4_0"]\n[quantize.overrides.Q4_0]\nmix = "mix.toml"')
    (workdir / "recipe.toml").write_text(text)
    r = invoke("run", workdir / "recipe.toml")
    assert r.exit_code == 0, r.stderr
    (q4,) = (workdir / "out").glob("*-Q4_0.gguf")
    assert read_gguf(q4).value(PREDICTED_KLD_KEY) == 0.0123
    report = json.loads((workdir / "out" / "report.json").read_text())
    rows = {m["type"]: m for m in report["models"]}
    assert rows["Q4_0"]["predicted_kld"] == 0.0123 and rows["Q8_0"]["predicted_kld"] is None
    assert np.isfinite(rows["Q4_0"]["kld_mean"])
    assert "(predicted 0.01230)" in (workdir / "out" / "report.md").read_text()
    assert "predicted" in r.output
