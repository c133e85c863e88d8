"""GGUF -> HuggingFace checkpoint directory: the inverse of ``convert``.

``plan_export(gguf_path, dtype)`` reads the GGUF header and decides everything (config.json, tensor names and
shapes, tokenizer files, notes) without touching tensor data; ``write_export(plan, outdir, ...)`` streams the
tensors one at a time (dequantize, undo the rotary permutation / re-fuse Baichuan's W_pack, cast) into
safetensors shards and renames the finished directory into place.

The output is built so that ``qtool convert`` turns it back into the same GGUF: identical tensor bytes for F32
files (F16/BF16 after the rounding --dtype implies) and identical tokenizer metadata. What a GGUF does not
record is reconstructed from conventions and said in the plan's notes:

* llama3 rope scaling exists in a GGUF only as the ``rope_freqs`` tensor. It fixes the factor and the two
  wavelength thresholds (original_max_position_embeddings / low_freq_factor and .../high_freq_factor), not the
  three numbers themselves; low_freq_factor = 1 (Llama 3.x's value) is assumed, which reproduces the same
  factors. The recovered parameters are checked by recomputing the tensor with the converter's own code.
* Baichuan2's lm_head rows are already unit-norm when the GGUF came from ``qtool convert`` (it applies
  NormHead); HF's NormHead normalises them again on the first forward, which leaves unit rows unchanged.
* Special ids with no tokenizer-file home (e.g. an unk id on a SentencePiece vocab) go to config.json as
  ``{type}_token_id``, where the converter (and llama.cpp's) reads them.
* The Qwen3.5 hybrids are written as the text model, ``Qwen3_5(Moe)ForCausalLM`` (a GGUF holds no vision tower),
  with the MTP layer back under ``mtp.*`` and every tensor through ``qwen35.untransform``, the inverse of the
  converter's. Norm weights and A_log come back as the float32 values that give the GGUF's 1 + w and -exp(A_log)
  exactly, which may differ from the original checkpoint's in the last bits those two roundings dropped.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from qtool.archs import BAICHUAN_ALIBI_DEPTH, BAICHUAN_ROPE_DEPTH, Arch, arch_for_gguf
from qtool.errors import QtoolError
from qtool.floats import f32_to_bf16_bits
from qtool.gguf_io import Progress
from qtool.model_file import GGUFModel, TensorRef, decode_rows

from . import qwen35
from .models import (BAICHUAN2_VOCAB_SIZE, arch_kvs, expected_hf_tensors, expert_hf_name, hf_name_for_gguf,
                     llama3_rope_factors, model_spec, unpermute_rows)

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9     # transformers' save_pretrained default, "5GB"

# config.json model_type where it is not the GGUF architecture name
_HF_MODEL_TYPE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "qwen35": "qwen3_5_text",
                  "qwen35moe": "qwen3_5_moe_text"}


@dataclass(frozen=True)
class DType:
    name: str           # --dtype
    safetensors: str    # safetensors header dtype
    torch: str          # config.json torch_dtype
    itemsize: int


DTYPES = {
    "f32": DType("f32", "F32", "float32", 4),
    "f16": DType("f16", "F16", "float16", 2),
    "bf16": DType("bf16", "BF16", "bfloat16", 2),
}


@dataclass
class HFTensor:
    """One tensor of the exported checkpoint: its HF name, shape, and how to make its float32 data."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(repr=False)
    source: str = ""                     # GGUF tensor(s) it comes from, for messages


@dataclass
class ExportPlan:
    gguf_path: Path
    arch: Arch
    dtype: DType
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tensors: list[HFTensor]
    files: dict[str, bytes]              # the small files besides config.json: tokenizer, README.md
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(_numel(t.shape) * self.dtype.itemsize for t in self.tensors)


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


# --- reading ---------------------------------------------------------------------------------------------------

