"""Evaluation text: WikiText-2 (rebuilt into the raw file llama.cpp users evaluate on) or a local file.

`load_eval_text(spec)` returns the text exactly as llama-perplexity would see it after `-f FILE`: the file's
content with one trailing newline removed (common/arg.cpp does that for every prompt file).

Rows of a table (the Hub's WikiText, a .jsonl or a .parquet with a `text` column) are joined by the rule that
rebuilds `wiki.test.raw` byte for byte from the Hub's rows: a row that already ends in a newline is taken as
is, any other row gets one, and an empty row becomes " \\n" (the raw file's blank lines hold one space).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from qtool.errors import QtoolError

WIKITEXT_REPO = "Salesforce/wikitext"
WIKITEXT_CONFIG = "wikitext-2-raw-v1"
WIKITEXT_TEST_FILE = "wikitext-2-raw-v1/test-00000-of-00001.parquet"
WIKITEXT_NAMES = ("wikitext", "wikitext-2", "wikitext-2-raw", "wikitext-2-raw-v1")
TEXT_SUFFIXES = (".txt", ".raw")


@dataclass(frozen=True)
class EvalText:
    name: str      # what the report calls it: "wikitext-2-raw-v1/test" or the file path
    text: str


def rows_to_raw(rows: Iterable[str]) -> str:
    """Table rows -> one text, the way wiki.test.raw is laid out."""
    parts = []
    for row in rows:
        if row is None or row == "":
            parts.append(" \n")
        elif row.endswith("\n"):
            parts.append(row)
        else:
            parts.append(row + "\n")
    return "".join(parts)


def as_prompt_file(raw: str) -> str:
    """What llama-perplexity evaluates after reading a file: one trailing newline removed."""
    return raw[:-1] if raw.endswith("\n") else raw


def load_eval_text(spec: str) -> EvalText:
    """`wikitext` (Hub, or the local cache offline) or a path to .txt/.raw, .jsonl (`text` field), .parquet."""
    if spec.lower() in WIKITEXT_NAMES:
        return EvalText(f"{WIKITEXT_CONFIG}/test", as_prompt_file(rows_to_raw(wikitext_test_rows())))
    path = Path(spec)
    if not path.is_file():
        raise QtoolError(f"dataset {spec!r} not found: give --dataset wikitext or a .txt/.raw/.jsonl/.parquet file")
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        raw = _decode(path.read_bytes(), path)
    elif suffix == ".jsonl":
        raw = rows_to_raw(_jsonl_rows(path))
    elif suffix == ".parquet":
        raw = rows_to_raw(_parquet_rows(path))
    else:
        raise QtoolError(f"{path}: unknown dataset format {suffix or '(no extension)'!r}; "
                         f"use .txt/.raw, .jsonl (a 'text' field per line) or .parquet (a 'text' column)")
    return EvalText(str(path), as_prompt_file(raw))


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QtoolError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _jsonl_rows(path: Path) -> list[str]:
    rows = []
    for lineno, line in enumerate(_decode(path.read_bytes(), path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise QtoolError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise QtoolError(f"{path}:{lineno}: expected an object with a string 'text' field")
        rows.append(obj["text"])
    return rows


def _parquet_rows(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for damaged files
        raise QtoolError(f"{path}: cannot read parquet ({e})") from None
    if "text" not in table.column_names:
        raise QtoolError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    return table.column("text").to_pylist()


def wikitext_test_rows() -> list[str]:
    """The rows of WikiText-2 raw's test split: through `datasets` (Hub or its cache), else the Hub file cache."""
    import datasets

    try:
        ds = datasets.load_dataset(WIKITEXT_REPO, WIKITEXT_CONFIG, split="test")
        return list(ds["text"])
    except Exception as e:  # offline, no network, no cache: datasets raises many types
        first_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    # `datasets` offline only reads its own Arrow cache; a parquet file fetched by huggingface_hub also works.
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(WIKITEXT_REPO, WIKITEXT_TEST_FILE, repo_type="dataset")
    if isinstance(cached, str):
        return _parquet_rows(Path(cached))
    raise QtoolError(f"cannot load {WIKITEXT_REPO} {WIKITEXT_CONFIG} from the Hub or the local cache ({first_error}); "
                     f"use --dataset PATH with a local copy, e.g. wiki.test.raw")
