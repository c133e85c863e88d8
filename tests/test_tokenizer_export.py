"""convert/tokenizer.py: HF tokenizer files -> the tokenizer KVs llama.cpp's converter writes.

The five ggml-vocab GGUFs are the reference: their HF files are rebuilt by
tests/fixtures/tokenizers.py, exported again, and the arrays must come back unchanged. Where the
export differs from the file it is because today's llama.cpp converter (which the vocab files
predate) or qtool's deliberate fixes write something else; each case says which.

The interop test at the end runs llama.cpp's own set_vocab code on the same directories and
compares every KV pair.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFValueType as T

from qtool.convert import tokenizer as tokmod
from qtool.convert.tokenizer import export_vocab
from qtool.gguf_io import KV
from qtool.errors import QtoolError
from tests.fixtures.tokenizers import VOCABS, gguf_vocab, write_hf_tokenizer
from tests.interop import unavailable

# config.json values of the real models (the parts the tokenizer export reads)
HPARAMS: dict[str, dict[str, Any]] = {
    "llama-spm": {"vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2},  # Llama-2-7b-hf
    "baichuan": {"vocab_size": 64000, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    "llama-bpe": {"vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001},
    "qwen2": {"vocab_size": 151936, "bos_token_id": 151643, "eos_token_id": 151643},
    "gpt-2": {"vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256},
}
KIND = {"llama-spm": "llama", "baichuan": "spm", "llama-bpe": "llama", "qwen2": "bpe",
        "gpt-2": "bpe"}
PRE = {"llama-spm": "default", "baichuan": "default", "llama-bpe": "llama-bpe", "qwen2": "qwen2",
       "gpt-2": "gpt-2"}

_M, _P, _TOK, _SC, _TT, _MG = (
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
_BOS, _EOS, _UNK, _PAD = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                          "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id")
_ADD_BOS, _ADD_EOS, _ADD_SEP = ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
                                "tokenizer.ggml.add_sep_token")
_SPACE, _CHAT = "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"

# Keys in write order. Compared with the ggml-vocab files (written by older converters):
EXPECTED_KEYS = {
    # + add_sep_token=false: today's SpecialVocab reads it off the pair template of Llama-2's
    #   tokenizer.json (<s> A <s> B: no separator), before add_eos comes from tokenizer_config
    "llama-spm": [_M, _P, _TOK, _SC, _TT, _BOS, _EOS, _UNK, _ADD_BOS, _ADD_SEP, _ADD_EOS],
    # + pre "default" (the file predates the key); + add_space_prefix=false (qtool: the proto's
    #   add_dummy_prefix is false; llama.cpp would add a space HF never adds); + add_bos/add_eos
    #   from tokenizer_config.json
    "baichuan": [_M, _P, _TOK, _SC, _TT, _SPACE, _BOS, _EOS, _PAD, _ADD_BOS, _ADD_EOS],
    # + add flags from the post-processor (ByteLevel + TemplateProcessing with BOS)
    "llama-bpe": [_M, _P, _TOK, _TT, _MG, _BOS, _EOS, _ADD_BOS, _ADD_EOS, _ADD_SEP],
    # eos and pad come from tokenizer_config.json, bos only from config.json: hence this order
    "qwen2": [_M, _P, _TOK, _TT, _MG, _EOS, _PAD, _BOS, _ADD_BOS, _ADD_EOS, _CHAT],
    # + unk: the fixture's tokenizer_config names unk_token (openai-community/gpt2's has no
    #   tokenizer_config at all); + add flags from the ByteLevel post-processor
    "gpt-2": [_M, _P, _TOK, _TT, _MG, _BOS, _EOS, _UNK, _ADD_BOS, _ADD_EOS],
}
EXPECTED_EXTRA_VALUES = {
    "llama-spm": {_ADD_SEP: False},
    "baichuan": {_P: "default", _SPACE: False, _ADD_BOS: True, _ADD_EOS: False},
    "llama-bpe": {_ADD_BOS: True, _ADD_EOS: False, _ADD_SEP: False},
    "qwen2": {_ADD_BOS: False, _ADD_EOS: False},
    "gpt-2": {_UNK: 50256, _ADD_BOS: False, _ADD_EOS: False},
}
KEY_TYPES = {_M: T.STRING, _P: T.STRING, _CHAT: T.STRING, _BOS: T.UINT32, _EOS: T.UINT32,
             _UNK: T.UINT32, _PAD: T.UINT32, _ADD_BOS: T.BOOL, _ADD_EOS: T.BOOL, _ADD_SEP: T.BOOL,
             _SPACE: T.BOOL}
ARRAY_TYPES = {_TOK: T.STRING, _SC: T.FLOAT32, _TT: T.INT32, _MG: T.STRING}


def _write_model(vocab: str, d: Path, hparams: dict[str, Any] | None = None, **opts) -> Path:
    write_hf_tokenizer(vocab, d, **opts)
    (d / "config.json").write_text(json.dumps(hparams or HPARAMS[vocab]), encoding="utf-8")
    return d


def _export(d: Path, kind: str, pre: str | None = None
            ) -> tuple[dict[str, KV], list[str]]:
    hparams = json.loads((d / "config.json").read_text(encoding="utf-8"))
    kvs, log = export_vocab(d, hparams, kind, pre)
    return {kv.key: kv for kv in kvs}, log


@pytest.fixture(scope="module")
def exported(tmp_path_factory, vocab_dir):
    """vocab -> (model dir, KVs by key, KV list, log), each exported once."""
    out = {}
    for vocab in VOCABS:
        d = _write_model(vocab, tmp_path_factory.mktemp(vocab))
        kvs, log = export_vocab(d, HPARAMS[vocab], KIND[vocab])
        out[vocab] = (d, {kv.key: kv for kv in kvs}, kvs, log)
    return out


# --------------------------------------------------------------------------------------------
# the five reference vocabs
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", VOCABS)
def test_arrays_equal_the_gguf(exported, vocab):
    _, kv, _, _ = exported[vocab]
    ref = gguf_vocab(vocab)
    assert kv[_TOK].value == ref.tokens
    if vocab == "qwen2":
        # the [PAD{i}] fillers past the tokenizer (vocab_size 151936 > 151646 tokens) are UNUSED
        # in today's converter; the file's older converter wrote USER_DEFINED
        assert ref.types[151646:] == [4] * 290
        assert kv[_TT].value == ref.types[:151646] + [5] * 290
    else:
        assert kv[_TT].value == ref.types
    if ref.scores is not None:
        assert kv[_SC].value == ref.scores
    else:
        assert _SC not in kv
    if ref.merges is not None:
        assert kv[_MG].value == ref.merges
    else:
        assert _MG not in kv


@pytest.mark.parametrize("vocab", VOCABS)
def test_keys_order_types_and_values(exported, vocab):
    _, kv, kvs, log = exported[vocab]
    assert [x.key for x in kvs] == EXPECTED_KEYS[vocab]
    ref = gguf_vocab(vocab).kv
    extra = EXPECTED_EXTRA_VALUES[vocab]
    for x in kvs:
        if x.key in ARRAY_TYPES:
            assert (x.type, x.sub_type) == (T.ARRAY, ARRAY_TYPES[x.key]), x.key
            continue
        assert x.type == KEY_TYPES[x.key] and x.sub_type is None, x.key
        if x.key in extra:
            assert x.value == extra[x.key], x.key
            assert x.key not in ref or ref[x.key][2] == x.value
        else:  # same type and value as in the reference file
            assert (x.type, x.value) == (ref[x.key][0], ref[x.key][2]), x.key
    assert kv[_P].value == PRE[vocab]
    assert all(isinstance(line, str) for line in log)


def test_pre_tokenizer_log_lines(exported):
    for vocab in ("llama-bpe", "qwen2", "gpt-2"):
        log = exported[vocab][3]
        assert any(line.startswith(f"pre-tokenizer: {vocab} (identified from tokenizer.json; "
                                   f"llama.cpp's chkhsh") for line in log), log
    assert "add_space_prefix=false from tokenizer.model normalizer_spec (add_dummy_prefix=false)" \
        in exported["baichuan"][3]


# --------------------------------------------------------------------------------------------
# SentencePiece path
# --------------------------------------------------------------------------------------------

def test_add_dummy_prefix_true_writes_no_space_prefix_key(tmp_path):
    d = _write_model("baichuan", tmp_path, add_dummy_prefix=True)
    kv, log = _export(d, "spm")
    assert _SPACE not in kv
    assert not any("add_space_prefix" in line for line in log)


def test_add_space_prefix_position_and_tokenizer_config_precedence(tmp_path):
    # Llama path: tokenizer_config add_prefix_space is written first (llama.cpp) and wins over
    # the proto; without it the proto-derived key goes right after token_type
    d = _write_model("baichuan", tmp_path / "a", tokenizer_config={"add_prefix_space": True})
    kv, log = _export(d, "llama")
    assert list(kv)[0] == _SPACE and kv[_SPACE].value is True
    assert any("add_space_prefix=true kept from tokenizer_config.json" in line for line in log)

    d = _write_model("llama-spm", tmp_path / "b", tokenizer_config={"add_prefix_space": False})
    kv, _ = _export(d, "llama")
    assert list(kv)[0] == _SPACE and kv[_SPACE].value is False

    d = _write_model("baichuan", tmp_path / "c")
    kv, _ = _export(d, "llama")
    keys = list(kv)
    assert keys.index(_SPACE) == keys.index(_TT) + 1 and kv[_SPACE].type == T.BOOL


def test_user_defined_pieces_keep_their_type(tmp_path):
    d = _write_model("llama-spm", tmp_path, {"vocab_size": 32002, "bos_token_id": 1,
                                              "eos_token_id": 2},
                     user_defined=["<tool>", "\u2581qtool"], tokenizer_json=False)
    kv, log = _export(d, "llama")
    assert kv[_TOK].value[32000:] == ["<tool>", "\u2581qtool"]
    assert kv[_TT].value[32000:] == [4, 4]  # llama.cpp: 1 (NORMAL)
    assert kv[_SC].value[32000:] == [0.0, 0.0]
    assert kv[_TT].value[:32000] == gguf_vocab("llama-spm").types
    assert any("2 USER_DEFINED sentencepiece piece(s)" in line for line in log)


def test_spm_vocab_size_pads_and_truncates(tmp_path):
    d = _write_model("llama-spm", tmp_path / "pad", {"vocab_size": 32004}, tokenizer_json=False)
    kv, _ = _export(d, "llama")
    assert kv[_TOK].value[32000:] == [f"[PAD{i}]" for i in range(32000, 32004)]
    assert kv[_SC].value[32000:] == [-10000.0] * 4 and kv[_TT].value[32000:] == [5] * 4
    d = _write_model("llama-spm", tmp_path / "cut", {"vocab_size": 31990}, tokenizer_json=False)
    kv, log = _export(d, "llama")
    assert len(kv[_TOK].value) == 31990
    assert any("ignored" in line for line in log)


def test_added_tokens_json_and_added_tokens_decoder(tmp_path):
    d = _write_model("llama-spm", tmp_path, {"vocab_size": 32002, "bos_token_id": 1,
                                              "eos_token_id": 2},
                     tokenizer_json=False, added_tokens_decoder=True)
    (d / "added_tokens.json").write_text(json.dumps({"<extra>": 32000, "<far>": 40000}))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["32001"] = {"content": "\u2581hi\u2581there", "special": False}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    kv, log = _export(d, "llama")
    toks, types, scores = kv[_TOK].value, kv[_TT].value, kv[_SC].value
    assert (toks[32000], types[32000], scores[32000]) == ("<extra>", 4, -1000.0)
    # added_tokens_decoder: special -> CONTROL (even <unk>, as llama.cpp does), score -1000;
    # non-special -> USER_DEFINED with "▁" turned into spaces
    assert (toks[0], types[0], scores[0]) == ("<unk>", 3, -1000.0)
    assert types[1:3] == [3, 3] and scores[1:3] == [-1000.0, -1000.0]
    assert (toks[32001], types[32001], scores[32001]) == (" hi there", 4, -1000.0)
    assert any("<far>" in line and "out of range" in line for line in log)


def test_spm_vocab_ignores_pre_and_errors(tmp_path):
    d = _write_model("baichuan", tmp_path)
    kv, _ = _export(d, "spm", pre="default")
    assert kv[_P].value == "default"
    with pytest.raises(QtoolError, match="BPE tokenizers only"):
        _export(d, "spm", pre="qwen2")
    (d / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(QtoolError, match="cannot load"):
        _export(d, "spm")
    (d / "tokenizer.model").unlink()
    with pytest.raises(QtoolError, match="no tokenizer.model"):
        _export(d, "spm")


def test_codellama_eot(tmp_path):
    # CodeLlama's 16 extra pieces (32016 total): llama.cpp adds eot=32010 after the SpecialVocab
    d = _write_model("llama-spm", tmp_path, {"vocab_size": 32016, "bos_token_id": 1,
                                              "eos_token_id": 2},
                     user_defined=[f"<code{i}>" for i in range(16)])
    kv, _ = _export(d, "llama")
    assert list(kv)[-1] == "tokenizer.ggml.eot_token_id"
    assert kv["tokenizer.ggml.eot_token_id"].value == 32010
    assert "tokenizer.ggml.prefix_token_id" not in kv  # GGUFWriter has no such key


def test_vocab_49152_forces_add_bos_false(tmp_path):
    # llama.cpp's Granite-small rule, which SmolLM (vocab 49152) also hits
    n_extra = 49152 - 32000
    d = _write_model("llama-spm", tmp_path, {"vocab_size": 49152},
                     user_defined=[f"<u{i}>" for i in range(n_extra)], tokenizer_json=False)
    kv, _ = _export(d, "llama")
    keys = list(kv)
    assert kv[_ADD_BOS].value is False
    assert keys.index(_ADD_BOS) < keys.index(_ADD_EOS)  # overwritten in place, as GGUFWriter does


# --------------------------------------------------------------------------------------------
# SPM vocab re-exported as tokenizer.json only (LlamaHfVocab)
# --------------------------------------------------------------------------------------------

def test_llama_hf_vocab_path(tmp_path):
    d = _write_model("llama-spm", tmp_path)
    (d / "tokenizer.model").unlink()
    kv, log = _export(d, "llama")
    ref = gguf_vocab("llama-spm")
    assert kv[_M].value == "llama" and kv[_P].value == "default"
    assert kv[_TOK].value == ref.tokens
    assert kv[_SC].value == [-1000.0] * 32000  # LlamaHfVocab has no scores
    # specials are CONTROL (also <unk>), <0xXX> BYTE, the rest NORMAL
    assert kv[_TT].value == [3, 3, 3] + ref.types[3:]
    assert _SPACE not in kv
    assert kv[_UNK].value == 0 and kv[_ADD_BOS].value is True
    assert any("byte-fallback BPE" in line for line in log)

    d = _write_model("llama-spm", tmp_path / "nodummy", add_dummy_prefix=False)
    (d / "tokenizer.model").unlink()
    kv, _ = _export(d, "llama")
    assert kv[_SPACE].value is False


# --------------------------------------------------------------------------------------------
# BPE path and pre-tokenizer identification
# --------------------------------------------------------------------------------------------

def _edit_tokenizer_json(d: Path, **changes: Any) -> None:
    path = d / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    tj.update(changes)
    path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, vocab_dir) -> Path:
    return _write_model("gpt-2", tmp_path_factory.mktemp("gpt2-base"))


def _gpt2_copy(gpt2_dir: Path, tmp_path: Path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(gpt2_dir, d)
    return d


UNKNOWN_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": r"\s+|[A-Za-z]+|[0-9]+|[^\sA-Za-z0-9]+"},
     "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}


def test_unrecognised_pre_tokenizer_is_an_error(gpt2_dir, tmp_path):
    d = _gpt2_copy(gpt2_dir, tmp_path)
    _edit_tokenizer_json(d, pre_tokenizer=UNKNOWN_PRE)
    with pytest.raises(QtoolError) as e:
        _export(d, "bpe")
    msg = str(e.value)
    assert "not recognised" in msg and "--pre" in msg and "\n" not in msg
    assert r"Split(regex='\\s+|[A-Za-z]+|[0-9]+|[^\\sA-Za-z0-9]+'" in msg
    assert "ByteLevel(add_prefix_space=false, use_regex=false)" in msg

    kv, log = _export(d, "bpe", pre="gpt-2")  # --pre overrides
    assert kv[_P].value == "gpt-2"
    assert any(line.startswith("pre-tokenizer: gpt-2 (from --pre; structure says unrecognised")
               for line in log)


def test_pre_override_must_be_a_llamacpp_name(gpt2_dir):
    with pytest.raises(QtoolError, match="not a pre-tokenizer llama.cpp knows"):
        export_vocab(gpt2_dir, HPARAMS["gpt-2"], "bpe", pre="gpt2")


def test_pre_override_wins_over_detection(gpt2_dir):
    kv, _ = _export(gpt2_dir, "bpe", pre="smollm")
    assert kv[_P].value == "smollm"


def test_smollm_detected_from_structure(gpt2_dir, tmp_path):
    # SmolLM's tokenizer.json: every digit isolated, then GPT-2's ByteLevel regex
    d = _gpt2_copy(gpt2_dir, tmp_path)
    _edit_tokenizer_json(d, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]})
    kv, log = _export(d, "bpe")
    assert kv[_P].value == "smollm"
    # GPT-2's vocab with SmolLM's pre-tokenizer is no model llama.cpp has a hash for
    assert any("is not in llama.cpp's table" in line for line in log)

    # when llama.cpp's hash names a pre-tokenizer with the same runtime regexes, its name is used
    hsh = next(line for line in log if "chkhsh" in line).split("chkhsh ")[1].split()[0]
    tokmod.KNOWN_CHKHSH[hsh] = "starcoder"
    try:
        kv, log = _export(d, "bpe")
        assert kv[_P].value == "starcoder"
        tokmod.KNOWN_CHKHSH[hsh] = "llama-bpe"  # ...and a contradicting one is an error
        with pytest.raises(QtoolError, match="ambiguous.*'smollm'.*'llama-bpe'"):
            _export(d, "bpe")
    finally:
        del tokmod.KNOWN_CHKHSH[hsh]


@pytest.mark.parametrize("contractions", [r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                                          r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"])
def test_qwen35_detected_from_structure(gpt2_dir, tmp_path, contractions):
    # Qwen3.5's tokenizer.json: Qwen2's Split with combining marks (\p{M}) in the letter runs
    d = _gpt2_copy(gpt2_dir, tmp_path)
    regex = (contractions + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    _edit_tokenizer_json(d, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]})
    kv, log = _export(d, "bpe")
    assert kv[_P].value == "qwen35"
    assert any(line.startswith("pre-tokenizer: qwen35 (identified from tokenizer.json") for line in log)
    # one mark less in the letter runs is Qwen2's regex, another model
    _edit_tokenizer_json(d, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex.replace(r"[\p{L}\p{M}]+", r"\p{L}+", 1)
                                      .replace(r"\p{L}\p{M}\p{N}", r"\p{L}\p{N}")},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]})
    assert _export(d, "bpe")[0][_P].value == "qwen2"


def test_known_hash_with_unfamiliar_structure(gpt2_dir, tmp_path):
    # GPT-2's regex written out as a Split: tokenizes like GPT-2, so llama.cpp's hash names it
    d = _gpt2_copy(gpt2_dir, tmp_path)
    gpt2_regex = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    _edit_tokenizer_json(d, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gpt2_regex}, "behavior": "Isolated",
         "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": False}]})
    kv, log = _export(d, "bpe")
    assert kv[_P].value == "gpt-2"
    assert any("from llama.cpp's chkhsh" in line for line in log)


def test_smaug_bpe_is_llama3_without_bos(exported, tmp_path):
    src = exported["llama-bpe"][0]
    d = tmp_path / "smaug"
    shutil.copytree(src, d)
    _edit_tokenizer_json(d, post_processor={"type": "ByteLevel", "add_prefix_space": True,
                                            "trim_offsets": False, "use_regex": True})
    kv, log = _export(d, "llama")
    assert kv[_P].value == "smaug-bpe"
    assert any("chkhsh c136ed14" in line and "agrees" in line for line in log)
    assert kv[_ADD_BOS].value is False


def test_merges_string_format_and_spaces(gpt2_dir, exported, tmp_path):
    d = _write_model("gpt-2", tmp_path / "s", merges_format="string")
    kv, _ = _export(d, "bpe")
    assert kv[_MG].value == gguf_vocab("gpt-2").merges

    # a literal space inside a pair-form merge is stored as U+0120 (the runtime splits at " ")
    d = _gpt2_copy(gpt2_dir, tmp_path)
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    tj["model"]["vocab"].update({"x y": 50257, "Ġx y": 50258})
    tj["model"]["merges"].append(["Ġ", "x y"])
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (d / "config.json").write_text(json.dumps({**HPARAMS["gpt-2"], "vocab_size": 50259}))
    kv, log = _export(d, "bpe")
    assert kv[_MG].value[-1] == "Ġ xĠy"
    assert "spaces inside merges encoded as U+0120" in log


def test_bpe_user_defined_added_tokens(tmp_path):
    d = _write_model("gpt-2", tmp_path, {**HPARAMS["gpt-2"], "vocab_size": 50260},
                     user_defined=["<x\u2581y>", "<|tool|>"])
    kv, log = _export(d, "bpe")
    assert kv[_TOK].value[50257:] == ["<x y>", "<|tool|>", "[PAD50259]"]
    # non-special added token: USER_DEFINED with "▁" -> " "; one that looks special: CONTROL
    assert kv[_TT].value[50256:] == [3, 4, 3, 5]
    assert any("[PAD{i}] fillers" in line for line in log)


def test_bpe_vocab_size_too_small(gpt2_dir):
    with pytest.raises(QtoolError, match="vocab_size is 50000"):
        export_vocab(gpt2_dir, {**HPARAMS["gpt-2"], "vocab_size": 50000}, "bpe")


def test_special_token_precedence(gpt2_dir, tmp_path):
    # tokenizer_config add_*_token only fills flags the post-processor left unset; config.json
    # ids only fill ids tokenizer_config did not name
    d = _gpt2_copy(gpt2_dir, tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, add_sep_token=True, pad_token="<|endoftext|>")
    del cfg["bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({**HPARAMS["gpt-2"], "bos_token_id": 7,
                                               "pad_token_id": 8}))
    kv, log = _export(d, "bpe")
    assert kv[_ADD_BOS].value is False  # ByteLevel post-processor says no BOS
    assert kv[_ADD_SEP].value is True   # nothing else set it
    assert any("add_bos_token=true conflicts" in line for line in log)
    assert (kv[_EOS].value, kv[_UNK].value, kv[_PAD].value, kv[_BOS].value) == \
        (50256, 50256, 50256, 7)
    keys = list(kv)
    assert keys.index(_PAD) < keys.index(_BOS)  # tokenizer_config ids first, then config.json


def test_chat_template_files(gpt2_dir, tmp_path):
    d = _gpt2_copy(gpt2_dir, tmp_path)
    (d / "chat_template.jinja").write_text("{{ default }}", encoding="utf-8")
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool-use.jinja").write_text("{{ tools }}")
    (d / "additional_chat_templates" / "rag.jinja").write_text("{{ docs }}")
    kv, _ = _export(d, "bpe")
    keys = list(kv)
    assert keys[-4:] == ["tokenizer.chat_template.rag", "tokenizer.chat_template.tool_use",
                         "tokenizer.chat_templates", _CHAT]
    assert kv["tokenizer.chat_templates"].value == ["rag", "tool_use"]
    assert kv["tokenizer.chat_templates"].sub_type == T.STRING
    assert kv[_CHAT].value == "{{ default }}"

    # tokenizer_config's own template wins over the files; an empty one is not written
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ tc }}"}))
    assert _export(d, "bpe")[0][_CHAT].value == "{{ tc }}"
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": ""}))
    assert _CHAT not in _export(d, "bpe")[0]


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(QtoolError, match="no tokenizer.model or tokenizer.json"):
        _export(tmp_path, "bpe")
    with pytest.raises(QtoolError, match="no tokenizer.model or tokenizer.json"):
        _export(tmp_path, "llama")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(QtoolError, match="cannot read"):
        _export(tmp_path, "bpe")


def test_bad_kind(gpt2_dir):
    with pytest.raises(ValueError):
        export_vocab(gpt2_dir, {}, "wordpiece")


# --------------------------------------------------------------------------------------------
# interop: llama.cpp's own set_vocab on the same directories
# --------------------------------------------------------------------------------------------

# Runs LlamaModel / Qwen2Model / BaichuanModel.set_vocab from the vendored llama.cpp tree on a
# bare model object (no weights needed) and prints every KV pair it wrote as JSON.
_HARNESS = textwrap.dedent('''
    import json, logging, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    logging.disable(logging.WARNING)
    import gguf
    from conversion.llama import LlamaModel
    from conversion.qwen import Qwen2Model
    from conversion.baichuan import BaichuanModel
    classes = {"llama": LlamaModel, "bpe": Qwen2Model, "spm": BaichuanModel}
    out = {}
    for spec in sys.argv[2:]:
        kind, d = spec.split("=", 1)
        cls = classes[kind]
        m = object.__new__(cls)
        m.dir_model = Path(d)
        m.hparams = json.loads((Path(d) / "config.json").read_text())
        m.gguf_writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[cls.model_arch])
        m.is_mistral_format = False
        m.origin_hf_arch = None
        m.target_model_dir = None
        try:
            m.set_vocab()
        except Exception as e:
            out[d] = {"error": f"{type(e).__name__}: {e}"}
            continue
        kvs = []
        for k, v in m.gguf_writer.kv_data[0].items():
            if k == "general.architecture":
                continue
            val, sub = v.value, v.sub_type
            if v.type == gguf.GGUFValueType.ARRAY:
                sub = sub if sub is not None else gguf.GGUFValueType.get_type(val[0])
                val = [x.decode() if isinstance(x, (bytes, bytearray)) else
                       (int(x) if isinstance(x, int) and not isinstance(x, bool) else x)
                       for x in val]
            kvs.append([k, int(v.type), None if sub is None else int(sub), val])
        out[d] = {"kv": kvs}
    print(json.dumps(out))
''')


@pytest.mark.interop
@pytest.mark.slow
def test_llamacpp_set_vocab_interop(exported, tmp_path):
    from tests.llamacpp import converter_env, interop_available, llamacpp_dir

    if not interop_available():
        unavailable("llama.cpp tree or torch/transformers missing")
    cases: dict[str, tuple[str, Path, set[str]]] = {}  # name -> (kind, dir, qtool-only diffs)
    for vocab in VOCABS:
        diffs = {_SPACE} if vocab == "baichuan" else set()
        cases[vocab] = (KIND[vocab], exported[vocab][0], diffs)

    def case(name: str, vocab: str, kind: str, hparams: dict | None = None,
             diffs: set[str] = frozenset(), **opts) -> Path:
        d = _write_model(vocab, tmp_path / name, hparams, **opts)
        cases[name] = (kind, d, set(diffs))
        return d

    d = case("llama-hf", "llama-spm", "llama")
    (d / "tokenizer.model").unlink()
    case("spm-user-defined", "llama-spm", "llama", {"vocab_size": 32002},
         diffs={_TT}, user_defined=["<tool>", "\u2581qtool"])
    d = case("spm-added", "llama-spm", "llama", {"vocab_size": 32001, "bos_token_id": 1},
             added_tokens_decoder=True, chat_template="{{ x }}")
    (d / "added_tokens.json").write_text(json.dumps({"<extra>": 32000}))
    case("codellama", "llama-spm", "llama", {"vocab_size": 32016}, diffs={_TT},
         user_defined=[f"<code{i}>" for i in range(16)])
    case("llama-prefix-space", "baichuan", "llama", tokenizer_config={"add_prefix_space": True})
    d = case("gpt2-variants", "gpt-2", "bpe", {"vocab_size": 50262}, merges_format="string",
             user_defined=["<x\u2581y>", "<|tool|>"])
    (d / "chat_template.jinja").write_text("{{ default }}")
    # tokenizer_config add_bos_token=false against a BOS template: the chkhsh still includes
    # the BOS (transformers 5 keeps tokenizer.json's post-processor for PreTrainedTokenizerFast)
    # and the post-processor wins the add_bos flag
    case("llama3-add-bos-false", "llama-bpe", "llama", tokenizer_config={"add_bos_token": False})

    tree = llamacpp_dir()
    specs = [f"{kind}={d}" for kind, d, _ in cases.values()]
    r = subprocess.run([sys.executable, "-c", _HARNESS, str(tree), *specs],
                       env=converter_env(tree), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])

    for name, (kind, d, diffs) in cases.items():
        theirs = ref[str(d)]
        assert "error" not in theirs, (name, theirs)
        theirs = {k: (t, s, v) for k, t, s, v in theirs["kv"]}
        hparams = json.loads((d / "config.json").read_text())
        kvs, _ = export_vocab(d, hparams, kind)
        ours = {kv.key: (int(kv.type), None if kv.sub_type is None else int(kv.sub_type),
                         kv.value) for kv in kvs}
        assert [k for k in ours if k not in diffs] == [k for k in theirs if k not in diffs], name
        for key, value in ours.items():
            if key in diffs:
                continue
            assert value == theirs[key], (name, key)
        if _TT in diffs:  # USER_DEFINED pieces: qtool 4, llama.cpp 1; everything else equal
            changed = [(a, b) for a, b in zip(theirs[_TT][2], ours[_TT][2]) if a != b]
            assert changed and set(changed) == {(1, 4)}, name
