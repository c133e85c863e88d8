"""One transformer forward pass for every supported GGUF architecture, in float32 numpy.

The architectures differ only in switches held by `ModelConfig` (rope style, ALiBi, q/k norm, biases,
tied output); the pass itself is the llama graph of llama.cpp (src/models/{llama,qwen2,qwen3,baichuan}.cpp):

    x = token_embd[tokens]
    for each layer:  x += attention(rms_norm(x)) ;  x += ffn(rms_norm(x))
    logits = rms_norm(x) @ output.T

For the mixture-of-experts architectures (Qwen2-MoE, Qwen3-MoE: src/models/qwen{2,3}moe.cpp, build_moe_ffn) the
ffn is routed: a softmax over the router's logits picks each token's top-k experts, only those run, and their
outputs are summed with the routing weights (renormalized for Qwen3-MoE), plus Qwen2-MoE's sigmoid-gated shared
expert.

The Qwen3.5 hybrids (src/models/qwen35{,moe}.cpp) replace the attention of most layers by a Gated DeltaNet
(evaluate/deltanet.py: a recurrent state instead of keys and values); in their other layers the q projection yields
each head's query and beside it a gate whose sigmoid scales that head's attention output, and their rope (imrope)
is NEOX on the first n_rot dims for text. The MTP block the converter writes after the last layer is not run.

Weights are read in the GGUF layout (q/k rows permuted for llama/baichuan, whose NORM rope rotates
adjacent pairs), so no tensor is rewritten on load. Weights stay in their stored form (evaluate/weights.py: each
product decodes tiles of rows, or reads the blocks directly for one token); their values are used as float32; by default
(`activations="llama.cpp"`) the input of every matrix product is rounded the way llama.cpp's CPU backend
rounds it for that weight type (F16, or 8-bit blocks for quantized weights), which is what makes its
perplexities llama-perplexity's; `activations="float32"` computes the model exactly in float32.

Two extension points:
- `on_matmul_input(weight_name, x)`: called with the input rows (float32, unrounded, as llama-imatrix sees
  them) of every matrix product before it runs; an importance-matrix collector squares and sums them.
  q, k and v get the same array. One attribute test when unused.
- `KVCache`: pass one to `forward` to decode incrementally; keys and values of earlier calls are reused (and the
  recurrent layers' states continued).

`forward` processes a batch of sequences layer by layer, so each weight tile is decoded once per batch, not once
per sequence.
"""
from __future__ import annotations

import math
import threading
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from qtool.numba_start import drop_stale_kernels
from numba import get_num_threads, njit, prange
from numba import types as nb_types
from numba.extending import intrinsic

from qtool.archs import BAICHUAN_ALIBI_DEPTH, BAICHUAN_ALIBI_MAX_BIAS, BAICHUAN_ROPE_DEPTH, arch_for_gguf
from qtool.errors import QtoolError
from qtool.floats import round_to_bf16
from qtool.evaluate import halfgemm, matvec, qdot
from qtool.evaluate.deltanet import DeltaNetConfig, DeltaNetState, gated_deltanet
from qtool.evaluate.matvec import _as_i32, _widen_ir
from qtool.evaluate.weights import MATVEC_MAX_ROWS, GGUFWeights
from qtool.quantize import formats
from qtool.quantize.kernels import common as _common
from qtool.quantize.kernels.common import float32_from_bits, fp32_to_fp16_bits, round_to_f16, running_max
from qtool.threads import single_threaded_blas, worker_pool

# These kernels inline helpers of qdot.py (the activations' scales), matvec.py (fp16 widening) and the kernels'
# common.py (bit casts): an edit of those alone drops the cached kernels of this module.
drop_stale_kernels(Path(__file__).parent / "__pycache__", [Path(m.__file__) for m in (qdot, matvec, _common)],
                   "model.helpers.sha256", lambda name: name.startswith("model."))

MatmulHook = Callable[..., None]      # (weight_name, x) or, for one expert of a 3-D tensor, (..., expert=e, n_expert=n)

# ggml clamps the sum of the top-k weights before dividing by it: the smallest normal float16.
MOE_WEIGHT_SUM_MIN = np.float32(6.103515625e-5)

# ggml's YaRN defaults; the GGUF yarn_beta_* keys are not read by these architectures (docs/reference/conversion-and-evaluation.md §A.6).
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
# Query rows per causal attention block: smaller skips more masked products, larger keeps BLAS efficient.
ATTENTION_BLOCK = 128
# Scores per worker thread below which batched attention runs on the calling thread (a round of the worker threads
# costs ~0.1 ms; 64K scores of 64-128 values each are ~0.3 ms of products).
ATTENTION_JOB_SCORES = 1 << 16
WARM_UP_TOKENS = 8             # Model.warm_up: enough for the batched path (more than ATTEND_FEW_MAX_QUERIES)
ATTEND_FEW_MAX_QUERIES = 4     # queries per sequence up to which attention reads the cache in attend_few_

# Below this many elements a kernel runs on the calling thread: waking the worker threads costs ~100 us, more
# than the work of one decoding step's row (measured: 150 us -> ~10 us per call for a 576-wide row).
PARALLEL_MIN_ELEMENTS = 16384


_TWINS: list[tuple] = []             # (parallel kernel, its serial twin): Model.warm_up loads both of each pair


def _serial_twin(kernel, **options):
    """A single-threaded numba build of a parallel kernel (its own name, so the two don't share a cache entry)."""
    fn = kernel.py_func
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    built = njit(cache=True, **options)(twin)
    _TWINS.append((kernel, built))
    return built


def _load_twins() -> None:
    """For every kernel that has run, its twin (parallel or serial) for the same argument types, loaded from numba's
    cache (or compiled) without running it: a warm-up pass of a few tokens runs the serial builds, and a prompt of
    more tokens would otherwise load the parallel ones while it is timed."""
    for pair in _TWINS:
        for kernel, twin in (pair, pair[::-1]):
            for signature in kernel.signatures:
                if signature not in twin.signatures:
                    twin.compile(signature)


