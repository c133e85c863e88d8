"""`qtool quantize` end to end on small synthetic llama GGUFs: output metadata, tensor order, bytes, imatrix use,
errors, streaming and the CLI. (Byte-identity with llama-quantize itself: test_interop_quantize.py.)

The model writers here are shared by the other quantize tests and by benchmarks/quantize_speed.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T, GGUFValueType

from qtool.cli import main
from qtool.errors import QtoolError
from qtool.gguf_io import read_gguf, tensor_nbytes
from qtool.quantize.imatrix_file import write_imatrix_dat, write_imatrix_gguf
from qtool.quantize.mixtures import FileType, llama_tensor_order
from qtool.quantize.quantizer import (ProgressUpdate, QuantizeOptions, default_output_path, plan_quantization,
                                      quantize_model)

# --- synthetic models -------------------------------------------------------------------------------------------


def llama_tensors(n_layer: int, hidden: int, ffn: int, n_head: int, n_head_kv: int, vocab: int, *,
                  tied: bool = False, dtype: T = T.F16) -> list[tuple[str, tuple[int, ...], T]]:
    """A llama model's tensor list (numpy shapes), in the order llama.cpp's converter writes it."""
    head_dim = hidden // n_head
    tensors = [("token_embd.weight", (vocab, hidden), dtype)]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", (hidden,), T.F32),
                    (p + "attn_q.weight", (hidden, hidden), dtype),
                    (p + "attn_k.weight", (n_head_kv * head_dim, hidden), dtype),
                    (p + "attn_v.weight", (n_head_kv * head_dim, hidden), dtype),
                    (p + "attn_output.weight", (hidden, hidden), dtype),
                    (p + "ffn_norm.weight", (hidden,), T.F32),
                    (p + "ffn_gate.weight", (ffn, hidden), dtype),
                    (p + "ffn_up.weight", (ffn, hidden), dtype),
                    (p + "ffn_down.weight", (hidden, ffn), dtype)]
    tensors.append(("output_norm.weight", (hidden,), T.F32))
    if not tied:
        tensors.append(("output.weight", (vocab, hidden), dtype))
    return tensors


def _llama_kvs(writer: gguf.GGUFWriter, n_layer, hidden, ffn, n_head, n_head_kv, vocab, name) -> None:
    writer.add_name(name)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(hidden // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types([1] * vocab)


def tensor_data(name: str, shape, qtype: T, rng: np.random.Generator) -> np.ndarray:
    """Weights with the features quantizers care about: varying scales per row and block, outliers, zeros."""
    if len(shape) == 1:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32) * 0.02
    x *= np.exp(rng.standard_normal((shape[0], 1)).astype(np.float32) * 0.5)        # row scales
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, size=max(1, flat.size // 5000))] *= 30.0         # outliers
    if shape[-1] >= 64:
        x[0, :32] = 0.0                                                              # an all-zero block
    if shape[0] >= 4:
        x[1] = np.round(x[1] / 0.01) * 0.01          # a coarse grid: equal |x| of both signs (first-max ties)
        x[2, 1::2] = -x[2, 0::2]                     # every block has ± pairs of the same magnitude
        x[3] = 0.02                                                                  # a constant row
    return x


def write_llama_gguf(path: Path, *, n_layer=4, hidden=256, ffn=512, n_head=8, n_head_kv=2, vocab=320, tied=False,
                     dtype: T = T.F16, seed=0, sparse=False, extra_tensors=(), name="synthetic") -> Path:
    """A llama GGUF as qtool convert would write it. `sparse`: header only, data a hole (for type-choice tests on
    realistic shapes); otherwise random data."""
    tensors = llama_tensors(n_layer, hidden, ffn, n_head, n_head_kv, vocab, tied=tied, dtype=dtype)
    tensors += list(extra_tensors)
    writer = gguf.GGUFWriter(path, "llama")
    _llama_kvs(writer, n_layer, hidden, ffn, n_head, n_head_kv, vocab, name)
    for tname, shape, qtype in tensors:
        writer.add_tensor_info(tname, gguf.quant_shape_to_byte_shape(shape, qtype), np.dtype(np.uint8),
                               tensor_nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if sparse:
        writer.close()
        header = os.path.getsize(path)
        size = -(-header // 32) * 32 + sum(-(-tensor_nbytes(s, q) // 32) * 32 for _, s, q in tensors)
        os.truncate(path, size)
        return path
    rng = np.random.default_rng(seed)
    for tname, shape, qtype in tensors:      # one tensor at a time: the benchmark's 1B model is 2.5 GB
        data = gguf.quants.quantize(tensor_data(tname, shape, qtype, rng), qtype)
        writer.write_tensor_data(data.view(np.uint8))
        del data
    writer.close()
    return path


def random_imatrix_entries(gguf_path: Path, seed=1, zero_columns=0) -> dict:
    """Random positive sums for every matmul weight of the blocks (what llama-imatrix collects)."""
    rng = np.random.default_rng(seed)
    entries = {}
    for t in read_gguf(gguf_path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n = t.shape[-1]
            count = int(rng.integers(512, 4096))
            sums = (rng.gamma(0.7, 1.0, n) * count).astype(np.float32)
            sums[:zero_columns] = 0.0
            entries[t.name] = (sums, np.array([count]))
    return entries


def write_random_imatrix(gguf_path: Path, out: Path, fmt="gguf", seed=1, zero_columns=0) -> Path:
    entries = random_imatrix_entries(gguf_path, seed, zero_columns)
    writer = write_imatrix_gguf if fmt == "gguf" else write_imatrix_dat
    writer(out, entries, datasets=["calibration.txt"], chunk_count=7, chunk_size=512, force=True)
    return out


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    return write_llama_gguf(tmp_path_factory.mktemp("model") / "tiny-F16.gguf")


# --- output file ------------------------------------------------------------------------------------------------


def test_default_output_name():
    assert default_output_path("/m/SmolLM2-135M-F16.gguf", FileType.Q4_K_M) == Path("/m/SmolLM2-135M-Q4_K_M.gguf")
    assert default_output_path("m/x.f16.gguf", FileType.Q8_0) == Path("m/x.Q8_0.gguf")
    assert default_output_path("a-Q4_1-bf16.gguf", FileType.Q6_K) == Path("a-Q4_1-Q6_K.gguf")
    assert default_output_path("model.gguf", FileType.IQ4_XS) == Path("model-IQ4_XS.gguf")
    assert default_output_path("Qwen2-7B-q4_k_m.gguf", FileType.Q5_K_S) == Path("Qwen2-7B-Q5_K_S.gguf")


def test_q8_0_output_matches_gguf_reference(small_model, tmp_path):
    """Without an imatrix, Q8_0 is gguf-py's exact port of llama.cpp: every byte of our output must equal it."""
    out = tmp_path / "q8.gguf"
    report = quantize_model(small_model, out, QuantizeOptions(FileType.Q8_0))
    src, dst = read_gguf(small_model), read_gguf(out)
    src_by_name = {t.name: t for t in src.tensors}
    assert [t.name for t in dst.tensors] == llama_tensor_order([t.name for t in src.tensors])
    for t in dst.tensors:
        s = src_by_name[t.name]
        if len(s.shape) == 1:
            assert t.qtype == T.F32 and bytes(dst.raw(t)) == bytes(src.raw(s))
            continue
        assert t.qtype == T.Q8_0
        expected = gguf.quants.quantize(src.array(s), T.Q8_0)
        assert np.array_equal(np.asarray(dst.raw(t)).reshape(-1), expected.view(np.uint8).reshape(-1)), t.name
        assert t.offset % 32 == 0
    assert report.output_bytes == sum(t.nbytes for t in dst.tensors)


