"""GGUF tensors -> float32 arrays on demand; the whole float32 model is kept when the memory budget allows.

A model whose float32 size fits the budget is *resident*: every tensor is dequantized once, on first use,
and kept. Otherwise each tensor is dequantized again whenever the forward pass needs it (one layer at a
time), and the two big vocabulary matrices are touched only in slices: token rows by id, output rows in
blocks. Either way the numbers are the same; only speed and memory differ.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGMLQuantizationType

from qtool.errors import QtoolError
from qtool.model_file import GGUFModel
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
    return formats.decode(raw.reshape(-1), GGMLQuantizationType.F16, raw.size // 2).reshape(-1)


class GGUFWeights:
    """The tensors of one GGUF model (all of its split files, through qtool.model_file), as float32 on demand."""

    def __init__(self, path: str | Path, budget: MemoryBudget | None = None):
        self.path = Path(path)
        self.model = GGUFModel.open(self.path)
        self.files = self.model.files
        self.gguf = self.files[0]
        self.n_params = self.model.n_params
        self.tensor_bytes = self.model.tensor_bytes
        self.size_bytes = self.model.size_bytes
        self.float32_bytes = 4 * self.n_params
        budget = budget if budget is not None else MemoryBudget()
        self.resident = budget.reserve(self.float32_bytes)
        self._cache: dict[str, np.ndarray] = {}

    # --- metadata ---------------------------------------------------------------------------------------------
    def value(self, key: str, default=None):
        return self.model.value(key, default)

    @property
    def bits_per_weight(self) -> float:
        return self.model.bits_per_weight

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.model.tensor(name).shape

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self.model.tensor(name).qtype

    def names(self) -> list[str]:
        return list(self.model.tensors)

    # --- data -------------------------------------------------------------------------------------------------
    def get(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (kept for later calls when the model is resident)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        arr = self.model.decode(name)
        if self.resident:
            self._cache[name] = arr
        return arr

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor as a new float32 array (only those rows are dequantized)."""
        ids = np.asarray(ids, dtype=np.int64)
        n_rows = self.model.tensor(name).shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            bad = int(ids[(ids < 0) | (ids >= n_rows)][0])
            raise QtoolError(f"token id {bad} is outside the model's vocabulary of {n_rows}")
        if self.resident or name in self._cache:
            return self.get(name)[ids]
        return np.array(self.model.decode(name, ids), dtype=np.float32)

    def row_blocks(self, name: str, block_bytes: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 rows) covering a 2-D tensor: one block when resident, bounded blocks otherwise."""
        t = self.model.tensor(name)
        if self.resident or name in self._cache:
            yield 0, self.get(name)
            return
        n_rows, n_cols = t.shape[0], int(np.prod(t.shape[1:]))
        step = max(1, (block_bytes or OUTPUT_BLOCK_BYTES) // (4 * n_cols))
        for start in range(0, n_rows, step):
            yield start, self.model.decode(name, slice(start, min(n_rows, start + step)))

    def release(self) -> None:
        self._cache.clear()
