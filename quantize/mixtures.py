"""File type (Q4_K_M, …) → the type of every tensor, exactly as llama-quantize chooses it.

Source of the rules: llama.cpp `src/llama-quant.cpp` (`tensor_allows_quantization`, `llama_tensor_get_type`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`), summarised in docs/reference/quantization.md §4. The decisions depend on
the order tensors are visited (attn_v and ffn_* counters), so the unit of work is the whole tensor list:
`choose_tensor_types` sorts it the way llama.cpp's loader does and walks it once.

Unlike llama-quantize, every choice carries its reason, and a forced change of type (a row length that is not a
multiple of the block size) is recorded as a fallback so it can be reported.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.model_file import HParams
from qtool.quantize.formats import FORMATS, block_size

FLOAT_TYPES = (T.F32, T.F16, T.BF16)


class FileType(enum.IntEnum):
    """llama.cpp's `llama_ftype` values for the file types qtool writes (the number in general.file_type)."""

    F32 = 0          # LLAMA_FTYPE_ALL_F32
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 7
    Q5_0 = 8
    Q5_1 = 9
    Q2_K = 10
    Q3_K_S = 11
    Q3_K_M = 12
    Q3_K_L = 13
    Q4_K_S = 14
    Q4_K_M = 15
    Q5_K_S = 16
    Q5_K_M = 17
    Q6_K = 18
    IQ2_XXS = 19
    IQ2_XS = 20
    Q2_K_S = 21
    IQ3_XS = 22
    IQ3_XXS = 23
    IQ1_S = 24
    IQ4_NL = 25
    IQ3_S = 26
    IQ3_M = 27
    IQ2_S = 28
    IQ2_M = 29
    IQ4_XS = 30
    IQ1_M = 31
    BF16 = 32
    TQ1_0 = 36
    TQ2_0 = 37
    MXFP4_MOE = 38
    Q1_0 = 40
    Q2_0 = 41
    # llama-quantize's COPY copies every tensor unchanged; it sits in ALL_F32's slot (ftype 0) of its table and writes
    # the input's general.file_type. Not a llama_ftype: its value here only keeps it apart from F32.
    COPY = -1

    @property
    def default_type(self) -> T:
        """`llama_ftype_get_default_type`: the tensor type the rules start from."""
        return _DEFAULT_TYPE[self]

    @property
    def display_name(self) -> str:
        """`llama_ftype_name`: how llama.cpp prints this file type."""
        return _DISPLAY_NAME[self]

    @property
    def description(self) -> str:
        """llama-quantize's description (QUANT_OPTIONS), without its leading padding."""
        return _DESCRIPTION[self].strip()

    @property
    def is_quantized(self) -> bool:
        return self.default_type not in FLOAT_TYPES

    @property
    def llama_ftype(self) -> int | None:
        """The number llama-quantize prints for this file type; None for COPY (it prints none)."""
        return None if self == FileType.COPY else int(self)


_DEFAULT_TYPE = {
    FileType.F32: T.F32, FileType.F16: T.F16, FileType.BF16: T.BF16,
    FileType.Q4_0: T.Q4_0, FileType.Q4_1: T.Q4_1, FileType.Q5_0: T.Q5_0, FileType.Q5_1: T.Q5_1,
    FileType.Q8_0: T.Q8_0,
    FileType.Q2_K: T.Q2_K, FileType.Q2_K_S: T.Q2_K,
    FileType.Q3_K_S: T.Q3_K, FileType.Q3_K_M: T.Q3_K, FileType.Q3_K_L: T.Q3_K,
    FileType.Q4_K_S: T.Q4_K, FileType.Q4_K_M: T.Q4_K,
    FileType.Q5_K_S: T.Q5_K, FileType.Q5_K_M: T.Q5_K,
    FileType.Q6_K: T.Q6_K, FileType.IQ4_NL: T.IQ4_NL, FileType.IQ4_XS: T.IQ4_XS,
    FileType.TQ1_0: T.TQ1_0, FileType.TQ2_0: T.TQ2_0, FileType.Q1_0: T.Q1_0, FileType.Q2_0: T.Q2_0,
    FileType.MXFP4_MOE: T.MXFP4,
    FileType.IQ2_XXS: T.IQ2_XXS, FileType.IQ2_XS: T.IQ2_XS, FileType.IQ2_S: T.IQ2_XS, FileType.IQ2_M: T.IQ2_S,
    FileType.IQ3_XXS: T.IQ3_XXS, FileType.IQ3_XS: T.IQ3_S, FileType.IQ3_S: T.IQ3_S, FileType.IQ3_M: T.IQ3_S,
    FileType.IQ1_S: T.IQ1_S, FileType.IQ1_M: T.IQ1_M,
    FileType.COPY: T.F32,       # ALL_F32's slot; no tensor takes it (every tensor keeps its type)
}

