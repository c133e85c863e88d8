"""The numpy forward pass against an independent float64 reference written from the HF weights and HF conventions.

The reference below never looks at the GGUF file: it reads the checkpoint as HF stores it (unpermuted q/k,
W_pack, lm_head), applies rotary embedding as HF does (rotate_half on halves), repeats k/v heads, builds
ALiBi slopes the way Baichuan-13B's `_get_interleave` does, and applies Baichuan2's NormHead. Agreement
therefore checks the converter's layout and the model's reading of it together.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest

from qtool.convert.converter import plan_conversion, write_plan
from qtool.errors import QtoolError
from qtool.evaluate.model import (KVCache, Model, alibi_slopes, apply_rope, causal_softmax_, rms_norm,
                                  rope_angles, silu_mul_)
from qtool.evaluate.weights import GGUFWeights, MemoryBudget
from qtool.gguf_io import GGUFValueType, PlannedTensor, read_gguf, write_gguf
from tests.fixtures.checkpoints import read_checkpoint_tensors
from tests.interop import need_module

RTOL = 1e-4


# --- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def gguf_of(checkpoint_factory, tmp_path_factory):
    """(variant, outtype, **config overrides) -> (checkpoint dir, GGUF path), converted once per session."""
    cache: dict[str, tuple[Path, Path]] = {}
    root = tmp_path_factory.mktemp("eval_gguf")

    def get(variant: str, outtype: str = "f32", **overrides) -> tuple[Path, Path]:
        key = json.dumps([variant, outtype, overrides], sort_keys=True)
        if key not in cache:
            ckpt = checkpoint_factory(variant, **overrides)
            out = root / f"m{len(cache)}-{variant}-{outtype}.gguf"
            plan = plan_conversion(ckpt, outtype)
            try:
                write_plan(plan, out)
            finally:
                plan.close()
            cache[key] = (ckpt, out)
        return cache[key]

    return get


def load(path: Path, budget: int | None = None) -> Model:
    return Model(GGUFWeights(path, MemoryBudget(budget) if budget is not None else None))


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours.astype(np.float64) - ref)) / np.max(np.abs(ref)))


# --- the independent reference -----------------------------------------------------------------------------------

def hf_interleave_slopes(n: int) -> list[float]:
    """Baichuan-13B's ALiBi slopes (`_get_interleave` in its modeling file)."""
    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + hf_interleave_slopes(2 * closest)[0::2][: n - closest]


def hf_inv_freq(config: dict, dim: int) -> tuple[np.ndarray, float]:
    """HF's rotary inverse frequencies (and cos/sin scale) for the config's rope scaling."""
    base = float(config.get("rope_theta", 10000.0))
    inv = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    rs = config.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "linear":
        return inv / rs["factor"], 1.0
    if kind == "llama3":
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        factor, old = rs["factor"], rs["original_max_position_embeddings"]

        def corr(rot: float) -> float:
            return dim * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(corr(32)), 0), min(math.ceil(corr(1)), dim - 1)
        if low == high:
            high += 0.001
        extrap = 1 - np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
        return (inv / factor) * (1 - extrap) + inv * extrap, 0.1 * math.log(factor) + 1.0
    assert kind in (None, "default"), kind
    return inv, 1.0


def hf_forward(model_dir: Path, tokens: np.ndarray, position: str = "auto") -> np.ndarray:
    """float64 logits (T, vocab) of one sequence, from the HF checkpoint, the HF way."""
    config = json.loads((model_dir / "config.json").read_text())
    sd = {k: v.astype(np.float64) for k, v in read_checkpoint_tensors(model_dir).items()}
    family = config["model_type"]
    H, n_layer = config["hidden_size"], config["num_hidden_layers"]
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    hd = config.get("head_dim") or H // n_head
    eps = config["rms_norm_eps"]
    T = len(tokens)
    if position == "auto":
        position = "alibi" if family == "baichuan" and n_layer == 40 else "rope"

    def norm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rotate_half(x):
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    inv_freq, cs_scale = hf_inv_freq(config, hd)
    freqs = np.arange(T)[:, None] * inv_freq[None]
    emb = np.concatenate([freqs, freqs], axis=-1)
    cos, sin = np.cos(emb) * cs_scale, np.sin(emb) * cs_scale
    mask = np.triu(np.full((T, T), -np.inf), 1)
    if position == "alibi":
        slopes = np.array(hf_interleave_slopes(n_head))
        mask = mask[None] + slopes[:, None, None] * np.arange(T)[None, None, :]

    x = sd["model.embed_tokens.weight"][tokens]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        a = norm(x, sd[p + "input_layernorm.weight"])
        if family == "baichuan":
            q, k, v = np.split(a @ sd[p + "self_attn.W_pack.weight"].T, 3, axis=-1)
        else:
            q, k, v = (a @ sd[p + f"self_attn.{n}_proj.weight"].T + sd.get(p + f"self_attn.{n}_proj.bias", 0.0)
                       for n in "qkv")
        q = q.reshape(T, n_head, hd).transpose(1, 0, 2)
        k = k.reshape(T, n_kv, hd).transpose(1, 0, 2)
        v = v.reshape(T, n_kv, hd).transpose(1, 0, 2)
        if family == "qwen3":
            q, k = norm(q, sd[p + "self_attn.q_norm.weight"]), norm(k, sd[p + "self_attn.k_norm.weight"])
        if position == "rope":
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, n_head // n_kv, axis=0), np.repeat(v, n_head // n_kv, axis=0)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(T, n_head * hd)
        x = x + o @ sd[p + "self_attn.o_proj.weight"].T + sd.get(p + "self_attn.o_proj.bias", 0.0)
        f = norm(x, sd[p + "post_attention_layernorm.weight"])
        g, u = f @ sd[p + "mlp.gate_proj.weight"].T, f @ sd[p + "mlp.up_proj.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ sd[p + "mlp.down_proj.weight"].T
    x = norm(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    modeling = model_dir / "modeling_baichuan.py"
    if modeling.exists() and "class NormHead" in modeling.read_text():
        head = head / np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-12)
    return x @ head.T


def random_tokens(n_vocab: int, T: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, min(n_vocab, 32000), size=T)


# --- agreement ----------------------------------------------------------------------------------------------------

VARIANTS = ["llama-spm",      # MHA, NORM rope on permuted q/k, separate output
            "llama-bpe",      # GQA, tied output, llama3 rope_freqs tensor from the converter
            "qwen2",          # NEOX rope, q/k/v bias, GQA, tied
            "qwen3",          # q/k norm, head_dim != hidden/heads
            "baichuan-7b",    # 32 layers: W_pack, NORM rope
            "baichuan-13b",   # 40 layers: ALiBi
            "baichuan2"]      # NormHead


@pytest.mark.parametrize("variant", VARIANTS)
def test_f32_logits_equal_the_float64_reference(variant, gguf_of):
    ckpt, path = gguf_of(variant)
    model = load(path)
    tokens = random_tokens(model.n_vocab, 40, seed=len(variant))
    ours = model.forward(tokens)
    ref = hf_forward(ckpt, tokens)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) < RTOL


