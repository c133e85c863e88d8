"""F16 and BF16 rows: per-element conversions (docs/reference/quantization.md §0), parallel over rows.

numpy's float32 -> float16 cast is bit-identical for finite input but single-threaded and, measured on the
4096x4096 benchmark, about half as fast as llama.cpp's converter; gguf-py's BF16 port is four times slower.
These kernels keep F16/BF16 file types from being the slow step of a quantize run.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .common import float32_bits, fp16_widen, fp32_to_fp16_bits


@njit(parallel=True, cache=True)
def quantize_f16(x, imatrix, out):
    rows, n = x.shape
    halves = out.view(np.uint16)  # whole 16-bit stores: two byte stores per value would not vectorize
    for r in prange(rows):
        for j in range(n):
            halves[r, j] = fp32_to_fp16_bits(x[r, j])


@njit(parallel=True, cache=True)
def quantize_bf16(x, imatrix, out):
    rows, n = x.shape
    halves = out.view(np.uint16)
    for r in prange(rows):
        for j in range(n):
            u = np.int64(float32_bits(x[r, j])) & 0xFFFFFFFF
            if (u & 0x7FFFFFFF) > 0x7F800000:
                halves[r, j] = (u >> 16) | 64  # NaN: forced quiet
            else:
                halves[r, j] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest even on the upper half


@njit(parallel=True, cache=True)
def _widen_f16(halves, bits):
    for i in prange(halves.size):
        h = np.uint32(halves[i])
        widened = np.uint32(float32_bits(fp16_widen(halves[i])))
        nan = ((h & 0x7C00) == 0x7C00) & ((h & 0x3FF) != 0)
        bits[i] = ((h & 0x8000) << 16) | 0x7F800000 | ((h & 0x3FF) << 13) if nan else widened


@njit(cache=True)
def decode_f16(halves, out):
    """float16 bit patterns (uint16, 1-D) -> float32 (1-D), exactly, on all cores (numpy's cast uses one): the CPU's
    conversion, vectorized (8.3 G values/s on 2 Zen 4 cores against 4.5 for the branchy fp16_bits_to_fp32 per value;
    a 7B F16 perplexity chunk's tile decoding 8.4 -> 2.4 s), with a NaN's payload moved bit for bit (the conversion
    would quiet a signaling one). Through a uint32 view taken here, outside the parallel function, as decode_bf16
    does."""
    _widen_f16(halves, out.view(np.uint32))


@njit(parallel=True, cache=True)
def _widen_bf16(halves, bits):
    for i in prange(halves.size):
        bits[i] = np.uint32(halves[i]) << np.uint32(16)


@njit(cache=True)
def decode_bf16(halves, out):
    """bfloat16 bit patterns (uint16, 1-D) -> float32 (1-D), on all cores: the 16 bits become the upper half, moved
    as integers so that every pattern, NaN payloads included, comes out as gguf-py's (and ggml's) shift leaves it.
    The float32 -> uint32 view is taken here, outside the parallel function: inside one, numba 0.68.1 loses the
    stores through a view of the same item size (the output stayed all zeros; quantize_f16's uint8 -> uint16 view
    is not affected)."""
    _widen_bf16(halves, out.view(np.uint32))
