"""The architecture table shared by convert and evaluate.

Adding an architecture is one entry here and one in ``convert/models.py``.
"""
from __future__ import annotations

from dataclasses import dataclass

from qtool.errors import QtoolError


@dataclass(frozen=True)
class Arch:
    """One GGUF architecture and what distinguishes its forward pass and conversion."""

    gguf_name: str                 # general.architecture
    hf_names: tuple[str, ...]      # config.json "architectures"[0] values that map here
    # "norm" (adjacent pairs), "neox" (halves), "baichuan" (by depth: 32 -> norm, 40 -> alibi), "imrope" (Qwen3.5's
    # interleaved multimodal rope on a part of each head)
    rope_style: str
    permute_qk: bool               # converter permutes q/k rows for ggml's NORM rope
    qkv_bias: bool                 # q/k/v projections carry biases
    qk_norm: bool                  # per-head RMSNorm on q and k before rope
    output_required: bool          # output.weight must exist (no tied fallback in llama.cpp's loader)
    vocab_kind: str                # "llama" (SPM first, then BPE), "bpe", "spm", "gpt2" (BPE only)
    # Mixture of experts (llama.cpp's build_moe_ffn): every layer's FFN is n_expert routed experts stacked into
    # ffn_{gate,up,down}_exps, picked per token by the router ffn_gate_inp (softmax, top n_expert_used).
    moe: bool = False
    # A shared expert (ffn_{gate,up,down}_shexp) added to every token's routed output, scaled by
    # sigmoid(ffn_gate_inp_shexp . x).
    shared_expert: bool = False
    # The top-k routing weights are renormalised to sum to 1. llama.cpp fixes this per architecture and ignores
    # config.json's norm_topk_prob.
    moe_norm_topk: bool = False
    # Gated DeltaNet hybrid (Qwen3.5): recurrent "linear attention" layers with a gated full-attention layer every
    # few layers, and an MTP block converted as one more layer (evaluation skips it; export-hf writes it back as mtp.*).
    hybrid: bool = False


ARCHS: dict[str, Arch] = {
    "llama": Arch("llama", ("LlamaForCausalLM", "LLaMAForCausalLM"), "norm",
                  permute_qk=True, qkv_bias=False, qk_norm=False, output_required=False, vocab_kind="llama"),
    "qwen2": Arch("qwen2", ("Qwen2ForCausalLM",), "neox",
                  permute_qk=False, qkv_bias=True, qk_norm=False, output_required=False, vocab_kind="bpe"),
    "qwen3": Arch("qwen3", ("Qwen3ForCausalLM",), "neox",
                  permute_qk=False, qkv_bias=False, qk_norm=True, output_required=False, vocab_kind="bpe"),
    "qwen2moe": Arch("qwen2moe", ("Qwen2MoeForCausalLM",), "neox",
                     permute_qk=False, qkv_bias=True, qk_norm=False, output_required=True, vocab_kind="gpt2",
                     moe=True, shared_expert=True, moe_norm_topk=False),
    "qwen3moe": Arch("qwen3moe", ("Qwen3MoeForCausalLM",), "neox",
                     permute_qk=False, qkv_bias=False, qk_norm=True, output_required=False, vocab_kind="gpt2",
                     moe=True, shared_expert=False, moe_norm_topk=True),
    "qwen35": Arch("qwen35", ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration"), "imrope",
                   permute_qk=False, qkv_bias=False, qk_norm=True, output_required=False, vocab_kind="gpt2",
                   hybrid=True),
    "qwen35moe": Arch("qwen35moe", ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration"), "imrope",
                      permute_qk=False, qkv_bias=False, qk_norm=True, output_required=False, vocab_kind="gpt2",
                      moe=True, shared_expert=True, moe_norm_topk=True, hybrid=True),
    "baichuan": Arch("baichuan", ("BaichuanForCausalLM", "BaiChuanForCausalLM"), "baichuan",
                     permute_qk=True, qkv_bias=False, qk_norm=False, output_required=True, vocab_kind="spm"),
}

# Baichuan in llama.cpp: the layer count alone picks the position encoding.
BAICHUAN_ROPE_DEPTH = 32
BAICHUAN_ALIBI_DEPTH = 40
BAICHUAN_ALIBI_MAX_BIAS = 8.0


def supported_hf_architectures() -> list[str]:
    return [name for arch in ARCHS.values() for name in arch.hf_names]


def arch_for_hf(hf_name: str) -> Arch:
    for arch in ARCHS.values():
        if hf_name in arch.hf_names:
            return arch
    raise QtoolError(f"unsupported architecture {hf_name!r}; supported: {', '.join(supported_hf_architectures())}")


def arch_for_gguf(gguf_name: str) -> Arch:
    try:
        return ARCHS[gguf_name]
    except KeyError:
        raise QtoolError(f"unsupported GGUF architecture {gguf_name!r}; supported: {', '.join(ARCHS)}") from None
