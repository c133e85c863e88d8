"""HF tokenizer files -> GGUF tokenizer metadata, as llama.cpp's convert_hf_to_gguf.py writes it.

``export_vocab(model_dir, hparams, kind, pre=None)`` returns the ``tokenizer.*`` KV pairs in
llama.cpp's write order and with llama.cpp's GGUF value types, plus human-readable log lines.

It reproduces these llama.cpp code paths (``conversion/base.py``, ``conversion/llama.py``,
``gguf-py/gguf/vocab.py``) without transformers or torch:

* ``TextModel._set_vocab_sentencepiece`` (``tokenizer.model``): Llama-2, Baichuan, and any
  Llama/Qwen2 checkpoint that ships a ``tokenizer.model``;
* ``TextModel._set_vocab_llama_hf`` (``gguf.LlamaHfVocab``): a Llama whose SentencePiece vocab
  only exists as a byte-fallback BPE ``tokenizer.json``;
* ``TextModel._set_vocab_gpt2`` / ``get_vocab_base`` (byte-level BPE ``tokenizer.json``):
  Llama-3, SmolLM, Qwen1.5/2/2.5/3 - transformers' ``AutoTokenizer`` view of the files is
  rebuilt with the ``tokenizers`` library;
* ``gguf.SpecialVocab``: merges, special token ids, add_bos/add_eos/add_sep, chat template,
  normalizer flags - including its precedence rules (tokenizer.json post-processor over
  tokenizer_config.json over config.json, first value wins, insertion order = write order).

Deliberate differences from llama.cpp (it is wrong here; see also ``export_vocab``):

* SentencePiece ``normalizer_spec.add_dummy_prefix == False`` (Baichuan2-style) is written as
  ``tokenizer.ggml.add_space_prefix = false``; llama.cpp ignores the proto and its runtime then
  prepends a space HF never adds. Position: right after ``tokenizer.ggml.token_type`` (before the
  SpecialVocab keys), where llama.cpp's own InternLM/T5 converters put the proto-derived key.
  The same applies to an SPM-in-tokenizer.json vocab whose normalizer/pre-tokenizer adds no "▁".
  A ``tokenizer_config.json`` ``add_prefix_space`` (which llama.cpp writes first, Llama path)
  still wins. Nothing is written when the prefix is added, so ordinary Llama-2 tokenizers give
  exactly llama.cpp's keys.
* USER_DEFINED sentencepiece pieces keep token type USER_DEFINED (4); llama.cpp writes NORMAL,
  so its runtime does not split them out of the text like sentencepiece does.
* The BPE pre-tokenizer is identified from what tokenizer.json declares (normalizer,
  pre-tokenizer steps, regexes, whether the post-processor adds BOS); llama.cpp's chkhsh is
  computed as a cross-check. An unrecognised pre-tokenizer is an error naming what was found
  (``pre=`` overrides), never a silent fallback.
* With several named chat templates, ``tokenizer.chat_templates`` lists the names sorted
  (llama.cpp iterates a Python set, so its order changes between runs).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from gguf import GGUFValueType

from qtool.errors import QtoolError
from qtool.gguf_io import KV

__all__ = ["export_vocab", "CHKTXT", "KNOWN_CHKHSH", "RUNTIME_PRE_NAMES"]


# gguf TokenType / sentencepiece piece type values (identical numbering)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_K_MODEL = "tokenizer.ggml.model"
_K_PRE = "tokenizer.ggml.pre"
_K_TOKENS = "tokenizer.ggml.tokens"
_K_SCORES = "tokenizer.ggml.scores"
_K_TYPES = "tokenizer.ggml.token_type"
_K_MERGES = "tokenizer.ggml.merges"
_K_ADD_PREFIX = "tokenizer.ggml.add_space_prefix"
_K_CHAT = "tokenizer.chat_template"
# SpecialVocab type -> key, for the types GGUFWriter has an add_{type}_token_id method for
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic
    "pad": "tokenizer.ggml.padding_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
    "eot": "tokenizer.ggml.eot_token_id",
    "eom": "tokenizer.ggml.eom_token_id",
}
# ... and the add_{type} flags GGUFWriter has an add_add_{type}_token method for
_ADD_KEYS = {
    "bos": "tokenizer.ggml.add_bos_token",
    "eos": "tokenizer.ggml.add_eos_token",
    "sep": "tokenizer.ggml.add_sep_token",
}
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

#: The text llama.cpp hashes to identify a BPE pre-tokenizer (``get_vocab_base_pre``).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: llama.cpp's chkhsh -> pre name, for the pre-tokenizer families this module identifies
#: (entries copied from get_vocab_base_pre; none of these hashes is duplicated there).
KNOWN_CHKHSH = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama-3
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # no BOS
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-3
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embed
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",  # Qwen3.5
    "1444df51289cfa8063b96f0e62b1125440111bc79a52003ea14b6eac7016fd5f": "qwen35",  # MiniCPM-V-4.6
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
}

#: Every tokenizer.ggml.pre string llama.cpp's runtime accepts (llama_vocab::impl::load);
#: anything else makes the GGUF unloadable, so ``pre=`` is checked against it.
RUNTIME_PRE_NAMES = frozenset("""
    default minicpm5 llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2
    jina-v5-nano deepseek-llm deepseek-coder deepseek-v3 spark2_5 youtu falcon mpt starcoder
    gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert jais-2
    gemma4 granite-embed-multi-311m sarvam-moe jina-v1-en jina-v2-code roberta-bpe whitespace
    refact command-r qwen2 deepseek-r1-qwen kormo f2llmv2 qwen35 stablelm2 olmo dbrx smaug-bpe
    poro-chat chatglm-bpe glm4 glm5 viking jais tekken smollm codeshell bloom gpt3-finnish exaone
    exaone4 exaone-moe chameleon minerva-7b megrez gpt-4o llama4 kanana2 talkie
    granite-embed-multi-97m tiny_aya cohere2moe superbpe trillion granite-docling bailingmoe
    bailingmoe2 llada-moe seed-coder hunyuan hunyuan-dense hy_v4 joyai-llm kimi-k2 ufakzeka grok-2
    afmoe laguna minimax-m2 solar-open mellum2
