"""`qtool quantize` against the built llama-quantize: same tensor types, same bytes, same file.

* every file type × {no imatrix, GGUF imatrix, legacy .dat imatrix} on a small synthetic F16 llama (8 layers, GQA 4,
  rows multiples of 256 so every K-quant path runs): the two output files must be byte-identical — metadata, tensor
  order, types, data and padding; a failure names the tensors that differ and the fraction of differing rows;
* the same on SmolLM2-135M (576-wide rows: the shape fallbacks, tied embeddings), marked slow;
* type choices on realistic 32-layer shapes through `--dry-run` (sparse files: no data is read);
* our imatrix writers against llama-imatrix re-saving the same data (`--in-file`), both formats.

Tools come from tests/build_llamacpp.py; without them these tests skip locally and fail under CI.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qtool.errors import QtoolError
from qtool.gguf_io import read_gguf
from qtool.quantize.imatrix_file import write_imatrix_dat, write_imatrix_gguf
from qtool.quantize.mixtures import FileType, MixtureOptions, ModelInfo, choose_tensor_types, is_writable
from qtool.quantize.quantizer import QuantizeOptions, quantize_model
from tests.interop import need_tool, smollm2_files
from tests.test_quantize import random_imatrix_entries, write_llama_gguf

pytestmark = pytest.mark.interop

THREADS = 2


@pytest.fixture(scope="module")
def llama_quantize() -> Path:
    return need_tool("llama-quantize")


def run_llama_quantize(tool: Path, src: Path, dst: Path, ftype: FileType, imatrix: Path | None = None,
                       extra=(), check=True) -> subprocess.CompletedProcess:
    cmd = [str(tool), *extra]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    cmd += [str(src)] + ([str(dst)] if dst is not None else []) + [ftype.name, str(THREADS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"llama-quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def differences(ours: Path, theirs: Path) -> list[str]:
    """Everything that differs between two GGUF files, tensor by tensor, with the fraction of differing rows."""
    a, b = read_gguf(ours), read_gguf(theirs)
    problems = []
    if list(a.kv) != list(b.kv):
        problems.append(f"metadata keys differ: {list(a.kv)[-6:]} vs {list(b.kv)[-6:]}")
    else:
        problems += [f"metadata {k}: {a.kv[k]} vs {b.kv[k]}" for k in a.kv if a.kv[k] != b.kv[k]]
    names_a, names_b = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if names_a != names_b:
        return problems + [f"tensor order differs: {names_a[:5]} vs {names_b[:5]}"]
    for ta, tb in zip(a.tensors, b.tensors):
        if (ta.qtype, ta.shape) != (tb.qtype, tb.shape):
            problems.append(f"{ta.name}: {ta.qtype.name} {ta.shape} vs {tb.qtype.name} {tb.shape}")
            continue
        ra, rb = np.asarray(a.raw(ta)), np.asarray(b.raw(tb))
        if not np.array_equal(ra, rb):
            rows_a, rows_b = ra.reshape(-1, ra.shape[-1]), rb.reshape(-1, rb.shape[-1])
            bad = (rows_a != rows_b).any(axis=1)
            problems.append(f"{ta.name} ({ta.qtype.name}): {bad.sum()}/{bad.size} rows differ "
                            f"({100 * bad.mean():.2f} %)")
    if not problems and ours.read_bytes() != theirs.read_bytes():
        problems.append("tensors and metadata agree but the files differ (padding or alignment)")
    return problems


def assert_same_file(ours: Path, theirs: Path) -> None:
    problems = differences(ours, theirs)
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:40])


# --- a small model where every K-quant runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interop-quantize")


@pytest.fixture(scope="module")
def small_f16(model_dir) -> Path:
    return write_llama_gguf(model_dir / "small-F16.gguf", n_layer=8, hidden=256, ffn=768, n_head=8, n_head_kv=2,
                            vocab=512, seed=3)


@pytest.fixture(scope="module")
def small_imatrices(model_dir, small_f16) -> dict[str, Path]:
    entries = random_imatrix_entries(small_f16, seed=5, zero_columns=3)
    return {
        "gguf": write_imatrix_gguf(model_dir / "small-imatrix.gguf", entries, datasets=["calib.txt"],
                                   chunk_count=6, chunk_size=512, force=True),
        "dat": write_imatrix_dat(model_dir / "small-imatrix.dat", entries, datasets=["calib.txt"],
                                 chunk_count=6, chunk_size=512, force=True),
    }


# file types with a tensor type llama-quantize refuses to write without an importance matrix
NEED_IMATRIX = {FileType.Q2_K_S, FileType.IQ2_XXS, FileType.IQ2_XS, FileType.IQ2_S, FileType.IQ2_M, FileType.IQ1_S,
                FileType.IQ1_M, FileType.IQ3_XXS, FileType.IQ3_XS}
WRITABLE = [f for f in FileType if is_writable(f)]


@pytest.mark.parametrize("imatrix", [None, "gguf", "dat"])
@pytest.mark.parametrize("ftype", WRITABLE, ids=lambda f: f.name)
def test_small_model_identical_to_llama_quantize(llama_quantize, small_f16, small_imatrices, tmp_path, ftype,
                                                 imatrix):
    im = small_imatrices[imatrix] if imatrix else None
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qtool.gguf"
    if ftype in NEED_IMATRIX and im is None:
        proc = run_llama_quantize(llama_quantize, small_f16, theirs, ftype, check=False)
        assert proc.returncode != 0 and "requires an imatrix" in proc.stderr
        with pytest.raises(QtoolError, match="needs an importance matrix"):
            quantize_model(small_f16, ours, QuantizeOptions(ftype, threads=THREADS))
        return
    run_llama_quantize(llama_quantize, small_f16, theirs, ftype, im)
    quantize_model(small_f16, ours, QuantizeOptions(ftype, imatrix=str(im) if im else None, threads=THREADS))
    assert_same_file(ours, theirs)


@pytest.mark.parametrize("extra, options", [
    (["--pure"], dict(pure=True)),
    (["--leave-output-tensor"], dict(leave_output_tensor=True)),
    (["--output-tensor-type", "q8_0", "--token-embedding-type", "q5_k"],
     dict(output_tensor_type="Q8_0", token_embedding_type="Q5_K")),
    (["--tensor-type", "attn_v=q8_0", "--tensor-type", r"blk\.[0-3]\.ffn=Q6_K"],
     dict(tensor_types=["attn_v=q8_0", r"blk\.[0-3]\.ffn=Q6_K"])),
], ids=["pure", "leave-output", "output-and-embedding", "tensor-type"])
def test_options_identical_to_llama_quantize(llama_quantize, small_f16, tmp_path, extra, options):
    from qtool.quantize.mixtures import TensorTypeOverride, parse_tensor_type
    opts = dict(options)
    for key in ("output_tensor_type", "token_embedding_type"):
        if key in opts:
            opts[key] = parse_tensor_type(opts[key])
    if "tensor_types" in opts:
        opts["tensor_types"] = [TensorTypeOverride.parse(t) for t in opts["tensor_types"]]
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qtool.gguf"
    run_llama_quantize(llama_quantize, small_f16, theirs, FileType.Q4_K_M, extra=extra)
    quantize_model(small_f16, ours, QuantizeOptions(FileType.Q4_K_M, threads=THREADS, **opts))
    assert_same_file(ours, theirs)


def test_requantize_identical_to_llama_quantize(llama_quantize, small_f16, tmp_path):
    q8 = tmp_path / "q8.gguf"
    run_llama_quantize(llama_quantize, small_f16, q8, FileType.Q8_0)
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qtool.gguf"
    proc = run_llama_quantize(llama_quantize, q8, theirs, FileType.Q4_K_S, check=False)
    assert proc.returncode != 0 and "requantizing from type q8_0 is disabled" in proc.stderr
    with pytest.raises(QtoolError, match="already quantized"):
        quantize_model(q8, ours, QuantizeOptions(FileType.Q4_K_S))
    run_llama_quantize(llama_quantize, q8, theirs, FileType.Q4_K_S, extra=["--allow-requantize"])
    quantize_model(q8, ours, QuantizeOptions(FileType.Q4_K_S, allow_requantize=True, threads=THREADS))
    assert_same_file(ours, theirs)


# --- the 1- and 2-bit file types on rows that are not whole blocks; COPY of any input ---------------------------


@pytest.fixture(scope="module")
def odd_f16(model_dir) -> Path:
    """FFN width 736: a multiple of 32, not of 128 or 256 (ffn_down falls back, or has no fallback)."""
    return write_llama_gguf(model_dir / "odd-F16.gguf", n_layer=4, hidden=256, ffn=736, n_head=8, n_head_kv=2,
                            vocab=384, seed=8)


@pytest.mark.parametrize("ftype", [FileType.TQ1_0, FileType.TQ2_0, FileType.Q2_0], ids=lambda f: f.name)
def test_low_bit_fallbacks_identical_to_llama_quantize(llama_quantize, odd_f16, tmp_path, ftype):
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qtool.gguf"
    run_llama_quantize(llama_quantize, odd_f16, theirs, ftype)
    report = quantize_model(odd_f16, ours, QuantizeOptions(ftype, threads=THREADS))
    assert_same_file(ours, theirs)
    assert {c.name for c in report.fallbacks} == {f"blk.{i}.ffn_down.weight" for i in range(4)}
    assert {c.target_type.name for c in report.fallbacks} == {"Q4_0"}
    embd = next(t.choice for t in report.tensors if t.choice.name == "token_embd.weight")
    assert embd.target_type.name == "Q4_K"          # llama-quant's token_embd rule for TQ1_0/TQ2_0/Q2_0


def test_q1_0_without_a_fallback_is_refused_by_both(llama_quantize, odd_f16, tmp_path):
    proc = run_llama_quantize(llama_quantize, odd_f16, tmp_path / "llama.gguf", FileType.Q1_0, check=False)
    assert proc.returncode != 0 and "no tensor type fallback is defined for type q1_0" in proc.stderr
    with pytest.raises(QtoolError, match="no fallback type is defined for Q1_0: row length 736"):
        quantize_model(odd_f16, tmp_path / "qtool.gguf", QuantizeOptions(FileType.Q1_0))


def _without_file_type(src: Path, dst: Path) -> Path:
    from qtool.gguf_io import PlannedTensor, write_gguf

    gf = read_gguf(src)
    kvs = [kv for key, kv in gf.kv.items() if key != "general.file_type"]
    tensors = [PlannedTensor(t.name, t.shape, t.qtype, lambda t=t: np.asarray(gf.raw(t)).reshape(-1))
               for t in gf.tensors]
    write_gguf(dst, None, kvs, tensors)
    return dst


@pytest.mark.parametrize("source", ["F16", "F16 without file type", "Q4_K_M", "Q4_K_M without file type"])
def test_copy_identical_to_llama_quantize(llama_quantize, small_f16, tmp_path, source):
    """COPY: every tensor as it is (a quantized input too, without --allow-requantize); general.file_type is the
    input's, or llama.cpp's guess from the tensor types with the GUESSED flag (1024) when the input has none."""
    src = small_f16
    if source.startswith("Q4_K_M"):
        src = tmp_path / "q4km.gguf"
        run_llama_quantize(llama_quantize, small_f16, src, FileType.Q4_K_M)
    if source.endswith("without file type"):
        src = _without_file_type(src, tmp_path / "no-file-type.gguf")
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qtool.gguf"
    run_llama_quantize(llama_quantize, src, theirs, FileType.COPY)
    quantize_model(src, ours, QuantizeOptions(FileType.COPY, threads=THREADS))
    assert_same_file(ours, theirs)
    expected = {"F16": 1, "Q4_K_M": 15}[source.split()[0]] | (1024 if "without" in source else 0)
    assert read_gguf(ours).value("general.file_type") == expected


# --- SmolLM2-135M: 576-wide rows, tied embeddings ---------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_f16(model_dir) -> Path:
    return smollm2_files(model_dir, ("F16",))["F16"]


# The types that need an imatrix only with one: both tools' refusal without it is checked on the small model.
SMOLLM2_CASES = [(f, im) for f in WRITABLE for im in (None, "gguf") if im or f not in NEED_IMATRIX]


@pytest.mark.slow
@pytest.mark.parametrize("ftype, imatrix", SMOLLM2_CASES,
                         ids=[f"{f.name}-{im or 'no-imatrix'}" for f, im in SMOLLM2_CASES])
def test_smollm2_identical_to_llama_quantize(llama_quantize, smollm2_f16, model_dir, tmp_path, ftype, imatrix):
    im = None
    if imatrix:
        im = model_dir / "smollm2-imatrix.gguf"
        if not im.exists():
            write_imatrix_gguf(im, random_imatrix_entries(smollm2_f16, seed=9), datasets=["calib.txt"],
                               chunk_count=3, chunk_size=512, force=True)
    theirs, ours = tmp_path / "llama.gguf", tmp_path / "qtool.gguf"
    if ftype == FileType.Q1_0:      # 576 is not a multiple of 128, and Q1_0 has no fallback type: both refuse
        proc = run_llama_quantize(llama_quantize, smollm2_f16, theirs, ftype, im, check=False)
        assert proc.returncode != 0 and "no tensor type fallback is defined for type q1_0" in proc.stderr
        with pytest.raises(QtoolError, match="no fallback type is defined for Q1_0"):
            quantize_model(smollm2_f16, ours, QuantizeOptions(ftype, imatrix=str(im) if im else None))
        return
    run_llama_quantize(llama_quantize, smollm2_f16, theirs, ftype, im)
    report = quantize_model(smollm2_f16, ours, QuantizeOptions(ftype, imatrix=str(im) if im else None,
                                                               threads=THREADS))
    assert_same_file(ours, theirs)
    if ftype.default_type.name.endswith("_K") or ftype in (FileType.IQ4_XS, FileType.TQ1_0, FileType.TQ2_0):
        assert report.fallbacks, "576-wide rows must fall back from 256-blocks"


# --- type choices on realistic shapes (header only) ---------------------------------------------------------------

_LOG_LINE = re.compile(r"\]\s+(\S+)\s+- \[[^\]]*\], type =\s+(\S+), size =\s+[\d.]+ MiB(?: ->\s+[\d.]+ MiB \((\S+)\))?")


def llama_dry_run_types(tool: Path, path: Path, ftype: FileType, imatrix: Path | None) -> dict[str, str]:
    proc = run_llama_quantize(tool, path, None, ftype, imatrix, extra=["--dry-run"])
    types = {}
    for m in _LOG_LINE.finditer(proc.stdout + proc.stderr):
        types[m.group(1)] = (m.group(3) or m.group(2)).upper()
    assert types, proc.stderr[-2000:]
    return types


REALISTIC = {
    # Llama-3-8B: GQA 4, untied
    "llama3-8b": dict(n_layer=32, hidden=4096, ffn=14336, n_head=32, n_head_kv=8, vocab=128256),
    # GQA 1, tied, FFN width 5504 (a multiple of 32, not of 256): the ffn_down fallbacks
    "gqa1-tied": dict(n_layer=32, hidden=2048, ffn=5504, n_head=16, n_head_kv=16, vocab=32000, tied=True),
}


@pytest.fixture(scope="module")
def realistic(model_dir):
    out = {}
    for name, shape in REALISTIC.items():
        path = write_llama_gguf(model_dir / f"{name}.gguf", sparse=True, **shape)
        entries = {}
        for t in read_gguf(path).tensors:
            if t.name.startswith("blk.") and len(t.shape) == 2:
                entries[t.name] = (np.ones(t.shape[-1], np.float32), [1])
        im = write_imatrix_gguf(model_dir / f"{name}-imatrix.gguf", entries, datasets=["x"], chunk_count=1,
                                chunk_size=512, force=True)
        out[name] = (path, im)
    return out


@pytest.mark.parametrize("with_imatrix", [False, True], ids=["no-imatrix", "imatrix"])
@pytest.mark.parametrize("model", list(REALISTIC))
def test_type_choices_match_dry_run(llama_quantize, realistic, model, with_imatrix):
    path, im = realistic[model]
    gf = read_gguf(path)
    info = ModelInfo.from_metadata({k: v.value for k, v in gf.kv.items()})
    tensors = [(t.name, t.shape, t.qtype) for t in gf.tensors]
    mismatches = []
    for ftype in FileType:
        theirs = llama_dry_run_types(llama_quantize, path, ftype, im if with_imatrix else None)
        ours = {c.name: c.target_type.name for c in
                choose_tensor_types(tensors, ftype, info, MixtureOptions(has_imatrix=with_imatrix))}
        assert set(ours) == set(theirs)
        mismatches += [f"{ftype.name} {n}: ours {ours[n]}, llama {theirs[n]}" for n in ours if ours[n] != theirs[n]]
    assert not mismatches, "\n".join(mismatches[:40])


# --- imatrix writers against llama-imatrix ------------------------------------------------------------------------


def test_imatrix_writers_identical_to_llama_imatrix(small_f16, tmp_path):
    """llama-imatrix --in-file re-saves an imatrix without running a model (it wants -m but does not load it);
    given our GGUF it must write the same GGUF, and with --output-format dat the same .dat our legacy writer makes."""
    tool = need_tool("llama-imatrix")
    rng = np.random.default_rng(11)
    entries = {f"blk.{i}.{w}.weight": (rng.gamma(0.8, 2.0, n).astype(np.float32) * c, [c])
               for i in range(3) for w, n, c in (("attn_q", 256, 1536), ("ffn_down", 768, 1100))}
    entries["blk.3.ffn_up_exps.weight"] = (rng.gamma(1.0, 1.0, (4, 64)).astype(np.float32) * 100,
                                           [900, 0, 35, 1536])
    entries["blk.3.ffn_gate_exps.weight"] = (np.zeros((2, 64), np.float32), [0, 0])
    chunk_size = 512
    chunk_count = max(max(c) for _, c in entries.values()) // chunk_size
    ours = write_imatrix_gguf(tmp_path / "ours.gguf", entries, datasets=["wiki.txt", "code.txt"],
                              chunk_count=chunk_count, chunk_size=chunk_size)
    for fmt, theirs_name in (("gguf", "theirs.gguf"), ("dat", "theirs.dat")):
        theirs = tmp_path / theirs_name
        proc = subprocess.run([str(tool), "-m", str(small_f16), "--in-file", str(ours), "-o", str(theirs), "--output-format", fmt,
                               "-c", str(chunk_size)], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        if fmt == "gguf":
            assert theirs.read_bytes() == ours.read_bytes()
        else:
            dat = write_imatrix_dat(tmp_path / "ours.dat", entries, datasets=["wiki.txt", "code.txt"],
                                    chunk_count=chunk_count, chunk_size=chunk_size)
            assert theirs.read_bytes() == dat.read_bytes()
