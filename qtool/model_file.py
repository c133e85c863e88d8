"""The model-file layer: what every stage reads a GGUF model through.

`GGUFModel.open(path)` finds the model's split files (gguf-split's `<stem>-00001-of-0000N.gguf` naming), reads their
headers once, holds the metadata (first file; `value(key)` gives plain values), every tensor by name across the
splits (a name twice is an error), the hyper-parameters parsed once into `HParams`, and decodes a tensor or a row
range to float32 through the format table (`quantize/formats.py`'s `decode`, the one decoder).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType

from qtool.errors import QtoolError
from qtool.gguf_io import KV, GGUFFile, GGUFTensorInfo, read_gguf

SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_paths(path: str | Path) -> list[Path]:
    """Every file of the model `path` names: itself, or all N splits when it is named like one of them.
    A missing file is an error naming it."""
    path = Path(path)
    m = SPLIT_NAME.match(path.name)
    if not m:
        if not path.is_file():
            raise QtoolError(f"{path}: no such file")
        return [path]
    count = int(m.group("count"))
    paths = [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise QtoolError(f"{path}: split file {missing[0].name} is missing")
    return paths


# --- hyper-parameters ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HParams:
    """The numbers a GGUF records about the model (`<arch>.*` keys), parsed once.

    llama.cpp allows per-layer arrays for some of them; a field holds layer 0's value (what llama-quantize's rules
    read) and `per_layer` names the keys whose layers differ, so a reader that needs uniform layers can refuse
    them (`require_uniform`). Optional keys are None when absent; `need(name)` turns a None into the error."""

    arch: str
    source: str                                  # the file, for error messages
    n_layer: int | None = None
    n_embd: int | None = None
    n_ff: int | None = None
    n_head: int | None = None
    n_head_kv: int | None = None                 # None: llama.cpp defaults it to n_head
    key_length: int | None = None
    value_length: int | None = None
    n_rot: int | None = None
    rms_eps: float | None = None
    context_length: int | None = None
    rope_base: float | None = None
    rope_scaling_type: str | None = None
    rope_scaling_factor: float | None = None     # rope.scaling.factor, else the older rope.scale_linear
    rope_orig_ctx: int | None = None             # rope.scaling.original_context_length
    n_expert: int | None = None
    per_layer: tuple[str, ...] = ()

    # field -> the key after "<arch>."
    KEYS = {"n_layer": "block_count", "n_embd": "embedding_length", "n_ff": "feed_forward_length",
            "n_head": "attention.head_count", "n_head_kv": "attention.head_count_kv",
            "key_length": "attention.key_length", "value_length": "attention.value_length",
            "n_rot": "rope.dimension_count", "rms_eps": "attention.layer_norm_rms_epsilon",
            "context_length": "context_length", "rope_base": "rope.freq_base",
            "rope_scaling_type": "rope.scaling.type", "rope_scaling_factor": "rope.scaling.factor",
            "rope_orig_ctx": "rope.scaling.original_context_length", "n_expert": "expert_count"}
    _FLOATS = ("rms_eps", "rope_base", "rope_scaling_factor")

    @classmethod
    def from_kv(cls, kv: Mapping[str, Any], source: str = "the model") -> "HParams":
        """From plain metadata values (`GGUFModel.values()`, or any {key: value})."""
        arch = kv.get("general.architecture")
        if not arch:
            raise QtoolError(f"{source}: no general.architecture key")
        values, uneven = {}, []
        for name, suffix in cls.KEYS.items():
            v = kv.get(f"{arch}.{suffix}")
            if not v and name == "rope_scaling_factor":   # 0 or absent: the older key
                v = kv.get(f"{arch}.rope.scale_linear")
            if isinstance(v, (list, tuple)):
                if not v:
                    continue
                if len(set(v)) != 1:
                    uneven.append(suffix)
                v = v[0]
            if v is not None:
                values[name] = float(v) if name in cls._FLOATS else str(v) if name == "rope_scaling_type" else int(v)
        return cls(arch=str(arch), source=source, per_layer=tuple(uneven), **values)

    def need(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise QtoolError(f"{self.source}: missing metadata key {self.arch}.{self.KEYS[name]}")
        return value

    def require_uniform(self) -> "HParams":
        if self.per_layer:
            raise QtoolError(f"{self.source}: per-layer {self.arch}.{self.per_layer[0]} values are not supported")
        return self

    @property
    def head_count_kv(self) -> int:
        """n_head_kv with llama.cpp's default (the head count)."""
        return self.n_head_kv if self.n_head_kv is not None else self.need("n_head")

    @property
    def head_dim(self) -> int:
        """attention.key_length, else embedding_length / head_count."""
        return self.key_length if self.key_length is not None else self.need("n_embd") // self.need("n_head")

    def check_gqa(self) -> None:
        n_head, n_kv = self.need("n_head"), self.head_count_kv
        if n_kv <= 0 or n_head % n_kv:
            raise QtoolError(f"{self.source}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")


