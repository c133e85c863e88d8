"""The HF tokenizer files rebuilt from llama.cpp's vocab GGUFs tokenize like the real models.

llama.cpp's ``.out`` test vectors were produced by HF (``encode(text, add_special_tokens=False)``)
on the real tokenizers, so the rebuilt files must reproduce every one of them; and the chkhsh
transformers computes over them must be the one llama.cpp's converter knows the family by.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.interop import need_module
from tests.fixtures.tokenizers import (
    BPE_VOCABS,
    SPM_VOCABS,
    VOCABS,
    gguf_vocab,
    read_gguf_kv,
    read_test_vectors,
    vocab_gguf_path,
    write_hf_tokenizer,
)

# llama.cpp's get_vocab_base_pre: chkhsh of AutoTokenizer(dir).encode(chktxt)
EXPECTED_CHKHSH = {
    "llama-bpe": "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5",
    "qwen2": "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea",
    "gpt-2": "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454",
}
VECTOR_VOCABS = [v for v in VOCABS if read_test_vectors(v) is not None]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, vocab_dir) -> dict[str, Path]:
    out = {}
    for vocab in VOCABS:
        d = tmp_path_factory.mktemp(vocab)
        write_hf_tokenizer(vocab, d)
        out[vocab] = d
    return out


def _mismatches(encode, vocab: str) -> list[tuple[str, list[int], list[int]]]:
    return [(text, ids, got) for text, ids in read_test_vectors(vocab)
            if (got := encode(text)) != ids]


def test_every_vocab_but_baichuan_has_test_vectors():
    assert VECTOR_VOCABS == ["llama-spm", "llama-bpe", "qwen2", "gpt-2"]
    assert len(read_test_vectors("qwen2")) == 46


@pytest.mark.parametrize("vocab", [v for v in VECTOR_VOCABS if v in SPM_VOCABS])
def test_sentencepiece_reproduces_llamacpp_vectors(hf_dirs, vocab):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf_dirs[vocab] / "tokenizer.model"))
    assert _mismatches(lambda t: sp.encode(t), vocab) == []


@pytest.mark.parametrize("vocab", VECTOR_VOCABS)
def test_tokenizers_json_reproduces_llamacpp_vectors(hf_dirs, vocab):
    # for llama-spm this is the HF fast tokenizer.json shipped beside tokenizer.model
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_dirs[vocab] / "tokenizer.json"))
    assert _mismatches(lambda t: tok.encode(t, add_special_tokens=False).ids, vocab) == []


@pytest.mark.reference
@pytest.mark.parametrize("vocab", BPE_VOCABS)
def test_transformers_chkhsh_is_llamacpps(hf_dirs, vocab):
    AutoTokenizer = need_module("transformers").AutoTokenizer

    from qtool.convert.tokenizer import CHKTXT

    tok = AutoTokenizer.from_pretrained(hf_dirs[vocab])
    assert hashlib.sha256(str(tok.encode(CHKTXT)).encode()).hexdigest() == EXPECTED_CHKHSH[vocab]


def test_chktxt_is_the_46th_test_vector():
    from qtool.convert.tokenizer import CHKTXT

    assert read_test_vectors("llama-bpe")[45][0] == CHKTXT


@pytest.mark.parametrize("vocab", SPM_VOCABS)
def test_spm_model_has_the_gguf_pieces(hf_dirs, vocab):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb2

    v = gguf_vocab(vocab)
    raw = (hf_dirs[vocab] / "tokenizer.model").read_bytes()
    proto = pb2.ModelProto.FromString(raw)
    assert [p.piece for p in proto.pieces] == v.tokens
    assert [p.score for p in proto.pieces] == v.scores
    assert [p.type for p in proto.pieces] == v.types
    assert proto.trainer_spec.model_type == pb2.TrainerSpec.BPE
    assert proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity"
    assert not proto.normalizer_spec.remove_extra_whitespaces
    assert proto.normalizer_spec.add_dummy_prefix == (vocab == "llama-spm")
    sp = spm.SentencePieceProcessor(model_file=str(hf_dirs[vocab] / "tokenizer.model"))
    assert sp.vocab_size() == len(v.tokens)
    # byte fallback works: a character outside the vocab becomes its UTF-8 byte pieces
    assert [sp.id_to_piece(i) for i in sp.encode("\U0010FFFD")][-4:] == \
        ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBD>"]


def test_baichuan_adds_no_dummy_prefix(hf_dirs, tmp_path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(hf_dirs["baichuan"] / "tokenizer.model"))
    first = sp.id_to_piece(sp.encode("Hello world")[0])
    assert not first.startswith("\u2581")
    write_hf_tokenizer("baichuan", tmp_path, add_dummy_prefix=True)
    sp2 = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp2.id_to_piece(sp2.encode("Hello world")[0]).startswith("\u2581")
    assert not (hf_dirs["baichuan"] / "tokenizer.json").exists()  # Baichuan repos ship none


def test_spm_user_defined_pieces(tmp_path):
    import sentencepiece as spm

    write_hf_tokenizer("llama-spm", tmp_path, user_defined=["<tool>", "qtool"],
                       tokenizer_json=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert sp.vocab_size() == 32002
    assert sp.piece_to_id("<tool>") == 32000
    # sentencepiece matches user-defined pieces verbatim inside the text
    assert 32000 in sp.encode("a<tool>b") and 32001 in sp.encode("use qtool now")


def test_spm_tokenizer_config(hf_dirs):
    cfg = json.loads((hf_dirs["llama-spm"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert cfg["tokenizer_class"] == "LlamaTokenizer"
    assert (cfg["bos_token"]["content"], cfg["eos_token"]["content"],
            cfg["unk_token"]["content"]) == ("<s>", "</s>", "<unk>")
    assert "added_tokens_decoder" not in cfg and "chat_template" not in cfg
    stm = json.loads((hf_dirs["llama-spm"] / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert stm["bos_token"]["content"] == "<s>"


def test_bpe_tokenizer_json_layout(hf_dirs):
    tj = json.loads((hf_dirs["llama-bpe"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["ignore_merges"] is True and tj["model"]["byte_fallback"] is False
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"].startswith("(?i:'s|'t")
    assert [p["type"] for p in tj["post_processor"]["processors"]] == \
        ["ByteLevel", "TemplateProcessing"]
    assert len(tj["model"]["vocab"]) == 128000 and len(tj["added_tokens"]) == 256
    assert tj["model"]["merges"][0] == ["Ġ", "Ġ"]

    tj = json.loads((hf_dirs["qwen2"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["normalizer"] == {"type": "NFC"}
    assert tj["post_processor"]["type"] == "ByteLevel"
    assert [a["content"] for a in tj["added_tokens"]] == \
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert not any(t.startswith("[PAD") for t in tj["model"]["vocab"])  # converter filler
    cfg = json.loads((hf_dirs["qwen2"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] is None and cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>"
    assert cfg["chat_template"] == gguf_vocab("qwen2").chat_template
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"

    tj = json.loads((hf_dirs["gpt-2"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False,
                                   "trim_offsets": True, "use_regex": True}
    assert tj["model"]["vocab"]["<|endoftext|>"] == 50256  # also in model.vocab, like the real one


def test_bpe_options(tmp_path):
    from tokenizers import Tokenizer

    write_hf_tokenizer("gpt-2", tmp_path, merges_format="string", user_defined=["<x y>"],
                       chat_template="{{ messages }}", tokenizer_config={"model_max_length": None})
    tj = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["model"]["merges"][:2] == ["Ġ t", "Ġ a"]
    assert tj["added_tokens"][-1] == {"id": 50257, "content": "<x y>", "single_word": False,
                                      "lstrip": False, "rstrip": False, "normalized": True,
                                      "special": False}
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["chat_template"] == "{{ messages }}" and "model_max_length" not in cfg
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert 50257 in tok.encode("a <x y> b").ids


def test_read_gguf_kv_matches_gguf_reader():
    import gguf

    path = vocab_gguf_path("llama-spm")
    ours = read_gguf_kv(path)
    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(ours) == list(fields)
    for key, field in fields.items():
        vtype, etype, value = ours[key]
        assert vtype == field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            assert etype == field.types[1]
        assert value == field.contents(), key


def test_unknown_vocab_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown vocab"):
        write_hf_tokenizer("llama-2", tmp_path)
