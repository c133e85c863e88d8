"""GGUF tensors for the forward pass, read in their stored form: the memory-mapped file is the model.

No float32 copy of the model is made. Each matrix product `x @ W.T` decodes W a tile of rows at a time into a
small float32 buffer (parallel numba decoders, `formats.decode`) and multiplies that tile against the whole batch
with BLAS, tile after tile; a product of a few rows (decoding one token) reads the blocks directly in a mat-vec
kernel where the type has one (`qtool.evaluate.matvec`). F16 and BF16 weights skip the float32 tile: their
halves are widened in the registers of a small GEMM of our own (`qtool.evaluate.halfgemm`). K-quant weights times Q8_K-rounded activations (llama.cpp's
arithmetic for them) skip both: their codes are multiplied as integers (`qtool.evaluate.qdot`). Memory is the file (page cache) plus activations and one
tile. Small tensors (norms, biases, rope factors) are decoded once and kept.

`--max-memory` (a `MemoryBudget` of bytes) turns on a cache of decoded float32 tensors for those with RAM to
spare: each tensor is kept on first use while the budget lasts, and its products then skip the decode. The
numbers are the same either way (only BLAS's summation order may differ in the last bits between a whole-matrix
and a tiled product).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from gguf import GGMLQuantizationType

from qtool.errors import QtoolError
from qtool.model_file import GGUFModel, decode_rows
from qtool.evaluate import halfgemm
from qtool.quantize import formats

if TYPE_CHECKING:
    from qtool.evaluate.qdot import Q80, Q8K

T = GGMLQuantizationType
# Float32 bytes of one decoded tile: big enough for BLAS to run at full speed on it (OpenBLAS's sgemm of 512 rows
# times a 4096-wide tile: 512 tile rows 164-175 GFLOP/s, 2048 rows 184, all 11008 rows 198), small beside the model.
# Measured on a Zen 4 (2 cores, 32 MB L3), 7B Q8_0 products (4 ffn_gate + 4 attn_q, decoding included): 512 rows
# 1423 ms with 8 MB tiles, 1344 with 32 MB, 1317 with 256 MB; 2048 rows 5302 vs 5120 ms (8 vs 32 MB).
TILE_BYTES = 32 * 1024 * 1024
# Tensors of at most this many elements (norms, biases, rope factors) are decoded once and kept.
SMALL_TENSOR_ELEMENTS = 1 << 16
# Products with at most this many input rows use the mat-vec kernels where the type has one.
MATVEC_MAX_ROWS = 4


class MemoryBudget:
    """Bytes that cached float32 tensors may still take; shared by every model of one run (default: none)."""

    def __init__(self, nbytes: int | None = None):
        self.total = 0 if nbytes is None else max(0, int(nbytes))
        self.remaining = self.total

    def reserve(self, nbytes: int) -> bool:
        if nbytes > self.remaining:
            return False
        self.remaining -= nbytes
        return True


class GGUFWeights:
    """The tensors of one GGUF model (all of its split files, through qtool.model_file), in their stored form."""

    def __init__(self, path: str | Path, budget: MemoryBudget | None = None):
        self.path = Path(path)
        self.model = GGUFModel.open(self.path)
        self.files = self.model.files
        self.gguf = self.files[0]
        self.n_params = self.model.n_params
        self.tensor_bytes = self.model.tensor_bytes
        self.size_bytes = self.model.size_bytes
        self.float32_bytes = 4 * self.n_params
        self.budget = budget if budget is not None else MemoryBudget()
        self._cache: dict[str, np.ndarray] = {}          # decoded float32 tensors (small ones, and the budget's)
        self._raw: dict[str, np.ndarray] = {}            # stored rows (uint8 [rows, row bytes], memory-mapped)
        self._tile: np.ndarray | None = None

    # --- metadata ---------------------------------------------------------------------------------------------
    def value(self, key: str, default=None):
        return self.model.value(key, default)

    @property
    def bits_per_weight(self) -> float:
        return self.model.bits_per_weight

    @property
    def cached_bytes(self) -> int:
        return sum(a.nbytes for a in self._cache.values())

    def has(self, name: str) -> bool:
        return name in self.model.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.model.tensor(name).shape

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self.model.tensor(name).qtype

    def names(self) -> list[str]:
        return list(self.model.tensors)

    # --- data -------------------------------------------------------------------------------------------------
    def dense(self, name: str) -> np.ndarray | None:
        """The float32 tensor when one is held (cached, or a float32 tensor's own memory map), else None."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        t = self.model.tensor(name)
        if t.n_elements <= SMALL_TENSOR_ELEMENTS or (self.budget.remaining and self.budget.reserve(4 * t.n_elements)):
            arr = self._cache[name] = np.ascontiguousarray(self.model.decode(name), dtype=np.float32)
            return arr
        if t.qtype == T.F32:
            return self.model.decode(name)          # a view of the memory map
        return None

    def get(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (a new array unless it is held)."""
        arr = self.dense(name)
        return arr if arr is not None else self.model.decode(name)

    def stored(self, name: str) -> np.ndarray:
        """The stored rows of a 2-D tensor: uint8 [rows, row bytes], memory-mapped (of a 3-D tensor of stacked
        experts: one row of bytes per expert)."""
        raw = self._raw.get(name)
        if raw is None:
            t = self.model.tensor(name)
            raw = self._raw[name] = t.raw().reshape(t.shape[0], -1)
        return raw

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` of a 2-D tensor as a new float32 array (only those rows are decoded)."""
        ids = np.asarray(ids, dtype=np.int64)
        n_rows = self.model.tensor(name).shape[0]
        if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
            bad = int(ids[(ids < 0) | (ids >= n_rows)][0])
            raise QtoolError(f"token id {bad} is outside the model's vocabulary of {n_rows}")
        held = self._cache.get(name)
        if held is not None:
            return held[ids]
        t = self.model.tensor(name)       # the rows of the kept mapping (stored): a new memory map per call cost a
        rows = decode_rows(self.stored(name), t.qtype, t.shape, ids)       # decoded token 7 % of SmolLM2's time
        return np.array(rows, dtype=np.float32)

    def matmul(self, name: str, x: np.ndarray, out: np.ndarray, expert: int | None = None,
               tile: np.ndarray | None = None, codes: Q8K | Q80 | None = None,
               panels: Callable[[], np.ndarray] | None = None) -> np.ndarray:
        """out = x @ W.T for float32 x (rows, n_in) and the 2-D tensor W (n_out, n_in); out is (rows, n_out).

        `expert`: W is that expert's matrix of a 3-D tensor of stacked experts (n_expert, n_out, n_in).
        `tile`: a float32 buffer of at least `tile_elements(name)` for the decoded rows, instead of this object's
        own (threads running products side by side each bring theirs).
        `codes`: x's rows as Q8_K codes (evaluate/qdot.quantize_q8_k), or its one row as Q8_0 codes
        (qdot.quantize_q8_0): stored K-quant weights (Q8_K), or Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 weights (Q8_0),
        multiply them as integers (evaluate/qdot.py), and x only gives the number of rows.
        `panels`: gives x packed for halfgemm (`halfgemm.panels`), when F16/BF16 weights take that path: the
        products of one input share one packing."""
        if x.shape[0] == 0:
            return out
        w = self.dense(name)
        if w is not None:
            return np.matmul(x, (w if expert is None else w[expert]).T, out=out)
        t = self.model.tensor(name)
        raw = self.stored(name)
        n_out, n_in = t.shape[-2:]
        if expert is not None:
            raw = raw[expert].reshape(n_out, -1)
        if codes is not None:
            from qtool.evaluate import qdot
            kernel = qdot.kernel_for(t.qtype) if isinstance(codes, qdot.Q8K) else qdot.kernel_for_q8_0(t.qtype)
            if kernel is not None:
                kernel(raw, codes, out)
                return out
        if x.shape[0] <= MATVEC_MAX_ROWS:
            from qtool.evaluate import matvec
            kernel = matvec.kernel_for(t.qtype)
            if kernel is not None:
                kernel(raw, x, out)
                return out
        if tile is None and halfgemm.supports(t.qtype, n_out):       # F16 / BF16: widened in registers
            return halfgemm.product(raw, t.qtype, x, out, None if panels is None else panels())
        step = self._tile_rows(n_out, n_in)
        if tile is None:
            if self._tile is None or self._tile.size < step * n_in:
                self._tile = np.empty(step * n_in, np.float32)
            tile = self._tile
        tile = tile[:step * n_in].reshape(step, n_in)
        for first in range(0, n_out, step):
            last = min(n_out, first + step)
            block = formats.decode(raw[first:last], t.qtype, n_in, out=tile[:last - first])
            np.matmul(x, block.T, out=out[:, first:last])
        return out

    @staticmethod
    def _tile_rows(n_out: int, n_in: int) -> int:
        return min(max(16, TILE_BYTES // (4 * n_in)) // 16 * 16, n_out)

    def tile_elements(self, name: str) -> int:
        """The float32 elements of the decode tile `matmul` uses for the (per-expert) matrix `name`."""
        n_out, n_in = self.model.tensor(name).shape[-2:]
        return self._tile_rows(n_out, n_in) * n_in

    def unmap(self) -> None:
        """Drop this model's memory maps (their pages leave the process; the page cache may keep them): the next
        product maps its tensor again. Lockstep evaluation calls it after each model's pass, so that several models
        together never hold more than one model's pages (nor its decode tile)."""
        self._raw.clear()
        self._tile = None

    def release(self) -> None:
        self._cache.clear()
        self._raw.clear()
        self._tile = None