def test_metadata_as_llama_quantize_writes_it(small_model, tmp_path):
    imatrix = write_random_imatrix(small_model, tmp_path / "imatrix.gguf")
    out = tmp_path / "q.gguf"
    quantize_model(small_model, out, QuantizeOptions(FileType.Q8_0, imatrix=str(imatrix)))
    src, dst = read_gguf(small_model), read_gguf(out)
    src_keys = [k for k in src.kv if k not in ("general.file_type", "general.quantization_version")]
    keys = list(dst.kv)
    assert keys[:len(src_keys)] == src_keys
    assert keys[len(src_keys):] == ["general.quantization_version", "general.file_type", "quantize.imatrix.file",
                                    "quantize.imatrix.dataset", "quantize.imatrix.entries_count",
                                    "quantize.imatrix.chunks_count"]
    for k in src_keys:
        assert dst.kv[k] == src.kv[k], k
    assert dst.kv["general.file_type"].value == 7 and dst.kv["general.file_type"].type == GGUFValueType.UINT32
    assert dst.kv["general.quantization_version"].value == 2
    assert dst.kv["general.quantization_version"].type == GGUFValueType.UINT32
    assert dst.value("quantize.imatrix.file") == str(imatrix)
    assert dst.value("quantize.imatrix.dataset") == "calibration.txt"
    assert dst.value("quantize.imatrix.entries_count") == 4 * 7
    assert dst.kv["quantize.imatrix.entries_count"].type == GGUFValueType.UINT32
    assert dst.value("quantize.imatrix.chunks_count") == 7


