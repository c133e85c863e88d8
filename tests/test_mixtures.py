"""Per-tensor type choice: the tables of quantization.md §4.6 written out independently for a 32-layer GQA llama,
plus the overrides, the shape fallback and the tensor order. (Against llama-quantize itself:
test_interop_quantize.py.)"""
from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T

from qtool.errors import QtoolError
from qtool.quantize.mixtures import (FileType, MixtureOptions, ModelInfo, TensorTypeOverride, choose_tensor_types,
                                     list_file_types, llama31_8b_tensors, llama_tensor_order,
                                     mixture_bits_per_weight,
                                     parse_file_type, parse_tensor_type, shape_fallback, use_more_bits)
from tests.test_quantize import llama_tensors

N = 32
# use_more_bits(i, 32), spelled out in the reference (§4.5) rather than computed
MORE_BITS = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
GQA4 = ModelInfo("llama", n_layer=N, n_head=32, n_head_kv=8)
GQA1 = ModelInfo("llama", n_layer=N, n_head=32, n_head_kv=32)


def model_tensors(**kw):
    return llama_tensors(N, 4096, 14336, 32, kw.pop("n_head_kv", 8), 32000, **kw)


def types_by_name(ftype, model=GQA4, tensors=None, **options):
    tensors = tensors if tensors is not None else model_tensors()
    return {c.name: c.target_type for c in choose_tensor_types(tensors, ftype, model, MixtureOptions(**options))}


def more(i, yes, no):
    return yes if i in MORE_BITS else no


