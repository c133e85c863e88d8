"""GGUF vocabulary -> a tokenizer that gives llama.cpp's token ids exactly.

    tok = Tokenizer.from_gguf(read_gguf(path))
    ids = tok.encode(text)                       # = llama_tokenize(vocab, text, add_special=True, parse_special=False)
    text = tok.decode(ids)                       # = common_detokenize(vocab, ids, special=True)

Two tokenizer models, as llama.cpp implements them (src/llama-vocab.cpp, src/unicode.cpp):

* ``llama`` (SentencePiece-style, "SPM"): spaces become U+2581, one space is prefixed to every text fragment
  that starts the input or follows a special token (``tokenizer.ggml.add_space_prefix``, default true), then
  adjacent symbols are merged by the highest vocab score (ties: leftmost); leftovers become ``<0xXX>`` byte
  tokens. No other normalisation (no NFKC, no whitespace collapsing).
* ``gpt2`` (byte-level BPE): the pre-tokenizer named by ``tokenizer.ggml.pre`` splits the text into words, each
  word is mapped to the GPT-2 byte alphabet and merged by the lowest merge rank (ties: leftmost).

Before either runs, special tokens are split out ("tokenizer_st_partition"): longest text first; CONTROL and
UNKNOWN tokens only when ``parse_special``, USER_DEFINED tokens always.

What llama-perplexity tokenizes (tools/perplexity/perplexity.cpp, common/arg.cpp): the ``-f`` file with ONE
trailing ``"\\n"`` removed, no escape processing (the tool sets ``escape = false``), then
``common_tokenize(ctx, text, add_special=True, parse_special=False)``, i.e.
``tok.encode(text[:-1] if text.endswith("\\n") else text, add_special=True, parse_special=False)``.
A BOS is therefore prepended exactly when ``tok.add_bos`` is true: SPM by default, gpt2 when the GGUF says
``tokenizer.ggml.add_bos_token = true`` or the pre-tokenizer is one of the llama3 family (llama.cpp sets
add_bos for those even without the key, e.g. ggml-vocab-llama-bpe.gguf).

The pre-tokenizer regexes are matched on a "collapsed" copy of the text in which every non-ASCII code point is
replaced by one marker character for its class (letter, number, punctuation, whitespace, other) -- the same
idea as llama.cpp's own fallback -- so the stdlib ``re`` engine (which lacks ``\\p{L}``) runs them at C speed.
The classes are llama.cpp's: ``\\s`` is Unicode's White_Space set (not Python's ``str.isspace``), categories
come from ``unicodedata``. llama.cpp's tables are Unicode 15.1 and Python 3.11 knows 14.0, so the ~5000 code
points assigned in 15.0/15.1 (mostly CJK Extension H/I ideographs) count as "other" here but as letters there;
on Python 3.13 (Unicode 15.1) the classes are identical (tests/test_eval_tokenizer.py checks every code point
against llama.cpp's unicode-data.cpp).
"""
from __future__ import annotations

import heapq
import re
import unicodedata
from enum import IntFlag
from typing import TYPE_CHECKING, Sequence

import numpy as np

from qtool.errors import QtoolError

if TYPE_CHECKING:
    from qtool.gguf_io import GGUFFile

__all__ = ["Tokenizer", "TokenAttr", "SUPPORTED_PRE"]


class TokenAttr(IntFlag):
    """llama_token_attr (the bits llama.cpp derives from tokenizer.ggml.token_type)."""
    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# tokenizer.ggml.token_type (LLAMA_TOKEN_TYPE_*) -> attribute; anything else is UNDEFINED. Attributes are kept
# as plain ints: IntFlag arithmetic over a 150k-token vocabulary costs seconds.
_UNKNOWN, _UNUSED, _NORMAL, _CONTROL, _USER_DEFINED, _BYTE = (int(a) for a in (
    TokenAttr.UNKNOWN, TokenAttr.UNUSED, TokenAttr.NORMAL, TokenAttr.CONTROL, TokenAttr.USER_DEFINED, TokenAttr.BYTE))
_TOKEN_TYPE_ATTR = {1: _NORMAL, 2: _UNKNOWN, 3: _CONTROL, 4: _USER_DEFINED, 5: _UNUSED, 6: _BYTE}
_SPECIAL_ATTRS = _CONTROL | _UNKNOWN

