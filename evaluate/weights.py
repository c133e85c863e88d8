"""GGUF tensors -> float32 arrays on demand; the whole float32 model is kept when the memory budget allows.

A model whose float32 size fits the budget is *resident*: every tensor is dequantized once, on first use,
and kept. Otherwise each tensor is dequantized again whenever the forward pass needs it (one layer at a
time), and the two big vocabulary matrices are touched only in slices: token rows by id, output rows in
blocks. Either way the numbers are the same; only speed and memory differ.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType

from qtool.errors import QtoolError
from qtool.gguf_io import GGUFFile, GGUFTensorInfo, read_gguf
from qtool.info import shard_files
from qtool.quantize import formats

# Share of the currently available RAM that resident models may take by default: the rest is left for
# activations, logits, the page cache of the GGUF files, and whatever else runs on the machine.
DEFAULT_MEMORY_FRACTION = 0.5
# Rows of a non-resident output matrix dequantized at once (bounds the temporary to a few hundred MB).
OUTPUT_BLOCK_BYTES = 256 * 1024 * 1024


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); a conservative 4 GB where that is unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 10**9


def default_max_memory() -> int:
    return int(available_memory() * DEFAULT_MEMORY_FRACTION)


class MemoryBudget:
    """Bytes that resident float32 models may still take; shared by every model of one run."""

    def __init__(self, nbytes: int | None = None):
        self.total = default_max_memory() if nbytes is None else int(nbytes)
        self.remaining = self.total

    def reserve(self, nbytes: int) -> bool:
        if nbytes > self.remaining:
            return False
        self.remaining -= nbytes
        return True


def f16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Stored float16 bytes -> a new flat float32 array (exact, on all cores; numpy's cast uses one)."""
    from qtool.quantize.kernels.floats import decode_f16

    half = raw.reshape(-1).view(np.uint16)
    out = np.empty(half.size, np.float32)
    decode_f16(half, out)
    return out


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Stored bytes (as GGUFFile.raw gives them, or a row selection of them) -> float32 of `shape`.

    F32 stays a view of the (memory-mapped) file; block formats are decoded by quantize/formats.py.
    """
    if qtype == GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape)
    if qtype == GGMLQuantizationType.F16:
        return f16_to_f32(raw).reshape(shape)
    try:
        out = formats.dequantize(raw, qtype, shape[-1])
    except NotImplementedError:
        raise QtoolError(f"tensor type {qtype.name} cannot be dequantized (not supported by gguf-py)") from None
    return out.reshape(shape)


@dataclass
class _Entry:
    file: GGUFFile
    info: GGUFTensorInfo


class GGUFWeights:
    """The tensors of one GGUF model (all of its split files), as float32 on demand."""

    def __init__(self, path: str | Path, budget: MemoryBudget | None = None):
        self.path = Path(path)
        files = shard_files(self.path)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise QtoolError(f"{self.path}: {'split file ' + missing[0].name if len(files) > 1 else 'no such file'}"
                             f"{' is missing' if len(files) > 1 else ''}")
        self.files = [read_gguf(f) for f in files]
        self.gguf = self.files[0]
        self._entries: dict[str, _Entry] = {}
        for g in self.files:
            for t in g.tensors:
                self._entries[t.name] = _Entry(g, t)
        self.n_params = sum(int(np.prod(e.info.shape, dtype=np.int64)) for e in self._entries.values())
        self.tensor_bytes = sum(e.info.nbytes for e in self._entries.values())
        self.size_bytes = sum(f.stat().st_size for f in files)
        self.float32_bytes = 4 * self.n_params
        budget = budget if budget is not None else MemoryBudget()
        self.resident = budget.reserve(self.float32_bytes)
        self._cache: dict[str, np.ndarray] = {}

    # --- metadata ---------------------------------------------------------------------------------------------
    def value(self, key: str, default=None):
        return self.gguf.value(key, default)

    @property
    def bits_per_weight(self) -> float:
        """Tensor bits per parameter, as llama.cpp's loader reports it (`model size ... BPW`)."""
        return 8.0 * self.tensor_bytes / self.n_params if self.n_params else 0.0

    def has(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).info.shape

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self._entry(name).info.qtype

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise QtoolError(f"{self.path}: tensor {name!r} is missing") from None

    # --- data -------------------------------------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (kept for later calls when the model is resident)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        e = self._entry(name)
        arr = dequantize(e.file.raw(e.info), e.info.qtype, e.info.shape)
        if self.resident:
            self._cache[name] = arr
        return arr

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor as a new float32 array (only those rows are dequantized)."""
        ids = np.asarray(ids, dtype=np.int64)
        e = self._entry(name)
        n_rows = e.info.shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            bad = int(ids[(ids < 0) | (ids >= n_rows)][0])
            raise QtoolError(f"token id {bad} is outside the model's vocabulary of {n_rows}")
        if self.resident or name in self._cache:
            return self.get(name)[ids]
        raw = e.file.raw(e.info)
        return np.array(dequantize(raw[ids], e.info.qtype, (ids.size, *e.info.shape[1:])), dtype=np.float32)

    def row_blocks(self, name: str, block_bytes: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) covering a 2-D tensor: one block when resident, bounded blocks otherwise."""
        e = self._entry(name)
        if self.resident or name in self._cache:
            yield 0, self.get(name)
            return
        n_rows, n_cols = e.info.shape[0], int(np.prod(e.info.shape[1:]))
        step = max(1, (block_bytes or OUTPUT_BLOCK_BYTES) // (4 * n_cols))
        raw = e.file.raw(e.info)
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            yield start, dequantize(raw[start:stop], e.info.qtype, (stop - start, *e.info.shape[1:]))

    def release(self) -> None:
        self._cache.clear()

