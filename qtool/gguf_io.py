"""Thin helpers over the `gguf` package: streaming writes, atomic output, splits, sizes."""
from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import gguf
from gguf import GGMLQuantizationType, GGUFValueType

from qtool.errors import QtoolError

Progress = Callable[[int, int, str], None]   # (bytes done, bytes total, tensor name)

# Written by `qtool quantize --target-bpw/--mix`: the mix's predicted mean KLD against its input (float64);
# `qtool ppl` and `qtool run` show it beside the measured one. llama.cpp ignores keys it does not know.
PREDICTED_KLD_KEY = "qtool.mix.predicted_kld"


@dataclass
class KV:
    """One GGUF key/value pair, read (`GGUFFile.kv`: key -> KV, in file order) or to write, in write order;
    ``sub_type`` is the element type of an ARRAY value."""

    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None

    def __iter__(self):        # unpacks as (key, value, type, sub_type)
        return iter((self.key, self.value, self.type, self.sub_type))


def predicted_kld_kvs(predicted: float | None) -> list[KV]:
    """The metadata that records a mix's predicted KLD in the file it is applied to (none when there is none)."""
    return [] if predicted is None else [KV(PREDICTED_KLD_KEY, float(predicted), GGUFValueType.FLOAT64)]


def parse_size(text: str) -> int:
    """'500M', '2G', '1500K' or plain bytes; decimal multipliers as llama.cpp's --split-max-size uses."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise QtoolError(f"invalid size {text!r}: use a number of bytes or N with K, M or G (e.g. 500M, 2G)")
    return int(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2).upper()]


def tensor_nbytes(shape: Sequence[int], qtype: GGMLQuantizationType) -> int:
    """Bytes a tensor of numpy shape `shape` takes once stored as `qtype`."""
    return int(np.prod(gguf.quant_shape_to_byte_shape(tuple(shape), qtype), dtype=np.int64))


def encode_tensor(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float data -> the bytes (or float array) stored for `qtype`, exactly as llama.cpp's converter makes them."""
    return gguf.quants.quantize(data, qtype)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    load: Callable[[], np.ndarray]   # float data to encode as qtype, or uint8: the stored bytes, written as-is


def add_kv(writer: gguf.GGUFWriter, key: str, value: Any, vtype: GGUFValueType,
           sub_type: GGUFValueType | None = None) -> None:
    if vtype == GGUFValueType.ARRAY and sub_type is None and len(value) == 0:
        raise QtoolError(f"internal: empty array for {key} needs an element type")
    writer.add_key_value(key, value, vtype, sub_type=sub_type)


def shard_paths(path: Path, n_shards: int) -> list[Path]:
    """llama.cpp's gguf-split names: <stem>-00001-of-00003.gguf (a single shard keeps the plain name)."""
    if n_shards <= 1:
        return [path]
    return [path.with_name(gguf.SHARD_NAME_FORMAT.format(path.stem, i + 1, n_shards)) for i in range(n_shards)]