def _sized(parallel, serial, n_elements: int):
    return parallel if n_elements >= PARALLEL_MIN_ELEMENTS else serial


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    rms_eps: float
    context_length: int
    position: str = "rope"          # "rope" | "alibi" | "none" (Baichuan at depths other than 32 and 40)
    rope_style: str = "neox"        # "norm": pairs (2i, 2i+1) ; "neox": pairs (i, i + n_rot/2)
    n_rot: int = 0                  # leading dims of each head that rotate
    rope_base: float = 10000.0
    rope_freq_scale: float = 1.0    # 1 / rope.scaling.factor
    yarn_orig_ctx: int = 0          # > 0: YaRN scaling with this original context
    alibi_max_bias: float = 0.0
    qk_norm: bool = False
    tied_output: bool = False
    n_expert: int = 0               # > 0: the FFN is a mixture of experts
    n_expert_used: int = 0          # experts per token (top-k)
    n_ff_exp: int = 0               # each expert's FFN width
    n_ff_shexp: int = 0             # > 0: a shared expert of this width, gated by a sigmoid
    expert_norm: bool = False       # renormalize the top-k routing weights
    # Gated DeltaNet hybrids (Qwen3.5): which layers are recurrent (the others are full attention), the DeltaNet
    # shape, attention whose q projection also yields a sigmoid output gate, and the name of the norm before the FFN
    recurrent: tuple[bool, ...] = ()
    deltanet: DeltaNetConfig | None = None
    attn_output_gate: bool = False
    ffn_norm: str = "ffn_norm"

    def is_recurrent(self, il: int) -> bool:
        return bool(self.recurrent) and self.recurrent[il]

    @property
    def n_group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.n_head // self.n_head_kv

    @classmethod
    def from_weights(cls, w: GGUFWeights) -> ModelConfig:
        name = w.model.hparams.arch
        arch = arch_for_gguf(name)
        h = w.model.hparams.require_uniform()      # per-layer arrays are allowed by llama.cpp; we need them uniform
        n_layer, n_embd, n_head = h.need("n_layer"), h.need("n_embd"), h.need("n_head")
        hybrid = _hybrid_config(w, name, n_layer, h.need("rms_eps")) if arch.hybrid else {}
        n_layer = hybrid.pop("n_layer", n_layer)
        n_head_kv, head_dim = h.head_count_kv, h.head_dim
        h.check_gqa()

        scaling = h.rope_scaling_type or "linear"
        factor = h.rope_scaling_factor or 0.0
        if scaling not in ("none", "linear", "yarn"):
            raise QtoolError(f"{w.path}: rope scaling {scaling!r} is not supported")
        freq_scale = 1.0 if scaling == "none" or factor == 0.0 else 1.0 / factor
        context_length = h.need("context_length")
        yarn_orig = (h.rope_orig_ctx or context_length) if scaling == "yarn" else 0

        position, rope_style, alibi = "rope", arch.rope_style, 0.0
        if arch.rope_style == "baichuan":
            # llama.cpp decides by depth alone: 7B-shaped -> NORM rope, 13B-shaped -> ALiBi, else nothing
            rope_style = "norm"
            position = {BAICHUAN_ROPE_DEPTH: "rope", BAICHUAN_ALIBI_DEPTH: "alibi"}.get(n_layer, "none")
            alibi = BAICHUAN_ALIBI_MAX_BIAS if position == "alibi" else 0.0
        elif arch.rope_style == "imrope":
            # Qwen3.5's multimodal rope: text tokens carry the same position in every section, so each rotated
            # pair turns by pos * base^(-2i/n_rot) whatever its section, pairs (i, i + n_rot/2): NEOX on n_rot dims
            rope_style = "neox"

        if not w.has("token_embd.weight"):
            raise QtoolError(f"{w.path}: tensor 'token_embd.weight' is missing")
        n_vocab, embd_cols = w.shape("token_embd.weight")
        if embd_cols != n_embd:
            raise QtoolError(f"{w.path}: token_embd has {embd_cols} columns, embedding_length is {n_embd}")
        tied = not w.has("output.weight")
        if tied and arch.output_required:
            raise QtoolError(f"{w.path}: tensor 'output.weight' is missing ({name} has no tied output)")
        moe = {}
        if arch.moe:
            n_expert = h.need("n_expert")
            used = int(w.value(f"{name}.expert_used_count", 0) or 0)
            if not 0 < used <= n_expert:
                raise QtoolError(f"{w.path}: {name}.expert_used_count is {used}, expected 1..{n_expert} experts")
            n_ff_exp = int(w.value(f"{name}.expert_feed_forward_length", 0) or 0) or h.need("n_ff") // used
            shared = 0
            if arch.shared_expert:
                shared = int(w.value(f"{name}.expert_shared_feed_forward_length", 0) or 0) or h.need("n_ff")
            moe = dict(n_expert=n_expert, n_expert_used=used, n_ff_exp=n_ff_exp, n_ff_shexp=shared,
                       expert_norm=arch.moe_norm_topk)
        return cls(arch=name, n_vocab=int(n_vocab), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                   n_head_kv=n_head_kv, head_dim=head_dim,
                   n_ff=h.need("n_ff") if h.n_ff is not None or not arch.moe else 0,
                   rms_eps=h.need("rms_eps"), context_length=context_length,
                   position=position, rope_style=rope_style,
                   n_rot=h.n_rot if h.n_rot is not None else head_dim,
                   rope_base=h.rope_base if h.rope_base is not None else 10000.0, rope_freq_scale=freq_scale,
                   yarn_orig_ctx=yarn_orig, alibi_max_bias=alibi, qk_norm=arch.qk_norm, tied_output=tied, **moe,
                   **hybrid)


