#!/usr/bin/env python3
"""Build llama.cpp's tools (llama-quantize, llama-perplexity, llama-imatrix) from the fetched sdist tree.

    python tests/build_llamacpp.py [--tree DIR] [--jobs N]

The build lives in a user cache directory keyed by the sdist version, the CMake flags, the C++ compiler and the
CPU's instruction-set features (``$XDG_CACHE_HOME/qtool/llama.cpp-<version>-<key>/``, default ``~/.cache``): it is
built with ``GGML_NATIVE=ON``, so a cache copied to another CPU (or built by another compiler) is not reused.
A build is used only once it is complete (a ``BUILD-OK`` stamp written after every tool ran); a cached one is run
again before it is trusted. Reruns are instant and a fresh machine builds once (about 12 minutes on 2 cores).
Prints the bin directory on success.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fetch_llamacpp import DEFAULT_VERSION  # noqa: E402
from tests.llamacpp import ensure_llamacpp  # noqa: E402

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split", "llama-tokenize",
         "llama-completion", "llama-bench")


CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF")
STAMP = "BUILD-OK"


def _cpu_features() -> str:
    """The CPU's vendor, model and instruction-set flags (what -march=native compiles for)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform
        return platform.processor() or platform.machine()
    first = info.split("\n\n", 1)[0]
    keep = [ln for ln in first.splitlines() if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags")]
    return "\n".join(keep)


def _compiler() -> str:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            r = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
            return r.stdout.splitlines()[0] if r.stdout else cxx
    return "none"


@functools.lru_cache(maxsize=None)
def build_key(version: str = DEFAULT_VERSION) -> str:
    blob = "\n".join((version, *CMAKE_FLAGS, _compiler(), _cpu_features()))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_dir(version: str = DEFAULT_VERSION) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qtool" / f"llama.cpp-{version}-{build_key(version)}"


def tool_path(name: str, version: str = DEFAULT_VERSION) -> Path | None:
    """The built tool, or None when there is no complete build for this version, compiler and CPU."""
    out = build_dir(version)
    p = out / "build" / "bin" / name
    return p if (out / STAMP).is_file() and p.is_file() and os.access(p, os.X_OK) else None


def _runs(bin_dir: Path) -> list[str]:
    """The tools that do not start here (a signal such as SIGILL, a missing library, a hang)."""
    bad = []
    for tool in TOOLS:
        try:
            r = subprocess.run([str(bin_dir / tool), "--help"], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            bad.append(f"{tool}: {e}")
            continue
        if r.returncode < 0 or r.returncode > 2:
            bad.append(f"{tool}: exit {r.returncode}")
    return bad


def _drop_stale_cmake_cache(build: Path, src: Path) -> None:
    """A build folder configured for another source path (a cache directory that was moved or renamed) makes cmake
    refuse to configure: forget that configuration, keep nothing from it."""
    cache = build / "CMakeCache.txt"
    if not cache.is_file():
        return
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_HOME_DIRECTORY:") and Path(line.split("=", 1)[1]) != src:
            shutil.rmtree(build)
            return


def build(tree: Path, jobs: int, version: str = DEFAULT_VERSION) -> Path:
    out = build_dir(version)
    bin_dir = out / "build" / "bin"
    if all(tool_path(t, version) for t in TOOLS):
        if not _runs(bin_dir):
            return bin_dir
        (out / STAMP).unlink()          # the cached build does not run here: build again
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is not installed (apt-get install cmake)")
    out.mkdir(parents=True, exist_ok=True)
    # A private copy of the source next to the build, so the cache does not depend on the repo checkout; copied
    # under a temporary name and renamed, so an interrupted copy is never taken for a whole one.
    src = out / "src"
    if not (src / "CMakeLists.txt").is_file():
        partial = out / "src.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(tree, partial)
        partial.rename(src)
    _drop_stale_cmake_cache(out / "build", src)
    subprocess.run(["cmake", "-S", str(src), "-B", str(out / "build"), *CMAKE_FLAGS], check=True, timeout=1800)
    subprocess.run(["cmake", "--build", str(out / "build"), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True, timeout=3600)
    missing = [t for t in TOOLS if not (bin_dir / t).is_file()]
    if missing:
        raise SystemExit(f"build finished but {missing} are missing in {bin_dir}")
    bad = _runs(bin_dir)
    if bad:
        raise SystemExit(f"the tools built in {bin_dir} do not run: {bad}")
    (out / STAMP).write_text(f"{version}\n{' '.join(CMAKE_FLAGS)}\n{_compiler()}\n{_cpu_features()}\n")
    return bin_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=None, help="llama.cpp source tree (default: fetched one)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    tree = args.tree or ensure_llamacpp()
    print(build(tree, args.jobs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
