"""Per-architecture conversion: config -> hparams and GGUF keys, HF tensor names -> GGUF tensors.

Everything here mirrors what llama.cpp's ``convert_hf_to_gguf.py`` writes for Llama, Qwen2, Qwen3, Qwen2-MoE,
Qwen3-MoE and Baichuan (see docs/reference/conversion-and-evaluation.md §A), except where that script is wrong:
Baichuan converts at all here, and Baichuan2's NormHead is applied. The Qwen3.5 hybrids (Gated DeltaNet) have their
own module, convert/qwen35.py; model_spec and arch_kvs hand over to it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGUFValueType, GGMLQuantizationType, LlamaFileType

from qtool.archs import (ARCHS, BAICHUAN_ALIBI_DEPTH, BAICHUAN_ROPE_DEPTH, Arch, arch_for_hf,
                         supported_hf_architectures)
from qtool.errors import QtoolError
from qtool.gguf_io import KV

from . import qwen35

# Baichuan2 is told apart from Baichuan-1 the way vLLM does it: by its vocabulary size.
BAICHUAN2_VOCAB_SIZE = 125696

# Defaults that transformers' AutoConfig fills in for keys a config.json leaves out. llama.cpp's converter
# reads hparams through AutoConfig(...).to_dict() (transformers 5.x), so these end up in its GGUF; Baichuan's
# config class is remote code, so llama.cpp falls back to the raw config.json there and nothing is filled.
_AUTOCONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0},
    "qwen3": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
              "rope_theta": 10000.0, "head_dim": 128},
    # The MoE configs keep their own num_key_value_heads default (it is not num_attention_heads), and Qwen3-MoE's
    # to_dict() spells num_experts as num_local_experts.
    "qwen2moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 32768,
                 "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4,
                 "num_experts": 60, "norm_topk_prob": False},
    "qwen3moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                 "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_local_experts": 128,
                 "norm_topk_prob": False},
}

# llama.cpp's ExpertGatingFuncType values, by the names configs use.
_GATING_FUNC = {"softmax": 1, "sigmoid": 2, "sqrtsoftplus": 4}

_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


@dataclass
class OutTensor:
    """One tensor of the output file: its GGUF name, numpy shape, ggml type, and how to make its data."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLQuantizationType
    load: Callable[[], np.ndarray] = field(repr=False)   # float32 or float16 data, numpy shape `shape`
    source: str = ""                                      # HF tensor it came from, for messages


@dataclass
class ModelSpec:
    """What the config says about the model, after the defaults llama.cpp's converter would see."""

    arch: Arch
    hf_arch: str
    hparams: dict[str, Any]
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    is_baichuan2: bool = False
    n_expert: int = 0              # routed experts per layer (MoE architectures only)
    n_expert_used: int = 0         # experts each token is routed to
    n_ff_exp: int = 0              # one routed expert's FFN width
    n_ff_shexp: int = 0            # the shared expert's FFN width (0: none)
    hybrid: qwen35.HybridSpec | None = None   # the Gated DeltaNet settings (hybrid architectures only)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise QtoolError(f"{model_dir}: no config.json (is this a HuggingFace checkpoint directory?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QtoolError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise QtoolError(f"{path}: expected a JSON object")
    return config