def _hybrid_config(w: GGUFWeights, name: str, n_layer_all: int, eps: float) -> dict:
    """ModelConfig fields of a Gated DeltaNet hybrid. Its MTP layers (nextn_predict_layers, after the others) are
    a draft head that llama.cpp loads but never runs in the main pass, so evaluation leaves them out too."""
    def need(key: str) -> int:
        value = w.value(f"{name}.{key}")
        if value is None:
            raise QtoolError(f"{w.path}: missing metadata key {name}.{key}")
        return int(value)

    n_layer = n_layer_all - int(w.value(f"{name}.nextn_predict_layers", 0) or 0)
    if n_layer <= 0:
        raise QtoolError(f"{w.path}: {name}.nextn_predict_layers leaves no layers of {n_layer_all} to evaluate")
    flags = w.value(f"{name}.attention.recurrent_layers")
    if flags is None:       # llama.cpp's fallback: every full_attention_interval-th layer attends
        interval = int(w.value(f"{name}.full_attention_interval", 4) or 4)
        flags = [(i + 1) % interval != 0 for i in range(n_layer)]
    flags = tuple(bool(f) for f in list(flags)[:n_layer])
    if len(flags) != n_layer:
        raise QtoolError(f"{w.path}: {name}.attention.recurrent_layers has {len(flags)} entries for {n_layer} layers")
    n_v_heads = need("ssm.time_step_rank")
    inner = need("ssm.inner_size")
    n_k_heads = need("ssm.group_count")
    if n_v_heads <= 0 or n_k_heads <= 0 or inner % n_v_heads or n_v_heads % n_k_heads:
        raise QtoolError(f"{w.path}: ssm.inner_size {inner}, time_step_rank {n_v_heads} and group_count {n_k_heads} "
                         f"do not make whole value heads over the key heads")
    deltanet = DeltaNetConfig(conv_kernel=need("ssm.conv_kernel"), n_k_heads=n_k_heads, n_v_heads=n_v_heads,
                              k_dim=need("ssm.state_size"), v_dim=inner // n_v_heads, eps=eps)
    return dict(n_layer=n_layer, recurrent=flags, deltanet=deltanet, attn_output_gate=True,
                ffn_norm="post_attention_norm")


# --- building blocks --------------------------------------------------------------------------------------------

@njit(parallel=True, cache=True)
def rms_norm_rows(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight for the rows of 2-D float32 x (sum in float64, as ggml)."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        total = 0.0
        for i in range(n):
            total += x[r, i] * x[r, i]
        scale = np.float32(1.0 / math.sqrt(total / n + eps))
        for i in range(n):
            out[r, i] = x[r, i] * scale * weight[i]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm over the last axis of a C-contiguous float32 array (out may be x itself)."""
    if out is None:
        out = np.empty_like(x)
    n = x.shape[-1]
    _sized(rms_norm_rows, _rms_norm_rows_serial, x.size)(x.reshape(-1, n), weight, eps, out.reshape(-1, n))
    return out


def rope_angles(cfg: ModelConfig, positions: np.ndarray, freq_factors: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, each (len(positions), n_rot/2) float32, of ggml's rope (with linear / YaRN / llama3 scaling)."""
    half = cfg.n_rot // 2
    i = np.arange(half, dtype=np.float64)
    theta_extrap = positions[:, None].astype(np.float64) * cfg.rope_base ** (-2.0 * i / cfg.n_rot)
    if freq_factors is not None:
        theta_extrap = theta_extrap / freq_factors.astype(np.float64)
    theta = cfg.rope_freq_scale * theta_extrap
    mscale = 1.0
    if cfg.yarn_orig_ctx:
        def corr_dim(n_rotations: float) -> float:
            return cfg.n_rot * math.log(cfg.yarn_orig_ctx / (n_rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_base))
        low = max(0.0, math.floor(corr_dim(YARN_BETA_FAST)))
        high = min(cfg.n_rot - 1.0, math.ceil(corr_dim(YARN_BETA_SLOW)))
        ramp = 1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
        theta = theta * (1.0 - ramp) + theta_extrap * ramp
        mscale = 1.0 + 0.1 * math.log(1.0 / cfg.rope_freq_scale)
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


@njit(parallel=True, cache=True)
def rope_rows(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, n_pos: int, neox: bool) -> None:
    """Rotate x (rows, heads, head_dim) in place; row r is at position index r % n_pos of cos/sin (n_pos, n_rot/2).

    NORM (llama, baichuan) rotates the pairs (2i, 2i+1), NEOX (qwen) the pairs (i, i + n_rot/2).
    """
    n_rows, n_heads, _ = x.shape
    half = cos.shape[1]
    for r in prange(n_rows):
        t = r % n_pos
        for h in range(n_heads):
            for i in range(half):
                a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
                x0, x1 = x[r, h, a], x[r, h, b]
                x[r, h, a] = x0 * cos[t, i] - x1 * sin[t, i]
                x[r, h, b] = x0 * sin[t, i] + x1 * cos[t, i]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> None:
    """Rotate x (B, T, heads, head_dim), C-contiguous, in place; cos/sin are (T, n_rot/2)."""
    B, T, H, d = x.shape
    _sized(rope_rows, _rope_rows_serial, x.size)(x.reshape(B * T, H, d), cos, sin, T, style == "neox")


def alibi_slopes(n_head: int, max_bias: float) -> np.ndarray:
    """Per-head ALiBi slopes as ggml's soft_max derives them from max_bias."""
    n2 = 2 ** math.floor(math.log2(n_head))
    m0 = 2.0 ** (-max_bias / n2)
    m1 = 2.0 ** (-(max_bias / 2.0) / n2)
    h = np.arange(n_head)
    return np.where(h < n2, m0 ** (h + 1), m1 ** (2 * (h - n2) + 1)).astype(np.float32)


@njit(inline="always")
def _query_row(idx: int, n_rows: int, q_start: int, n_group: int) -> tuple[int, int, int, int]:
    """Flat row idx of (n_kv, n_rows) query-major attention rows: (kv head h, row r, the query's position, its query
    head): row r is query r // n_group of query head h * n_group + r % n_group."""
    h = idx // n_rows
    r = idx - h * n_rows
    return h, r, q_start + r // n_group, h * n_group + r % n_group


EXP_MAX = np.float32(88.72283)      # e^x overflows float32 above this
EXP_MIN = np.float32(-104.0)        # e^x rounds to 0 below this


@njit(inline="always", fastmath={"contract"})
def _expf(x):
    """e^x in float32 (x float32), within 1 ulp of the correctly rounded value (tests/test_eval_model.py), with no
    call: math.exp is a libm call per element, which keeps a loop over it scalar, and it was most of the time of
    the prefill's softmax and of SiLU (llama.cpp computes both with a vectorized polynomial too, ggml_v_expf).
    Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2 (ln2 in two parts, so that r is exact), e^r by its polynomial,
    times 2^n as two powers of two (each a normal float32, so the scaling rounds at most once, into a subnormal
    result). inf above EXP_MAX, 0 below EXP_MIN."""
    xc = min(max(x, EXP_MIN), EXP_MAX)
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))     # float32 (math.floor: int64 lanes)
    r = xc - n * np.float32(0.693145751953125)
    r = r - n * np.float32(1.428606765330187e-06)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    ni = np.int32(n)
    n1 = ni >> 1
    y = p * float32_from_bits(np.int32((n1 + 127) << 23)) * float32_from_bits(np.int32((ni - n1 + 127) << 23))
    return np.float32(np.inf) if x > EXP_MAX else y