# §4.6, row by row, for GQA 4 (n_head 32, n_head_kv 8), 32 layers, untied, no imatrix. Each entry:
# (token_embd, output, attn_v(i), attn_k, attn_q, attn_output, ffn_down(i), ffn_gate/up)
TABLE = {
    FileType.Q4_0: ("Q4_0", "Q6_K", lambda i: "Q4_0", "Q4_0", "Q4_0", "Q4_0", lambda i: "Q4_0", "Q4_0"),
    FileType.Q4_1: ("Q4_1", "Q6_K", lambda i: "Q4_1", "Q4_1", "Q4_1", "Q4_1", lambda i: "Q4_1", "Q4_1"),
    FileType.Q5_0: ("Q5_0", "Q6_K", lambda i: "Q5_0", "Q5_0", "Q5_0", "Q5_0", lambda i: "Q5_0", "Q5_0"),
    FileType.Q5_1: ("Q5_1", "Q6_K", lambda i: "Q5_1", "Q5_1", "Q5_1", "Q5_1", lambda i: "Q5_1", "Q5_1"),
    FileType.Q8_0: ("Q8_0", "Q8_0", lambda i: "Q8_0", "Q8_0", "Q8_0", "Q8_0", lambda i: "Q8_0", "Q8_0"),
    FileType.Q2_K: ("Q2_K", "Q6_K", lambda i: "Q4_K", "Q2_K", "Q2_K", "Q3_K", lambda i: "Q3_K", "Q2_K"),
    FileType.Q2_K_S: ("Q2_K", "Q6_K", lambda i: "Q4_K", "Q2_K", "Q2_K", "Q2_K",
                      lambda i: "Q4_K" if i < 4 else "Q2_K", "Q2_K"),
    FileType.Q3_K_S: ("Q3_K", "Q6_K", lambda i: "Q3_K", "Q3_K", "Q3_K", "Q3_K", lambda i: "Q3_K", "Q3_K"),
    FileType.Q3_K_M: ("Q3_K", "Q6_K", lambda i: "Q5_K" if i < 2 else "Q4_K", "Q3_K", "Q3_K", "Q4_K",
                      lambda i: "Q5_K" if i < 2 else "Q4_K", "Q3_K"),
    FileType.Q3_K_L: ("Q3_K", "Q6_K", lambda i: "Q5_K", "Q3_K", "Q3_K", "Q5_K", lambda i: "Q5_K", "Q3_K"),
    FileType.Q4_K_S: ("Q4_K", "Q6_K", lambda i: "Q5_K" if i < 4 else "Q4_K", "Q4_K", "Q4_K", "Q4_K",
                      lambda i: "Q5_K" if i < 4 else "Q4_K", "Q4_K"),
    FileType.Q4_K_M: ("Q4_K", "Q6_K", lambda i: more(i, "Q6_K", "Q4_K"), "Q4_K", "Q4_K", "Q4_K",
                      lambda i: more(i, "Q6_K", "Q4_K"), "Q4_K"),
    FileType.Q5_K_S: ("Q5_K", "Q6_K", lambda i: "Q5_K", "Q5_K", "Q5_K", "Q5_K", lambda i: "Q5_K", "Q5_K"),
    FileType.Q5_K_M: ("Q5_K", "Q6_K", lambda i: more(i, "Q6_K", "Q5_K"), "Q5_K", "Q5_K", "Q5_K",
                      lambda i: more(i, "Q6_K", "Q5_K"), "Q5_K"),
    FileType.Q6_K: ("Q6_K", "Q6_K", lambda i: "Q6_K", "Q6_K", "Q6_K", "Q6_K", lambda i: "Q6_K", "Q6_K"),
    FileType.IQ4_NL: ("IQ4_NL", "Q6_K", lambda i: "Q5_K", "IQ4_NL", "IQ4_NL", "IQ4_NL",
                      lambda i: "Q5_K" if i < 4 else "IQ4_NL", "IQ4_NL"),
    FileType.IQ4_XS: ("IQ4_XS", "Q6_K", lambda i: "Q5_K", "IQ4_XS", "IQ4_XS", "IQ4_XS",
                      lambda i: "Q5_K" if i < 4 else "IQ4_XS", "IQ4_XS"),
    FileType.F16: ("F16", "F16", lambda i: "F16", "F16", "F16", "F16", lambda i: "F16", "F16"),
    FileType.BF16: ("BF16", "BF16", lambda i: "BF16", "BF16", "BF16", "BF16", lambda i: "BF16", "BF16"),
    FileType.F32: ("F32", "F32", lambda i: "F32", "F32", "F32", "F32", lambda i: "F32", "F32"),
    # the ternary file types and Q2_0 give an untied token_embd Q4_K; Q1_0 keeps its default there
    FileType.TQ1_0: ("Q4_K", "Q6_K", lambda i: "TQ1_0", "TQ1_0", "TQ1_0", "TQ1_0", lambda i: "TQ1_0", "TQ1_0"),
    FileType.TQ2_0: ("Q4_K", "Q6_K", lambda i: "TQ2_0", "TQ2_0", "TQ2_0", "TQ2_0", lambda i: "TQ2_0", "TQ2_0"),
    FileType.Q2_0: ("Q4_K", "Q6_K", lambda i: "Q2_0", "Q2_0", "Q2_0", "Q2_0", lambda i: "Q2_0", "Q2_0"),
    FileType.Q1_0: ("Q1_0", "Q6_K", lambda i: "Q1_0", "Q1_0", "Q1_0", "Q1_0", lambda i: "Q1_0", "Q1_0"),
    # the i-quants (llama-quant.cpp's rules, read independently of quantize/mixtures.py)
    FileType.IQ2_XXS: ("Q2_K", "Q5_K", lambda i: "Q4_K", "IQ2_XXS", "IQ2_XXS", "IQ2_XXS",
                       lambda i: "Q2_K" if i < 4 else "IQ2_XXS", "IQ2_XXS"),
    FileType.IQ2_XS: ("Q2_K", "Q5_K", lambda i: "Q4_K", "IQ2_XS", "IQ2_XS", "IQ2_XS",
                      lambda i: "Q2_K" if i < 4 else "IQ2_XS", "IQ2_XS"),
    FileType.IQ2_S: ("IQ3_S", "Q5_K", lambda i: "Q4_K", "IQ2_XS", "IQ2_XS", "IQ3_S",
                     lambda i: "IQ3_S" if i < 4 else "IQ2_XS", "IQ2_XS"),
    FileType.IQ2_M: ("IQ3_S", "Q5_K", lambda i: "Q4_K", "IQ2_S", "IQ2_S", "IQ3_S",
                     lambda i: "IQ3_S" if i < 4 else "IQ2_S", "IQ2_S"),
    FileType.IQ1_S: ("Q2_K", "Q5_K", lambda i: "Q4_K", "IQ1_S", "IQ1_S", "IQ2_XXS",
                     lambda i: "Q2_K" if i < 4 else "IQ1_S", "IQ1_S"),
    FileType.IQ1_M: ("Q2_K", "Q5_K", lambda i: "Q4_K", "IQ1_M", "IQ1_M", "IQ2_XXS",
                     lambda i: "Q2_K" if i < 4 else "IQ1_M", "IQ1_M"),
    FileType.IQ3_XXS: ("IQ3_S", "Q5_K", lambda i: "Q4_K", "IQ2_S", "IQ2_S", "IQ3_S",
                       lambda i: "Q4_K" if i < 4 else "Q3_K", "IQ3_XXS"),
    FileType.IQ3_XS: ("IQ3_S", "Q6_K", lambda i: "Q4_K", "IQ3_XXS", "IQ3_XXS", "IQ3_S", lambda i: "IQ3_S",
                      lambda i: "IQ3_XXS" if 4 <= i < 28 else "IQ3_S"),
    FileType.IQ3_S: ("IQ3_S", "Q6_K", lambda i: "Q4_K", "IQ3_S", "IQ3_S", "IQ3_S", lambda i: "IQ3_S", "IQ3_S"),
    FileType.IQ3_M: ("IQ3_S", "Q6_K", lambda i: "Q4_K", "IQ3_S", "IQ3_S", "Q4_K",
                     lambda i: "Q4_K" if i < 4 else "IQ3_S", "IQ3_S"),
    # MXFP4_MOE: only 3-D expert stacks take MXFP4; this dense model has none, so every 2-D tensor is Q8_0
    FileType.MXFP4_MOE: ("Q8_0", "Q8_0", lambda i: "Q8_0", "Q8_0", "Q8_0", "Q8_0", lambda i: "Q8_0", "Q8_0"),
    # COPY: every tensor keeps its type (the model's weights are F16)
    FileType.COPY: ("F16", "F16", lambda i: "F16", "F16", "F16", "F16", lambda i: "F16", "F16"),
}


