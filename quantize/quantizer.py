"""`qtool quantize`: an F32/F16/BF16 GGUF → a quantized GGUF, identical to what llama-quantize writes.

The stage is a plan and a stream:
* `plan_quantization` reads only the header (and the imatrix): it picks every tensor's type (mixtures.py), checks
  the importance matrix against the model, and builds the output metadata — everything that can fail, fails here,
  before a byte is written;
* `quantize_model` then walks the tensors in llama-quantize's order, reads each in slabs of rows, quantizes the
  rows (the format kernels run rows in parallel) and hands the bytes to the atomic GGUF writer. Memory stays at
  about one quantized tensor plus two slabs.
Nothing is printed: progress goes to a callback, the result is a `QuantizeReport`.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from qtool.errors import QtoolError
from qtool.gguf_io import KV, GGUFFile, GGUFTensorInfo, PlannedTensor, check_overwrite, read_gguf, tensor_nbytes, write_gguf
from qtool.quantize import formats
from qtool.quantize.imatrix_file import Imatrix, ImatrixIssues, column_weights, read_imatrix
from qtool.quantize.formats import bits_per_weight, block_size
from qtool.quantize.mixtures import (FLOAT_TYPES, FileType, MixtureOptions, ModelInfo, TensorChoice,
                                     TensorTypeOverride, choose_tensor_types, ggml_n_dims, guessed_file_type,
                                     llama_tensor_order)

if TYPE_CHECKING:
    from qtool.quantize.mix import MixFile

QUANTIZATION_VERSION = 2            # GGML_QNT_VERSION
SLAB_ELEMENTS = 1 << 22             # rows are read, converted and quantized this many values at a time
KV_STRING_MAX = 127                 # llama-quantize copies the imatrix file/dataset names into 128-byte buffers
_SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
_SET_KEYS = ("general.quantization_version", "general.file_type")


@dataclass
class QuantizeOptions:
    file_type: FileType
    imatrix: str | Path | None = None       # kept as typed: it is written into quantize.imatrix.file
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    tensor_types: Sequence[TensorTypeOverride] = ()
    pure: bool = False
    leave_output_tensor: bool = False
    allow_requantize: bool = False
    threads: int | None = None
    force: bool = False
    # An exact type for every quantizable tensor (a mix file's [tensors]); replaces the file type's rules, which
    # then only label the file (general.file_type).
    tensor_type_map: Mapping[str, T] | None = None
    # Metadata added after the input's (key, value, GGUFValueType, element type or None), e.g. a mix's prediction.
    extra_kvs: Sequence[KV] = ()


def quantize_options(file_type: str | None, input_path: str | Path, *, imatrix: str | Path | None = None,
                     output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                     tensor_types: str | Sequence[str] = (), pure: bool = False, leave_output_tensor: bool = False,
                     allow_requantize: bool = False, threads: int | None = None, force: bool = False,
                     mix: MixFile | None = None, predicted_kld: float | None = None) -> QuantizeOptions:
    """User options as typed (on the command line or in a recipe) -> QuantizeOptions: the one place `qtool quantize`
    and `qtool run` make them.

    With a `mix`, its exact per-tensor types replace the rules; the file type only labels the file (given, or the
    type whose default tensor type holds most of the mix's weights) and `predicted_kld` is recorded in the file
    (`qtool ppl` and `qtool run` show the measured KLD beside it)."""
    from qtool.gguf_io import predicted_kld_kvs
    from qtool.quantize.mixtures import parse_file_type, parse_tensor_type

    if mix is not None:
        if file_type:
            ftype = parse_file_type(file_type)
        else:
            from qtool.quantize.mix import file_type_for_mix

            sizes = {t.name: int(np.prod(t.shape, dtype=np.int64)) for t in read_gguf(input_path).tensors}
            ftype = file_type_for_mix(mix.tensors, {n: sizes.get(n, 0) for n in mix.tensors})
        return QuantizeOptions(ftype, imatrix=imatrix, allow_requantize=allow_requantize, threads=threads,
                               force=force, tensor_type_map=mix.tensors, extra_kvs=predicted_kld_kvs(predicted_kld))
    if not file_type:
        raise QtoolError("missing --type (e.g. --type Q4_K_M; --list shows them all), --target-bpw or --mix")
    return QuantizeOptions(
        parse_file_type(file_type), imatrix=imatrix,
        output_tensor_type=parse_tensor_type(output_tensor_type) if output_tensor_type else None,
        token_embedding_type=parse_tensor_type(token_embedding_type) if token_embedding_type else None,
        tensor_types=[TensorTypeOverride.parse(t) for t in ([tensor_types] if isinstance(tensor_types, str)
                                                           else tensor_types)],
        pure=pure, leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize, threads=threads,
        force=force)


@dataclass
class ProgressUpdate:
    tensor_index: int       # 0-based position in the output
    n_tensors: int
    name: str
    rows_done: int
    rows_total: int
    work_done: int          # source bytes handled so far, over the whole model
    work_total: int


Progress = Callable[[ProgressUpdate], None]


@dataclass
class TensorResult:
    choice: TensorChoice
    source_bytes: int
    output_bytes: int
    imatrix: str            # "used", "-" (none given or the type ignores it), or why it was not used


@dataclass
class TypeTotal:
    tensors: int = 0
    bytes: int = 0
    params: int = 0

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else 0.0


@dataclass
class QuantizeReport:
    input_path: Path
    output_path: Path | None                # None for a dry run
    file_type: FileType
    tensors: list[TensorResult]
    notes: list[str]
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def n_params(self) -> int:
        return sum(t.choice.n_elements for t in self.tensors)

    @property
    def input_bytes(self) -> int:
        return sum(t.source_bytes for t in self.tensors)

    @property
    def output_bytes(self) -> int:
        """Tensor data only, without padding and header — the number llama-quantize reports as the quant size."""
        return sum(t.output_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.output_bytes / self.n_params if self.n_params else 0.0

    @property
    def input_bits_per_weight(self) -> float:
        return 8.0 * self.input_bytes / self.n_params if self.n_params else 0.0

    @property
    def by_type(self) -> dict[str, TypeTotal]:
        totals: dict[str, TypeTotal] = {}
        for t in self.tensors:
            total = totals.setdefault(t.choice.target_type.name, TypeTotal())
            total.tensors += 1
            total.bytes += t.output_bytes
            total.params += t.choice.n_elements
        return dict(sorted(totals.items(), key=lambda kv: -kv[1].bytes))

    @property
    def fallbacks(self) -> list[TensorChoice]:
        """Tensors whose type the row length forced: llama-quantize's fallbacks, plus the output rule's Q8_0."""
        return [t.choice for t in self.tensors if t.choice.fallback is not None]

    @property
    def fallback_extra_bytes(self) -> int:
        """What the fallbacks cost: their bytes minus what the wanted types would have taken (at their bpw)."""
        return int(sum(t.output_bytes - t.choice.n_elements * bits_per_weight(t.choice.wanted_type) / 8
                       for t in self.tensors if t.choice.fallback is not None))


@dataclass
class QuantizePlan:
    source: GGUFFile
    options: QuantizeOptions
    model: ModelInfo
    choices: list[TensorChoice]
    infos: dict[str, GGUFTensorInfo]
    imatrix: Imatrix | None
    weights: dict[str, np.ndarray]          # imatrix column weights per tensor name (empty without an imatrix)
    imatrix_use: dict[str, str]             # tensor name -> "used" / why not
    kvs: list[KV]
    notes: list[str] = field(default_factory=list)


# --- planning ---------------------------------------------------------------------------------------------------


_TYPE_LABEL = re.compile(r"(?i)(?<![A-Za-z0-9])(F32|F16|BF16|T?Q[1-8]_[01]|Q[2-6]_K(?:_[SML])?|IQ[1-4]_(?:XXS|XS|S|M|NL))"
                         r"(?![A-Za-z0-9])")


def default_output_path(input_path: str | Path, file_type: FileType | str) -> Path:
    """The input's name with its type label replaced (`…-F16.gguf` → `…-Q4_K_M.gguf`), or the label appended."""
    path = Path(input_path)
    stem = path.name[:-5] if path.name.lower().endswith(".gguf") else path.name
    label = file_type if isinstance(file_type, str) else file_type.name
    matches = list(_TYPE_LABEL.finditer(stem))
    if matches:
        m = matches[-1]
        stem = stem[:m.start()] + label + stem[m.end():]
    else:
        stem = f"{stem}-{label}"
    return path.with_name(stem + ".gguf")


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode("utf-8", errors="ignore")


def _output_file_type(source: GGUFFile, file_type: FileType) -> int:
    """general.file_type of the output: the file type's number; for COPY the input's (llama-quantize writes the
    loader's ftype: the key's value, or the guess from the tensor types with the GUESSED flag when it is absent)."""
    if file_type != FileType.COPY:
        return int(file_type)
    kv = source.kv.get("general.file_type")
    if kv is not None:
        if kv.type != GGUFValueType.UINT32:
            raise QtoolError(f"{source.path}: general.file_type is stored as {kv.type.name}, not UINT32; "
                             "llama.cpp cannot read it either")
        return int(kv.value)
    by_name = {t.name: t.qtype for t in source.tensors}
    return guessed_file_type([by_name[n] for n in llama_tensor_order(list(by_name))])


def _output_kvs(source: GGUFFile, file_type: FileType, imatrix_kvs: list[KV]) -> list[KV]:
    """llama-quantize's metadata: the input's keys in order, then version and file type, then the imatrix keys.

    Setting a key in gguf removes it and appends it, which fixes the order.
    """
    kvs = [kv for k, kv in source.kv.items() if k not in _SPLIT_KEYS + _SET_KEYS]
    kvs.append(KV("general.quantization_version", QUANTIZATION_VERSION, GGUFValueType.UINT32))
    kvs.append(KV("general.file_type", _output_file_type(source, file_type), GGUFValueType.UINT32))
    for kv in imatrix_kvs:
        kvs = [x for x in kvs if x.key != kv.key] + [kv]
    return kvs


def _check_imatrix_matches(weights: dict[str, np.ndarray], choices: list[TensorChoice], path) -> None:
    """An imatrix computed on another model is refused (llama-quantize would quietly skip unknown names)."""
    by_name = {c.name: c for c in choices}
    unknown = [name for name in weights if name not in by_name]
    if unknown:
        raise QtoolError(f"imatrix {path}: {len(unknown)} of its {len(weights)} entries name tensors this model "
                         f"does not have (e.g. {unknown[0]}); it was computed for another model")
    for name, w in weights.items():
        c = by_name[name]
        expected = c.shape[-1] * (c.shape[0] if len(c.shape) >= 3 else 1)
        if w.size != expected and c.quantizable and name not in ("token_embd.weight", "per_layer_token_embd.weight"):
            raise QtoolError(f"imatrix {path}: entry {name} has {w.size} values but the tensor has {expected} "
                             f"columns; it was computed for another model")


def _apply_tensor_type_map(choices: list[TensorChoice], type_map: Mapping[str, T], input_path) -> None:
    """A mix names every quantizable tensor with a type its rows admit; anything else is a mix for another model."""
    by_name = {c.name: c for c in choices}
    for name, qtype in type_map.items():
        c = by_name.get(name)
        if c is None:
            raise QtoolError(f"the mix names tensor {name}, which {input_path} does not have; "
                             f"it was made for another model")
        if not c.quantizable:
            raise QtoolError(f"the mix gives {name} type {qtype.name}, but llama-quantize never quantizes that "
                             f"tensor ({c.reason.removeprefix('kept: ')}); leave it out of the mix")
        if c.shape[-1] % block_size(qtype):
            raise QtoolError(f"the mix gives {name} type {qtype.name}, but its rows of {c.shape[-1]} are not a "
                             f"multiple of {qtype.name}'s {block_size(qtype)}-element blocks")
    missing = [c.name for c in choices if c.quantizable and c.name not in type_map]
    if missing:
        raise QtoolError(f"the mix has no type for {len(missing)} quantizable tensor(s) of {input_path} "
                         f"(e.g. {missing[0]}); it was made for another model")
    for c in choices:
        if c.quantizable:
            c.target_type, c.reason = type_map[c.name], "mix"
            c.wanted_type = c.fallback = None
            c.requires_imatrix = False


def plan_quantization(input_path: str | Path, options: QuantizeOptions, *, dry_run: bool = False) -> QuantizePlan:
    """Everything but the tensor data. With `dry_run`, a missing imatrix is a warning note instead of an error."""
    source = read_gguf(input_path, lazy_strings=True)   # metadata is copied through, vocabulary undecoded
    if source.value("split.count", 1) > 1:
        raise QtoolError(f"{input_path} is one shard of a split model; merge it first "
                         "(llama-gguf-split --merge) and quantize the merged file")
    if source.value("general.type") == "imatrix":
        raise QtoolError(f"{input_path} is an importance matrix, not a model")
    model = ModelInfo.from_metadata(source.values())
    infos = {t.name: t for t in source.tensors}
    if not infos:
        raise QtoolError(f"{input_path} has no tensors (a vocab-only file?)")

    imatrix, weights, issues = None, {}, ImatrixIssues()
    if options.imatrix is not None:
        imatrix = read_imatrix(options.imatrix)
        weights, issues = column_weights(imatrix)

    mix = MixtureOptions(output_tensor_type=options.output_tensor_type,
                         token_embedding_type=options.token_embedding_type,
                         tensor_types=list(options.tensor_types), pure=options.pure,
                         leave_output_tensor=options.leave_output_tensor, has_imatrix=bool(weights))
    choices = choose_tensor_types([(t.name, t.shape, t.qtype) for t in source.tensors], options.file_type, model, mix)
    # ggml drops trailing size-1 dimensions when it writes a tensor's shape
    for c in choices:
        while len(c.shape) > 1 and c.shape[0] == 1 and ggml_n_dims(c.shape) < len(c.shape):
            c.shape = c.shape[1:]
    if options.tensor_type_map is not None:
        _apply_tensor_type_map(choices, options.tensor_type_map, input_path)
    if weights:
        _check_imatrix_matches(weights, choices, options.imatrix)

    notes = issues.lines()
    unwritable = sorted({c.target_type.name for c in choices if c.quantizable and c.target_type not in formats.FORMATS})
    if unwritable:
        message = (f"{options.file_type.name} needs {', '.join(unwritable)} tensors, a block format qtool cannot "
                   f"write yet")
        if not dry_run:
            raise QtoolError(message)
        notes.append("warning: the real run will fail: " + message)
    imatrix_use: dict[str, str] = {}
    for c in choices:
        changes = c.target_type != c.source_type
        if changes and c.source_type not in FLOAT_TYPES and not options.allow_requantize:
            message = (f"tensor {c.name} is already quantized ({c.source_type.name}); requantizing loses "
                       f"quality — quantize from an F32/F16/BF16 file, or pass --allow-requantize")
            if not dry_run:
                raise QtoolError(message)
            if not any("requantizing" in n for n in notes):
                notes.append("warning: the real run will fail: " + message)
        if not changes:
            imatrix_use[c.name] = "-"
            continue
        w = weights.get(c.name)
        expected = c.shape[-1] * (c.shape[0] if len(c.shape) >= 3 else 1)
        if w is not None and w.size != expected:
            imatrix_use[c.name] = f"size {w.size} ≠ {expected} columns: not used"
            notes.append(f"imatrix entry {c.name} has {w.size} values for {expected} columns; quantized without "
                         f"it (llama-quantize makes the same exception for the token embedding)")
        elif w is not None:
            uses = formats.format_for(c.target_type).uses_imatrix
            imatrix_use[c.name] = "used" if uses else f"- ({c.target_type.name} ignores it)"
        elif weights:
            imatrix_use[c.name] = "no entry"
        else:
            imatrix_use[c.name] = "-"
        if c.requires_imatrix and imatrix_use[c.name] != "used":
            what = "an importance matrix (--imatrix)" if not weights else "an imatrix entry"
            message = (f"{options.file_type.name} needs {what} for tensor {c.name} ({c.target_type.name}); "
                       f"without one the result is garbage, so llama-quantize refuses too (make one with "
                       f"`qtool imatrix`)")
            if not dry_run:
                raise QtoolError(message)
            if not any(n.startswith("warning: ") and what in n for n in notes):
                notes.append("warning: the real run will fail: " + message)
    missing = [n for n, use in imatrix_use.items() if use == "no entry"]
    if missing:
        notes.append(f"{len(missing)} quantized tensors have no imatrix entry and were quantized without one: "
                     + ", ".join(missing[:4]) + (" …" if len(missing) > 4 else ""))

    imatrix_kvs: list[KV] = []
    if weights:
        imatrix_kvs.append(KV("quantize.imatrix.file", _truncate_utf8(str(options.imatrix), KV_STRING_MAX),
                              GGUFValueType.STRING))
        if imatrix.datasets:
            imatrix_kvs.append(KV("quantize.imatrix.dataset", _truncate_utf8(imatrix.datasets[0], KV_STRING_MAX),
                                  GGUFValueType.STRING))
        imatrix_kvs.append(KV("quantize.imatrix.entries_count", len(weights), GGUFValueType.UINT32))
        if imatrix.chunk_count > 0:
            imatrix_kvs.append(KV("quantize.imatrix.chunks_count", imatrix.chunk_count, GGUFValueType.UINT32))
    kvs = _output_kvs(source, options.file_type, imatrix_kvs)
    return QuantizePlan(source, options, model, choices, infos, imatrix, weights, imatrix_use, kvs, notes)


# --- the stream -------------------------------------------------------------------------------------------------


class _Buffer:
    """A byte buffer that only grows: fresh allocations of this size would page-fault on every tensor."""

    def __init__(self) -> None:
        self.data = np.empty(0, dtype=np.uint8)

    def get(self, nbytes: int) -> np.ndarray:
        if self.data.size < nbytes:
            self.data = np.empty(nbytes, dtype=np.uint8)
        return self.data[:nbytes]


class _TensorStream:
    """Reads a tensor's rows in slabs and quantizes them into one output buffer.

    The writer consumes each tensor's bytes before it asks for the next, so the three buffers (source slab,
    float32 slab, output) are reused across tensors: memory stays at one output tensor plus two slabs.
    """

    def __init__(self, plan: QuantizePlan, progress: Progress | None):
        self.plan, self.progress = plan, progress
        self.file = open(plan.source.path, "rb")
        self.work_total = sum(i.nbytes for i in plan.infos.values())
        self.work_done = 0
        self.raw, self.floats, self.out = _Buffer(), _Buffer(), _Buffer()

    def close(self) -> None:
        self.file.close()

    def _read(self, offset: int, nbytes: int, into: np.ndarray) -> np.ndarray:
        self.file.seek(offset)
        if self.file.readinto(memoryview(into)) != nbytes:
            raise QtoolError(f"{self.plan.source.path}: truncated tensor data")
        return into

    def _report(self, index: int, name: str, rows_done: int, rows_total: int) -> None:
        if self.progress is not None:
            self.progress(ProgressUpdate(index, len(self.plan.choices), name, rows_done, rows_total,
                                         self.work_done, self.work_total))

    def tensor_bytes(self, index: int) -> np.ndarray:
        choice = self.plan.choices[index]
        info = self.plan.infos[choice.name]
        n_per_row = info.shape[-1]
        rows_total = int(np.prod(info.shape[:-1], dtype=np.int64))
        self._report(index, choice.name, 0, rows_total)
        if choice.target_type == info.qtype:
            data = self._read(info.offset, info.nbytes, self.out.get(info.nbytes))
            self.work_done += info.nbytes
            self._report(index, choice.name, rows_total, rows_total)
            return data

        fmt = formats.format_for(choice.target_type)
        src_row_bytes = info.nbytes // rows_total
        out_row_bytes = fmt.row_bytes(n_per_row)
        out = self.out.get(rows_total * out_row_bytes).reshape(rows_total, out_row_bytes)
        weights = self.plan.weights.get(choice.name) if self.plan.imatrix_use[choice.name] == "used" else None
        n_mat = info.shape[0] if len(info.shape) >= 3 else 1
        rows_per_mat = rows_total // n_mat
        slab_rows = max(1, min(rows_per_mat, SLAB_ELEMENTS // n_per_row))
        x = self.floats.get(slab_rows * n_per_row * 4).view(np.float32).reshape(slab_rows, n_per_row)
        for mat in range(n_mat):
            # expert `mat` of a 3-D tensor uses its own slice of the imatrix (llama-quant's imatrix_for_row)
            w = None if weights is None else weights[mat * n_per_row:(mat + 1) * n_per_row]
            for r0 in range(mat * rows_per_mat, (mat + 1) * rows_per_mat, slab_rows):
                rows = min(slab_rows, (mat + 1) * rows_per_mat - r0)
                raw = self._read(info.offset + r0 * src_row_bytes, rows * src_row_bytes,
                                 self.raw.get(rows * src_row_bytes))
                xs = formats.decode(raw, info.qtype, n_per_row, out=x[:rows])
                try:
                    fmt.quantize(xs, w, out=out[r0:r0 + rows])
                except QtoolError as e:
                    # the format names the row within this slab; the user needs the tensor and its row
                    message = re.sub(r"\brow (\d+)", lambda m: f"row {r0 + int(m.group(1))}", str(e), count=1)
                    raise QtoolError(f"tensor {choice.name}: {message}") from None
                self.work_done += rows * src_row_bytes
                self._report(index, choice.name, r0 + rows, rows_total)
        return out.reshape(-1)


def _set_threads(threads: int | None) -> str | None:
    if not threads:
        return None
    from qtool.threads import set_threads
    return set_threads(threads)


def _results(plan: QuantizePlan) -> list[TensorResult]:
    return [TensorResult(c, plan.infos[c.name].nbytes, tensor_nbytes(c.shape, c.target_type),
                         plan.imatrix_use[c.name]) for c in plan.choices]


def quantize_model(input_path: str | Path, output_path: str | Path | None, options: QuantizeOptions, *,
                   dry_run: bool = False, progress: Progress | None = None) -> QuantizeReport:
    """Quantize `input_path` into `output_path` (default, or when it is a directory: the input's name with the new
    type label).

    With `dry_run` nothing is read but the header: the report shows the types and sizes the file would get.
    """
    t0 = time.perf_counter()
    input_path = Path(input_path)
    plan = plan_quantization(input_path, options, dry_run=dry_run)
    notes = list(plan.notes)
    if dry_run:
        return QuantizeReport(input_path, None, options.file_type, _results(plan), notes, time.perf_counter() - t0,
                              dry_run=True)

    default = default_output_path(input_path, options.file_type)
    output_path = default if output_path is None else Path(output_path)
    if output_path.is_dir():
        output_path = output_path / default.name
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise QtoolError(f"input and output are the same file: {output_path}")
    check_overwrite([output_path], options.force)
    note = _set_threads(options.threads)
    if note:
        notes.append(note)

    stream = _TensorStream(plan, progress)
    planned = [PlannedTensor(c.name, c.shape, c.target_type, lambda i=i: stream.tensor_bytes(i))
               for i, c in enumerate(plan.choices)]

    try:    # arch None: general.architecture comes with the input's keys, in its place
        write_gguf(output_path, None, [*plan.kvs, *options.extra_kvs], planned, force=options.force)
    finally:
        stream.close()
    return QuantizeReport(input_path, output_path, options.file_type, _results(plan), notes,
                          time.perf_counter() - t0)