def test_requantizing_keeps_the_metadata_position_rules(small_model, tmp_path):
    """A second run (Q8_0 → Q8_0 with --allow-requantize) is a pure copy with the keys already at the end."""
    q8 = tmp_path / "q8.gguf"
    quantize_model(small_model, q8, QuantizeOptions(FileType.Q8_0))
    again = tmp_path / "again.gguf"
    quantize_model(q8, again, QuantizeOptions(FileType.Q8_0, allow_requantize=True))
    assert again.read_bytes() == q8.read_bytes()


def test_float_file_types_are_copies_or_exact_conversions(small_model, tmp_path):
    out = tmp_path / "f32.gguf"
    quantize_model(small_model, out, QuantizeOptions(FileType.F32))
    src, dst = read_gguf(small_model), read_gguf(out)
    by = {t.name: t for t in src.tensors}
    for t in dst.tensors:
        assert t.qtype == T.F32
        assert np.array_equal(dst.array(t), src.array(by[t.name]))
    bf = tmp_path / "bf16.gguf"
    quantize_model(out, bf, QuantizeOptions(FileType.BF16))
    for t in read_gguf(bf).tensors:
        s = by[t.name]
        if len(s.shape) == 2:
            assert t.qtype == T.BF16
            assert bytes(read_gguf(bf).raw(t)) == gguf.quants.quantize(src.array(s), T.BF16).tobytes()


def test_requantizing_needs_the_flag(tmp_path):
    q41 = write_llama_gguf(tmp_path / "m.gguf", dtype=T.Q4_1)
    with pytest.raises(QtoolError, match=r"already quantized \(Q4_1\).*--allow-requantize"):
        quantize_model(q41, tmp_path / "o.gguf", QuantizeOptions(FileType.Q8_0))
    assert not (tmp_path / "o.gguf").exists()
    report = quantize_model(q41, tmp_path / "o.gguf", QuantizeOptions(FileType.Q8_0, allow_requantize=True))
    dst, src = read_gguf(tmp_path / "o.gguf"), read_gguf(q41)
    by = {t.name: t for t in src.tensors}
    t = next(t for t in dst.tensors if t.name == "blk.0.attn_q.weight")
    expected = gguf.quants.quantize(src.array(by[t.name]), T.Q8_0)
    assert bytes(dst.raw(t)) == expected.tobytes()
    assert report.by_type["Q8_0"].tensors == 4 * 7 + 2


def test_progress_reports_every_tensor_and_ends_at_the_total(small_model, tmp_path):
    updates: list[ProgressUpdate] = []
    quantize_model(small_model, tmp_path / "o.gguf", QuantizeOptions(FileType.Q4_0), progress=updates.append)
    n = len(read_gguf(small_model).tensors)
    assert {u.tensor_index for u in updates} == set(range(n))
    assert updates[-1].work_done == updates[-1].work_total == sum(t.nbytes for t in read_gguf(small_model).tensors)
    done = [u.work_done for u in updates]
    assert done == sorted(done)