def per_layer(entry, i):
    return entry(i) if callable(entry) else entry


def expected_table(ftype, table=TABLE):
    embd, output, attn_v, attn_k, attn_q, attn_output, ffn_down, ffn_other = table[ftype]
    want = {"token_embd.weight": embd, "output.weight": output, "output_norm.weight": "F32"}
    for i in range(N):
        p = f"blk.{i}."
        want.update({p + "attn_norm.weight": "F32", p + "ffn_norm.weight": "F32", p + "attn_v.weight": attn_v(i),
                     p + "attn_k.weight": attn_k, p + "attn_q.weight": attn_q, p + "attn_output.weight": attn_output,
                     p + "ffn_down.weight": ffn_down(i), p + "ffn_gate.weight": per_layer(ffn_other, i),
                     p + "ffn_up.weight": per_layer(ffn_other, i)})
    return {k: T[v] for k, v in want.items()}


def test_every_file_type_is_in_the_table():
    assert set(TABLE) == set(FileType)


@pytest.mark.parametrize("ftype", list(FileType), ids=lambda f: f.name)
def test_type_table_32_layers_gqa4(ftype):
    assert types_by_name(ftype) == expected_table(ftype)


GQA1_DIFFERENCES = {   # with one KV head per query head the GQA ≥ 4 bumps of attn_v disappear
    FileType.Q2_K: "Q3_K", FileType.Q2_K_S: "Q2_K", FileType.IQ4_NL: "IQ4_NL", FileType.IQ4_XS: "IQ4_XS"}


@pytest.mark.parametrize("ftype", list(GQA1_DIFFERENCES), ids=lambda f: f.name)
def test_attn_v_without_gqa(ftype):
    got = types_by_name(ftype, GQA1, model_tensors(n_head_kv=32))
    assert {got[f"blk.{i}.attn_v.weight"] for i in range(N)} == {T[GQA1_DIFFERENCES[ftype]]}


