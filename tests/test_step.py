"""evaluate/step.py: the compiled one-token layers give Model.forward's logits and KV cache bit for bit, on every
kind of product they take (integer codes Q8_K / Q8_0, rounded floats F16 / float32 activations), every attention
variant (GQA, biases, q/k norms, NEOX and NORM rope, no position), and take over only where they can."""
from __future__ import annotations

import numpy as np
import pytest

from qtool.evaluate import weights as weights_module
from qtool.evaluate.model import KVCache, Model
from qtool.evaluate.step import CompiledLayers
from qtool.evaluate.weights import GGUFWeights
from qtool.quantize.mixtures import parse_file_type
from qtool.quantize.quantizer import QuantizeOptions, quantize_model
from tests.interop import smollm2_files
from tests.test_eval_model import gguf_of  # noqa: F401  (the session fixture)

# rows of 256 (K-quants), GQA (2 query heads per kv head), 3 layers
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3)
PROMPT = np.array([1, 17, 240, 3, 99, 5, 61, 12, 200, 7, 33, 150, 8, 2, 90, 4], dtype=np.int64)
STEPS = 10


@pytest.fixture
def stored(monkeypatch):
    """Every weight of these small models stays in its stored form (no float32 copy), as a 7B model's would: the
    compiled layers take only stored weights."""
    monkeypatch.setattr(weights_module, "SMALL_TENSOR_ELEMENTS", 0)


def _decode(model: Model, compiled: bool, f16_cache: bool = True, prompt: np.ndarray = PROMPT,
            steps: int = STEPS) -> tuple[np.ndarray, KVCache]:
    """Logits of `steps` one-token passes after the prompt (fed the argmax of the last), and the cache."""
    model.compiled_decoding = compiled
    cache = KVCache.allocate(model.config, batch=1, max_len=len(prompt) + steps, f16=f16_cache)
    logits = model.forward(prompt[None], output_from=len(prompt) - 1, cache=cache)[0, -1]
    out = []
    for _ in range(steps):
        logits = model.forward(np.array([[int(np.argmax(logits))]]), cache=cache)[0, -1]
        out.append(logits.copy())
    return np.array(out), cache


def assert_same_as_forward(path, activations: str = "llama.cpp", **decode) -> Model:
    model = Model(GGUFWeights(path), activations=activations)
    theirs, their_cache = _decode(model, False, **decode)
    assert model._compiled is None                      # forward's steps, not the compiled layers
    ours, our_cache = _decode(model, True, **decode)
    assert isinstance(model._compiled, CompiledLayers), "the compiled layers did not take this model"
    np.testing.assert_array_equal(ours, theirs)
    for a, b in zip(our_cache.k + our_cache.v, their_cache.k + their_cache.v):
        np.testing.assert_array_equal(a.view(np.uint16), b.view(np.uint16))
    return model


def _quantized(gguf_of, tmp_path, variant: str, file_type: str, **overrides):  # noqa: F811
    _, f16 = gguf_of(variant, "f16", **overrides)
    out = tmp_path / f"{variant}-{file_type}.gguf"
    quantize_model(f16, out, QuantizeOptions(parse_file_type(file_type)))
    return out


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_converted_types_decode_as_forward_does(gguf_of, stored, outtype):  # noqa: F811
    _, path = gguf_of("llama-spm", outtype, **WIDE)
    assert_same_as_forward(path)


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q5_0"] + [pytest.param(t, marks=pytest.mark.slow)
                                                              for t in ("Q4_0", "Q4_1", "Q5_1", "Q5_K_S", "Q6_K")])
def test_quantized_types_decode_as_forward_does(gguf_of, stored, tmp_path, file_type):  # noqa: F811
    path = _quantized(gguf_of, tmp_path, "llama-spm", file_type, **WIDE)
    model = assert_same_as_forward(path)
    products = [p for layer in model._compiled.products for p in layer]
    if file_type == "Q4_K_M":       # two K-quants, both times the input's Q8_K codes
        assert {p.qtype.name for p in products} == {"Q4_K", "Q6_K"}
        assert {p.codes for p in products} == {"q8_K"}


