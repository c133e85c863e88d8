"""The Gated DeltaNet ("linear attention") layer of the Qwen3.5 hybrids, in float32 numpy with one numba kernel.

The math of transformers' Qwen3_5GatedDeltaNet and of llama.cpp's qwen35 graph (src/models/qwen35.cpp,
delta-net-base.cpp), for the token mixer of a recurrent layer, on the attn_norm'ed input h:

    qkv = silu(causal_conv1d(h W_qkv^T))            depthwise, kernel K, over the last K-1 inputs + this one
    q, k = l2_normalize(per key head), q /= sqrt(d_k) ;  v  per value head
    beta = sigmoid(h W_beta^T) ;  g = ssm_a * softplus(h W_alpha^T + dt_bias)      (ssm_a = -exp(A_log) < 0)
    per value head, token by token, on a (d_k, d_v) state S:
        S = exp(g) S ;  S += k (beta (v - S^T k))^T ;  o = S^T q                   (the gated delta rule)
    out = (rms_norm(o) * ssm_norm * silu(h W_gate^T)) W_out^T                      per value head

Value head j reads key head j % n_k_heads: the converter tiles the value heads (convert/qwen35.py, tile_v_heads)
so that ggml's broadcast of the key heads over the value heads is a plain repeat.

The state of one sequence is the conv's last K-1 inputs and S per value head (`DeltaNetState`); a prefill runs the
recurrence sequentially over its tokens (a numba kernel, parallel over sequences x heads), and decoding one token
is the same kernel with T = 1. llama.cpp's chunked form computes the same function in another summation order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from numba import njit, prange

# (tensor name, matrix-product input, work-buffer role) -> (rows, n_out) float32: the model's matrix product, with
# its activation rounding and importance-matrix hook. The input is the model's shared input object or a float32
# array of rows.
Project = Callable[[str, Any, str], np.ndarray]

# ggml_softplus and torch's softplus both return x itself above this (log1p(exp(x)) == x in float32 there anyway).
SOFTPLUS_THRESHOLD = 20.0


@dataclass(frozen=True)
class DeltaNetConfig:
    """The ssm.* keys of a qwen35 / qwen35moe GGUF."""

    conv_kernel: int        # ssm.conv_kernel
    n_k_heads: int          # ssm.group_count
    n_v_heads: int          # ssm.time_step_rank
    k_dim: int              # ssm.state_size
    v_dim: int              # ssm.inner_size / ssm.time_step_rank
    eps: float              # attention.layer_norm_rms_epsilon: the l2 norms' and the gated norm's epsilon

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim

    def tensor_shapes(self, prefix: str, n_embd: int) -> dict[str, tuple[int, ...]]:
        """The layer's tensors as numpy shapes (ssm_beta / ssm_alpha rows per value head)."""
        nv, inner = self.n_v_heads, self.n_v_heads * self.v_dim
        return {prefix + "attn_qkv.weight": (self.conv_channels, n_embd), prefix + "attn_gate.weight": (inner, n_embd),
                prefix + "ssm_beta.weight": (nv, n_embd), prefix + "ssm_alpha.weight": (nv, n_embd),
                prefix + "ssm_a": (nv,), prefix + "ssm_dt.bias": (nv,),
                prefix + "ssm_conv1d.weight": (self.conv_channels, self.conv_kernel),
                prefix + "ssm_norm.weight": (self.v_dim,), prefix + "ssm_out.weight": (n_embd, inner)}


@dataclass
class DeltaNetState:
    """One recurrent layer's state for a batch of sequences."""

    conv: np.ndarray        # (batch, K - 1, channels): the conv's last K-1 inputs (the projected qkv rows)
    ssm: np.ndarray         # (batch, n_v_heads, d_k, d_v)

    @classmethod
    def zeros(cls, cfg: DeltaNetConfig, batch: int) -> DeltaNetState:
        return cls(np.zeros((batch, cfg.conv_kernel - 1, cfg.conv_channels), np.float32),
                   np.zeros((batch, cfg.n_v_heads, cfg.k_dim, cfg.v_dim), np.float32))