@pytest.mark.parametrize("ftype, bumped", [(FileType.Q4_0, T.Q4_1), (FileType.Q5_0, T.Q5_1)])
def test_imatrix_bumps_the_first_ffn_down_of_q4_0_and_q5_0(ftype, bumped):
    got = types_by_name(ftype, has_imatrix=True)
    assert [got[f"blk.{i}.ffn_down.weight"] for i in range(8)] == [bumped] * 4 + [ftype.default_type] * 4
    without = expected_table(ftype)
    assert {k: v for k, v in got.items() if "ffn_down" not in k} == {k: v for k, v in without.items()
                                                                     if "ffn_down" not in k}


@pytest.mark.parametrize("ftype", [FileType.IQ4_NL, FileType.IQ4_XS])
def test_imatrix_removes_the_iq4_ffn_down_bump(ftype):
    got = types_by_name(ftype, has_imatrix=True)
    assert {got[f"blk.{i}.ffn_down.weight"] for i in range(N)} == {ftype.default_type}


def test_tied_embeddings_take_the_output_rule():
    tensors = model_tensors(tied=True)
    assert types_by_name(FileType.Q4_K_M, tensors=tensors)["token_embd.weight"] == T.Q6_K
    assert types_by_name(FileType.Q8_0, tensors=tensors)["token_embd.weight"] == T.Q8_0
    assert types_by_name(FileType.F16, tensors=tensors)["token_embd.weight"] == T.F16


def test_llama31_8b_bits_per_weight_match_llama_cpp_readme():
    """tools/quantize/README.md lists bits per weight of every mixture for Llama-3.1-8B (measured files)."""
    readme = {FileType.Q2_K_S: 2.9697, FileType.Q2_K: 3.1593, FileType.Q3_K_S: 3.6429, FileType.Q3_K_M: 3.9960,
              FileType.Q3_K_L: 4.2979, FileType.Q4_K_S: 4.6672, FileType.Q4_K_M: 4.8944, FileType.Q5_K_S: 5.5704,
              FileType.Q5_K_M: 5.7036, FileType.Q6_K: 6.5633, FileType.Q8_0: 8.5008, FileType.IQ4_XS: 4.4597,
              FileType.IQ4_NL: 4.6818, FileType.F16: 16.0005}
    assert {f: round(mixture_bits_per_weight(f), 4) for f in readme} == readme
    assert len(llama31_8b_tensors()) == 4 + 9 * 32


# --- the shape fallback -----------------------------------------------------------------------------------------


def test_shape_fallback_table():
    assert shape_fallback(T.Q4_K, 256) == (T.Q4_K, None)
    for wanted, got in [(T.Q2_K, T.Q4_0), (T.Q3_K, T.Q4_0), (T.Q4_K, T.Q5_0), (T.Q5_K, T.Q5_1), (T.Q6_K, T.Q8_0),
                        (T.IQ4_XS, T.IQ4_NL)]:
        qtype, why = shape_fallback(wanted, 576)
        assert qtype == got and "576 is not a multiple of 256" in why
        assert shape_fallback(wanted, 100)[0] == T.F16
    assert shape_fallback(T.Q8_0, 100)[0] == T.F16
    assert shape_fallback(T.Q4_0, 96) == (T.Q4_0, None)


def test_smollm2_shapes_fall_back_and_say_why():
    """576-wide rows (SmolLM2-135M): K-quants cannot be used for rows of 576; ffn_down rows (1536) can."""
    tensors = llama_tensors(30, 576, 1536, 9, 3, 49152, tied=True)
    choices = choose_tensor_types(tensors, FileType.Q4_K_M, ModelInfo("llama", 30, 9, 3))
    by = {c.name: c for c in choices}
    embd = by["token_embd.weight"]
    assert (embd.target_type, embd.wanted_type) == (T.Q8_0, T.Q6_K) and "576" in embd.fallback
    q = by["blk.5.attn_q.weight"]
    assert (q.target_type, q.wanted_type) == (T.Q5_0, T.Q4_K)
    down = by["blk.0.ffn_down.weight"]
    assert down.target_type == T.Q6_K and down.fallback is None
    v = by["blk.0.attn_v.weight"]     # use_more_bits → Q6_K, which does not fit 576 either
    assert (v.target_type, v.wanted_type) == (T.Q8_0, T.Q6_K)
    assert sum(c.fallback is not None for c in choices) == 1 + 30 * 6