def model_spec(config: dict[str, Any], normhead: bool | None = None, model_dir: Path | None = None,
               no_mtp: bool = False) -> ModelSpec:
    archs = config.get("architectures")
    if not archs or not isinstance(archs, list):
        raise QtoolError(f"config.json has no 'architectures' list; supported: {', '.join(supported_hf_architectures())}")
    hf_arch = archs[0]
    if isinstance(config.get("text_config"), dict) and config["text_config"].get("architectures"):
        hf_arch = config["text_config"]["architectures"][0]
    arch = arch_for_hf(hf_arch)

    hp = dict(config)
    if isinstance(hp.get("text_config"), dict):
        hp = {**hp, **hp["text_config"]}
    if arch.hybrid:
        hp = qwen35.expand_like_autoconfig(arch.gguf_name, hp)
    elif arch.gguf_name in _AUTOCONFIG_DEFAULTS:
        hp = _expand_like_autoconfig(arch.gguf_name, hp)

    def need(*keys: str) -> int:
        for k in keys:
            if hp.get(k) is not None:
                v = hp[k]
                if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                    raise QtoolError(f"config.json: {k} must be a positive integer, got {v!r}")
                return v
        raise QtoolError(f"config.json: missing {keys[0]}")

    n_layer = need("num_hidden_layers", "n_layers", "n_layer", "num_layers")
    n_embd = need("hidden_size", "n_embd", "dim")
    # Qwen3.5-MoE has no dense FFN width at all
    if arch.hybrid and arch.moe:
        n_ff = hp.get("intermediate_size") or 0
    else:
        n_ff = need("intermediate_size", "n_inner", "hidden_dim")
    n_head = need("num_attention_heads", "n_head", "n_heads")
    n_head_kv = hp.get("num_key_value_heads") or n_head
    head_dim = hp.get("head_dim") or n_embd // n_head
    n_vocab = need("vocab_size")
    if n_head % n_head_kv:
        raise QtoolError(f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}")
    if arch.gguf_name != "qwen3" and hp.get("head_dim") is None and n_embd % n_head:
        raise QtoolError(f"config.json: hidden_size {n_embd} is not a multiple of num_attention_heads {n_head}")

    spec = ModelSpec(arch, hf_arch, hp, n_layer, n_embd, n_ff, n_head, n_head_kv, head_dim, n_vocab)
    if arch.moe:
        _moe_spec(spec, need)
    if arch.hybrid:
        spec.hybrid = qwen35.hybrid_spec(hp, n_layer, head_dim, need, no_mtp)
    elif no_mtp:
        raise QtoolError(f"--no-mtp applies only to Qwen3.5 checkpoints, not {hf_arch}")
    if arch.gguf_name == "baichuan":
        spec.is_baichuan2 = _looks_like_baichuan2(n_vocab, model_dir) if normhead is None else normhead
    elif normhead:
        raise QtoolError("--normhead applies only to Baichuan2 checkpoints")
    return spec


def _moe_spec(spec: ModelSpec, need: Callable[..., int]) -> None:
    hp = spec.hparams
    spec.n_expert = need("num_local_experts", "num_experts")
    spec.n_expert_used = need("num_experts_per_tok")
    spec.n_ff_exp = need("moe_intermediate_size")
    if spec.arch.shared_expert:
        spec.n_ff_shexp = need("shared_expert_intermediate_size")
    if spec.n_expert_used > spec.n_expert:
        raise QtoolError(f"config.json: num_experts_per_tok {spec.n_expert_used} is more than num_experts "
                         f"{spec.n_expert}")
    # transformers makes a layer dense (one plain MLP) when it is in mlp_only_layers or off the sparse step;
    # llama.cpp's Qwen MoE architectures have no dense layers at all, so such a file would not load there.
    step, only = hp.get("decoder_sparse_step", 1), hp.get("mlp_only_layers") or []
    if not isinstance(step, int) or isinstance(step, bool) or step <= 0:
        raise QtoolError(f"config.json: decoder_sparse_step must be a positive integer, got {step!r}")
    if not isinstance(only, list):
        raise QtoolError(f"config.json: mlp_only_layers must be a list of layer numbers, got {only!r}")
    dense = [i for i in range(spec.n_layer) if i in only or (i + 1) % step]
    if dense:
        raise QtoolError(f"config.json: layer{'s' if len(dense) > 1 else ''} {', '.join(map(str, dense[:8]))}"
                         f"{' ...' if len(dense) > 8 else ''} would be dense (mlp_only_layers / decoder_sparse_step), "
                         f"which llama.cpp's {spec.arch.gguf_name} cannot load: every layer must be MoE")