# --- the collapsed alphabet ---------------------------------------------------------------------------------
# ASCII stays itself; every other code point becomes one of these markers (never ASCII, never in the output).
_LETTER, _NUMBER, _PUNCT, _SPACE, _MARK, _OTHER = "\x81", "\x82", "\x84", "\x83", "\x86", "\x80"

# Unicode White_Space (PropList.txt), which is what llama.cpp's \s means. Python's str.isspace() differs
# (it includes U+001C..U+001F), so the set is spelled out.
_WHITESPACE = frozenset([*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B),
                         0x2028, 0x2029, 0x202F, 0x205F, 0x3000])

_collapse_table: dict[int, str] = {}   # non-ASCII code point -> marker, filled on demand


def _marker(cp: int) -> str:
    if cp in _WHITESPACE:
        return _SPACE
    major = unicodedata.category(chr(cp))[0]
    return {"L": _LETTER, "N": _NUMBER, "P": _PUNCT, "M": _MARK}.get(major, _OTHER)


def collapse(text: str) -> str:
    """`text` with each non-ASCII code point replaced by its class marker (same length, same positions)."""
    new = [ord(c) for c in set(text) if ord(c) >= 0x80 and ord(c) not in _collapse_table]
    for cp in new:
        _collapse_table[cp] = _marker(cp)
    if text.isascii():
        return text
    return text.translate(_collapse_table)


# Character classes over the collapsed alphabet.
_WS = "\\t\\n\\x0b\\x0c\\r " + _SPACE
_L = "A-Za-z" + _LETTER
_N = "0-9" + _NUMBER
_P_ASCII = "!-#%-*,\\-./:;?@\\[-\\]_{}"        # ASCII \p{P}: !"#%&'()*,-./:;?@[\]_{}