""".split())

# Names whose runtime pre-tokenization is identical (same regex list; smollm/starcoder/refact
# differ only in detokenizer space clean-up). When the structural name and llama.cpp's chkhsh name
# fall in one group, llama.cpp's name is written so the file matches its converter byte for byte.
_SAME_RUNTIME = (
    frozenset({"qwen2", "deepseek-r1-qwen"}),
    frozenset({"smollm", "starcoder", "refact"}),
)

# Pre-tokenizer regexes as tokenizer.json files spell them (and llama.cpp's case-folded
# rewrite of the contractions group, in case a file was written from it).
_CONTRACTIONS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)",
                 r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])")
_LLAMA3_TAIL = (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_TAIL = (r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen3.5: combining marks (\p{M}) inside the letter runs and out of the punctuation runs
_QWEN35_TAIL = (r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEXES = frozenset(c + _LLAMA3_TAIL for c in _CONTRACTIONS)
_QWEN2_REGEXES = frozenset(c + _QWEN2_TAIL for c in _CONTRACTIONS)
_QWEN35_REGEXES = frozenset(c + _QWEN35_TAIL for c in _CONTRACTIONS)


# --------------------------------------------------------------------------------------------
# KV collection with GGUFWriter semantics
# --------------------------------------------------------------------------------------------

class _KVs:
    """Ordered KV pairs with GGUFWriter's rules: re-adding a key replaces the value but keeps the
    key's position; empty strings and empty arrays are not written."""

    def __init__(self) -> None:
        self.items: dict[str, KV] = {}

    def put(self, key: str, value: Any, vtype: GGUFValueType,
            sub_type: GGUFValueType | None = None) -> None:
        self.items[key] = KV(key, value, vtype, sub_type)

    def string(self, key: str, value: str) -> None:
        if value:
            self.put(key, value, GGUFValueType.STRING)

    def array(self, key: str, values: list[Any], sub_type: GGUFValueType) -> None:
        if len(values):
            self.put(key, values, GGUFValueType.ARRAY, sub_type)

    def u32(self, key: str, value: int) -> None:
        self.put(key, int(value), GGUFValueType.UINT32)

    def boolean(self, key: str, value: Any) -> None:
        self.put(key, bool(value), GGUFValueType.BOOL)


class _Ctx:
    """Per-export state: the model dir, parsed files and the log."""

    def __init__(self, model_dir: Path, hparams: dict[str, Any]) -> None:
        self.dir = model_dir
        self.hparams = hparams
        self.log: list[str] = []
        self.kvs = _KVs()
        self._json_cache: dict[str, Any] = {}

    def json_file(self, name: str) -> Any:
        """Parsed JSON file in the model dir, or None if it does not exist."""
        if name not in self._json_cache:
            path = self.dir / name
            if not path.is_file():
                self._json_cache[name] = None
            else:
                try:
                    self._json_cache[name] = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise QtoolError(f"cannot read {path}: {e}") from e
        return self._json_cache[name]

    @property
    def tokenizer_config(self) -> dict[str, Any] | None:
        return self.json_file("tokenizer_config.json")


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------

def export_vocab(
    model_dir: Path, hparams: dict, kind: str, pre: str | None = None
) -> tuple[list[KV], list[str]]:
    """Tokenizer KV pairs for the GGUF of the checkpoint in ``model_dir``, and log lines.

    hparams: the raw config.json dict (``vocab_size``, ``*_token_id`` ...), standing in for the
             config.json llama.cpp's SpecialVocab reads.
    kind:    "llama" - LlamaModel.set_vocab: tokenizer_config ``add_prefix_space`` first, then
                       SentencePiece if tokenizer.model exists, else the SPM-in-tokenizer.json
                       (LlamaHfVocab) path if the tokenizer.json is one, else byte-level BPE;
                       plus the CodeLlama (vocab 32016) and small-Granite/SmolLM (vocab 49152)
                       adjustments;
             "bpe"   - Qwen2/Qwen3: SentencePiece if tokenizer.model exists, else BPE;
             "spm"   - Baichuan: SentencePiece only;
             "gpt2"  - Qwen2-MoE/Qwen3-MoE (TextModel.set_vocab): BPE only, a tokenizer.model is ignored.
    pre:     tokenizer.ggml.pre to write for a BPE vocab instead of the detected one.

    Returns (KV pairs in llama.cpp's write order, log lines). Raises QtoolError for anything the
    user has to act on (missing/unreadable files, unrecognised pre-tokenizer, ...).
    """
    if kind not in ("llama", "bpe", "spm", "gpt2"):
        raise ValueError(f"kind must be 'llama', 'bpe', 'spm' or 'gpt2', got {kind!r}")
    if pre is not None and pre not in RUNTIME_PRE_NAMES:
        raise QtoolError(f"--pre {pre!r} is not a pre-tokenizer llama.cpp knows "
                         f"(e.g. llama-bpe, qwen2, smollm, gpt-2, smaug-bpe, default)")
    ctx = _Ctx(Path(model_dir), dict(hparams or {}))
    has_spm = (ctx.dir / "tokenizer.model").is_file()
    has_json = (ctx.dir / "tokenizer.json").is_file()

    if kind == "spm":
        if not has_spm:
            raise QtoolError(f"{ctx.dir}: no tokenizer.model (this architecture needs a "
                             f"SentencePiece tokenizer)")
        _spm_vocab(ctx, pre)
    elif kind == "gpt2":
        _bpe_vocab(ctx, pre)
    elif kind == "bpe":
        if has_spm:
            _spm_vocab(ctx, pre)
        else:
            _bpe_vocab(ctx, pre)
    else:
        _llama_vocab(ctx, pre, has_spm, has_json)
    return list(ctx.kvs.items.values()), ctx.log


