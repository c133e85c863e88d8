"""llama.cpp's own quantization code (``libggml-base``) through ctypes, for byte-exact tests.

    from tests import ggml_ref
    ggml_ref.require()   # in a test or fixture: skip locally / fail under CI when it cannot be built
    raw = ggml_ref.ggml_quantize(GGMLQuantizationType.Q4_K, x, imatrix)   # uint8 [rows, row_bytes]
    y = ggml_ref.ggml_dequantize(GGMLQuantizationType.Q4_K, raw, n_per_row)  # float32 [rows, n_per_row]

The library is the ``ggml-base`` CMake target of the fetched llama.cpp tree (``tests.llamacpp.llamacpp_dir()``),
built once as a shared library with the project's default Release flags into
``$XDG_CACHE_HOME/qtool/ggml-ref-<sdist version>-<key>/`` (default ``~/.cache``; the key as for the tools in
tests/build_llamacpp.py: flags, compiler, CPU), about 20 s on 2 cores.
Default flags matter: ``ggml-base`` gets no ``-march`` flags, so on x86-64 the compiler cannot contract
``a*b + c`` into FMA instructions and every float operation rounds separately — the arithmetic that
llama-quantize on x86-64 performs and that our kernels reproduce (docs/reference/quantization.md §2.8).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tests.build_llamacpp import build_key
from tests.fetch_llamacpp import DEFAULT_VERSION
from tests.llamacpp import llamacpp_dir

__all__ = ["available", "require", "load", "cache_dir", "ggml_quantize", "ggml_dequantize", "GgmlRefBuildError"]

LIB_NAME = "libggml-base.so"


class GgmlRefBuildError(RuntimeError):
    """Configuring or compiling ggml-base failed; the message holds the tail of the build log."""


def cache_dir(version: str = DEFAULT_VERSION) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qtool" / f"ggml-ref-{version}-{build_key(version)}"


def _lib_path() -> Path:
    return cache_dir() / LIB_NAME


def available() -> bool:
    """True if the library is built, or can be built here (llama.cpp tree, cmake and a C/C++ compiler)."""
    if _lib_path().is_file():
        return True
    have_cc = any(shutil.which(c) for c in ("cc", "gcc", "clang"))
    have_cxx = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
    return llamacpp_dir() is not None and shutil.which("cmake") is not None and have_cc and have_cxx


def require() -> None:
    """For tests: a failure (a skip with --allow-skip-interop) when the library cannot be built here; a build that
    starts and fails is raised as an error either way."""
    from tests.interop import unavailable

    if not available():
        unavailable("llama.cpp tree, cmake or a C/C++ compiler missing")
    load()


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as fh:
        fh.write(("\n$ " + " ".join(cmd) + "\n").encode())
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise GgmlRefBuildError(f"{cmd[0]} failed (exit {proc.returncode}); log {log}:\n{tail}")


def _build(tree: Path, out: Path) -> None:
    """Configure the whole tree (ggml's own CMakeLists cannot be configured standalone from the sdist:
    it lacks ggml.pc.in) but build only the ggml-base target."""
    build = out / "build"
    # A stale build dir configured from another source path makes cmake refuse; start clean.
    shutil.rmtree(build, ignore_errors=True)
    log = out / "build.log"
    log.write_text("")
    jobs = str(max(1, min(4, os.cpu_count() or 1)))
    _run(["cmake", "-S", str(tree), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=ON", "-DGGML_CPU=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
          "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
          "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_COMMON=OFF"], log)
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", jobs, "--target", "ggml-base"], log)
    built = sorted(p for p in (build / "bin").glob(LIB_NAME + "*") if p.is_file() and not p.is_symlink())
    if not built:
        raise GgmlRefBuildError(f"build finished but no {LIB_NAME} in {build / 'bin'}")
    fd, tmp = tempfile.mkstemp(prefix=".lib-", dir=out)
    os.close(fd)
    shutil.copyfile(built[0], tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out / LIB_NAME)
    shutil.rmtree(build, ignore_errors=True)


_lib: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """The loaded library, building it first if needed (raises GgmlRefBuildError / FileNotFoundError)."""
    global _lib
    if _lib is not None:
        return _lib
    path = _lib_path()
    if not path.is_file():
        tree = llamacpp_dir()
        if tree is None:
            raise FileNotFoundError("llama.cpp tree not found (run `python tests/fetch_llamacpp.py`)")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several pytest processes may start at once: one builds, the others wait for it.
        with open(path.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.is_file():
                _build(tree, path.parent)
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    _lib = lib
    return lib


_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml/include/ggml.h
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


def _check_row_length(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, _ = GGML_QUANT_SIZES[qtype]
    # ggml asserts (aborts the whole process) on a partial block; refuse in Python instead.
    if n_per_row <= 0 or n_per_row % block:
        raise ValueError(f"{qtype.name}: row length {n_per_row} is not a positive multiple of {block}")
    return block


def ggml_quantize(qtype: GGMLQuantizationType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 [rows, n] (or [n]) → uint8 [rows, row_bytes] through ``ggml_quantize_chunk``."""
    lib = load()
    qtype = GGMLQuantizationType(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected a 1-D or 2-D array, got shape {x.shape}")
    rows, n = x.shape
    _check_row_length(qtype, n)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,):
            raise ValueError(f"imatrix shape {imatrix.shape} does not match row length {n}")
    elif lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} requires an imatrix")
    row_bytes = lib.ggml_row_size(int(qtype), n)
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if imatrix is None else imatrix.ctypes.data)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def ggml_dequantize(qtype: GGMLQuantizationType, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """uint8 [rows, row_bytes] → float32 [rows, n_per_row] through the type traits' ``to_float``."""
    lib = load()
    qtype = GGMLQuantizationType(qtype)
    _check_row_length(qtype, n_per_row)
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    if raw.size % row_bytes:
        raise ValueError(f"{raw.size} bytes is not a whole number of {qtype.name} rows of {row_bytes} bytes")
    rows = raw.size // row_bytes
    out = np.empty((rows, n_per_row), dtype=np.float32)
    if qtype == GGMLQuantizationType.F32:
        out[...] = raw.view(np.float32).reshape(rows, n_per_row)
        return out
    to_float = lib.ggml_get_type_traits(int(qtype)).contents.to_float
    if not to_float:
        raise ValueError(f"ggml has no to_float for {qtype.name}")
    _ToFloat(to_float)(raw.ctypes.data, out.ctypes.data, rows * n_per_row)
    return out
