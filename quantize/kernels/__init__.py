"""Numba kernels that quantize float32 rows exactly as llama.cpp's ggml_quantize_chunk does.

Every kernel has the same signature, ``kernel(x, imatrix, out)``: ``x`` is float32 [rows, n_per_row]
(C-contiguous), ``imatrix`` float32 [n_per_row] or an empty array for "no importance matrix", ``out``
uint8 [rows, row_bytes]; rows are processed in parallel. Only ``quantize/formats.py`` calls them.
"""

from pathlib import Path

import qtool.numba_start  # noqa: F401  (before any kernel module imports numba: its start-up without SciPy)
from qtool.numba_start import drop_stale_kernels

# numba's on-disk cache is keyed by source file, but a cached kernel remembers the module name it was compiled
# under and re-imports it on load. Imported as top-level ``quantize.kernels`` (possible when the repo root is on
# sys.path) it would poison the cache for every later ``qtool`` process with "No module named 'quantize'".
if __name__ != "qtool.quantize.kernels":
    raise ImportError(f"import the kernels as qtool.quantize.kernels, not {__name__}: numba's kernel cache "
                      "records the module name, and a second name for the same files breaks it")


# every kernel inlines helpers from common.py: an edit of common.py alone drops the cached kernels (numba invalidates
# common's own entries itself)
drop_stale_kernels(Path(__file__).parent / "__pycache__", [Path(__file__).parent / "common.py"], "common.py.sha256",
                   lambda name: not name.startswith("common."))
