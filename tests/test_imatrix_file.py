"""Importance-matrix files: both llama.cpp formats, written and read back, and llama-quantize's normalisation.
(Byte-identity of the writers with llama-imatrix: test_interop_quantize.py.)"""
from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from qtool.errors import QtoolError
from qtool.quantize.imatrix_file import (Imatrix, ImatrixEntry, column_weights, read_imatrix, write_imatrix_dat,
                                         write_imatrix_gguf)


def entries(rng=None):
    rng = rng or np.random.default_rng(0)
    return {
        "blk.0.attn_q.weight": (rng.gamma(1.0, 3.0, 64).astype(np.float32) * 1000, np.array([1000])),
        "blk.0.ffn_down.weight": (rng.gamma(1.0, 3.0, 128).astype(np.float32) * 700, np.array([700])),
        # an expert tensor: 3 matrices, the last one never routed to
        "blk.1.ffn_up_exps.weight": (np.vstack([rng.gamma(1.0, 1.0, 32) * c for c in (300, 50, 0)]).astype(np.float32),
                                     np.array([300, 50, 0])),
    }


def test_gguf_layout_as_llama_imatrix_writes_it(tmp_path):
    path = write_imatrix_gguf(tmp_path / "i.gguf", entries(), datasets=["wiki.txt", "code.txt"], chunk_count=2,
                              chunk_size=512)
    r = gguf.GGUFReader(path)      # gguf-py's own reader: an independent parser
    kv = {f.name: f for f in r.fields.values()}
    assert list(kv) == ["GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.type", "imatrix.datasets",
                        "imatrix.chunk_count", "imatrix.chunk_size"]
    assert kv["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    assert [bytes(kv["imatrix.datasets"].parts[i]).decode() for i in kv["imatrix.datasets"].data] == ["wiki.txt",
                                                                                                       "code.txt"]
    names = [(t.name, [int(d) for d in t.shape], t.tensor_type) for t in r.tensors]
    F32 = gguf.GGMLQuantizationType.F32
    assert names == [("blk.0.attn_q.weight.in_sum2", [64], F32), ("blk.0.attn_q.weight.counts", [1], F32),
                     ("blk.0.ffn_down.weight.in_sum2", [128], F32), ("blk.0.ffn_down.weight.counts", [1], F32),
                     ("blk.1.ffn_up_exps.weight.in_sum2", [32, 3], F32),
                     ("blk.1.ffn_up_exps.weight.counts", [1, 3], F32)]
    assert all(t.data_offset % 32 == 0 for t in r.tensors)
    assert path.stat().st_size % 32 == 0
    e = entries()
    assert np.array_equal(r.tensors[0].data, e["blk.0.attn_q.weight"][0])
    assert np.array_equal(r.tensors[5].data.reshape(-1), [300.0, 50.0, 0.0])


def test_gguf_round_trip_and_weights(tmp_path):
    e = entries()
    path = write_imatrix_gguf(tmp_path / "i.gguf", e, datasets=["wiki.txt"], chunk_count=2, chunk_size=512)
    im = read_imatrix(path)
    assert (im.datasets, im.chunk_count, im.chunk_size, im.legacy) == (["wiki.txt"], 2, 512, False)
    assert list(im.entries) == sorted(e)
    for name, (sums, counts) in e.items():
        assert np.array_equal(im.entries[name].sums.reshape(-1), np.asarray(sums).reshape(-1))
        assert list(im.entries[name].counts) == list(counts)
    weights, issues = column_weights(im)
    assert np.array_equal(weights["blk.0.attn_q.weight"], e["blk.0.attn_q.weight"][0] / np.float32(1000))
    exps = weights["blk.1.ffn_up_exps.weight"].reshape(3, 32)
    assert np.array_equal(exps[1], e["blk.1.ffn_up_exps.weight"][0][1] / np.float32(50))
    assert np.all(exps[2] == 1.0)                         # an unused expert counts as "all columns equal"
    assert weights["blk.0.attn_q.weight"].dtype == np.float32
    assert issues.unused_matrices == {"blk.1.ffn_up_exps.weight": 1}
    assert "weight 1" in issues.lines()[0]


def test_dat_stores_means_times_ncall_and_reads_back(tmp_path):
    e = entries()
    path = write_imatrix_dat(tmp_path / "i.dat", e, datasets=["a.txt", "wiki.txt"], chunk_count=2, chunk_size=512)
    raw = path.read_bytes()
    assert struct.unpack_from("<i", raw)[0] == 3
    name_len = struct.unpack_from("<i", raw, 4)[0]
    assert raw[8:8 + name_len] == b"blk.0.attn_q.weight"
    ncall, nval = struct.unpack_from("<ii", raw, 8 + name_len)
    assert (ncall, nval) == (2, 64)                      # ceil(1000 / 512)
    values = np.frombuffer(raw, "<f4", 64, 16 + name_len)
    sums = e["blk.0.attn_q.weight"][0]
    assert np.array_equal(values, (sums / np.float32(1000)) * np.float32(2))
    assert raw.endswith(struct.pack("<ii", 2, 8) + b"wiki.txt")
    im = read_imatrix(path)
    assert im.legacy and (im.datasets, im.chunk_count, im.chunk_size) == (["wiki.txt"], 2, 0)
    weights, _ = column_weights(im)
    assert np.array_equal(weights["blk.0.attn_q.weight"], values / np.float32(2))
    exps = weights["blk.1.ffn_up_exps.weight"].reshape(3, 32)
    assert np.all(exps[2] == 1.0)                         # stored as 1 * ncall


