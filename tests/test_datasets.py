"""Evaluation text: WikiText-2 rebuilt byte for byte, local files, and the offline behaviour of `wikitext`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qtool.errors import QtoolError
from qtool.evaluate.datasets import WIKITEXT_REPO, WIKITEXT_TEST_FILE, as_prompt_file, load_eval_text, rows_to_raw
from tests.conftest import SHARED

WIKI = SHARED / "data" / "wikitext-2-raw-v1"
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wiki_rows() -> list[str]:
    return [json.loads(line)["text"] for line in (WIKI / "test.jsonl").read_text(encoding="utf-8").splitlines()]


def test_hub_rows_rebuild_wiki_test_raw_byte_for_byte(wiki_rows):
    assert rows_to_raw(wiki_rows).encode("utf-8") == (WIKI / "wiki.test.raw").read_bytes()


def test_join_rule():
    assert rows_to_raw(["", " = A = \n", "", " text .\n", "no newline"]) == " \n = A = \n \n text .\nno newline\n"
    assert rows_to_raw([]) == ""


def test_local_formats_give_what_llama_perplexity_reads(wiki_rows, tmp_path):
    raw = (WIKI / "wiki.test.raw").read_text(encoding="utf-8")
    expected = raw[:-1]                       # llama-perplexity -f drops one trailing newline
    assert as_prompt_file(raw) == expected and as_prompt_file("a\n\n") == "a\n" and as_prompt_file("a") == "a"
    assert load_eval_text(str(WIKI / "wiki.test.raw")).text == expected
    assert load_eval_text(str(WIKI / "test.jsonl")).text == expected
    parquet = tmp_path / "test.parquet"
    pq.write_table(pa.table({"text": wiki_rows, "other": list(range(len(wiki_rows)))}), parquet)
    loaded = load_eval_text(str(parquet))
    assert loaded.text == expected and loaded.name == str(parquet)
    txt = tmp_path / "notes.TXT"
    txt.write_bytes("héllo\r\nworld\n\n".encode())
    assert load_eval_text(str(txt)).text == "héllo\r\nworld\n"


@pytest.mark.parametrize("name, content, message", [
    ("x.csv", b"text\n", "unknown dataset format '.csv'"),
    ("x.txt", b"\xff\xfe bad", "not UTF-8 text"),
    ("x.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"x.jsonl:2: expected an object with a string 'text' field"),
    ("x.jsonl", b'{"text": "a"}\n{oops\n', r"x.jsonl:2: invalid JSON"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(QtoolError, match=message):
        load_eval_text(str(path))


def test_missing_file_and_parquet_without_text(tmp_path):
    with pytest.raises(QtoolError, match="dataset '.*nope.txt' not found: give --dataset wikitext or a"):
        load_eval_text(str(tmp_path / "nope.txt"))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(QtoolError, match="no 'text' column .columns: body."):
        load_eval_text(str(tmp_path / "x.parquet"))


def _load_wikitext_offline(hf_home: Path) -> subprocess.CompletedProcess:
    """`load_eval_text("wikitext")` in a fresh interpreter (datasets and huggingface_hub read the env at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    code = ("import sys\nfrom qtool.errors import QtoolError\nfrom qtool.evaluate.datasets import load_eval_text\n"
            "try:\n    t = load_eval_text('wikitext')\nexcept QtoolError as e:\n    print('ERROR', e)\n    sys.exit(2)\n"
            "sys.stdout.buffer.write(t.text.encode())\n")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)


def test_wikitext_offline_without_a_cache_says_what_to_do(tmp_path):
    proc = _load_wikitext_offline(tmp_path / "hf")
    assert proc.returncode == 2, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode()
    assert out.startswith("ERROR cannot load Salesforce/wikitext wikitext-2-raw-v1 from the Hub or the local cache")
    assert "use --dataset PATH" in out and len(out.strip().splitlines()) == 1


def test_wikitext_offline_from_the_hub_file_cache(tmp_path, wiki_rows):
    """A parquet snapshot fetched earlier by huggingface_hub is enough offline (datasets alone would refuse)."""
    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / ("datasets--" + WIKITEXT_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (snapshot / WIKITEXT_TEST_FILE).parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    pq.write_table(pa.table({"text": wiki_rows}), snapshot / WIKITEXT_TEST_FILE)
    proc = _load_wikitext_offline(tmp_path / "hf")
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()[-2000:]
    assert proc.stdout + b"\n" == (WIKI / "wiki.test.raw").read_bytes()