def _llama_vocab(ctx: _Ctx, pre: str | None, has_spm: bool, has_json: bool) -> None:
    if (ctx.dir / "tekken.json").is_file() and not has_json:
        raise QtoolError(f"{ctx.dir}: Mistral tekken.json tokenizers are not supported")
    tc = ctx.tokenizer_config
    if isinstance(tc, dict):
        if (add_prefix_space := tc.get("add_prefix_space")) is not None:
            ctx.kvs.boolean(_K_ADD_PREFIX, add_prefix_space)
            ctx.log.append(f"add_space_prefix={_js(add_prefix_space)} from tokenizer_config.json "
                           f"add_prefix_space")
        if tc.get("tokenizer_class") == "HybridDNATokenizer":
            raise QtoolError("HybridDNATokenizer (remote-code DNA tokenizer) is not supported")

    if has_spm:
        _spm_vocab(ctx, pre)
    elif has_json and _is_llama_hf_vocab(ctx):
        _llama_hf_vocab(ctx, pre)
    else:
        _bpe_vocab(ctx, pre)

    vocab_size = ctx.hparams.get("vocab_size", 32000)
    if vocab_size == 32016:
        # CodeLlama: llama.cpp runs SpecialVocab again for the infill tokens; GGUFWriter only
        # knows an id key for "eot", the prefix/suffix/middle ids are dropped.
        sv = _SpecialVocab(ctx, load_merges=False, types=("prefix", "suffix", "middle", "eot"))
        for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            sv.set_special_token(typ, tid)
        sv.write()
        ctx.log.append("CodeLlama vocab (32016): eot token 32010 as llama.cpp sets it")
    if vocab_size == 49152:
        # llama.cpp's "granite small models" rule; SmolLM has the same vocab size and gets it too
        ctx.kvs.boolean(_ADD_KEYS["bos"], False)
        ctx.log.append("vocab_size 49152 (Granite-small/SmolLM): add_bos_token=false, as llama.cpp")


def _js(v: Any) -> str:
    return json.dumps(v)


# --------------------------------------------------------------------------------------------
# SentencePiece (tokenizer.model)
# --------------------------------------------------------------------------------------------

def does_token_look_special(text: str) -> bool:
    """llama.cpp's TextModel.does_token_look_special: added tokens some models forget to mark
    as special."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _vocab_size_hparam(ctx: _Ctx) -> Any:
    # find_hparam(["vocab_size_per_layer_input", "vocab_size"], optional=True): first key present
    for key in ("vocab_size_per_layer_input", "vocab_size"):
        if key in ctx.hparams:
            return ctx.hparams[key]
    return None


def _check_spm_pre(pre: str | None) -> None:
    if pre not in (None, "default"):
        raise QtoolError(f"--pre {pre} applies to BPE tokenizers only; this checkpoint has a "
                         f"SentencePiece vocab (pre-tokenizer 'default')")


def _spm_vocab(ctx: _Ctx, pre: str | None) -> None:
    """TextModel._set_vocab_sentencepiece / _create_vocab_sentencepiece."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    _check_spm_pre(pre)
    path = ctx.dir / "tokenizer.model"
    raw = path.read_bytes()
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(raw)
        proto = sp_pb2.ModelProto.FromString(raw)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError, protobuf DecodeError
        raise QtoolError(f"cannot load {path}: {e}") from e

    n_sp = sp.vocab_size()
    vocab_size = _vocab_size_hparam(ctx) or n_sp
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [UNUSED] * vocab_size

    n_user = 0
    if n_sp > vocab_size:
        ctx.log.append(f"tokenizer.model has {n_sp} pieces, vocab_size is {vocab_size}: "
                       f"pieces from id {vocab_size} ignored")
    for i in range(min(n_sp, vocab_size)):
        tokens[i] = sp.IdToPiece(i)
        scores[i] = sp.GetScore(i)
        if sp.IsUnknown(i):
            types[i] = UNKNOWN
        elif sp.IsControl(i):
            types[i] = CONTROL
        elif sp.IsUnused(i):
            types[i] = UNUSED
        elif sp.IsByte(i):
            types[i] = BYTE
        elif proto.pieces[i].type == USER_DEFINED:
            # llama.cpp writes NORMAL here; USER_DEFINED makes its runtime match the piece
            # verbatim in raw text, as sentencepiece itself does
            types[i] = USER_DEFINED
            n_user += 1
        else:
            types[i] = NORMAL
    if n_sp < vocab_size:
        ctx.log.append(f"vocab_size {vocab_size} > {n_sp} sentencepiece pieces: "
                       f"{vocab_size - n_sp} [PAD{{i}}] tokens added")
    if n_user:
        ctx.log.append(f"{n_user} USER_DEFINED sentencepiece piece(s) kept as USER_DEFINED "
                       f"(llama.cpp would write NORMAL)")

    added = ctx.json_file("added_tokens.json")
    if isinstance(added, dict):
        for text, tid in added.items():
            if tid >= vocab_size:
                ctx.log.append(f"added_tokens.json: {text!r} id {tid} out of range, ignored")
                continue
            tokens[tid], scores[tid], types[tid] = text, -1000.0, USER_DEFINED

    tc = ctx.tokenizer_config
    if isinstance(tc, dict):
        for sid, data in (tc.get("added_tokens_decoder") or {}).items():
            tid = int(sid)
            text = data["content"]
            if tid >= vocab_size:
                ctx.log.append(f"added_tokens_decoder: {text!r} id {tid} out of range, ignored")
                continue
            if types[tid] != UNUSED and tokens[tid] != text:
                ctx.log.append(f"added_tokens_decoder replaces token {tid}: "
                               f"{tokens[tid]!r} -> {text!r}")
            if data.get("special") or does_token_look_special(text):
                types[tid] = CONTROL
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces
                types[tid] = USER_DEFINED
            scores[tid] = -1000.0
            tokens[tid] = text

    _write_spm_arrays(ctx, tokens, scores, types)
    ctx.log.append(f"SentencePiece vocab from tokenizer.model: {vocab_size} tokens, "
                   f"pre-tokenizer: default")

    if not proto.normalizer_spec.add_dummy_prefix:
        _write_no_space_prefix(ctx, "tokenizer.model normalizer_spec (add_dummy_prefix=false)")

    _SpecialVocab(ctx, load_merges=False, n_vocab=len(tokens)).write()


