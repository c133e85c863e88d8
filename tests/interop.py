"""What the llama.cpp and transformers comparison tests share: the built tools, the reference packages and the real
model. Missing, they FAIL the test with the set-up command — in CI and out of it — so a run that claims to compare
with llama.cpp cannot pass by comparing nothing. `--allow-skip-interop` turns them into skips; deselecting the
markers (`-m "not interop and not reference"`) leaves those tests out altogether."""
from __future__ import annotations

import importlib
import re
import subprocess
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


# llama.cpp's tools built on its common/ library (llama-completion, llama-perplexity, llama-imatrix) print through an
# asynchronous logger (common/log.cpp) whose thread is never joined at exit: common_log_main() leaks it on purpose
# (llama.cpp issue 22142, "logs may be lost if not flushed before the program exits"), and these tools do not flush
# it. On a loaded machine the process can end before that thread has written its last lines: in CI (2 cores, two
# pytest workers) a 4-token llama-completion exited 0 with nothing after "generate: n_ctx = ...", neither its text
# nor its timings. The tools run deterministically here (greedy, fixed seed), so a run that exited 0 but lacks what
# the test reads is run again, up to LOGGED_TRIES times; a non-zero exit fails at once.
LOGGED_TRIES = 3


def run_logged(cmd: list, expect: tuple[str, ...], timeout: int) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's common/-based tools to completion: its exit status 0 and every `expect` pattern
    (regular expressions) found in its stdout + stderr. Returns the process with stdout and stderr as bytes."""
    missing: list[str] = []
    for _ in range(LOGGED_TRIES):
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout)
        stderr = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 0, stderr[-3000:]
        log = proc.stdout.decode("utf-8", "replace") + stderr
        missing = [p for p in expect if not re.search(p, log)]
        if not missing:
            return proc
    pytest.fail(f"{Path(str(cmd[0])).name} exited 0 {LOGGED_TRIES} times without printing {missing}; the end of its "
                f"output:\n{log[-3000:]}", pytrace=False)


def smollm2_files(root: Path, kinds: tuple[str, ...]) -> dict[str, Path]:
    """SmolLM2-135M-Instruct in the given kinds (see tests/fixtures/smollm2.py), made in root."""
    if any(kind not in ("F16", "F32", "Q4_1") for kind in kinds):
        need_tool("llama-quantize")
    try:
        return {kind: smollm2_gguf(root, kind) for kind in kinds}
    except FileNotFoundError as e:
        unavailable(str(e))