# --- the model ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorRef:
    """One stored tensor: where it is (file and offset) and what it is."""

    file: GGUFFile
    info: GGUFTensorInfo

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.info.qtype

    @property
    def n_elements(self) -> int:
        return math.prod(self.info.shape)

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def raw(self) -> np.ndarray:
        """The stored bytes, memory-mapped, shaped [rows, row bytes] as the decoders take them."""
        return self.file.raw(self.info)


@dataclass
class GGUFModel:
    path: Path
    files: list[GGUFFile]
    tensors: dict[str, TensorRef] = field(repr=False)

    @classmethod
    def open(cls, path: str | Path, *, lazy_strings: bool = False) -> "GGUFModel":
        path = Path(path)
        files = [read_gguf(p, lazy_strings=lazy_strings) for p in split_paths(path)]
        tensors: dict[str, TensorRef] = {}
        for f in files:
            for t in f.tensors:
                if t.name in tensors:
                    raise QtoolError(f"{path}: tensor {t.name!r} appears twice")
                tensors[t.name] = TensorRef(f, t)
        return cls(path, files, tensors)

    # --- metadata -----------------------------------------------------------------------------------------------
    @property
    def kv(self) -> dict[str, KV]:
        """The model's metadata (the first file's: split files repeat only their split.* keys)."""
        return self.files[0].kv

    def value(self, key: str, default: Any = None) -> Any:
        return self.files[0].value(key, default)

    def values(self) -> dict[str, Any]:
        return self.files[0].values()

    @property
    def arch(self) -> str | None:
        return self.value("general.architecture")

    @cached_property
    def hparams(self) -> HParams:
        return HParams.from_kv(self.values(), str(self.path))

    # --- sizes --------------------------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def size_bytes(self) -> int:
        return sum(f.path.stat().st_size for f in self.files)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bits per parameter, as llama.cpp's loader reports it (`model size ... BPW`)."""
        n = self.n_params
        return 8.0 * self.tensor_bytes / n if n else 0.0

    # --- tensors ------------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise QtoolError(f"{self.path}: tensor {name!r} is missing") from None

    def decode(self, name: str, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """A tensor (or the rows `rows` selects of a 2-D one) as float32, in its numpy shape. F32 stays a view of
        the mapped file; everything else is decoded by the format table."""
        t = self.tensor(name)
        return decode_rows(t.raw(), t.qtype, t.shape, rows)


def decode_rows(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
                rows: slice | np.ndarray | None = None) -> np.ndarray:
    """Stored bytes [rows, row bytes] of a tensor of `shape` -> float32, optionally only the rows `rows` selects."""
    from qtool.quantize.formats import decode  # the one decoder (late: gguf_io's GGUFFile.array comes here too)

    if rows is not None:
        raw = raw[rows]
        shape = (raw.shape[0], *shape[1:])
    return decode(raw, qtype, shape[-1]).reshape(shape)
