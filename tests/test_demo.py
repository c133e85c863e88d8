"""The README's main command: `qtool run recipes/demo.toml` on the bundled SmolLM2-135M-Instruct, shortened.

Marked slow (still run by .ci/run): the whole pipeline on a real model — export to HF, convert to F16, an imatrix
on the shipped calibration text, seven quantized types, and an evaluation on the local WikiText-2 copy (8 chunks
instead of the recipe's 40, 10 imatrix chunks instead of 100, to fit the CI budget).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from qtool.cli import main
from tests.conftest import SHARED
from tests.fixtures.smollm2 import smollm2_source
from tests.interop import unavailable

ROOT = Path(__file__).resolve().parents[1]
WIKI = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


@pytest.mark.slow
def test_demo_recipe_runs_and_orders_the_types(tmp_path):
    try:
        smollm2_source()        # installed by the README's commands
    except FileNotFoundError as e:
        unavailable(str(e))
    out = tmp_path / "demo"
    r = CliRunner().invoke(main, ["run", str(ROOT / "recipes" / "demo.toml"),
                                  "--set", f"output.dir={out}", "--set", f"eval.dataset={WIKI}",
                                  "--set", "eval.chunks=8", "--set", "imatrix.chunks=10"], catch_exceptions=False)
    assert r.exit_code == 0, r.output + (r.stderr if r.stderr_bytes is not None else "")
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    models = {m["type"]: m for m in report["models"]}
    assert list(models) == ["base", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "IQ4_XS"]
    assert report["evaluation"]["n_chunks"] == 8
    for label, m in models.items():
        assert math.isfinite(m["ppl"]) and 1 < m["ppl"] < 1000, (label, m["ppl"])
        if label != "base":
            assert all(math.isfinite(m[k]) for k in ("kld_mean", "delta_ppl_pct", "same_top1_pct")), label
            assert m["size_bytes"] < models["base"]["size_bytes"]
    assert models["Q8_0"]["kld_mean"] < models["Q4_K_M"]["kld_mean"] < models["Q3_K_M"]["kld_mean"]
    assert models["Q8_0"]["same_top1_pct"] > models["Q3_K_M"]["same_top1_pct"]
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Q4_K_M" in (out / "report.md").read_text()
