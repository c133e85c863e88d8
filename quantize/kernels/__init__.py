"""Numba kernels that quantize float32 rows exactly as llama.cpp's ggml_quantize_chunk does.

Every kernel has the same signature, ``kernel(x, imatrix, out)``: ``x`` is float32 [rows, n_per_row]
(C-contiguous), ``imatrix`` float32 [n_per_row] or an empty array for "no importance matrix", ``out``
uint8 [rows, row_bytes]; rows are processed in parallel. Only ``quantize/formats.py`` calls them.
"""

import hashlib
import os
from pathlib import Path

import qtool.numba_start  # noqa: F401  (before any kernel module imports numba: its start-up without SciPy)

# numba's on-disk cache is keyed by source file, but a cached kernel remembers the module name it was compiled
# under and re-imports it on load. Imported as top-level ``quantize.kernels`` (possible when the repo root is on
# sys.path) it would poison the cache for every later ``qtool`` process with "No module named 'quantize'".
if __name__ != "qtool.quantize.kernels":
    raise ImportError(f"import the kernels as qtool.quantize.kernels, not {__name__}: numba's kernel cache "
                      "records the module name, and a second name for the same files breaks it")


def _drop_caches_compiled_against_another_common() -> None:
    """numba invalidates a cached kernel only when the kernel's own file changes, yet every kernel inlines
    helpers from common.py: after an edit or update that touches only common.py, the cached kernels would run
    the old helpers. A stamp of common.py's content next to the cache drops them when it no longer matches."""
    here = Path(__file__).parent
    cache = here / "__pycache__"
    digest = hashlib.sha256((here / "common.py").read_bytes()).hexdigest()
    stamp = cache / "common.py.sha256"
    try:
        if stamp.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache.mkdir(exist_ok=True)
        for compiled in cache.glob("*.nb[ic]"):
            if not compiled.name.startswith("common."):  # numba invalidates common's own entries itself
                compiled.unlink(missing_ok=True)
        tmp = cache / f".common.py.sha256.{os.getpid()}"
        tmp.write_text(digest)
        os.replace(tmp, stamp)
    except OSError:  # a read-only install: numba then caches elsewhere (or not at all); nothing to drop here
        pass


_drop_caches_compiled_against_another_common()