# --- overrides --------------------------------------------------------------------------------------------------


def test_pure_uses_the_default_type_everywhere_but_keeps_the_fallback():
    got = types_by_name(FileType.Q4_K_M, pure=True)
    assert {v for k, v in got.items() if "norm" not in k} == {T.Q4_K}
    tensors = llama_tensors(2, 576, 1536, 9, 3, 100)
    got = types_by_name(FileType.Q4_K_M, ModelInfo("llama", 2, 9, 3), tensors, pure=True)
    assert got["blk.0.attn_q.weight"] == T.Q5_0 and got["blk.0.ffn_down.weight"] == T.Q4_K


def test_explicit_output_and_embedding_types_skip_rules_and_fallback():
    got = types_by_name(FileType.Q4_K_M, output_tensor_type=T.Q8_0, token_embedding_type=T.Q4_K)
    assert got["output.weight"] == T.Q8_0 and got["token_embd.weight"] == T.Q4_K
    tensors = llama_tensors(2, 576, 1536, 9, 3, 100)
    got = types_by_name(FileType.Q4_K_M, ModelInfo("llama", 2, 9, 3), tensors, token_embedding_type=T.Q4_K,
                        output_tensor_type=T.Q6_K)
    assert got["token_embd.weight"] == T.Q4_K and got["output.weight"] == T.Q6_K   # no fallback: as llama does


def test_output_tensor_type_reaches_tied_embeddings_through_the_rules():
    tensors = llama_tensors(2, 576, 1536, 9, 3, 100, tied=True)
    got = types_by_name(FileType.Q4_K_M, ModelInfo("llama", 2, 9, 3), tensors, output_tensor_type=T.Q4_K)
    assert got["token_embd.weight"] == T.Q5_0     # via the rules, so the fallback applies
    got = types_by_name(FileType.Q4_K_M, ModelInfo("llama", 2, 9, 3), tensors, output_tensor_type=T.Q4_K,
                        pure=True)
    assert got["token_embd.weight"] == T.Q5_0     # --pure: the default Q4_K, fallen back


def test_tensor_type_patterns_first_match_wins_lowercased_search():
    overrides = [TensorTypeOverride.parse("ATTN_Q=q8_0"), TensorTypeOverride.parse(r"blk\.1\.=Q5_K"),
                 TensorTypeOverride.parse("attn=q6_k")]
    got = types_by_name(FileType.Q4_K_M, tensor_types=overrides)
    assert got["blk.1.attn_q.weight"] == T.Q8_0          # first pattern wins
    assert got["blk.1.ffn_up.weight"] == T.Q5_K
    assert got["blk.0.attn_v.weight"] == T.Q6_K and got["blk.4.attn_v.weight"] == T.Q6_K
    # the rules apply where no pattern matched, but blk.1's ffn_down skipped them, so the ffn_down counter lags
    # one behind the layer from there on (llama.cpp's quirk): layer L uses use_more_bits(L - 1)
    assert [got[f"blk.{i}.ffn_down.weight"] for i in (0, 2, 4, 5, 6, 7)] == [T.Q6_K, T.Q6_K, T.Q6_K, T.Q4_K,
                                                                            T.Q4_K, T.Q6_K]
    # float file types ignore --tensor-type and --pure
    assert types_by_name(FileType.F16, tensor_types=overrides)["blk.1.attn_q.weight"] == T.F16


def test_overrides_do_not_shift_the_attn_v_counter():
    """A manual type skips the rules, so the attn_v counter does not advance for that tensor (as llama.cpp)."""
    got = types_by_name(FileType.Q3_K_M, tensor_types=[TensorTypeOverride.parse(r"blk\.0\.attn_v=q8_0")])
    assert got["blk.0.attn_v.weight"] == T.Q8_0
    assert got["blk.1.attn_v.weight"] == T.Q5_K and got["blk.2.attn_v.weight"] == T.Q5_K
    assert got["blk.3.attn_v.weight"] == T.Q4_K


