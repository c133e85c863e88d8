"""Recipe validation: every mistake names the key and the allowed values."""
from __future__ import annotations

from pathlib import Path

import pytest

from qtool.errors import QtoolError
from qtool.recipe import load_recipe, parse_recipe

GOOD = """
[source]
path = "ckpt"
[convert]
outtype = "f16"
[imatrix]
dataset = "calib.txt"
chunks = 10
[quantize]
types = ["q8_0", "Q4_K_M"]
[quantize.overrides.Q4_K_M]
output_tensor_type = "Q6_K"
[eval]
ctx = 128
chunks = 4
[gates]
default = { max_kld = 0.2, max_delta_ppl_pct = 10 }
Q4_K_M = { max_kld = 0.5 }
[output]
dir = "out"
"""


def parse(text: str, sets=None):
    return parse_recipe(text, Path("/r/recipe.toml"), sets)


def test_good_recipe():
    r = parse(GOOD)
    assert r.types == ["Q8_0", "Q4_K_M"]
    assert r.out_dir == Path("/r/out")
    assert r.gate_for("Q4_K_M").max_kld == 0.5 and r.gate_for("Q4_K_M").max_delta_ppl_pct == 10
    assert r.gate_for("Q8_0").max_kld == 0.2 and r.gate_for("Q8_0").min_same_top1_pct is None
    assert r.imatrix == {"dataset": "calib.txt", "chunks": 10}
    assert r.eval["dataset"] == "wikitext"


@pytest.mark.parametrize("edit,expect", [
    (lambda t: t.replace('types = ["q8_0", "Q4_K_M"]', 'types = ["Q4_K_X"]'), ["quantize.types", "Q4_K_X", "Q4_K_M"]),
    (lambda t: t.replace('outtype = "f16"', 'outtype = "f8"'), ["convert.outtype", "f8", "bf16"]),
    (lambda t: t.replace("chunks = 4", "chunks = -1"), ["eval.chunks"]),
    (lambda t: t.replace("chunks = 4", 'chunks = "four"'), ["eval.chunks", "integer"]),
    (lambda t: t.replace("max_kld = 0.5", "max_kl = 0.5"), ["gates.Q4_K_M.max_kl", "max_kld"]),
    (lambda t: t.replace("Q4_K_M = { max_kld", "Q9 = { max_kld"), ["gates.Q9"]),
    (lambda t: t.replace('path = "ckpt"', ""), ["source", "source.path"]),
    (lambda t: t + "\n[extra]\nx = 1\n", ["extra", "unknown section"]),
    (lambda t: t.replace('dataset = "calib.txt"', ""), ["imatrix.dataset"]),
    (lambda t: t.replace('output_tensor_type = "Q6_K"', 'output_type = "Q6_K"'), ["quantize.overrides.Q4_K_M.output_type"]),
    (lambda t: t.replace("[quantize.overrides.Q4_K_M]", "[quantize.overrides.Q4_K_Z]"), ["quantize.overrides", "Q4_K_Z"]),
    (lambda t: t.replace("[eval]", "[eval\n"), ["not valid TOML"]),
])
def test_errors_name_the_key(edit, expect):
    with pytest.raises(QtoolError) as e:
        parse(edit(GOOD))
    msg = str(e.value)
    assert "\n" not in msg
    for part in expect:
        assert part in msg, msg


def test_set_overrides():
    r = parse(GOOD, ["eval.chunks=8", "quantize.types=Q8_0,Q6_K", "gates.default.max_kld=0.05", "output.dir=\"x\""])
    assert r.eval["chunks"] == 8 and r.types == ["Q8_0", "Q6_K"]
    assert r.gate_for("Q8_0").max_kld == 0.05 and r.out_dir == Path("/r/x")
    with pytest.raises(QtoolError, match="KEY=VALUE"):
        parse(GOOD, ["evalchunks"])


def test_missing_file(tmp_path):
    with pytest.raises(QtoolError, match="no such recipe"):
        load_recipe(tmp_path / "nope.toml")


def test_shipped_recipes_are_valid():
    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.toml"))
    # the README's main command and the per-architecture examples: a glob that finds nothing must not pass
    assert {"demo.toml", "llama.toml", "qwen2.toml", "qwen3-moe.toml", "baichuan.toml"} <= {p.name for p in recipes}, recipes
    for p in recipes:
        load_recipe(p)
