"""Per-tensor type mixes: the candidate types a tensor admits, the budgeted choice, and the mix file.

A *mix* is an exact type for every quantizable tensor of one model. `qtool quantize --target-bpw` chooses one
(qtool/sensitivity.py measures what each choice costs; `solve_budget` here picks the cheapest combination that fits the
byte budget) and `--mix mix.toml` applies a saved one. Only standard GGUF types are written, so llama.cpp loads
the result like any of its own files.

The budgeted choice is a multiple-choice knapsack: one type per tensor, total bytes ≤ budget, minimum summed
predicted KL divergence. `solve_budget` solves it by dynamic programming over the byte budget discretized into at
most `resolution` units, every size rounded *up* to whole units, so a solution of the discretized problem never
exceeds the real budget; the bytes the rounding leaves unused are then spent by a greedy pass of single-tensor
upgrades in exact bytes. With a unit of one byte (small problems) the answer is the exact optimum; on a real model
(200k units, ~200 tensors) the rounding can waste at most (tensors / resolution) of the budget before the greedy
pass, ~0.1%.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.gguf_io import atomic_write
from qtool.quantize.formats import block_size
from qtool.quantize.mixtures import FileType, parse_tensor_type

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# The K-quants need rows that are multiples of 256; the 32-element types are what small models (hidden 576, 960,
# …) can use for most of their tensors, so both families are candidates by default.
DEFAULT_CANDIDATES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL)
MIX_FORMAT_VERSION = 1
DP_RESOLUTION = 200_000

# general.file_type of a mix: the file type whose base type holds most of the parameters (llama.cpp's own mixes
# are labelled the same way: a Q4_K_M file is mostly Q4_K).
_FILE_TYPE_OF = {T.F32: FileType.F32, T.F16: FileType.F16, T.BF16: FileType.BF16, T.Q4_0: FileType.Q4_0,
                 T.Q4_1: FileType.Q4_1, T.Q5_0: FileType.Q5_0, T.Q5_1: FileType.Q5_1, T.Q8_0: FileType.Q8_0,
                 T.Q2_K: FileType.Q2_K, T.Q3_K: FileType.Q3_K_M, T.Q4_K: FileType.Q4_K_M, T.Q5_K: FileType.Q5_K_M,
                 T.Q6_K: FileType.Q6_K, T.IQ4_NL: FileType.IQ4_NL, T.IQ4_XS: FileType.IQ4_XS,
                 T.TQ1_0: FileType.TQ1_0, T.TQ2_0: FileType.TQ2_0, T.Q1_0: FileType.Q1_0, T.Q2_0: FileType.Q2_0,
                 T.MXFP4: FileType.MXFP4_MOE}


def parse_candidates(spec: str | Sequence[str | T] | None) -> list[T]:
    """`Q4_K,Q5_0,…` (or a list) -> distinct types, in the given order; None -> DEFAULT_CANDIDATES."""
    if spec is None:
        return list(DEFAULT_CANDIDATES)
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out: list[T] = []
    for item in items:
        if item == "":
            continue
        qtype = item if isinstance(item, T) else parse_tensor_type(item)
        if qtype == T.F32:
            raise QtoolError("F32 is not a candidate: use F16 or BF16 for tensors that must stay unquantized")
        if qtype not in out:
            out.append(qtype)
    if not out:
        raise QtoolError("--candidates is empty; give types like Q4_K,Q5_0,Q8_0")
    return out


def admissible_types(candidates: Sequence[T], row_length: int) -> list[T]:
    """The candidates whose block divides the row (ggml stores whole blocks per row)."""
    return [t for t in candidates if row_length % block_size(t) == 0]


def file_type_for_mix(types: Mapping[str, T], n_elements: Mapping[str, int]) -> FileType:
    params: dict[T, int] = {}
    for name, qtype in types.items():
        params[qtype] = params.get(qtype, 0) + n_elements[name]
    dominant = max(params, key=lambda t: (params[t], -list(_FILE_TYPE_OF).index(t)))
    return _FILE_TYPE_OF[dominant]


# --- the solver ---------------------------------------------------------------------------------------------------


def solve_budget(sizes: Sequence[Sequence[int]], costs: Sequence[Sequence[float]], budget: int, *,
                 resolution: int = DP_RESOLUTION) -> list[int]:
    """One option per item minimizing the summed cost with summed size ≤ budget (an index per item).

    `sizes[i][j]`, `costs[i][j]`: bytes and cost of option j of item i. Raises QtoolError when even the smallest
    options exceed the budget.
    """
    n = len(sizes)
    if n != len(costs) or any(len(s) != len(c) or not len(s) for s, c in zip(sizes, costs)):
        raise ValueError("every item needs at least one option, with a size and a cost each")
    size_arr = [np.asarray(s, dtype=np.int64) for s in sizes]
    cost_arr = [np.asarray(c, dtype=np.float64) for c in costs]
    smallest = sum(int(s.min()) for s in size_arr)
    if smallest > budget:
        raise QtoolError(f"the budget of {budget:,} bytes is below the smallest possible total of {smallest:,}")
    unit = max(1, math.ceil(budget / resolution))
    units = [-(-s // unit) for s in size_arr]                    # rounded up: the discretized answer stays feasible
    base = [int(u.min()) for u in units]
    capacity = budget // unit - sum(base)
    if capacity < 0:
        choice = [int(np.argmin(s)) for s in size_arr]           # rounding ate the little room there was
    else:
        choice = _knapsack_dp([u - b for u, b in zip(units, base)], cost_arr, capacity)
    return _spend_remainder(choice, size_arr, cost_arr, budget)


def _knapsack_dp(weights: list[np.ndarray], costs: list[np.ndarray], capacity: int) -> list[int]:
    """best[c] = least cost of the items so far within c units; the options taken are kept per item to backtrack."""
    best = np.zeros(capacity + 1, dtype=np.float64)
    taken = np.zeros((len(weights), capacity + 1), dtype=np.int8)
    for i, (w, c) in enumerate(zip(weights, costs)):
        new = np.full(capacity + 1, np.inf)
        for j in range(len(w)):
            wj = int(w[j])
            if wj > capacity:
                continue
            candidate = best[:capacity + 1 - wj] + c[j]
            better = candidate < new[wj:]
            new[wj:][better] = candidate[better]
            taken[i, wj:][better] = j
        best = new
    choice = [0] * len(weights)
    room = capacity
    for i in range(len(weights) - 1, -1, -1):
        j = int(taken[i, room])
        choice[i] = j
        room -= int(weights[i][j])
    return choice


def _spend_remainder(choice: list[int], sizes: list[np.ndarray], costs: list[np.ndarray], budget: int) -> list[int]:
    """Greedy single-item swaps in exact bytes: the best cost saved per extra byte first, while any fits."""
    choice = list(choice)
    used = sum(int(s[j]) for s, j in zip(sizes, choice))
    while True:
        best = None
        for i, (s, c) in enumerate(zip(sizes, costs)):
            extra = s - s[choice[i]]
            saved = c[choice[i]] - c
            ok = (extra <= budget - used) & (saved > 0)
            if not ok.any():
                continue
            ratio = np.where(ok, saved / np.maximum(extra, 1), -np.inf)
            j = int(np.argmax(ratio))
            if best is None or ratio[j] > best[0]:
                best = (ratio[j], i, j)
        if best is None:
            return choice
        _, i, j = best
        used += int(sizes[i][j] - sizes[i][choice[i]])
        choice[i] = j


# --- the mix file ---------------------------------------------------------------------------------------------------


@dataclass
class MixFile:
    tensors: dict[str, T]                                   # tensor name -> type, in the model's tensor order
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def predicted_kld(self) -> float | None:
        """The mean KLD the mix was chosen for (on its calibration text), when its provenance records one."""
        v = self.provenance.get("predicted_kld")
        return float(v) if isinstance(v, (int, float)) else None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"cannot write {v} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)      # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} to TOML")


def mix_to_toml(mix: MixFile) -> str:
    lines = ["# A per-tensor type mix: `qtool quantize IN.gguf OUT.gguf --mix THIS_FILE`, or `mix = \"…\"` in a",
             "# recipe's [quantize.overrides.TYPE]. [tensors] is what is applied; [provenance] records how it was made.",
             f"format_version = {MIX_FORMAT_VERSION}", "", "[provenance]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in mix.provenance.items() if v is not None]
    lines += ["", "[tensors]"]
    lines += [f"{_toml_value(name)} = {_toml_value(qtype.name)}" for name, qtype in mix.tensors.items()]
    return "\n".join(lines) + "\n"


def write_mix(mix: MixFile, path: str | Path, *, force: bool = False) -> Path:
    """Write atomically (a temporary file renamed into place)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise QtoolError(f"mix file directory {path.parent} does not exist")
    return atomic_write(path, mix_to_toml(mix), force=force)