_DISPLAY_NAME = {
    FileType.F32: "all F32", FileType.F16: "F16", FileType.BF16: "BF16",
    FileType.Q4_0: "Q4_0", FileType.Q4_1: "Q4_1", FileType.Q5_0: "Q5_0", FileType.Q5_1: "Q5_1",
    FileType.Q8_0: "Q8_0", FileType.Q2_K: "Q2_K - Medium", FileType.Q2_K_S: "Q2_K - Small",
    FileType.Q3_K_S: "Q3_K - Small", FileType.Q3_K_M: "Q3_K - Medium", FileType.Q3_K_L: "Q3_K - Large",
    FileType.Q4_K_S: "Q4_K - Small", FileType.Q4_K_M: "Q4_K - Medium",
    FileType.Q5_K_S: "Q5_K - Small", FileType.Q5_K_M: "Q5_K - Medium", FileType.Q6_K: "Q6_K",
    FileType.IQ4_NL: "IQ4_NL - 4.5 bpw", FileType.IQ4_XS: "IQ4_XS - 4.25 bpw",
    FileType.TQ1_0: "TQ1_0 - 1.69 bpw ternary", FileType.TQ2_0: "TQ2_0 - 2.06 bpw ternary", FileType.Q1_0: "Q1_0",
    FileType.Q2_0: "Q2_0",
    FileType.IQ2_XXS: "IQ2_XXS - 2.0625 bpw", FileType.IQ2_XS: "IQ2_XS - 2.3125 bpw", FileType.IQ2_S: "IQ2_S - 2.5 bpw",
    FileType.IQ2_M: "IQ2_M - 2.7 bpw", FileType.IQ3_XS: "IQ3_XS - 3.3 bpw", FileType.IQ3_XXS: "IQ3_XXS - 3.0625 bpw",
    FileType.IQ1_S: "IQ1_S - 1.5625 bpw", FileType.IQ1_M: "IQ1_M - 1.75 bpw", FileType.IQ3_S: "IQ3_S - 3.4375 bpw",
    FileType.IQ3_M: "IQ3_S mix - 3.66 bpw", FileType.MXFP4_MOE: "MXFP4 MoE",
    FileType.COPY: "tensors copied unchanged",
}

# QUANT_OPTIONS of tools/quantize/quantize.cpp, verbatim, in its order (the order `--list` prints).
_DESCRIPTION = {
    FileType.Q1_0: " 1.125 bpw quantization",
    FileType.Q2_0: " 2.25 bpw quantization (group 64)",
    FileType.Q4_0: " 4.34G, +0.4685 ppl @ Llama-3-8B",
    FileType.Q4_1: " 4.78G, +0.4511 ppl @ Llama-3-8B",
    FileType.MXFP4_MOE: " MXFP4 MoE",
    FileType.Q5_0: " 5.21G, +0.1316 ppl @ Llama-3-8B",
    FileType.Q5_1: " 5.65G, +0.1062 ppl @ Llama-3-8B",
    FileType.IQ2_XXS: " 2.06 bpw quantization",
    FileType.IQ2_XS: " 2.31 bpw quantization",
    FileType.IQ2_S: " 2.5  bpw quantization",
    FileType.IQ2_M: " 2.7  bpw quantization",
    FileType.IQ1_S: " 1.56 bpw quantization",
    FileType.IQ1_M: " 1.75 bpw quantization",
    FileType.TQ1_0: " 1.69 bpw ternarization",
    FileType.TQ2_0: " 2.06 bpw ternarization",
    FileType.Q2_K: " 2.96G, +3.5199 ppl @ Llama-3-8B",
    FileType.Q2_K_S: " 2.96G, +3.1836 ppl @ Llama-3-8B",
    FileType.IQ3_XXS: " 3.06 bpw quantization",
    FileType.IQ3_S: " 3.44 bpw quantization",
    FileType.IQ3_M: " 3.66 bpw quantization mix",
    FileType.IQ3_XS: " 3.3 bpw quantization",
    FileType.Q3_K_S: " 3.41G, +1.6321 ppl @ Llama-3-8B",
    FileType.Q3_K_M: " 3.74G, +0.6569 ppl @ Llama-3-8B",
    FileType.Q3_K_L: " 4.03G, +0.5562 ppl @ Llama-3-8B",
    FileType.IQ4_NL: " 4.50 bpw non-linear quantization",
    FileType.IQ4_XS: " 4.25 bpw non-linear quantization",
    FileType.Q4_K_S: " 4.37G, +0.2689 ppl @ Llama-3-8B",
    FileType.Q4_K_M: " 4.58G, +0.1754 ppl @ Llama-3-8B",
    FileType.Q5_K_S: " 5.21G, +0.1049 ppl @ Llama-3-8B",
    FileType.Q5_K_M: " 5.33G, +0.0569 ppl @ Llama-3-8B",
    FileType.Q6_K: " 6.14G, +0.0217 ppl @ Llama-3-8B",
    FileType.Q8_0: " 7.96G, +0.0026 ppl @ Llama-3-8B",
    FileType.F16: "14.00G, +0.0020 ppl @ Mistral-7B",
    FileType.BF16: "14.00G, -0.0050 ppl @ Mistral-7B",
    FileType.F32: "26.00G              @ 7B",
    FileType.COPY: "only copy tensors, no quantizing",
}