def _write_no_space_prefix(ctx: _Ctx, source: str) -> None:
    """Record that the tokenizer adds no leading "▁" (llama.cpp's SPM runtime default is to add
    one). A value already written from tokenizer_config.json add_prefix_space wins."""
    existing = ctx.kvs.items.get(_K_ADD_PREFIX)
    if existing is None:
        ctx.kvs.boolean(_K_ADD_PREFIX, False)
        ctx.log.append(f"add_space_prefix=false from {source}")
    elif existing.value:
        ctx.log.append(f"add_space_prefix=true kept from tokenizer_config.json add_prefix_space "
                       f"although {source} says no prefix")


# --------------------------------------------------------------------------------------------
# SPM re-exported as byte-fallback BPE tokenizer.json (gguf.LlamaHfVocab)
# --------------------------------------------------------------------------------------------

def _tokenizer_json(ctx: _Ctx) -> dict[str, Any]:
    tj = ctx.json_file("tokenizer.json")
    if not isinstance(tj, dict) or not isinstance(tj.get("model"), dict):
        raise QtoolError(f"{ctx.dir / 'tokenizer.json'}: not a HF tokenizers file")
    return tj


def _is_llama_hf_vocab(ctx: _Ctx) -> bool:
    """Whether LlamaHfVocab accepts tokenizer.json (else llama.cpp falls through to BPE)."""
    tj = _tokenizer_json(ctx)
    model = tj["model"]
    if (model.get("type") == "BPE" and model.get("ignore_merges", False)
            and not model.get("byte_fallback", True)):
        return False  # Llama-3 style
    decoder = tj.get("decoder")
    if not isinstance(decoder, dict):
        return False  # llama.cpp: TypeError subscripting None -> BPE path
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback", False))
            and decoder.get("type") == "Sequence")


def _llama_hf_vocab(ctx: _Ctx, pre: str | None) -> None:
    """TextModel._set_vocab_llama_hf: ids below the base vocab size, then added tokens above it;
    no [PAD] filling, every score -1000."""
    _check_spm_pre(pre)
    hf = _HfTokenizer(ctx)
    base = hf.tok.get_vocab_size(with_added_tokens=False)
    added = sorted(((i, t) for t, i in hf.added_vocab.items() if i >= base))
    added_ids = {i for i, _ in added}
    specials = hf.all_special_tokens()
    vocab = hf.vocab
    special_ids = set()
    for s in specials:
        if s not in vocab:
            raise QtoolError(f"special token {s!r} from tokenizer_config.json is not in the vocab")
        special_ids.add(vocab[s])
    reverse = {i: t for t, i in vocab.items()}
    byte_re = re.compile(r"<0x[0-9A-Fa-f]{2}>")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(base):
        if i in added_ids:
            continue
        text = reverse[i]
        tokens.append(text)
        types.append(BYTE if byte_re.fullmatch(text)
                     else CONTROL if i in special_ids else NORMAL)
    for _, text in added:
        tokens.append(text)
        types.append(CONTROL if text in specials else USER_DEFINED)
    scores = [-1000.0] * len(tokens)

    _write_spm_arrays(ctx, tokens, scores, types)
    ctx.log.append(f"SentencePiece-style vocab from tokenizer.json (byte-fallback BPE): "
                   f"{len(tokens)} tokens, pre-tokenizer: default")
    if _hf_spm_adds_prefix(hf.tj) is False:
        _write_no_space_prefix(ctx, "tokenizer.json (no '▁' prepend in normalizer/pre-tokenizer)")
    _SpecialVocab(ctx, load_merges=False, n_vocab=len(tokens)).write()


def _hf_spm_adds_prefix(tj: dict[str, Any]) -> bool | None:
    """Whether an SPM-style tokenizer.json prepends "▁" to the text (None: cannot tell)."""
    for node in _flatten(tj.get("normalizer"), "normalizers"):
        if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
            return True
    pre_steps = _flatten(tj.get("pre_tokenizer"), "pretokenizers")
    for node in pre_steps:
        if node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.14 spelling
                return bool(node.get("add_prefix_space", True))
            return scheme != "never"
    if tj.get("normalizer") is None and not pre_steps:
        return None
    return False