def _nice_float(x: float) -> float:
    """The shortest decimal that is the same float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


# --- config.json -----------------------------------------------------------------------------------------------

def _hparams(model: GGUFModel, arch: Arch) -> dict[str, Any]:
    """The numbers a GGUF records about the model (model.hparams), with llama.cpp's runtime defaults for missing
    keys, as the HF config builder reads them."""
    h = model.hparams.require_uniform()
    tensors = model.tensors
    n_embd, n_head = h.need("n_embd"), h.need("n_head")
    hp = {
        # Qwen3.5-MoE has no dense FFN at all
        "n_layer": h.need("n_layer"), "n_embd": n_embd, "n_ff": h.n_ff if arch.hybrid else h.need("n_ff"),
        "n_head": n_head,
        "n_head_kv": h.head_count_kv, "n_ctx": h.context_length, "eps": h.need("rms_eps"), "theta": h.rope_base,
        "key_length": h.key_length, "value_length": h.value_length, "rope_dim": h.n_rot,
    }
    a = arch.gguf_name
    if "token_embd.weight" not in tensors:
        raise QtoolError("GGUF has no token_embd.weight (a vocab-only file?)")
    hp["n_vocab"] = tensors["token_embd.weight"].shape[0]
    hp["head_dim"] = int(hp["key_length"] or n_embd // n_head)
    if hp["value_length"] is not None and hp["value_length"] != hp["head_dim"]:
        raise QtoolError(f"key_length {hp['head_dim']} != value_length {hp['value_length']}: "
                         f"no HF {a} config can express that")
    if hp["rope_dim"] is not None and hp["rope_dim"] != hp["head_dim"] and a != "baichuan" and not arch.hybrid:
        raise QtoolError(f"partial rotary embedding (rope.dimension_count {hp['rope_dim']} < head size "
                         f"{hp['head_dim']}) has no HF {a} equivalent")
    if n_head % hp["n_head_kv"]:
        raise QtoolError(f"head_count {n_head} is not a multiple of head_count_kv {hp['n_head_kv']}")
    return hp


_BAICHUAN_REPOS = {
    # (layers, Baichuan2?) -> (HF repo holding the remote code, architecture spelling, config class)
    (BAICHUAN_ROPE_DEPTH, False): ("baichuan-inc/Baichuan-7B", "BaiChuanForCausalLM", "BaiChuanConfig"),
    (BAICHUAN_ALIBI_DEPTH, False): ("baichuan-inc/Baichuan-13B-Base", "BaichuanForCausalLM", "BaichuanConfig"),
    (BAICHUAN_ROPE_DEPTH, True): ("baichuan-inc/Baichuan2-7B-Base", "BaichuanForCausalLM", "BaichuanConfig"),
    (BAICHUAN_ALIBI_DEPTH, True): ("baichuan-inc/Baichuan2-13B-Base", "BaichuanForCausalLM", "BaichuanConfig"),
}


def _hf_config(kv: dict[str, Any], arch: Arch, hp: dict[str, Any], tensors: dict[str, Any], dtype: DType,
               notes: list[str]) -> dict[str, Any]:
    a = arch.gguf_name
    tied = "output.weight" not in tensors
    if tied and arch.output_required:
        raise QtoolError(f"GGUF has no output.weight, which {a} requires (llama.cpp cannot load this file either)")
    c: dict[str, Any] = {
        "hidden_act": "silu",
        "hidden_size": hp["n_embd"],
        "initializer_range": 0.02,
        "intermediate_size": hp["n_ff"],
        "num_attention_heads": hp["n_head"],
        "num_hidden_layers": hp["n_layer"],
        "rms_norm_eps": _nice_float(hp["eps"]),
        "tie_word_embeddings": tied,
        "torch_dtype": dtype.torch,
        "use_cache": True,
        "vocab_size": hp["n_vocab"],
    }
    n_ctx = hp["n_ctx"]
    if a == "baichuan":
        is_v2 = hp["n_vocab"] == BAICHUAN2_VOCAB_SIZE
        repo = _BAICHUAN_REPOS.get((hp["n_layer"], is_v2))
        c["architectures"] = [repo[1] if repo else "BaichuanForCausalLM"]
        if repo:
            # transformers resolves "repo--module.Class" against that repo's remote code (trust_remote_code)
            c["auto_map"] = {"AutoConfig": f"{repo[0]}--configuration_baichuan.{repo[2]}",
                             "AutoModelForCausalLM": f"{repo[0]}--modeling_baichuan.{repo[1]}"}
        else:
            notes.append(f"warning: baichuan with {hp['n_layer']} layers matches no Baichuan release; "
                         "config.json has no auto_map")
        c["model_type"] = "baichuan"
        if n_ctx is not None:
            # Baichuan-7B's remote code reads max_position_embeddings, the 13B ones model_max_length
            c["max_position_embeddings"] = c["model_max_length"] = int(n_ctx)
        if hp["n_head_kv"] != hp["n_head"]:
            raise QtoolError("baichuan with grouped-query attention has no HF equivalent")
        if hp["theta"] is not None and hp["theta"] != 10000.0:
            notes.append(f"warning: rope.freq_base {hp['theta']:g} dropped: Baichuan's HF code uses 10000")
        if is_v2:
            c["z_loss_weight"] = 0
            notes.append("Baichuan2: output.weight is written as stored. If it came from qtool convert its rows "
                         "are already unit-norm (NormHead applied), which HF's NormHead leaves unchanged; a "
                         "llama.cpp-converted file has raw rows, which HF normalises but llama.cpp does not")
        return dict(sorted(c.items()))

    c["architectures"] = [arch.hf_names[0]]
    c["model_type"] = _HF_MODEL_TYPE.get(a, a)
    if arch.moe:
        c.update(_moe_config(kv, arch, hp, tensors, notes))
    c["attention_dropout"] = 0.0
    c["num_key_value_heads"] = hp["n_head_kv"]
    c["max_position_embeddings"] = int(n_ctx) if n_ctx is not None else (2048 if a == "llama" else 32768)
    c["rope_theta"] = _nice_float(hp["theta"]) if hp["theta"] is not None else 10000.0
    c["rope_scaling"] = _rope_scaling(kv, a, notes)
    if arch.hybrid:
        return _hybrid_config(kv, arch, hp, c, notes)
    if a == "llama":
        c["attention_bias"] = "blk.0.attn_q.bias" in tensors
        c["mlp_bias"] = "blk.0.ffn_gate.bias" in tensors
        c["head_dim"] = hp["head_dim"]
        c["pretraining_tp"] = 1
    else:
        c["max_window_layers"] = hp["n_layer"]
        c["sliding_window"] = None
        c["use_sliding_window"] = False
        if a in ("qwen3", "qwen3moe"):
            c["attention_bias"] = "blk.0.attn_q.bias" in tensors
            c["head_dim"] = hp["head_dim"]
        elif hp["key_length"] is not None:
            c["head_dim"] = hp["head_dim"]
    return dict(sorted(c.items()))


def _moe_config(kv: dict[str, Any], arch: Arch, hp: dict[str, Any], tensors: dict[str, Any],
                notes: list[str]) -> dict[str, Any]:
    """The MoE fields of a Qwen2-MoE / Qwen3-MoE config.json. Widths missing from the GGUF are read off the
    expert tensors (llama.cpp would guess n_ff / n_expert_used instead)."""
    a = arch.gguf_name

    def need(key: str) -> int:
        if kv.get(f"{a}.{key}") is None:
            raise QtoolError(f"GGUF has no {a}.{key}, which a HF {arch.hf_names[0]} needs")
        return int(kv[f"{a}.{key}"])

    def width(key: str, tensor: str) -> int:
        if kv.get(f"{a}.{key}") is not None:
            return int(kv[f"{a}.{key}"])
        if tensor not in tensors:
            raise QtoolError(f"GGUF has neither {a}.{key} nor {tensor}")
        notes.append(f"{a}.{key} missing: taken from {tensor}'s shape")
        return int(tensors[tensor].shape[-2])

    c: dict[str, Any] = {
        "num_experts": need("expert_count"),
        "num_experts_per_tok": need("expert_used_count"),
        "moe_intermediate_size": width("expert_feed_forward_length", "blk.0.ffn_gate_exps.weight"),
        "norm_topk_prob": arch.moe_norm_topk,     # what llama.cpp does for this architecture, whatever was asked
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }
    if arch.shared_expert:
        c["shared_expert_intermediate_size"] = width("expert_shared_feed_forward_length", "blk.0.ffn_gate_shexp.weight")
    return c


# what _moe_config writes that Qwen3.5-MoE's config has no field for (it always renormalises the top k)
_NOT_QWEN35_MOE = ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers")


def _hybrid_config(kv: dict[str, Any], arch: Arch, hp: dict[str, Any], c: dict[str, Any],
                   notes: list[str]) -> dict[str, Any]:
    """A Qwen3_5TextConfig / Qwen3_5MoeTextConfig: the DeltaNet (linear_*), layer_types, MTP and partial
    interleaved-mrope fields, from the keys convert/qwen35.py's hybrid_kvs writes."""
    a = arch.gguf_name

    def need(key: str) -> Any:
        if kv.get(f"{a}.{key}") is None:
            raise QtoolError(f"GGUF has no {a}.{key}, which a HF {arch.hf_names[0]} needs")
        return kv[f"{a}.{key}"]

    for key in _NOT_QWEN35_MOE:
        c.pop(key, None)
    if hp["n_ff"] is None:
        if not arch.moe:
            raise QtoolError(f"GGUF has no {a}.feed_forward_length, which a HF {arch.hf_names[0]} needs")
        del c["intermediate_size"]
    n_mtp = int(kv.get(f"{a}.nextn_predict_layers") or 0)
    n_layer = hp["n_layer"] - n_mtp
    if n_layer <= 0:
        raise QtoolError(f"{a}.nextn_predict_layers {n_mtp} leaves no text layers of block_count {hp['n_layer']}")
    recurrent = need("attention.recurrent_layers")
    if not isinstance(recurrent, list) or len(recurrent) != hp["n_layer"]:
        raise QtoolError(f"{a}.attention.recurrent_layers must list one flag per block ({hp['n_layer']})")
    if any(recurrent[n_layer:]):
        raise QtoolError(f"{a}.attention.recurrent_layers marks an MTP layer recurrent; HF's MTP layers are full "
                         "attention")
    n_k, n_v, inner = int(need("ssm.group_count")), int(need("ssm.time_step_rank")), int(need("ssm.inner_size"))
    if n_v % n_k or inner % n_v:
        raise QtoolError(f"{a}.ssm.time_step_rank {n_v} must be a multiple of ssm.group_count {n_k}, and "
                         f"ssm.inner_size {inner} a multiple of it")
    head_dim, rope_dim = hp["head_dim"], int(need("rope.dimension_count"))
    partial = rope_dim / head_dim
    if int(head_dim * partial) != rope_dim:
        raise QtoolError(f"{a}.rope.dimension_count {rope_dim} is not expressible as a fraction of head size "
                         f"{head_dim}")
    if kv.get(f"{a}.rope.scaling.type") not in (None, "none"):
        raise QtoolError(f"rope scaling {kv[f'{a}.rope.scaling.type']!r} has no HF {arch.hf_names[0]} equivalent")
    rope: dict[str, Any] = {"mrope_interleaved": True, "partial_rotary_factor": partial, "rope_type": "default",
                            "rope_theta": c.pop("rope_theta")}
    # The converter writes a config's own mrope_section before rope.freq_base, and its default (no mrope_section
    # in config.json) last: the key's place says which it was.
    keys = list(kv)
    sections = need("rope.dimension_sections")
    if keys.index(f"{a}.rope.dimension_sections") < keys.index(f"{a}.rope.freq_base"):
        rope["mrope_section"] = [int(x) for x in (sections[:3] if len(sections) == 4 and not sections[3]
                                                  else sections)]
    elif list(sections) != qwen35.DEFAULT_MROPE_SECTION:
        raise QtoolError(f"{a}.rope.dimension_sections {list(sections)} written after the ssm keys, where only "
                         f"the default {qwen35.DEFAULT_MROPE_SECTION} goes")
    c.pop("rope_scaling")
    c.update({
        "attention_bias": False,
        "full_attention_interval": int(need("full_attention_interval")),
        "head_dim": head_dim,
        "layer_types": ["linear_attention" if r else "full_attention" for r in recurrent[:n_layer]],
        "linear_conv_kernel_dim": int(need("ssm.conv_kernel")),
        "linear_key_head_dim": int(need("ssm.state_size")),
        "linear_num_key_heads": n_k,
        "linear_num_value_heads": n_v,
        "linear_value_head_dim": inner // n_v,
        "mtp_num_hidden_layers": n_mtp,
        "num_hidden_layers": n_layer,
        "rope_parameters": dict(sorted(rope.items())),
    })
    notes.append(f"written as {arch.hf_names[0]}, the text model (a GGUF holds no vision tower)")
    if n_mtp:
        notes.append(f"the MTP layer{'s' if n_mtp > 1 else ''} (blk.{n_layer}{'...' if n_mtp > 1 else ''}) written "
                     "as mtp.*, which transformers does not load")
    notes.append("norm weights written as w with 1 + w (float32) == the GGUF's, and A_log with -exp(A_log) == "
                 "ssm_a: the original values only to the precision those roundings kept")
    return dict(sorted(c.items()))