def test_leave_output_tensor():
    got = types_by_name(FileType.Q4_K_M, leave_output_tensor=True)
    assert got["output.weight"] == T.F16 and got["token_embd.weight"] == T.Q4_K


def test_tensors_that_are_never_quantized():
    tensors = [("token_embd.weight", (64, 256), T.F16), ("blk.0.attn_q.bias", (256,), T.F32),
               ("blk.0.attn_q.weight", (256, 256), T.F16), ("blk.0.col.weight", (256, 1), T.F16),
               ("blk.0.row.weight", (1, 256), T.F16), ("blk.0.attn_q_norm.weight", (64, 256), T.F16),
               ("blk.0.ffn_gate_inp.weight", (8, 256), T.F16), ("position_embd.weight", (32, 256), T.F16),
               ("blk.0.attn_k.scale", (256, 256), T.F16), ("output.weight", (64, 256), T.F16)]
    choices = {c.name: c for c in choose_tensor_types(tensors, FileType.Q4_0, ModelInfo("llama", 1, 4, 4))}
    kept = {n for n, c in choices.items() if not c.quantizable}
    assert kept == {"blk.0.attn_q.bias", "blk.0.row.weight", "blk.0.attn_q_norm.weight",
                    "blk.0.ffn_gate_inp.weight", "position_embd.weight", "blk.0.attn_k.scale"}
    assert choices["blk.0.col.weight"].target_type == T.F16     # [ne0=1, ne1=256]: 2-D, row of 1 → F16 fallback
    assert all(choices[n].target_type == choices[n].source_type for n in kept)


def test_tensor_order_is_llama_cpp_s():
    names = ["token_embd.weight", "blk.10.attn_q.weight", "blk.2.ffn_up.weight", "output_norm.weight",
             "blk.2.attn_k.weight", "output.weight", "rope_freqs.weight", "blk.9.ffn_down.weight",
             "blk.2.attn_norm.weight"]
    assert llama_tensor_order(names) == [
        "output.weight", "output_norm.weight", "rope_freqs.weight", "token_embd.weight", "blk.2.attn_k.weight",
        "blk.2.attn_norm.weight", "blk.2.ffn_up.weight", "blk.9.ffn_down.weight", "blk.10.attn_q.weight"]


def test_counters_follow_llama_order_not_file_order():
    """ffn_down's counter advances in weight_name_comparer order: shuffling the input changes nothing."""
    tensors = model_tensors()
    shuffled = tensors[::-1]
    assert types_by_name(FileType.Q4_K_M, tensors=shuffled) == types_by_name(FileType.Q4_K_M, tensors=tensors)


def test_use_more_bits():
    assert {i for i in range(32) if use_more_bits(i, 32)} == MORE_BITS
    assert {i for i in range(30) if use_more_bits(i, 30)} == {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}


def test_70b_and_experts():
    tensors = llama_tensors(80, 512, 1024, 64, 8, 256)
    seventy = ModelInfo("llama", 80, 64, 8)
    assert seventy.is_70b and not ModelInfo("llama", 80, 64, 64).is_70b and ModelInfo("qwen2", 80, 8, 8).is_70b
    got = types_by_name(FileType.Q3_K_S, seventy, tensors)
    assert got["blk.40.attn_v.weight"] == T.Q5_K and got["blk.40.attn_q.weight"] == T.Q3_K
    got = types_by_name(FileType.Q4_K_M, seventy, tensors)
    assert got["blk.11.attn_v.weight"] == T.Q5_K and got["blk.12.attn_v.weight"] == T.Q6_K
    eight = ModelInfo("llama", N, 32, 8, n_expert=8)
    got = types_by_name(FileType.Q4_K_M, eight)
    assert got["blk.0.attn_v.weight"] == T.Q8_0 and got["blk.5.attn_k.weight"] == T.Q8_0
    assert got["blk.5.attn_output.weight"] == T.Q5_K