# --------------------------------------------------------------------------------------------
# byte-level BPE (tokenizer.json)
# --------------------------------------------------------------------------------------------

class _HfTokenizer:
    """What transformers' AutoTokenizer (5.x, fast backend) makes of tokenizer.json +
    tokenizer_config.json + special_tokens_map.json, built with the ``tokenizers`` library."""

    def __init__(self, ctx: _Ctx) -> None:
        from tokenizers import AddedToken, Tokenizer

        self.tj = _tokenizer_json(ctx)
        path = ctx.dir / "tokenizer.json"
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise QtoolError(f"cannot load {path}: {e}") from e
        tc = ctx.tokenizer_config
        self.config: dict[str, Any] = dict(tc) if isinstance(tc, dict) else {}
        stm = ctx.json_file("special_tokens_map.json")
        if isinstance(stm, dict):
            for k, v in stm.items():
                self.config.setdefault(k, v)

        # transformers adds tokenizer_config's added_tokens_decoder entries and the named special
        # tokens (bos_token, ...) that tokenizer.json lacks as added tokens; ids stay those of the
        # vocab when the text is in it
        have = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        to_add = []
        decoder_cfg = self.config.get("added_tokens_decoder") or {}
        for _, data in sorted(decoder_cfg.items(), key=lambda kv: int(kv[0])):
            if isinstance(data, dict) and data.get("content") not in have:
                to_add.append(AddedToken(
                    data["content"], single_word=data.get("single_word", False),
                    lstrip=data.get("lstrip", False), rstrip=data.get("rstrip", False),
                    normalized=data.get("normalized", not data.get("special", False)),
                    special=data.get("special", False)))
                have.add(data["content"])
        for text in self.all_special_tokens():
            if text not in have:
                to_add.append(AddedToken(text, special=True, normalized=False))
                have.add(text)
        if to_add:
            self.tok.add_tokens(to_add)

        self.vocab: dict[str, int] = self.tok.get_vocab(with_added_tokens=True)
        self.added_decoder = self.tok.get_added_tokens_decoder()
        self.added_vocab = {t.content: i for i, t in sorted(self.added_decoder.items())}

    def _token_text(self, value: Any) -> str | None:
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            return value["content"]
        return None

    def all_special_tokens(self) -> list[str]:
        """transformers' all_special_tokens: named special tokens, then the extra ones."""
        out: list[str] = []
        for attr in _SPECIAL_TYPES:
            text = self._token_text(self.config.get(f"{attr}_token"))
            if text is not None and text not in out:
                out.append(text)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            extra = self.config.get(key)
            if isinstance(extra, dict):
                extra = list(extra.values())
            for value in extra or ():
                text = self._token_text(value)
                if text is not None and text not in out:
                    out.append(text)
        return out

    def encode_like_hf(self, text: str) -> list[int]:
        """``AutoTokenizer.encode(text)`` (add_special_tokens=True): tokenizer.json's own
        post-processor decides about BOS/EOS. (transformers 5 ignores tokenizer_config's
        add_bos_token/add_eos_token for a PreTrainedTokenizerFast; checked against llama.cpp's
        converter in the interop test.)"""
        return self.tok.encode(text).ids

    def adds_bos(self) -> bool:
        """Whether encoding puts a special token (the BOS) in front of the text."""
        with_special = self.encode_like_hf("a")
        plain = self.tok.encode("a", add_special_tokens=False).ids
        return len(with_special) > len(plain) and with_special[1:len(plain) + 1] == plain