@njit(inline="always")
def _row_sum64(row: np.ndarray, n: int) -> float:
    """sum(row[:n]) in float64 as 8 running sums of every 8th value, added pairwise, then the tail: 8 chains of
    float64 adds instead of one (3x faster on a 600-value row)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    j = 0
    while j + 8 <= n:
        s0 += row[j]
        s1 += row[j + 1]
        s2 += row[j + 2]
        s3 += row[j + 3]
        s4 += row[j + 4]
        s5 += row[j + 5]
        s6 += row[j + 6]
        s7 += row[j + 7]
        j += 8
    total = ((s0 + s4) + (s2 + s6)) + ((s1 + s5) + (s3 + s7))
    for i in range(j, n):
        total += row[i]
    return total


@njit(inline="always")
def _softmax_row_(row: np.ndarray, pos: int, slopes: np.ndarray, head: int) -> None:
    """row[:pos + 1] = softmax(row[:pos + 1]) in place; with ALiBi `slopes` (per query head, empty otherwise) each
    score first gets slopes[head] * (key position - pos). Sum in float64 (8 running sums, as ggml's vectorized
    soft_max also sums in parts)."""
    if slopes.size > 0:
        slope = slopes[head]
        for j in range(pos + 1):
            row[j] += slope * np.float32(j - pos)
    top = running_max(row, 0, pos + 1, False)
    for j in range(pos + 1):             # vectorized
        row[j] = _expf(row[j] - top)
    inv = np.float32(1.0 / _row_sum64(row, pos + 1))
    for j in range(pos + 1):
        row[j] *= inv


@njit(parallel=True, cache=True)
def causal_softmax_(scores: np.ndarray, q_start: int, slopes: np.ndarray, n_group: int) -> None:
    """Masked softmax in place over attention scores (n_head_kv, n_q * n_group, n_k).

    Row r of kv head h is query r // n_group (at position q_start + r // n_group) of query head
    h * n_group + r % n_group. Keys after the query's position get probability 0 and are never exponentiated.
    With ALiBi `slopes` (per query head; empty otherwise) each score first gets slope * (key position - query
    position), as ggml's soft_max adds slope * mask with mask = -|i - j|. Sums in float64, as ggml.
    """
    n_kv, n_rows, n_k = scores.shape
    for idx in prange(n_kv * n_rows):
        h, r, pos, head = _query_row(idx, n_rows, q_start, n_group)
        row = scores[h, r]
        _softmax_row_(row, pos, slopes, head)
        for j in range(pos + 1, n_k):
            row[j] = 0.0


# Its sums (the dot products, the softmax's float64 total) may be taken in any order (vectorized): the result is
# causal_softmax_ + BLAS's within float rounding, not bit for bit.
ATTEND_FASTMATH = {"reassoc", "contract"}


@intrinsic
def _kv(typingctx, x):
    """A KV cache value as float32: a float32 as it is, an fp16 bit pattern (uint16, an F16 cache) widened exactly
    (matvec._widen_ir: vcvtph2ps, 8 at a time, in a vectorized loop)."""
    if isinstance(x, nb_types.Float):
        return nb_types.float32(x), lambda context, builder, sig, args: context.cast(builder, args[0], sig.args[0],
                                                                                     nb_types.float32)
    if isinstance(x, nb_types.Integer):
        return nb_types.float32(x), lambda context, builder, sig, args: _widen_ir(
            builder, _as_i32(builder, args[0], sig.args[0]), 1)
    return None


@njit(parallel=True, cache=True, fastmath=ATTEND_FASTMATH)
def attend_few_(queries: np.ndarray, keys: np.ndarray, values: np.ndarray, q_start: int, slopes: np.ndarray,
                n_group: int, out: np.ndarray) -> None:
    """Attention for a few queries against the KV cache, in one pass over it (decoding): out[h, r] = softmax(q . K)
    @ V for each kv head h and row r of queries (n_kv, n_rows, d), rows query-major as in causal_softmax_ (query
    r // n_group at position q_start + r // n_group), keys and values (n_kv, >= positions, d). The cache is read
    once per row, straight from its rows: no score matrix, no BLAS calls per head; the weights are
    causal_softmax_'s formula (ALiBi, float64 sums, summed in any order). keys and values are float32, or the fp16
    bit patterns (uint16) of an F16 cache, read as float32."""
    n_kv, n_rows, d = queries.shape
    for idx in prange(n_kv * n_rows):
        h, r, pos, head = _query_row(idx, n_rows, q_start, n_group)
        q = queries[h, r]
        p = np.empty(pos + 1, np.float32)
        for j in range(pos + 1):
            key = keys[h, j]
            total = np.float32(0.0)
            for i in range(d):
                total += q[i] * _kv(key[i])
            p[j] = total
        _softmax_row_(p, pos, slopes, head)
        o = out[h, r]
        o[:] = 0.0
        for j in range(pos + 1):
            weight = p[j]
            value = values[h, j]
            for i in range(d):
                o[i] += weight * _kv(value[i])


@njit(parallel=True, cache=True)
def store_f16_(x: np.ndarray, dst: np.ndarray) -> None:
    """New keys or values x (T, n_kv, d) float32 into an F16 cache's slice dst (n_kv, T, d) of fp16 bit patterns
    (uint16), each rounded to the nearest float16 as ggml's F16 copy rounds it (numpy's cast: the same bits for
    finite values, on one core and several times slower)."""
    n_t, n_kv, d = x.shape
    for idx in prange(n_kv * n_t):               # (head, position) pairs, the cache's order
        row, source = dst[idx // n_t, idx % n_t], x[idx % n_t, idx // n_t]
        for i in range(d):
            row[i] = fp32_to_fp16_bits(source[i])


@njit(parallel=True, cache=True)
def widen_f16_(src: np.ndarray, n: int, out: np.ndarray) -> None:
    """out[:, :n] = the fp16 bit patterns src[:, :n] (n_kv, >= n, d) as float32, exactly."""
    for idx in prange(src.shape[0] * n):
        row, source = out[idx // n, idx % n], src[idx // n, idx % n]
        for i in range(row.size):
            row[i] = _kv(source[i])


@njit(parallel=True, cache=True)
def silu_mul_(gate: np.ndarray, up: np.ndarray) -> None:
    """gate = silu(gate) * up = gate / (1 + e^-gate) * up, in place over 2-D float32 rows."""
    n_rows, n = gate.shape
    for r in prange(n_rows):
        for i in range(n):
            g = gate[r, i]
            gate[r, i] = g / (np.float32(1.0) + _expf(-g)) * up[r, i]


# --- llama.cpp's activation rounding ------------------------------------------------------------------------------
# ggml's CPU backend converts the activations of every matrix product to the weight type's vec_dot_type before
# multiplying (the format table says which: formats.activation_kind). On SmolLM2-135M Q4_K_M that moves PPL by 0.7%,
# so `activations="llama.cpp"` rounds each matrix product's input the same way (its values, not its storage);
# "float32" keeps them exact.

ACTIVATION_MODES = ("llama.cpp", "float32")


@njit(parallel=True, cache=True)
def round_q8_0_(x: np.ndarray, out: np.ndarray) -> None:
    """Values of ggml's quantize_row_q8_0 (x86): per 32 values d = amax/127 stored as F16, q = rint(x * 127/amax)."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        for b in range(0, n, 32):
            inv, d = qdot.q8_0_scale(x[r], b)
            for j in range(b, b + 32):
                out[r, j] = np.rint(x[r, j] * inv) * d


@njit(parallel=True, cache=True)
def round_q8_k_(x: np.ndarray, out: np.ndarray) -> None:
    """Values of ggml's quantize_row_q8_K: per 256 values the signed max m, s = -127/m, q = min(127, rint(s x)), x ~ q/s."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        for b in range(0, n, 256):
            iscale, d = qdot.q8_k_scale(x[r], b)
            if d == 0:
                for j in range(b, b + 256):
                    out[r, j] = 0.0
                continue
            for j in range(b, b + 256):
                out[r, j] = min(np.float32(127.0), np.rint(iscale * x[r, j])) * d


@njit(parallel=True, cache=True)
def round_f16_(x: np.ndarray, out: np.ndarray) -> None:
    """out = float32(float16(x)) (ties to even, overflow to inf), as numpy's astype, by the CPU's conversions
    (round_to_f16: 7x faster than rounding the bit patterns with branches, which did not vectorize)."""
    n_rows, n = x.shape
    for r in prange(n_rows):
        for i in range(n):
            out[r, i] = round_to_f16(x[r, i])


def round_activations(x: np.ndarray, kind: str, out: np.ndarray) -> np.ndarray:
    """x (rows, n) rounded as llama.cpp's CPU backend rounds a matrix product's input for `kind` (into out)."""
    if kind == "q8_0":
        _sized(round_q8_0_, _round_q8_0_serial, x.size)(x, out)
    elif kind == "q8_K":
        _sized(round_q8_k_, _round_q8_k_serial, x.size)(x, out)
    elif kind == "f16":
        _sized(round_f16_, _round_f16_serial, x.size)(x, out)
    elif kind == "bf16":
        round_to_bf16(x, out)
    else:
        raise ValueError(kind)
    return out


class _Input:
    """One matrix-product input and its llama.cpp-rounded copies, made once per kind for all products sharing it."""

    def __init__(self, x: np.ndarray, workspace: Workspace):
        self.x, self._ws, self._rounded = x, workspace, {}

    def rounded(self, kind: str | None) -> np.ndarray:
        if kind is None:
            return self.x
        if kind not in self._rounded:
            self._rounded[kind] = round_activations(self.x, kind, self._ws(f"act-{kind}-{self.x.shape[1]}", self.x.shape))
        return self._rounded[kind]

    def panels(self, kind: str | None) -> np.ndarray:
        """x rounded for `kind`, packed for halfgemm's products (F16 / BF16 weights) into a work buffer, once for all
        products sharing x (q, k and v; gate and up); packed again if another input has used the buffer since."""
        x = self.rounded(kind)
        role = f"panels-{kind}-{x.shape[1]}"
        buf = self._ws(role, (halfgemm.packed_elements(*x.shape),))
        if self._ws.owners.get(role) is not self:
            halfgemm.panels(x, buf)
            self._ws.owners[role] = self
        return buf

    def codes(self, kind: str | None) -> qdot.Q8K | qdot.Q80 | None:
        """`integer_codes` of x, made once per kind for all products sharing it."""
        key = f"{kind} codes"
        if key not in self._rounded:
            self._rounded[key] = integer_codes(self.x, kind)
        return self._rounded[key]


def integer_codes(x: np.ndarray, kind: str | None) -> qdot.Q8K | qdot.Q80 | None:
    """The rows of x as ggml's Q8_K blocks (kind "q8_K") or Q8_0 blocks ("q8_0"), 1-D arrays for one row: integer
    codes for evaluate/qdot.py's kernels; None for kind None."""
    if kind is None:
        return None
    quantize = qdot.quantize_q8_k if kind == "q8_K" else qdot.quantize_q8_0
    return quantize(x[0] if x.shape[0] == 1 else x)


