"""qtool/gguf_io.py's fast metadata paths give the bytes gguf's own writer gives, and read back what was written."""
import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as V

from qtool.errors import QtoolError
from qtool.gguf_io import PlannedTensor, StringArray, _Writer, read_gguf, write_gguf

ARRAYS = {
    "a.u8": ([0, 255, 7], V.UINT8), "a.i8": ([-128, 127], V.INT8), "a.u16": ([65535, 1], V.UINT16),
    "a.i16": ([-32768, 5], V.INT16), "a.u32": ([2**32 - 1, 0], V.UINT32), "a.i32": ([-2**31, 3], V.INT32),
    "a.f32": ([0.1, -1e-40, 3.4e38, float("inf")], V.FLOAT32), "a.u64": ([2**64 - 1], V.UINT64),
    "a.i64": ([-2**63], V.INT64), "a.f64": ([0.1, -2.5], V.FLOAT64), "a.bool": ([True, False], V.BOOL),
    "a.str": (["", "hello", "ĠĊ", "日本", "\x00x"], V.STRING),
}


def _write(cls, path):
    w = cls(path, "llama")
    for key, (value, sub) in ARRAYS.items():
        w.add_key_value(key, value, V.ARRAY, sub_type=sub)
    w.add_key_value("s", "plain", V.STRING)
    w.add_tensor("t", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_fast_writer_matches_gguf_writer_byte_for_byte(tmp_path):
    _write(gguf.GGUFWriter, tmp_path / "ref.gguf")
    _write(_Writer, tmp_path / "ours.gguf")
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_reader_reads_back_every_array_type(tmp_path):
    _write(_Writer, tmp_path / "m.gguf")
    f = read_gguf(tmp_path / "m.gguf")
    for key, (value, sub) in ARRAYS.items():
        got = f.kv[key]
        assert got.sub_type == sub
        if sub == V.FLOAT32:
            np.testing.assert_array_equal(np.float32(got.value), np.float32(value))
        else:
            assert got.value == value, key


def test_write_gguf_vocabulary_round_trip(tmp_path):
    vocab = [f"tok{i}" for i in range(5000)] + ["Ġ", "日本語"]
    kvs = [("tokenizer.ggml.tokens", vocab, V.ARRAY, V.STRING),
           ("tokenizer.ggml.scores", [float(i) / 3 for i in range(len(vocab))], V.ARRAY, V.FLOAT32)]
    data = np.ones((2, 32), np.float32)
    write_gguf(tmp_path / "v.gguf", "llama", kvs, [PlannedTensor("w", (2, 32), gguf.GGMLQuantizationType.F32, lambda: data)])
    f = read_gguf(tmp_path / "v.gguf")
    assert f.kv["tokenizer.ggml.tokens"].value == vocab
    np.testing.assert_array_equal(np.float32(f.kv["tokenizer.ggml.scores"].value),
                                  np.float32([float(i) / 3 for i in range(len(vocab))]))


def test_lazy_string_arrays_read_as_lists_and_write_back_byte_for_byte(tmp_path):
    _write(gguf.GGUFWriter, tmp_path / "ref.gguf")
    lazy = read_gguf(tmp_path / "ref.gguf", lazy_strings=True)
    eager = read_gguf(tmp_path / "ref.gguf")
    strings = lazy.kv["a.str"].value
    assert isinstance(strings, StringArray) and len(strings) == 5 and strings[2] == "ĠĊ"
    assert strings == ARRAYS["a.str"][0] and list(strings) == eager.kv["a.str"].value
    assert strings != ["", "hello", "ĠĊ", "日本", "\x00y"]
    assert strings == read_gguf(tmp_path / "ref.gguf", lazy_strings=True).kv["a.str"].value
    w = _Writer(tmp_path / "copy.gguf", "llama")
    for key, v in lazy.kv.items():
        if key not in ("general.architecture", "general.alignment"):
            w.add_key_value(key, v.value, v.type, sub_type=v.sub_type)
    w.add_tensor("t", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert (tmp_path / "copy.gguf").read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_lazy_string_arrays_keep_bytes_that_are_not_utf8(tmp_path):
    """A vocabulary with a broken UTF-8 token is copied as stored (decoding it would replace the bytes)."""
    raw = [b"ok", b"\xff\xfe broken", "日本".encode()]
    w = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    w.add_key_value("tokenizer.ggml.tokens", raw, V.ARRAY, sub_type=V.STRING)
    w.add_tensor("t", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tokens = read_gguf(tmp_path / "bad.gguf", lazy_strings=True).kv["tokenizer.ggml.tokens"]
    out = tmp_path / "out.gguf"
    write_gguf(out, "llama", [("tokenizer.ggml.tokens", tokens.value, V.ARRAY, V.STRING)],
               [PlannedTensor("t", (4,), gguf.GGMLQuantizationType.F32, lambda: np.arange(4, dtype=np.float32))])
    assert out.read_bytes() == (tmp_path / "bad.gguf").read_bytes()
    assert tokens.value[1] == "\ufffd\ufffd broken"       # reading an item decodes it as the eager reader does


def test_truncated_string_array_is_a_clear_error(tmp_path):
    _write(gguf.GGUFWriter, tmp_path / "ref.gguf")
    data = (tmp_path / "ref.gguf").read_bytes()
    cut = data.index(b"hello") + 2
    (tmp_path / "cut.gguf").write_bytes(data[:cut])
    with pytest.raises(QtoolError, match="truncated GGUF header"):
        read_gguf(tmp_path / "cut.gguf", lazy_strings=True)
