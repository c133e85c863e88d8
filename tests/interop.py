"""What the llama.cpp comparison tests share: the built tools and the real model, skipped locally when missing
but failing under CI (which installs and builds everything: a skip there would hide a broken setup)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import pytest

from tests.build_llamacpp import tool_path
from tests.fixtures.smollm2 import smollm2_gguf


def unavailable(message: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def need_tool(name: str) -> Path:
    path = tool_path(name)
    if path is None:
        unavailable(f"{name} is not built: run `python tests/build_llamacpp.py`")
    return path


def smollm2_files(root: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """SmolLM2-135M-Instruct in the given kinds (see tests/fixtures/smollm2.py), made in root."""
    if any(kind not in ("F16", "F32", "Q4_1") for kind in kinds):
        need_tool("llama-quantize")
    try:
        return {kind: smollm2_gguf(root, kind) for kind in kinds}
    except FileNotFoundError as e:
        unavailable(str(e))
