"""One thread count for every kernel: numba's parallel loops and the BLAS library numpy uses (`--threads`)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from qtool.errors import QtoolError

_controller = None                                   # threadpoolctl's view of the loaded BLAS, made once
_pools: dict[int, ThreadPoolExecutor] = {}


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


@contextmanager
def single_threaded_blas():
    """BLAS on one thread inside the block, then back to what it was. For many small products run side by side
    from worker threads: BLAS's own threads would split each product and meet at a barrier every time."""
    global _controller
    from threadpoolctl import ThreadpoolController

    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield


def _one_numba_thread() -> None:
    import numba

    numba.set_num_threads(1)        # thread-local: this worker's numba kernels run serially


def worker_pool(n: int) -> ThreadPoolExecutor:
    """n threads whose numba kernels run serially (numba's thread count is per calling thread); kept for reuse."""
    pool = _pools.get(n)
    if pool is None:
        pool = _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="qtool", initializer=_one_numba_thread)
    return pool
