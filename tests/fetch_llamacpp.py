#!/usr/bin/env python3
"""Fetch llama.cpp's source (the tree vendored by the llama-cpp-python sdist on PyPI).

    python tests/fetch_llamacpp.py [--dest DIR] [--version 0.3.36] [--force]

Downloads ``llama-cpp-python==VERSION`` as an sdist with ``pip download --no-deps
--no-binary :all:`` and extracts only ``vendor/llama.cpp/`` into DEST (default
``<repo>/.cache/llama.cpp``, gitignored). Does nothing if DEST already holds
``convert_hf_to_gguf.py``. Prints DEST on success.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO_ROOT / ".cache" / "llama.cpp"
DEFAULT_VERSION = "0.3.36"
VENDOR = "vendor/llama.cpp/"


def is_complete(dest: Path) -> bool:
    return (dest / "convert_hf_to_gguf.py").is_file() and (dest / "gguf-py" / "gguf").is_dir() \
        and (dest / "conversion").is_dir()


def download_sdist(version: str, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={version}", "-d", str(tmp), "--disable-pip-version-check", "-q"]
    subprocess.run(cmd, check=True, timeout=1800)
    sdists = sorted(tmp.glob("llama_cpp_python-*.tar.gz")) + sorted(tmp.glob("llama-cpp-python-*.tar.gz"))
    if not sdists:
        raise SystemExit(f"pip download produced no sdist in {tmp}: {sorted(os.listdir(tmp))}")
    return sdists[0]


def extract_vendor(sdist: Path, dest: Path) -> None:
    """Extract <top>/vendor/llama.cpp/** from the sdist into dest (atomically via a temp dir)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".llama.cpp-", dir=dest.parent))
    try:
        with tarfile.open(sdist, "r:gz") as tf:
            n = 0
            for m in tf:
                parts = m.name.split("/", 1)
                if len(parts) < 2 or not parts[1].startswith(VENDOR):
                    continue
                rel = parts[1][len(VENDOR):]
                if not rel or rel.startswith("/") or ".." in Path(rel).parts:
                    continue
                if not (m.isfile() or m.isdir() or m.issym()):
                    continue
                target = staging / rel
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if m.issym():
                    # keep only links that stay inside the tree
                    link = (target.parent / m.linkname).resolve()
                    if staging.resolve() in link.parents:
                        os.symlink(m.linkname, target)
                    continue
                src = tf.extractfile(m)
                assert src is not None
                with open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
                n += 1
        if n == 0:
            raise SystemExit(f"{sdist.name} has no {VENDOR} directory")
        if dest.exists():
            shutil.rmtree(dest)
        staging.rename(dest)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def fetch(dest: Path = DEFAULT_DEST, version: str = DEFAULT_VERSION, force: bool = False) -> Path:
    dest = Path(dest).resolve()
    if is_complete(dest) and not force:
        return dest
    with tempfile.TemporaryDirectory(prefix="llama-cpp-python-sdist-") as tmp:
        sdist = download_sdist(version, Path(tmp))
        extract_vendor(sdist, dest)
    if not is_complete(dest):
        raise SystemExit(f"extracted tree at {dest} lacks convert_hf_to_gguf.py / gguf-py / conversion")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"default: {DEFAULT_DEST}")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python version")
    ap.add_argument("--force", action="store_true", help="re-download even if dest exists")
    args = ap.parse_args(argv)
    print(fetch(args.dest, args.version, args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
