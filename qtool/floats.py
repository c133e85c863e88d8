"""bfloat16 rounding, once: float32 -> bfloat16 as ggml's `ggml_compute_fp32_to_bf16` does it (round to nearest
even on the upper half; a NaN stays a NaN, made quiet, sign and top payload bits kept). Used by export-hf (bf16
safetensors) and by the evaluation's activation rounding for BF16 weights; the quantizer's numba kernel
(`quantize/kernels/floats.quantize_bf16`) is tested against it bit for bit."""
from __future__ import annotations

import numpy as np


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(64), rounded)
    return rounded.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_bf16(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """x rounded to the nearest bfloat16, as float32 values (into out)."""
    out.view(np.uint32)[...] = f32_to_bf16_bits(x).astype(np.uint32).reshape(x.shape) << np.uint32(16)
    return out