# llama_model_loader's guess of a file's ftype from its most common tensor type (`general.file_type` absent), by
# llama_ftype number: also types qtool does not write, since COPY passes any file through.
_GUESSED_FTYPE = {T.F32: 0, T.F16: 1, T.BF16: 32, T.Q4_0: 2, T.Q4_1: 3, T.Q5_0: 8, T.Q5_1: 9, T.Q8_0: 7, T.Q2_K: 10,
                  T.Q3_K: 12, T.Q4_K: 15, T.Q5_K: 17, T.Q6_K: 18, T.TQ1_0: 36, T.TQ2_0: 37, T.IQ2_XXS: 19,
                  T.IQ2_XS: 20, T.IQ2_S: 28, T.IQ3_XXS: 23, T.IQ1_S: 24, T.IQ1_M: 31, T.IQ4_NL: 25, T.IQ4_XS: 30,
                  T.IQ3_S: 26, T.NVFP4: 39, T.Q1_0: 40, T.Q2_0: 41}
LLAMA_FTYPE_GUESSED = 1024


def guessed_file_type(types: Sequence[T]) -> int:
    """The ftype llama.cpp's loader gives a file without `general.file_type`: that of the type held by most tensors
    (`types` in llama_tensor_order; on a tie, the type that reached the count first), an unknown type counting as
    ALL_F32, with the GUESSED flag (1024) set — what llama-quantize COPY writes for such a file."""
    counts: dict[T, int] = {}
    top, top_type = 0, T.F32
    for qtype in types:
        counts[qtype] = counts.get(qtype, 0) + 1
        if counts[qtype] > top:
            top, top_type = counts[qtype], qtype
    return _GUESSED_FTYPE.get(top_type, 0) | LLAMA_FTYPE_GUESSED


# llama-quantize accepts these short names as the K-quant "medium" mixtures.
_ALIASES = {"Q3_K": FileType.Q3_K_M, "Q4_K": FileType.Q4_K_M, "Q5_K": FileType.Q5_K_M}

# Tensor types qtool can write (a file type's rules, an override or a fallback may name any of them): the format
# table's entries.
WRITABLE_TYPES = tuple(FORMATS)


def list_file_types() -> list[tuple[str, FileType]]:
    """Every accepted file type name with its FileType, in llama-quantize's QUANT_OPTIONS order (aliases included)."""
    order = ["Q1_0", "Q2_0", "Q4_0", "Q4_1", "MXFP4_MOE", "Q5_0", "Q5_1", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M",
             "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "Q2_K", "Q2_K_S", "IQ3_XXS", "IQ3_S", "IQ3_M", "Q3_K", "IQ3_XS",
             "Q3_K_S", "Q3_K_M", "Q3_K_L", "IQ4_NL", "IQ4_XS", "Q4_K", "Q4_K_S", "Q4_K_M", "Q5_K", "Q5_K_S", "Q5_K_M", "Q6_K",
             "Q8_0", "F16", "BF16", "F32", "COPY"]
    return [(name, _ALIASES.get(name) or FileType[name]) for name in order if is_writable(_ALIASES.get(name) or FileType[name])]


def is_writable(ftype: FileType) -> bool:
    """Whether qtool has every block format the file type's rules can choose (the i-quant grids arrive type by type:
    a file type with one missing is planned by --dry-run but not written)."""
    if ftype == FileType.COPY:
        return True
    return all(t in FORMATS for t in (ftype.default_type, *_ALSO_CHOSEN.get(ftype, ())))


# Block types a file type's rules choose besides its default, the K-quants and the fallbacks (all of which exist).
_ALSO_CHOSEN = {FileType.IQ2_S: (T.IQ3_S,), FileType.IQ2_M: (T.IQ3_S,), FileType.IQ3_XXS: (T.IQ3_S, T.IQ2_S),
                FileType.IQ3_XS: (T.IQ3_XXS,), FileType.IQ1_S: (T.IQ2_XXS,), FileType.IQ1_M: (T.IQ2_XXS,)}


def parse_file_type(text: str) -> FileType:
    """A file type by name (case-insensitive, llama-quantize's aliases Q3_K/Q4_K/Q5_K included) or ftype number."""
    key = str(text).strip().upper()
    if key in _ALIASES:
        return _ALIASES[key]
    if key in FileType.__members__:
        return FileType[key]
    if key.isdigit() and int(key) in FileType._value2member_map_:
        return FileType(int(key))       # 0 is F32: COPY is chosen by name only, as in llama-quantize
    names = ", ".join(name for name, _ in list_file_types())
    raise QtoolError(f"unknown or unsupported file type {text!r}; qtool writes: {names}")


def parse_tensor_type(text: str) -> T:
    """A ggml tensor type name as llama-quantize's --tensor-type/--output-tensor-type take it (case-insensitive)."""
    key = str(text).strip().upper()
    qtype = T.__members__.get(key)
    if qtype is None:
        raise QtoolError(f"unknown tensor type {text!r}; use one of: "
                         + ", ".join(t.name.lower() for t in WRITABLE_TYPES))
    if qtype not in WRITABLE_TYPES:
        raise QtoolError(f"qtool cannot write tensor type {qtype.name}; use one of: "
                         + ", ".join(t.name.lower() for t in WRITABLE_TYPES))
    return qtype