def _rope_scaling(kv: dict[str, Any], a: str, notes: list[str]) -> dict[str, Any] | None:
    kind = kv.get(f"{a}.rope.scaling.type")
    factor = kv.get(f"{a}.rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"factor": _nice_float(factor), "rope_type": "linear"}
    if kind == "yarn":
        out: dict[str, Any] = {"factor": _nice_float(factor), "rope_type": "yarn"}
        if (n := kv.get(f"{a}.rope.scaling.original_context_length")) is not None:
            out["original_max_position_embeddings"] = int(n)
        for key, hf in (("yarn_ext_factor", "extrapolation_factor"), ("yarn_attn_factor", "attention_factor"),
                        ("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (v := kv.get(f"{a}.rope.scaling.{key}")) is not None:
                out[hf] = _nice_float(v)
        return out
    raise QtoolError(f"rope scaling type {kind!r} has no HF {a} equivalent")


# --- llama3 rope scaling from the rope_freqs tensor ------------------------------------------------------------

def recover_llama3_rope(factors: np.ndarray, check: Callable[[dict[str, Any]], np.ndarray | None],
                        rope_theta: float, head_dim: int) -> tuple[dict[str, Any], str]:
    """llama3 rope_scaling parameters that reproduce `factors` (llama.cpp's rope_freqs), and a note.

    Per dimension the factor is 1 (wavelength below C/H), `factor` (above C/L), or in between
    1/((1-s)/factor + s) with s = (C/wavelength - L)/(H - L), where C = original_max_position_embeddings,
    L/H = low/high_freq_factor. Only C/L and C/H are observable, so L = 1 is assumed; with a single
    in-between dimension H = 4 is assumed too, and with none C = 8192 (all three are Llama 3.x's values).
    `check(params)` recomputes the tensor the converter would write; the first candidate that matches
    bit for bit wins, else the closest one is returned with a warning.
    """
    f = factors.astype(np.float64)
    factor = float(f.max())
    if not factor > 1.0:
        raise QtoolError("rope_freqs.weight is all ones: no llama3 scaling to recover")
    freqs = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    if len(wavelen) != len(f):
        raise QtoolError(f"rope_freqs.weight has {len(f)} entries, head size {head_dim} implies {len(wavelen)}")
    rel = 1e-6
    ones, full = f <= 1.0 + rel, f >= factor * (1 - rel)
    between = ~ones & ~full
    low = 1.0
    if between.sum() >= 2:
        # 1/f = (1-s)/factor + s  =>  s, which is linear in 1/wavelength: s = C/(H-L) * x - L/(H-L)
        s = (1 / f[between] - 1 / factor) / (1 - 1 / factor)
        slope, icpt = np.polyfit(1 / wavelen[between], s, 1)
        high = low - low / icpt
        ctx = slope * (high - low)
        how = "fitted to the in-between dimensions, low_freq_factor=1 assumed"
    elif between.sum() == 1:
        high = 4.0
        s = (1 / f[between][0] - 1 / factor) / (1 - 1 / factor)
        ctx = (s * (high - low) + low) * wavelen[between][0]
        how = "one in-between dimension: low_freq_factor=1 and high_freq_factor=4 assumed"
    else:
        # every C with H * (longest unscaled wavelength) < C < (shortest fully scaled one) gives these factors
        high = 4.0
        lowest = high * float(wavelen[ones].max()) if ones.any() else 0.0
        highest = float(wavelen[full].min())      # not empty: the largest factor is in it
        ctx = 8192.0 if lowest < 8192.0 < highest else (lowest + highest) / 2
        how = "no in-between dimension: low_freq_factor=1, high_freq_factor=4 assumed"

    candidates: list[dict[str, Any]] = []
    for c in (round(ctx), ctx):
        for h in (round(high * 1000) / 1000, round(high, 1), high):
            for fac in (_nice_float(factor), factor):
                p = {"factor": fac, "high_freq_factor": float(h), "low_freq_factor": low,
                     "original_max_position_embeddings": int(round(c)) if float(c).is_integer() else float(c),
                     "rope_type": "llama3"}
                if p not in candidates:
                    candidates.append(p)
    target = factors.astype(np.float32).view(np.uint32)
    best, best_err = candidates[0], math.inf
    for p in candidates:
        got = check(p)
        if got is None or got.shape != factors.shape:
            continue
        if np.array_equal(got.astype(np.float32).view(np.uint32), target):
            return p, f"llama3 rope scaling recovered from rope_freqs ({how}); reproduces it exactly"
        err = float(np.max(np.abs(got.astype(np.float64) - f)))
        if err < best_err:
            best, best_err = p, err
    return best, (f"warning: llama3 rope scaling recovered from rope_freqs only approximately ({how}; "
                  f"max difference {best_err:.3g})")


# --- tensors ---------------------------------------------------------------------------------------------------

def _plan_tensors(arch: Arch, hp: dict[str, Any], config: dict[str, Any], model: GGUFModel) -> list[HFTensor]:
    if arch.hybrid:
        return _plan_hybrid_tensors(config, model)
    tensors = model.tensors
    spec = model_spec(config, normhead=False)
    expected = expected_hf_tensors(spec)
    if config.get("tie_word_embeddings"):
        expected.pop("lm_head.weight", None)

    def loader(name: str) -> Callable[[], np.ndarray]:
        return lambda: model.decode(name)

    # GGUF tensors -> HF names; Baichuan's attn_q/k/v are gathered into W_pack
    by_hf: dict[str, HFTensor] = {}
    for name, t in tensors.items():
        if name == "rope_freqs.weight" and arch.gguf_name == "llama":
            continue  # carried by config.json rope_scaling
        layer_qkv = re.fullmatch(r"blk\.(\d+)\.attn_([qkv])\.weight", name)
        if arch.gguf_name == "baichuan" and layer_qkv:
            i = int(layer_qkv.group(1))
            hf = f"model.layers.{i}.self_attn.W_pack.weight"
            if hf not in expected:
                raise QtoolError(f"GGUF tensor {name!r} has no place in a HF {spec.hf_arch}")
            if tuple(t.shape) != (hp["n_embd"], hp["n_embd"]):
                raise QtoolError(f"GGUF tensor {name!r} has shape {list(t.shape)}, but W_pack needs "
                                 f"{[hp['n_embd'], hp['n_embd']]} parts")
            if hf not in by_hf:
                by_hf[hf] = HFTensor(hf, (3 * hp["n_embd"], hp["n_embd"]), _w_pack_loader(model, i, hp["n_head"]),
                                     f"blk.{i}.attn_{{q,k,v}}.weight")
            continue
        stack = re.fullmatch(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight", name)
        if arch.moe and stack and len(t.shape) == 3:
            # one (n_expert, rows, cols) stack -> n_expert HF tensors, each decoded from its own slice of the stack
            for x in range(t.shape[0]):
                hf = expert_hf_name(int(stack.group(1)), x, f"{stack.group(2)}_proj")
                if hf not in expected:
                    raise QtoolError(f"GGUF tensor {name!r} holds expert {x}, which has no place in a HF "
                                     f"{spec.hf_arch} with {config['num_experts']} experts")
                by_hf[hf] = HFTensor(hf, tuple(t.shape[1:]), _expert_loader(model, name, x), f"{name}[{x}]")
            continue
        hf = hf_name_for_gguf(name)
        if hf is None or hf not in expected:
            raise QtoolError(f"GGUF tensor {name!r} has no place in a HF {spec.hf_arch}")
        load = loader(name)
        if arch.permute_qk and re.search(r"\.attn_q\.(weight|bias)$", name):
            load = _unpermuted(load, hp["n_head"])
        elif arch.permute_qk and re.search(r"\.attn_k\.(weight|bias)$", name):
            load = _unpermuted(load, hp["n_head_kv"])
        by_hf[hf] = HFTensor(hf, tuple(t.shape), load, name)

    missing = [n for n in expected if n not in by_hf]
    if missing:
        raise QtoolError(f"GGUF lacks the tensor for {missing[0]!r}"
                         + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))
    if arch.gguf_name == "baichuan":
        for i in range(hp["n_layer"]):
            absent = [f"blk.{i}.attn_{p}.weight" for p in "qkv" if f"blk.{i}.attn_{p}.weight" not in tensors]
            if absent:
                raise QtoolError(f"GGUF lacks {absent[0]!r}, needed for W_pack")
    out = []
    for hf, shape in expected.items():
        t = by_hf[hf]
        if t.shape != shape:
            raise QtoolError(f"GGUF tensor {t.source} has shape {list(t.shape)}, but a {spec.hf_arch} with this "
                             f"config needs {list(shape)} for {hf}")
        out.append(t)
    return out


def _plan_hybrid_tensors(config: dict[str, Any], model: GGUFModel) -> list[HFTensor]:
    """Qwen3.5 / Qwen3.5-MoE: the converter's own table (qwen35.expected_tensors) read backwards, in its order; the
    experts fused as transformers 5 stores them (gate_up_proj = [ffn_gate_exps; ffn_up_exps] per expert)."""
    tensors = model.tensors
    spec = model_spec(config)
    hs = spec.hybrid
    assert hs is not None
    expected = qwen35.expected_tensors(spec)
    if config.get("tie_word_embeddings"):
        del expected["lm_head.weight"]
    # GGUF name -> (canonical HF name, the GGUF shape the converter gives that tensor)
    sources: dict[str, tuple[str, tuple[int, ...]]] = {}
    for canonical, (g, shape) in expected.items():
        if canonical.endswith(qwen35.FUSED_GATE_UP):
            half = (shape[0], shape[1] // 2, shape[2])
            sources[g] = sources[g.replace("ffn_gate_exps", "ffn_up_exps")] = canonical, half
        elif canonical.endswith("linear_attn.conv1d.weight"):
            sources[g] = canonical, (shape[0], shape[2])
        else:
            sources[g] = canonical, shape
    for name, t in tensors.items():
        if name not in sources:
            raise QtoolError(f"GGUF tensor {name!r} has no place in a HF {spec.hf_arch} with this config "
                             "(layer_types and nextn_predict_layers decide which tensors each layer has)")
        if tuple(t.shape) != sources[name][1]:
            raise QtoolError(f"GGUF tensor {name!r} has shape {list(t.shape)}, but a {spec.hf_arch} with this "
                             f"config needs {list(sources[name][1])}")
    missing = [g for g in sources if g not in tensors]
    if missing:
        raise QtoolError(f"GGUF lacks the tensor {missing[0]!r}"
                         + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else ""))

    def loader(canonical: str, g: str) -> Callable[[], np.ndarray]:
        if canonical.endswith(qwen35.FUSED_GATE_UP):
            up = g.replace("ffn_gate_exps", "ffn_up_exps")
            return lambda: np.concatenate([model.decode(g), model.decode(up)], axis=1)
        return lambda: qwen35.untransform(canonical, model.decode(g), hs)

    out = []
    for canonical, (g, shape) in expected.items():
        name = qwen35.checkpoint_name(canonical, spec.n_layer, multimodal=False)
        source = f"{g} + {g.replace('ffn_gate_exps', 'ffn_up_exps')}" if canonical.endswith(qwen35.FUSED_GATE_UP) else g
        out.append(HFTensor(name, shape, loader(canonical, g), source))
    return out


def _check_hybrid_keys(kv: dict[str, Any], config: dict[str, Any], notes: list[str]) -> None:
    """The architecture keys qtool convert would write for `config` against the GGUF's: a difference means the
    round trip does not give back the same file, and is said."""
    try:
        ftype = LlamaFileType(int(kv.get("general.file_type", 0)))
    except ValueError:
        ftype = LlamaFileType.ALL_F32
    keys, _ = arch_kvs(model_spec(config), ftype)
    for k in keys:
        if k.key == "general.file_type":
            continue
        want, got = kv.get(k.key), k.value
        same = (np.float32(want) == np.float32(got)) if isinstance(got, float) and want is not None else want == got
        if not same:
            notes.append(f"warning: config.json converts back to {k.key} = {got}, not the GGUF's {want}")
    written = {k.key for k in keys}
    arch_name = kv["general.architecture"]
    dropped = [k for k in kv if k.startswith(f"{arch_name}.") and k not in written]
    if dropped:
        notes.append(f"warning: {', '.join(dropped)} not carried over (no Qwen3.5 config field)")


def _expert_loader(model: GGUFModel, name: str, expert: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        t = model.tensor(name)
        return decode_rows(t.raw()[expert], t.qtype, t.shape[1:])
    return load


def _unpermuted(load: Callable[[], np.ndarray], n_head: int) -> Callable[[], np.ndarray]:
    return lambda: unpermute_rows(load(), n_head)


def _w_pack_loader(model: GGUFModel, layer: int, n_head: int) -> Callable[[], np.ndarray]:
    """W_pack rows are [q; k; v]; q and k lose the rotary permutation the converter gave them (MHA)."""
    def load() -> np.ndarray:
        parts = []
        for p in "qkv":
            w = model.decode(f"blk.{layer}.attn_{p}.weight")
            parts.append(unpermute_rows(w, n_head) if p != "v" else w)
        return np.concatenate(parts, axis=0)
    return load


# --- casting ---------------------------------------------------------------------------------------------------

def encode_as(x: np.ndarray, dtype: DType, name: str) -> np.ndarray:
    """float32 data -> the little-endian bytes safetensors stores for `dtype`; refuses NaN and overflow."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int(x.size - np.count_nonzero(np.isfinite(x)))
        raise QtoolError(f"tensor {name!r} contains {bad} NaN/Inf value(s)")
    if dtype.name == "f32":
        out = x
    elif dtype.name == "f16":
        with np.errstate(over="ignore"):
            out = x.astype(np.float16)
        if not np.isfinite(out).all():
            raise QtoolError(f"tensor {name!r} has values beyond float16's range (max {np.abs(x).max():g}); "
                             "use --dtype bf16 or f32")
    else:
        out = f32_to_bf16_bits(x)
        if ((out & 0x7FFF) == 0x7F80).any():
            raise QtoolError(f"tensor {name!r} has values beyond bfloat16's range; use --dtype f32")
    return out.reshape(-1).view(np.uint8)


# --- tokenizer -------------------------------------------------------------------------------------------------

# gguf TokenType / sentencepiece piece type values (the same numbering)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
            "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id"}
_ADD_KEYS = {"bos": "tokenizer.ggml.add_bos_token", "eos": "tokenizer.ggml.add_eos_token",
             "sep": "tokenizer.ggml.add_sep_token"}
# the ids every HF config class has a field for
_CONFIG_ID_TYPES = ("bos", "eos", "pad")

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(add_prefix_space: bool, trim_offsets: bool, use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# pre-tokenizers for which llama.cpp's runtime adds BOS when the GGUF has no add_bos_token key
_BOS_BY_DEFAULT = frozenset({"llama-bpe", "llama3", "llama-v3"})


# tokenizer.ggml.pre -> (normalizer, pre_tokenizer, decoder, ignore_merges), as the reference checkpoints of
# each family write them (Meta-Llama-3, Qwen1.5-3, SmolLM/StarCoder2, GPT-2); these are also the shapes
# qtool convert recognises, so the name survives the round trip
def _bpe_family(pre: str) -> tuple[Any, Any, Any, bool]:
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        # llama.cpp runs the Llama-3 names with ignore_merges, Smaug without
        return (None, {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _byte_level(False, True, False)]},
                _byte_level(True, True, True), pre != "smaug-bpe")
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return ({"type": "NFC"},
                {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _byte_level(False, False, False)]},
                _byte_level(False, False, False), False)
    if pre in ("smollm", "starcoder", "refact"):
        return (None, {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                             _byte_level(False, True, True)]},
                _byte_level(True, True, True), False)
    if pre == "gpt-2":
        return None, _byte_level(False, True, True), _byte_level(True, True, True), False
    raise QtoolError(f"BPE pre-tokenizer {pre!r} cannot be exported yet; known: llama-bpe, smaug-bpe, qwen2, "
                     "deepseek-r1-qwen, smollm, starcoder, refact, gpt-2")


def _added_token(content: str, special: bool) -> dict[str, Any]:
    # normalized=False: llama.cpp matches added tokens in the raw text, before any normalization
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": special}


@dataclass
class _Vocab:
    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    ids: dict[str, int]                      # special ids present in the GGUF
    add: dict[str, bool]                     # add_{bos,eos,sep} flags present in the GGUF
    add_space_prefix: bool | None
    add_space_prefix_first: bool             # written before tokenizer.ggml.model (tokenizer_config's flag)
    chat_template: Any


def _read_vocab(kv: dict[str, Any], notes: list[str]) -> _Vocab | None:
    model = kv.get("tokenizer.ggml.model")
    if model is None:
        notes.append("warning: the GGUF has no tokenizer; none written")
        return None
    if model not in ("llama", "gpt2"):
        raise QtoolError(f"tokenizer model {model!r} cannot be exported (only SentencePiece 'llama' and BPE 'gpt2')")
    tokens = kv.get("tokenizer.ggml.tokens")
    if not tokens:
        raise QtoolError("GGUF tokenizer has no tokens")
    types = kv.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    n = len(tokens)
    ids = {}
    for typ, key in _ID_KEYS.items():
        if (v := kv.get(key)) is not None:
            if 0 <= v < n:
                ids[typ] = int(v)
            else:
                notes.append(f"warning: {key} {v} is outside the vocab ({n} tokens), dropped")
    # eot/eom become extra stop ids in generation_config.json; these have no HF home
    for extra in ("cls", "prefix", "suffix", "middle", "fim_pre", "fim_suf", "fim_mid"):
        if kv.get(f"tokenizer.ggml.{extra}_token_id") is not None:
            notes.append(f"tokenizer.ggml.{extra}_token_id has no HF tokenizer field, not carried over")
    add = {typ: bool(kv[key]) for typ, key in _ADD_KEYS.items() if key in kv}
    keys = list(kv)
    prefix = kv.get("tokenizer.ggml.add_space_prefix")
    first = (prefix is not None and "tokenizer.ggml.model" in keys
             and keys.index("tokenizer.ggml.add_space_prefix") < keys.index("tokenizer.ggml.model"))
    template: Any = kv.get("tokenizer.chat_template")
    named = kv.get("tokenizer.chat_templates") or []
    if named:
        template = ([{"name": "default", "template": template}] if template is not None else []) + [
            {"name": nm, "template": kv[f"tokenizer.chat_template.{nm}"]} for nm in named
            if f"tokenizer.chat_template.{nm}" in kv]
    for key in ("tokenizer.ggml.normalizer.lowercase", "tokenizer.ggml.normalizer.strip_accents"):
        if key in kv:
            notes.append(f"warning: {key} is not carried over")
    return _Vocab(model, list(tokens), [int(t) for t in types], kv.get("tokenizer.ggml.scores"),
                  kv.get("tokenizer.ggml.merges"), ids, add, prefix, first, template)


def _dump(obj: Any, indent: int | None = 2) -> bytes:
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def _spm_files(v: _Vocab, n_ctx: int | None, notes: list[str]) -> tuple[dict[str, bytes], set[str]]:
    """tokenizer.model (a SentencePiece ModelProto built from the GGUF vocab) and its tokenizer_config.json."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    scores = v.scores or [0.0] * len(v.tokens)
    proto = sp_pb2.ModelProto()
    odd_types = 0
    for text, score, ttype in zip(v.tokens, scores, v.types):
        piece = proto.pieces.add()
        piece.piece = text
        piece.score = score
        if ttype not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            odd_types += 1
            ttype = NORMAL
        piece.type = ttype
    if odd_types:
        notes.append(f"warning: {odd_types} token(s) with an undefined token type written as NORMAL")
    unk = next((i for i, t in enumerate(v.types) if t == UNKNOWN), None)
    if unk is None:
        raise QtoolError("SentencePiece vocab has no UNKNOWN token; sentencepiece cannot load it")

    # the fields sentencepiece reads at load time: model type, byte fallback, the special pieces
    ts = proto.trainer_spec
    ts.model_type = sp_pb2.TrainerSpec.BPE
    ts.vocab_size = len(v.tokens)
    ts.byte_fallback = BYTE in v.types
    ts.unk_id, ts.unk_piece = unk, v.tokens[unk]
    for typ, id_field, piece_field in (("bos", "bos_id", "bos_piece"), ("eos", "eos_id", "eos_piece"),
                                       ("pad", "pad_id", "pad_piece")):
        tid = v.ids.get(typ, -1)
        if tid >= 0 and v.types[tid] != CONTROL:
            tid = -1  # sentencepiece only accepts control pieces here
        setattr(ts, id_field, tid)
        if tid >= 0:
            setattr(ts, piece_field, v.tokens[tid])
    ns = proto.normalizer_spec
    ns.name = "identity"                    # llama.cpp's runtime does not normalize either
    ns.add_dummy_prefix = v.add_space_prefix is not False
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    raw = proto.SerializeToString()
    try:
        SentencePieceProcessor().LoadFromSerializedProto(raw)
    except Exception as e:  # sentencepiece raises RuntimeError with its own message
        raise QtoolError(f"the GGUF vocab does not make a valid SentencePiece model: {e}") from None

    tc: dict[str, Any] = {
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    if n_ctx is not None:
        tc["model_max_length"] = int(n_ctx)
    if v.add_space_prefix is not None:
        tc["add_prefix_space"] = v.add_space_prefix
    for typ, flag in v.add.items():
        tc[f"add_{typ}_token"] = flag
    special_map = {}
    for typ, tid in v.ids.items():
        tc[f"{typ}_token"] = special_map[f"{typ}_token"] = v.tokens[tid]
    if v.chat_template is not None:
        tc["chat_template"] = v.chat_template
    files = {"tokenizer.model": raw, "tokenizer_config.json": _dump(dict(sorted(tc.items()))),
             "special_tokens_map.json": _dump(special_map)}
    # without a tokenizer.json the converters take every special id from config.json
    return files, set(v.ids)


def _bpe_files(v: _Vocab, n_ctx: int | None, notes: list[str], pre: str) -> tuple[dict[str, bytes], set[str]]:
    """tokenizer.json (byte-level BPE with the family's pre-tokenizer) and its tokenizer_config.json."""
    from tokenizers import Tokenizer

    normalizer, pre_tokenizer, decoder, ignore_merges = _bpe_family(pre)
    add = dict(v.add)
    if "bos" not in add and pre in _BOS_BY_DEFAULT:
        # llama.cpp's runtime adds BOS for these even without the key; HF needs it spelled out
        add["bos"] = True
        notes.append(f"add_bos_token=true written: llama.cpp adds BOS for pre-tokenizer {pre!r} by default")
    vocab: dict[str, int] = {}
    added: list[dict[str, Any]] = []
    dropped = 0
    for i, (text, ttype) in enumerate(zip(v.tokens, v.types)):
        if ttype == UNUSED and text == f"[PAD{i}]":
            continue  # fillers up to vocab_size; the converter makes them again
        if text in vocab:
            dropped += 1
            continue
        # every token, added ones included, sits in the model vocab: tokenizers gives an added token that is
        # not in it the next free id, whatever id the file says
        vocab[text] = i
        if ttype in (CONTROL, USER_DEFINED):
            added.append({"id": i, **_added_token(text, special=ttype == CONTROL)})
    if dropped:
        notes.append(f"warning: {dropped} duplicate token text(s) dropped (a BPE vocab maps each text to one id)")
    if not v.merges:
        raise QtoolError("BPE vocab has no merges")
    merges = []
    for m in v.merges:
        # llama.cpp splits an entry at the first space after its first character
        cut = m.find(" ", 1)
        if cut < 0:
            raise QtoolError(f"malformed BPE merge {m!r}")
        merges.append([m[:cut], m[cut + 1:]])

    # The post-processor says which specials encode() adds. The converter reads the add_* flags from it
    # (ByteLevel: bos/eos false unless set; a template: true for the specials it adds), then fills the
    # rest from tokenizer_config.json, so together they reproduce exactly the flags the GGUF has.
    processors: list[dict[str, Any]] = []
    if "bos" in add and "eos" in add:
        processors.append(_byte_level(True, False, True))
    single: list[dict[str, Any]] = [{"Sequence": {"id": "A", "type_id": 0}}]
    pair: list[dict[str, Any]] = [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    specials: dict[str, Any] = {}
    for typ, where in (("bos", 0), ("eos", None)):
        if not add.get(typ):
            continue
        if typ not in v.ids:
            raise QtoolError(f"tokenizer.ggml.add_{typ}_token is set but the GGUF has no {typ} token id")
        text = v.tokens[v.ids[typ]]
        if where == 0:
            single.insert(0, {"SpecialToken": {"id": text, "type_id": 0}})
            pair = [{"SpecialToken": {"id": text, "type_id": 0}}, pair[0],
                    {"SpecialToken": {"id": text, "type_id": 1}}, pair[-1]]
        else:
            single.append({"SpecialToken": {"id": text, "type_id": 0}})
            pair.append({"SpecialToken": {"id": text, "type_id": 1}})
        specials[text] = {"id": text, "ids": [v.ids[typ]], "tokens": [text]}
    if specials:
        processors.append({"type": "TemplateProcessing", "single": single, "pair": pair,
                           "special_tokens": specials})
    post = None if not processors else processors[0] if len(processors) == 1 else \
        {"type": "Sequence", "processors": processors}

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": a["id"], "content": a["content"], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": a["normalized"], "special": a["special"]} for a in added],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges},
    }
    text = json.dumps(tokenizer_json, ensure_ascii=False)
    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception
        raise QtoolError(f"the GGUF vocab does not make a valid tokenizer.json: {e}") from None
    wrong = next((a for a in added if tok.token_to_id(a["content"]) != a["id"]), None)
    if wrong is not None:
        raise QtoolError(f"internal: added token {wrong['content']!r} did not keep id {wrong['id']}")

    tc: dict[str, Any] = {
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in sorted(a) if k != "id"} for a in added},
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if n_ctx is not None:
        tc["model_max_length"] = int(n_ctx)
    if v.add_space_prefix is not None:
        tc["add_prefix_space"] = v.add_space_prefix
    for typ, flag in add.items():
        tc[f"add_{typ}_token"] = flag
    special_map: dict[str, Any] = {}
    in_files = set()
    added_ids = {a["id"] for a in added}
    for typ, tid in v.ids.items():
        # tokenizer_config names only added tokens: the converter looks the text up among them, and naming a
        # plain vocab entry would make transformers (and the converter) turn it into a special token
        if tid in added_ids:
            tc[f"{typ}_token"] = special_map[f"{typ}_token"] = v.tokens[tid]
            in_files.add(typ)
    if v.chat_template is not None:
        tc["chat_template"] = v.chat_template
    files = {"tokenizer.json": (text + "\n").encode("utf-8"),
             "tokenizer_config.json": _dump(dict(sorted(tc.items()))),
             "special_tokens_map.json": _dump(special_map)}
    return files, {typ for typ in v.ids if typ not in in_files}


def hf_tokenizer_files(kv: dict[str, Any], n_ctx: int | None = None,
                       notes: list[str] | None = None) -> tuple[dict[str, bytes], dict[str, int]]:
    """The HF tokenizer files for the GGUF metadata `kv` (key -> value): file name -> content, and the
    ``{type}_token_id`` entries config.json must carry. `n_ctx` becomes model_max_length."""
    files, ids, _ = _tokenizer_files(kv, n_ctx, notes if notes is not None else [])
    return files, ids


def _tokenizer_files(kv: dict[str, Any], n_ctx: int | None,
                     notes: list[str]) -> tuple[dict[str, bytes], dict[str, int], _Vocab | None]:
    v = _read_vocab(kv, notes)
    if v is None:
        return {}, {}, None
    if v.model == "llama":
        if kv.get("tokenizer.ggml.pre") not in (None, "default"):
            notes.append(f"warning: SentencePiece vocab with pre-tokenizer {kv['tokenizer.ggml.pre']!r}: "
                         "written as a plain SentencePiece model")
        files, config_types = _spm_files(v, n_ctx, notes)
    else:
        pre = kv.get("tokenizer.ggml.pre") or "default"
        files, config_types = _bpe_files(v, n_ctx, notes, pre)
    config_types |= {t for t in _CONFIG_ID_TYPES if t in v.ids}
    ids = {f"{typ}_token_id": v.ids[typ] for typ in _ID_KEYS if typ in config_types}
    return files, ids, v


def _generation_config(kv: dict[str, Any], v: _Vocab | None) -> dict[str, Any]:
    g: dict[str, Any] = {}
    if v is not None:
        for typ in ("bos", "pad"):
            if typ in v.ids:
                g[f"{typ}_token_id"] = v.ids[typ]
        # HF stops on any of a list of ids; llama.cpp keeps end-of-turn/-message apart from eos
        stops = [v.ids["eos"]] if "eos" in v.ids else []
        for extra in ("eot", "eom"):
            tid = kv.get(f"tokenizer.ggml.{extra}_token_id")
            if tid is not None and tid not in stops and 0 <= tid < len(v.tokens):
                stops.append(int(tid))
        if stops:
            g["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    # general.sampling.* under the names llama.cpp's converter reads back (and HF's where it has one)
    sampling = {"top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "temp": "temperature",
                "penalty_repeat": "penalty_repeat", "penalty_last_n": "penalty_last_n", "sequence": "sequence",
                "xtc_probability": "xtc_probability", "xtc_threshold": "xtc_threshold", "mirostat": "mirostat",
                "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta"}
    for key, name in sampling.items():
        value = kv.get(f"general.sampling.{key}")
        if value is None:
            continue
        g[name] = _nice_float(value) if isinstance(value, float) else value
    if "penalty_repeat" in g:
        g["repetition_penalty"] = g["penalty_repeat"]
    if any(k in g for k in ("temperature", "top_k", "top_p", "min_p")):
        g["do_sample"] = g.get("temperature", 1.0) > 0
    return dict(sorted(g.items()))


# general.* key -> model-card front-matter key that gguf's Metadata.load (used by qtool convert) reads back
_CARD_KEYS = {"general.name": "name", "general.author": "author", "general.version": "version",
              "general.organization": "organization", "general.description": "description",
              "general.finetune": "finetune", "general.basename": "basename", "general.size_label": "size_label",
              "general.license": "license", "general.license.name": "license_name",
              "general.license.link": "license_link", "general.tags": "tags", "general.languages": "language"}


def _model_card(kv: dict[str, Any], gguf_path: Path, dtype: DType, quantized: bool) -> bytes:
    """README.md: YAML front matter with the GGUF's general.* metadata, and where the weights came from."""
    # JSON scalars and lists are valid YAML flow values, so json.dumps does the quoting
    front = [f"{card}: {json.dumps(kv[key], ensure_ascii=False)}" for key, card in _CARD_KEYS.items()
             if kv.get(key) not in (None, "", [])]
    title = kv.get("general.name") or gguf_path.stem
    origin = ("dequantized from its quantized tensors, so it carries their rounding error"
              if quantized else "copied from its tensors")
    body = (f"# {title}\n\nExported from `{gguf_path.name}` by `qtool export-hf` as {dtype.torch}; the weights "
            f"were {origin}.\n")
    return (("---\n" + "\n".join(front) + "\n---\n\n" if front else "") + body).encode("utf-8")


# --- plan ------------------------------------------------------------------------------------------------------

def _default_dtype(tensors: dict[str, TensorRef]) -> DType:
    """The GGUF's own float type when its weights are unquantized, else bf16 (the usual HF dtype)."""
    weights = {t.qtype for t in tensors.values() if len(t.shape) >= 2}
    if weights <= {GGMLQuantizationType.F32}:
        return DTYPES["f32"]
    if weights <= {GGMLQuantizationType.F16, GGMLQuantizationType.F32}:
        return DTYPES["f16"]
    return DTYPES["bf16"]


def plan_export(gguf_path: str | Path, dtype: str = "auto") -> ExportPlan:
    gguf_path = Path(gguf_path)
    model = GGUFModel.open(gguf_path)
    kv, tensors = model.values(), model.tensors
    arch_name = kv.get("general.architecture")
    if arch_name is None:
        raise QtoolError(f"{gguf_path}: no general.architecture")
    arch = arch_for_gguf(arch_name)
    if not tensors:
        raise QtoolError(f"{gguf_path}: no tensors (a vocab-only file?)")
    if dtype == "auto":
        dt = _default_dtype(tensors)
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    else:
        raise QtoolError(f"unknown --dtype {dtype!r}; choose one of: {', '.join([*DTYPES, 'auto'])}")

    notes: list[str] = []
    hp = _hparams(model, arch)
    config = _hf_config(kv, arch, hp, tensors, dt, notes)
    tok_files, config_ids, vocab = _tokenizer_files(kv, hp["n_ctx"], notes)
    config.update(config_ids)
    if vocab is not None and len(vocab.tokens) != hp["n_vocab"]:
        notes.append(f"warning: {len(vocab.tokens)} tokens but token_embd has {hp['n_vocab']} rows; "
                     "qtool convert will not give back the same vocab")
    if arch.gguf_name == "llama" and "rope_freqs.weight" in tensors:
        factors = np.array(model.decode("rope_freqs.weight"), dtype=np.float32)

        def check(params: dict[str, Any]) -> np.ndarray | None:
            trial = {**config, "rope_scaling": params}
            return llama3_rope_factors(model_spec(trial))

        params, note = recover_llama3_rope(factors, check, config["rope_theta"], hp["head_dim"])
        config["rope_scaling"] = params
        notes.append(note)
    config = dict(sorted(config.items()))
    if arch.hybrid:
        _check_hybrid_keys(kv, config, notes)
    hf_tensors = _plan_tensors(arch, hp, config, model)
    quantized = any(t.qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
                    for t in tensors.values())
    if quantized:
        notes.append(f"quantized tensors dequantized to float32, then stored as {dt.torch}")
    files = {**tok_files, "README.md": _model_card(kv, gguf_path, dt, quantized)}
    return ExportPlan(gguf_path, arch, dt, config, _generation_config(kv, vocab), hf_tensors, files, notes)


# --- writing ---------------------------------------------------------------------------------------------------

def shard_groups(plan: ExportPlan, max_shard_size: int) -> list[list[HFTensor]]:
    """Tensors per safetensors file: a new file when the next tensor would pass the limit (as transformers
    does; a tensor larger than the limit gets a file of its own)."""
    groups: list[list[HFTensor]] = [[]]
    size = 0
    for t in plan.tensors:
        nbytes = _numel(t.shape) * plan.dtype.itemsize
        if groups[-1] and max_shard_size and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return groups


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_safetensors(path: Path, group: list[HFTensor], dtype: DType, on_tensor: Callable[[int, str], None]) -> None:
    """Streams one safetensors file: the header is known from shapes alone, then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in group:
        nbytes = _numel(t.shape) * dtype.itemsize
        header[t.name] = {"dtype": dtype.safetensors, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)   # the data section starts 8-byte aligned, as the reference writer pads it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in group:
            data = encode_as(t.load(), dtype, t.name)
            expected = _numel(t.shape) * dtype.itemsize
            if data.nbytes != expected:
                raise QtoolError(f"internal: tensor {t.name} has {data.nbytes} bytes, expected {expected}")
            f.write(memoryview(data))
            on_tensor(data.nbytes, t.name)
        f.flush()
        os.fsync(f.fileno())


_OWNED = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|config\.json|"
                    r"generation_config\.json|tokenizer\.json|tokenizer\.model|tokenizer_config\.json|"
                    r"special_tokens_map\.json|README\.md)$")


def write_export(plan: ExportPlan, outdir: str | Path, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 force: bool = False, progress: Progress | None = None) -> list[Path]:
    """Write the checkpoint into `outdir` (created; an existing one needs `force`). Returns the files written.

    Everything is written into a temporary directory first and moved into place only when complete, so a
    failure never leaves a partial checkpoint. With `force`, files of an earlier export in `outdir` that this
    one does not write (e.g. shards of another count) are removed; other files are left alone.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise QtoolError(f"{outdir} exists and is not a directory")
    parent = outdir.parent if not outdir.exists() else outdir
    if not parent.is_dir():
        raise QtoolError(f"{parent} does not exist")
    groups = shard_groups(plan, max_shard_size)
    names = _shard_names(len(groups))
    files: dict[str, bytes] = {
        "config.json": _dump(plan.config),
        "generation_config.json": _dump(plan.generation_config),
        **plan.files,
    }
    if len(groups) > 1:
        index = {"metadata": {"total_size": plan.nbytes},
                 "weight_map": {t.name: name for name, g in zip(names, groups) for t in g}}
        files["model.safetensors.index.json"] = _dump(index)
    written = names + list(files)
    stale: list[Path] = []
    if outdir.exists():
        ours = [p for p in outdir.iterdir() if _OWNED.match(p.name)]
        if ours and not force:
            shown = min(ours, key=lambda p: (p.name != "config.json", p.name)).name
            raise QtoolError(f"{outdir} already holds {shown} (use --force to overwrite)")
        stale = [p for p in ours if p.name not in written]

    try:
        tmp = Path(tempfile.mkdtemp(prefix=".qtool-tmp-", dir=parent))
    except OSError as e:
        raise QtoolError(f"cannot write to {parent}: {e.strerror}") from None
    try:
        total, done = plan.nbytes, 0

        def on_tensor(nbytes: int, name: str) -> None:
            nonlocal done
            done += nbytes
            if progress is not None:
                progress(done, total, name)

        try:
            for name, group in zip(names, groups):
                _write_safetensors(tmp / name, group, plan.dtype, on_tensor)
            for name, content in files.items():
                (tmp / name).write_bytes(content)
        except OSError as e:
            raise QtoolError(f"writing {outdir}: {e.strerror or e}") from None
        try:
            if not outdir.exists():
                os.rename(tmp, outdir)
            else:
                for name in written:
                    os.replace(tmp / name, outdir / name)
                for p in stale:
                    p.unlink()
        except OSError as e:
            raise QtoolError(f"moving the export into {outdir}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [outdir / n for n in written]


def export_hf(gguf_path: str | Path, outdir: str | Path, *, dtype: str = "auto",
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, force: bool = False,
              progress: Progress | None = None) -> tuple[ExportPlan, list[Path]]:
    plan = plan_export(gguf_path, dtype)
    return plan, write_export(plan, outdir, max_shard_size=max_shard_size, force=force, progress=progress)