_rms_norm_rows_serial = _serial_twin(rms_norm_rows)
_rope_rows_serial = _serial_twin(rope_rows)
_causal_softmax_serial = _serial_twin(causal_softmax_, nogil=True)     # run by worker threads side by side
_silu_mul_serial = _serial_twin(silu_mul_)
_attend_few_serial = _serial_twin(attend_few_, fastmath=ATTEND_FASTMATH)
_store_f16_serial = _serial_twin(store_f16_)
_round_q8_0_serial = _serial_twin(round_q8_0_)
_round_q8_k_serial = _serial_twin(round_q8_k_)
_round_f16_serial = _serial_twin(round_f16_)


def attention_runs(n_kv: int, T: int, G: int, start: int, jobs: int) -> list[list[tuple[int, int, int, int]]]:
    """The batched attention's (kv head, query block) pairs shared out among `jobs` threads by cost: per thread a
    list of runs (q0, q1, h0, h1), queries [q0, q1) of kv heads [h0, h1). Pairs are taken block by block, head by
    head; a pair costs its scores, (q1 - q0) G (start + q1), and goes to the thread whose share holds its middle."""
    blocks = [(q0, min(T, q0 + ATTENTION_BLOCK)) for q0 in range(0, T, ATTENTION_BLOCK)]
    total = n_kv * sum((q1 - q0) * G * (start + q1) for q0, q1 in blocks)
    runs: list[list[tuple[int, int, int, int]]] = [[] for _ in range(jobs)]
    done = 0
    for q0, q1 in blocks:
        cost = (q1 - q0) * G * (start + q1)
        for h in range(n_kv):
            j = min(jobs - 1, (2 * done + cost) * jobs // (2 * total))
            done += cost
            last = runs[j][-1] if runs[j] else None
            if last is not None and last[0] == q0 and last[3] == h:
                runs[j][-1] = (q0, q1, last[2], h + 1)
            else:
                runs[j].append((q0, q1, h, h + 1))
    return runs


# --- caches -----------------------------------------------------------------------------------------------------

@contextmanager
def _small_pages():
    """numpy's advice for transparent huge pages (madvise, on every array of 4 MB or more) off for the arrays made
    inside. Where the kernel compacts memory at the page fault (THP defrag "madvise", the usual default) and the page
    cache is full of model files, the first writes to such arrays crawl: 0.2-0.3 GB/s on the benchmark machine
    against 2.5 GB/s with 4 KB pages. A 7B KV cache (545 MB, written once during the prefill) lost 2.5 s of a 19 s
    prefill that way. (Turning the advice off for the whole process made decoding 10-15 % slower.)"""
    toggle = getattr(getattr(np, "_core", np).multiarray, "_set_madvise_hugepage", None)
    before = toggle(False) if toggle is not None else None
    try:
        yield
    finally:
        if toggle is not None:
            toggle(before)


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, per layer (batch, n_head_kv, max_len, head_dim): float32, or
    float16 (`f16=True`), as llama.cpp keeps them by default (half the bytes each decoded token reads; the values
    rounded to nearest, as ggml's F16 copy rounds them).

    A recurrent (Gated DeltaNet) layer keeps no keys (its k/v have 0 heads, so shapes still tell batch and
    capacity) but its state after the last position in `recurrent`; that state continues from position `length`
    only, and a pass at position 0 starts it afresh.
    """

    k: list[np.ndarray]
    v: list[np.ndarray]
    length: int = 0
    recurrent: list[DeltaNetState | None] = field(default_factory=list)

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, f16: bool = False) -> KVCache:
        def heads(il: int) -> tuple[int, ...]:
            return (batch, 0 if cfg.is_recurrent(il) else cfg.n_head_kv, max_len, cfg.head_dim)
        dtype = np.float16 if f16 else np.float32
        with _small_pages():
            return cls([np.zeros(heads(il), dtype) for il in range(cfg.n_layer)],
                       [np.zeros(heads(il), dtype) for il in range(cfg.n_layer)],
                       recurrent=[DeltaNetState.zeros(cfg.deltanet, batch) if cfg.is_recurrent(il) else None
                                  for il in range(cfg.n_layer)])

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2] if self.k else 0


class Workspace:
    """Work buffers by role, reallocated only when a shape changes (each run reuses the same memory)."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self.owners: dict[str, object] = {}        # role -> the object whose data a buffer holds (_Input.panels)

    def __call__(self, role: str, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._bufs.get(role)
        if buf is None or buf.shape != shape:
            buf = self._bufs[role] = np.empty(shape, np.float32)
        return buf


# --- the model --------------------------------------------------------------------------------------------------

class Model:
    """A GGUF causal language model: `forward(tokens) -> logits`."""

    def __init__(self, weights: GGUFWeights, on_matmul_input: MatmulHook | None = None,
                 activations: str = "llama.cpp", workspace: Workspace | None = None):
        """`workspace`: work buffers to share with other models that never run at the same time (lockstep
        evaluation: one set of buffers for all of them instead of one per model)."""
        if activations not in ACTIVATION_MODES:
            raise QtoolError(f"activations must be one of {', '.join(ACTIVATION_MODES)}, not {activations!r}")
        self.weights = weights
        self.config = ModelConfig.from_weights(weights)
        self.on_matmul_input = on_matmul_input
        self.activations = activations
        self._ws = workspace if workspace is not None else Workspace()
        self._rope: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        c = self.config
        self.rope_freqs = weights.get("rope_freqs.weight") if weights.has("rope_freqs.weight") else None
        if self.rope_freqs is not None and self.rope_freqs.shape != (c.n_rot // 2,):
            raise QtoolError(f"{weights.path}: rope_freqs has shape {self.rope_freqs.shape}, expected ({c.n_rot // 2},)")
        self.alibi = alibi_slopes(c.n_head, c.alibi_max_bias) if c.position == "alibi" else np.empty(0, np.float32)
        self.output_name = "token_embd.weight" if c.tied_output else "output.weight"
        self._check_shapes()
        # one token of one sequence with an F16 cache: each layer one compiled call (evaluate/step.py), the same
        # results as the layer's steps below; False turns it off
        self.compiled_decoding = True
        self._compiled = None       # evaluate.step.CompiledLayers, False where the model needs the steps below

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    def unmap(self) -> None:
        """Let go of the weights' memory-mapped pages until the next pass (evaluate/weights.py: `unmap`)."""
        self.weights.unmap()
        self._compiled = None       # it holds the weights' memory maps

    def _check_shapes(self) -> None:
        c, w = self.config, self.weights
        q, kv = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        expected = {"output_norm.weight": (c.n_embd,)}
        if not c.tied_output:
            expected["output.weight"] = (c.n_vocab, c.n_embd)
        for il in range(c.n_layer):
            p = f"blk.{il}."
            expected.update({p + "attn_norm.weight": (c.n_embd,), p + c.ffn_norm + ".weight": (c.n_embd,)})
            if c.is_recurrent(il):
                expected.update(c.deltanet.tensor_shapes(p, c.n_embd))
            else:
                expected.update({p + "attn_q.weight": (2 * q if c.attn_output_gate else q, c.n_embd),
                                 p + "attn_k.weight": (kv, c.n_embd), p + "attn_v.weight": (kv, c.n_embd),
                                 p + "attn_output.weight": (c.n_embd, q)})
            if c.n_expert:
                e, f = c.n_expert, c.n_ff_exp
                expected.update({p + "ffn_gate_inp.weight": (e, c.n_embd), p + "ffn_gate_exps.weight": (e, f, c.n_embd),
                                 p + "ffn_up_exps.weight": (e, f, c.n_embd),
                                 p + "ffn_down_exps.weight": (e, c.n_embd, f)})
                if c.n_ff_shexp:
                    f = c.n_ff_shexp
                    expected.update({p + "ffn_gate_shexp.weight": (f, c.n_embd),
                                     p + "ffn_up_shexp.weight": (f, c.n_embd), p + "ffn_down_shexp.weight": (c.n_embd, f)})
            else:
                expected.update({p + "ffn_gate.weight": (c.n_ff, c.n_embd), p + "ffn_up.weight": (c.n_ff, c.n_embd),
                                 p + "ffn_down.weight": (c.n_embd, c.n_ff)})
            if c.qk_norm and not c.is_recurrent(il):
                expected[p + "attn_q_norm.weight"] = (c.head_dim,)
                expected[p + "attn_k_norm.weight"] = (c.head_dim,)
        if c.n_ff_shexp:      # one row: (1, n_embd) as converted, (n_embd,) once llama-quantize drops the 1
            for il in range(c.n_layer):
                name = f"blk.{il}.ffn_gate_inp_shexp.weight"
                if not w.has(name) or w.shape(name) not in ((1, c.n_embd), (c.n_embd,)):
                    raise QtoolError(f"{w.path}: tensor {name!r} is missing or not {c.n_embd} wide")
        for name, shape in expected.items():
            if not w.has(name):
                if name.startswith("blk.") and "attn_q." in name and w.has(name.replace("attn_q.", "attn_qkv.")):
                    raise QtoolError(f"{w.path}: fused attn_qkv tensors are not supported")
                raise QtoolError(f"{w.path}: tensor {name!r} is missing")
            if w.shape(name) != shape:
                raise QtoolError(f"{w.path}: tensor {name!r} has shape {w.shape(name)}, expected {shape}")

    # --- pieces -------------------------------------------------------------------------------------------------
    def _activation_kind(self, weight_name: str) -> str | None:
        if self.activations == "float32":
            return None
        return formats.activation_kind(self.weights.qtype(weight_name))

    def _integer_codes(self, weight: str, kind: str | None, rows: int) -> str | None:
        """Which codes of its input the stored weight multiplies as integers, as llama.cpp does (evaluate/qdot.py):
        "q8_K" (K-quants), "q8_0" (blocks of 32: one row, decoding; and any rows for qdot.ROWS_Q8_0), or None
        (rounded floats)."""
        w = self.weights
        if w.dense(weight) is not None:
            return None
        qtype = w.qtype(weight)
        if kind == "q8_K" and qtype in qdot.SUPPORTED:
            return "q8_K"
        if kind == "q8_0" and (qtype in qdot.ROWS_Q8_0 or rows == 1 and qtype in qdot.SUPPORTED_Q8_0):
            return "q8_0"
        return None

    def _linear(self, name: str, x: _Input, role: str = "", out: np.ndarray | None = None) -> np.ndarray:
        """x @ W.T (+ bias) into the work buffer `role` (or `out`); `name` is the tensor name without '.weight'."""
        if self.on_matmul_input is not None:
            self.on_matmul_input(name + ".weight", x.x)
        w = self.weights
        weight = name + ".weight"
        kind = self._activation_kind(weight)
        out = self._ws(role, (x.x.shape[0], w.shape(weight)[0])) if out is None else out
        codes = x.codes(self._integer_codes(weight, kind, x.x.shape[0]))
        if codes is not None:
            out = w.matmul(weight, x.x, out, codes=codes)
        else:
            out = w.matmul(weight, x.rounded(kind), out, panels=lambda: x.panels(kind))
        if w.has(name + ".bias"):
            out += w.get(name + ".bias")
        return out

    def _project(self, name: str, x: _Input | np.ndarray, role: str) -> np.ndarray:
        """`_linear` for a caller holding either a shared input or plain rows (the DeltaNet layer)."""
        return self._linear(name, x if isinstance(x, _Input) else _Input(x, self._ws), role)

    def _ffn(self, gate_name: str, up_name: str, down_name: str, h: _Input) -> np.ndarray:
        """silu(h W_gate^T) * (h W_up^T) @ W_down^T, in work buffers."""
        gate = self._linear(gate_name, h, "gate")
        up = self._linear(up_name, h, "up")
        _sized(silu_mul_, _silu_mul_serial, gate.size)(gate, up)
        return self._linear(down_name, _Input(gate, self._ws), "down")

    def _moe(self, p: str, h: _Input) -> np.ndarray:
        """llama.cpp's build_moe_ffn with softmax gating: each token's top-k experts (by routing probability, ties
        to the lower index) each run their FFN on it; their outputs, times the (renormalized) probabilities, are
        summed in rank order. Only routed experts are computed. Plus the shared expert, gated by a sigmoid.

        A batch gives each expert a few dozen rows: products too small to split well over BLAS's threads, whose
        barriers (and numba's) would then dominate. So the experts run side by side instead, one per worker thread,
        each on one core (serial decode + single-threaded BLAS); one token's experts (mat-vec kernels, parallel
        over rows) run one after another."""
        c, w = self.config, self.weights
        rows, k = h.x.shape[0], c.n_expert_used
        probs = self._linear(p + "ffn_gate_inp", h, "router")
        probs = np.exp(probs - probs.max(axis=1, keepdims=True))     # ggml_soft_max: float32 terms, a double sum,
        probs *= (1.0 / probs.sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)   # times 1/sum
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :k]                 # (rows, k), best first
        weights = np.take_along_axis(probs, chosen, axis=1)
        if c.expert_norm:
            weights /= np.maximum(weights.sum(axis=1, keepdims=True), MOE_WEIGHT_SUM_MIN)
        outputs = self._ws("expert_out", (rows, k, c.n_embd))
        names = [p + f"ffn_{part}_exps.weight" for part in ("gate", "up", "down")]
        kinds = [self._activation_kind(n) for n in names]
        # experts multiply their tokens' 8-bit codes as integers where `_integer_codes` says so (evaluate/qdot.py)
        integer = [self._integer_codes(n, kind, rows) for n, kind in zip(names, kinds)]
        inputs = [h.x if integer[i] else h.rounded(kinds[i]) for i in range(2)]
        codes = [h.codes(integer[i]) for i in range(2)]

        def codes_of(i: int, token: np.ndarray) -> qdot.Q8K | qdot.Q80 | None:
            act = codes[i]
            if act is None or act.q.ndim == 1:
                return act
            if isinstance(act, qdot.Q8K):
                return qdot.Q8K(act.q[token], act.d[token], act.bsums[token])
            return qdot.Q80(act.q[token], act.d[token], act.s[token])

        hook = self.on_matmul_input
        experts = [(int(e), *np.nonzero(chosen == e)) for e in np.unique(chosen)]
        hidden: dict[int, np.ndarray] = {}               # each expert's down-projection input, for the hook

        def expert_ffn(e: int, token: np.ndarray, rank: np.ndarray, tile: np.ndarray | None) -> None:
            gate = w.matmul(names[0], inputs[0][token], np.empty((len(token), c.n_ff_exp), np.float32), e, tile,
                            codes=codes_of(0, token))
            up = w.matmul(names[1], inputs[1][token], np.empty_like(gate), e, tile, codes=codes_of(1, token))
            _sized(silu_mul_, _silu_mul_serial, gate.size)(gate, up)
            if hook is not None:
                hidden[e] = gate
            down_codes = integer_codes(gate, integer[2])     # fresh arrays, not the shared workspace: threads
            if down_codes is not None or kinds[2] is None:
                down_in = gate
            else:
                down_in = round_activations(gate, kinds[2], np.empty_like(gate))
            down = w.matmul(names[2], down_in, np.empty((len(token), c.n_embd), np.float32), e, tile,
                            codes=down_codes)
            outputs[token, rank] = down * weights[token, rank][:, None]

        n_workers = min(get_num_threads(), len(experts))
        if n_workers > 1 and rows > MATVEC_MAX_ROWS:
            for n in names:             # the shared caches filled here, so that the workers only read them
                if w.dense(n) is None:
                    w.stored(n)
            tile_size = max(w.tile_elements(n) for n in names)
            local = threading.local()

            def job(e: int, token: np.ndarray, rank: np.ndarray) -> None:
                if getattr(local, "tile", None) is None:
                    local.tile = np.empty(tile_size, np.float32)
                expert_ffn(e, token, rank, local.tile)

            with single_threaded_blas():
                for done in [worker_pool(n_workers).submit(job, *ex) for ex in experts]:
                    done.result()
        else:
            for ex in experts:
                expert_ffn(*ex, None)
        if hook is not None:            # in expert order, as llama-imatrix's per-expert sums
            for e, token, _ in experts:
                hook(names[0], h.x[token], expert=e, n_expert=c.n_expert)
                hook(names[1], h.x[token], expert=e, n_expert=c.n_expert)
                hook(names[2], hidden[e], expert=e, n_expert=c.n_expert)
        total = outputs[:, 0].copy()
        for r in range(1, k):
            total += outputs[:, r]
        if c.n_ff_shexp:
            name = p + "ffn_gate_inp_shexp.weight"
            if hook is not None:
                hook(name, h.x)
            gate_logit = h.rounded(self._activation_kind(name)) @ w.get(name).reshape(-1)      # (rows,)
            shared = self._ffn(p + "ffn_gate_shexp", p + "ffn_up_shexp", p + "ffn_down_shexp", h)
            total += shared * (np.float32(1.0) / (np.float32(1.0) + np.exp(-gate_logit)))[:, None]
        return total

    def _rope_tables(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        key = (start, n)
        tables = self._rope.get(key)
        if tables is None:
            if len(self._rope) > 8:
                self._rope.clear()
            tables = self._rope[key] = rope_angles(self.config, np.arange(start, start + n), self.rope_freqs)
        return tables

    def _attention(self, il: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int,
                   cache: KVCache | None, out: np.ndarray) -> None:
        """q (B, T, n_head, d), k/v (B, T, n_head_kv, d) -> out (B, T, n_head*d), a contiguous array."""
        c = self.config
        B, T = q.shape[:2]
        G, d, n_kv = c.n_group, c.head_dim, c.n_head_kv
        f16_cache = cache is not None and cache.k[il].dtype == np.float16
        for b in range(B):
            if f16_cache:
                store = _sized(store_f16_, _store_f16_serial, T * k.shape[2] * d)
                store(k[b], cache.k[il][b, :, start:start + T].view(np.uint16))
                store(v[b], cache.v[il][b, :, start:start + T].view(np.uint16))
                keys, values = cache.k[il][b], cache.v[il][b]
            elif cache is not None:
                keys, values = cache.k[il][b], cache.v[il][b]
            else:
                keys, values = self._ws("keys", (n_kv, T, d)), self._ws("values", (n_kv, T, d))
            # query head h reads key/value head h // G: each kv head's G query heads, query-major, form one
            # matrix whose consecutive row blocks are consecutive queries
            queries = self._ws("queries", (n_kv, T * G, d))
            context = self._ws("context", (n_kv, T * G, d))
            out_heads = out[b].view()
            out_heads.shape = (T, n_kv, G, d)      # a view of out's row, never a copy (an error if it cannot be)
            if T <= ATTEND_FEW_MAX_QUERIES:         # decoding: one pass over the cache, no score matrix
                if not f16_cache:
                    keys[:, start:start + T] = k[b].transpose(1, 0, 2)
                    values[:, start:start + T] = v[b].transpose(1, 0, 2)
                queries.reshape(n_kv, T, G, d)[...] = q[b].reshape(T, n_kv, G, d).transpose(1, 0, 2, 3)
                if keys.dtype == np.float16:        # read as their bit patterns (numba has no float16)
                    keys, values = keys.view(np.uint16), values.view(np.uint16)
                _sized(attend_few_, _attend_few_serial, n_kv * T * G * (start + T) * d)(
                    queries, keys, values, start, self.alibi, G, context)
                out_heads[...] = context.reshape(n_kv, T, G, d).transpose(1, 0, 2, 3)
                continue
            if f16_cache:                           # the positions so far as float32, for BLAS
                n_all = start + T
                keys32 = self._ws("keys", (n_kv, n_all, d))
                values32 = self._ws("values", (n_kv, n_all, d))
                widen_f16_(keys.view(np.uint16), n_all, keys32)
                widen_f16_(values.view(np.uint16), n_all, values32)
                keys, values = keys32, values32
            self._attend_heads(q[b], k[b], v[b], None if f16_cache else start, keys, values, queries, context,
                               out_heads, start)

    def _attend_heads(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, store_at: int | None, keys: np.ndarray,
                      values: np.ndarray, queries: np.ndarray, context: np.ndarray, out_heads: np.ndarray,
                      start: int) -> None:
        """Causal attention of one sequence's T queries (q (T, n_head, d); k, v (T, n_head_kv, d), stored into
        keys / values (n_kv, positions, d) at `store_at` unless None) into out_heads (T, n_kv, G, d).

        The work is shared out among worker threads, each with single-threaded BLAS and the serial softmax: on many
        cores numpy's batched matmul would run one small product per head after another (128 x 128 x n_k each),
        each split over all of BLAS's threads, and the copies in and out would run on one core. Three rounds: the
        copies in, by positions; the (kv head, query block) pairs, in runs of heads of equal cost per thread
        (`attention_runs`); the copies out, by positions. Every score and output is computed the same way on any
        thread count (tests/test_eval_model.py)."""
        c = self.config
        T, n_kv, G, d = q.shape[0], c.n_head_kv, c.n_group, c.head_dim
        alibi = self.alibi
        n_scores = n_kv * G * T * (start + T)      # a bound, as if nothing were masked
        jobs = max(1, min(get_num_threads(), T, n_scores // ATTENTION_JOB_SCORES))
        runs = attention_runs(n_kv, T, G, start, jobs)
        sizes = [max((h1 - h0) * (q1 - q0) * G * (start + q1) for q0, q1, h0, h1 in job) if job else 0
                 for job in runs]
        scores = self._ws("scores", (sum(sizes),))
        offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        grouped = queries.reshape(n_kv, T, G, d)

        def copy_in(j: int) -> None:
            t0, t1 = j * T // jobs, (j + 1) * T // jobs
            if store_at is not None:
                keys[:, store_at + t0:store_at + t1] = k[t0:t1].transpose(1, 0, 2)
                values[:, store_at + t0:store_at + t1] = v[t0:t1].transpose(1, 0, 2)
            grouped[:, t0:t1] = q[t0:t1].reshape(t1 - t0, n_kv, G, d).transpose(1, 0, 2, 3)

        def attend(j: int) -> None:
            for q0, q1, h0, h1 in runs[j]:
                n_k = start + q1                # queries [q0, q1) need keys [0, start + q1) only (causal)
                rows = slice(q0 * G, q1 * G)
                block = scores[offsets[j]:offsets[j] + (h1 - h0) * (q1 - q0) * G * n_k].reshape(
                    h1 - h0, (q1 - q0) * G, n_k)
                np.matmul(queries[h0:h1, rows], keys[h0:h1, :n_k].transpose(0, 2, 1), out=block)
                softmax = _causal_softmax_serial if jobs > 1 else _sized(causal_softmax_, _causal_softmax_serial,
                                                                         block.size)
                softmax(block, start + q0, alibi[h0 * G:h1 * G] if alibi.size else alibi, G)
                np.matmul(block, values[h0:h1, :n_k], out=context[h0:h1, rows])

        def copy_out(j: int) -> None:
            t0, t1 = j * T // jobs, (j + 1) * T // jobs
            out_heads[t0:t1] = context.reshape(n_kv, T, G, d)[:, t0:t1].transpose(1, 0, 2, 3)

        with single_threaded_blas():
            for step in (copy_in, attend, copy_out):
                if jobs == 1:
                    step(0)
                else:
                    pool = worker_pool(jobs)
                    for done in [pool.submit(step, j) for j in range(jobs)]:
                        done.result()

    # --- the pass -----------------------------------------------------------------------------------------------
    def forward(self, tokens: np.ndarray, *, output_from: int = 0, cache: KVCache | None = None) -> np.ndarray:
        """Logits (B, T - output_from, n_vocab) float32 for token ids (B, T) (or (T,) -> (T - output_from, n_vocab)).

        Each row of `tokens` is one sequence at positions 0..T-1, or, with a `cache`, at positions
        cache.length.. (the cache is extended by T). Only positions >= output_from get logits.
        """
        tokens = np.asarray(tokens)
        squeeze = tokens.ndim == 1
        if squeeze:
            tokens = tokens[None]
        B, T = tokens.shape
        c, w, ws = self.config, self.weights, self._ws
        start = 0
        if cache is not None:
            start = cache.length
            if cache.k[0].shape[0] != B or start + T > cache.capacity:
                raise QtoolError(f"KV cache holds {cache.k[0].shape[0]} sequences of {cache.capacity} positions; "
                                 f"got {B} x {T} tokens after {start}")
        if not 0 <= output_from <= T:
            raise ValueError(f"output_from {output_from} outside 0..{T}")
        d, nq = c.head_dim, c.n_head * c.head_dim
        rows = B * T
        inv_sqrt_d = np.float32(1.0 / math.sqrt(d))

        x = w.rows("token_embd.weight", tokens.reshape(-1))          # (B*T, n_embd)
        cos, sin = self._rope_tables(start, T) if c.position == "rope" else (None, None)
        attn_out = ws("attn_out", (B, T, nq))
        compiled = (self._compiled_layers() if B == T == 1 and cache is not None and cache.k[0].dtype == np.float16
                    else None)
        for il in range(c.n_layer):
            if compiled is not None:
                compiled.run(il, x, cos, sin, start, cache)
                continue
            p = f"blk.{il}."
            h = _Input(rms_norm(x, w.get(p + "attn_norm.weight"), c.rms_eps, out=ws("normed", (rows, c.n_embd))), ws)
            if c.is_recurrent(il):
                state = cache.recurrent[il] if cache is not None else None
                x += gated_deltanet(c.deltanet, w, self._project, p, h, B, T, state, resume=start > 0)
            else:
                gate = None
                if c.attn_output_gate:      # per head: the query, then its output gate
                    qg = self._linear(p + "attn_q", h, "q").reshape(B, T, c.n_head, 2 * d)
                    q, gate = np.ascontiguousarray(qg[..., :d]), qg[..., d:].reshape(rows, nq)
                else:
                    q = self._linear(p + "attn_q", h, "q").reshape(B, T, c.n_head, d)
                k = self._linear(p + "attn_k", h, "k").reshape(B, T, c.n_head_kv, d)
                v = self._linear(p + "attn_v", h, "v").reshape(B, T, c.n_head_kv, d)
                if c.qk_norm:
                    rms_norm(q, w.get(p + "attn_q_norm.weight"), c.rms_eps, out=q)
                    rms_norm(k, w.get(p + "attn_k_norm.weight"), c.rms_eps, out=k)
                if cos is not None:
                    apply_rope(q, cos, sin, c.rope_style)
                    apply_rope(k, cos, sin, c.rope_style)
                q *= inv_sqrt_d
                self._attention(il, q, k, v, start, cache, attn_out)
                if gate is not None:
                    attn_out.reshape(rows, nq)[...] *= np.float32(1.0) / (np.float32(1.0) + np.exp(-gate))
                x += self._linear(p + "attn_output", _Input(attn_out.reshape(rows, nq), ws), "o")

            if il == c.n_layer - 1 and 0 < output_from < T and self.on_matmul_input is None:
                # as llama.cpp's last layer (inp_out_ids): past its attention, only the rows that get logits
                x = np.ascontiguousarray(x.reshape(B, T, c.n_embd)[:, output_from:]).reshape(-1, c.n_embd)
                rows = x.shape[0]
            ffn_norm = w.get(p + c.ffn_norm + ".weight")
            h = _Input(rms_norm(x, ffn_norm, c.rms_eps, out=ws("normed", (rows, c.n_embd))), ws)
            if c.n_expert:
                x += self._moe(p, h)
            else:
                x += self._ffn(p + "ffn_gate", p + "ffn_up", p + "ffn_down", h)

        if cache is not None:
            cache.length = start + T
        n_out = T - output_from
        final = x if rows == B * n_out else x.reshape(B, T, c.n_embd)[:, output_from:].reshape(B * n_out, c.n_embd)
        final = rms_norm(final, w.get("output_norm.weight"), c.rms_eps)
        logits = self._output(final)
        logits = logits.reshape(B, n_out, c.n_vocab)
        return logits[0] if squeeze else logits

    def prepare_decoding(self) -> None:
        """Compile now what decoding one token at a time with an F16 cache will run (evaluate/step.py), so that the
        first decoded token's time is its own."""
        compiled = self._compiled_layers()
        if compiled is not None:
            compiled.warm_up()

    def warm_up(self, tokens, f16: bool = True) -> None:
        """One pass over the first WARM_UP_TOKENS of `tokens` through a scratch KV cache (F16 or float32), its results
        dropped, as llama.cpp's tools run a warm-up before they time anything: the pass that follows does not pay
        for loading the batched path's kernels from numba's cache (serial and parallel builds: _load_twins) and for
        paging in the weights. Not with an input hook, which would see these tokens."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)[:WARM_UP_TOKENS]
        if self.on_matmul_input is not None or tokens.size == 0:
            return
        cache = KVCache.allocate(self.config, batch=1, max_len=tokens.size, f16=f16)
        self.forward(tokens[None], output_from=tokens.size - 1, cache=cache)
        _load_twins()

    def _compiled_layers(self):
        """evaluate.step.CompiledLayers for this model's one-token steps, or None (turned off, a cache other than
        F16, an input hook, or a layer that needs forward's steps)."""
        if not self.compiled_decoding or self.on_matmul_input is not None:
            return None
        if self._compiled is None:
            from qtool.evaluate.step import compiled_layers
            self._compiled = compiled_layers(self) or False
        return self._compiled or None

    def _output(self, h: np.ndarray) -> np.ndarray:
        """The logits, in a new array."""
        return self._linear(self.output_name.removesuffix(".weight"), _Input(h, self._ws),
                            out=np.empty((h.shape[0], self.config.n_vocab), np.float32))
