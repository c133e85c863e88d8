"""qtool/gguf_io.py's fast metadata paths give the bytes gguf's own writer gives, and read back what was written."""
import gguf
import numpy as np
from gguf import GGUFValueType as V

from qtool.gguf_io import PlannedTensor, _Writer, read_gguf, write_gguf

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