def _bpe_vocab(ctx: _Ctx, pre: str | None) -> None:
    """TextModel._set_vocab_gpt2 (get_vocab_base + get_vocab_base_pre)."""
    if not (ctx.dir / "tokenizer.json").is_file():
        raise QtoolError(f"{ctx.dir}: no tokenizer.model or tokenizer.json (vocab.json/merges.txt "
                         f"-only tokenizers are not supported)")
    hf = _HfTokenizer(ctx)
    vocab_size = ctx.hparams.get("vocab_size")
    if vocab_size is None:
        vocab_size = len(hf.vocab)
    if max(hf.vocab.values()) >= vocab_size:
        raise QtoolError(f"tokenizer has token id {max(hf.vocab.values())} but config.json "
                         f"vocab_size is {vocab_size}")
    pre_name = _identify_pre(ctx, hf, pre)

    reverse = {i: t for t, i in hf.vocab.items()}
    tokens: list[str] = []
    types: list[int] = []
    n_pad = 0
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            n_pad += 1
            continue
        if text in hf.added_vocab:
            info = hf.added_decoder.get(i)
            if info is None:  # the text is an added token under another id
                info = hf.added_decoder[hf.added_vocab[text]]
            if not info.normalized:
                # llama.cpp's runtime assumes added tokens are pre-normalized
                ids = hf.tok.encode(text, add_special_tokens=False).ids
                round_trip = hf.tok.decode(ids, skip_special_tokens=False)
                if round_trip != text:
                    ctx.log.append(f"added token {text!r} encodes and decodes back to "
                                   f"{round_trip!r}")
                text = round_trip
            if info.special or does_token_look_special(text):
                types.append(CONTROL)
            else:
                text = text.replace("\u2581", " ")  # pre-normalize user-defined spaces (Gemma)
                types.append(USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(text)

    kvs = ctx.kvs
    kvs.string(_K_MODEL, "gpt2")
    kvs.string(_K_PRE, pre_name)
    kvs.array(_K_TOKENS, tokens, GGUFValueType.STRING)
    kvs.array(_K_TYPES, types, GGUFValueType.INT32)
    ctx.log.append(f"BPE vocab from tokenizer.json: {vocab_size} tokens"
                   + (f" ({n_pad} [PAD{{i}}] fillers up to config vocab_size)" if n_pad else ""))
    _SpecialVocab(ctx, load_merges=True).write()


# --------------------------------------------------------------------------------------------
# pre-tokenizer identification
# --------------------------------------------------------------------------------------------

def _flatten(node: Any, list_key: str) -> list[dict[str, Any]]:
    """The steps of a (possibly nested) tokenizers Sequence."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        return [s for sub in node.get(list_key) or () for s in _flatten(sub, list_key)]
    return [node]


def _short(s: str, n: int = 60) -> str:
    return repr(s[:n] + ("…" if len(s) > n else ""))


def _describe(steps: list[dict[str, Any]]) -> str:
    parts = []
    for s in steps:
        t = s.get("type")
        if t == "Split":
            pat = s.get("pattern") or {}
            what = (f"regex={_short(pat['Regex'])}" if "Regex" in pat
                    else f"string={_short(str(pat.get('String')))}")
            parts.append(f"Split({what}, behavior={s.get('behavior')}, "
                         f"invert={_js(s.get('invert'))})")
        elif t == "ByteLevel":
            parts.append(f"ByteLevel(add_prefix_space={_js(s.get('add_prefix_space'))}, "
                         f"use_regex={_js(s.get('use_regex', True))})")
        elif t == "Digits":
            parts.append(f"Digits(individual_digits={_js(s.get('individual_digits'))})")
        else:
            parts.append(str(t))
    return "[" + ", ".join(parts) + "]" if parts else "none"


def _structural_pre(hf: _HfTokenizer) -> tuple[str | None, str]:
    """Name of the llama.cpp pre-tokenizer that tokenizer.json declares, and a description."""
    tj = hf.tj
    norm = _flatten(tj.get("normalizer"), "normalizers")
    steps = _flatten(tj.get("pre_tokenizer"), "pretokenizers")
    desc = f"pre_tokenizer {_describe(steps)}, normalizer {_describe(norm)}"

    # NFC is harmless: llama.cpp does not normalize, and none of the reference texts change
    if any(n.get("type") != "NFC" for n in norm):
        return None, desc

    def split_with(step: dict[str, Any], regexes: frozenset[str]) -> bool:
        return (step.get("type") == "Split" and (step.get("pattern") or {}).get("Regex") in regexes
                and step.get("behavior") == "Isolated" and not step.get("invert", False))

    def byte_level(step: dict[str, Any], use_regex: bool) -> bool:
        return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
                and bool(step.get("use_regex", True)) == use_regex)

    if len(steps) == 2 and byte_level(steps[1], use_regex=False):
        if split_with(steps[0], _LLAMA3_REGEXES):
            # Smaug-Llama-3 is the Llama-3 tokenizer without the BOS template; llama.cpp's
            # runtime treats it differently (no ignore_merges, no BOS by default)
            return ("llama-bpe" if hf.adds_bos() else "smaug-bpe"), desc
        if split_with(steps[0], _QWEN2_REGEXES):
            return "qwen2", desc
        if split_with(steps[0], _QWEN35_REGEXES):
            return "qwen35", desc
    if len(steps) == 1 and byte_level(steps[0], use_regex=True):
        return "gpt-2", desc
    if (len(steps) == 2 and steps[0].get("type") == "Digits"
            and steps[0].get("individual_digits") and byte_level(steps[1], use_regex=True)):
        # SmolLM/SmolLM2 (and StarCoder2): every digit isolated, then the GPT-2 regex, which is
        # llama.cpp's SMOLLM regex list
        return "smollm", desc
    return None, desc


def _chkhsh(hf: _HfTokenizer) -> str:
    return hashlib.sha256(str(hf.encode_like_hf(CHKTXT)).encode()).hexdigest()


def _identify_pre(ctx: _Ctx, hf: _HfTokenizer, pre: str | None) -> str:
    structural, desc = _structural_pre(hf)
    hsh = _chkhsh(hf)
    by_hash = KNOWN_CHKHSH.get(hsh)
    hash_says = f"= {by_hash}" if by_hash else "not in llama.cpp's table"
    found = f"structure says {structural or 'unrecognised'} ({desc}); chkhsh {hsh} {hash_says}"

    if pre is not None:
        ctx.log.append(f"pre-tokenizer: {pre} (from --pre; {found})")
        return pre
    if structural is not None and (by_hash is None or by_hash == structural):
        note = (f"llama.cpp's chkhsh {hsh} agrees" if by_hash else
                f"chkhsh {hsh} is not in llama.cpp's table, so its converter would refuse "
                f"this tokenizer")
        ctx.log.append(f"pre-tokenizer: {structural} (identified from tokenizer.json; {note})")
        return structural
    if structural is not None:
        if any({structural, by_hash} <= group for group in _SAME_RUNTIME):
            ctx.log.append(f"pre-tokenizer: {by_hash} (llama.cpp's name for chkhsh {hsh}; "
                           f"tokenizer.json declares {structural}, which llama.cpp pre-tokenizes "
                           f"the same way)")
            return by_hash
        raise QtoolError(
            f"BPE pre-tokenizer ambiguous: tokenizer.json looks like {structural!r} ({desc}) but "
            f"llama.cpp's chkhsh {hsh} names {by_hash!r}; pass --pre NAME to choose")
    if by_hash is not None:
        ctx.log.append(f"pre-tokenizer: {by_hash} (from llama.cpp's chkhsh {hsh}; the "
                       f"tokenizer.json structure is not one qtool knows: {desc})")
        return by_hash
    raise QtoolError(
        f"BPE pre-tokenizer not recognised: {desc}, chkhsh {hsh}; pass --pre NAME "
        f"(e.g. llama-bpe, qwen2, smollm, gpt-2) if you know which llama.cpp pre-tokenizer "
        f"matches")


# --------------------------------------------------------------------------------------------
# gguf.SpecialVocab
# --------------------------------------------------------------------------------------------

class _SpecialVocab:
    """gguf.SpecialVocab: merges, special ids, add_* flags, chat template, normalizer flags.

    Precedence as llama.cpp: tokenizer.json post-processor sets add flags first (tokenizer_config
    ``add_{type}_token`` only fills unset ones); ids come from tokenizer_config ``{type}_token``
    strings looked up in tokenizer.json added_tokens, then config.json ``{type}_token_id``; the
    first value set wins and dict insertion order is the write order.
    """

    def __init__(self, ctx: _Ctx, *, load_merges: bool, n_vocab: int | None = None,
                 types: tuple[str, ...] = _SPECIAL_TYPES) -> None:
        self.ctx = ctx
        self.load_merges = load_merges
        self.n_vocab = n_vocab
        self.types: tuple[str, ...] = tuple(types)
        self.merges: list[str] = []
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.chat_template: Any = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self._load_from_tokenizer_json()
        self._load_from_config_json()
        if self.load_merges and not self.merges:
            self._load_merges_txt()

    def set_special_token(self, typ: str, tid: Any) -> None:
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise QtoolError(f"invalid id for special token {typ}: {tid}")
        if self.n_vocab is not None and tid >= self.n_vocab:
            self.ctx.log.append(f"special token {typ} id {tid} out of range "
                                f"(vocab {self.n_vocab}), skipped")
            return
        self.ids.setdefault(typ, int(tid))

    # ---- loading ---------------------------------------------------------------------------

    def _load_merges_txt(self) -> None:
        path = self.ctx.dir / "merges.txt"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].strip().startswith("#"):
            lines = lines[1:]
        merges = []
        for n, line in enumerate(lines, 1):
            parts = line.strip().split(None, 3)
            if not parts:
                continue
            if len(parts) != 2:
                self.ctx.log.append(f"merges.txt line {n}: malformed entry ignored")
                continue
            merges.append(f"{parts[0]} {parts[1]}")
        self.merges = merges
        self.ctx.log.append(f"{len(merges)} merges from merges.txt")

    def _parse_merges(self, merges: Any) -> None:
        if not isinstance(merges, list) or not merges:
            return
        first = merges[0]
        if isinstance(first, str):
            self.merges = merges
        elif isinstance(first, list) and len(first) == 2 and isinstance(first[0], str):
            # transformers >= 4.45 pair form; a literal space inside a part is stored as U+0120
            # because the runtime splits entries at the first space
            if any(" " in part for pair in merges for part in pair):
                self.ctx.log.append("spaces inside merges encoded as U+0120")
            self.merges = [" ".join(part.replace(" ", "\u0120") for part in pair)
                           for pair in merges]
        else:
            raise QtoolError("tokenizer.json: unknown model.merges format")

    def _parse_normalizer(self, node: dict[str, Any]) -> None:
        t = node.get("type")
        if t == "Lowercase":
            self.lowercase = True
        elif t == "StripAccents":
            self.strip_accents = True
        elif t == "BertNormalizer":
            if "lowercase" in node:
                self.lowercase = node["lowercase"]
            if "strip_accents" in node:
                self.strip_accents = node["strip_accents"]
        elif t == "Sequence":
            for sub in node.get("normalizers", []):
                self._parse_normalizer(sub)

    def _load_from_tokenizer_json(self) -> None:
        ctx = self.ctx
        tj = ctx.json_file("tokenizer.json")
        added_tokens: list[dict[str, Any]] = []
        if tj is not None:
            if self.load_merges:
                self._parse_merges((tj.get("model") or {}).get("merges"))
                if self.merges:
                    ctx.log.append(f"{len(self.merges)} merges from tokenizer.json")
            if normalizer := tj.get("normalizer"):
                self._parse_normalizer(normalizer)
            added_tokens = tj.get("added_tokens", [])
        tc_file = ctx.tokenizer_config
        # a private copy: the post-processor rules below rewrite entries of it, as llama.cpp does
        tc = json.loads(json.dumps(tc_file)) if tc_file is not None else None
        if tj:
            self._apply_post_processor(tj, tc)
        if not tc:
            return

        template_alt: Any = None
        jinja = ctx.dir / "chat_template.jinja"
        if jinja.is_file():
            template_alt = jinja.read_text(encoding="utf-8")
            extra = sorted((ctx.dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                template_alt = [{"name": "default", "template": template_alt}] + [
                    {"name": p.stem, "template": p.read_text(encoding="utf-8")} for p in extra]
        elif isinstance(ct_json := ctx.json_file("chat_template.json"), dict):
            template_alt = ct_json.get("chat_template")
        template = tc.get("chat_template", template_alt)
        if template is None or isinstance(template, (str, list)):
            self.chat_template = template
        else:
            ctx.log.append("tokenizer_config.json chat_template has a bad type, ignored")

        for typ in self.types:
            flag = tc.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                if typ not in self.add:
                    self.add[typ] = flag
                elif self.add[typ] != flag:
                    ctx.log.append(f"tokenizer_config.json add_{typ}_token={_js(flag)} conflicts "
                                   f"with the tokenizer.json post-processor "
                                   f"({_js(self.add[typ])}); post-processor wins, as llama.cpp")
            entry = tc.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            tid = next((a.get("id") for a in added_tokens if a.get("content") == entry), None)
            self.set_special_token(typ, tid)

    def _apply_post_processor(self, tj: dict[str, Any], tc: dict[str, Any] | None) -> None:
        """SpecialVocab's crude reading of the post-processor (add flags; may rename eos/bos)."""
        log = self.ctx.log
        cfg = tc or {}
        bos, cls = cfg.get("bos_token"), cfg.get("cls_token")
        eos, sep = cfg.get("eos_token"), cfg.get("sep_token")
        if not bos and cls and tc:
            tc["bos_token"] = bos = cls
        if not eos and sep and tc:
            tc["eos_token"] = eos = sep
        post = tj.get("post_processor")
        if not post:
            return
        for proc in post.get("processors", [post]):
            ptype = proc.get("type")
            if ptype == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif ptype == "RobertaProcessing":
                self.add["bos"] = self.add["eos"] = self.add["sep"] = True
                if not cls and tc:
                    tc["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and tc:
                    tc["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif ptype == "TemplateProcessing":
                single = proc.get("single", [])
                pair = proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    if first := single[0].get("SpecialToken", {}).get("id"):
                        if not tc:
                            bos = first
                        elif first not in (bos, cls):
                            if not bos:
                                tc["bos_token"] = bos = first
                            if not cls:
                                tc["cls_token"] = cls = first
                        self.add["bos"] = first in (bos, cls)
                        if first not in (bos, cls):
                            log.append(f"unknown leading special token {first!r} in "
                                       f"TemplateProcessing")
                    if last := single[-1].get("SpecialToken", {}).get("id"):
                        if not tc:
                            eos = last
                        elif last != eos:
                            # the template's last token becomes eos; the old eos moves to eot/eom
                            if "eot" not in self.types:
                                self.types += ("eot",)
                                tc["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types += ("eom",)
                                tc["eom_token"] = eos
                            else:
                                log.append(f"eos {eos!r} overridden by {last!r} without "
                                           f"eot/eom fallback")
                            tc["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    head = pair[0].get("SpecialToken", {}).get("id")
                    tail = pair[-1].get("SpecialToken", {}).get("id")
                    start = 1 if first and head == first else 0
                    stop = -1 if last and tail == last else None
                    if pair := pair[slice(start, stop)]:
                        a = pair[0].get("Sequence", {}).get("id")
                        b = pair[-1].get("Sequence", {}).get("id")
                        # A [sep] [eos] B
                        if a == "A" and b == "B" and (middle := pair[1:-1]):
                            add_sep = False
                            entry = middle[0].get("SpecialToken", {}).get("id")
                            if entry and entry in (sep, eos) and not last:
                                add_sep = True
                            if len(middle) == 2:
                                entry2 = middle[1].get("SpecialToken", {}).get("id")
                                if entry2 and entry2 in (sep, eos):
                                    add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and tc:
                                tc["sep_token"] = eos

    def _load_from_config_json(self) -> None:
        config = self.ctx.hparams
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(config.get("text_config"), dict):
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_special_token(typ, tid)

    # ---- writing ---------------------------------------------------------------------------

    def write(self) -> None:
        kvs, log = self.ctx.kvs, self.ctx.log
        if self.merges:
            kvs.array(_K_MERGES, self.merges, GGUFValueType.STRING)
        elif self.load_merges:
            log.append("no merges found: the BPE vocab will not work")
        for typ, tid in self.ids.items():
            if typ in _ID_KEYS:
                kvs.u32(_ID_KEYS[typ], tid)
            else:
                log.append(f"special token {typ}={tid} has no GGUF key, not written (llama.cpp "
                           f"drops it too)")
        for typ, flag in self.add.items():
            if typ in _ADD_KEYS:
                kvs.boolean(_ADD_KEYS[typ], flag)
        if self.ids:
            log.append("special tokens: " + ", ".join(f"{t}={i}" for t, i in self.ids.items()))
        if self.add:
            log.append("add flags: " + ", ".join(f"add_{t}={_js(v)}" for t, v in self.add.items()
                                                if t in _ADD_KEYS))
        if self.chat_template is not None:
            self._write_chat_template(self.chat_template)
        if self.lowercase is not None:
            kvs.boolean("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            kvs.boolean("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)

    def _write_chat_template(self, value: Any) -> None:
        kvs = self.ctx.kvs
        if isinstance(value, list):
            default = None
            names = set()
            for choice in value:
                name = "".join(c if c.isascii() and c.isalnum() else "_"
                               for c in choice.get("name", ""))
                template = choice.get("template")
                if name and template is not None:
                    if name == "default":
                        default = template
                    else:
                        names.add(name)
                        kvs.string(f"{_K_CHAT}.{name}", template)
            if names:
                kvs.array("tokenizer.chat_templates", sorted(names), GGUFValueType.STRING)
            if default is None:
                return
            value = default
        kvs.string(_K_CHAT, value)
        self.ctx.log.append("chat template written")


def _write_spm_arrays(ctx, tokens: list, scores: list, types: list) -> None:
    """The SentencePiece ("llama") vocabulary keys, in llama.cpp's order."""
    kvs = ctx.kvs
    kvs.string(_K_MODEL, "llama")
    kvs.string(_K_PRE, "default")
    kvs.array(_K_TOKENS, tokens, GGUFValueType.STRING)
    kvs.array(_K_SCORES, scores, GGUFValueType.FLOAT32)
    kvs.array(_K_TYPES, types, GGUFValueType.INT32)
