"""qtool/ggml_types.py: the GGML types the pinned llama.cpp has and the installed gguf lacks (Q2_0), added to gguf's
tables at `import qtool`, so that gguf's writer and reader and qtool's own reader handle them."""
from __future__ import annotations

import enum
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import qtool  # noqa: F401  (adds the types)
from qtool import ggml_types
from qtool.gguf_io import PlannedTensor, read_gguf, write_gguf
from qtool.quantize import formats


def test_q2_0_is_a_member_like_any_other():
    assert T.Q2_0 == 42 and T(42) is T.Q2_0 and T["Q2_0"] is T.Q2_0 and T.Q2_0.name == "Q2_0"
    assert isinstance(T.Q2_0, T) and [t for t in T].count(T.Q2_0) == 1 and T.__members__["Q2_0"] is T.Q2_0
    assert gguf.GGML_QUANT_SIZES[T.Q2_0] == (64, 18)
    ggml_types.ensure_types()                                  # a second call changes nothing
    assert [t.name for t in T].count("Q2_0") == 1


def test_a_q2_0_tensor_round_trips_through_gguf_files(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    raw = formats.quantize(x, T.Q2_0)
    path = write_gguf(tmp_path / "q2.gguf", "llama", [], [PlannedTensor("w", (3, 128), T.Q2_0, lambda: raw)])[0]
    ours = read_gguf(path)
    (t,) = ours.tensors
    assert t.qtype is T.Q2_0 and tuple(t.shape) == (3, 128)
    np.testing.assert_array_equal(np.asarray(ours.raw(t)).reshape(3, -1), raw)
    theirs = gguf.GGUFReader(path).tensors[0]                  # gguf's own reader
    assert theirs.tensor_type is T.Q2_0 and theirs.n_bytes == raw.nbytes
    np.testing.assert_array_equal(np.asarray(theirs.data).reshape(3, -1), raw)


def test_a_fresh_process_gets_the_types_from_import_qtool_alone():
    code = "import qtool, gguf; print(gguf.GGMLQuantizationType(42).name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "Q2_0", out.stderr


def test_a_gguf_that_disagrees_stops_the_import(monkeypatch):
    class Other(enum.IntEnum):                                 # a future gguf that put another type at 42
        F32 = 0
        NEW = 42
    monkeypatch.setattr(ggml_types, "GGMLQuantizationType", Other)
    with pytest.raises(ImportError, match="gguf uses GGML type id 42 for NEW, qtool expects Q2_0 there"):
        ggml_types.ensure_types()

    class Moved(enum.IntEnum):                                 # ... or gave Q2_0 another id
        F32 = 0
        Q2_0 = 43
    monkeypatch.setattr(ggml_types, "GGMLQuantizationType", Moved)
    with pytest.raises(ImportError, match="gguf gives Q2_0 the type id 43, qtool expects 42"):
        ggml_types.ensure_types()
