"""numba, started without importing SciPy.

Every qtool process that runs a kernel pays numba's first-use set-up, and a third of it (0.26 s of 0.62 s on this
2-core machine, for a kernel loaded from the cache) is ``numba.np.arraymath`` asking whether ``np.dot`` could
call BLAS: it imports ``scipy.linalg``, which clones numpy's namespace and with it loads ``numpy.f2py``. qtool's
kernels never call ``np.dot`` inside numba, and the only answer that matters is whether SciPy is installed, which
``importlib`` can tell without importing it. Importing this module imports numba with that check swapped in for
the one import of ``numba.np.arraymath`` that makes it; ``np.dot`` in a kernel would still get BLAS exactly as
before (numba's own check runs again when such a kernel is compiled).

Import it before the first ``from numba import …`` of a module with kernels. On a numba without these internals
it does nothing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Sequence


def _scipy_is_installed() -> None:
    if importlib.util.find_spec("scipy") is None:
        raise ImportError("scipy 0.16+ is required for linear algebra")


def _import_arraymath_without_scipy() -> None:
    if "numba.np.arraymath" in sys.modules:
        return
    try:
        import numba.np.linalg as linalg
        real = linalg.ensure_blas
    except (ImportError, AttributeError):
        return
    linalg.ensure_blas = _scipy_is_installed
    try:
        import numba.np.arraymath  # noqa: F401  (its module-level _check_blas() sees the cheap check)
    finally:
        linalg.ensure_blas = real


_import_arraymath_without_scipy()


def drop_stale_kernels(cache_dir: Path, sources: Sequence[Path], stamp: str, stale: Callable[[str], bool]) -> None:
    """numba invalidates a cached kernel only when the kernel's own file changes, yet kernels inline helpers from
    other files: after an edit or update that touches only those, the cached kernels would run the old helpers.
    A stamp of the helpers' content (`sources`) next to the cache drops every cached entry whose file name
    `stale` selects when the stamp no longer matches. A read-only install keeps its cache as it is (numba then
    caches elsewhere, or not at all)."""
    digest = hashlib.sha256(b"".join(Path(s).read_bytes() for s in sources)).hexdigest()
    stamp_path = cache_dir / stamp
    try:
        if stamp_path.read_text() == digest:
            return
    except OSError:
        pass
    try:
        cache_dir.mkdir(exist_ok=True)
        for compiled in cache_dir.glob("*.nb[ic]"):
            if stale(compiled.name):
                compiled.unlink(missing_ok=True)
        tmp = cache_dir / f".{stamp}.{os.getpid()}"
        tmp.write_text(digest)
        os.replace(tmp, stamp_path)
    except OSError:
        pass
