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


def test_drop_stale_kernels_drops_only_what_the_helpers_changed(tmp_path):
    """A cached kernel compiled against other helpers' source is dropped when that source changes, and only then;
    entries the predicate does not select stay."""
    from qtool.numba_start import drop_stale_kernels
    helper = tmp_path / "common.py"
    helper.write_text("X = 1\n")
    cache = tmp_path / "__pycache__"
    names = ("kern.f-1.py311.nbi", "kern.f-1.py311.1.nbc", "common.g-2.py311.nbi")

    def fill():
        cache.mkdir(exist_ok=True)
        for n in names:
            (cache / n).write_bytes(b"x")

    def run():
        drop_stale_kernels(cache, [helper], "common.py.sha256", lambda name: not name.startswith("common."))

    fill()
    run()                                   # no stamp yet: unknown helpers, drop
    assert sorted(p.name for p in cache.glob("*.nb[ic]")) == ["common.g-2.py311.nbi"]
    fill()
    run()                                   # same helpers: keep
    assert len(list(cache.glob("*.nb[ic]"))) == 3
    helper.write_text("X = 2\n")
    run()                                   # changed helpers: drop again
    assert sorted(p.name for p in cache.glob("*.nb[ic]")) == ["common.g-2.py311.nbi"]
