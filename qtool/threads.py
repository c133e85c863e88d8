"""One thread count for every kernel: numba's parallel loops and the BLAS library numpy uses (`--threads`)."""
from __future__ import annotations

import os

from qtool.errors import QtoolError


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_threads(threads: int | None) -> str | None:
    """Use `threads` threads (None: all cores) for numba and BLAS from now on; a note when fewer are possible."""
    import numba
    from threadpoolctl import threadpool_limits

    if threads is not None and threads < 1:
        raise QtoolError("--threads must be at least 1")
    wanted = threads or cpu_count()
    limit = numba.config.NUMBA_NUM_THREADS
    used = min(wanted, limit)
    numba.set_num_threads(used)
    threadpool_limits(limits=used, user_api="blas")
    if threads and threads > limit:
        return f"using {limit} threads: numba was started with at most {limit} (set NUMBA_NUM_THREADS)"
    return None


def threads_in_use() -> dict[str, int]:
    """{'numba': n, 'blas': n} as the libraries report them now."""
    import numba
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return {"numba": numba.get_num_threads(), "blas": blas[0] if blas else 0}
