"""Qwen3.5 / Qwen3.5-MoE (the Gated DeltaNet hybrids): config -> keys, checkpoint names -> GGUF tensors.

What llama.cpp's converter writes for ``Qwen3_5TextModel`` / ``Qwen3_5MoeTextModel`` (src/conversion/qwen.py, via
Qwen3NextModel, _LinearAttentionVReorderBase, _QwenMtpMixin and _Qwen35MRopeMixin):

* layers listed as "linear_attention" in ``layer_types`` are Gated DeltaNet blocks (``linear_attn.*`` ->
  attn_qkv, attn_gate, ssm_a, ssm_dt, ssm_alpha, ssm_beta, ssm_conv1d, ssm_norm, ssm_out), the others gated
  full attention (q_proj carries the query and its output gate: 2 * n_head * head_dim rows);
* the value heads are reordered from grouped-by-key-head to tiled order wherever they appear;
* ``A_log`` is written as ssm_a = -exp(A_log), the conv kernel squeezed to (channels, kernel), and every RMSNorm
  weight but the DeltaNet output norm as 1 + w (Qwen3.5's norms scale by 1 + w);
* the MTP block (``mtp.*``) becomes one more layer, blk.{n_layer}, with its nextn.* tensors;
* the ConditionalGeneration checkpoints keep the text model under ``model.language_model.*`` (vision skipped).

``untransform`` is ``transform``'s inverse (GGUF -> checkpoint, for ``qtool export-hf``): ``transform(untransform(g))``
gives back ``g`` bit for bit; the checkpoint's own values come back except where 1 + w or -exp(A_log) rounded (see
``untransform``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from gguf import GGUFValueType, LlamaFileType

from qtool.errors import QtoolError
from qtool.gguf_io import KV

# What transformers 5's Qwen3_5TextConfig / Qwen3_5MoeTextConfig .to_dict() fills in (llama.cpp reads hparams that
# way); rope_parameters defaults are handled in _rope_parameters.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen35": {"vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
               "num_attention_heads": 16, "num_key_value_heads": 4, "max_position_embeddings": 32768,
               "rms_norm_eps": 1e-6, "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
               "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32},
    "qwen35moe": {"vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
                  "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                  "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
                  "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                  "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8,
                  "num_experts": 256},
}
# llama.cpp's QWEN35 loaders require rope.dimension_sections; its converter writes this when the config has none.
DEFAULT_MROPE_SECTION = [11, 11, 10, 0]
# Prefixes of the vision tower (and anything multimodal) in the ConditionalGeneration checkpoints.
_VISION_PARTS = ("visual.", "vision.", "vision_", "patch_embed", "merger.")
_MTP_GLOBALS = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
                "norm": "shared_head.norm"}


@dataclass
class HybridSpec:
    """The DeltaNet half of a Qwen3.5 config (the attention half is in ModelSpec)."""

    layer_types: list[str]          # per text layer: "linear_attention" or "full_attention"
    n_mtp: int                      # MTP layers, written after the text layers
    conv_kernel: int
    n_k_heads: int                  # linear_num_key_heads (ssm.group_count)
    n_v_heads: int                  # linear_num_value_heads (ssm.time_step_rank)
    k_dim: int                      # linear_key_head_dim (ssm.state_size)
    v_dim: int                      # linear_value_head_dim
    full_attention_interval: int
    rope_dim: int
    mrope_section: list[int] | None
    no_mtp: bool = False            # the checkpoint's MTP tensors are left out (n_mtp is then 0)

    @property
    def conv_channels(self) -> int:
        return 2 * self.n_k_heads * self.k_dim + self.n_v_heads * self.v_dim

    def is_recurrent(self, layer: int) -> bool:
        return layer < len(self.layer_types) and self.layer_types[layer] == "linear_attention"


def expand_like_autoconfig(gguf_arch: str, hp: dict[str, Any]) -> dict[str, Any]:
    out = dict(hp)
    for k, v in _DEFAULTS[gguf_arch].items():
        if out.get(k) is None:
            out[k] = v
    out["rope_parameters"] = _rope_parameters(out)
    if out.get("layer_types") is None:
        # transformers derives layer_types from full_attention_interval and then drops that key, so llama.cpp
        # writes its own default interval (4) for such a config.
        interval = out.pop("full_attention_interval", None) or 4
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise QtoolError(f"config.json: full_attention_interval must be a positive integer, got {interval!r}")
        n = out["num_hidden_layers"]
        out["layer_types"] = ["linear_attention" if (i + 1) % interval else "full_attention"
                              for i in range(n if isinstance(n, int) else 0)]
    return out


def _rope_parameters(hp: dict[str, Any]) -> dict[str, Any]:
    raw = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    if not isinstance(raw, dict):
        raise QtoolError(f"config.json: rope_parameters must be an object, got {raw!r}")
    rope = dict(raw)
    if "rope_theta" not in rope:
        rope["rope_theta"] = hp["rope_theta"] if hp.get("rope_theta") is not None else 10000.0
    if "partial_rotary_factor" not in rope:
        rope["partial_rotary_factor"] = (hp["partial_rotary_factor"] if hp.get("partial_rotary_factor") is not None
                                         else 0.25)
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def hybrid_spec(hp: dict[str, Any], n_layer: int, head_dim: int, need: Callable[..., int],
                no_mtp: bool = False) -> HybridSpec:
    """The DeltaNet half of the config; `no_mtp`: the MTP layers are left out (llama.cpp's --no-mtp)."""
    types = hp["layer_types"]
    if not isinstance(types, list) or any(t not in ("linear_attention", "full_attention") for t in types):
        raise QtoolError("config.json: layer_types must list 'linear_attention' or 'full_attention' per layer")
    if len(types) != n_layer:
        raise QtoolError(f"config.json: layer_types has {len(types)} entries, expected num_hidden_layers ({n_layer})")
    n_mtp = hp.get("mtp_num_hidden_layers") or 0
    if not isinstance(n_mtp, int) or isinstance(n_mtp, bool) or n_mtp < 0:
        raise QtoolError(f"config.json: mtp_num_hidden_layers must be a non-negative integer, got {n_mtp!r}")
    interval = hp.get("full_attention_interval", 4)
    if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
        raise QtoolError(f"config.json: full_attention_interval must be a positive integer, got {interval!r}")
    rope = hp["rope_parameters"]
    if rope.get("rope_type") not in (None, "default"):
        raise QtoolError(f"rope scaling {rope.get('rope_type')!r} is not supported for Qwen3.5")
    section = rope.get("mrope_section")
    if section is not None and (not isinstance(section, list) or not all(isinstance(x, int) for x in section)):
        raise QtoolError(f"config.json: rope_parameters.mrope_section must be a list of integers, got {section!r}")
    nk, nv = need("linear_num_key_heads"), need("linear_num_value_heads")
    if nv % nk:
        raise QtoolError(f"config.json: linear_num_value_heads {nv} is not a multiple of linear_num_key_heads {nk}")
    return HybridSpec(list(types), 0 if no_mtp else n_mtp, need("linear_conv_kernel_dim"), nk, nv,
                      need("linear_key_head_dim"), need("linear_value_head_dim"), interval,
                      int(head_dim * rope.get("partial_rotary_factor", 0.25)), section, no_mtp)


def hybrid_kvs(spec: Any, ftype: LlamaFileType) -> list[KV]:
    """The architecture keys in llama.cpp's order: TextModel's, Qwen2MoeModel's, the MTP count, Qwen3NextModel's,
    then the default rope sections."""
    a, hp, hs = spec.arch.gguf_name, spec.hparams, spec.hybrid
    u32, f32, i32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.INT32
    rope = hp["rope_parameters"]
    kvs = [KV(f"{a}.block_count", spec.n_layer + hs.n_mtp, u32),
           KV(f"{a}.context_length", int(hp["max_position_embeddings"]), u32),
           KV(f"{a}.embedding_length", spec.n_embd, u32)]
    if hp.get("intermediate_size") is not None:
        kvs.append(KV(f"{a}.feed_forward_length", int(hp["intermediate_size"]), u32))
    kvs += [KV(f"{a}.attention.head_count", spec.n_head, u32),
            KV(f"{a}.attention.head_count_kv", spec.n_head_kv, u32)]
    if hs.mrope_section is not None:
        kvs.append(KV(f"{a}.rope.dimension_sections", (list(hs.mrope_section) + [0, 0, 0, 0])[:4],
                      GGUFValueType.ARRAY, i32))
    kvs += [KV(f"{a}.rope.freq_base", float(rope["rope_theta"]), f32),
            KV(f"{a}.attention.layer_norm_rms_epsilon", float(hp["rms_norm_eps"]), f32)]
    if spec.arch.moe:
        kvs += [KV(f"{a}.expert_count", spec.n_expert, u32), KV(f"{a}.expert_used_count", spec.n_expert_used, u32)]
    kvs += [KV(f"{a}.attention.key_length", spec.head_dim, u32),
            KV(f"{a}.attention.value_length", spec.head_dim, u32),
            KV("general.file_type", int(ftype), u32)]
    if spec.arch.moe:
        kvs.append(KV(f"{a}.expert_feed_forward_length", spec.n_ff_exp, u32))
        kvs.append(KV(f"{a}.expert_shared_feed_forward_length", spec.n_ff_shexp, u32))
    if hs.n_mtp:
        kvs.append(KV(f"{a}.nextn_predict_layers", hs.n_mtp, u32))
    kvs += [KV(f"{a}.ssm.conv_kernel", hs.conv_kernel, u32),
            KV(f"{a}.ssm.state_size", hs.k_dim, u32),
            KV(f"{a}.ssm.group_count", hs.n_k_heads, u32),
            KV(f"{a}.ssm.time_step_rank", hs.n_v_heads, u32),
            KV(f"{a}.ssm.inner_size", hs.v_dim * hs.n_v_heads, u32),
            KV(f"{a}.attention.recurrent_layers", [hs.is_recurrent(i) for i in range(spec.n_layer + hs.n_mtp)],
               GGUFValueType.ARRAY, GGUFValueType.BOOL),
            KV(f"{a}.full_attention_interval", hs.full_attention_interval, u32),
            KV(f"{a}.rope.dimension_count", hs.rope_dim, u32)]
    if hs.mrope_section is None:
        kvs.append(KV(f"{a}.rope.dimension_sections", DEFAULT_MROPE_SECTION, GGUFValueType.ARRAY, i32))
    return kvs


# ----------------------------------------------------------------------------------------------------------------
# tensor names
# ----------------------------------------------------------------------------------------------------------------

def _text_name(hf_name: str) -> str:
    """The name without the multimodal layout's language_model. and with the MTP block as mtp.*."""
    name = hf_name.replace("language_model.", "")
    return name[len("model."):] if name.startswith("model.mtp.") else name


def is_mtp(hf_name: str) -> bool:
    """Whether a checkpoint tensor belongs to the MTP block (mtp.*, model.mtp.*, or under language_model.)."""
    return _text_name(hf_name).startswith("mtp.")


def canonical_name(hf_name: str, n_layer: int) -> str | None:
    """The checkpoint name as llama.cpp's converter sees it (model.layers.* for text, MTP and multimodal layouts
    alike), or None for a tensor a text conversion skips (the vision tower)."""
    if any(part in hf_name for part in _VISION_PARTS):
        return None
    name = _text_name(hf_name)
    if name.startswith("mtp."):
        parts = name.split(".", 3)
        if len(parts) == 4 and parts[1] == "layers" and parts[2].isdecimal():
            return f"model.layers.{n_layer + int(parts[2])}.{parts[3]}"
        if len(parts) == 3 and parts[1] in _MTP_GLOBALS:
            return f"model.layers.{n_layer}.{_MTP_GLOBALS[parts[1]]}.{parts[2]}"
    return name


def checkpoint_name(canonical: str, n_layer: int, multimodal: bool) -> str:
    """The inverse of canonical_name: the name the tensor has in a checkpoint of this layout (for messages, and the
    names export-hf writes, with ``multimodal=False``)."""
    parts = canonical.split(".", 3)
    if len(parts) == 4 and parts[1] == "layers" and int(parts[2]) >= n_layer:
        i, rest = int(parts[2]) - n_layer, parts[3]
        for short, mapped in _MTP_GLOBALS.items():
            if rest == f"{mapped}.weight" and i == 0:
                return f"mtp.{short}.weight"
        return f"mtp.layers.{i}.{rest}"
    if multimodal and canonical.startswith("model."):
        return "model.language_model." + canonical[len("model."):]
    return canonical


_ATTENTION = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_DELTANET = {"linear_attn.in_proj_qkv.weight": "attn_qkv.weight", "linear_attn.in_proj_z.weight": "attn_gate.weight",
             "linear_attn.in_proj_a.weight": "ssm_alpha.weight", "linear_attn.in_proj_b.weight": "ssm_beta.weight",
             "linear_attn.A_log": "ssm_a", "linear_attn.dt_bias": "ssm_dt.bias",
             "linear_attn.conv1d.weight": "ssm_conv1d.weight", "linear_attn.norm.weight": "ssm_norm.weight",
             "linear_attn.out_proj.weight": "ssm_out.weight"}
_DENSE_FFN = {"mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}
_MOE_FFN = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
            "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
            "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
            "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
            "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}
FUSED_GATE_UP = "mlp.experts.gate_up_proj"      # (n_expert, 2 * n_ff_exp, n_embd): gate rows, then up rows
_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight"}
_MTP = {"eh_proj.weight": "nextn.eh_proj.weight", "enorm.weight": "nextn.enorm.weight",
        "hnorm.weight": "nextn.hnorm.weight", "shared_head.norm.weight": "nextn.shared_head_norm.weight"}
_GLOBAL = {"model.embed_tokens.weight": ("token_embd.weight", None), "model.norm.weight": ("output_norm.weight", None),
           "lm_head.weight": ("output.weight", None)}


def per_expert_layout(canonical_names: Any) -> bool:
    """Whether a Qwen3.5-MoE checkpoint stores its experts one by one (mlp.experts.{x}.{proj}.weight) rather than
    fused (mlp.experts.gate_up_proj / down_proj, transformers 5's layout)."""
    return any(parse_expert(n) is not None for n in canonical_names)


EXPERT_PROJS = ("down_proj", "gate_proj", "up_proj")      # the order llama.cpp emits a layer's stacks in


def parse_expert(canonical: str) -> tuple[int, int, str] | None:
    """(layer, expert, projection) of a per-expert weight, or None."""
    parts = canonical.split(".")
    if (len(parts) == 8 and parts[:2] == ["model", "layers"] and parts[3:5] == ["mlp", "experts"]
            and parts[2].isdecimal() and parts[5].isdecimal() and parts[6] in EXPERT_PROJS and parts[7] == "weight"):
        return int(parts[2]), int(parts[5]), parts[6]
    return None


def expected_tensors(spec: Any, per_expert: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """canonical HF name -> (GGUF name, HF shape), for every tensor the checkpoint must hold (lm_head optional).

    The fused expert gate_up_proj maps to ffn_gate_exps (its up half is emitted beside it by the converter); with
    ``per_expert``, each expert's weight maps to the name of the stack it goes into.
    """
    hs: HybridSpec = spec.hybrid
    e, hd, v = spec.n_embd, spec.head_dim, spec.n_vocab
    out: dict[str, tuple[str, tuple[int, ...]]] = {
        "model.embed_tokens.weight": ("token_embd.weight", (v, e)),
        "model.norm.weight": ("output_norm.weight", (e,)),
        "lm_head.weight": ("output.weight", (v, e)),
    }
    q_rows, kv_rows = spec.n_head * hd, spec.n_head_kv * hd
    attn_shapes = {"self_attn.q_proj.weight": (2 * q_rows, e), "self_attn.k_proj.weight": (kv_rows, e),
                   "self_attn.v_proj.weight": (kv_rows, e), "self_attn.o_proj.weight": (e, q_rows),
                   "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)}
    nv, vd, conv = hs.n_v_heads, hs.v_dim, hs.conv_channels
    delta_shapes = {"linear_attn.in_proj_qkv.weight": (conv, e), "linear_attn.in_proj_z.weight": (nv * vd, e),
                    "linear_attn.in_proj_a.weight": (nv, e), "linear_attn.in_proj_b.weight": (nv, e),
                    "linear_attn.A_log": (nv,), "linear_attn.dt_bias": (nv,),
                    "linear_attn.conv1d.weight": (conv, 1, hs.conv_kernel), "linear_attn.norm.weight": (vd,),
                    "linear_attn.out_proj.weight": (e, nv * vd)}
    if spec.arch.moe:
        x, fe, fs = spec.n_expert, spec.n_ff_exp, spec.n_ff_shexp
        ffn_shapes = {"mlp.gate.weight": (x, e), FUSED_GATE_UP: (x, 2 * fe, e), "mlp.experts.down_proj": (x, e, fe),
                      "mlp.shared_expert.gate_proj.weight": (fs, e), "mlp.shared_expert.up_proj.weight": (fs, e),
                      "mlp.shared_expert.down_proj.weight": (e, fs), "mlp.shared_expert_gate.weight": (1, e)}
        ffn_names = {**_MOE_FFN, FUSED_GATE_UP: "ffn_gate_exps.weight"}
        if per_expert:
            del ffn_shapes[FUSED_GATE_UP], ffn_shapes["mlp.experts.down_proj"]
            for j in range(x):
                for proj in EXPERT_PROJS:
                    key = f"mlp.experts.{j}.{proj}.weight"
                    ffn_shapes[key] = (e, fe) if proj == "down_proj" else (fe, e)
                    ffn_names[key] = f"ffn_{proj.split('_')[0]}_exps.weight"
    else:
        ff = spec.n_ff
        ffn_shapes = {"mlp.gate_proj.weight": (ff, e), "mlp.up_proj.weight": (ff, e), "mlp.down_proj.weight": (e, ff)}
        ffn_names = _DENSE_FFN
    for i in range(spec.n_layer + hs.n_mtp):
        p = f"model.layers.{i}."
        mixer = (_DELTANET, delta_shapes) if hs.is_recurrent(i) else (_ATTENTION, attn_shapes)
        for names, shapes in (mixer, (ffn_names, ffn_shapes)):
            for hf, shape in shapes.items():
                out[p + hf] = (f"blk.{i}.{names[hf]}", shape)
        for hf, g in _NORMS.items():
            out[p + hf] = (f"blk.{i}.{g}", (e,))
        if i >= spec.n_layer:
            for hf, g in _MTP.items():
                out[p + hf] = (f"blk.{i}.{g}", (e, 2 * e) if hf == "eh_proj.weight" else (e,))
    return out


# ----------------------------------------------------------------------------------------------------------------
# tensor data
# ----------------------------------------------------------------------------------------------------------------

def tile_v_heads(w: np.ndarray, axis: int, n_k_heads: int, head_dim: int) -> np.ndarray:
    """V heads grouped by key head ([k0: v0..v(r-1)], [k1: ...]) -> tiled ([v0 of k0, k1, ...], [v1 of ...]), along
    ``axis``: the order ggml's broadcast over key heads expects."""
    shape = w.shape
    r = shape[axis] // (n_k_heads * head_dim)
    split = shape[:axis] + (n_k_heads, r, head_dim) + shape[axis + 1:]
    return np.ascontiguousarray(np.swapaxes(w.reshape(split), axis, axis + 1)).reshape(shape)


def untile_v_heads(w: np.ndarray, axis: int, n_k_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of tile_v_heads: tiled V heads -> grouped by key head, along ``axis``."""
    shape = w.shape
    r = shape[axis] // (n_k_heads * head_dim)
    split = shape[:axis] + (r, n_k_heads, head_dim) + shape[axis + 1:]
    return np.ascontiguousarray(np.swapaxes(w.reshape(split), axis, axis + 1)).reshape(shape)


def exp_like_torch(w: np.ndarray) -> np.ndarray:
    """exp as llama.cpp's converter computes it (torch.exp): with torch itself where it is installed.

    torch's float32 exp is not correctly rounded, and which of its code paths (vectorised SLEEF or scalar) a value
    takes depends on the tensor's length and the CPU, so no numpy formula reproduces it bit for bit; numpy's exp
    differs from it in the last bit for some values. ssm_a holds a few dozen values per layer, so torch's import is
    the whole cost.
    """
    try:
        import torch
    except ImportError:
        return np.exp(w.astype(np.float32)).astype(w.dtype)
    return torch.exp(torch.from_numpy(np.ascontiguousarray(w))).numpy()


def torch_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("torch") is not None


def plus_one(w: np.ndarray) -> np.ndarray:
    """A Qwen3.5 RMSNorm weight as llama.cpp stores it (these norms scale by 1 + w), in w's own dtype."""
    return w + w.dtype.type(1)


def transform(canonical: str, w: np.ndarray, hs: HybridSpec) -> np.ndarray:
    """One tensor's data as llama.cpp writes it (before the output type): V-head tiling, -exp(A_log), squeezed
    conv kernel, 1 + w norms. Arithmetic stays in the stored dtype (float16 stays float16; bf16 arrives as
    float32), as torch does it in the reference converter."""
    nk, vd = hs.n_k_heads, hs.v_dim
    reorder = hs.n_v_heads != nk
    qk = 2 * nk * hs.k_dim
    if canonical.endswith("linear_attn.in_proj_qkv.weight"):
        if reorder:
            w = np.concatenate([w[:qk], tile_v_heads(w[qk:], 0, nk, vd)])
    elif canonical.endswith("linear_attn.in_proj_z.weight"):
        w = tile_v_heads(w, 0, nk, vd) if reorder else w
    elif canonical.endswith(("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight", "linear_attn.dt_bias")):
        w = tile_v_heads(w, 0, nk, 1) if reorder else w
    elif canonical.endswith("linear_attn.A_log"):
        w = -exp_like_torch(tile_v_heads(w, 0, nk, 1) if reorder else w)
    elif canonical.endswith("linear_attn.conv1d.weight"):
        w = w.reshape(w.shape[0], w.shape[-1]) if w.ndim == 3 else w
        if reorder:
            w = np.concatenate([w[:qk], tile_v_heads(w[qk:], 0, nk, vd)])
    elif canonical.endswith("linear_attn.out_proj.weight"):
        w = tile_v_heads(w, 1, nk, vd) if reorder else w
    elif canonical.endswith("norm.weight") and not canonical.endswith("linear_attn.norm.weight"):
        w = plus_one(w)
    return w


def preimage(target: np.ndarray, f: Callable[[np.ndarray], np.ndarray], guess: np.ndarray,
             max_steps: int = 64) -> np.ndarray:
    """float32 x with f(x) == target bit for bit, for a non-decreasing float32 function f (called on the whole array,
    as the converter calls it: torch's exp rounds differently by position and length), searched one float at a time
    from ``guess``. Where no float gives the target exactly, the x whose f(x) came nearest."""
    target = np.asarray(target, dtype=np.float32)
    x = np.array(guess, dtype=np.float32)
    best, best_err = x.copy(), np.full(x.shape, np.inf)
    for _ in range(max_steps):
        y = np.asarray(f(x), dtype=np.float32)
        err = np.abs(y.astype(np.float64) - target.astype(np.float64))
        closer = err < best_err
        best[closer], best_err[closer] = x[closer], err[closer]
        off = y != target
        if not off.any():
            break
        step = np.where(y[off] < target[off], np.float32(np.inf), np.float32(-np.inf))
        x[off] = np.nextafter(x[off], step)
    return best


def untransform(canonical: str, w: np.ndarray, hs: HybridSpec) -> np.ndarray:
    """The inverse of transform: one GGUF tensor's float32 data as the checkpoint stores it (HF shape).

    Two steps of transform round, and are undone by the float32 value that rounds the same way, so that converting
    again gives back the GGUF's bytes (and transformers, which computes 1 + w and -exp(A_log) in float32 too, sees
    the same numbers): a norm weight w with 1 + w == the stored value (w's low bits are lost wherever 1 + w has a
    larger exponent than w), and A_log with -exp(A_log) == ssm_a (several float32 A_log share one exp, so A_log is
    known only to that precision)."""
    nk, vd = hs.n_k_heads, hs.v_dim
    reorder = hs.n_v_heads != nk
    qk = 2 * nk * hs.k_dim
    w = np.asarray(w, dtype=np.float32)
    if canonical.endswith(("linear_attn.in_proj_qkv.weight", "linear_attn.conv1d.weight")):
        if reorder:
            w = np.concatenate([w[:qk], untile_v_heads(w[qk:], 0, nk, vd)])
        if canonical.endswith("conv1d.weight"):
            w = w.reshape(w.shape[0], 1, w.shape[1])
    elif canonical.endswith("linear_attn.in_proj_z.weight"):
        w = untile_v_heads(w, 0, nk, vd) if reorder else w
    elif canonical.endswith(("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight", "linear_attn.dt_bias")):
        w = untile_v_heads(w, 0, nk, 1) if reorder else w
    elif canonical.endswith("linear_attn.A_log"):
        e = -w
        if not (e > 0).all():
            raise QtoolError(f"ssm_a of layer {canonical.split('.')[2]} has a value >= 0 or NaN ({float(w.max())}); "
                             "it must be -exp(A_log) < 0")
        w = preimage(e, exp_like_torch, np.log(e))
        w = untile_v_heads(w, 0, nk, 1) if reorder else w
    elif canonical.endswith("linear_attn.out_proj.weight"):
        w = untile_v_heads(w, 1, nk, vd) if reorder else w
    elif canonical.endswith("norm.weight") and not canonical.endswith("linear_attn.norm.weight"):
        w = preimage(w, plus_one, w - np.float32(1))
    return w