def _looks_like_baichuan2(n_vocab: int, model_dir: Path | None) -> bool:
    """Baichuan2 by its vocabulary size (as vLLM decides), or by the NormHead class in its remote code.

    The modeling file is only read as text, never imported or executed.
    """
    if n_vocab == BAICHUAN2_VOCAB_SIZE:
        return True
    code = model_dir / "modeling_baichuan.py" if model_dir is not None else None
    if code is not None and code.is_file():
        try:
            return "class NormHead" in code.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return False


def _expand_like_autoconfig(gguf_arch: str, hp: dict[str, Any]) -> dict[str, Any]:
    """Fill in what transformers 5.x AutoConfig(...).to_dict() adds to these configs."""
    out = dict(hp)
    if gguf_arch == "qwen3moe" and out.get("num_experts") is not None:
        out["num_local_experts"] = out.pop("num_experts")
    for k, v in _AUTOCONFIG_DEFAULTS[gguf_arch].items():
        if out.get(k) is None and not (k == "rope_theta" and _rope_params(out).get("rope_theta") is not None):
            out[k] = v
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = out["num_attention_heads"]
    if gguf_arch == "llama" and out.get("head_dim") is None:
        out["head_dim"] = out["hidden_size"] // out["num_attention_heads"]
    return out


def _rope_params(hp: dict[str, Any]) -> dict[str, Any]:
    """rope_parameters (transformers 5) or rope_scaling (4.x), with top-level values mirrored in as llama.cpp does."""
    raw = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if not isinstance(raw, dict):
        raise QtoolError(f"config.json: rope_scaling must be an object, got {raw!r}")
    params = dict(raw.get("full_attention", raw))
    if "rope_theta" not in params:
        for k in ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"):
            if hp.get(k) is not None:
                params["rope_theta"] = hp[k]
                break
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    if "original_max_position_embeddings" not in params and hp.get("original_max_position_embeddings") is not None:
        params["original_max_position_embeddings"] = hp["original_max_position_embeddings"]
    return params