# --- the model facts the rules read --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """What llama-quant's rules know about a model besides its tensor names."""

    arch: str
    n_layer: int
    n_head: int = 0        # of layer 0
    n_head_kv: int = 0     # of layer 0
    n_expert: int = 0

    @property
    def gqa(self) -> int:
        """`llama_hparams::n_gqa()`: integer division, 0 when there are no KV heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp's LLM_TYPE_70B, which earns attn_v an extra bump; set per architecture by layer count."""
        if self.arch == "llama":
            return self.n_expert != 8 and self.n_layer == 80 and self.n_head != self.n_head_kv
        if self.arch in ("qwen2", "deci", "olmo"):
            return self.n_layer == 80
        if self.arch == "jais2":
            return self.n_layer == 68
        return False

    @property
    def is_falcon(self) -> bool:
        return self.arch == "falcon"

    @classmethod
    def from_metadata(cls, kv: dict) -> "ModelInfo":
        """From GGUF key/values (plain values, as `GGUFModel.values()` gives them). Per-layer arrays: layer 0's
        value, as llama.cpp's rules read them."""
        h = HParams.from_kv(kv)
        n_head = h.n_head or 0
        # llama.cpp's loader defaults the KV head count to the head count
        n_head_kv = h.n_head_kv if h.n_head_kv is not None else n_head
        return cls(h.arch, h.need("n_layer"), n_head, n_head_kv, h.n_expert or 0)


# --- options and results -------------------------------------------------------------------------------------


@dataclass
class TensorTypeOverride:
    """One `--tensor-type PATTERN=TYPE`: the pattern is lower-cased and searched, as llama-quantize does."""

    pattern: str
    qtype: T
    regex: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pattern = self.pattern.lower()
        try:
            self.regex = re.compile(self.pattern)
        except re.error as e:
            raise QtoolError(f"--tensor-type pattern {self.pattern!r} is not a valid regular expression: {e}") from None

    @classmethod
    def parse(cls, text: str) -> "TensorTypeOverride":
        pattern, sep, type_name = str(text).partition("=")
        if not sep or not pattern:
            raise QtoolError(f"--tensor-type {text!r}: use PATTERN=TYPE, e.g. attn_v=q8_0")
        if not type_name:
            raise QtoolError(f"--tensor-type {text!r}: missing tensor type after '='")
        return cls(pattern, parse_tensor_type(type_name))


@dataclass
class MixtureOptions:
    output_tensor_type: T | None = None
    token_embedding_type: T | None = None
    tensor_types: Sequence[TensorTypeOverride] = ()
    pure: bool = False
    leave_output_tensor: bool = False
    has_imatrix: bool = False      # changes the Q4_0/Q5_0/IQ4 ffn_down rules


@dataclass
class TensorChoice:
    name: str
    shape: tuple[int, ...]          # numpy order (rows first; the row length is shape[-1])
    source_type: T
    target_type: T
    reason: str                     # why target_type (a rule, an override, or why it is kept as is)
    quantizable: bool               # False: llama-quantize never changes this tensor's type
    wanted_type: T | None = None    # set when the shape forced a different type than the rules wanted
    fallback: str | None = None     # why, in words
    requires_imatrix: bool = False

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n


# --- tensor order and categories ------------------------------------------------------------------------------

_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")


def layer_of(name: str) -> int:
    """`sscanf(name, "blk.%d.")`, -1 when the name is not a block tensor."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def layer_spans(items: Sequence[tuple[int, Any]]) -> list[tuple[int, int, Any]]:
    """(layer, value) pairs in order -> (first layer, last layer, value) runs of consecutive layers with one value:
    how a per-layer list is printed compactly (`0-2 Q5_0 · 3-29 Q4_0`, `blk.[0-29].attn_q.weight`)."""
    spans: list[list] = []
    for layer, value in items:
        if spans and spans[-1][2] == value and spans[-1][1] == layer - 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer, value])
    return [tuple(s) for s in spans]


def llama_tensor_order(names: Sequence[str]) -> list[str]:
    """llama.cpp's `weight_name_comparer`: layer number first (-1 for non-block tensors), then the name's bytes.

    This is the order llama-quantize writes and the order its layer counters advance in.
    """
    return sorted(names, key=lambda n: (layer_of(n), n.encode()))


class Category(enum.Enum):
    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_KV_B = "attn_kv_b"
    ATTENTION_V = "attn_v"
    ATTENTION_K = "attn_k"
    ATTENTION_Q = "attn_q"
    ATTENTION_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


def category_of(name: str) -> Category:
    if name == "output.weight":
        return Category.OUTPUT
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return Category.TOKEN_EMBD
    for needle, cat in (("attn_qkv.weight", Category.ATTENTION_QKV), ("attn_kv_b.weight", Category.ATTENTION_KV_B),
                        ("attn_v.weight", Category.ATTENTION_V), ("attn_k.weight", Category.ATTENTION_K),
                        ("attn_q.weight", Category.ATTENTION_Q), ("attn_output.weight", Category.ATTENTION_OUTPUT),
                        ("ffn_up", Category.FFN_UP), ("ffn_gate", Category.FFN_GATE), ("ffn_down", Category.FFN_DOWN)):
        if needle in name:
            return cat
    return Category.OTHER


_ATTN_V_LIKE = (Category.ATTENTION_V, Category.ATTENTION_QKV, Category.ATTENTION_KV_B)

# Substrings that keep a tensor in its source type (`tensor_allows_quantization`); small or precision-critical.
_NEVER_QUANTIZED = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight", "time_mix_a1.weight",
    "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml counts dimensions up to the last one larger than 1 (ggml order is numpy order reversed)."""
    ne = list(reversed([int(d) for d in shape]))
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def why_not_quantized(name: str, shape: Sequence[int], options: MixtureOptions) -> str | None:
    """None when llama-quantize may change this tensor's type, else the reason it is kept."""
    if ggml_n_dims(shape) < 2:
        return "1-D"
    if not name.endswith("weight"):
        return "not a weight"
    if name == "output.weight" and options.leave_output_tensor:
        return "--leave-output-tensor"
    if name in ("position_embd.weight", "token_types.weight"):
        return "position/type embedding"
    for needle in _NEVER_QUANTIZED:
        if needle in name:
            return "norm" if needle == "_norm.weight" else f"never quantized ({needle.strip('.')})"
    return None


