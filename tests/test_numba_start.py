"""qtool.numba_start: numba starts without importing SciPy, and np.dot in a kernel still gets BLAS."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

PROBE = r"""
import json, sys
import numpy as np
from qtool.quantize import formats
x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
formats.format_for(formats.T.Q8_0).quantize(x, None)            # a cached kernel: numba's start-up runs
after_kernel = sorted(m for m in ("scipy.linalg", "numpy.f2py") if m in sys.modules)
import numba, numba.np.arraymath as am
@numba.njit
def dot(a, b):
    return np.dot(a, b)
a = np.arange(6, dtype=np.float64).reshape(2, 3)
print(json.dumps({"after_kernel": after_kernel, "have_blas": am._HAVE_BLAS,
                  "dot": dot(a, a.T).tolist(), "want": (a @ a.T).tolist()}))
"""


def test_kernels_start_without_scipy_and_dot_still_works():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["after_kernel"] == []                 # running a kernel imported neither scipy.linalg nor f2py
    scipy_installed = importlib.util.find_spec("scipy") is not None
    assert got["have_blas"] == scipy_installed       # numba's own answer, without the import
    assert got["dot"] == got["want"]