def test_dry_run_writes_nothing_and_reports_sizes(small_model, tmp_path):
    report = quantize_model(small_model, tmp_path / "o.gguf", QuantizeOptions(FileType.Q4_0), dry_run=True)
    assert not (tmp_path / "o.gguf").exists()
    assert report.output_path is None
    real = quantize_model(small_model, tmp_path / "o.gguf", QuantizeOptions(FileType.Q4_0))
    assert report.output_bytes == real.output_bytes
    assert report.bits_per_weight == pytest.approx(8 * real.output_bytes / real.n_params)


def test_existing_output_needs_force(small_model, tmp_path):
    out = tmp_path / "o.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(QtoolError, match="already exists"):
        quantize_model(small_model, out, QuantizeOptions(FileType.Q8_0))
    assert out.read_bytes() == b"keep me"
    quantize_model(small_model, out, QuantizeOptions(FileType.Q8_0, force=True))
    assert out.read_bytes()[:4] == b"GGUF"


def test_same_input_and_output_is_refused(small_model):
    with pytest.raises(QtoolError, match="same file"):
        quantize_model(small_model, small_model, QuantizeOptions(FileType.Q8_0, force=True))


@pytest.mark.parametrize("dtype, bad, shown", [(np.float32, np.nan, "nan"), (np.float16, np.nan, "nan"),
                                               (np.float16, -np.inf, "-inf"), (np.float16, np.inf, "inf")])