def use_more_bits(i: int, n: int) -> bool:
    """The layers llama.cpp gives more bits: the first and last eighth, and every third one in between."""
    return i < n // 8 or i >= 7 * n // 8 or _c_mod(i - n // 8, 3) == 2


def _c_mod(a: int, b: int) -> int:
    """C's % (truncating), which differs from Python's for negative a."""
    r = abs(a) % b
    return -r if a < 0 else r


# --- the rules ------------------------------------------------------------------------------------------------


class _Rules:
    """`llama_tensor_get_type_impl` and the state it advances (one instance per walk over the tensors)."""

    def __init__(self, ftype: FileType, model: ModelInfo, options: MixtureOptions, names: Sequence[str]):
        self.ftype, self.model, self.options = ftype, model, options
        categories = [category_of(n) for n in names]
        self.n_attention_wv = sum(c in _ATTN_V_LIKE for c in categories)
        self.has_tied_embeddings = Category.OUTPUT not in categories
        self.n_layer = model.n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0
        self.output_fallback: tuple[T, str] | None = None    # set by `choose` when the output rule hit the shape

    def _layer(self, counter: int, name: str) -> tuple[int, int]:
        if self.model.n_expert > 1:
            # expert tensors of one layer need not be adjacent, so the layer comes from the name
            i = layer_of(name)
            if not name.startswith("blk."):
                raise QtoolError(f"cannot determine the layer of tensor {name}")
            if not 0 <= i < self.n_layer:
                raise QtoolError(f"bad layer {i} for tensor {name}: must be in [0, {self.n_layer})")
            return i, self.n_layer
        return counter, self.n_layer

    def choose(self, name: str, shape: tuple[int, ...], category: Category, new_type: T) -> tuple[T, str]:
        F, m, o = FileType, self.model, self.options
        ft = self.ftype
        row_length = shape[-1]
        if category == Category.OUTPUT or (self.has_tied_embeddings and category == Category.TOKEN_EMBD):
            tied = " (tied to token_embd)" if category == Category.TOKEN_EMBD else ""
            if o.output_tensor_type is not None:
                return o.output_tensor_type, f"--output-tensor-type{tied}"
            if ft == F.MXFP4_MOE:
                return T.Q8_0, f"output{tied} of an MXFP4_MOE file"
            if m.is_falcon:
                return T.Q8_0, "output of a Falcon model"
            if row_length % block_size(new_type) != 0:
                # llama-quantize does not count this as a fallback, but it is one: Q6_K does not fit the row
                wanted = T.Q8_0 if new_type == T.Q8_0 else T.Q6_K
                self.output_fallback = (wanted, f"row length {row_length} is not a multiple of "
                                                f"{block_size(new_type)} ({new_type.name}): the output rule "
                                                f"takes Q8_0")
                return T.Q8_0, f"output{tied}"
            if ft in _IQ_LOW or ft == F.IQ3_XXS:
                return T.Q5_K, f"output{tied} of an {ft.name} file → Q5_K"
            if new_type != T.Q8_0:
                return T.Q6_K, f"output{tied} → Q6_K"
            return new_type, f"output{tied}"
        if ft == F.MXFP4_MOE:
            # ne[2] > 1: a stack of experts (bailingmoe3's 3-D MLA projections are not experts)
            stacked = len(shape) >= 3 and shape[-3] > 1
            if stacked and (m.arch != "bailingmoe3" or category in (Category.FFN_UP, Category.FFN_GATE,
                                                                      Category.FFN_DOWN)):
                return T.MXFP4, "expert tensor of an MXFP4_MOE file"
            return T.Q8_0, "not an expert tensor: MXFP4_MOE → Q8_0"
        if category == Category.TOKEN_EMBD:
            if o.token_embedding_type is not None:
                return o.token_embedding_type, "--token-embedding-type"
            bumped = _TOKEN_EMBD_OF.get(ft)
            if bumped is not None:
                return bumped, f"token_embd of a {ft.name} file → {bumped.name}"
            return new_type, "file type default"
        if ft in _IQ_LOW:
            return self._choose_iq_low(name, category, new_type)
        if category in _ATTN_V_LIKE:
            i, n = self.i_attention_wv, self.n_attention_wv
            reason = "file type default"
            if ft == F.Q2_K:
                new_type, reason = (T.Q4_K, "attn_v, GQA ≥ 4") if m.gqa >= 4 else (T.Q3_K, "attn_v")
            elif ft == F.Q2_K_S and m.gqa >= 4:
                new_type, reason = T.Q4_K, "attn_v, GQA ≥ 4"
            elif ft == F.IQ3_XXS:
                new_type, reason = ((T.Q4_K, "attn_v, GQA ≥ 4") if m.gqa >= 4 else
                                    (T.IQ3_S, "attn_v, no imatrix") if not o.has_imatrix else (T.IQ3_XXS, "attn_v"))
            elif ft in (F.IQ3_XS, F.IQ3_S) and m.gqa >= 4:
                new_type, reason = T.Q4_K, "attn_v, GQA ≥ 4"
            elif ft == F.IQ3_M:
                new_type, reason = T.Q4_K, "attn_v"
            elif ft == F.Q3_K_M:
                new_type, reason = (T.Q5_K, f"attn_v, first two ({i})") if i < 2 else (T.Q4_K, "attn_v")
            elif ft == F.Q3_K_L:
                new_type, reason = T.Q5_K, "attn_v"
            elif ft in (F.IQ4_NL, F.IQ4_XS) and m.gqa >= 4:
                new_type, reason = T.Q5_K, "attn_v, GQA ≥ 4"
            elif ft in (F.Q4_K_M, F.Q5_K_M) and use_more_bits(i, n):
                new_type, reason = T.Q6_K, f"attn_v, more bits for layer {i}/{n}"
            elif ft == F.Q4_K_S and i < 4:
                new_type, reason = T.Q5_K, f"attn_v, first four ({i})"
            if m.is_70b and new_type in (T.Q3_K, T.Q4_K):
                new_type, reason = T.Q5_K, "attn_v of a 70B model"
            if m.n_expert == 8:
                new_type, reason = T.Q8_0, "attn_v of an 8-expert model"
            self.i_attention_wv += 1
            return new_type, reason
        if category == Category.ATTENTION_K and m.n_expert == 8:
            return T.Q8_0, "attn_k of an 8-expert model"
        if category in (Category.ATTENTION_K, Category.ATTENTION_Q):
            if ft == F.IQ3_XS:
                return T.IQ3_XXS, f"{category.value} of an IQ3_XS file"
            if ft == F.IQ3_XXS:
                return T.IQ2_S, f"{category.value} of an IQ3_XXS file"
            return new_type, "file type default"
        if category == Category.FFN_DOWN:
            i, n = self._layer(self.i_ffn_down, name)
            self.i_ffn_down += 1
            if ft == F.Q2_K:
                return T.Q3_K, "ffn_down"
            if ft == F.Q2_K_S:
                return (T.Q4_K, f"ffn_down, first eighth ({i}/{n})") if i < n // 8 else (new_type, "file type default")
            if ft == F.IQ3_XXS and not o.has_imatrix:
                return (T.Q4_K, f"ffn_down, first eighth ({i}/{n}), no imatrix") if i < n // 8 \
                    else (T.Q3_K, "ffn_down, no imatrix")
            if ft == F.Q3_K_M:
                if i < n // 16:
                    return T.Q5_K, f"ffn_down, first sixteenth ({i}/{n})"
                if not m.is_falcon or use_more_bits(i, n):
                    return T.Q4_K, "ffn_down"
                return T.Q3_K, "ffn_down (Falcon)"
            if ft == F.IQ3_M and (i < n // 8 or (m.n_expert == 8 and use_more_bits(i, n))):
                return T.Q4_K, f"ffn_down, first eighth or more bits ({i}/{n})"
            if ft == F.Q3_K_L:
                return (T.Q4_K, "ffn_down (Falcon)") if m.is_falcon else (T.Q5_K, "ffn_down")
            if ft == F.Q4_K_M:
                if m.is_falcon:
                    if i < n // 16:
                        return T.Q6_K, f"ffn_down, first sixteenth ({i}/{n})"
                    return (T.Q5_K, f"ffn_down, more bits for layer {i}/{n}") if use_more_bits(i, n) \
                        else (T.Q4_K, "file type default")
                if use_more_bits(i, n):
                    return T.Q6_K, f"ffn_down, more bits for layer {i}/{n}"
                return new_type, "file type default"
            if ft in (F.IQ4_NL, F.IQ4_XS) and i < n // 8 and not o.has_imatrix:
                return T.Q5_K, f"ffn_down, first eighth ({i}/{n}), no imatrix"
            if ft == F.Q5_K_M and use_more_bits(i, n):
                return T.Q6_K, f"ffn_down, more bits for layer {i}/{n}"
            if ft == F.Q4_K_S and not m.is_falcon and i < n // 8:
                return T.Q5_K, f"ffn_down, first eighth ({i}/{n})"
            if ft in (F.Q4_0, F.Q5_0) and o.has_imatrix and i < n // 8:
                return ((T.Q4_1 if ft == F.Q4_0 else T.Q5_1),
                        f"ffn_down, first eighth ({i}/{n}), with imatrix")
            return new_type, "file type default"
        if category == Category.ATTENTION_OUTPUT:
            if not m.is_falcon:
                if m.n_expert == 8:
                    if ft in (F.Q2_K, F.IQ3_XS, F.IQ3_XXS, F.Q3_K_S, F.Q3_K_M, F.IQ4_NL, F.Q4_K_S, F.Q4_K_M, F.IQ3_S,
                              F.IQ3_M, F.IQ4_XS):
                        return T.Q5_K, "attn_output of an 8-expert model"
                else:
                    bumped = {F.Q2_K: T.Q3_K, F.IQ3_XXS: T.IQ3_S, F.Q3_K_M: T.Q4_K, F.Q3_K_L: T.Q5_K,
                              F.IQ3_M: T.Q4_K}.get(ft)
                    if bumped is not None:
                        return bumped, "attn_output"
            elif ft == F.Q3_K_L:
                return T.Q4_K, "attn_output (Falcon)"
            return new_type, "file type default"
        if category in (Category.FFN_GATE, Category.FFN_UP):
            if category == Category.FFN_GATE:
                i, n = self._layer(self.i_ffn_gate, name)
                self.i_ffn_gate += 1
            else:
                i, n = self._layer(self.i_ffn_up, name)
                self.i_ffn_up += 1
            if ft == F.IQ3_XS and n // 8 <= i < 7 * n // 8:
                return T.IQ3_XXS, f"{category.value}, middle layers ({i}/{n})"
        # (the separate attn_qkv branch of llama-quant.cpp is unreachable: attn_qkv is attn_v-like above)
        return new_type, "file type default"

    def _choose_iq_low(self, name: str, category: Category, new_type: T) -> tuple[T, str]:
        """The 1- and 2-bit i-quant file types' own branch: attn_v, ffn_down's first eighth and attn_output get
        more bits; nothing else changes (and the ffn_gate/ffn_up counters do not move)."""
        F, m, ft = FileType, self.model, self.ftype
        more = T.IQ3_S if ft in (F.IQ2_S, F.IQ2_M) else T.Q2_K
        if category in _ATTN_V_LIKE:
            self.i_attention_wv += 1
            if m.gqa >= 4 or m.n_expert >= 4:
                return T.Q4_K, "attn_v, GQA ≥ 4 or ≥ 4 experts"
            return more, "attn_v"
        if category == Category.ATTENTION_K and m.n_expert == 8:
            return T.Q4_K, "attn_k of an 8-expert model"
        if category == Category.FFN_DOWN:
            i = self.i_ffn_down            # the counter, not the layer, even with experts (as llama-quant.cpp)
            self.i_ffn_down += 1
            if i < self.n_layer // 8:
                return more, f"ffn_down, first eighth ({i}/{self.n_layer})"
            return new_type, "file type default"
        if category == Category.ATTENTION_OUTPUT:
            if m.n_expert == 8:
                return T.Q5_K, "attn_output of an 8-expert model"
            if ft in (F.IQ1_S, F.IQ1_M):
                return T.IQ2_XXS, "attn_output"
            if ft in (F.IQ2_S, F.IQ2_M):
                return T.IQ3_S, "attn_output"
        return new_type, "file type default"


# the file types of llama-quant.cpp's branch for 1- and 2-bit i-quants
_IQ_LOW = (FileType.IQ2_XXS, FileType.IQ2_XS, FileType.IQ1_S, FileType.IQ2_S, FileType.IQ2_M, FileType.IQ1_M)
# token_embd of these file types (not tied to the output) takes another type
_TOKEN_EMBD_OF = {**dict.fromkeys((FileType.IQ2_XXS, FileType.IQ2_XS, FileType.IQ1_S, FileType.IQ1_M), T.Q2_K),
                  **dict.fromkeys((FileType.IQ2_S, FileType.IQ2_M, FileType.IQ3_XXS), T.IQ3_S),
                  **dict.fromkeys((FileType.TQ1_0, FileType.TQ2_0, FileType.Q2_0), T.Q4_K)}


_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0,
             T.IQ4_XS: T.IQ4_NL, T.TQ1_0: T.Q4_0, T.TQ2_0: T.Q4_0, T.Q2_0: T.Q4_0,
             **dict.fromkeys((T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S), T.IQ4_NL)}