@contextmanager
def atomic_output_dir(final_dir: Path) -> Iterator[Path]:
    """A temporary directory inside `final_dir`; the caller writes there and renames into place on success.

    On any error the temporary directory and everything in it is removed, so no half-written file is ever
    left under a final name.
    """
    if not final_dir.is_dir():
        raise QtoolError(f"output directory {final_dir} does not exist")
    if not os.access(final_dir, os.W_OK):
        raise QtoolError(f"output directory {final_dir} is not writable")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".qtool-tmp-", dir=final_dir))
    except OSError as e:
        raise QtoolError(f"cannot write to {final_dir}: {e.strerror}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str | Sequence[bytes], *, force: bool = True) -> Path:
    """Write `data` (bytes, text as UTF-8, or byte parts in order) to `path` through a temporary file in the same
    folder, flushed to disk and renamed into place: a reader never sees half a file, a failure leaves none.
    Without `force` an existing file is an error."""
    path = Path(path)
    parts = [data.encode("utf-8")] if isinstance(data, str) else [data] if isinstance(data, (bytes, bytearray)) \
        else data
    with atomic_output_dir(path.parent) as tmp:
        check_overwrite([path], force)
        staged = tmp / path.name
        try:
            with open(staged, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(staged, path)
        except OSError as e:
            raise QtoolError(f"writing {path}: {e.strerror or e}") from None
    return path


def check_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise QtoolError(f"{existing[0]} already exists (use --force to overwrite)")


class _Writer(gguf.GGUFWriter):
    """gguf's writer, with metadata arrays packed in one go instead of one `struct.pack` per element
    (a 49k-token vocabulary and its merges took 0.4 s). Same bytes: little-endian, as gguf packs them.
    With `arch=None` it writes no general.architecture of its own (a copy of another file's metadata has it in
    its place already; an imatrix file has none)."""

    def add_architecture(self) -> None:
        if self.arch is not None:
            super().add_architecture()

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if vtype == GGUFValueType.ARRAY and sub_type is not None and isinstance(val, Sequence) and len(val) == 0:
            # an empty array of a known type (gguf refuses these; llama.cpp writes them, e.g. an imatrix's datasets)
            return struct.pack("<IIQ", vtype, sub_type, 0) if add_vtype else struct.pack("<IQ", sub_type, 0)
        if (vtype != GGUFValueType.ARRAY or sub_type is None or sub_type == GGUFValueType.BOOL
                or not isinstance(val, Sequence) or isinstance(val, (bytes, bytearray, str)) or len(val) == 0 or self.endianess != gguf.GGUFEndian.LITTLE
                or (sub_type != GGUFValueType.STRING and sub_type not in _SCALAR)):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        head = struct.pack("<IIQ", vtype, sub_type, len(val)) if add_vtype else struct.pack("<IQ", sub_type, len(val))
        if isinstance(val, StringArray) and sub_type == GGUFValueType.STRING:
            return head + val.raw
        if sub_type != GGUFValueType.STRING:
            return head + np.asarray(val, dtype=_SCALAR[sub_type]).tobytes()
        parts = [head]
        append, length = parts.append, _U64.pack
        for item in val:
            encoded = item.encode("utf-8") if isinstance(item, str) else item
            append(length(len(encoded)))
            append(encoded)
        return b"".join(parts)


def preview_kvs(arch: str | None, kvs: Sequence[KV | tuple],
                prepare: Callable[[gguf.GGUFWriter], None] | None = None) -> list[KV]:
    """The keys `write_gguf` would write, in file order (`prepare`'s and general.architecture included)."""
    writer = _Writer(None, arch)
    if prepare is not None:
        prepare(writer)
    for key, value, vtype, sub_type in kvs:
        add_kv(writer, key, value, vtype, sub_type)
    return [KV(k, v.value, v.type, v.sub_type) for k, v in writer.kv_data[0].items()]


def _add_tensor_infos(writer: gguf.GGUFWriter, tensors: Sequence[PlannedTensor]) -> None:
    for t in tensors:
        # gguf takes a quantized tensor's shape in bytes along the last axis
        byte_shape = gguf.quant_shape_to_byte_shape(tuple(t.shape), t.qtype)
        writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), tensor_nbytes(t.shape, t.qtype),
                               raw_dtype=t.qtype)


def split_groups(tensors: Sequence[PlannedTensor], split_max_tensors: int = 0,
                 split_max_size: int = 0) -> list[list[str]]:
    """The tensor names each output file of `write_gguf` will hold (gguf's own split rule, not a copy of it)."""
    writer = _Writer(None, None, split_max_tensors=split_max_tensors, split_max_size=split_max_size)
    _add_tensor_infos(writer, tensors)
    return [list(shard) for shard in writer.tensors]


