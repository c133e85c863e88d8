#!/usr/bin/env python3
"""Build llama.cpp's tools (llama-quantize, llama-perplexity, llama-imatrix) from the fetched sdist tree.

    python tests/build_llamacpp.py [--tree DIR] [--jobs N]

The build lives in a user cache directory keyed by the sdist version
(``$XDG_CACHE_HOME/qtool/llama.cpp-<version>/``, default ``~/.cache``), so reruns are instant and a fresh
machine builds once (about 12 minutes on 2 cores). Prints the bin directory on success.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.fetch_llamacpp import DEFAULT_VERSION  # noqa: E402
from tests.llamacpp import ensure_llamacpp  # noqa: E402

TOOLS = ("llama-quantize", "llama-perplexity", "llama-imatrix", "llama-gguf-split", "llama-tokenize",
         "llama-completion")


def build_dir(version: str = DEFAULT_VERSION) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qtool" / f"llama.cpp-{version}"


def tool_path(name: str, version: str = DEFAULT_VERSION) -> Path | None:
    p = build_dir(version) / "build" / "bin" / name
    return p if p.is_file() and os.access(p, os.X_OK) else None


def build(tree: Path, jobs: int, version: str = DEFAULT_VERSION) -> Path:
    out = build_dir(version)
    bin_dir = out / "build" / "bin"
    if all(tool_path(t, version) for t in TOOLS):
        return bin_dir
    if shutil.which("cmake") is None:
        raise SystemExit("cmake is not installed (apt-get install cmake)")
    out.mkdir(parents=True, exist_ok=True)
    # A private copy of the source next to the build, so the cache does not depend on the repo checkout.
    src = out / "src"
    if not (src / "CMakeLists.txt").is_file():
        shutil.copytree(tree, src, dirs_exist_ok=True)
    subprocess.run(["cmake", "-S", str(src), "-B", str(out / "build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(out / "build"), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True)
    missing = [t for t in TOOLS if not tool_path(t, version)]
    if missing:
        raise SystemExit(f"build finished but {missing} are missing in {bin_dir}")
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
