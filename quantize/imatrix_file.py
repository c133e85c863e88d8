"""Importance-matrix files: llama.cpp's GGUF format and its legacy `.dat` format, read and written.

An importance matrix holds, for every matmul weight, the sum over calibration tokens of the squared input
activation of each column (docs/reference/quantization.md §6). llama-quantize turns it into one weight per column — the mean
squared activation — and the quantizers minimise the error weighted by it.

In memory (`Imatrix`), entries keep what the file holds:
* GGUF files (`legacy=False`): `sums` are the raw sums, float32 `[n_mat, n_cols]` (n_mat = experts, 1 for dense
  weights), `counts` the tokens seen per matrix, int64 `[n_mat]`;
* legacy files (`legacy=True`): `sums` are the stored values `(sum / count) * ncall` as `[1, n_values]` and
  `counts` is `[ncall]` — the format keeps no more than that.
`column_weights` applies llama-quantize's normalisation to either (§6.4).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from qtool.errors import QtoolError
from qtool.gguf_io import KV, PlannedTensor, atomic_write, read_gguf, write_gguf

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"


class ImatrixEntry(NamedTuple):
    sums: np.ndarray     # float32 [n_mat, n_cols]
    counts: np.ndarray   # int64 [n_mat]


@dataclass
class Imatrix:
    entries: dict[str, ImatrixEntry]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0          # tokens per chunk; legacy files do not record it (0)
    legacy: bool = False


@dataclass
class ImatrixIssues:
    """What llama-quantize silently accepts in an imatrix, counted so it can be reported."""

    unused_matrices: dict[str, int] = field(default_factory=dict)   # entry -> experts without data (weight 1)
    zero_columns: dict[str, int] = field(default_factory=dict)      # entry -> columns with weight 0

    def lines(self) -> list[str]:
        out = []
        if self.unused_matrices:
            n = sum(self.unused_matrices.values())
            first = next(iter(self.unused_matrices))
            out.append(f"{n} imatrix matrices in {len(self.unused_matrices)} entries saw no tokens "
                       f"(e.g. {first}); their columns get weight 1, as llama-quantize does")
        if self.zero_columns:
            n = sum(self.zero_columns.values())
            worst = max(self.zero_columns, key=self.zero_columns.get)
            out.append(f"{n} imatrix columns in {len(self.zero_columns)} entries are zero (most: {worst}, "
                       f"{self.zero_columns[worst]}); those columns are ignored when choosing scales, "
                       f"as llama-quantize does")
        return out


# --- reading ----------------------------------------------------------------------------------------------------


def read_imatrix(path: str | Path) -> Imatrix:
    """Either format; like llama.cpp, a file that is not GGUF is read as legacy `.dat`."""
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf_imatrix(path)
    return _read_dat_imatrix(path)


def _read_gguf_imatrix(path: Path) -> Imatrix:
    gf = read_gguf(path)
    if not gf.tensors:
        raise QtoolError(f"{path}: the imatrix file has no entries")
    missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in gf.kv]
    if missing:
        # llama-quantize refuses these too ("missing imatrix metadata")
        raise QtoolError(f"{path}: not an imatrix file: missing {', '.join(missing)}")
    datasets = gf.kv["imatrix.datasets"]
    if datasets.type != GGUFValueType.ARRAY or datasets.sub_type != GGUFValueType.STRING:
        raise QtoolError(f"{path}: imatrix.datasets is not an array of strings")

    pairs: dict[str, dict[str, object]] = {}
    for t in gf.tensors:
        for suffix in (SUMS_SUFFIX, COUNTS_SUFFIX):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[:-len(suffix)], {})[suffix] = t
    entries = {}
    for name in sorted(pairs):
        pair = pairs[name]
        if SUMS_SUFFIX not in pair or COUNTS_SUFFIX not in pair:
            raise QtoolError(f"{path}: entry {name} has {'sums' if SUMS_SUFFIX in pair else 'counts'} "
                             f"but no {'counts' if SUMS_SUFFIX in pair else 'sums'}")
        sums_t, counts_t = pair[SUMS_SUFFIX], pair[COUNTS_SUFFIX]
        if sums_t.qtype != GGMLQuantizationType.F32 or counts_t.qtype != GGMLQuantizationType.F32:
            raise QtoolError(f"{path}: entry {name}: sums and counts must be F32")
        sums = np.array(gf.array(sums_t), dtype=np.float32).reshape(-1)
        counts_f = np.array(gf.array(counts_t), dtype=np.float32).reshape(-1)
        if counts_f.size == 0 or sums.size == 0 or sums.size % counts_f.size:
            raise QtoolError(f"{path}: entry {name}: {sums.size} sums do not split into {counts_f.size} matrices")
        if not np.all(np.isfinite(counts_f)):
            raise QtoolError(f"{path}: entry {name}: non-finite token count")
        entries[name] = ImatrixEntry(sums.reshape(counts_f.size, -1), _lround(counts_f))
    return Imatrix(entries, list(datasets.value), int(gf.value("imatrix.chunk_count")),
                   int(gf.value("imatrix.chunk_size")), legacy=False)


def _lround(x: np.ndarray) -> np.ndarray:
    """C's lround: half away from zero (numpy's round is half to even)."""
    x = x.astype(np.float64)
    return (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(np.int64)


def _read_dat_imatrix(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise QtoolError(f"{path}: not an imatrix file (neither GGUF nor a complete legacy .dat: "
                             f"truncated at {what})")
        out = data[pos:pos + n]
        pos += n
        return out

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1:
        raise QtoolError(f"{path}: not an imatrix file (no entries)")
    entries = {}
    for i in range(n_entries):
        length = i32(f"entry {i + 1}")
        if length < 0:
            raise QtoolError(f"{path}: not an imatrix file (bad name length in entry {i + 1})")
        name = take(length, f"entry {i + 1}").decode("utf-8", errors="replace")
        ncall = i32(f"entry {name}")
        nval = i32(f"entry {name}")
        if nval < 1:
            raise QtoolError(f"{path}: entry {name} has no values")
        values = np.frombuffer(take(4 * nval, f"entry {name}"), dtype="<f4").astype(np.float32)
        entries[name] = ImatrixEntry(values.reshape(1, nval), np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if pos < len(data):                       # the trailer is optional
        if pos + 4 <= len(data):
            chunk_count = i32("the chunk count")
            if pos + 4 <= len(data):
                length = i32("the dataset name")
                if length > 0 and pos + length <= len(data):
                    datasets.append(take(length, "the dataset name").decode("utf-8", errors="replace"))
    return Imatrix(entries, datasets, chunk_count, 0, legacy=True)


# --- from file contents to per-column weights ------------------------------------------------------------------


def column_weights(imatrix: Imatrix) -> tuple[dict[str, np.ndarray], ImatrixIssues]:
    """llama-quantize's `load_imatrix`: name -> float32 [n_mat * n_cols] mean squared activations.

    GGUF: sum / count per matrix (a matrix that saw no tokens gets 1.0); legacy: value / ncall (or the value when
    ncall is 0). Non-finite or negative results are refused (llama-quantize refuses non-finite ones).
    """
    weights: dict[str, np.ndarray] = {}
    issues = ImatrixIssues()
    for name, (sums, counts) in imatrix.entries.items():
        sums = np.asarray(sums, dtype=np.float32).reshape(len(counts), -1)
        if imatrix.legacy:
            ncall = int(counts[0])
            w = sums / np.float32(ncall) if ncall > 0 else sums.copy()
        else:
            w = np.empty_like(sums)
            for j, count in enumerate(counts):
                if count > 0:
                    w[j] = sums[j] / np.float32(count)   # C: float / (float) int64
                else:
                    w[j] = 1.0
                    issues.unused_matrices[name] = issues.unused_matrices.get(name, 0) + 1
        w = w.reshape(-1)
        bad = ~np.isfinite(w)
        if bad.any():
            raise QtoolError(f"imatrix entry {name} has {int(bad.sum())} non-finite values "
                             f"(first at column {int(np.argmax(bad))}); the file is damaged")
        if (w < 0).any():
            raise QtoolError(f"imatrix entry {name} has {int((w < 0).sum())} negative values: sums of squares "
                             f"cannot be negative; the file is damaged")
        zeros = int((w == 0).sum())
        if zeros:
            issues.zero_columns[name] = zeros
        weights[name] = w
    return weights, issues


# --- writing ----------------------------------------------------------------------------------------------------


def _as_entry(name: str, value) -> ImatrixEntry:
    sums, counts = value
    sums = np.asarray(sums, dtype=np.float32)
    counts = np.atleast_1d(np.asarray(counts)).astype(np.int64).reshape(-1)
    if sums.ndim == 1:
        sums = sums.reshape(1, -1)
    if sums.ndim != 2 or sums.shape[0] != counts.size or sums.shape[1] == 0:
        raise QtoolError(f"imatrix entry {name}: sums of shape {sums.shape} do not match {counts.size} counts")
    return ImatrixEntry(sums, counts)


def write_imatrix_gguf(path: str | Path, entries: Mapping[str, ImatrixEntry | tuple], *, datasets: Sequence[str],
                       chunk_count: int, chunk_size: int, force: bool = False) -> Path:
    """The GGUF imatrix format, byte for byte as llama-imatrix writes it.

    `entries`: name -> (sums float32 [n_cols] or [n_mat, n_cols] raw sums of squared activations, counts
    [n_mat] tokens seen). Entries are written sorted by name, each as `<name>.in_sum2` then `<name>.counts`.
    """
    path = Path(path)
    items = [(name, _as_entry(name, entries[name])) for name in sorted(entries)]
    if not items:
        raise QtoolError("an imatrix needs at least one entry")
    kvs = [KV("general.type", "imatrix", GGUFValueType.STRING),
           KV("imatrix.datasets", list(datasets), GGUFValueType.ARRAY, GGUFValueType.STRING),
           KV("imatrix.chunk_count", int(chunk_count), GGUFValueType.UINT32),
           KV("imatrix.chunk_size", int(chunk_size), GGUFValueType.UINT32)]
    tensors = []
    for name, e in items:
        n_mat, n_cols = e.sums.shape
        # ggml stores a [n, 1] tensor as 1-D, so dense entries are 1-D in llama-imatrix's files
        sums = e.sums if n_mat > 1 else e.sums.reshape(n_cols)
        counts = e.counts.astype(np.float32).reshape(n_mat, 1) if n_mat > 1 else e.counts.astype(np.float32)
        for tensor_name, data in ((name + SUMS_SUFFIX, sums), (name + COUNTS_SUFFIX, counts)):
            tensors.append(PlannedTensor(tensor_name, data.shape, GGMLQuantizationType.F32,
                                         lambda data=data: np.ascontiguousarray(data, dtype=np.float32)))
    # no general.architecture: an imatrix file has none (llama-imatrix writes general.type first)
    write_gguf(path, None, kvs, tensors, force=force)
    return path




def write_imatrix_dat(path: str | Path, entries: Mapping[str, ImatrixEntry | tuple], *, datasets: Sequence[str],
                      chunk_count: int, chunk_size: int, force: bool = False) -> Path:
    """The legacy `.dat` format, byte for byte as `llama-imatrix --output-format dat` writes it.

    Same `entries` as `write_imatrix_gguf`. Each entry stores `(sum / count) * ncall` with
    ncall = ceil(max(counts) / chunk_size); entries that saw no tokens at all are left out, a matrix without
    tokens stores `ncall` (weight 1 once read back). The trailer names the last dataset.
    """
    path = Path(path)
    if chunk_size <= 0:
        raise QtoolError("the legacy imatrix format needs a positive chunk size")
    stored = []
    for name in sorted(entries):
        e = _as_entry(name, entries[name])
        if not (e.counts != 0).any():
            continue
        stored.append((name, e))
    parts = [struct.pack("<i", len(stored))]
    for name, e in stored:
        raw_name = name.encode()
        ncall = int((int(e.counts.max()) + (chunk_size - 1)) // chunk_size)
        count = e.counts.astype(np.float32)[:, None]
        sums = e.sums
        empty = count == 0
        values = np.where(empty, np.float32(1), sums) / np.where(empty, np.float32(1), count)
        values = (values.astype(np.float32) * np.float32(ncall)).astype("<f4")
        parts += [struct.pack("<i", len(raw_name)), raw_name, struct.pack("<ii", ncall, values.size),
                  values.tobytes()]
    last = datasets[-1].encode() if datasets else b""
    parts += [struct.pack("<i", int(chunk_count)), struct.pack("<i", len(last)), last]
    atomic_write(path, parts, force=force)
    return path