def _first(hp: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if hp.get(k) is not None:
            return hp[k]
    return None


def arch_kvs(spec: ModelSpec, ftype: LlamaFileType) -> tuple[list[KV], list[str]]:
    """The architecture keys, in llama.cpp's order (TextModel.set_gguf_parameters + the model class)."""
    a, hp = spec.arch.gguf_name, spec.hparams
    if spec.arch.hybrid:
        return qwen35.hybrid_kvs(spec, ftype), []
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    kvs: list[KV] = [KV(f"{a}.block_count", spec.n_layer, u32)]
    notes: list[str] = []
    if (n_ctx := _first(hp, "max_position_embeddings", "n_ctx", "n_positions", "max_length",
                        "max_sequence_length", "model_max_length")) is not None:
        kvs.append(KV(f"{a}.context_length", int(n_ctx), u32))
    kvs.append(KV(f"{a}.embedding_length", spec.n_embd, u32))
    kvs.append(KV(f"{a}.feed_forward_length", spec.n_ff, u32))
    kvs.append(KV(f"{a}.attention.head_count", spec.n_head, u32))
    if (n_kv := _first(hp, "num_key_value_heads", "n_kv_heads")) is not None:
        kvs.append(KV(f"{a}.attention.head_count_kv", int(n_kv), u32))
    if hp.get("is_causal") is False:
        kvs.append(KV(f"{a}.attention.causal", False, GGUFValueType.BOOL))

    rope = _rope_params(hp)
    rope_type = rope.get("rope_type")
    factor = rope.get("factor")
    if rope_type is not None:
        if rope_type == "linear" and factor is not None:
            kvs += [KV(f"{a}.rope.scaling.type", "linear", GGUFValueType.STRING),
                    KV(f"{a}.rope.scaling.factor", float(factor), f32)]
        elif rope_type == "yarn" and factor is not None:
            if rope.get("original_max_position_embeddings") is None:
                raise QtoolError("config.json: yarn rope scaling needs original_max_position_embeddings")
            kvs += [KV(f"{a}.rope.scaling.type", "yarn", GGUFValueType.STRING),
                    KV(f"{a}.rope.scaling.factor", float(factor), f32),
                    KV(f"{a}.rope.scaling.original_context_length", int(rope["original_max_position_embeddings"]), u32)]
            for key, names in (("yarn_ext_factor", ("extrapolation_factor",)),
                               ("yarn_attn_factor", ("attention_factor", "attn_factor")),
                               ("yarn_beta_fast", ("beta_fast",)), ("yarn_beta_slow", ("beta_slow",))):
                if (v := _first(rope, *names)) is not None:
                    kvs.append(KV(f"{a}.rope.scaling.{key}", float(v), f32))
            notes.append("llama.cpp ignores yarn attention_factor/beta_* for this architecture; its defaults apply")
        elif rope_type in ("su", "longrope"):
            raise QtoolError(f"rope scaling {rope_type!r} is not supported for {spec.hf_arch}")
        elif rope_type.lower() == "llama3":
            notes.append("llama3 rope scaling written as the rope_freqs tensor")
        elif rope_type not in ("default",):
            notes.append(f"warning: unknown rope scaling type {rope_type!r} ignored")
    if (theta := rope.get("rope_theta")) is not None:
        kvs.append(KV(f"{a}.rope.freq_base", float(theta), f32))
    if (eps := _first(hp, "rms_norm_eps", "norm_eps")) is not None:
        kvs.append(KV(f"{a}.attention.layer_norm_rms_epsilon", float(eps), f32))
    elif spec.arch.gguf_name == "baichuan":
        raise QtoolError("config.json: missing rms_norm_eps (llama.cpp requires it)")
    if (n_expert := _first(hp, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
        kvs.append(KV(f"{a}.expert_count", int(n_expert), u32))
    if (n_used := _first(hp, "num_experts_per_tok", "num_experts_per_token", "top_k_experts")) is not None:
        kvs.append(KV(f"{a}.expert_used_count", int(n_used), u32))
    if hp.get("n_group") is not None:
        kvs.append(KV(f"{a}.expert_group_count", int(hp["n_group"]), u32))
    if hp.get("topk_group") is not None:
        kvs.append(KV(f"{a}.expert_group_used_count", int(hp["topk_group"]), u32))
    if (score := _first(hp, "score_function", "scoring_func", "score_func", "moe_router_activation",
                        "moe_router_activation_func", "expert_selection_fn")) is not None:
        if score not in _GATING_FUNC:
            raise QtoolError(f"config.json: unsupported expert scoring function {score!r}")
        kvs.append(KV(f"{a}.expert_gating_func", _GATING_FUNC[score], u32))
    if hp.get("head_dim") is not None:
        kvs += [KV(f"{a}.attention.key_length", int(hp["head_dim"]), u32),
                KV(f"{a}.attention.value_length", int(hp["head_dim"]), u32)]
    kvs.append(KV("general.file_type", int(ftype), u32))

    if spec.arch.moe:
        if hp.get("moe_intermediate_size") is not None:
            kvs.append(KV(f"{a}.expert_feed_forward_length", int(hp["moe_intermediate_size"]), u32))
        if hp.get("shared_expert_intermediate_size") is not None:
            kvs.append(KV(f"{a}.expert_shared_feed_forward_length", int(hp["shared_expert_intermediate_size"]), u32))
        if bool(hp.get("norm_topk_prob")) != spec.arch.moe_norm_topk:
            notes.append(f"warning: config.json norm_topk_prob is {bool(hp.get('norm_topk_prob'))}, but llama.cpp's "
                         f"{a} {'always' if spec.arch.moe_norm_topk else 'never'} renormalises the top-k expert "
                         "weights; this file will run that way")

    if a == "llama":
        kvs.append(KV("llama.vocab_size", spec.n_vocab, u32))
        kvs.append(KV("llama.rope.dimension_count", spec.head_dim, u32))
    elif a == "baichuan":
        kvs.append(KV("baichuan.tensor_data_layout", "Meta AI original pth", GGUFValueType.STRING))
        kvs.append(KV("baichuan.rope.dimension_count", spec.n_embd // spec.n_head, u32))
        if spec.n_layer == BAICHUAN_ROPE_DEPTH:
            notes.append("baichuan with 32 layers: llama.cpp runs it with RoPE")
        elif spec.n_layer == BAICHUAN_ALIBI_DEPTH:
            notes.append("baichuan with 40 layers: llama.cpp runs it with ALiBi (max bias 8)")
        else:
            notes.append(f"WARNING: baichuan with {spec.n_layer} layers: llama.cpp picks RoPE only for "
                         f"{BAICHUAN_ROPE_DEPTH} layers and ALiBi only for {BAICHUAN_ALIBI_DEPTH}; this file will "
                         "run in llama.cpp with NO position encoding at all")
    return kvs, notes


def expected_hf_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint must hold (name -> HF shape); lm_head is optional where ties are allowed."""
    e, ff, v, hd = spec.n_embd, spec.n_ff, spec.n_vocab, spec.head_dim
    q_rows, kv_rows = spec.n_head * hd, spec.n_head_kv * hd
    hp = spec.hparams
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, e),
        "model.norm.weight": (e,),
        "lm_head.weight": (v, e),
    }
    for i in range(spec.n_layer):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (e,)
        shapes[p + "post_attention_layernorm.weight"] = (e,)
        if spec.arch.gguf_name == "baichuan":
            shapes[p + "self_attn.W_pack.weight"] = (3 * e, e)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (q_rows, e)
            shapes[p + "self_attn.k_proj.weight"] = (kv_rows, e)
            shapes[p + "self_attn.v_proj.weight"] = (kv_rows, e)
        shapes[p + "self_attn.o_proj.weight"] = (e, q_rows)
        if spec.arch.moe:
            shapes[p + "mlp.gate.weight"] = (spec.n_expert, e)
            for x in range(spec.n_expert):
                for proj in EXPERT_PROJS:
                    shapes[expert_hf_name(i, x, proj)] = (e, spec.n_ff_exp) if proj == "down_proj" else (spec.n_ff_exp, e)
            if spec.arch.shared_expert:
                sh = spec.n_ff_shexp
                shapes[p + "mlp.shared_expert.gate_proj.weight"] = (sh, e)
                shapes[p + "mlp.shared_expert.up_proj.weight"] = (sh, e)
                shapes[p + "mlp.shared_expert.down_proj.weight"] = (e, sh)
                shapes[p + "mlp.shared_expert_gate.weight"] = (1, e)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (ff, e)
            shapes[p + "mlp.up_proj.weight"] = (ff, e)
            shapes[p + "mlp.down_proj.weight"] = (e, ff)
        if spec.arch.qkv_bias or (spec.arch.gguf_name == "llama" and hp.get("attention_bias")):
            shapes[p + "self_attn.q_proj.bias"] = (q_rows,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_rows,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_rows,)
        if spec.arch.gguf_name == "llama" and hp.get("attention_bias"):
            shapes[p + "self_attn.o_proj.bias"] = (e,)
        if spec.arch.gguf_name == "llama" and hp.get("mlp_bias"):
            shapes[p + "mlp.gate_proj.bias"] = (ff,)
            shapes[p + "mlp.up_proj.bias"] = (ff,)
            shapes[p + "mlp.down_proj.bias"] = (e,)
        if spec.arch.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
    return shapes


_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight", "mlp.down_proj.bias": "ffn_down.bias",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
}
# Routed experts: model.layers.{i}.mlp.experts.{x}.{proj}.weight, each (n_ff_exp, n_embd) or, for down_proj,
# (n_embd, n_ff_exp), are stacked over x into one (n_expert, rows, cols) tensor per layer and projection; llama.cpp
# emits the three stacks in this order.
EXPERT_PROJS = ("down_proj", "gate_proj", "up_proj")
EXPERT_GGUF = {"down_proj": "ffn_down_exps.weight", "gate_proj": "ffn_gate_exps.weight", "up_proj": "ffn_up_exps.weight"}
# Tensors that stay F32 whatever the output type (llama.cpp's converter and llama-quantize agree on these).
F32_WEIGHTS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "ssm_conv1d.weight")


def expert_hf_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def parse_expert_name(hf_name: str) -> tuple[int, int, str] | None:
    """(layer, expert, projection) of a routed expert's HF weight, or None for any other tensor."""
    parts = hf_name.split(".")
    if (len(parts) == 8 and parts[:2] == ["model", "layers"] and parts[3:5] == ["mlp", "experts"]
            and parts[2].isdecimal() and parts[5].isdecimal() and parts[6] in EXPERT_PROJS and parts[7] == "weight"):
        return int(parts[2]), int(parts[5]), parts[6]
    return None
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str | None:
    if hf_name in _GLOBAL_MAP:
        return _GLOBAL_MAP[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdecimal():
        mapped = _LAYER_MAP.get(parts[3])
        if mapped is not None:
            return f"blk.{int(parts[2])}.{mapped}"
    return None


def hf_name_for_gguf(gguf: str) -> str | None:
    """The inverse of gguf_name (GGUF -> HF), for tensors that map one to one."""
    for hf, g in _GLOBAL_MAP.items():
        if g == gguf:
            return hf
    parts = gguf.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdecimal():
        for hf, g in _LAYER_MAP.items():
            if g == parts[2]:
                return f"model.layers.{int(parts[1])}.{hf}"
    return None


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half q/k rows -> ggml NORM-rope order: row h*d + 2i + j takes row h*d + j*d/2 + i."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_rows (GGUF -> HF)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def normhead(w: np.ndarray) -> np.ndarray:
    """Baichuan2's NormHead: each lm_head row (one per vocab entry) divided by its L2 norm, in float32."""
    w32 = w.astype(np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", w32, w32, dtype=np.float32))
    return w32 / np.maximum(norms, np.float32(1e-12))[:, None]


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray | None:
    rope = _rope_params(spec.hparams)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = spec.hparams.get("head_dim") or spec.n_embd // spec.n_head
    # float32 arithmetic as the reference converter does it with torch: `x / tensor` is computed by torch as
    # reciprocal(tensor) * x, and its float32 pow matches a double-precision pow rounded to float32 (checked
    # bit for bit against torch 2.13 for head dims 16..128 and bases 1e4..1e6).
    f32 = np.float32

    def rdiv(x: float, t: np.float32) -> np.float32:
        return f32(f32(1.0) / t) * f32(x)

    exps = np.arange(0, dim, 2, dtype=f32) / f32(dim)
    freqs = f32(1.0) / (np.float64(base) ** exps.astype(np.float64)).astype(f32)
    factor = float(rope.get("factor", 8.0))
    low_ff = float(rope.get("low_freq_factor", 1.0))
    high_ff = float(rope.get("high_freq_factor", 4.0))
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wl, high_wl = old_ctx / low_ff, old_ctx / high_ff
    out = []
    for f in freqs:
        wavelen = rdiv(2 * math.pi, f)
        if wavelen < high_wl:
            out.append(f32(1.0))
        elif wavelen > low_wl:
            out.append(f32(factor))
        else:
            smooth = (rdiv(old_ctx, wavelen) - f32(low_ff)) / f32(high_ff - low_ff)
            out.append(rdiv(1.0, (f32(1.0) - smooth) / f32(factor) + smooth))
    return np.array(out, dtype=np.float32)