def test_mxfp4_moe_gives_expert_stacks_mxfp4_and_everything_else_q8_0():
    hidden, ffn, n_expert = 512, 256, 8
    moe = ModelInfo("qwen3moe", 2, 8, 4, n_expert=n_expert)
    tensors = [("token_embd.weight", (1000, hidden), T.F16), ("output_norm.weight", (hidden,), T.F32)]
    for i in range(2):
        p = f"blk.{i}."
        tensors += [(p + "attn_q.weight", (hidden, hidden), T.F16), (p + "attn_v.weight", (256, hidden), T.F16),
                    (p + "ffn_gate_inp.weight", (n_expert, hidden), T.F32),
                    (p + "ffn_gate_exps.weight", (n_expert, ffn, hidden), T.F16),
                    (p + "ffn_up_exps.weight", (n_expert, ffn, hidden), T.F16),
                    (p + "ffn_down_exps.weight", (n_expert, hidden, ffn), T.F16),
                    (p + "ffn_down_shexp.weight", (hidden, ffn), T.F16),
                    (p + "ffn_one_exps.weight", (1, ffn, hidden), T.F16),      # ne[2] == 1: not a stack
                    (p + "attn_odd.weight", (2, 4, 48), T.F16)]                # 3-D, rows of 48: MXFP4 → F16
    got = types_by_name(FileType.MXFP4_MOE, moe, tensors)
    for i in range(2):
        p = f"blk.{i}."
        for part in ("gate", "up", "down"):
            assert got[p + f"ffn_{part}_exps.weight"] == T.MXFP4
        assert got[p + "ffn_one_exps.weight"] == got[p + "ffn_down_shexp.weight"] == T.Q8_0
        assert got[p + "attn_q.weight"] == got[p + "attn_v.weight"] == T.Q8_0
        assert got[p + "ffn_gate_inp.weight"] == T.F32
        assert got[p + "attn_odd.weight"] == T.F16
    assert got["token_embd.weight"] == T.Q8_0                                 # tied: the output rule
    untied = types_by_name(FileType.MXFP4_MOE, moe, tensors + [("output.weight", (1000, hidden), T.F16)])
    assert untied["output.weight"] == T.Q8_0 and untied["token_embd.weight"] == T.Q8_0
    falcon = types_by_name(FileType.MXFP4_MOE, ModelInfo("falcon", 2, 8, 4), tensors)
    assert falcon["blk.0.ffn_up_exps.weight"] == T.MXFP4 and falcon["token_embd.weight"] == T.Q8_0
    # bailingmoe3: only the ffn expert stacks, not its 3-D attention projections
    bailing = types_by_name(FileType.MXFP4_MOE, ModelInfo("bailingmoe3", 2, 8, 4, n_expert=n_expert),
                            tensors + [("blk.0.attn_k_b.weight", (8, 64, 128), T.F16)])
    assert bailing["blk.0.ffn_up_exps.weight"] == T.MXFP4 and bailing["blk.0.attn_k_b.weight"] == T.Q8_0
    assert FileType.MXFP4_MOE.display_name == "MXFP4 MoE" and FileType.MXFP4_MOE.description == "MXFP4 MoE"
    assert [name for name, _ in list_file_types()][3:5] == ["Q4_1", "MXFP4_MOE"]


def test_falcon_rules():
    falcon = ModelInfo("falcon", N, 32, 8)
    got = types_by_name(FileType.Q4_K_M, falcon)
    assert got["output.weight"] == T.Q8_0
    assert [got[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2, 3, 4, 6)] == [T.Q6_K, T.Q6_K, T.Q5_K, T.Q5_K,
                                                                           T.Q4_K, T.Q5_K]


# --- parsing ----------------------------------------------------------------------------------------------------


def test_parse_file_type_like_llama_quantize():
    assert parse_file_type("q4_k_m") is FileType.Q4_K_M
    assert parse_file_type("Q4_K") is FileType.Q4_K_M and parse_file_type("q3_k") is FileType.Q3_K_M
    assert parse_file_type("15") is FileType.Q4_K_M and parse_file_type("0") is FileType.F32
    assert parse_file_type("iq2_m") is FileType.IQ2_M and parse_file_type("29") is FileType.IQ2_M
    assert parse_file_type("mxfp4_moe") is FileType.MXFP4_MOE and parse_file_type("38") is FileType.MXFP4_MOE
    assert parse_file_type("q2_0") is FileType.Q2_0 and parse_file_type("41") is FileType.Q2_0
    for bad in ("MXFP4", "Q3_0", "Q4_K_X", "", "99"):
        with pytest.raises(QtoolError, match="file type"):
            parse_file_type(bad)