# Rope scaling with short original contexts and a small base, so that 40 positions feel it. Making each of these
# through the converter would cost a checkpoint and a conversion per case; the converter's own tests cover the keys
# it writes, so here the GGUF metadata (and llama3's rope_freqs tensor) is edited to match the HF config.
def _llama3_short() -> dict:
    return {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}


SCALED = {
    "linear": ("llama-spm", {"rope_scaling": {"type": "linear", "factor": 4.0}},
               {"llama.rope.scaling.type": ("linear", GGUFValueType.STRING),
                "llama.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32)}),
    "yarn": ("qwen2", {"rope_theta": 10000.0,
                       "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
             {"qwen2.rope.freq_base": (10000.0, GGUFValueType.FLOAT32),
              "qwen2.rope.scaling.type": ("yarn", GGUFValueType.STRING),
              "qwen2.rope.scaling.factor": (4.0, GGUFValueType.FLOAT32),
              "qwen2.rope.scaling.original_context_length": (64, GGUFValueType.UINT32)}),
    "llama3": ("llama-bpe", {"rope_theta": 10000.0, "rope_scaling": _llama3_short()},
               {"llama.rope.freq_base": (10000.0, GGUFValueType.FLOAT32)}),
}


@pytest.fixture(scope="session")
def scaled_case(gguf_of, tmp_path_factory):
    cache: dict[str, tuple[Path, Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path, Path]:
        """(original checkpoint, checkpoint with the scaled config, GGUF with the scaled metadata)."""
        if case not in cache:
            variant, config_changes, kv_changes = SCALED[case]
            ckpt, path = gguf_of(variant)
            root = tmp_path_factory.mktemp(f"scaled-{case}")
            scaled_ckpt = _with_config(ckpt, root / "ckpt", config_changes)
            replace = {}
            if case == "llama3":
                config = json.loads((scaled_ckpt / "config.json").read_text())
                unscaled, _ = hf_inv_freq({**config, "rope_scaling": None}, config["head_dim"])
                scaled, _ = hf_inv_freq(config, config["head_dim"])
                replace["rope_freqs.weight"] = (unscaled / scaled).astype(np.float32)
            cache[case] = (ckpt, scaled_ckpt, _rewrite(path, root / "m.gguf", set_kv=kv_changes,
                                                       replace_tensors=replace))
        return cache[case]

    return get


def _with_config(ckpt: Path, dst: Path, changes: dict) -> Path:
    dst.mkdir()
    for f in ckpt.iterdir():
        if f.name != "config.json":
            (dst / f.name).symlink_to(f)
    config = json.loads((ckpt / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("case", list(SCALED))
def test_rope_scaling_matches_the_reference_and_is_visible(case, scaled_case):
    ckpt, scaled_ckpt, path = scaled_case(case)
    model = load(path)
    tokens = random_tokens(model.n_vocab, 40, seed=9)
    ours = model.forward(tokens)
    assert rel_err(ours, hf_forward(scaled_ckpt, tokens)) < RTOL
    # ignoring the scaling would be caught at this tolerance
    assert rel_err(ours, hf_forward(ckpt, tokens)) > 10 * RTOL


def test_baichuan_at_other_depths_has_no_position_encoding(gguf_of):
    """llama.cpp gives Baichuan models of neither 32 nor 40 layers no RoPE and no ALiBi."""
    ckpt, path = gguf_of("baichuan-7b", num_hidden_layers=3)
    model = load(path)
    assert model.config.position == "none"
    tokens = random_tokens(model.n_vocab, 24)
    ours = model.forward(tokens)
    assert rel_err(ours, hf_forward(ckpt, tokens, position="none")) < RTOL
    assert rel_err(ours, hf_forward(ckpt, tokens, position="rope")) > 10 * RTOL


def test_alibi_slopes_match_baichuan_for_many_head_counts():
    for n in (1, 2, 4, 5, 8, 12, 40, 64):
        np.testing.assert_allclose(alibi_slopes(n, 8.0), hf_interleave_slopes(n), rtol=1e-6)


def test_yarn_angles_follow_ggml(scaled_case):
    _, scaled_ckpt, path = scaled_case("yarn")
    cfg = load(path).config
    assert cfg.yarn_orig_ctx == 64 and cfg.rope_freq_scale == 0.25
    cos, sin = rope_angles(cfg, np.arange(5), None)
    inv, scale = hf_inv_freq(json.loads((scaled_ckpt / "config.json").read_text()), cfg.n_rot)
    np.testing.assert_allclose(cos, np.cos(np.arange(5)[:, None] * inv) * scale, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(np.arange(5)[:, None] * inv) * scale, rtol=1e-6, atol=1e-6)


# --- numba kernels against plain numpy ------------------------------------------------------------------------

def test_rms_norm_kernel():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, (7, 96)).astype(np.float32)
    x[1] = 0.0                                       # all zero: eps keeps it finite
    x[2, 5] = 1e6                                    # one huge outlier
    x[3] *= 1e-20                                    # tiny values
    w = rng.normal(1, 0.1, 96).astype(np.float32)
    xd = x.astype(np.float64)
    ref = xd / np.sqrt((xd * xd).mean(1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(rms_norm(x, w, 1e-6), ref, rtol=2e-6, atol=1e-30)
    inplace = x.copy()
    rms_norm(inplace, w, 1e-6, out=inplace)
    np.testing.assert_array_equal(inplace, rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("style, n_rot", [("norm", 16), ("neox", 16), ("neox", 8)])
def test_rope_kernel(style, n_rot):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    theta = rng.uniform(0, 50, (5, n_rot // 2))
    cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    ref = x.astype(np.float64).copy()
    half = n_rot // 2
    a = np.arange(half) * 2 if style == "norm" else np.arange(half)
    b = a + 1 if style == "norm" else a + half
    x0, x1 = ref[..., a].copy(), ref[..., b].copy()
    c, s_ = cos[:, None, :], sin[:, None, :]
    ref[..., a], ref[..., b] = x0 * c - x1 * s_, x0 * s_ + x1 * c
    ours = x.copy()
    apply_rope(ours, cos, sin, style)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ours[..., n_rot:], x[..., n_rot:])    # dims past n_rot pass through


def _reference_softmax(scores: np.ndarray, start: int, slopes: np.ndarray, n_group: int) -> np.ndarray:
    """float64 causal softmax of scores (n_kv, n_q * n_group, n_k), rows query-major: row r is query r // n_group
    (at position start + r // n_group) of head (kv head) * n_group + r % n_group."""
    n_kv, n_rows, n_k = scores.shape
    ref = scores.reshape(n_kv, n_rows // n_group, n_group, n_k).copy()
    q_pos = (start + np.arange(n_rows // n_group))[:, None, None]
    k_pos = np.arange(n_k)[None, None, :]
    if slopes.size:
        ref += slopes.reshape(n_kv, 1, n_group, 1) * (k_pos - q_pos)
    ref = np.where(k_pos > q_pos, -np.inf, ref)
    ref = np.exp(ref - ref.max(-1, keepdims=True))
    return (ref / ref.sum(-1, keepdims=True)).reshape(scores.shape)


@pytest.mark.parametrize("n_group, start, alibi", [(1, 0, False), (3, 0, False), (2, 4, False), (2, 0, True),
                                                   (1, 3, True), (1, 45, False), (3, 21, True)])
def test_causal_softmax_kernel(n_group, start, alibi):
    """Rows of 1 to 51 scores: shorter and longer than the 8 running maxima and sums of a row (common.running_max,
    _row_sum64), with a dominant score in the first lane and one in a later lane (or past a short row's end)."""
    rng = np.random.default_rng(2)
    n_kv, n_q = 2, 6
    n_k = start + n_q
    scores = rng.normal(0, 5, (n_kv, n_q * n_group, max(n_k, 14))).astype(np.float32)[:, :, :n_k].copy()
    scores[0, 1, 0] = 80.0                            # a dominant score
    if n_k > 13:
        scores[1, -1, 13] = 90.0                      # in lane 5 of the second group of 8 (masked for start < 8)
    slopes = alibi_slopes(n_kv * n_group, 8.0) if alibi else np.empty(0, np.float32)
    ref = _reference_softmax(scores.astype(np.float64), start, slopes, n_group)
    ours = scores.copy()
    causal_softmax_(ours, start, slopes, n_group)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_group, start, n_q, alibi", [(1, 0, 1, False), (1, 37, 1, False), (3, 20, 2, False),
                                                        (2, 9, 4, True), (1, 300, 1, True)])
@pytest.mark.parametrize("kernel", ["parallel", "serial"])
def test_attend_few_kernel(n_group, start, n_q, alibi, kernel):
    """Decoding's attention (one pass over the cache) against float64 softmax(q K^T) V, causal per query; rows
    query-major as causal_softmax_'s; the cache longer than the positions (its tail must not be read)."""
    rng = np.random.default_rng(5 + start)
    n_kv, d = 3, 64
    n_k = start + n_q
    q = rng.normal(0, 1, (n_kv, n_q * n_group, d)).astype(np.float32)
    keys = rng.normal(0, 1, (n_kv, n_k + 7, d)).astype(np.float32)
    values = rng.normal(0, 1, (n_kv, n_k + 7, d)).astype(np.float32)
    keys[:, n_k:] = values[:, n_k:] = np.nan                         # past the last position: never read
    q[0, 0] *= 6.0                                                   # a peaked row
    slopes = alibi_slopes(n_kv * n_group, 8.0) if alibi else np.empty(0, np.float32)
    scores = np.einsum("hrd,hkd->hrk", q.astype(np.float64), keys[:, :n_k].astype(np.float64))
    weights = _reference_softmax(scores, start, slopes, n_group)
    ref = np.einsum("hrk,hkd->hrd", weights, values[:, :n_k].astype(np.float64))
    out = np.full_like(q, np.nan)
    from qtool.evaluate import model as M
    fn = M.attend_few_ if kernel == "parallel" else M._attend_few_serial
    fn(q, keys, values, start, slopes, n_group, out)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["parallel", "serial"])
def test_attend_few_reads_an_f16_cache_as_its_float32_values(kernel):
    """An F16 cache (its bit patterns, uint16) gives bit for bit what the same values as float32 give: the widening
    is exact and the sums run in the same order; NaN past the last position is never read in either form."""
    from qtool.evaluate import model as M
    rng = np.random.default_rng(11)
    n_kv, n_group, d, start = 2, 3, 64, 150
    q = rng.normal(0, 1, (n_kv, n_group, d)).astype(np.float32)
    keys = (rng.normal(0, 3, (n_kv, start + 9, d))).astype(np.float16)
    values = rng.normal(0, 1, (n_kv, start + 9, d)).astype(np.float16)
    keys[:, start + 1:] = values[:, start + 1:] = np.nan
    keys[0, :4, :3] = [[65504.0, -6.1e-5, 1e-7]] * 4 / np.float32(1e4)      # large, small and subnormal halves
    fn = M.attend_few_ if kernel == "parallel" else M._attend_few_serial
    slopes = np.empty(0, np.float32)
    half, single = np.full_like(q, np.nan), np.full_like(q, np.nan)
    fn(q, keys.view(np.uint16), values.view(np.uint16), start, slopes, n_group, half)
    fn(q, keys.astype(np.float32), values.astype(np.float32), start, slopes, n_group, single)
    assert np.isfinite(half).all()
    np.testing.assert_array_equal(half, single)


@pytest.mark.parametrize("cache_kind", ["none", "f32", "f16"])
@pytest.mark.parametrize("alibi", [False, True])
def test_batched_attention_by_reference_and_the_same_on_any_thread_count(cache_kind, alibi):
    """The batched path (queries in causal blocks of ATTENTION_BLOCK, kv heads shared out among worker threads, each
    with single-threaded BLAS): against float64 softmax(q K^T) V per query head (GQA, ALiBi slopes by query head,
    positions after a cache's first `start`), and bit for bit the same on 1 and 2 threads; the cache gets the new
    keys and values."""
    import types

    import numba
    from qtool.evaluate import model as M
    from qtool.threads import single_threaded_blas

    rng = np.random.default_rng(11)
    B, T, n_kv, G, d = 2, M.ATTENTION_BLOCK + 45, 4, 2, 32
    start = 0 if cache_kind == "none" else 37
    q = rng.normal(0, 0.4, (B, T, n_kv * G, d)).astype(np.float32)
    k = rng.normal(0, 1, (B, T, n_kv, d)).astype(np.float32)
    v = rng.normal(0, 1, (B, T, n_kv, d)).astype(np.float32)
    past_k = rng.normal(0, 1, (B, n_kv, start, d)).astype(np.float32)
    past_v = rng.normal(0, 1, (B, n_kv, start, d)).astype(np.float32)
    slopes = alibi_slopes(n_kv * G, 8.0) if alibi else np.empty(0, np.float32)

    def attend(threads: int) -> tuple[np.ndarray, KVCache | None]:
        cache = None
        if cache_kind != "none":
            dtype = np.float16 if cache_kind == "f16" else np.float32
            cache = KVCache([np.zeros((B, n_kv, start + T + 3, d), dtype)], [np.zeros((B, n_kv, start + T + 3, d), dtype)])
            cache.k[0][:, :, :start], cache.v[0][:, :, :start] = past_k, past_v
        model = types.SimpleNamespace(config=types.SimpleNamespace(n_head_kv=n_kv, n_group=G, head_dim=d),
                                      _ws=M.Workspace(), alibi=slopes)
        model._attend_heads = types.MethodType(Model._attend_heads, model)
        out = np.full((B, T, n_kv * G * d), np.nan, np.float32)
        before = numba.get_num_threads()
        try:
            numba.set_num_threads(threads)
            if threads == 1:
                with single_threaded_blas():
                    Model._attention(model, 0, q, k, v, start, cache, out)
            else:
                Model._attention(model, 0, q, k, v, start, cache, out)
        finally:
            numba.set_num_threads(before)
        return out, cache

    one, cache_one = attend(1)
    two, cache_two = attend(2)
    np.testing.assert_array_equal(one, two)

    keys = np.concatenate([past_k, k.transpose(0, 2, 1, 3)], axis=2).astype(np.float64)
    values = np.concatenate([past_v, v.transpose(0, 2, 1, 3)], axis=2).astype(np.float64)
    if cache_kind == "f16":                     # the cache keeps halves: the reference reads what it holds
        keys, values = keys.astype(np.float16).astype(np.float64), values.astype(np.float16).astype(np.float64)
    if cache_kind != "none":
        for held, ref in ((cache_two.k[0], keys), (cache_two.v[0], values)):
            np.testing.assert_array_equal(held[:, :, :start + T].astype(np.float64), ref)
    head_kv = np.arange(n_kv * G) // G
    scores = np.einsum("bthd,bhkd->bhtk", q.astype(np.float64), keys[:, head_kv])
    pos_q = start + np.arange(T)[:, None]
    pos_k = np.arange(start + T)[None, :]
    if alibi:
        scores += slopes[None, :, None, None].astype(np.float64) * (pos_k - pos_q)
    scores = np.where(pos_k > pos_q, -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    ref = np.einsum("bhtk,bhkd->bthd", weights, values[:, head_kv]).reshape(B, T, -1)
    np.testing.assert_allclose(two, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("kernel", ["parallel", "serial"])
def test_f16_cache_store_rounds_as_numpy_and_widens_back_exactly(kernel):
    """store_f16_ writes new keys (T, n_kv, d) into a cache slice (n_kv, T, d) as numpy's float16 cast rounds them
    (nearest even; subnormals; overflow to inf), nothing outside the slice; widen_f16_ reads them back exactly."""
    from qtool.evaluate import model as M
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((7, 3, 64)) * 10.0 ** rng.uniform(-9, 5.5, (7, 3, 64))).astype(np.float32)
    x[0, 0, :4] = [65519.0, 65520.0, -1e-8, 2.0 ** -24 * 1.5]      # the largest finite, inf, subnormals
    cache = np.zeros((3, 10, 64), np.float16)
    store = M.store_f16_ if kernel == "parallel" else M._store_f16_serial
    store(x, cache[:, 2:9].view(np.uint16))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(cache[:, 2:9], x.transpose(1, 0, 2).astype(np.float16))
    assert (cache[:, :2] == 0).all() and (cache[:, 9:] == 0).all()
    out = np.full((3, 10, 64), np.nan, np.float32)
    M.widen_f16_(cache.view(np.uint16), 9, out)
    np.testing.assert_array_equal(out[:, :9], cache[:, :9].astype(np.float32))
    assert np.isnan(out[:, 9:]).all()


def test_silu_mul_kernel():
    rng = np.random.default_rng(4)
    gate = rng.normal(0, 4, (5, 33)).astype(np.float32)
    gate[0, :4] = [0.0, -200.0, 200.0, -1e-30]         # exp overflow must give 0, not NaN
    up = rng.normal(size=(5, 33)).astype(np.float32)
    g = gate.astype(np.float64)
    with np.errstate(over="ignore"):
        ref = g / (1 + np.exp(-g)) * up
    ours = gate.copy()
    silu_mul_(ours, up)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-30)


def _ref_q8_0(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_0 (x86) then dequantize, block by block in plain numpy float32."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            blk = x[r, b:b + 32]
            amax = np.abs(blk).max()
            d = np.float32(np.float16(amax / np.float32(127)))
            inv = np.float32(127) / amax if amax else np.float32(0)
            out[r, b:b + 32] = np.rint(blk * inv) * d
    return out


def _ref_q8_k(x: np.ndarray) -> np.ndarray:
    """ggml quantize_row_q8_K_ref then dequantize."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 256):
            blk = x[r, b:b + 256]
            i = int(np.argmax(np.abs(blk)))            # first index of the largest magnitude
            if blk[i] == 0:
                out[r, b:b + 256] = 0
                continue
            iscale = np.float32(-127) / blk[i]
            out[r, b:b + 256] = np.minimum(np.float32(127), np.rint(iscale * blk)) * (np.float32(1) / iscale)
    return out


def _activation_cases() -> np.ndarray:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, (6, 512)).astype(np.float32)
    x[1] = 0.0                                          # all-zero blocks
    x[2, 7] = 3e4                                       # one huge outlier
    x[3] *= np.float32(1e-6)                            # scales that are float16 subnormals
    x[4, 300] = -x[4, 256:512].__abs__().max() * 2      # negative signed max (q8_K's sign convention)
    x[5, :32] = np.float32(127) * np.arange(-16, 16, dtype=np.float32) / 16   # exact halves: ties to even
    return x


@pytest.mark.parametrize("kind", ["q8_0", "q8_K", "f16", "bf16"])
def test_activation_rounding_kernels(kind):
    from qtool.evaluate.model import round_activations
    x = _activation_cases()
    ours = round_activations(x, kind, np.empty_like(x))
    if kind == "q8_0":
        ref = _ref_q8_0(x)
    elif kind == "q8_K":
        ref = _ref_q8_k(x)
    elif kind == "f16":
        ref = x.astype(np.float16).astype(np.float32)
    else:                                               # bfloat16 keeps 8 significant bits, ties to even
        m, e = np.frexp(x.astype(np.float64))
        ref = np.ldexp(np.rint(m * 256), e - 8).astype(np.float32)
    np.testing.assert_array_equal(ours, ref)
    assert kind in ("f16", "bf16") or np.abs(ours - x).max() > 0


def test_q8_0_rounding_overflows_its_scale_as_ggml():
    """A block whose amax / 127 is past float16's range gets an infinite scale, as ggml's fp32 -> fp16 conversion
    gives it (the codes times inf: inf, and nan for a zero code); blocks beside it are untouched."""
    from qtool.evaluate.model import round_activations
    x = np.random.default_rng(3).normal(0, 1, (2, 64)).astype(np.float32)
    x[0, 5] = 9e6                                       # 9e6 / 127 > 65504
    x[0, 9] = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        ref = _ref_q8_0(x)
    ours = round_activations(x, "q8_0", np.empty_like(x))
    np.testing.assert_array_equal(ours, ref)
    assert np.isinf(ours[0, 5]) and np.isnan(ours[0, 9]) and np.isfinite(ours[:, 32:]).all()


def test_f16_rounding_matches_numpy_on_every_exponent():
    """The bit-level float16 rounding equals numpy's astype on all float32 exponents, ties, overflow, inf and nan."""
    from qtool.evaluate.model import round_activations
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, size=(64, 4096), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).copy()
    half_ulp = np.float32(2.0 ** -11)                       # exact ties between float16 neighbours
    x[0] = (np.arange(4096, dtype=np.float32) + np.float32(0.5)) * np.float32(2.0 ** -10) * half_ulp * 2048
    x[1] = np.float32(2.0 ** -24) * (np.arange(4096, dtype=np.float32) / 2)   # subnormal ties and the 2^-14 edge
    x[2, :8] = [65504, 65519.996, 65520, -65520, np.inf, -np.inf, 1e38, -0.0]
    ours = round_activations(x, "f16", np.empty_like(x))
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16).astype(np.float32)
    finite = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.isnan(ours[~finite]).all()


def test_f16_weights_decode_exactly_for_every_bit_pattern():
    from qtool.quantize import formats
    half = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ours = formats.decode(half.view(np.uint8), gguf.GGMLQuantizationType.F16, 65536).reshape(-1)
    ref = half.view(np.float16).astype(np.float32)
    finite = ~np.isnan(ref)
    np.testing.assert_array_equal(ours[finite].view(np.uint32), ref[finite].view(np.uint32))
    assert np.isnan(ours[~finite]).all()


def test_llama_cpp_activations_only_touch_non_f32_weights(gguf_of):
    _, f32 = gguf_of("llama-spm")
    _, q8 = gguf_of("llama-spm", "q8_0")
    tokens = random_tokens(32000, 20)
    assert np.array_equal(Model(GGUFWeights(f32)).forward(tokens),
                          Model(GGUFWeights(f32), activations="float32").forward(tokens))
    rounded = Model(GGUFWeights(q8)).forward(tokens)
    exact = Model(GGUFWeights(q8), activations="float32").forward(tokens)
    assert 1e-6 < rel_err(rounded, exact.astype(np.float64)) < 1e-2
    with pytest.raises(QtoolError, match="activations must be one of"):
        Model(GGUFWeights(q8), activations="int8")


# --- batching, outputs, caches, hooks, memory modes ---------------------------------------------------------------

def test_batched_sequences_and_output_positions(gguf_of):
    _, path = gguf_of("qwen2")
    model = load(path)
    a, b = random_tokens(model.n_vocab, 16, 1), random_tokens(model.n_vocab, 16, 2)
    both = model.forward(np.stack([a, b]), output_from=9)
    assert both.shape == (2, 7, model.n_vocab)
    np.testing.assert_allclose(both[0], model.forward(a)[9:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both[1], model.forward(b)[9:], rtol=1e-5, atol=1e-6)
    assert model.forward(a, output_from=16).shape == (0, model.n_vocab)


@pytest.mark.parametrize("variant", ["llama-bpe", "baichuan-13b", "qwen3"])
def test_kv_cache_decoding_equals_the_full_pass(variant, gguf_of):
    _, path = gguf_of(variant)
    model = load(path)
    tokens = np.stack([random_tokens(model.n_vocab, 12, 3), random_tokens(model.n_vocab, 12, 4)])
    full = model.forward(tokens)
    cache = KVCache.allocate(model.config, batch=2, max_len=12)
    steps = [model.forward(tokens[:, :5], cache=cache)]
    for t in range(5, 12):
        steps.append(model.forward(tokens[:, t:t + 1], cache=cache))
    assert cache.length == 12
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(QtoolError, match="KV cache"):
        model.forward(tokens[:, :1], cache=cache)


@pytest.mark.parametrize("variant", ["llama-bpe", "qwen3"])
def test_f16_kv_cache_rounds_keys_and_values_once_for_every_path(variant, gguf_of):
    """With an F16 cache, a prefill in one pass (BLAS attention over the cache's values widened to float32) and one
    token at a time (attend_few_ on the halves) read the same rounded keys and values. Against a float32 cache the
    logits differ, but only by the rounding of keys and values to 11 bits."""
    _, path = gguf_of(variant)
    model = load(path)
    tokens = np.stack([random_tokens(model.n_vocab, 12, 5), random_tokens(model.n_vocab, 12, 6)])

    def through_cache(pieces, f16):
        cache = KVCache.allocate(model.config, batch=2, max_len=12, f16=f16)
        assert cache.k[0].dtype == (np.float16 if f16 else np.float32)
        return np.concatenate([model.forward(tokens[:, a:b], cache=cache) for a, b in pieces], axis=1)

    one_by_one = [(0, 5)] + [(t, t + 1) for t in range(5, 12)]
    half_steps = through_cache(one_by_one, True)
    half_chunks = through_cache([(0, 6), (6, 12)], True)
    single = through_cache(one_by_one, False)
    # float rounding may tip a key across an F16 rounding boundary (1e-5 on qwen3's logits, measured), but the two
    # F16 paths stay far closer to each other than to the float32 cache (2e-4 to 3e-4 away, measured)
    paths, gap = np.abs(half_steps - half_chunks).max(), np.abs(half_steps - single).max()
    assert paths < gap / 5, (paths, gap)
    assert 0 < gap < 1e-2 * np.abs(single).max(), gap


def test_matmul_hook_sees_the_input_of_every_matrix_product(gguf_of):
    _, path = gguf_of("qwen3")
    seen: list[tuple[str, tuple[int, ...]]] = []
    model = Model(GGUFWeights(path), on_matmul_input=lambda name, x: seen.append((name, x.shape)))
    c = model.config
    model.forward(np.stack([random_tokens(c.n_vocab, 10)] * 3), output_from=4)
    names = [n for n, _ in seen]
    expected = [f"blk.{i}.{t}.weight" for i in range(c.n_layer)
                for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    assert names == expected + ["token_embd.weight"]      # tied output reads token_embd
    shapes = dict(seen)
    assert shapes["blk.0.attn_q.weight"] == (30, c.n_embd)
    assert shapes["blk.1.attn_output.weight"] == (30, c.n_head * c.head_dim)
    assert shapes["blk.1.ffn_down.weight"] == (30, c.n_ff)
    assert shapes["token_embd.weight"] == (3 * 6, c.n_embd)


def test_stored_weights_give_the_same_logits_as_cached_ones(gguf_of, monkeypatch):
    """By default weights stay in their stored form (tiles decoded per product); a --max-memory cache of decoded
    tensors gives the same numbers."""
    import qtool.evaluate.weights as weights_mod
    _, path = gguf_of("llama-spm", "q8_0")
    cached, stored = load(path, budget=10**12), load(path)
    monkeypatch.setattr(weights_mod, "TILE_BYTES", 4 * 64 * 1000)   # 992 rows per tile: 33 tiles of the output
    monkeypatch.setattr(weights_mod, "MATVEC_MAX_ROWS", 0)          # tiles even for few rows
    tokens = np.stack([random_tokens(cached.n_vocab, 20, 5), random_tokens(cached.n_vocab, 20, 6)])
    got, want = stored.forward(tokens, output_from=3), cached.forward(tokens, output_from=3)
    # Same weights, same rounding; only BLAS's summation order may differ for the sliced output blocks (measured on
    # an AVX2-only EPYC with OpenBLAS's Haswell kernel: 3.2 % of logits off by at most 2.1e-7; elsewhere equal).
    # The bound is 10x that, relative to the logits' scale.
    scale = float(np.max(np.abs(want)))
    assert np.max(np.abs(got - want)) <= 2e-6 * max(scale, 1.0), np.max(np.abs(got - want))
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    big = [n for n, a in stored.weights._cache.items() if a.size > weights_mod.SMALL_TENSOR_ELEMENTS]
    assert not big, big                                             # nothing but norms decoded and kept
    assert cached.weights.cached_bytes >= 4 * (cached.weights.n_params - cached.n_vocab * cached.config.n_embd)


def test_quantized_tensors_are_dequantized_like_gguf_py(gguf_of):
    _, path = gguf_of("llama-spm", "q8_0")
    w = GGUFWeights(path)
    g = read_gguf(path)
    t = next(t for t in g.tensors if t.qtype == gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(np.array(g.raw(t)), t.qtype).reshape(t.shape)
    np.testing.assert_array_equal(w.get(t.name), ref)
    ids = np.array([5, 0, 5, 31999])
    streamed = GGUFWeights(path, MemoryBudget(0))
    np.testing.assert_array_equal(streamed.rows("token_embd.weight", ids), w.get("token_embd.weight")[ids])
    with pytest.raises(QtoolError, match="outside the model's vocabulary"):
        streamed.rows("token_embd.weight", np.array([32000]))


def test_memory_budget_is_shared_between_models(gguf_of):
    """--max-memory caches decoded tensors on first use while the budget lasts, across every model of a run."""
    _, path = gguf_of("llama-spm")
    size = GGUFWeights(path).float32_bytes
    budget = MemoryBudget(size + size // 2)
    first, second = GGUFWeights(path, budget), GGUFWeights(path, budget)
    for name in first.names():
        first.dense(name)
        second.dense(name)
    from qtool.evaluate.weights import SMALL_TENSOR_ELEMENTS
    small = sum(4 * int(np.prod(first.shape(n))) for n in first.names()
                if np.prod(first.shape(n)) <= SMALL_TENSOR_ELEMENTS)      # always kept, outside the budget
    assert first.cached_bytes == size
    assert small < second.cached_bytes <= small + size // 2
    assert budget.remaining >= 0


# --- bad input ---------------------------------------------------------------------------------------------------

def _rewrite(src: Path, dst: Path, *, drop_tensors=(), set_kv: dict | None = None,
             replace_tensors: dict | None = None) -> Path:
    """A copy of `src` with tensors dropped or replaced and keys set (value None: removed)."""
    g = read_gguf(src)
    changes = dict(set_kv or {})
    replace = dict(replace_tensors or {})
    arch = changes.pop("general.architecture", (g.value("general.architecture"), None))[0]
    kvs = [(k, v.value, v.type, v.sub_type) for k, v in g.kv.items()
           if k != "general.architecture" and k not in changes]
    kvs += [(k, value, vtype, None) for k, (value, vtype) in changes.items() if value is not None]
    tensors = [PlannedTensor(t.name, t.shape, t.qtype, (lambda t=t: replace.get(t.name, g.array(t))))
               for t in g.tensors if t.name not in drop_tensors]
    write_gguf(dst, arch, kvs, tensors)
    return dst


def test_errors_are_one_line(gguf_of, tmp_path):
    _, llama = gguf_of("llama-spm")
    _, baichuan = gguf_of("baichuan-7b", num_hidden_layers=2)
    with pytest.raises(QtoolError, match="unsupported GGUF architecture 'gpt2'"):
        load(_rewrite(llama, tmp_path / "a.gguf", set_kv={"general.architecture": ("gpt2", GGUFValueType.STRING)}))
    with pytest.raises(QtoolError, match="output.weight' is missing .baichuan has no tied output"):
        load(_rewrite(baichuan, tmp_path / "b.gguf", drop_tensors=("output.weight",)))
    with pytest.raises(QtoolError, match="blk.1.ffn_up.weight' is missing"):
        load(_rewrite(llama, tmp_path / "c.gguf", drop_tensors=("blk.1.ffn_up.weight",)))
    with pytest.raises(QtoolError, match="missing metadata key llama.attention.layer_norm_rms_epsilon"):
        load(_rewrite(llama, tmp_path / "d.gguf",
                      set_kv={"llama.attention.layer_norm_rms_epsilon": (None, GGUFValueType.FLOAT32)}))
    with pytest.raises(QtoolError, match="rope scaling 'longrope' is not supported"):
        load(_rewrite(llama, tmp_path / "e.gguf", set_kv={"llama.rope.scaling.type": ("longrope", GGUFValueType.STRING)}))


def test_tied_llama_reads_token_embd(gguf_of):
    ckpt, path = gguf_of("llama-spm", tie_word_embeddings=True)
    model = load(path)
    assert model.config.tied_output and not model.weights.has("output.weight")
    tokens = random_tokens(model.n_vocab, 12)
    assert rel_err(model.forward(tokens), hf_forward(ckpt, tokens)) < RTOL


# --- against HF transformers --------------------------------------------------------------------------------------

@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama-spm", "llama-bpe", "qwen2", "qwen3"])
def test_logits_equal_transformers(variant, gguf_of):
    torch = need_module("torch")
    transformers = need_module("transformers")
    ckpt, path = gguf_of(variant)
    model = load(path)
    tokens = random_tokens(model.n_vocab, 48, seed=7)
    hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        ref = hf(torch.tensor(tokens[None])).logits[0].double().numpy()
    assert rel_err(model.forward(tokens), ref) < RTOL


def test_serial_twins_compute_what_the_parallel_kernels_compute():
    """Small inputs run the single-threaded builds (PARALLEL_MIN_ELEMENTS): same numbers, bit for bit."""
    from qtool.evaluate import model as M
    rng = np.random.default_rng(3)
    x = rng.normal(0, 3, (5, 512)).astype(np.float32)
    pairs = [(M.round_q8_0_, M._round_q8_0_serial), (M.round_q8_k_, M._round_q8_k_serial)]
    for par, ser in pairs:
        a, b = np.empty_like(x), np.empty_like(x)
        par(x, a)
        ser(x, b)
        np.testing.assert_array_equal(a, b)
    a, b = np.empty_like(x), np.empty_like(x)
    M.round_f16_(x, a)
    M._round_f16_serial(x, b)
    np.testing.assert_array_equal(a, b)
    w = rng.normal(1, 0.1, 512).astype(np.float32)
    a, b = np.empty_like(x), np.empty_like(x)
    M.rms_norm_rows(x, w, 1e-5, a)
    M._rms_norm_rows_serial(x, w, 1e-5, b)
    np.testing.assert_array_equal(a, b)
    g1, g2, up = x.copy(), x.copy(), x[::-1].copy()
    M.silu_mul_(g1, up)
    M._silu_mul_serial(g2, up)
    np.testing.assert_array_equal(g1, g2)
    s1 = rng.normal(0, 2, (2, 6, 9)).astype(np.float32)
    s2 = s1.copy()
    slopes = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
    M.causal_softmax_(s1, 6, slopes, 2)
    M._causal_softmax_serial(s2, 6, slopes, 2)
    np.testing.assert_array_equal(s1, s2)
    r1 = rng.normal(0, 1, (4, 3, 64)).astype(np.float32)
    r2 = r1.copy()
    cos, sin = np.cos(r1[:2, 0, :32]), np.sin(r1[:2, 0, :32])
    M.rope_rows(r1, cos, sin, 2, True)
    M._rope_rows_serial(r2, cos, sin, 2, True)
    np.testing.assert_array_equal(r1, r2)


def test_lockstep_evaluation_holds_one_models_pages_at_a_time(gguf_of):
    """Several models in lockstep: each lets go of its memory maps after its pass (so their pages never add up);
    one model alone keeps them between chunks. The scores do not depend on it."""
    from qtool.evaluate.perplexity import evaluate
    _, q8 = gguf_of("llama-spm", "q8_0")
    _, f16 = gguf_of("llama-spm", "f16")
    tokens = random_tokens(32000, 4 * 16, 11)
    alone = load(q8)
    solo = evaluate([alone], tokens, 16, chunks_per_group=2)
    assert alone.weights._raw                                  # the output matrix stays mapped
    base, variant = load(f16), load(q8)
    seen = []
    forward = variant.forward

    def spy(*args, **kwargs):
        seen.append(dict(base.weights._raw))                   # the base has let go before the variant runs
        return forward(*args, **kwargs)

    variant.forward = spy
    both = evaluate([base, variant], tokens, 16, chunks_per_group=2)
    assert len(seen) == 2 and not any(seen)
    assert not base.weights._raw and not variant.weights._raw
    np.testing.assert_array_equal(both[1].nll, solo[0].nll)


def test_lockstep_models_can_share_one_workspace(gguf_of):
    """run_perplexity gives all its models one set of work buffers (they never run at once): the scores are
    those of models with their own buffers, and the buffers really are shared."""
    from qtool.evaluate.model import Workspace
    from qtool.evaluate.perplexity import evaluate
    _, q8 = gguf_of("llama-spm", "q8_0")
    _, f16 = gguf_of("llama-spm", "f16")
    tokens = random_tokens(32000, 4 * 16, 12)
    own = evaluate([load(f16), load(q8)], tokens, 16, chunks_per_group=2)
    shared = Workspace()
    models = [Model(GGUFWeights(p), workspace=shared) for p in (f16, q8)]
    together = evaluate(models, tokens, 16, chunks_per_group=2)
    assert models[0]._ws is models[1]._ws is shared and shared._bufs
    for a, b in zip(own, together):
        np.testing.assert_array_equal(a.nll, b.nll)
    np.testing.assert_array_equal(own[1].kld, together[1].kld)


def test_expf_is_within_one_ulp_of_exp():
    """model._expf (the softmax's and SiLU's e^x, a polynomial so that their loops vectorize) against float64 e^x
    rounded to float32: within 1 ulp over every float32 exponent in range, inf above it, 0 below it."""
    from numba import njit

    from qtool.evaluate.model import _expf

    @njit
    def expf(x, out):
        for i in range(x.size):
            out[i] = _expf(x[i])

    rng = np.random.default_rng(11)
    x = np.concatenate([rng.uniform(-104.0, 88.72, 2_000_000), np.linspace(-104.0, 88.72283, 200_001),
                        [0.0, -0.0, 1e-30, -1e-30, 0.5 * np.log(2), -0.5 * np.log(2), 88.0, 88.72, -87.33, -103.9]])
    x = x.astype(np.float32)
    ours = np.empty_like(x)
    expf(x, ours)
    ref = np.exp(x.astype(np.float64)).astype(np.float32)
    normal = ref >= np.finfo(np.float32).tiny
    ulps = np.abs(ours[normal].view(np.int32).astype(np.int64) - ref[normal].view(np.int32))
    assert ulps.max() <= 1, (x[normal][ulps.argmax()], ours[normal][ulps.argmax()], ref[normal][ulps.argmax()])
    # subnormal results: within 1 ulp of the subnormal grid
    assert np.abs(ours[~normal].astype(np.float64) - ref[~normal]).max() <= 2.0 ** -149
    edges = np.array([88.723, 89.0, 1e30, np.inf, -104.01, -200.0, -1e30, -np.inf], np.float32)
    out = np.empty_like(edges)
    expf(edges, out)
    assert list(out) == [np.inf] * 4 + [0.0] * 4


@pytest.mark.parametrize("n_kv, T, G, start, jobs", [(32, 512, 1, 0, 2), (8, 512, 4, 0, 16), (1, 300, 8, 40, 3),
                                                     (2, 5, 7, 0, 2), (3, 1000, 2, 17, 5), (4, 130, 1, 0, 1)])
def test_attention_runs_cover_every_pair_once_in_shares_of_equal_cost(n_kv, T, G, start, jobs):
    """Each (kv head, query block) pair in exactly one run of one thread; each thread's cost (its scores) within one
    pair's cost of an equal share."""
    from qtool.evaluate.model import ATTENTION_BLOCK, attention_runs

    runs = attention_runs(n_kv, T, G, start, jobs)
    assert len(runs) == jobs
    blocks = [(q0, min(T, q0 + ATTENTION_BLOCK)) for q0 in range(0, T, ATTENTION_BLOCK)]
    pairs = sorted((q0, q1, h) for job in runs for q0, q1, h0, h1 in job for h in range(h0, h1))
    assert pairs == sorted((q0, q1, h) for q0, q1 in blocks for h in range(n_kv))
    cost = {q0: (q1 - q0) * G * (start + q1) for q0, q1 in blocks}
    share = n_kv * sum(cost.values()) / jobs
    for job in runs:
        spent = sum((h1 - h0) * cost[q0] for q0, q1, h0, h1 in job)
        assert abs(spent - share) <= max(cost.values())
