"""Checkpoint: file discovery, ordering, safetensors/.bin parsing, and refusal of hostile input."""
from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from qtool.convert.checkpoint import Checkpoint
from qtool.errors import QtoolError
from tests.fixtures.torchbin import PickleWriter, save_state_dict_bin, write_torch_zip
from tests.interop import need_module

RNG = np.random.default_rng(0)


# -- helpers -----------------------------------------------------------------


def write_safetensors(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], bytes]], metadata=None) -> None:
    """Raw safetensors writer: name -> (dtype string, shape, data bytes).

    Hand-rolled (not safetensors.numpy) so tests can write BF16, I64 and
    inconsistent headers.
    """
    header, blobs, pos = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def f32(arr: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    arr = np.asarray(arr, dtype="<f4")  # not ascontiguousarray: it turns 0-d into 1-d
    return ("F32", arr.shape, arr.tobytes())


def write_index(model_dir: Path, weight_map: dict[str, str], name: str = "model.safetensors.index.json") -> None:
    (model_dir / name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def sharded(tmp_path: Path) -> dict[str, np.ndarray]:
    """Two shards whose tensor names interleave, so per-shard sorting is visible."""
    values = {n: RNG.standard_normal((2, 3)).astype(np.float32) for n in
              ("model.layers.2.w", "model.layers.10.w", "model.layers.1.w", "lm_head.weight")}
    write_safetensors(tmp_path / "model-00001-of-00002.safetensors",
                      {n: f32(values[n]) for n in ("model.layers.2.w", "model.layers.10.w")})
    write_safetensors(tmp_path / "model-00002-of-00002.safetensors",
                      {n: f32(values[n]) for n in ("model.layers.1.w", "lm_head.weight")})
    write_index(tmp_path, {
        "model.layers.2.w": "model-00001-of-00002.safetensors",
        "model.layers.10.w": "model-00001-of-00002.safetensors",
        "model.layers.1.w": "model-00002-of-00002.safetensors",
        "lm_head.weight": "model-00002-of-00002.safetensors",
    })
    return values


# -- safetensors ------------------------------------------------------------------


def test_single_safetensors_names_shapes_values(tmp_path):
    a = RNG.standard_normal((3, 4)).astype(np.float32)
    b = RNG.standard_normal(5).astype(np.float16)
    write_safetensors(tmp_path / "model.safetensors", {
        "model.layers.2.w": f32(a),
        "model.layers.10.w": ("F16", b.shape, b.tobytes()),
        "scalar": f32(np.float32(7.5)),
    }, metadata={"format": "pt"})
    (tmp_path / "pytorch_model.bin").write_bytes(b"ignored when safetensors exist")

    with Checkpoint(tmp_path) as ck:
        # Plain string sort, as llama.cpp: "10" before "2".
        assert ck.names == ["model.layers.10.w", "model.layers.2.w", "scalar"]
        assert ck.shape("model.layers.2.w") == (3, 4)
        assert ck.dtype("model.layers.2.w") == "F32"
        assert ck.dtype("model.layers.10.w") == "F16"
        assert ck.shape("scalar") == ()
        assert ck.part_of("scalar") == tmp_path / "model.safetensors"
        got = ck.load("model.layers.2.w")
        assert got.dtype == np.float32 and np.array_equal(got, a)
        got = ck.load("model.layers.10.w")
        assert got.dtype == np.float16 and np.array_equal(got, b)
        assert ck.load("scalar").shape == () and ck.load("scalar") == 7.5


def test_reads_files_written_by_safetensors_library(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"x.weight": RNG.standard_normal((4, 8)).astype(np.float32),
               "y.weight": RNG.standard_normal(16).astype(np.float16)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ck = Checkpoint(tmp_path)
    assert ck.names == ["x.weight", "y.weight"]
    for name, want in tensors.items():
        assert np.array_equal(ck.load(name), want)


def test_load_is_lazy_and_uncached(tmp_path):
    a = np.arange(6, dtype=np.float32)
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": f32(a)})
    ck = Checkpoint(tmp_path)

    got = ck.load("a")
    got[:] = -1  # copy-on-write: must neither fail nor touch the file
    assert np.array_equal(ck.load("a"), a)

    # Rewrite the data in place after the constructor ran: load() must see it.
    raw = bytearray(path.read_bytes())
    raw[-24:] = np.full(6, 42, "<f4").tobytes()
    path.write_bytes(raw)
    assert np.array_equal(ck.load("a"), np.full(6, 42, np.float32))


def test_sharded_order_follows_parts_then_names(tmp_path):
    values = sharded(tmp_path)
    ck = Checkpoint(tmp_path)
    assert ck.names == ["model.layers.10.w", "model.layers.2.w", "lm_head.weight", "model.layers.1.w"]
    assert ck.part_of("lm_head.weight") == tmp_path / "model-00002-of-00002.safetensors"
    assert ck.part_of("model.layers.2.w") == tmp_path / "model-00001-of-00002.safetensors"
    for name, want in values.items():
        assert np.array_equal(ck.load(name), want)


def test_index_lists_tensor_missing_from_shards(tmp_path):
    sharded(tmp_path)
    wm = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    wm["model.layers.3.w"] = "model-00002-of-00002.safetensors"
    write_index(tmp_path, wm)
    with pytest.raises(QtoolError, match=r"missing tensors model\.layers\.3\.w \(expected in model-00002-of-00002"):
        Checkpoint(tmp_path)


def test_shard_holds_tensor_missing_from_index(tmp_path):
    sharded(tmp_path)
    wm = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    del wm["lm_head.weight"]
    write_index(tmp_path, wm)
    with pytest.raises(QtoolError, match=r"tensors not in the index: lm_head\.weight"):
        Checkpoint(tmp_path)


def test_index_names_missing_shard_file(tmp_path):
    sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(QtoolError, match=r"do not exist.*model-00002-of-00002\.safetensors"):
        Checkpoint(tmp_path)


def test_index_without_any_shards_does_not_fall_back_to_bin(tmp_path):
    write_index(tmp_path, {"a": "model-00001-of-00001.safetensors"})
    save_state_dict_bin(tmp_path / "pytorch_model.bin", {"a": np.zeros(2, np.float32)})
    with pytest.raises(QtoolError, match=r"model-00001-of-00001\.safetensors"):
        Checkpoint(tmp_path)


def test_corrupt_index_json(tmp_path):
    sharded(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(QtoolError, match=r"model\.safetensors\.index\.json is not valid JSON"):
        Checkpoint(tmp_path)


def test_tensor_in_two_parts(tmp_path):
    write_safetensors(tmp_path / "model-a.safetensors", {"w": f32(np.zeros(2))})
    write_safetensors(tmp_path / "model-b.safetensors", {"w": f32(np.ones(2))})
    with pytest.raises(QtoolError, match=r"tensor 'w' appears in both model-a\.safetensors and model-b\.safetensors"):
        Checkpoint(tmp_path)


def test_no_checkpoint_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "consolidated.safetensors").write_bytes(b"")  # wrong prefix: not a part
    with pytest.raises(QtoolError, match=r"no model\.safetensors / pytorch_model\*\.bin in " + str(tmp_path)):
        Checkpoint(tmp_path)


def test_missing_directory(tmp_path):
    with pytest.raises(QtoolError, match="does not exist"):
        Checkpoint(tmp_path / "nope")


def test_bf16_widening_is_exact(tmp_path):
    # Every finite and special bf16 pattern class: random bits cover normals,
    # subnormals, +-0, inf and nan payloads.
    bits = RNG.integers(0, 2**16, size=4096, dtype=np.uint16)
    bits[:4] = [0x0000, 0x8000, 0x7F80, 0x0001]
    write_safetensors(tmp_path / "model.safetensors", {"w": ("BF16", (64, 64), bits.tobytes())})
    ck = Checkpoint(tmp_path)
    assert ck.dtype("w") == "BF16"
    got = ck.load("w")
    assert got.dtype == np.float32 and got.shape == (64, 64)
    assert np.array_equal(got.view(np.uint32).ravel(), bits.astype(np.uint32) << 16)
    assert got.ravel()[2] == np.inf and got.ravel()[3] > 0


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": f32(np.zeros(4)), "b": f32(np.zeros(25))})
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(QtoolError, match=rf"^model\.safetensors is truncated: tensor 'b' needs bytes \d+\.\.{size} "
                                         rf"but the file has {size - 10}$"):
        Checkpoint(tmp_path)


def test_header_length_larger_than_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": f32(np.zeros(4))})
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**9) + raw[8:])
    with pytest.raises(QtoolError, match=r"model\.safetensors: header length 1000000000 is larger than the file"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("header, match", [
    (b"{\"a\": {\"dtype\": ", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (b"[1, 2, 3]", "not a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', "corrupt safetensors header entry for 'a'"),
    (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "corrupt safetensors header entry for 'a'"),
])
def test_corrupt_header(tmp_path, header, match):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(QtoolError, match=match) as e:
        Checkpoint(tmp_path)
    assert str(e.value).startswith("model.safetensors")


def test_tiny_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(QtoolError, match="too small"):
        Checkpoint(tmp_path)


def test_size_mismatch(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": ("F32", (3,), bytes(8))})
    with pytest.raises(QtoolError, match=r"tensor 'a' has 8 bytes of data but shape \[3\] F32 needs 12"):
        Checkpoint(tmp_path)


def test_unsupported_safetensors_dtype(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {
        "w": f32(np.zeros(2)),
        "position_ids": ("I64", (4,), np.arange(4, dtype="<i8").tobytes()),
    })
    with pytest.raises(QtoolError, match=r"tensor 'position_ids' has dtype I64; only F32, F16 and BF16"):
        Checkpoint(tmp_path)


def test_unknown_name_and_closed(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": f32(np.zeros(2))})
    ck = Checkpoint(tmp_path)
    with pytest.raises(QtoolError, match="no tensor 'b'"):
        ck.load("b")
    ck.close()
    with pytest.raises(QtoolError, match="closed"):
        ck.load("a")


def test_file_shrinks_after_open(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"a": f32(np.zeros(1024))})
    ck = Checkpoint(tmp_path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(QtoolError, match=r"cannot read tensor 'a' from model\.safetensors"):
        ck.load("a")


# -- pytorch .bin (no torch needed) --------------------------------------------------


@pytest.mark.parametrize("dtype, np_dtype", [
    ("float32", np.float32), ("float16", np.float16), ("bfloat16", np.float32),
])
def test_bin_roundtrip(tmp_path, dtype, np_dtype):
    # Values exactly representable in every dtype, so comparison is exact.
    want = {
        "model.layers.2.w": (np.arange(12, dtype=np.float32).reshape(3, 4) - 5) / 4,
        "model.layers.10.w": np.array([1.5, -2.0, 0.25], np.float32),
        "bias": np.float32(-3.0),
    }
    save_state_dict_bin(tmp_path / "pytorch_model.bin", want, dtype)
    ck = Checkpoint(tmp_path)
    assert ck.names == list(want)     # a .bin keeps its state dict's order, as torch.load gives it to llama.cpp
    assert ck.dtype("bias") == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    assert ck.shape("model.layers.2.w") == (3, 4) and ck.shape("bias") == ()
    assert ck.part_of("bias") == tmp_path / "pytorch_model.bin"
    for name, value in want.items():
        got = ck.load(name)
        assert got.dtype == np_dtype and np.array_equal(got, value)


def test_bin_big_endian(tmp_path):
    want = {"w": np.array([1.0, -2.5, 3.25], np.float32), "h": np.array([0.5, 4.0], np.float16)}
    save_state_dict_bin(tmp_path / "pytorch_model.bin", want, byteorder="big")
    ck = Checkpoint(tmp_path)
    for name, value in want.items():
        got = ck.load(name)
        assert got.dtype == value.dtype and got.dtype.isnative and np.array_equal(got, value)


def test_bin_compressed_members(tmp_path):
    # Not what torch writes, but a re-zipped file should still read (without mmap).
    w = np.arange(8, dtype=np.float32)
    save_state_dict_bin(tmp_path / "x.bin", {"w": w})
    with zipfile.ZipFile(tmp_path / "x.bin") as zf:
        pkl, data = zf.read("archive/data.pkl"), zf.read("archive/data/0")
    write_torch_zip(tmp_path / "pytorch_model.bin", pkl, {"0": data}, compress=True)
    (tmp_path / "x.bin").unlink()
    assert np.array_equal(Checkpoint(tmp_path).load("w"), w)


def test_sharded_bin_with_index(tmp_path):
    a, b = np.ones(3, np.float32), np.full(2, 2.0, np.float32)
    save_state_dict_bin(tmp_path / "pytorch_model-00001-of-00002.bin", {"z": a})
    save_state_dict_bin(tmp_path / "pytorch_model-00002-of-00002.bin", {"a": b})
    write_index(tmp_path, {"z": "pytorch_model-00001-of-00002.bin", "a": "pytorch_model-00002-of-00002.bin"},
                name="pytorch_model.bin.index.json")
    ck = Checkpoint(tmp_path)
    assert ck.names == ["z", "a"]
    assert np.array_equal(ck.load("a"), b)
    # Index points 'a' at the wrong shard: only shard 1 is read, so 'a' is missing.
    write_index(tmp_path, {"z": "pytorch_model-00001-of-00002.bin", "a": "pytorch_model-00001-of-00002.bin"},
                name="pytorch_model.bin.index.json")
    with pytest.raises(QtoolError, match=r"pytorch_model\.bin\.index\.json does not match.*missing tensors a "):
        Checkpoint(tmp_path)


def test_bin_unsupported_dtype(tmp_path):
    save_state_dict_bin(tmp_path / "pytorch_model.bin", {"w": np.zeros(2, np.float32), "ids": np.arange(3)})
    with pytest.raises(QtoolError, match=r"pytorch_model\.bin: tensor 'ids' has dtype int64"):
        Checkpoint(tmp_path)


def _tensor_pickle(numel: int, shape, stride, offset: int = 0, storage: str = "FloatStorage") -> bytes:
    """data.pkl for {'w': tensor} with free choice of storage geometry."""
    w = PickleWriter()
    w.op(pickle.EMPTY_DICT).str_("w")
    w.call(
        "torch._utils", "_rebuild_tensor_v2",
        lambda w: (w.op(pickle.MARK).str_("storage").global_("torch", storage).str_("0").str_("cpu")
                   .int_(numel).op(pickle.TUPLE).op(pickle.BINPERSID)),
        lambda w: w.int_(offset),
        lambda w: w.tuple_(shape),
        lambda w: w.tuple_(stride),
        lambda w: w.op(pickle.NEWFALSE),
        lambda w: w.op(pickle.EMPTY_DICT),
    )
    return w.op(pickle.SETITEM).getvalue()


def test_bin_storage_offset_and_size1_strides(tmp_path):
    # A view into a shared storage (tied weights do this), with a junk stride
    # on a size-1 dim that torch is known to leave behind.
    storage = np.arange(10, dtype="<f4")
    write_torch_zip(tmp_path / "pytorch_model.bin", _tensor_pickle(10, (1, 2, 3), (99, 3, 1), offset=4),
                    {"0": storage.tobytes()})
    assert np.array_equal(Checkpoint(tmp_path).load("w"), storage[4:10].reshape(1, 2, 3))


def test_bin_non_contiguous(tmp_path):
    write_torch_zip(tmp_path / "pytorch_model.bin", _tensor_pickle(6, (3, 2), (1, 3)), {"0": bytes(24)})
    with pytest.raises(QtoolError, match=r"tensor 'w' is not contiguous \(shape \[3, 2\], stride \[1, 3\]\)"):
        Checkpoint(tmp_path)


def test_bin_storage_too_short(tmp_path):
    write_torch_zip(tmp_path / "pytorch_model.bin", _tensor_pickle(6, (2, 3), (3, 1)), {"0": bytes(20)})
    with pytest.raises(QtoolError, match=r"pytorch_model\.bin is truncated: tensor 'w' needs bytes 0\.\.24"):
        Checkpoint(tmp_path)


def test_bin_missing_storage_record(tmp_path):
    write_torch_zip(tmp_path / "pytorch_model.bin", _tensor_pickle(6, (2, 3), (3, 1)), {})
    with pytest.raises(QtoolError, match=r"tensor 'w' refers to missing storage record archive/data/0"):
        Checkpoint(tmp_path)


def test_bin_truncated_zip(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    save_state_dict_bin(path, {"w": np.zeros(64, np.float32)})
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(QtoolError, match=r"pytorch_model\.bin: corrupt or truncated zip"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize("pkl, match", [
    (b"\x80\x02}q\x00", "corrupt data.pkl"),  # cut off mid-stream
    (PickleWriter().int_(3).getvalue(), "expected a state dict of tensors, found a int"),
    (PickleWriter().op(pickle.EMPTY_DICT).str_("w").int_(3).op(pickle.SETITEM).getvalue(),
     "entry 'w' is a int"),
])
def test_bin_bad_pickle_contents(tmp_path, pkl, match):
    write_torch_zip(tmp_path / "pytorch_model.bin", pkl)
    with pytest.raises(QtoolError, match=match):
        Checkpoint(tmp_path)


# -- hostile pickles -----------------------------------------------------------


def _evil(marker: Path, module: str = "os", name: str = "system") -> bytes:
    """A pickle that runs module.name("touch marker") when unpickled naively."""
    return PickleWriter().call(module, name, lambda w: w.str_(f"touch {marker}")).getvalue()


def test_evil_pickle_is_really_evil(tmp_path):
    # Guard against a vacuous test: a plain pickle.loads does create the marker.
    marker = tmp_path / "pwned"
    pickle.loads(_evil(marker))
    assert marker.exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                          ("subprocess", "getoutput"), ("torch", "load")])
def test_malicious_zip_pickle_is_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    write_torch_zip(tmp_path / "pytorch_model.bin", _evil(marker, module, name))
    with pytest.raises(QtoolError) as e:
        Checkpoint(tmp_path)
    assert str(e.value) == (f"pytorch_model.bin: refusing to unpickle '{module}.{name}' "
                            "(pytorch .bin files may only contain tensors)")
    assert not marker.exists()


def test_malicious_global_nested_in_tensor_is_refused(tmp_path):
    # The payload hides where torch puts backward_hooks, after a valid storage.
    marker = tmp_path / "pwned"
    w = PickleWriter().op(pickle.EMPTY_DICT).str_("w")
    w.call(
        "torch._utils", "_rebuild_tensor_v2",
        lambda w: (w.op(pickle.MARK).str_("storage").global_("torch", "FloatStorage").str_("0").str_("cpu")
                   .int_(1).op(pickle.TUPLE).op(pickle.BINPERSID)),
        lambda w: w.int_(0), lambda w: w.tuple_((1,)), lambda w: w.tuple_((1,)),
        lambda w: w.op(pickle.NEWFALSE),
        lambda w: w.call("os", "system", lambda w: w.str_(f"touch {marker}")),
    )
    write_torch_zip(tmp_path / "pytorch_model.bin", w.op(pickle.SETITEM).getvalue(), {"0": bytes(4)})
    with pytest.raises(QtoolError, match=r"refusing to unpickle 'os\.system'"):
        Checkpoint(tmp_path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused_unread(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "pytorch_model.bin").write_bytes(_evil(marker))
    with pytest.raises(QtoolError, match=r"pytorch_model\.bin: legacy \(pre-1\.6\) torch format not supported"):
        Checkpoint(tmp_path)
    assert not marker.exists()


def test_random_bytes_bin(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"hello world")
    with pytest.raises(QtoolError, match="not a pytorch checkpoint"):
        Checkpoint(tmp_path)


# -- interop with real torch ------------------------------------------------------


def test_fixture_output_loads_in_torch(tmp_path):
    torch = need_module("torch")
    want = {"a": RNG.standard_normal((3, 5)).astype(np.float32), "b": np.float32(2.0)}
    for dtype, tdtype in [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)]:
        path = tmp_path / f"{dtype}.bin"
        save_state_dict_bin(path, want, dtype)
        sd = torch.load(path, weights_only=True, mmap=True)  # mmap also checks 64-byte alignment
        assert list(sd) == ["a", "b"]
        for name, value in want.items():
            assert sd[name].dtype == tdtype
            assert torch.equal(sd[name], torch.from_numpy(np.asarray(value)).to(tdtype))


def test_reads_real_torch_save(tmp_path):
    torch = need_module("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    sd = {
        "f32": base.clone(),
        "f16": base.to(torch.float16),
        "bf16": base.to(torch.bfloat16),
        "row": base[2],  # shares storage with base at a non-zero offset
        "param": torch.nn.Parameter(torch.randn(3, generator=gen)),
        "scalar": torch.tensor(1.25),
        "empty": torch.zeros(0, 4),
    }
    torch.save(sd, tmp_path / "pytorch_model.bin")
    # A real module's state_dict is an OrderedDict carrying _metadata (a BUILD opcode).
    torch.save(torch.nn.Linear(3, 2).half().state_dict(), tmp_path / "pytorch_model-lin.bin")
    ref = torch.load(tmp_path / "pytorch_model-lin.bin", weights_only=True)

    ck = Checkpoint(tmp_path)
    # "pytorch_model-lin.bin" sorts before "pytorch_model.bin" ('-' < '.').
    assert ck.names == ["weight", "bias"] + list(sd)    # state-dict order within each .bin
    assert [ck.dtype(n) for n in ("f32", "f16", "bf16")] == ["F32", "F16", "BF16"]
    for name, t in sd.items():
        got = ck.load(name)
        want = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want), name
    for name in ("bias", "weight"):
        assert np.array_equal(ck.load(name), ref[name].numpy())


def test_real_torch_save_rejections(tmp_path):
    torch = need_module("torch")
    torch.save({"t": torch.zeros(2, 3).t()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(QtoolError, match=r"tensor 't' is not contiguous"):
        Checkpoint(tmp_path)
    torch.save({"f8": torch.zeros(2, dtype=torch.float8_e4m3fn)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(QtoolError, match=r"tensor 'f8' has dtype float8_e4m3fn"):
        Checkpoint(tmp_path)
    torch.save({"d": torch.zeros(2, dtype=torch.float64)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(QtoolError, match=r"tensor 'd' has dtype float64"):
        Checkpoint(tmp_path)