def write_gguf(path: Path, arch: str | None, kvs: Sequence[KV | tuple],
               tensors: Sequence[PlannedTensor], *, split_max_tensors: int = 0, split_max_size: int = 0,
               force: bool = False, progress: Progress | None = None,
               prepare: Callable[[gguf.GGUFWriter], None] | None = None) -> list[Path]:
    """Stream tensors one at a time into `path` (or its shards); atomic: temp names, renamed at the end.

    `prepare(writer)` may add keys before `kvs` (e.g. general.* metadata through gguf.Metadata); `arch=None` writes
    no general.architecture but the one `kvs` may hold. Returns the paths written.
    """
    path = Path(path)
    with atomic_output_dir(path.parent) as tmp_dir:
        writer = _Writer(tmp_dir / path.name, arch, split_max_tensors=split_max_tensors,
                                 split_max_size=split_max_size)
        if prepare is not None:
            prepare(writer)
        for key, value, vtype, sub_type in kvs:
            add_kv(writer, key, value, vtype, sub_type)
        _add_tensor_infos(writer, tensors)
        n_shards = len(writer.tensors)
        tmp_paths = shard_paths(tmp_dir / path.name, n_shards)
        final_paths = shard_paths(path, n_shards)
        check_overwrite(final_paths, force)

        total = sum(tensor_nbytes(t.shape, t.qtype) for t in tensors)
        done = 0
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = t.load()
                if data.dtype != np.uint8:      # uint8 is already the stored bytes (e.g. quantized by qtool)
                    data = encode_tensor(data, t.qtype)
                if data.nbytes != tensor_nbytes(t.shape, t.qtype):
                    raise QtoolError(f"internal: tensor {t.name} has {data.nbytes} bytes, "
                                     f"expected {tensor_nbytes(t.shape, t.qtype)}")
                writer.write_tensor_data(data)
                done += data.nbytes
                del data
                if progress is not None:
                    progress(done, total, t.name)
            if writer.fout is not None:
                for f in writer.fout:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as e:
            raise QtoolError(f"writing {path}: {e.strerror or e}") from None
        finally:
            writer.close()
        for src, dst in zip(tmp_paths, final_paths):
            os.replace(src, dst)
        return final_paths


# --- fast reading ----------------------------------------------------------------------------------------------
# gguf.GGUFReader builds a numpy view per array element; on a 150k-token vocabulary (tokens + merges) that takes
# ~11 s. This reader decodes the same header in well under a second, and maps tensor data lazily.

_SCALAR = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
           GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
           GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
           GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?"}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]          # numpy order (rows first)
    qtype: GGMLQuantizationType
    offset: int                     # absolute offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    kv: dict[str, KV]
    tensors: list[GGUFTensorInfo]
    alignment: int

    def value(self, key: str, default: Any = None) -> Any:
        v = self.kv.get(key)
        return default if v is None else v.value

    def values(self) -> dict[str, Any]:
        """The metadata as plain values."""
        return {k: v.value for k, v in self.kv.items()}

    def raw(self, t: GGUFTensorInfo) -> np.ndarray:
        """The stored bytes of a tensor (memory-mapped, read-only), shaped as gguf.quants.dequantize expects."""
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        return mm.reshape(gguf.quant_shape_to_byte_shape(t.shape, t.qtype))

    def array(self, t: GGUFTensorInfo) -> np.ndarray:
        """A tensor as numpy float32 (any stored type), decoded by the format table's one decoder."""
        from qtool.model_file import decode_rows

        return decode_rows(self.raw(t), t.qtype, t.shape)


_U64 = struct.Struct("<Q")