@pytest.mark.parametrize("ftype", [FileType.Q8_0, FileType.Q4_K_M])
def test_nan_in_the_source_is_a_clear_error_and_leaves_no_file(tmp_path, dtype, bad, shown, ftype):
    """F16 rows are checked while they are decoded, F32 rows by the format: the same one-line error either way."""
    path = tmp_path / "m.gguf"
    tensors = llama_tensors(1, 256, 512, 4, 4, 64, dtype=T.F32)
    writer = gguf.GGUFWriter(path, "llama")
    _llama_kvs(writer, 1, 256, 512, 4, 4, 64, "nan")
    for name, shape, qtype in tensors:
        x = np.ones(shape, dtype=np.float32 if len(shape) == 1 else dtype)
        if name == "blk.0.ffn_up.weight":
            x[5, 3] = bad
        writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QtoolError,
                       match=rf"blk\.0\.ffn_up\.weight: row 5 has a non-finite value \({shown} at column 3\)"):
        quantize_model(path, tmp_path / "o.gguf", QuantizeOptions(ftype))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_an_overflowing_block_scale_names_the_tensor_row_and_block(tmp_path):
    """Finite F16 input whose Q4_0 scale (max / -8) overflows fp16: llama-quantize's validation rejects it too."""
    path = tmp_path / "m.gguf"
    tensors = llama_tensors(1, 256, 512, 4, 4, 64, dtype=T.F32)
    writer = gguf.GGUFWriter(path, "llama")
    _llama_kvs(writer, 1, 256, 512, 4, 4, 64, "overflow")
    for name, shape, qtype in tensors:
        x = np.ones(shape, dtype=np.float32)
        if name == "blk.0.ffn_up.weight":
            x[7, 70] = 3e38
        writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QtoolError, match=r"blk\.0\.ffn_up\.weight: Q4_0: row 7, block 2: a block scale overflows"):
        quantize_model(path, tmp_path / "o.gguf", QuantizeOptions(FileType.Q4_0, pure=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_f16_overflow_is_refused_like_llama_quantize(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _llama_kvs(writer, 1, 64, 128, 4, 4, 64, "big")
    for name, shape, qtype in llama_tensors(1, 64, 128, 4, 4, 64, dtype=T.F32):
        x = np.full(shape, 0.5, dtype=np.float32)
        if name == "blk.0.attn_q.weight":
            x[2, 0] = 70000.0
        writer.add_tensor(name, x)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QtoolError, match=r"blk\.0\.attn_q\.weight: F16: row 2, column 0: a value overflows F16"):
        quantize_model(path, tmp_path / "o.gguf", QuantizeOptions(FileType.F16))


# --- importance matrices in the pipeline -------------------------------------------------------------------------


def test_q2_k_s_needs_an_imatrix(small_model, tmp_path):
    with pytest.raises(QtoolError, match=r"Q2_K_S needs an importance matrix \(--imatrix\) for tensor blk\.0\."):
        quantize_model(small_model, tmp_path / "o.gguf", QuantizeOptions(FileType.Q2_K_S))
    # a dry run only warns, as llama-quantize's does
    report = quantize_model(small_model, None, QuantizeOptions(FileType.Q2_K_S), dry_run=True)
    assert report.output_path is None
    assert any("warning: the real run will fail" in n for n in report.notes)


def test_a_file_type_without_its_block_format_is_planned_but_not_written(small_model, tmp_path, monkeypatch):
    """A file type whose block format qtool lacks (every i-quant was once; here IQ1_S's is taken out of the format
    table): --dry-run shows llama-quantize's plan, a real run is one clear error (checked before any imatrix
    requirement), and no file appears."""
    from qtool.quantize import formats
    from qtool.quantize.mixtures import is_writable
    monkeypatch.delitem(formats.FORMATS, T.IQ1_S)
    assert not is_writable(FileType.IQ1_S) and is_writable(FileType.IQ2_XXS)
    out = tmp_path / "o.gguf"
    with pytest.raises(QtoolError, match=r"IQ1_S needs .*IQ1_S.* tensors, a block format qtool cannot write yet"):
        quantize_model(small_model, out, QuantizeOptions(FileType.IQ1_S))
    assert not out.exists() and not list(tmp_path.iterdir())
    report = quantize_model(small_model, None, QuantizeOptions(FileType.IQ1_S), dry_run=True)
    assert any("cannot write yet" in n for n in report.notes)
    assert any("make one with `qtool imatrix`" in n for n in report.notes)


def test_q2_k_s_needs_an_entry_for_every_q2_k_tensor(small_model, tmp_path):
    entries = random_imatrix_entries(small_model)
    del entries["blk.1.attn_q.weight"]
    path = write_imatrix_gguf(tmp_path / "i.gguf", entries, datasets=[], chunk_count=1, chunk_size=512)
    with pytest.raises(QtoolError, match=r"needs an imatrix entry for tensor blk\.1\.attn_q\.weight"):
        quantize_model(small_model, tmp_path / "o.gguf", QuantizeOptions(FileType.Q2_K_S, imatrix=path))
    assert not (tmp_path / "o.gguf").exists()


def test_imatrix_of_another_model_is_refused(small_model, tmp_path):
    other = write_llama_gguf(tmp_path / "other.gguf", n_layer=6, hidden=256, ffn=768)
    imatrix = write_random_imatrix(other, tmp_path / "other-imatrix.gguf")
    with pytest.raises(QtoolError, match=r"entries name tensors this model does not have.*another model"):
        plan_quantization(small_model, QuantizeOptions(FileType.Q4_K_M, imatrix=imatrix))
    entries = {k: v for k, v in random_imatrix_entries(other).items() if k.startswith(("blk.0.", "blk.1."))}
    mismatch = write_imatrix_gguf(tmp_path / "sizes.gguf", entries, datasets=[], chunk_count=1, chunk_size=512)
    with pytest.raises(QtoolError, match=r"entry blk\.0\.ffn_down\.weight has 768 values but the tensor has 512"):
        plan_quantization(small_model, QuantizeOptions(FileType.Q4_K_M, imatrix=mismatch))


def test_imatrix_gaps_and_zero_columns_are_reported(small_model, tmp_path):
    entries = random_imatrix_entries(small_model)
    del entries["blk.2.ffn_up.weight"]
    entries["blk.0.attn_q.weight"][0][:10] = 0
    path = write_imatrix_gguf(tmp_path / "i.gguf", entries, datasets=["d"], chunk_count=3, chunk_size=512)
    plan = plan_quantization(small_model, QuantizeOptions(FileType.Q4_0, imatrix=path))
    assert plan.imatrix_use["blk.2.ffn_up.weight"] == "no entry"
    assert plan.imatrix_use["blk.0.attn_q.weight"] == "used"
    assert plan.imatrix_use["output.weight"] == "no entry"
    text = "\n".join(plan.notes)
    assert "10 imatrix columns in 1 entries are zero" in text
    assert "no imatrix entry" in text and "blk.2.ffn_up.weight" in text


def test_imatrix_nan_is_refused(small_model, tmp_path):
    entries = random_imatrix_entries(small_model)
    entries["blk.3.ffn_down.weight"][0][7] = np.nan
    path = write_imatrix_dat(tmp_path / "i.dat", entries, datasets=[], chunk_count=1, chunk_size=512)
    with pytest.raises(QtoolError, match=r"imatrix entry blk\.3\.ffn_down\.weight has 1 non-finite values"):
        plan_quantization(small_model, QuantizeOptions(FileType.Q4_K_M, imatrix=path))


def test_imatrix_changes_the_q4_0_ffn_down_rule(tmp_path):
    model = write_llama_gguf(tmp_path / "m.gguf", n_layer=16, sparse=True)
    imatrix = write_random_imatrix(model, tmp_path / "i.gguf")
    without = plan_quantization(model, QuantizeOptions(FileType.Q4_0))
    with_ = plan_quantization(model, QuantizeOptions(FileType.Q4_0, imatrix=imatrix))
    types = {c.name: c.target_type for c in with_.choices}
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [T.Q4_1, T.Q4_1, T.Q4_0, T.Q4_0]
    assert {c.name: c.target_type for c in without.choices if "ffn_down" in c.name} == {
        f"blk.{i}.ffn_down.weight": T.Q4_0 for i in range(16)}
    assert with_.imatrix_use["blk.0.ffn_down.weight"] == "used"
    assert with_.imatrix_use["token_embd.weight"] == "no entry"


# --- the command --------------------------------------------------------------------------------------------------


def test_cli_quantize_prints_the_report(small_model, tmp_path):
    out = tmp_path / "x-Q4_0.gguf"
    res = CliRunner().invoke(main, ["quantize", str(small_model), str(out), "--type", "q4_0",
                                    "--tensor-type", "ATTN_V=q8_0", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert out.exists()
    assert "Q8_0" in res.output and "Q4_0" in res.output and "bits per weight" in res.output
    types = {t.name: t.qtype for t in read_gguf(out).tensors}
    assert types["blk.0.attn_v.weight"] == T.Q8_0 and types["blk.0.attn_q.weight"] == T.Q4_0


def test_cli_default_output_name_and_errors(small_model, tmp_path):
    src = tmp_path / "model-F16.gguf"
    src.write_bytes(small_model.read_bytes())
    res = CliRunner().invoke(main, ["quantize", str(src), "--type", "Q8_0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "model-Q8_0.gguf").exists()
    res = CliRunner().invoke(main, ["quantize", str(src), "--type", "Q8_0"])
    assert res.exit_code == 2 and "already exists" in res.output
    (tmp_path / "out").mkdir()
    res = CliRunner().invoke(main, ["quantize", str(src), str(tmp_path / "out"), "--type", "q4_1"])
    assert res.exit_code == 0 and (tmp_path / "out" / "model-Q4_1.gguf").exists()
    res = CliRunner().invoke(main, ["quantize", str(src), "--type", "Q3_0"])
    assert res.exit_code == 2 and "unsupported file type 'Q3_0'" in res.output
    res = CliRunner().invoke(main, ["quantize", str(src), "--type", "q4_k", "--tensor-type", "attn_v"])
    assert res.exit_code == 2 and "PATTERN=TYPE" in res.output
    res = CliRunner().invoke(main, ["quantize", str(src)])
    assert res.exit_code == 2 and "--type" in res.output


def test_cli_list_prints_every_type():
    res = CliRunner().invoke(main, ["quantize", "--list"])
    assert res.exit_code == 0, res.output
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                 "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS", "F16", "BF16", "F32", "TQ1_0",
                 "TQ2_0", "Q1_0", "Q2_0", "COPY"):
        assert name in res.output
    assert "4.8944" in res.output and "+0.1754 ppl @ Llama-3-8B" in res.output
    assert "1.69 bpw ternarization" in res.output and "1.125 bpw quantization" in res.output
    assert "2.25 bpw quantization (gr" in res.output    # (group 64), cut to the test terminal's width


def test_cli_dry_run_of_the_ternary_and_copy_types(tmp_path):
    path = write_llama_gguf(tmp_path / "odd-F16.gguf", hidden=256, ffn=736, n_head=4, n_head_kv=4, sparse=True)
    res = CliRunner().invoke(main, ["quantize", str(path), "--type", "TQ2_0", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "fell back" in res.output and "736" in res.output and "Q4_0" in res.output and "TQ2_0" in res.output
    res = CliRunner().invoke(main, ["quantize", str(path), "--type", "copy", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "COPY" in res.output and "fell back" not in res.output
    res = CliRunner().invoke(main, ["quantize", str(path), "--type", "Q1_0", "--dry-run"])
    assert res.exit_code == 2 and "no fallback type is defined for Q1_0: row length 736" in res.output


def test_cli_dry_run_shows_fallbacks(tmp_path):
    path = write_llama_gguf(tmp_path / "odd.gguf", hidden=192, ffn=384, n_head=4, n_head_kv=4, sparse=True)
    res = CliRunner().invoke(main, ["quantize", str(path), "--type", "Q4_K_M", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "fell back" in res.output and "192" in res.output and "Q5_0" in res.output


_PEAK_RSS = """
import resource, sys
import qtool
from qtool.quantize.mixtures import FileType
from qtool.quantize.quantizer import QuantizeOptions, quantize_model
quantize_model(sys.argv[1], sys.argv[2], QuantizeOptions(FileType.Q8_0))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_memory_stays_near_one_tensor(tmp_path):
    """Streaming: the process's peak RSS (numba's and numpy's buffers, mapped files, all of it) grows by about the
    largest output tensor plus two slabs over a tiny model's run, not by the model."""
    import subprocess
    import sys

    from qtool.quantize.quantizer import SLAB_ELEMENTS
    model = write_llama_gguf(tmp_path / "m.gguf", n_layer=4, hidden=1024, ffn=4096, n_head=8, n_head_kv=8,
                             vocab=256)
    tiny = write_llama_gguf(tmp_path / "tiny.gguf", n_layer=1, hidden=256, ffn=512, n_head=8, n_head_kv=8, vocab=256)
    src = read_gguf(model)
    total_out = sum(tensor_nbytes(t.shape, T.Q8_0) for t in src.tensors)
    largest_out = max(tensor_nbytes(t.shape, T.Q8_0) for t in src.tensors)
    slabs = SLAB_ELEMENTS * (2 + 4 + 34 / 32)         # f16 source, float32 copy, quantized slab

    def peak_rss(path: Path) -> int:
        out = tmp_path / f"{path.stem}-q8.gguf"
        r = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(path), str(out)], capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        out.unlink()
        return int(r.stdout.split()[-1])

    base, peak = peak_rss(tiny), peak_rss(model)     # measured: 155 MB and 184 MB (135 MB of F16 in)
    grown = peak - base
    sizes = (f"peak RSS {peak / 1e6:.1f} MB, {grown / 1e6:.1f} MB over a tiny model's; largest output "
             f"{largest_out / 1e6:.1f} MB, slabs {slabs / 1e6:.1f} MB, all outputs {total_out / 1e6:.1f} MB")
    assert grown < largest_out + slabs + 8e6, sizes
    assert grown < 0.6 * total_out, sizes
