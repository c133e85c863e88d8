"""The block-format table: one entry per GGML type qtool writes, and the only module that knows block layouts.

Each entry declares its block size, bytes per block, the row kernel that quantizes it byte-identically to
llama.cpp's ``ggml_quantize_chunk`` (numba, ``quantize/kernels/``), and where its fp16 scales sit so that the
output is validated the way llama-quantize validates it (``ggml_validate_row_data``). Dequantization is
gguf-py's, which matches llama.cpp for every type, or (``decode``) a parallel decoder bit-identical to it.

gguf-py's numpy quantizers are byte-exact too for Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 without an imatrix (and F16/BF16),
but on a 4096x4096 tensor, one thread, they ran at 94-202 MB/s against 450-580 MB/s for the numba kernels
(BF16: 185 against ~3000), and they cannot run in parallel; so the kernels serve every case and gguf-py is a
test reference (``python -m qtool.quantize.kernels.bench --gguf``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from typing import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError

__all__ = ["Format", "FORMATS", "format_for", "quantize", "dequantize", "decode"]

RowKernel = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
NO_IMATRIX = np.empty(0, dtype=np.float32)


@cache
def _load_kernel(module: str, function: str, type_name: str) -> RowKernel:
    try:
        mod = importlib.import_module(f"qtool.quantize.kernels.{module}")
    except ModuleNotFoundError as exc:
        if exc.name != f"qtool.quantize.kernels.{module}":
            raise
        raise QtoolError(f"{type_name} not available: its kernel module quantize/kernels/{module}.py "
                         "is missing from this installation") from None
    return getattr(mod, function)


def _numba_kernel(module: str, function: str) -> Callable[[str], RowKernel]:
    # Imported on first use: importing numba and loading cached kernels is not free, and a format whose
    # kernel module is absent must fail only when someone asks for it.
    return lambda type_name: _load_kernel(module, function, type_name)


def _cannot_write(type_name: str) -> RowKernel:
    raise QtoolError(f"qtool does not write {type_name} tensors")


def _encode_f32(x: np.ndarray, imatrix: np.ndarray, out: np.ndarray) -> None:
    out.view(np.float32)[...] = x


@dataclass(frozen=True)
class Format:
    """One GGML storage type. ``needs_imatrix`` mirrors ggml_quantize_requires_imatrix, which is true only for
    IQ2_XXS/IQ2_XS/IQ1_S. (Q2_K_S's need for an imatrix is a file-type rule of
    llama-quantize, decided per tensor in the mixture, not a property of the Q2_K block format.)"""

    qtype: T
    name: str
    block_size: int
    type_size: int
    needs_imatrix: bool = False
    # False where llama.cpp ignores the imatrix (Q8_0 and the float types): the bytes do not depend on it.
    uses_imatrix: bool = True
    # Byte offsets of the fp16 scale fields inside a block; ggml_validate_row_data rejects inf/NaN there.
    half_offsets: tuple[int, ...] = ()
    # Byte offsets of E8M0 scale bytes (MXFP4); ggml_validate_row_data rejects 0xFF (NaN) there.
    e8m0_offsets: tuple[int, ...] = ()
    # Returns the row kernel (loading it on first use); the default serves decode-only entries.
    load_kernel: Callable[[str], RowKernel] = field(default=_cannot_write, repr=False, compare=False)
    # The parallel decoder (quantize/kernels/decode.py, `kernel(raw, out)`), where there is one; else gguf-py's.
    load_decoder: Callable[[str], Callable] | None = field(default=None, repr=False, compare=False)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def row_bytes(self, n_per_row: int) -> int:
        if n_per_row <= 0 or n_per_row % self.block_size:
            raise QtoolError(f"{self.name} needs rows that are a whole number of {self.block_size}-element "
                             f"blocks; this row has {n_per_row} elements")
        return n_per_row // self.block_size * self.type_size

    def quantize(self, x: np.ndarray, imatrix: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """float32 [..., n] -> uint8 [..., row_bytes], the bytes llama-quantize writes for these rows.

        `out`, a C-contiguous uint8 [rows, row_bytes] array, receives them instead of a new array (the stream
        quantizes straight into its output buffer)."""
        x = np.asarray(x)
        if x.ndim == 0 or not np.issubdtype(x.dtype, np.floating):
            raise QtoolError(f"{self.name}: expected rows of floats, got a {x.dtype} array of shape {x.shape}")
        n = x.shape[-1]
        row_bytes = self.row_bytes(n)
        rows = np.ascontiguousarray(x.reshape(-1, n), dtype=np.float32)
        _refuse_non_finite(rows, "row")
        weights = self._imatrix_for(imatrix, n)
        if out is None:
            out = np.empty((rows.shape[0], row_bytes), dtype=np.uint8)
        elif out.dtype != np.uint8 or out.shape != (rows.shape[0], row_bytes) or not out.flags.c_contiguous:
            raise QtoolError(f"internal: {self.name} output buffer is a {out.dtype} array of shape {out.shape}, "
                             f"expected C-contiguous uint8 {(rows.shape[0], row_bytes)}")
        self.load_kernel(self.name)(rows, weights, out)
        self._validate(out)
        return out.reshape(x.shape[:-1] + (row_bytes,))

    def dequantize(self, raw: np.ndarray, n_per_row: int) -> np.ndarray:
        """uint8 [..., row_bytes] -> float32 [..., n_per_row]."""
        raw = np.asarray(raw)
        row_bytes = self.row_bytes(n_per_row)
        if raw.dtype != np.uint8 or raw.ndim == 0 or raw.shape[-1] != row_bytes:
            raise QtoolError(f"{self.name}: expected uint8 rows of {row_bytes} bytes for {n_per_row} elements, "
                             f"got a {raw.dtype} array of shape {raw.shape}")
        try:
            return np.asarray(gguf.quants.dequantize(raw, self.qtype), dtype=np.float32)
        except NotImplementedError:
            if self.load_decoder is None:
                raise QtoolError(f"cannot decode {self.name} tensors (gguf-py has no decoder for them)") from None
        # gguf-py has no decoder for this type (Q1_0, Q2_0): ours, a port of ggml's dequantize_row_*
        rows = np.ascontiguousarray(raw.reshape(-1, row_bytes))
        out = np.empty((rows.shape[0], n_per_row), np.float32)
        self.load_decoder(self.name)(rows, out)
        return out.reshape(raw.shape[:-1] + (n_per_row,))

    def _imatrix_for(self, imatrix: np.ndarray | None, n: int) -> np.ndarray:
        if imatrix is None:
            if self.needs_imatrix:
                raise QtoolError(f"{self.name} requires an importance matrix (llama.cpp refuses it without one "
                                 "too); make one with `qtool imatrix` and pass it")
            return NO_IMATRIX
        if not self.uses_imatrix:
            return NO_IMATRIX
        weights = np.ascontiguousarray(imatrix, dtype=np.float32)
        if weights.shape != (n,):
            raise QtoolError(f"{self.name}: the importance matrix has shape {weights.shape}, "
                             f"expected one value per column ({n})")
        _refuse_non_finite(weights[None, :], "the importance matrix")
        return weights

    def _validate(self, out: np.ndarray) -> None:
        """llama-quantize aborts when a stored scale (or an F16/BF16 value) is inf/NaN; so do we, naming where."""
        from qtool.quantize.kernels.common import first_all_ones_exponent, first_bad_block_scale

        if self.qtype in (T.F16, T.BF16):
            exponent = 0x7C00 if self.qtype == T.F16 else 0x7F80
            row, col = first_all_ones_exponent(out.view(np.uint16), exponent)
            if row >= 0:
                limit = " (|x| >= 65520)" if self.qtype == T.F16 else ""
                raise QtoolError(f"{self.name}: row {row}, column {col}: a value overflows {self.name}{limit}; "
                                 "llama-quantize rejects this too")
            return
        blocks = out.reshape(out.shape[0], -1, self.type_size)
        for offset in self.e8m0_offsets:
            bad = np.flatnonzero((blocks[:, :, offset] == 0xFF).reshape(-1))
            if bad.size:
                row, block = divmod(int(bad[0]), blocks.shape[1])
                raise QtoolError(f"{self.name}: row {row}, block {block}: the block scale is out of the E8M0 range "
                                 "(largest value in [2**-126, 2**-125)); llama-quantize rejects this too")
        if not self.half_offsets:
            return
        row, block = first_bad_block_scale(blocks, np.array(self.half_offsets, dtype=np.int64))
        if row >= 0:
            raise QtoolError(f"{self.name}: row {row}, block {block}: a block scale overflows fp16 (values too "
                             "large for this type); llama-quantize rejects this too")


def _refuse_non_finite(rows: np.ndarray, what: str) -> None:
    from qtool.quantize.kernels.common import first_non_finite

    row, col = first_non_finite(rows)
    if row >= 0:
        where = f"{what} {row}" if what == "row" else what
        raise QtoolError(f"{where} has a non-finite value ({rows[row, col]} at column {col}); "
                         "llama-quantize refuses such data too")


def _entry(qtype: T, half_offsets: tuple[int, ...], load_kernel, uses_imatrix: bool = True,
           decoder: str | None = None, decoder_module: str = "decode", needs_imatrix: bool = False,
           e8m0_offsets: tuple[int, ...] = ()) -> Format:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return Format(qtype, qtype.name, block_size, type_size, needs_imatrix=needs_imatrix, uses_imatrix=uses_imatrix,
                  half_offsets=half_offsets, e8m0_offsets=e8m0_offsets, load_kernel=load_kernel,
                  load_decoder=_numba_kernel(decoder_module, decoder) if decoder else None)


FORMATS: dict[T, Format] = {f.qtype: f for f in (
    _entry(T.F32, (), lambda name: _encode_f32, uses_imatrix=False),
    _entry(T.F16, (), _numba_kernel("floats", "quantize_f16"), uses_imatrix=False),
    _entry(T.BF16, (), _numba_kernel("floats", "quantize_bf16"), uses_imatrix=False),
    _entry(T.Q8_0, (0,), _numba_kernel("legacy", "quantize_q8_0"), uses_imatrix=False, decoder="decode_q8_0"),
    _entry(T.Q4_0, (0,), _numba_kernel("legacy", "quantize_q4_0"), decoder="decode_q4_0"),
    _entry(T.Q4_1, (0, 2), _numba_kernel("legacy", "quantize_q4_1"), decoder="decode_q4_1"),
    _entry(T.Q5_0, (0,), _numba_kernel("legacy", "quantize_q5_0"), decoder="decode_q5_0"),
    _entry(T.Q5_1, (0, 2), _numba_kernel("legacy", "quantize_q5_1"), decoder="decode_q5_1"),
    _entry(T.Q2_K, (80, 82), _numba_kernel("kquants_low", "quantize_q2_k"), decoder="decode_q2_k"),
    _entry(T.Q3_K, (108,), _numba_kernel("kquants_low", "quantize_q3_k"), decoder="decode_q3_k"),
    _entry(T.Q4_K, (0, 2), _numba_kernel("kquants", "quantize_q4_k"), decoder="decode_q4_k"),
    _entry(T.Q5_K, (0, 2), _numba_kernel("kquants", "quantize_q5_k"), decoder="decode_q5_k"),
    _entry(T.Q6_K, (208,), _numba_kernel("kquants", "quantize_q6_k"), decoder="decode_q6_k"),
    _entry(T.IQ4_NL, (0,), _numba_kernel("iq4", "quantize_iq4_nl"), decoder="decode_iq4_nl"),
    _entry(T.IQ4_XS, (0,), _numba_kernel("iq4", "quantize_iq4_xs"), decoder="decode_iq4_xs"),
    # llama.cpp quantizes these five the same way with or without an importance matrix
    _entry(T.TQ1_0, (52,), _numba_kernel("lowbit", "quantize_tq1_0"), uses_imatrix=False, decoder="decode_tq1_0"),
    _entry(T.TQ2_0, (64,), _numba_kernel("lowbit", "quantize_tq2_0"), uses_imatrix=False, decoder="decode_tq2_0"),
    _entry(T.Q1_0, (0,), _numba_kernel("lowbit", "quantize_q1_0"), uses_imatrix=False, decoder="decode_q1_0"),
    _entry(T.Q2_0, (0,), _numba_kernel("lowbit", "quantize_q2_0"), uses_imatrix=False, decoder="decode_q2_0"),
    # IQ3: the grid-search encoders and their decoders share one module (quantize/kernels/iq3.py)
    _entry(T.IQ3_XXS, (0,), _numba_kernel("iq3", "quantize_iq3_xxs"), decoder="decode_iq3_xxs", decoder_module="iq3"),
    _entry(T.IQ3_S, (0,), _numba_kernel("iq3", "quantize_iq3_s"), decoder="decode_iq3_s", decoder_module="iq3"),
    # IQ2: lattice-grid encoders and their decoders in quantize/kernels/iq2.py; ggml refuses IQ2_XXS/IQ2_XS without
    # an importance matrix, IQ2_S has a fallback weighting
    _entry(T.IQ2_XXS, (0,), _numba_kernel("iq2", "quantize_iq2_xxs"), decoder="decode_iq2_xxs", decoder_module="iq2",
           needs_imatrix=True),
    _entry(T.IQ2_XS, (0,), _numba_kernel("iq2", "quantize_iq2_xs"), decoder="decode_iq2_xs", decoder_module="iq2",
           needs_imatrix=True),
    _entry(T.IQ2_S, (0,), _numba_kernel("iq2", "quantize_iq2_s"), decoder="decode_iq2_s", decoder_module="iq2"),
    # MXFP4: an E8M0 scale byte (validated as e8m0_offsets) and e2m1 codes; ggml ignores the importance matrix
    _entry(T.MXFP4, (), _numba_kernel("mxfp4", "quantize_mxfp4"), uses_imatrix=False, decoder="decode_mxfp4",
           decoder_module="mxfp4", e8m0_offsets=(0,)),
    # IQ1: ternary-grid encoders and decoders in quantize/kernels/iq1.py; ggml refuses IQ1_S without an importance
    # matrix; IQ1_M's d is split over four nibbles (no fixed fp16 offset): its kernel validates it
    _entry(T.IQ1_S, (0,), _numba_kernel("iq1", "quantize_iq1_s"), decoder="decode_iq1_s", decoder_module="iq1",
           needs_imatrix=True),
    _entry(T.IQ1_M, (), _numba_kernel("iq1", "quantize_iq1_m"), decoder="decode_iq1_m", decoder_module="iq1"),
)}


def _parse_type(qtype: T | int | str) -> T:
    try:
        return T[qtype.upper()] if isinstance(qtype, str) else T(qtype)
    except (KeyError, ValueError):
        raise QtoolError(f"unknown GGML type {qtype!r}") from None


def format_for(qtype: T | int | str) -> Format:
    """The table entry for a GGML type (enum, id, or name in any case)."""
    key = _parse_type(qtype)
    if key not in FORMATS:
        known = ", ".join(f.name for f in FORMATS.values())
        raise QtoolError(f"qtool does not write {key.name} tensors (it writes {known})")
    return FORMATS[key]


# What ggml's CPU backend converts a matrix product's activations to before multiplying them by weights of each
# type (its vec_dot_type): F16 weights see F16 activations, Q4_0/Q5_0/Q8_0/Q1_0/Q2_0 (and Q4_1/Q5_1 through Q8_1,
# the same values) 8-bit blocks of 32 with an F16 scale, k-quants, i-quants and TQ1_0/TQ2_0 Q8_K (blocks of 256,
# float scale); F32 none.
_ACTIVATION_KIND = {**dict.fromkeys(("F16",), "f16"), **dict.fromkeys(("BF16",), "bf16"),
                    **dict.fromkeys(("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4", "Q1_0", "Q2_0"), "q8_0"),
                    **dict.fromkeys(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                                     "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_XS", "TQ1_0", "TQ2_0"), "q8_K")}


def activation_kind(qtype: T | int | str) -> str | None:
    """How llama.cpp rounds the activations it multiplies by weights of `qtype` ("f16", "bf16", "q8_0", "q8_K"), or
    None where it keeps them float32."""
    return _ACTIVATION_KIND.get(_parse_type(qtype).name)


def block_size(qtype: T | int | str) -> int:
    """Elements per block of any GGML type (the types qtool only reads too)."""
    return gguf.GGML_QUANT_SIZES[_parse_type(qtype)][0]


def bits_per_weight(qtype: T | int | str) -> float:
    block, nbytes = gguf.GGML_QUANT_SIZES[_parse_type(qtype)]
    return 8.0 * nbytes / block


def quantize(x: np.ndarray, qtype: T | int | str, imatrix: np.ndarray | None = None) -> np.ndarray:
    return format_for(qtype).quantize(x, imatrix)


def decode(raw: np.ndarray, qtype: T | int | str, n_per_row: int, out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows (uint8 [rows, row bytes], or a memory map of them) -> float32 [rows, n_per_row]: the one decoder
    every stage uses. F32 is a view of `raw` (unless `out` is given); F16 and BF16 are widened exactly on all cores
    (BF16 by gguf-py's shift), the types with a `load_decoder` by their parallel decoder (quantize/kernels/decode.py)
    and every other type by gguf-py (`dequantize`), all bit-identical to gguf-py. `out`, float32 [rows, n_per_row],
    receives the result."""
    key = _parse_type(qtype)
    if key not in gguf.GGML_QUANT_SIZES:
        raise QtoolError(f"cannot decode {key.name} tensors")
    block_size, type_size = gguf.GGML_QUANT_SIZES[key]
    rows = raw.size // (n_per_row // block_size * type_size)     # raw: uint8 (or a byte view) of whole rows
    if key == T.F32:
        values = raw.view(np.float32).reshape(rows, n_per_row)
        if out is None:
            return values
        out[...] = values
        return out
    if out is None:
        out = np.empty((rows, n_per_row), np.float32)
    if key == T.F16 and out.flags.c_contiguous:
        from qtool.quantize.kernels.floats import decode_f16
        decode_f16(np.ascontiguousarray(raw).reshape(-1).view(np.uint16), out.reshape(-1))
    elif key == T.F16:
        np.copyto(out, raw.view(np.float16).reshape(rows, n_per_row))
    elif key == T.BF16 and out.flags.c_contiguous:
        from qtool.quantize.kernels.floats import decode_bf16
        decode_bf16(np.ascontiguousarray(raw).reshape(-1).view(np.uint16), out.reshape(-1))
    elif key == T.BF16:
        out.view(np.uint32)[...] = raw.view(np.uint16).reshape(rows, n_per_row).astype(np.uint32) << 16
    elif key in FORMATS and FORMATS[key].load_decoder is not None and out.flags.c_contiguous:
        FORMATS[key].load_decoder(key.name)(np.ascontiguousarray(raw).reshape(rows, -1), out)
    else:
        out[...] = dequantize(raw.reshape(rows, -1), key, n_per_row)
    return out


def dequantize(raw: np.ndarray, qtype: T | int | str, n_per_row: int) -> np.ndarray:
    """Any type gguf-py can decode, not only those qtool writes: evaluation reads GGUFs from anywhere."""
    key = _parse_type(qtype)
    if key in FORMATS:
        return FORMATS[key].dequantize(raw, n_per_row)
    if key not in gguf.GGML_QUANT_SIZES:
        raise QtoolError(f"cannot decode {key.name} tensors")
    block_size, type_size = gguf.GGML_QUANT_SIZES[key]
    return Format(key, key.name, block_size, type_size).dequantize(raw, n_per_row)
