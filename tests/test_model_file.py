"""The model-file layer: split files, duplicate tensors, hyper-parameters parsed once, the one decoder."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFValueType

from qtool.convert.converter import plan_conversion, write_plan
from qtool.errors import QtoolError
from qtool.gguf_io import KV, PlannedTensor, write_gguf
from qtool.model_file import GGUFModel, HParams, split_paths
from qtool.quantize import formats
from qtool.quantize.mixtures import ModelInfo

U32 = GGUFValueType.UINT32


def _file(path, tensors, kvs=()):
    planned = [PlannedTensor(name, data.shape, T.F32, lambda data=data: data) for name, data in tensors.items()]
    return write_gguf(path, "llama", list(kvs), planned, force=True)[0]


def test_split_paths(tmp_path):
    with pytest.raises(QtoolError, match="m.gguf: no such file"):
        split_paths(tmp_path / "m.gguf")
    first = tmp_path / "m-00001-of-00002.gguf"
    first.write_bytes(b"")
    with pytest.raises(QtoolError, match="split file m-00002-of-00002.gguf is missing"):
        split_paths(first)
    (tmp_path / "m-00002-of-00002.gguf").write_bytes(b"")
    assert split_paths(tmp_path / "m-00002-of-00002.gguf") == [first, tmp_path / "m-00002-of-00002.gguf"]


def test_a_model_across_splits_and_a_tensor_twice(tmp_path):
    a, b = np.ones((2, 32), np.float32), np.full((3, 32), 2, np.float32)
    _file(tmp_path / "m-00001-of-00002.gguf", {"a": a}, [KV("llama.block_count", 1, U32)])
    _file(tmp_path / "m-00002-of-00002.gguf", {"b": b})
    model = GGUFModel.open(tmp_path / "m-00001-of-00002.gguf")
    assert list(model.tensors) == ["a", "b"] and model.n_params == 5 * 32
    assert model.value("llama.block_count") == 1 and model.hparams.n_layer == 1
    np.testing.assert_array_equal(model.decode("b"), b)
    np.testing.assert_array_equal(model.decode("b", slice(1, 3)), b[1:])
    np.testing.assert_array_equal(model.decode("b", np.array([2, 0])), b[[2, 0]])
    with pytest.raises(QtoolError, match="tensor 'c' is missing"):
        model.tensor("c")
    _file(tmp_path / "m-00002-of-00002.gguf", {"a": a})      # overwrite: the same tensor in both files
    with pytest.raises(QtoolError, match="tensor 'a' appears twice"):
        GGUFModel.open(tmp_path / "m-00001-of-00002.gguf")


def test_hparams_per_layer_arrays_and_defaults():
    kv = {"general.architecture": "llama", "llama.block_count": 2, "llama.embedding_length": 64,
          "llama.attention.head_count": [8, 8], "llama.attention.head_count_kv": [2, 4],
          "llama.rope.scale_linear": 4.0}
    h = HParams.from_kv(kv, "x.gguf")
    assert (h.n_head, h.n_head_kv, h.head_count_kv, h.head_dim) == (8, 2, 2, 8)   # layer 0's values
    assert h.per_layer == ("attention.head_count_kv",) and h.rope_scaling_factor == 4.0
    with pytest.raises(QtoolError, match="x.gguf: per-layer llama.attention.head_count_kv values are not supported"):
        h.require_uniform()
    with pytest.raises(QtoolError, match="x.gguf: missing metadata key llama.feed_forward_length"):
        h.need("n_ff")
    info = ModelInfo.from_metadata(kv)                       # llama-quantize's rules read layer 0
    assert (info.n_layer, info.n_head, info.n_head_kv) == (2, 8, 2)
    del kv["llama.attention.head_count_kv"]
    assert HParams.from_kv(kv).head_count_kv == 8           # llama.cpp's default: the head count
    with pytest.raises(QtoolError, match="no general.architecture"):
        HParams.from_kv({})


def test_convert_writes_the_hparams_every_stage_reads(checkpoint_factory, tmp_path):
    """convert's ModelSpec (from the HF config) -> GGUF keys -> HParams: the same numbers."""
    plan = plan_conversion(checkpoint_factory("qwen2"), "f32")
    try:
        path = write_plan(plan, tmp_path / "m.gguf")[0]
        spec = plan.spec
    finally:
        plan.close()
    h = GGUFModel.open(path).hparams.require_uniform()
    assert (h.n_layer, h.n_embd, h.n_ff, h.n_head, h.head_count_kv, h.head_dim) == \
        (spec.n_layer, spec.n_embd, spec.n_ff, spec.n_head, spec.n_head_kv, spec.head_dim)
    assert h.rms_eps == pytest.approx(spec.hparams["rms_norm_eps"], rel=1e-6)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_1, T.Q4_K, T.Q6_K, T.IQ4_XS])
def test_the_one_decoder_equals_gguf_py(qtype):
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((6, 512)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype) if qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_1) \
        else formats.quantize(x, qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(6, -1)
    want = np.asarray(gguf.quants.dequantize(raw, qtype), np.float32).reshape(6, 512)
    got = formats.decode(raw, qtype, 512)
    assert got.dtype == np.float32 and got.shape == (6, 512)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    out = np.full((6, 512), np.nan, np.float32)
    assert formats.decode(raw, qtype, 512, out=out) is out
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))