def test_float32_activations_decode_as_forward_does(gguf_of, stored, tmp_path):  # noqa: F811
    """No integer codes: every product is matvec's float kernel on the exact input."""
    model = assert_same_as_forward(_quantized(gguf_of, tmp_path, "llama-spm", "Q4_K_M", **WIDE), "float32")
    assert {p.codes for layer in model._compiled.products for p in layer} == {None}


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "baichuan-7b", "baichuan-13b"])
def test_attention_variants_decode_as_forward_does(gguf_of, stored, variant):  # noqa: F811
    """qwen2: q/k/v biases, NEOX rope; qwen3: q/k norms; baichuan-7b with 3 layers: no position encoding;
    baichuan-13b: ALiBi."""
    overrides = {k: v for k, v in WIDE.items() if k != "num_key_value_heads" or variant.startswith("qwen")}
    if variant == "baichuan-13b":
        del overrides["num_hidden_layers"]      # its 40 layers: ALiBi (at other depths, no position encoding)
    if variant == "qwen3":
        overrides["head_dim"] = 64
    _, path = gguf_of(variant, "q8_0", **overrides)
    model = assert_same_as_forward(path)
    expected = {"qwen2": "rope", "qwen3": "rope", "baichuan-7b": "none", "baichuan-13b": "alibi"}[variant]
    assert model.config.position == expected


@pytest.mark.slow
def test_smollm2_decodes_as_forward_does(stored, tmp_path):
    """A real model, wide enough for the parallel builds of every step (products, and attention past 28
    positions): F16 (rounded floats) and the shipped Q4_1 (Q8_0 codes)."""
    files = smollm2_files(tmp_path, ("F16", "Q4_1"))
    prompt = np.arange(1, 41, dtype=np.int64) * 97
    for kind in ("F16", "Q4_1"):
        assert_same_as_forward(files[kind], prompt=prompt, steps=4)


def test_only_what_the_compiled_layers_can_take(gguf_of, stored):  # noqa: F811
    # a float32 cache: forward's steps
    _, path = gguf_of("llama-spm", "q8_0", **WIDE)
    model = Model(GGUFWeights(path))
    _decode(model, True, f16_cache=False, steps=2)
    assert model._compiled is None
    # float32 weights (held for BLAS): forward's steps, and the answer is kept
    _, path = gguf_of("llama-spm", "f32", **WIDE)
    model = Model(GGUFWeights(path))
    _decode(model, True, steps=2)
    assert model._compiled is False
    # experts: forward's steps
    _, path = gguf_of("qwen3moe", "q8_0")
    model = Model(GGUFWeights(path))
    _decode(model, True, steps=2)
    assert model._compiled is False
    # an input hook (imatrix): forward's steps
    _, path = gguf_of("llama-spm", "q8_0", **WIDE)
    model = Model(GGUFWeights(path), on_matmul_input=lambda name, x, **kw: None)
    _decode(model, True, steps=2)
    assert model._compiled is None


def test_warm_up_compiles_what_decoding_runs(gguf_of, stored, tmp_path, monkeypatch):  # noqa: F811
    """Model.prepare_decoding (qtool generate's load time) calls every distinct layer build once, with the argument
    types decoding uses: decoding after it compiles nothing more, and gives the same logits."""
    from qtool.evaluate import step
    monkeypatch.setattr(step, "_layers", {})          # new dispatchers: none of them called yet in this process
    monkeypatch.setattr(step, "_products", {})
    path = _quantized(gguf_of, tmp_path, "llama-spm", "Q4_K_M", **WIDE)
    model = Model(GGUFWeights(path))
    model.prepare_decoding()
    builds = {fn for fn, _ in model._compiled._layers}
    assert builds and all(len(fn.signatures) == 1 for fn in builds)
    ours, _ = _decode(model, True)
    assert all(len(fn.signatures) == 1 for fn in builds)
    theirs, _ = _decode(Model(GGUFWeights(path)), False)
    np.testing.assert_array_equal(ours, theirs)
