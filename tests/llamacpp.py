"""Run llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist) as a reference.

The llama.cpp tree is looked up, in order, at ``$QTOOL_LLAMACPP_DIR`` and at
``<repo>/.cache/llama.cpp`` (where ``python tests/fetch_llamacpp.py`` puts it).

    from tests.llamacpp import llamacpp_dir, run_llamacpp_convert
    if llamacpp_dir() is None: unavailable("llama.cpp tree missing")   # from tests.interop
    gguf_path = run_llamacpp_convert(model_dir, tmp_path / "ref.gguf", outtype="f16")

The converter runs in a subprocess with the vendored ``gguf-py`` first on ``PYTHONPATH`` (so its
own gguf package is used, not the pip one), ``NO_LOCAL_GGUF`` unset, and the Hugging Face
libraries forced offline. It needs torch and transformers (the ``interop`` extra).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO_ROOT / ".cache" / "llama.cpp"
ENV_VAR = "QTOOL_LLAMACPP_DIR"

__all__ = ["LlamaCppConvertError", "llamacpp_dir", "ensure_llamacpp", "converter_env",
           "run_llamacpp_convert", "interop_available"]


class LlamaCppConvertError(RuntimeError):
    """convert_hf_to_gguf.py exited non-zero; ``stderr`` holds its full stderr."""

    def __init__(self, msg: str, returncode: int, stdout: str, stderr: str):
        super().__init__(msg)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def _usable(d: Path) -> bool:
    return (d / "convert_hf_to_gguf.py").is_file() and (d / "gguf-py" / "gguf").is_dir()


def llamacpp_dir() -> Path | None:
    """The vendored llama.cpp tree, or None if it has not been fetched."""
    env = os.environ.get(ENV_VAR)
    if env and _usable(Path(env)):
        return Path(env).resolve()
    if _usable(DEFAULT_DIR):
        return DEFAULT_DIR.resolve()
    return None


def ensure_llamacpp() -> Path:
    """llamacpp_dir(), fetching the sdist from PyPI first if needed."""
    d = llamacpp_dir()
    if d is not None:
        return d
    from tests.fetch_llamacpp import fetch

    return fetch(Path(os.environ.get(ENV_VAR) or DEFAULT_DIR))


def interop_available() -> bool:
    """True if the llama.cpp tree is present and torch + transformers are importable."""
    if llamacpp_dir() is None:
        return False
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "sentencepiece"))


def converter_env(tree: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.pop("NO_LOCAL_GGUF", None)
    pp = [str(tree / "gguf-py")]
    if env.get("PYTHONPATH"):
        pp.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(pp)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def run_llamacpp_convert(
    model_dir: Path | str,
    outfile: Path | str,
    outtype: str = "f16",
    extra_args: Sequence[str] | Iterable[str] = (),
    *,
    tree: Path | None = None,
    timeout: float | None = 600,
    tail_lines: int = 40,
) -> Path:
    """Convert ``model_dir`` with llama.cpp's convert_hf_to_gguf.py into ``outfile``.

    Returns ``outfile`` (absolute). Raises ``LlamaCppConvertError`` with the last ``tail_lines``
    lines of stderr on failure, FileNotFoundError if the llama.cpp tree is missing.
    """
    tree = Path(tree) if tree is not None else llamacpp_dir()
    if tree is None:
        raise FileNotFoundError(
            f"llama.cpp tree not found (set ${ENV_VAR} or run `python tests/fetch_llamacpp.py`)")
    model_dir = Path(model_dir).resolve()
    outfile = Path(outfile).resolve()
    outfile.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(model_dir),
           "--outfile", str(outfile), "--outtype", outtype, *list(extra_args)]
    proc = subprocess.run(cmd, cwd=str(tree), env=converter_env(tree), capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.splitlines()[-tail_lines:])
        raise LlamaCppConvertError(
            f"convert_hf_to_gguf.py failed (exit {proc.returncode}) on {model_dir}:\n{tail}",
            proc.returncode, proc.stdout, proc.stderr)
    if not outfile.exists():
        raise LlamaCppConvertError(f"convert_hf_to_gguf.py exited 0 but wrote no {outfile}",
                                   proc.returncode, proc.stdout, proc.stderr)
    return outfile