def shape_fallback(qtype: T, row_length: int) -> tuple[T, str | None]:
    """`tensor_type_fallback`: a type whose block divides the row, and the reason when it differs from `qtype`."""
    block = block_size(qtype)
    if row_length % block == 0:
        return qtype, None
    if qtype in _FALLBACK:
        fallback = _FALLBACK[qtype]
    elif block <= 32:
        fallback = qtype
    else:
        raise QtoolError(f"no fallback type is defined for {qtype.name}: row length {row_length} is not a multiple "
                         f"of its {block} (llama-quantize refuses this too); choose another type for this tensor, "
                         f"e.g. with --tensor-type")
    reason = f"row length {row_length} is not a multiple of {block} ({qtype.name})"
    if row_length % block_size(fallback) != 0:
        return T.F16, reason + f" nor of {block_size(fallback)}: must use F16"
    return fallback, reason


_NEED_IMATRIX = (T.IQ3_XXS, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ1_M, T.IQ1_S)


def tensor_requires_imatrix(name: str, qtype: T, ftype: FileType) -> bool:
    """llama-quantize refuses to write these without an importance matrix: the very-low-bit i-quants, and the Q2_K
    tensors of a Q2_K_S file."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in _NEED_IMATRIX or (qtype == T.Q2_K and ftype == FileType.Q2_K_S)


def choose_tensor_types(tensors: Sequence[tuple[str, Sequence[int], T]], ftype: FileType, model: ModelInfo,
                        options: MixtureOptions | None = None) -> list[TensorChoice]:
    """Every tensor's target type, in llama-quantize's tensor order (the order the output file gets).

    `tensors` are (name, numpy shape, source type); the shape's last axis is the row length.
    """
    options = options or MixtureOptions()
    by_name = {name: (tuple(int(d) for d in shape), qtype) for name, shape, qtype in tensors}
    if len(by_name) != len(tensors):
        raise QtoolError("the model has duplicate tensor names")
    order = llama_tensor_order(list(by_name))
    rules = _Rules(ftype, model, options, order)
    default = ftype.default_type
    out = []
    for name in order:
        shape, source = by_name[name]
        out.append(tensor_type_for(name, shape, source, ftype, default, rules, options))
    return out


def tensor_type_for(name: str, shape: tuple[int, ...], source: T, ftype: FileType, default: T, rules: _Rules,
                    options: MixtureOptions) -> TensorChoice:
    """`llama_tensor_get_type`: one tensor, visited in order (the rules' counters advance here)."""
    kept = "COPY" if ftype == FileType.COPY else why_not_quantized(name, shape, options)
    if kept is not None:
        return TensorChoice(name, shape, source, source, f"kept: {kept}", quantizable=False)
    category = category_of(name)
    row_length = shape[-1]

    def done(qtype: T, reason: str, wanted: T | None = None, fallback: str | None = None) -> TensorChoice:
        return TensorChoice(name, shape, source, qtype, reason, True, wanted, fallback,
                            tensor_requires_imatrix(name, qtype, ftype))

    if options.token_embedding_type is not None and category == Category.TOKEN_EMBD:
        named = name == "per_layer_token_embd.weight" and any(o.regex.search(name) for o in options.tensor_types)
        if not named:
            return done(options.token_embedding_type, "--token-embedding-type")
    if options.output_tensor_type is not None and category == Category.OUTPUT:
        return done(options.output_tensor_type, "--output-tensor-type")
    if not ftype.is_quantized:
        # float file types: every quantizable tensor takes the type; overrides and fallbacks do not apply
        return done(default, "file type default")

    new_type, reason = default, "file type default"
    override = next((o for o in options.tensor_types if o.regex.search(name)), None)
    if override is not None:
        new_type, reason = override.qtype, f"--tensor-type {override.pattern}={override.qtype.name.lower()}"
    elif not options.pure:
        rules.output_fallback = None
        new_type, reason = rules.choose(name, shape, category, default)
        if rules.output_fallback is not None:
            wanted, why = rules.output_fallback
            final, more = shape_fallback(new_type, row_length)
            return done(final, reason, wanted=wanted, fallback=why + (f"; {more}" if more else ""))
    else:
        reason = "--pure"
    final, why = shape_fallback(new_type, row_length)
    if why is not None:
        return done(final, reason, wanted=new_type, fallback=why)
    return done(final, reason)


# --- a reference model for `qtool quantize --list` ---------------------------------------------------------------

# Llama-3.1-8B's tensor list (32 layers, GQA 4, untied output): the model llama.cpp's README sizes file types on.
LLAMA31_8B = ModelInfo("llama", n_layer=32, n_head=32, n_head_kv=8)


def llama31_8b_tensors() -> list[tuple[str, tuple[int, ...], T]]:
    hidden, ffn, vocab, kv = 4096, 14336, 128256, 1024
    tensors = [("token_embd.weight", (vocab, hidden), T.F16), ("output.weight", (vocab, hidden), T.F16),
               ("output_norm.weight", (hidden,), T.F32), ("rope_freqs.weight", (64,), T.F32)]
    for i in range(32):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (hidden,), T.F32), (p + "ffn_norm.weight", (hidden,), T.F32),
                    (p + "attn_q.weight", (hidden, hidden), T.F16), (p + "attn_k.weight", (kv, hidden), T.F16),
                    (p + "attn_v.weight", (kv, hidden), T.F16), (p + "attn_output.weight", (hidden, hidden), T.F16),
                    (p + "ffn_gate.weight", (ffn, hidden), T.F16), (p + "ffn_up.weight", (ffn, hidden), T.F16),
                    (p + "ffn_down.weight", (hidden, ffn), T.F16)]
    return tensors


def mixture_bits_per_weight(ftype: FileType, tensors=None, model: ModelInfo = LLAMA31_8B,
                            options: MixtureOptions | None = None) -> float:
    """Bits per weight of a whole model (default: Llama-3.1-8B's shapes) under this file type's rules."""
    from qtool.gguf_io import tensor_nbytes
    tensors = tensors if tensors is not None else llama31_8b_tensors()
    choices = choose_tensor_types(tensors, ftype, model, options)
    nbytes = sum(tensor_nbytes(c.shape, c.target_type) for c in choices)
    return 8.0 * nbytes / sum(c.n_elements for c in choices)
