"""Lazy tensor source over a HuggingFace checkpoint directory.

Which files are read, and the order tensors come out in, mirror llama.cpp's
convert_hf_to_gguf.py (ModelBase.get_model_part_names / index_tensors), so a
GGUF written from ``Checkpoint.names`` lists its tensors like llama.cpp's does.

Both formats are parsed here by hand instead of through the safetensors/torch
libraries:

* safetensors: the format is a length-prefixed JSON header plus raw bytes, so a
  few lines of parsing give lazy ``np.memmap`` reads *and* one-line errors that
  name the file and tensor (the library's errors do neither).
* pytorch ``.bin``: ``pickle`` executes whatever globals the file names, so a
  downloaded checkpoint could run arbitrary code.  A restricted unpickler
  resolves only the handful of globals a state dict needs, each to an inert
  stand-in that merely records where the tensor's bytes are.  torch itself is
  never imported.
"""
from __future__ import annotations

import collections
import json
import math
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qtool.errors import QtoolError

__all__ = ["Checkpoint"]

_ST_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"

# Storage layout per supported dtype.  BF16 has no numpy dtype, so its raw
# 16-bit patterns are read as uint16 and widened in load().
_RAW_DTYPE = {"F32": "f4", "F16": "f2", "BF16": "u2"}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}

# Error messages list at most this many names; a one-line error with ten
# thousand tensor names in it helps nobody.
_MAX_LISTED = 5


@dataclass(frozen=True)
class _TensorRef:
    """Where one tensor's bytes are; enough to read it later without re-parsing."""

    dtype: str  # "F32" | "F16" | "BF16"
    shape: tuple[int, ...]
    path: Path  # part file
    label: str  # part file name as shown in messages
    offset: int  # byte offset of element 0: in the file, or in zip_member if set
    big_endian: bool = False
    # Set only for a compressed zip member (not something torch.save writes):
    # such bytes cannot be memory-mapped and are decompressed on each load.
    zip_member: str | None = None


