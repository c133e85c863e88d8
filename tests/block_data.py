"""Rows that stress the block encoders: the test data the i-quant kernel tests share.

Each kernel test picks its own cut-offs (sub-block size, the magnitudes where ggml zeroes a block) through the
parameters; the shapes of the data are common.
"""
from __future__ import annotations

import numpy as np

# fp16 scale words for decoder tests: zeros, subnormals, the normal boundary, ±1, the largest finite, inf, NaN.
EDGE_HALVES = np.array([0x0000, 0x8000, 0x0001, 0x8001, 0x03FF, 0x0400, 0x3C00, 0xBC00, 0x7BFF, 0xFBFF, 0x7C00,
                        0x7E00], np.uint16)


def gaussian(rows: int, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


def with_outliers(rows: int, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = gaussian(rows, n, seed)
    hits = rng.random((rows, n)) < 0.01
    x[hits] *= rng.uniform(20, 300, hits.sum()).astype(np.float32)
    x[:, 7] = 500.0                                        # one huge value per row, in the first sub-block
    return x


def zero_blocks(rows: int, n: int, seed: int, sub: int, patterns: list[list[int]]) -> np.ndarray:
    """All-zero super-blocks and all-zero `sub`-value sub-blocks (the indices in `patterns`, in turn) inside
    non-zero super-blocks; the last row all zero."""
    x = gaussian(rows, n, seed)
    subs = x.reshape(rows, n // 256, 256 // sub, sub)
    for r in range(rows):
        for b in range(n // 256):
            subs[r, b, patterns[(r + b) % len(patterns)]] = 0.0
    x[-1] = 0.0
    return x


def equal_values(rows: int, n: int, seed: int) -> np.ndarray:
    """Ties everywhere: the sort must keep equal values in index order, as glibc's qsort (a merge sort) does."""
    x = np.empty((rows, n), np.float32)
    values = np.random.default_rng(seed).uniform(-50, 50, rows).astype(np.float32)
    x[...] = values[:, None]
    x[0] = 1.0
    x[1] = -1.0
    x[2, ::2], x[2, 1::2] = 2.5, -2.5                    # equal magnitudes, alternating signs
    x[3] = np.round(gaussian(1, n, seed)[0])              # few distinct values (-3..3), many ties
    x[4, ::3] = -0.0
    return x


def tiny_and_huge(rows: int, n: int, seed: int, lowest: float, pinned: list[float], clip: float) -> np.ndarray:
    """Heavy-tailed rows scaled by 10**U(lowest, 3), the first rows by the `pinned` scales (a kernel's cut-offs),
    clipped to ±clip so the block scales still fit fp16."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(lowest, 3, (rows, 1))
    scale[:len(pinned), 0] = pinned
    return (rng.standard_t(3, (rows, n)) * scale).clip(-clip, clip).astype(np.float32)


def random_imatrix(n: int, seed: int) -> np.ndarray:
    """Mean squared activations: mostly O(1), some huge, some exactly zero (a whole sub-block of them too)."""
    rng = np.random.default_rng(seed)
    w = (rng.lognormal(0, 2, n) ** 2).astype(np.float32)
    w[rng.random(n) < 0.05] = 0.0
    w[32:64] = 0.0
    return w