# The regexes of llama.cpp's pre-tokenizers, rewritten for the collapsed alphabet. The GPT-2, llama3, qwen2 and
# qwen35 ones replace llama.cpp's hand-written splitters (unicode_regex_split_custom_*), which behave exactly like
# these with leftmost-first alternation; tests/test_eval_tokenizer.py checks them on the vocab test vectors.
_GPT2 = (f"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_WS}{_L}{_N}]+"
         f"|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
_CONTRACTIONS = "'[sStTmMdD]|'(?:[rR][eE]|[vV][eE]|[lL][lL])"
_LLAMA3_TAIL = (f"| ?[^{_WS}{_L}{_N}]+[\\r\\n]*|[{_WS}]*[\\r\\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")
_LLAMA3 = f"{_CONTRACTIONS}|[^\\r\\n{_L}{_N}]?[{_L}]+|[{_N}]{{1,3}}" + _LLAMA3_TAIL
_QWEN2 = f"{_CONTRACTIONS}|[^\\r\\n{_L}{_N}]?[{_L}]+|[{_N}]" + _LLAMA3_TAIL
# Qwen3.5: qwen2's, with combining marks (\p{M}) in the letter runs and out of the punctuation runs
_QWEN35 = (f"{_CONTRACTIONS}|[^\\r\\n{_L}{_N}]?[{_L}{_MARK}]+|[{_N}]| ?[^{_WS}{_L}{_MARK}{_N}]+[\\r\\n]*"
           f"|[{_WS}]*[\\r\\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+")

_REGEXES: dict[str, list[str]] = {
    "default": [f"[{_P_ASCII}{_PUNCT}$+<=>^~|]+", _GPT2, f"[{_N}]+", "[0-9]{3}"],
    "gpt2": [_GPT2],
    "llama3": [_LLAMA3],
    "qwen2": [_QWEN2],
    "qwen35": [_QWEN35],
    "starcoder": [f"[{_N}]", _GPT2],
}

# tokenizer.ggml.pre -> (regex set, ignore_merges, add_bos default, clean_spaces) as llama_vocab::impl::load
# sets them. Only names whose whole behaviour is reproduced are listed; others raise QtoolError.
SUPPORTED_PRE: dict[str, tuple[str, bool, bool, bool]] = {
    "default": ("default", False, False, True),
    **{name: ("llama3", True, True, True) for name in
       ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")},
    "dbrx": ("llama3", False, False, True),
    "smaug-bpe": ("llama3", False, False, True),
    **{name: ("gpt2", False, False, True) for name in
       ("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "mpt", "olmo", "jais", "exaone4")},
    "trillion": ("gpt2", False, False, False),
    "granite-docling": ("gpt2", False, False, False),
    **{name: ("qwen2", False, False, False) for name in
       ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "hunyuan", "solar-open")},
    "qwen35": ("qwen35", False, False, False),
    "megrez": ("qwen2", False, False, True),
    "stablelm2": ("qwen2", False, False, True),
    "smollm": ("starcoder", False, False, False),
    "command-r": ("starcoder", False, False, False),
    **{name: ("starcoder", False, False, True) for name in
       ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2")},
}


def _gpt2_byte_alphabet() -> list[str]:
    """byte -> printable character of GPT-2's bytes_to_unicode."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_TO_CHAR = _gpt2_byte_alphabet()
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_TO_CHAR)}
_BYTES_TO_ALPHABET = {b: c for b, c in enumerate(_BYTE_TO_CHAR)}   # for str.translate on latin-1 text

# Text-detected special tokens (llama_vocab::impl::load): GGUFs rarely carry these ids, so llama.cpp finds
# them by name and forces them to CONTROL.
_EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
_EOM_NAMES = ("<|eom_id|>",)
_FIM_NAMES = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
              "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
              "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
              "<｜end▁of▁sentence｜>", "[e~[")
_ALWAYS_USER_DEFINED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")   # gpt-oss

_SPM_SPACE = "\u2581"


class Tokenizer:
    """llama.cpp's tokenizer for a GGUF's vocabulary (``tokenizer.ggml.model`` ``llama`` or ``gpt2``)."""

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_ids: set[int]           # llama.cpp's end-of-generation set (special_eog_ids)
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool

    def __init__(self, *, model: str, pre: str, tokens: Sequence[str], scores: Sequence[float] | None,
                 token_types: Sequence[int] | None, merges: Sequence[str] | None,
                 special_ids: dict[str, int], add_bos: bool | None, add_eos: bool | None,
                 add_space_prefix: bool | None):
        if model not in ("llama", "gpt2"):
            raise QtoolError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model): "
                             f"qtool supports 'llama' (SentencePiece) and 'gpt2' (byte-level BPE)")
        self.model, self.pre = model, pre
        self.n_vocab = len(tokens)
        if self.n_vocab == 0:
            raise QtoolError("the GGUF has an empty vocabulary (tokenizer.ggml.tokens)")
        # llama.cpp renames empty tokens so they stay distinct; later duplicates win the text -> id lookup
        self._texts = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self._ids = {t: i for i, t in enumerate(self._texts)}
        self._scores = [float(s) for s in scores] if scores is not None else [0.0] * self.n_vocab
        if len(self._scores) < self.n_vocab:
            raise QtoolError(f"tokenizer.ggml.scores has {len(self._scores)} entries for {self.n_vocab} tokens")
        if token_types is not None and len(token_types) < self.n_vocab:
            raise QtoolError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {self.n_vocab} tokens")
        self._attrs = [_TOKEN_TYPE_ATTR.get(t, 0) for t in token_types[:self.n_vocab]] \
            if token_types is not None else [_NORMAL] * self.n_vocab

        if model == "llama":
            self._regexes: list[re.Pattern] = []
            self._ignore_merges, clean_spaces = False, False
            default_add_bos, default_space_prefix = True, True
            defaults = {"bos": 1, "eos": 2, "unk": 0}
        else:
            if pre not in SUPPORTED_PRE:
                raise QtoolError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre); qtool supports: "
                                 + ", ".join(sorted(SUPPORTED_PRE)))
            regex_set, self._ignore_merges, default_add_bos, clean_spaces = SUPPORTED_PRE[pre]
            self._regexes = [re.compile(r) for r in _REGEXES[regex_set]]
            default_space_prefix = False
            defaults = {"bos": 11, "eos": 11}
            if merges is None:
                raise QtoolError("gpt2 tokenizer without merges (tokenizer.ggml.merges)")
            self._ranks = _merge_ranks(merges)
        self._clean_spaces = clean_spaces
        self.add_bos = default_add_bos if add_bos is None else bool(add_bos)
        self.add_eos = False if add_eos is None else bool(add_eos)
        self.add_space_prefix = default_space_prefix if add_space_prefix is None else bool(add_space_prefix)

        ids = self._special_ids(defaults, special_ids)
        self.bos_id, self.eos_id, self.unk_id = ids.get("bos"), ids.get("eos"), ids.get("unk")
        self.eot_ids = self._detect_end_of_generation(ids)

        # Split-out candidates, longest UTF-8 text first (llama.cpp's std::sort is unstable; ties keep id order).
        special = [i for i, a in enumerate(self._attrs) if a & (_CONTROL | _USER_DEFINED | _UNKNOWN)]
        self._special_order = sorted(special, key=lambda i: -len(self._texts[i].encode("utf-8", "surrogatepass")))
        self._special_finder: dict[bool, re.Pattern | None] = {}

        self._word_cache: dict[str, tuple[int, ...]] = {}
        self._spm_pairs: np.ndarray | None = None

    # --- loading ----------------------------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, g: "GGUFFile") -> "Tokenizer":
        """The tokenizer llama.cpp builds from this GGUF's tokenizer.ggml.* metadata."""
        model = g.value("tokenizer.ggml.model")
        if model is None:
            raise QtoolError(f"{g.path}: no tokenizer in this GGUF (tokenizer.ggml.model missing)")
        tokens = g.value("tokenizer.ggml.tokens")
        if tokens is None:
            raise QtoolError(f"{g.path}: no vocabulary in this GGUF (tokenizer.ggml.tokens missing)")
        special_ids = {}
        for name in ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask",
                     "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"):
            key = "tokenizer.ggml.padding_token_id" if name == "pad" else f"tokenizer.ggml.{name}_token_id"
            if (v := g.value(key)) is not None:
                special_ids[name] = int(v)
        # deprecated spellings of the FIM ids (read after the new ones, so they win as in llama.cpp)
        for name, old in (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")):
            if (v := g.value(f"tokenizer.ggml.{old}_token_id")) is not None:
                special_ids[name] = int(v)
        try:
            return cls(model=str(model), pre=str(g.value("tokenizer.ggml.pre", "") or "default"),
                       tokens=tokens, scores=g.value("tokenizer.ggml.scores"),
                       token_types=g.value("tokenizer.ggml.token_type"), merges=g.value("tokenizer.ggml.merges"),
                       special_ids=special_ids, add_bos=g.value("tokenizer.ggml.add_bos_token"),
                       add_eos=g.value("tokenizer.ggml.add_eos_token"),
                       add_space_prefix=g.value("tokenizer.ggml.add_space_prefix"))
        except QtoolError as e:
            raise QtoolError(f"{g.path}: {e}") from None

    def _special_ids(self, defaults: dict[str, int], from_file: dict[str, int]) -> dict[str, int]:
        ids = {}
        for name in ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask",
                     "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"):
            value = defaults.get(name)
            if value is not None and value >= self.n_vocab:
                value = None                        # a default out of range is disabled
            if name in from_file and 0 <= from_file[name] < self.n_vocab:
                value = from_file[name]             # a bad id in the file keeps the default
            if value is not None:
                ids[name] = value
        return ids

    def _detect_end_of_generation(self, ids: dict[str, int]) -> set[int]:
        def force_control(i: int) -> None:
            self._attrs[i] |= _CONTROL

        def find(names: Sequence[str]) -> int | None:
            # llama.cpp walks an unordered_map and takes the first hit; with several candidates present its
            # choice is unspecified, so take the lowest id.
            hits = [self._ids[n] for n in names if n in self._ids]
            return min(hits) if hits else None

        for name, names in (("eot", _EOT_NAMES), ("eom", _EOM_NAMES), *_FIM_NAMES.items()):
            if name not in ids and (found := find(names)) is not None:
                ids[name] = found
                force_control(found)

        eog = {ids[n] for n in ("fim_pad", "fim_rep", "fim_sep") if n in ids}
        for name in _EOG_NAMES:
            if name in self._ids:
                eog.add(self._ids[name])
                force_control(self._ids[name])
        for name in _ALWAYS_USER_DEFINED:
            if name in self._ids:
                self._attrs[self._ids[name]] = _USER_DEFINED
        eog.update(ids[n] for n in ("eos", "eot", "eom") if n in ids)

        # o200k_harmony / solar-open: "<|end|>" ends a message, not the generation
        texts = {self._texts[i]: i for i in eog}
        if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                                   or (("<|call|>" in texts or "<|calls|>" in texts) and "<|flush|>" in texts)):
            eog.discard(texts["<|end|>"])
            self._attrs[texts["<|end|>"]] = _USER_DEFINED
        # gemma4 / plamo: "</s>" is an ordinary token there
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            self._attrs[texts["</s>"]] = _NORMAL
        return eog

    # --- encoding ---------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False,
               max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`, as llama_tokenize(vocab, text, add_special, parse_special). `max_tokens`: only the
        first ids (the same as the whole text's: fragments, SPM segments and BPE words are tokenized independently,
        so the work stops after the unit that reaches the count; perplexity over 2 chunks does not tokenize the
        whole 1.3 MB of WikiText-2, 1.5 s on one core)."""
        fragments = self._split_special(text, parse_special) if text else []
        out: list[int] = []
        limit = max_tokens if max_tokens is not None else -1
        if add_special and self.add_bos:
            if self.bos_id is None:
                raise QtoolError("the vocabulary asks for a BOS token but defines none")
            out.append(self.bos_id)
        if self.model == "llama":
            after_special = True        # a fragment at the start or after a special token gets the space prefix
            for frag in fragments:
                if 0 <= limit <= len(out):
                    break
                if isinstance(frag, int):
                    out.append(frag)
                    after_special = True
                    continue
                if self.add_space_prefix and after_special:
                    frag = " " + frag
                self._encode_spm(frag.replace(" ", _SPM_SPACE), out, limit)
                after_special = False
        else:
            for frag in fragments:
                if 0 <= limit <= len(out):
                    break
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    self._encode_bpe(frag, out, limit)
        if 0 <= limit <= len(out):
            return out[:limit]
        if add_special and self.add_eos:
            if self.eos_id is None:
                raise QtoolError("the vocabulary asks for an EOS token but defines none")
            out.append(self.eos_id)
        return out

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """Raw-text fragments and special-token ids, in order (llama.cpp's tokenizer_st_partition)."""
        fragments: list[str | int] = [text]
        if parse_special not in self._special_finder:
            # One scan that finds whether any candidate occurs at all (the usual answer is no); when nothing
            # matches, no position was skipped, so no candidate occurs anywhere.
            texts = [re.escape(self._texts[i]) for i in self._special_order
                     if parse_special or not self._attrs[i] & _SPECIAL_ATTRS]
            self._special_finder[parse_special] = re.compile("|".join(texts)) if texts else None
        finder = self._special_finder[parse_special]
        if finder is None or finder.search(text) is None:
            return fragments
        for tid in self._special_order:
            if not parse_special and self._attrs[tid] & _SPECIAL_ATTRS:
                continue
            special = self._texts[tid]
            if not any(isinstance(f, str) and special in f for f in fragments):
                continue
            split: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or special not in frag:
                    split.append(frag)
                    continue
                for k, piece in enumerate(frag.split(special)):
                    if k:
                        split.append(tid)
                    if piece:
                        split.append(piece)
            fragments = split
        return fragments

    # SPM

    def _encode_spm(self, text: str, out: list[int], limit: int = -1) -> None:
        # The merge never joins two neighbours whose character pair occurs in no token text, so the text is cut
        # there into independent segments (mostly words) and each distinct segment is merged once. Stops once out
        # holds `limit` ids (unless negative).
        cache = self._word_cache
        for segment in self._spm_segments(text):
            if 0 <= limit <= len(out):
                break
            ids = cache.get(segment)
            if ids is None:
                ids = cache[segment] = tuple(self._spm_merge(segment))
            out.extend(ids)
        if len(cache) > 500_000:
            cache.clear()

    def _spm_segments(self, text: str) -> list[str]:
        if len(text) < 2:
            return [text] if text else []
        if self._spm_pairs is None:
            pairs = {(ord(t[i]) << 21) | ord(t[i + 1]) for t in self._texts for i in range(len(t) - 1)}
            self._spm_pairs = np.array(sorted(pairs), dtype=np.int64)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        keys = (cps[:-1] << 21) | cps[1:]
        pairs = self._spm_pairs
        if len(pairs):
            at = np.minimum(np.searchsorted(pairs, keys), len(pairs) - 1)
            cuts = (np.flatnonzero(pairs[at] != keys) + 1).tolist()
        else:
            cuts = list(range(1, len(text)))
        bounds = [0, *cuts, len(text)]
        return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _spm_merge(self, text: str) -> list[int]:
        ids, scores = self._ids, self._scores
        length = [1] * len(text)                # symbol k covers text[k:k + length[k]]; 0 once merged away
        nxt = list(range(1, len(text))) + [-1]
        prv = list(range(-1, len(text) - 1))
        heap: list[tuple[float, int, int, int]] = []
        for k in range(len(text) - 1):
            tid = ids.get(text[k:k + 2])
            if tid is not None:
                heap.append((-scores[tid], k, k + 1, 2))     # highest score first, then leftmost
        heapq.heapify(heap)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            if length[left] == 0 or length[right] == 0 or length[left] + length[right] != size:
                continue                            # one side changed since this pair was queued
            length[left], length[right] = size, 0
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            for a, b in ((prv[left], left), (left, nxt[left])):
                if a >= 0 and b >= 0:
                    size_ab = length[a] + length[b]
                    tid = ids.get(text[a:a + size_ab])
                    if tid is not None:
                        heapq.heappush(heap, (-scores[tid], a, b, size_ab))
        out: list[int] = []
        k = 0
        while k >= 0:
            piece = text[k:k + length[k]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._spm_byte_token(b) for b in piece.encode("utf-8", "surrogatepass"))
            k = nxt[k]
        return out

    def _spm_byte_token(self, byte: int) -> int:
        tid = self._ids.get(f"<0x{byte:02X}>")
        if tid is None and byte < 0x80:
            tid = self._ids.get(chr(byte))
        if tid is None:
            raise QtoolError(f"the vocabulary has no byte token <0x{byte:02X}> for text it cannot spell")
        return tid

    # BPE

    def _encode_bpe(self, text: str, out: list[int], limit: int = -1) -> None:
        """The words' ids into out, until it holds `limit` ids (unless negative)."""
        cache = self._word_cache
        for word in self._pre_tokenize(text):
            if 0 <= limit <= len(out):
                break
            ids = cache.get(word)
            if ids is None:
                ids = cache[word] = tuple(self._bpe_word(word))
            out.extend(ids)
        if len(cache) > 500_000:
            cache.clear()

    def _pre_tokenize(self, text: str) -> list[str]:
        """The words of llama.cpp's unicode_regex_split: each regex re-splits every piece of the previous one;
        matches and the gaps between them both become pieces."""
        collapsed = collapse(text)
        spans = [(0, len(text))]
        for pattern in self._regexes:
            split = []
            for a, b in spans:
                pos = a
                for m in pattern.finditer(collapsed, a, b):
                    s, e = m.span()
                    if s > pos:
                        split.append((pos, s))
                    split.append((s, e))
                    pos = e
                if pos < b:
                    split.append((pos, b))
            spans = split
        return [text[a:b] for a, b in spans]

    def _bpe_word(self, word: str) -> list[int]:
        ids = self._ids
        symbols = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(_BYTES_TO_ALPHABET)
        if self._ignore_merges and symbols in ids:
            return [ids[symbols]]
        parts = self._bpe_merge(symbols)
        out = []
        for part in parts:
            tid = ids.get(part)
            if tid is not None:
                out.append(tid)
                continue
            # llama.cpp falls back to single-byte tokens of the part's UTF-8 bytes and drops bytes it
            # cannot find; only ASCII bytes can ever match a token text
            for b in part.encode("utf-8"):
                if b < 0x80 and (tid := ids.get(chr(b))) is not None:
                    out.append(tid)
        return out

    def _bpe_merge(self, symbols: str) -> list[str]:
        if len(symbols) < 2:
            return [symbols] if symbols else []
        ranks = self._ranks
        parts = list(symbols)
        nxt = list(range(1, len(parts))) + [-1]
        prv = list(range(-1, len(parts) - 1))
        heap = []
        for k in range(len(parts) - 1):
            rank = ranks.get(parts[k] + " " + parts[k + 1])
            if rank is not None:
                heap.append((rank, k, k + 1, parts[k] + parts[k + 1]))   # lowest rank first, then leftmost
        heapq.heapify(heap)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not parts[left] or not parts[right] or parts[left] + parts[right] != merged:
                continue
            parts[left], parts[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prv[nxt[right]] = left
            for a, b in ((prv[left], left), (left, nxt[left])):
                if a >= 0 and b >= 0:
                    rank = ranks.get(parts[a] + " " + parts[b])
                    if rank is not None:
                        heapq.heappush(heap, (rank, a, b, parts[a] + parts[b]))
        return [p for p in parts if p]

    # --- decoding ---------------------------------------------------------------------------------------------

    def token_text(self, id: int) -> str:
        """The vocabulary entry of token `id` (llama_vocab_get_text)."""
        self._check_id(id)
        return self._texts[id]

    def token_attr(self, id: int) -> TokenAttr:
        self._check_id(id)
        return TokenAttr(self._attrs[id])

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.n_vocab:
            raise QtoolError(f"token id {id} is outside the vocabulary (0..{self.n_vocab - 1})")

    def token_piece(self, id: int, special: bool = True) -> bytes:
        """The bytes token `id` stands for (llama_token_to_piece with lstrip 0)."""
        self._check_id(id)
        attr, text = self._attrs[id], self._texts[id]
        if attr & _SPECIAL_ATTRS and not special:
            return b""
        if attr & (_SPECIAL_ATTRS | _USER_DEFINED):
            return text.encode("utf-8", "surrogatepass")
        if attr & _NORMAL:
            if self.model == "llama":
                return text.replace(_SPM_SPACE, " ").encode("utf-8", "surrogatepass")
            return _decode_byte_alphabet(text)
        if attr & _BYTE:
            return bytes([_parse_hex_byte(text[3:5])])
        return b""

    def decode_bytes(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = True) -> bytes:
        """llama_detokenize(vocab, ids, remove_special, unparse_special): the raw bytes (may end mid-character)."""
        ids = list(ids)
        strip_space = self.add_space_prefix       # the prefix space the encoder added to the first fragment
        if remove_special and self.add_bos and ids and ids[0] == self.bos_id:
            ids, strip_space = ids[1:], False
        if remove_special and self.add_eos and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        pieces = []
        for k, tid in enumerate(ids):
            piece = self.token_piece(tid, unparse_special)
            if k == 0 and strip_space and piece.startswith(b" "):
                piece = piece[1:]
            pieces.append(piece)
        text = b"".join(pieces)
        return _clean_spaces(text) if self._clean_spaces else text

    def decode(self, ids: Sequence[int], remove_special: bool = False, unparse_special: bool = True) -> str:
        """Text of `ids` as common_detokenize(vocab, ids, special=True) gives it (defaults), UTF-8 decoded with
        U+FFFD for incomplete characters."""
        return self.decode_bytes(ids, remove_special, unparse_special).decode("utf-8", errors="replace")


def _merge_ranks(merges: Sequence[str]) -> dict[str, int]:
    """"left right" -> rank, the first occurrence winning as in llama.cpp.

    llama.cpp cuts each merge at its first space after position 0. The symbols being merged are spelled in the
    GPT-2 byte alphabet, which has no space (0x20 is "Ġ"), so "left right" names a pair unambiguously and
    merges whose parts would contain a space can never apply; keying by the merge text itself is therefore
    the same lookup, and a string key is cheaper than a tuple.
    """
    return dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))


def _parse_hex_byte(digits: str) -> int:
    """strtol(digits, 16) as llama.cpp reads <0xXX>: the leading hex digits, 0 if none."""
    m = re.match(r"[0-9A-Fa-f]*", digits)
    return int(m.group(), 16) & 0xFF if m.group() else 0


def _decode_byte_alphabet(text: str) -> bytes:
    """GPT-2 alphabet -> bytes; characters outside it become llama.cpp's [UNK_BYTE_0x..] marker."""
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        pass
    out = bytearray()
    for c in text:
        if c in _CHAR_TO_BYTE:
            out.append(_CHAR_TO_BYTE[c])
        else:
            utf8 = c.encode("utf-8", "surrogatepass")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode() + text.encode("utf-8", "surrogatepass") + b"]"
    return bytes(out)


_SPACE_BEFORE_PUNCT = re.compile(rb" (?=[?!.,])")
_LONE_APOSTROPHE = re.compile(rb" ' ")
_SPACE_BEFORE_CONTRACTION = re.compile(rb" (?='[sm]|'re|'ve)")


def _clean_spaces(text: bytes) -> bytes:
    """llama.cpp's clean_spaces passes (BPE vocabs unless the pre-tokenizer turns them off)."""
    text = _SPACE_BEFORE_PUNCT.sub(b"", text)
    text = _LONE_APOSTROPHE.sub(b"'", text)
    return _SPACE_BEFORE_CONTRACTION.sub(b"", text)