def test_parse_tensor_type():
    assert parse_tensor_type("q4_k") == T.Q4_K and parse_tensor_type("BF16") == T.BF16
    with pytest.raises(QtoolError, match="cannot write tensor type NVFP4"):
        parse_tensor_type("nvfp4")
    with pytest.raises(QtoolError, match="unknown tensor type 'q9'"):
        parse_tensor_type("q9")
    with pytest.raises(QtoolError, match="not a valid regular expression"):
        TensorTypeOverride.parse("attn_(=q8_0")


def test_model_info_from_metadata():
    kv = {"general.architecture": "qwen2", "qwen2.block_count": 28, "qwen2.attention.head_count": 28,
          "qwen2.attention.head_count_kv": 4}
    info = ModelInfo.from_metadata(kv)
    assert (info.n_layer, info.gqa, info.n_expert) == (28, 7, 0)
    del kv["qwen2.attention.head_count_kv"]
    assert ModelInfo.from_metadata(kv).gqa == 1
    kv["qwen2.attention.head_count_kv"] = [0, 4]
    assert ModelInfo.from_metadata(kv).gqa == 0
    with pytest.raises(QtoolError, match="block_count"):
        ModelInfo.from_metadata({"general.architecture": "llama"})


# --- the 1- and 2-bit file types, COPY -----------------------------------------------------------------------------


@pytest.mark.parametrize("qtype, row, expected", [(T.TQ1_0, 5504, T.Q4_0), (T.TQ2_0, 576, T.Q4_0),
                                                  (T.TQ2_0, 100, T.F16), (T.Q2_0, 736, T.Q4_0), (T.Q2_0, 100, T.F16)])
def test_ternary_types_and_q2_0_fall_back_to_q4_0(qtype, row, expected):
    got, why = shape_fallback(qtype, row)
    block = 64 if qtype == T.Q2_0 else 256
    assert got == expected and f"row length {row} is not a multiple of {block}" in why
    assert shape_fallback(qtype, 4 * 256) == (qtype, None)


def test_q1_0_has_no_fallback_as_in_llama_quantize():
    assert shape_fallback(T.Q1_0, 640) == (T.Q1_0, None)
    with pytest.raises(QtoolError, match="no fallback type is defined for Q1_0: row length 576"):
        shape_fallback(T.Q1_0, 576)


def test_copy_is_parsed_by_name_only_and_keeps_every_tensor():
    assert parse_file_type("copy") is FileType.COPY
    assert parse_file_type("0") is FileType.F32            # llama-quantize: the first entry with ftype 0
    assert FileType.COPY.llama_ftype is None and not FileType.COPY.is_quantized
    tensors = model_tensors()
    choices = choose_tensor_types(tensors, FileType.COPY, GQA4,
                                  MixtureOptions(output_tensor_type=T.Q8_0, token_embedding_type=T.Q4_K,
                                                 tensor_types=[TensorTypeOverride.parse("attn_v=q8_0")]))
    assert all(not c.quantizable and c.target_type == c.source_type for c in choices)


def test_guessed_file_type_is_the_first_type_to_reach_the_top_count():
    from qtool.quantize.mixtures import guessed_file_type

    assert guessed_file_type([T.F32, T.F16, T.F16, T.F32]) == 1 | 1024       # F16 reached 2 first
    assert guessed_file_type([T.Q4_K, T.Q6_K, T.Q6_K, T.Q4_K]) == 18 | 1024  # Q6_K -> MOSTLY_Q6_K
    assert guessed_file_type([T.Q3_K]) == 12 | 1024                          # Q3_K -> Q3_K_M
    assert guessed_file_type([T.I32]) == 0 | 1024                            # unknown -> ALL_F32