class _Buf:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise QtoolError(f"{self.path}: truncated GGUF header")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        import struct
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return bytes(self.take(n)).decode("utf-8", errors="replace")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row (a vocabulary: one tight loop, ~10x faster than `string` each)."""
        data, pos, end = self.data, self.pos, len(self.data)
        length = _U64.unpack_from
        out = []
        append = out.append
        for _ in range(count):
            if pos + 8 > end:
                raise QtoolError(f"{self.path}: truncated GGUF header")
            n = length(data, pos)[0]
            pos += 8
            if pos + n > end:
                raise QtoolError(f"{self.path}: truncated GGUF header")
            append(str(data[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def string_block(self, count: int) -> "StringArray":
        """`count` strings in a row, kept as their stored bytes (lengths are walked, nothing is decoded)."""
        data, start, end = self.data, self.pos, len(self.data)
        length = _U64.unpack_from
        pos = start
        for _ in range(count):
            if pos + 8 > end:
                raise QtoolError(f"{self.path}: truncated GGUF header")
            pos += 8 + length(data, pos)[0]
        if pos > end:
            raise QtoolError(f"{self.path}: truncated GGUF header")
        self.pos = pos
        return StringArray(bytes(data[start:pos]), count)


class StringArray(Sequence):
    """A GGUF string array as stored (each item: u64 length, UTF-8 bytes), decoded only when an item is read.

    `read_gguf(..., lazy_strings=True)` returns vocabularies this way to a caller that copies metadata through
    (quantize): decoding SmolLM2's 49k tokens and 49k merges and encoding them again took 0.09–0.19 s a run (now
    0.02 s), and the copy is byte-exact even where the stored bytes are not valid UTF-8.
    """

    def __init__(self, raw: bytes, count: int):
        self.raw, self._count, self._items = raw, count, None

    def _decoded(self) -> list[str]:
        if self._items is None:
            self._items = _Buf(memoryview(self.raw), Path("<string array>")).strings(self._count)
        return self._items

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i):
        return self._decoded()[i]

    def __iter__(self):
        return iter(self._decoded())

    def __eq__(self, other) -> bool:
        if isinstance(other, StringArray):
            return self._count == other._count and self.raw == other.raw
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes, bytearray)):
            return self._decoded() == list(other)
        return NotImplemented

    __hash__ = None

    def __repr__(self) -> str:
        return f"StringArray({self._count} strings, {len(self.raw)} bytes)"


def _read_value(buf: _Buf, vtype: GGUFValueType, lazy_strings: bool = False) -> tuple[Any, GGUFValueType | None]:
    if vtype == GGUFValueType.STRING:
        return buf.string(), None
    if vtype in _SCALAR:
        return buf.unpack(_SCALAR[vtype]), None
    if vtype == GGUFValueType.ARRAY:
        sub = GGUFValueType(buf.unpack("<I"))
        n = buf.unpack("<Q")
        if sub in _SCALAR:
            dt = np.dtype(_SCALAR[sub])
            arr = np.frombuffer(buf.take(n * dt.itemsize), dtype=dt)
            return arr.tolist(), sub
        if sub == GGUFValueType.STRING:
            return (buf.string_block(n) if lazy_strings else buf.strings(n)), sub
        return [_read_value(buf, sub)[0] for _ in range(n)], sub
    raise QtoolError(f"{buf.path}: unknown GGUF value type {vtype}")


def read_gguf(path: str | Path, *, lazy_strings: bool = False) -> GGUFFile:
    """Header, metadata and tensor infos of a GGUF file (not its data).

    With `lazy_strings`, string arrays are `StringArray`s: their stored bytes, decoded when an item is read, and
    written back byte for byte.
    """
    import mmap
    path = Path(path)
    if not path.is_file():
        raise QtoolError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise QtoolError(f"{path}: not a GGUF file (too short)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise QtoolError(f"{path}: {e.strerror}") from None
    view = memoryview(mm)
    try:
        buf = _Buf(view, path)
        if bytes(buf.take(4)) != b"GGUF":
            raise QtoolError(f"{path}: not a GGUF file")
        version = buf.unpack("<I")
        if version not in (2, 3):
            raise QtoolError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = buf.unpack("<Q"), buf.unpack("<Q")
        kv: dict[str, KV] = {}
        try:
            for _ in range(n_kv):
                key = buf.string()
                vtype = GGUFValueType(buf.unpack("<I"))
                value, sub = _read_value(buf, vtype, lazy_strings)
                kv[key] = KV(key, value, vtype, sub)
            infos = []
            for _ in range(n_tensors):
                name = buf.string()
                n_dims = buf.unpack("<I")
                dims = [buf.unpack("<Q") for _ in range(n_dims)]
                qtype = GGMLQuantizationType(buf.unpack("<I"))
                offset = buf.unpack("<Q")
                infos.append((name, tuple(reversed(dims)), qtype, offset))
        except ValueError as e:
            raise QtoolError(f"{path}: damaged GGUF header ({e})") from None
        alignment = int(kv["general.alignment"].value) if "general.alignment" in kv else gguf.GGUF_DEFAULT_ALIGNMENT
        data_start = -(-buf.pos // alignment) * alignment
        tensors = []
        for name, shape, qtype, offset in infos:
            nbytes = tensor_nbytes(shape, qtype)
            if data_start + offset + nbytes > size:
                raise QtoolError(f"{path}: truncated: tensor {name!r} extends past the end of the file")
            tensors.append(GGUFTensorInfo(name, shape, qtype, data_start + offset, nbytes))
    finally:
        view.release()
        mm.close()
    return GGUFFile(path, kv, tensors, alignment)
