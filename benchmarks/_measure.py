"""What the side-by-side benchmarks share: running a child process for its wall time and peak RSS, and the
environment qtool runs in."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import qtool


UNSET_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")   # they make numpy's OpenBLAS pick a slow kernel here

# A fresh small process runs the command and reports its exit code, wall time and peak RSS: a child forked
# straight from a large Python process inherits that process's high-water mark (Linux keeps it across exec),
# so `/bin/true` forked from a parent that once touched 300 MB reports 300 MB; through this meter, ~10 MB.
_WAIT4 = r"""
import json, os, subprocess, sys, time
with open(sys.argv[1], "wb") as out:
    t0 = time.perf_counter()
    proc = subprocess.Popen(sys.argv[2:], stdout=out, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall": wall, "peak_rss": usage.ru_maxrss * 1024,
                  "cpu": usage.ru_utime + usage.ru_stime}))
"""


# Child-process source that fills `out` with the BLAS library numpy loaded, its kernel (corename), build config and
# thread count — what decides sgemm speed here. Run it with qtool's environment; append code that uses `out`.
BLAS_LIBRARY_PROBE = r"""
import ctypes, json
import numpy as np
np.ones((64, 64), np.float32) @ np.ones((64, 64), np.float32)
out = {}
for path in sorted({l.split()[-1] for l in open("/proc/self/maps") if "blas" in l.lower() and "/" in l}):
    lib = ctypes.CDLL(path)
    for key, names in (("corename", ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                                     "openblas_get_corename64_", "openblas_get_corename")),
                       ("config", ("scipy_openblas_get_config64_", "scipy_openblas_get_config",
                                   "openblas_get_config64_", "openblas_get_config")),
                       ("threads", ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
                                    "openblas_get_num_threads64_", "openblas_get_num_threads"))):
        for n in names:
            f = getattr(lib, n, None)
            if f is not None:
                f.restype = ctypes.c_int if key == "threads" else ctypes.c_char_p
                v = f()
                out[key] = v.decode() if isinstance(v, bytes) else v
                break
    out["library"] = path
"""


@dataclass
class Measured:
    rc: int
    wall: float          # seconds
    peak_rss: int        # bytes: the child's high-water mark
    cpu: float           # user + system seconds of the child (and its waited-for children)
    text: str            # stdout + stderr


def measure(cmd: list[str], env: dict[str, str], timeout: float | None = None) -> Measured:
    """Run a child process through the small meter process; its exit code, wall time, peak RSS, CPU time, output."""
    with tempfile.NamedTemporaryFile(suffix=".log") as out:
        meter = subprocess.run([sys.executable, "-S", "-c", _WAIT4, out.name, *cmd], env=env,
                               capture_output=True, text=True, check=True, timeout=timeout)
        text = Path(out.name).read_text(encoding="utf-8", errors="replace")
    m = json.loads(meter.stdout)
    return Measured(m["rc"], m["wall"], m["peak_rss"], m["cpu"], text)


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[int, float, int, str]:
    """(return code, wall seconds, peak RSS bytes, stdout+stderr) of a child process."""
    m = measure(cmd, env)
    return m.rc, m.wall, m.peak_rss, m.text


def clean_env() -> dict[str, str]:
    """This process's environment without the thread settings importing qtool added (qtool/__init__.py): what
    llama.cpp's tools run in, so they don't inherit passive OpenMP threads that qtool wants but they may not."""
    return qtool.foreign_env()


def qtool_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in clean_env().items() if k not in UNSET_ENV}
    env.update(OPENBLAS_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    return env