def read_mix(path: str | Path) -> MixFile:
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"mix file {path} not found")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QtoolError(f"mix file {path}: not valid TOML ({e})") from None
    version = raw.get("format_version", MIX_FORMAT_VERSION)
    if version != MIX_FORMAT_VERSION:
        raise QtoolError(f"mix file {path}: format_version {version!r} is not supported (this qtool reads "
                         f"{MIX_FORMAT_VERSION})")
    unknown = [k for k in raw if k not in ("format_version", "provenance", "tensors")]
    if unknown:
        raise QtoolError(f"mix file {path}: unknown key {unknown[0]!r} (allowed: format_version, [provenance], "
                         f"[tensors])")
    table = raw.get("tensors")
    if not isinstance(table, dict) or not table:
        raise QtoolError(f"mix file {path}: no [tensors] table (tensor name = \"TYPE\")")
    tensors: dict[str, T] = {}
    for name, type_name in table.items():
        if not isinstance(type_name, str):
            raise QtoolError(f"mix file {path}: tensor {name!r}: the type must be a string like \"Q4_K\", "
                             f"got {type_name!r}")
        try:
            qtype = parse_tensor_type(type_name)
        except QtoolError as e:
            raise QtoolError(f"mix file {path}: tensor {name!r}: {e}") from None
        tensors[name] = qtype
    provenance = raw.get("provenance", {})
    if not isinstance(provenance, dict):
        raise QtoolError(f"mix file {path}: provenance must be a table")
    return MixFile(tensors, provenance, path)


__all__ = ["DEFAULT_CANDIDATES", "MixFile", "admissible_types", "file_type_for_mix",
           "parse_candidates", "read_mix", "solve_budget", "write_mix"]
