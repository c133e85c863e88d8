"""What the llama.cpp and transformers comparison tests share: the built tools, the reference packages and the real
model. Missing, they FAIL the test with the set-up command — in CI and out of it — so a run that claims to compare
with llama.cpp cannot pass by comparing nothing. `--allow-skip-interop` turns them into skips; deselecting the
markers (`-m "not interop and not reference"`) leaves those tests out altogether."""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

from tests.build_llamacpp import tool_path
from tests.fixtures.smollm2 import smollm2_gguf

SETUP = "set up with `pip install -e \".[test,interop,ray]\" && python tests/setup_interop.py`"
# Set by tests/conftest.py from the command line.
ALLOW_SKIP = False

# llama.cpp's context options for float32 attention, as qtool computes it. Its defaults work in half precision there:
# an F16 K/V cache, and flash attention (on by default on the CPU), which rounds even with an F32 cache.
LLAMA_FLOAT32 = ("-ctk", "f32", "-ctv", "f32", "-fa", "off")


def unavailable(message: str) -> NoReturn:
    if ALLOW_SKIP:
        pytest.skip(message)
    pytest.fail(f"{message}: {SETUP} (or pass --allow-skip-interop to skip such tests)", pytrace=False)


def need_module(name: str) -> ModuleType:
    """importorskip that fails: the reference packages are part of the test set-up, not optional."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"{name} cannot be imported ({e})")


def need_tool(name: str) -> Path:
    path = tool_path(name)
    if path is None:
        unavailable(f"{name} is not built")
    return path


def smollm2_files(root: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """SmolLM2-135M-Instruct in the given kinds (see tests/fixtures/smollm2.py), made in root."""
    if any(kind not in ("F16", "F32", "Q4_1") for kind in kinds):
        need_tool("llama-quantize")
    try:
        return {kind: smollm2_gguf(root, kind) for kind in kinds}
    except FileNotFoundError as e:
        unavailable(str(e))
