"""qtool.evaluate.halfgemm: batched products of F16 / BF16 weights against a float64 product of the same values.

The bound. out[m, n] is a float32 sum along k: fused multiply-adds in k order within each block of KC columns (a
chain of at most KC roundings), the blocks' sums then added in order (one more per block). So |error| <= (KC +
n_blocks) * 2**-24 * S with S = sum_k |x[m, k]| |w[n, k]|, the standard bound of a float32 sum of that depth; a
wrong row, column, strip or block changes out by about S itself.
"""
from __future__ import annotations

import os

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qtool.evaluate import halfgemm
from qtool.evaluate.weights import GGUFWeights
from qtool.quantize import formats


def _stored(rng: np.random.Generator, qtype: T, n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8 rows, read-only as a memory map's are; their float64 values): rows and columns of spread scales,
    an all-zero row and an outlier."""
    w = rng.standard_normal((n_out, n_in)) * np.exp2(rng.uniform(-6, 6, (n_out, 1)))
    w *= np.exp2(rng.uniform(-2, 2, (1, n_in)))
    w[1] = 0.0
    w[2, n_in // 3] = 1e3
    raw = np.ascontiguousarray(formats.quantize(w.astype(np.float32), qtype))
    raw.setflags(write=False)
    return raw, formats.decode(raw, qtype, n_in).astype(np.float64)


def _check(raw: np.ndarray, values: np.ndarray, qtype: T, x: np.ndarray) -> np.ndarray:
    out = np.full((x.shape[0], raw.shape[0]), np.nan, np.float32)
    halfgemm.product(raw, qtype, x, out)
    exact = x.astype(np.float64) @ values.T
    scale = np.abs(x).astype(np.float64) @ np.abs(values).T
    depth = halfgemm.KC + -(-x.shape[1] // halfgemm.KC)
    assert np.all(np.isfinite(out))
    assert np.all(np.abs(out - exact) <= depth * 2.0 ** -24 * scale)
    return out


# (rows of x, n_in, n_out): rows not a multiple of MR; n_in below KC, one KC, and with a partial last block; n_out
# one strip, not a multiple of NB, several tasks
SHAPES = [(1, 64, 16), (5, 256, 48), (7, 300, 272), (97, 576, 576), (130, 1000, 528), (13, 2304, 32)]


@pytest.mark.parametrize("qtype", [T.F16, T.BF16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_product_matches_a_float64_product(qtype, shape):
    rows, n_in, n_out = shape
    rng = np.random.default_rng(rows * 7919 + n_in + n_out)
    raw, values = _stored(rng, qtype, n_out, n_in)
    x = (rng.standard_normal((rows, n_in)) * np.exp2(rng.uniform(-3, 3, (rows, 1)))).astype(np.float32)
    _check(raw, values, qtype, x)


def test_a_changed_weight_changes_only_its_row_and_exceeds_the_bound():
    rng = np.random.default_rng(3)
    raw, values = _stored(rng, T.F16, 64, 600)
    x = rng.standard_normal((11, 600)).astype(np.float32)
    before = _check(raw, values, T.F16, x)
    changed = raw.copy()
    halves = changed.view(np.uint16)
    halves[37, 599] ^= 0x4000               # the last column (the partial block) of one row of the third strip
    changed.setflags(write=False)
    after = np.full_like(before, np.nan)
    halfgemm.product(changed, T.F16, x, after)
    moved = np.any(after != before, axis=0)
    assert moved[37] and moved.sum() == 1


def test_the_same_bits_on_any_thread_count():
    rng = np.random.default_rng(4)
    raw, _ = _stored(rng, T.F16, 512, 768)
    x = rng.standard_normal((40, 768)).astype(np.float32)
    results = []
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            out = np.empty((40, 512), np.float32)
            results.append(halfgemm.product(raw, T.F16, x, out))
    finally:
        numba.set_num_threads(before)
    assert all(np.array_equal(results[0], r) for r in results[1:])


def test_non_finite_weights_reach_only_their_rows():
    rng = np.random.default_rng(5)
    raw, _ = _stored(rng, T.F16, 32, 300)
    bad = raw.copy()
    bad.view(np.uint16)[5, 17] = 0x7C00       # +inf
    bad.view(np.uint16)[9, 290] = 0x7E00      # NaN
    bad.setflags(write=False)
    x = np.abs(rng.standard_normal((8, 300))).astype(np.float32) + 0.1
    out = halfgemm.product(bad, T.F16, x, np.empty((8, 32), np.float32))
    assert np.all(np.isposinf(out[:, 5])) and np.all(np.isnan(out[:, 9]))
    finite = np.delete(out, [5, 9], axis=1)
    assert np.all(np.isfinite(finite))


def test_supports_whole_strips_of_16_bit_floats_only():
    assert halfgemm.supports(T.F16, 4096) and halfgemm.supports(T.BF16, 16)
    assert not halfgemm.supports(T.F16, 40) and not halfgemm.supports(T.F32, 4096)
    assert not halfgemm.supports(T.Q8_0, 4096)


def test_model_products_use_it_and_match_the_tiled_path(tmp_path, monkeypatch):
    """GGUFWeights.matmul on an F16 tensor (above the small tensors kept decoded) goes through halfgemm (rows > the mat-vec rows) and agrees with the
    decode-and-BLAS path within the bound; a row count that is not whole strips keeps the tiled path."""
    import gguf
    from qtool.evaluate import weights as weights_mod

    rng = np.random.default_rng(6)
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    a = (rng.standard_normal((48, 1700)) * 0.1).astype(np.float16)
    b = (rng.standard_normal((40, 1700)) * 0.1).astype(np.float16)
    writer.add_tensor("a.weight", a)
    writer.add_tensor("b.weight", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    w = GGUFWeights(path)
    x = rng.standard_normal((9, 1700)).astype(np.float32)
    calls = []
    original = halfgemm.product
    monkeypatch.setattr(weights_mod.halfgemm, "product", lambda *args: calls.append(args[0].shape) or original(*args))
    for name, values in (("a.weight", a), ("b.weight", b)):
        out = w.matmul(name, x, np.full((9, values.shape[0]), np.nan, np.float32))
        exact = x.astype(np.float64) @ values.astype(np.float64).T
        scale = np.abs(x).astype(np.float64) @ np.abs(values.astype(np.float64)).T
        assert np.all(np.abs(out - exact) <= (halfgemm.KC + -(-1700 // halfgemm.KC)) * 2.0 ** -24 * scale)
    assert calls == [(48, 3400)]


def test_a_strided_output_gets_the_same_values():
    rng = np.random.default_rng(7)
    raw, values = _stored(rng, T.BF16, 48, 520)
    x = rng.standard_normal((10, 520)).astype(np.float32)
    whole = _check(raw, values, T.BF16, x)
    wide = np.full((10, 100), np.nan, np.float32)
    halfgemm.product(raw, T.BF16, x, wide[:, 2:50])
    assert np.array_equal(wide[:, 2:50], whole)
    assert np.all(np.isnan(wide[:, :2])) and np.all(np.isnan(wide[:, 50:]))


_CACHED = """
import numpy as np
from gguf import GGMLQuantizationType as T
from qtool.evaluate import halfgemm
x = np.ones((6, 64), np.float32)
for qtype, kernel in ((T.F16, halfgemm._product_f16), (T.BF16, halfgemm._product_bf16)):
    raw = np.zeros((16, 128), np.uint8)
    halfgemm.product(raw, qtype, x, np.empty((6, 16), np.float32))
    print(qtype.name, kernel.stats.cache_hits.most_common(1)[0][1] if kernel.stats.cache_hits else 0)
"""


def test_a_second_process_loads_the_products_from_numbas_cache(tmp_path):
    """Each type's product is compiled once, then loaded from numba's cache by every later process (as a closure over
    its micro-kernel it was compiled again at every start: ~6 s of one core before the first F16 product)."""
    import subprocess
    import sys
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", _CACHED], env=env, capture_output=True, text=True, check=True,
                           timeout=600)
            for _ in range(2)]
    assert runs[1].stdout.split() == ["F16", "1", "BF16", "1"], runs[1].stdout + runs[1].stderr


def test_a_models_inputs_are_packed_once_and_give_the_same_logits(tmp_path, monkeypatch):
    """Model's products of one input share its packing (q/k/v: one packing for three products, gate/up: one for
    two), and the logits are the same bits as with a packing per product; an input packed again after another
    input of its width used the buffer gets its own values back (not the other's)."""
    from qtool.evaluate import model as model_mod
    from qtool.evaluate import weights as weights_mod
    from qtool.evaluate.model import Model, Workspace, _Input
    from tests.test_quantize import write_llama_gguf

    path = write_llama_gguf(tmp_path / "m.gguf", n_layer=2, hidden=256, ffn=512, n_head=8, n_head_kv=2, vocab=320)
    monkeypatch.setattr(weights_mod, "SMALL_TENSOR_ELEMENTS", 0)     # every product through halfgemm
    tokens = np.random.default_rng(8).integers(0, 320, (2, 24))
    packs = []
    original = halfgemm.panels
    monkeypatch.setattr(model_mod.halfgemm, "panels", lambda x, buf=None: packs.append(x.shape) or original(x, buf))
    shared = Model(GGUFWeights(path)).forward(tokens)
    assert len(packs) == 2 * 4 + 1            # per layer: q/k/v, o, gate/up, down; then the output
    monkeypatch.setattr(_Input, "panels", lambda self, kind: original(self.rounded(kind)))
    single = Model(GGUFWeights(path)).forward(tokens)
    assert np.all(np.isfinite(shared)) and np.array_equal(shared, single)

    ws = Workspace()
    rng = np.random.default_rng(9)
    a, b = (_Input(rng.standard_normal((7, 256)).astype(np.float32), ws) for _ in range(2))
    first = a.panels(None).copy()
    assert not np.array_equal(b.panels(None), first)
    assert np.array_equal(a.panels(None), first)