@njit(parallel=True, cache=True)
def gated_delta_rule_(q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray,
                      state: np.ndarray, out: np.ndarray) -> None:
    """The recurrence over T tokens, in place on state (B, H_v, d_k, d_v); out (B, T, H_v, d_v).

    q, k (B, T, H_k, d_k) normalized (q also scaled), v (B, T, H_v, d_v), g and beta (B, T, H_v); value head h
    reads key head h % H_k. Per token: S *= exp(g); d = beta (v - S^T k); S += k d^T; o = S^T q.
    """
    B, T, n_k, d_k = q.shape
    n_v, d_v = v.shape[2], v.shape[3]
    for idx in prange(B * n_v):
        b = idx // n_v
        h = idx - b * n_v
        hk = h % n_k
        s = state[b, h]
        delta = np.empty(d_v, np.float32)
        for t in range(T):
            decay = np.float32(math.exp(g[b, t, h]))
            for j in range(d_v):
                delta[j] = 0.0
            for i in range(d_k):
                ki = k[b, t, hk, i]
                for j in range(d_v):
                    s[i, j] *= decay
                    delta[j] += s[i, j] * ki
            bt = beta[b, t, h]
            for j in range(d_v):
                delta[j] = (v[b, t, h, j] - delta[j]) * bt
                out[b, t, h, j] = 0.0
            for i in range(d_k):
                ki, qi = k[b, t, hk, i], q[b, t, hk, i]
                for j in range(d_v):
                    s[i, j] += ki * delta[j]
                    out[b, t, h, j] += s[i, j] * qi


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(1.0) / (np.float32(1.0) + np.exp(-x))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.where(x > SOFTPLUS_THRESHOLD, x, np.log1p(np.exp(np.minimum(x, SOFTPLUS_THRESHOLD)))).astype(np.float32)


def _inverse_norm(x: np.ndarray, eps: float, mean: bool) -> np.ndarray:
    """1 / sqrt(sum (or mean) of squares over the last axis + eps), keepdims; sums in float64 as ggml."""
    squares = np.einsum("...i,...i->...", x, x, dtype=np.float64)
    if mean:
        squares /= x.shape[-1]
    return (1.0 / np.sqrt(squares + eps)).astype(np.float32)[..., None]


def causal_conv(x: np.ndarray, history: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Depthwise causal conv of x (B, T, C) after `history` (B, K-1, C), kernel (C, K): out[t] = sum_j
    kernel[:, j] * input[t - (K-1) + j], where input is history followed by x."""
    B, T, C = x.shape
    K = kernel.shape[1]
    padded = np.concatenate([history, x], axis=1)                # (B, K-1+T, C)
    out = padded[:, 0:T] * kernel[:, 0]
    for j in range(1, K):
        out += padded[:, j:j + T] * kernel[:, j]
    return out


def gated_deltanet(cfg: DeltaNetConfig, weights: Any, project: Project, prefix: str, h: Any,
                   batch: int, n_tokens: int, state: DeltaNetState | None, resume: bool) -> np.ndarray:
    """The token mixer of one recurrent layer: (batch * n_tokens, n_embd) float32, to be added to the residual.

    `h` is the normed input (the model's shared product input), `weights` the GGUFWeights (small tensors via get),
    `state` the layer's state to continue from (when `resume`) and to leave the new state in; None: start from
    zeros and keep nothing.
    """
    B, T = batch, n_tokens
    nk, nv, dk, dv = cfg.n_k_heads, cfg.n_v_heads, cfg.k_dim, cfg.v_dim
    get = weights.get

    qkv = project(prefix + "attn_qkv", h, "dn_qkv").reshape(B, T, cfg.conv_channels)
    z = project(prefix + "attn_gate", h, "dn_gate").reshape(B, T, nv, dv)
    beta = _sigmoid(project(prefix + "ssm_beta", h, "dn_beta")).reshape(B, T, nv)
    alpha = project(prefix + "ssm_alpha", h, "dn_alpha").reshape(B, T, nv)
    g = (_softplus(alpha + get(prefix + "ssm_dt.bias")) * get(prefix + "ssm_a")).astype(np.float32)

    if resume and state is not None:
        history = state.conv
    else:
        history = np.zeros((B, cfg.conv_kernel - 1, cfg.conv_channels), np.float32)
    mixed = causal_conv(qkv, history, get(prefix + "ssm_conv1d.weight"))
    if state is not None and cfg.conv_kernel > 1:
        state.conv[...] = np.concatenate([history, qkv], axis=1)[:, T:]
    mixed *= _sigmoid(mixed)                                                   # silu

    n_qk = nk * dk
    q = mixed[..., :n_qk].reshape(B, T, nk, dk)
    k = mixed[..., n_qk:2 * n_qk].reshape(B, T, nk, dk)
    v = np.ascontiguousarray(mixed[..., 2 * n_qk:].reshape(B, T, nv, dv))
    q = q * (_inverse_norm(q, cfg.eps, mean=False) * np.float32(1.0 / math.sqrt(dk)))
    k = k * _inverse_norm(k, cfg.eps, mean=False)

    if state is None:
        ssm = np.zeros((B, nv, dk, dv), np.float32)
    else:
        ssm = state.ssm
        if not resume:
            ssm[...] = 0.0
    o = np.empty((B, T, nv, dv), np.float32)
    gated_delta_rule_(q, k, v, np.ascontiguousarray(g), np.ascontiguousarray(beta), ssm, o)

    o *= _inverse_norm(o, cfg.eps, mean=True)
    o *= get(prefix + "ssm_norm.weight")
    o *= z * _sigmoid(z)
    return project(prefix + "ssm_out", o.reshape(B * T, nv * dv), "o")


__all__ = ["DeltaNetConfig", "DeltaNetState", "causal_conv", "gated_delta_rule_", "gated_deltanet"]
