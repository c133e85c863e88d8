"""Thin helpers over the `gguf` package: streaming writes, atomic output, splits, sizes."""
from __future__ import annotations

import os
import re
import shutil
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
    load: Callable[[], np.ndarray]


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


def check_overwrite(paths: Sequence[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise QtoolError(f"{existing[0]} already exists (use --force to overwrite)")


def write_gguf(path: Path, arch: str, kvs: Sequence[tuple[str, Any, GGUFValueType, GGUFValueType | None]],
               tensors: Sequence[PlannedTensor], *, split_max_tensors: int = 0, split_max_size: int = 0,
               force: bool = False, progress: Progress | None = None,
               prepare: Callable[[gguf.GGUFWriter], None] | None = None) -> list[Path]:
    """Stream tensors one at a time into `path` (or its shards); atomic: temp names, renamed at the end.

    `prepare(writer)` may add keys before `kvs` (e.g. general.* metadata through gguf.Metadata).
    Returns the paths written.
    """
    path = Path(path)
    with atomic_output_dir(path.parent) as tmp_dir:
        writer = gguf.GGUFWriter(tmp_dir / path.name, arch, split_max_tensors=split_max_tensors,
                                 split_max_size=split_max_size)
        if prepare is not None:
            prepare(writer)
        for key, value, vtype, sub_type in kvs:
            add_kv(writer, key, value, vtype, sub_type)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.uint8), tensor_nbytes(t.shape, t.qtype),
                                   raw_dtype=t.qtype)
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
                data = encode_tensor(t.load(), t.qtype)
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
