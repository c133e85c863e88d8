"""qtool: HuggingFace checkpoints to llama.cpp GGUF files, quantized and measured."""
import os as _os

__version__ = "0.1.0"

# The forward pass alternates OpenBLAS matrix products with numba (OpenMP) kernels on the same cores, and each
# library's idle threads busy-wait after their work and steal the cores from the other: OpenBLAS by default for
# ~2^28 cycles (the next numba kernel runs up to 4x slower), libgomp for ~300k spins (the next small product runs
# 2x slower). Shortest OpenBLAS wait + passive OpenMP threads: SmolLM2-135M's forward pass on 2 cores goes from
# 8.8 s to 3.7 s. But a thread that sleeps at once costs each numba kernel 60-90 us to wake in this VM (an empty
# parallel loop: 80 us, against 3 us when it spins a little first), and decoding one 7B token calls ~450 kernels.
# So libgomp's threads spin 3000 times first (about 0.16 ms on a Zen 3, measured by the workers' CPU time): 7B
# Q4_K_M decoding at 2 threads 268 -> 233 ms a token, SmolLM2's 0.24-0.34x of llama-bench -> 0.42-0.49x. Longer
# spins steal the core from the OpenBLAS product that follows a numba kernel: 10000 (0.56 ms) cut SmolLM2's F16
# prefill from 287 to 102 tokens/s. All three are read when the library loads, so they apply only when qtool is
# imported before numpy and numba (the CLI is); values the user set win.
THREAD_ENV_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "passive", "GOMP_SPINCOUNT": "3000"}
# The ones this process got from qtool rather than from its user: whoever starts other programs (llama.cpp's
# tools in tests and benchmarks, which use OpenMP too) should remove these from their environment.
THREAD_ENV_APPLIED = tuple(k for k in THREAD_ENV_DEFAULTS if k not in _os.environ)
for _key in THREAD_ENV_APPLIED:
    _os.environ[_key] = THREAD_ENV_DEFAULTS[_key]


def foreign_env() -> dict:
    """os.environ without the thread settings qtool added: the environment another program should run in."""
    return {k: v for k, v in _os.environ.items() if k not in THREAD_ENV_APPLIED}

# GGML types the pinned llama.cpp has and the installed gguf lacks (Q2_0): added to gguf's tables on import
from . import ggml_types as _ggml_types  # noqa: E402,F401  (after the thread settings: gguf imports numpy)