def _listing(names: list[str] | set[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... ({len(names) - _MAX_LISTED} more)"
    return shown


def _is_int(x: object) -> bool:
    # bool is an int subclass; a shape of (True, 3) is corruption, not data.
    return isinstance(x, int) and not isinstance(x, bool)


def _is_int_tuple(x: object) -> bool:
    return isinstance(x, (tuple, list)) and all(_is_int(v) and v >= 0 for v in x)


class Checkpoint:
    """Lazy, memory-mapped tensor source over a HF checkpoint directory."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._closed = False
        if not self.model_dir.is_dir():
            raise QtoolError(f"model directory {self.model_dir} does not exist or is not a directory")

        parts, index_name, weight_map = self._find_parts()
        self._refs: dict[str, _TensorRef] = {}
        self.names: list[str] = []
        for part in parts:
            path = self.model_dir / part
            try:
                if part.endswith(".safetensors"):
                    refs = _read_safetensors(path, part)
                else:
                    refs = _read_torch_bin(path, part)
            except OSError as e:
                raise QtoolError(f"cannot read {part}: {e.strerror or e}") from None
            # llama.cpp's order: safetensors names sorted within a part; a torch .bin keeps its state dict's
            # insertion order (torch.load returns it that way).
            for name in sorted(refs) if part.endswith(".safetensors") else refs:
                if name in self._refs:
                    raise QtoolError(
                        f"tensor '{name}' appears in both {self._refs[name].label} and {part}"
                    )
                self._refs[name] = refs[name]
                self.names.append(name)

        if index_name is not None:
            self._check_index(index_name, weight_map)

    # -- discovery -------------------------------------------------------

    def _find_parts(self) -> tuple[list[str], str | None, dict[str, str]]:
        """Part file names (relative to model_dir), plus the index they came from, if any."""
        try:
            files = sorted(p.name for p in self.model_dir.iterdir() if p.is_file())
        except OSError as e:
            raise QtoolError(f"cannot list {self.model_dir}: {e.strerror or e}") from None

        # As in llama.cpp: safetensors win whenever there is any sign of them
        # (shards or their index); .bin is only the fallback.
        parts = [f for f in files if f.startswith("model") and f.endswith(".safetensors")]
        index_name = _ST_INDEX
        if not parts and _ST_INDEX not in files:
            parts = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
            index_name = _BIN_INDEX

        if index_name not in files:
            if not parts:
                raise QtoolError(f"no model.safetensors / pytorch_model*.bin in {self.model_dir}")
            return parts, None, {}

        weight_map = self._read_index(index_name)
        parts = sorted(set(weight_map.values()))
        missing = [p for p in parts if not (self.model_dir / p).is_file()]
        if missing:
            raise QtoolError(
                f"{index_name} lists shard file(s) that do not exist in {self.model_dir}: "
                f"{_listing(missing)}"
            )
        return parts, index_name, weight_map

    def _read_index(self, index_name: str) -> dict[str, str]:
        try:
            index = json.loads((self.model_dir / index_name).read_text(encoding="utf-8"))
        except OSError as e:
            raise QtoolError(f"cannot read {index_name}: {e.strerror or e}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise QtoolError(f"{index_name} is not valid JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise QtoolError(f"{index_name} has no 'weight_map' mapping tensor names to file names")
        return weight_map

    def _check_index(self, index_name: str, weight_map: dict[str, str]) -> None:
        # A shard that is stale, half-downloaded or from another revision shows
        # up as a name mismatch; catching it here beats a GGUF with holes.
        missing = set(weight_map) - self._refs.keys()
        extra = self._refs.keys() - set(weight_map)
        if not missing and not extra:
            return
        msg = f"{index_name} does not match the shard files:"
        if missing:
            files = {weight_map[n] for n in missing}
            msg += f" missing tensors {_listing(missing)} (expected in {_listing(files)})"
        if extra:
            msg += ";" if missing else ""
            msg += f" tensors not in the index: {_listing(extra)}"
        raise QtoolError(msg)

    # -- public API --------------------------------------------------------

    def _ref(self, name: str) -> _TensorRef:
        if self._closed:
            raise QtoolError(f"checkpoint {self.model_dir} is closed")
        try:
            return self._refs[name]
        except KeyError:
            raise QtoolError(f"no tensor '{name}' in {self.model_dir}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._ref(name).shape

    def dtype(self, name: str) -> str:
        return self._ref(name).dtype

    def part_of(self, name: str) -> Path:
        return self._ref(name).path

    def load(self, name: str) -> np.ndarray:
        """Read one tensor: F32 -> float32, F16 -> float16, BF16 -> float32 (exact).

        F32/F16 come back as a copy-on-write memory map: nothing is read until
        touched, and a caller writing into the array never modifies the file.
        """
        ref = self._ref(name)
        raw = np.dtype(_RAW_DTYPE[ref.dtype]).newbyteorder(">" if ref.big_endian else "<")
        count = math.prod(ref.shape)
        try:
            if count == 0:
                # np.memmap cannot map zero bytes.
                arr = np.empty(ref.shape, raw)
            elif ref.zip_member is not None:
                arr = _read_zip_member(ref, raw, count)
            else:
                mm = np.memmap(ref.path, dtype=raw, mode="c", offset=ref.offset, shape=(count,))
                arr = np.asarray(mm).reshape(ref.shape)
        except (OSError, ValueError) as e:
            # The file changed (shrunk, vanished) since the constructor validated it.
            raise QtoolError(f"cannot read tensor '{name}' from {ref.label}: {e}") from None

        if ref.dtype == "BF16":
            # bf16 is the top half of an IEEE float32, so the shift is exact,
            # including for inf/nan/subnormals.
            return (arr.astype(np.uint32) << 16).view(np.float32)
        if ref.big_endian:
            return arr.astype(raw.newbyteorder("="))
        return arr

    def close(self) -> None:
        # No handles are held between calls (each load maps and releases), so
        # closing only guards against use-after-close bugs in callers.
        self._closed = True

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_zip_member(ref: _TensorRef, raw: np.dtype, count: int) -> np.ndarray:
    nbytes = count * raw.itemsize
    try:
        with zipfile.ZipFile(ref.path) as zf, zf.open(ref.zip_member) as f:
            f.seek(ref.offset)
            data = f.read(nbytes)
    except (zipfile.BadZipFile, KeyError, EOFError, RuntimeError) as e:
        raise ValueError(str(e)) from None
    if len(data) != nbytes:
        raise ValueError(f"zip member {ref.zip_member} is truncated")
    # bytearray so the result is writable, like the memmap path.
    return np.frombuffer(bytearray(data), dtype=raw).reshape(ref.shape)


# ---------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------


def _read_safetensors(path: Path, label: str) -> dict[str, _TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise QtoolError(f"{label} is too small ({size} bytes) to be a safetensors file")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise QtoolError(
                f"{label}: header length {header_len} is larger than the file ({size} bytes); "
                "the file is truncated or not safetensors"
            )
        header_bytes = f.read(header_len)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QtoolError(f"{label}: corrupt safetensors header (not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise QtoolError(f"{label}: corrupt safetensors header (not a JSON object)")

    data_start = 8 + header_len
    refs: dict[str, _TensorRef] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (
            isinstance(info, dict)
            and isinstance(info.get("dtype"), str)
            and _is_int_tuple(info.get("shape"))
            and _is_int_tuple(info.get("data_offsets"))
            and len(info["data_offsets"]) == 2
            and info["data_offsets"][0] <= info["data_offsets"][1]
        ):
            raise QtoolError(f"{label}: corrupt safetensors header entry for '{name}': {info!r:.200}")
        dtype, shape = info["dtype"], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if dtype not in _ITEMSIZE:
            raise QtoolError(
                f"{label}: tensor '{name}' has dtype {dtype}; only F32, F16 and BF16 are supported"
            )
        if data_start + end > size:
            raise QtoolError(
                f"{label} is truncated: tensor '{name}' needs bytes "
                f"{data_start + begin}..{data_start + end} but the file has {size}"
            )
        expected = math.prod(shape) * _ITEMSIZE[dtype]
        if end - begin != expected:
            raise QtoolError(
                f"{label}: tensor '{name}' has {end - begin} bytes of data but "
                f"shape {list(shape)} {dtype} needs {expected}"
            )
        refs[name] = _TensorRef(dtype, shape, path, label, data_start + begin)
    return refs


# ---------------------------------------------------------------------------
# pytorch .bin (torch.save zip format, torch >= 1.6)
# ---------------------------------------------------------------------------
#
# A torch.save zip holds <archive>/data.pkl, whose pickle references tensor
# bytes through persistent ids ('storage', StorageType, key, location, numel)
# pointing at records <archive>/data/<key>.  A state dict pickles as
#
#   collections.OrderedDict() + SETITEMS of
#     name -> torch._utils._rebuild_tensor_v2(<persid storage>, offset, size,
#                                             stride, requires_grad, OrderedDict())
#
# with the storage type spelled as a legacy class (torch.FloatStorage, ...)
# even by torch 2.x.  nn.Parameter values add _rebuild_parameter around it,
# and dtypes that have no legacy storage class use _rebuild_tensor_v3 with an
# UntypedStorage and a torch.<dtype> global.

_TORCH_DTYPE_TO_OURS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# Legacy storage class -> element dtype.  Unsupported ones are still resolved
# (to inert markers) so the user hears "tensor 'x' is int64", not a scary
# "refusing to unpickle".
_LEGACY_STORAGES = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8",
    "QUInt8Storage": "quint8",
    "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2",
    "QUInt2x4Storage": "quint2x4",
}

_TORCH_DTYPE_NAMES = frozenset(_LEGACY_STORAGES.values()) | {
    "uint16", "uint32", "uint64", "complex32",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
}  # fmt: skip

_TORCH_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for torch.FloatStorage & co.: only remembers the element dtype."""

    dtype: str | None  # None: UntypedStorage (bytes; dtype comes from the tensor)


@dataclass(frozen=True, slots=True)
class _DType:
    """Stand-in for a torch.<dtype> object."""

    name: str


@dataclass(frozen=True, slots=True)
class _Storage:
    key: str
    dtype: str | None
    numel: int  # elements of dtype, or bytes when untyped


@dataclass(frozen=True, slots=True)
class _TensorRecord:
    storage: _Storage
    dtype: str
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


# frozen+slots above is deliberate: pickle's BUILD opcode would otherwise let a
# crafted file overwrite fields of these records after validation.


class _Refused(Exception):
    """Internal: a global outside the allowlist; becomes a QtoolError naming the file."""


def _make_record(storage, storage_offset, size, stride, metadata, dtype=None) -> _TensorRecord:
    if not isinstance(storage, _Storage):
        raise ValueError("tensor without a storage")
    if dtype is None:
        if storage.dtype is None:
            raise ValueError("untyped storage in a _rebuild_tensor_v2 call")
        dtype = storage.dtype
    if not (_is_int(storage_offset) and storage_offset >= 0 and _is_int_tuple(size) and _is_int_tuple(stride)):
        raise ValueError("bad tensor offset/size/stride")
    if len(size) != len(stride):
        raise ValueError("tensor size and stride differ in length")
    if metadata:
        # Set only for conj/neg "lazy views", which a weights file never needs.
        raise ValueError(f"tensor has unsupported metadata {metadata!r:.100}")
    return _TensorRecord(storage, dtype, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_record(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _make_record(storage, storage_offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise ValueError("bad dtype in _rebuild_tensor_v3")
    return _make_record(storage, storage_offset, size, stride, metadata, dtype.name)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # A Parameter is its tensor plus autograd flags, which a converter ignores.
    if not isinstance(data, _TensorRecord):
        raise ValueError("parameter without a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    # The real OrderedDict is safe: constructing one runs no file-chosen code.
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "UntypedStorage"): _StorageType(None),
    ("torch.storage", "UntypedStorage"): _StorageType(None),
    **{("torch", cls): _StorageType(dt) for cls, dt in _LEGACY_STORAGES.items()},
    **{("torch", dt): _DType(dt) for dt in _TORCH_DTYPE_NAMES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickler that can build a state dict of tensor records and nothing else.

    Every way a pickle can reach a Python object by name (GLOBAL, STACK_GLOBAL,
    INST/OBJ, the EXT* extension registry) goes through find_class, so the
    allowlist below is the whole attack surface.
    """

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _is_int(pid[4])
        ):
            raise ValueError(f"unsupported persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        return _Storage(key, storage_type.dtype, numel)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., name length, extra length


def _member_data_offset(f, info: zipfile.ZipInfo) -> int:
    # ZipInfo only knows where the local header starts; its extra field (which
    # torch uses to pad data to 64-byte alignment) may differ from the central
    # directory's copy, so read the local header itself.
    f.seek(info.header_offset)
    sig, name_len, extra_len = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if sig != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + name_len + extra_len


def _read_torch_bin(path: Path, label: str) -> dict[str, _TensorRef]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if not zipfile.is_zipfile(path):
        if magic.startswith(b"PK"):
            raise QtoolError(f"{label}: corrupt or truncated zip archive")
        if magic[:1] == b"\x80":  # pickle PROTO opcode: the legacy torch.save format
            raise QtoolError(
                f"{label}: legacy (pre-1.6) torch format not supported; "
                "re-save with torch>=1.6 or use safetensors"
            )
        raise QtoolError(f"{label}: not a pytorch checkpoint (neither a torch zip nor a pickle)")

    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            return _read_torch_zip(zf, f, path, label)
    except zipfile.BadZipFile as e:
        raise QtoolError(f"{label}: corrupt zip archive: {e}") from None


def _read_torch_zip(zf: zipfile.ZipFile, f, path: Path, label: str) -> dict[str, _TensorRef]:
    members = {i.filename: i for i in zf.infolist()}
    pkls = [n for n in members if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(pkls) != 1:
        raise QtoolError(f"{label}: not a torch.save archive (expected one <archive>/data.pkl, found {len(pkls)})")
    prefix = pkls[0][: -len("data.pkl")]

    big_endian = False
    if prefix + "byteorder" in members:  # absent in files from torch < 1.10: little-endian
        order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        if order not in ("little", "big"):
            raise QtoolError(f"{label}: unknown byteorder {order!r}")
        big_endian = order == "big"

    try:
        with zf.open(pkls[0]) as pkl:
            obj = _StateDictUnpickler(pkl).load()
    except _Refused as e:
        raise QtoolError(
            f"{label}: refusing to unpickle '{e}' (pytorch .bin files may only contain tensors)"
        ) from None
    except QtoolError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside a hostile pickle is "corrupt"
        raise QtoolError(f"{label}: corrupt data.pkl: {type(e).__name__}: {e}") from None

    if not isinstance(obj, dict):
        raise QtoolError(f"{label}: expected a state dict of tensors, found a {type(obj).__name__}")

    refs: dict[str, _TensorRef] = {}
    for name, rec in obj.items():
        if not isinstance(name, str) or not isinstance(rec, _TensorRecord):
            raise QtoolError(
                f"{label}: expected a flat state dict of tensors, but entry {name!r:.100} "
                f"is a {type(rec).__name__}"
            )
        refs[name] = _locate_storage(rec, name, zf, f, members, prefix, path, label, big_endian)
    return refs


def _locate_storage(rec, name, zf, f, members, prefix, path, label, big_endian) -> _TensorRef:
    ours = _TORCH_DTYPE_TO_OURS.get(rec.dtype)
    if ours is None:
        raise QtoolError(
            f"{label}: tensor '{name}' has dtype {rec.dtype}; only float32, float16 and bfloat16 are supported"
        )
    itemsize = _TORCH_ITEMSIZE[rec.dtype]

    # Only C-order tensors can be served as one slice of the storage.  Strides
    # of size-1 dimensions are meaningless, and torch leaves arbitrary values there.
    expected, step = [], 1
    for dim in reversed(rec.shape):
        expected.append(step)
        step *= dim
    expected.reverse()
    count = math.prod(rec.shape)
    if count and any(d > 1 and s != e for d, s, e in zip(rec.shape, rec.stride, expected)):
        raise QtoolError(
            f"{label}: tensor '{name}' is not contiguous (shape {list(rec.shape)}, stride {list(rec.stride)}); "
            "re-save it after .contiguous()"
        )

    member_name = f"{prefix}data/{rec.storage.key}"
    info = members.get(member_name)
    if info is None:
        raise QtoolError(f"{label}: tensor '{name}' refers to missing storage record {member_name}")
    begin = rec.offset * itemsize
    end = begin + count * itemsize
    if end > info.file_size:
        raise QtoolError(
            f"{label} is truncated: tensor '{name}' needs bytes {begin}..{end} of storage "
            f"{member_name} but it has {info.file_size}"
        )
    if info.compress_type != zipfile.ZIP_STORED:
        return _TensorRef(ours, rec.shape, path, label, begin, big_endian, zip_member=member_name)
    data_offset = _member_data_offset(f, info)
    if data_offset + end > path.stat().st_size:
        raise QtoolError(f"{label} is truncated: storage {member_name} runs past the end of the file")
    return _TensorRef(ours, rec.shape, path, label, data_offset + begin, big_endian)