def test_dat_skips_entries_without_any_data(tmp_path):
    e = entries()
    e["blk.2.attn_k.weight"] = (np.zeros(16, np.float32), np.array([0]))
    im = read_imatrix(write_imatrix_dat(tmp_path / "i.dat", e, datasets=[], chunk_count=1, chunk_size=512))
    assert "blk.2.attn_k.weight" not in im.entries and len(im.entries) == 3
    assert im.datasets == []


def test_dat_trailer_is_optional_and_ncall_zero_keeps_values(tmp_path):
    name = b"blk.0.attn_v.weight"
    body = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 0, 4)
    body += np.array([1.5, 0, 2, 3], "<f4").tobytes()
    path = tmp_path / "old.dat"
    path.write_bytes(body)
    im = read_imatrix(path)
    assert (im.chunk_count, im.datasets) == (0, [])
    weights, issues = column_weights(im)
    assert list(weights["blk.0.attn_v.weight"]) == [1.5, 0, 2, 3]
    assert issues.zero_columns == {"blk.0.attn_v.weight": 1}


def test_gguf_counts_round_half_away_from_zero(tmp_path):
    path = write_imatrix_gguf(tmp_path / "i.gguf", {"w": (np.ones(4, np.float32) * 5, [2])}, datasets=[],
                              chunk_count=0, chunk_size=512)
    raw = bytearray(path.read_bytes())
    r = gguf.GGUFReader(path)
    off = int(r.tensors[1].data_offset)
    raw[off:off + 4] = struct.pack("<f", 2.5)
    path.write_bytes(bytes(raw))
    im = read_imatrix(path)
    assert list(im.entries["w"].counts) == [3]            # lround(2.5) = 3, numpy's round would give 2
    assert list(column_weights(im)[0]["w"]) == [np.float32(5) / np.float32(3)] * 4


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(QtoolError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(struct.pack("<i", 3) + b"\x05\x00")
    with pytest.raises(QtoolError, match="not an imatrix file .*truncated"):
        read_imatrix(junk)
    empty = tmp_path / "empty.dat"
    empty.write_bytes(struct.pack("<i", 0))
    with pytest.raises(QtoolError, match="no entries"):
        read_imatrix(empty)
    # a model GGUF is not an imatrix
    model = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(model, "llama")
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QtoolError, match="missing imatrix.datasets"):
        read_imatrix(model)


def test_unpaired_or_non_f32_entries_are_refused(tmp_path):
    for tensors, message in (({"x.in_sum2": np.ones(4, np.float32)}, "x has sums but no counts"),
                             ({"x.in_sum2": np.ones(4, np.float16), "x.counts": np.ones(1, np.float32)},
                              "must be F32")):
        path = tmp_path / "bad.gguf"
        w = gguf.GGUFWriter(path, "imatrix")
        w.add_array("imatrix.datasets", ["d"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
        for name, data in tensors.items():
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(QtoolError, match=message):
            read_imatrix(path)


def test_non_finite_and_negative_weights_are_refused():
    bad = Imatrix({"w": ImatrixEntry(np.array([[1, np.inf, 2]], np.float32), np.array([4]))})
    with pytest.raises(QtoolError, match="entry w has 1 non-finite values .*column 1"):
        column_weights(bad)
    neg = Imatrix({"w": ImatrixEntry(np.array([[1, -2, 2]], np.float32), np.array([4]))})
    with pytest.raises(QtoolError, match="negative"):
        column_weights(neg)


def test_writers_check_their_input(tmp_path):
    with pytest.raises(QtoolError, match="do not match 2 counts"):
        write_imatrix_gguf(tmp_path / "x.gguf", {"w": (np.ones((3, 4)), [1, 2])}, datasets=[], chunk_count=1,
                           chunk_size=512)
    with pytest.raises(QtoolError, match="positive chunk size"):
        write_imatrix_dat(tmp_path / "x.dat", entries(), datasets=[], chunk_count=1, chunk_size=0)
    path = write_imatrix_gguf(tmp_path / "x.gguf", entries(), datasets=[], chunk_count=1, chunk_size=512)
    with pytest.raises(QtoolError, match="already exists"):
        write_imatrix_gguf(path, entries(), datasets=[], chunk_count=1, chunk_size=512)
    write_imatrix_gguf(path, entries(), datasets=["again"], chunk_count=1, chunk_size=512, force=True)
    assert read_imatrix(path).datasets == ["again"]
