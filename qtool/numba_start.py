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

import importlib.util
import sys


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
