"""`qtool quantize --target-bpw` / `--mix`: the budget solver against brute force, the mix file, the quantizer's
per-tensor type map, the sensitivity model, and a tiny model end to end (plus llama.cpp loading the result)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as T

from qtool.cli import main
from qtool.convert.converter import plan_conversion, write_plan
from qtool.errors import QtoolError
from qtool.gguf_io import PREDICTED_KLD_KEY, read_gguf, tensor_nbytes
from qtool.quantize import formats
from qtool.quantize.imatrix_file import write_imatrix_gguf
from qtool.quantize.mix import (MixFile, admissible_types, parse_candidates, read_mix, solve_budget, write_mix)
from qtool.quantize.mixtures import FileType
from qtool.quantize.quantizer import QuantizeOptions, plan_quantization, quantize_model
from qtool.sensitivity import (Sensitivity, TensorSensitivity, choose_mix, measure_sensitivity, mix_rows,
                                        weighted_error)
from tests.conftest import SHARED
from tests.test_quantize import random_imatrix_entries, write_llama_gguf

CALIBRATION = SHARED / "data" / "calibration" / "groups_merged.txt"


# --- the solver -------------------------------------------------------------------------------------------------

def brute_force(sizes, costs, budget):
    best = None
    for combo in itertools.product(*[range(len(s)) for s in sizes]):
        size = sum(s[j] for s, j in zip(sizes, combo))
        if size <= budget:
            cost = sum(c[j] for c, j in zip(costs, combo))
            if best is None or cost < best:
                best = cost
    return best


def random_instance(rng, n_items, n_options, max_size):
    sizes = [rng.integers(1, max_size, n_options).tolist() for _ in range(n_items)]
    costs = [rng.random(n_options).tolist() for _ in range(n_items)]
    lo, hi = sum(min(s) for s in sizes), sum(max(s) for s in sizes)
    return sizes, costs, int(rng.integers(lo, hi + 1))


@pytest.mark.parametrize("seed", range(40))
def test_solver_finds_the_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    sizes, costs, budget = random_instance(rng, int(rng.integers(1, 7)), int(rng.integers(1, 5)), 60)
    choice = solve_budget(sizes, costs, budget)
    assert sum(s[j] for s, j in zip(sizes, choice)) <= budget
    assert sum(c[j] for c, j in zip(costs, choice)) == pytest.approx(brute_force(sizes, costs, budget), abs=1e-12)


@pytest.mark.parametrize("seed", range(40))
def test_solver_never_exceeds_the_budget_when_bytes_are_discretized(seed):
    # a coarse resolution makes each unit thousands of bytes: the rounding must still never overshoot
    rng = np.random.default_rng(100 + seed)
    sizes, costs, budget = random_instance(rng, 6, 4, 100_000)
    choice = solve_budget(sizes, costs, budget, resolution=37)
    assert sum(s[j] for s, j in zip(sizes, choice)) <= budget
    optimum = brute_force(sizes, costs, budget)
    assert sum(c[j] for c, j in zip(costs, choice)) >= optimum - 1e-12


def test_solver_refuses_a_budget_below_the_smallest_options():
    with pytest.raises(QtoolError, match="below the smallest possible total of 5"):
        solve_budget([[2, 3], [3, 9]], [[1.0, 0.5], [1.0, 0.1]], 4)


# --- candidates and the mix file ----------------------------------------------------------------------------------

def test_candidates_parse_and_rows_decide_what_is_admissible():
    assert parse_candidates("q4_k, Q5_0,Q4_K") == [T.Q4_K, T.Q5_0]
    with pytest.raises(QtoolError, match="unknown tensor type 'Q9_9'"):
        parse_candidates("Q4_K,Q9_9")
    # SmolLM2's hidden size: K-quants (256-element blocks) do not fit, the 32-element types do
    assert admissible_types(parse_candidates(None), 576) == [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.IQ4_NL]
    assert T.Q4_K in admissible_types(parse_candidates(None), 1536)


def test_mix_file_round_trips(tmp_path):
    mix = MixFile({"token_embd.weight": T.Q6_K, 'blk.0.odd "name".weight': T.IQ4_NL, "blk.0.attn_q.weight": T.Q4_0},
                  {"target_bpw": 4.5, "predicted_kld": 0.0123456789, "source": "C:\\models\\a.gguf",
                   "candidates": ["Q4_0", "Q6_K"], "calibration_tokens": 512})
    path = write_mix(mix, tmp_path / "mix.toml")
    back = read_mix(path)
    assert back.tensors == mix.tensors and list(back.tensors) == list(mix.tensors)
    assert back.provenance == mix.provenance
    with pytest.raises(QtoolError, match="already exists"):
        write_mix(mix, path)


@pytest.mark.parametrize("text, message", [
    ('[tensors]\n"a.weight" = "Q9_K"\n', "tensor 'a.weight': unknown tensor type 'Q9_K'"),
    ('[tensors]\n"a.weight" = 4\n', "the type must be a string"),
    ("[provenance]\nx = 1\n", r"no \[tensors\] table"),
    ("[tensors\n", "not valid TOML"),
    ('extra = 1\n[tensors]\n"a.weight" = "Q4_0"\n', "unknown key 'extra'"),
])
def test_bad_mix_files_are_refused_with_one_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(QtoolError, match=message):
        read_mix(path)


# --- the quantizer's per-tensor type map -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("tbpw_synth")
    model = write_llama_gguf(root / "model-F16.gguf", n_layer=2, hidden=256, ffn=512, vocab=320)
    imatrix = root / "imatrix.gguf"
    write_imatrix_gguf(imatrix, random_imatrix_entries(model), datasets=["synthetic"], chunk_count=4, chunk_size=512)
    return model, imatrix


def _quantizable(model):
    plan = plan_quantization(model, QuantizeOptions(FileType.Q8_0))
    return [c for c in plan.choices if c.quantizable]


def test_type_map_gives_every_tensor_exactly_its_type_and_llama_quantize_bytes(synthetic, tmp_path):
    model, imatrix = synthetic
    cycle = [T.Q4_K, T.Q5_0, T.Q2_K, T.IQ4_NL, T.Q6_K, T.Q8_0, T.Q3_K, T.Q5_1, T.Q4_0]
    type_map = {c.name: cycle[i % len(cycle)] for i, c in enumerate(_quantizable(model))}
    out = tmp_path / "mixed.gguf"
    report = quantize_model(model, out, QuantizeOptions(FileType.Q4_K_M, imatrix=imatrix, tensor_type_map=type_map))
    src, got = read_gguf(model), read_gguf(out)
    src_by_name = {t.name: t for t in src.tensors}
    weights = {c.choice.name: c.imatrix for c in report.tensors}
    from qtool.quantize.imatrix_file import column_weights, read_imatrix
    columns, _ = column_weights(read_imatrix(imatrix))
    for t in got.tensors:
        if t.name not in type_map:
            assert t.qtype == src_by_name[t.name].qtype
            continue
        assert t.qtype == type_map[t.name], t.name
        w = columns.get(t.name) if weights[t.name] == "used" else None
        expected = formats.quantize(src.array(src_by_name[t.name]), t.qtype, w)
        assert np.array_equal(got.raw(t).reshape(expected.shape), expected), t.name
    assert got.value("general.file_type") == int(FileType.Q4_K_M)


def test_type_map_errors_name_the_tensor(synthetic, tmp_path):
    model, _ = synthetic
    names = [c.name for c in _quantizable(model)]
    full = {n: T.Q4_0 for n in names}
    cases = [({**full, "blk.9.attn_q.weight": T.Q4_0}, "names tensor blk.9.attn_q.weight, which .* does not have"),
             ({k: v for k, v in full.items() if k != names[1]}, f"no type for 1 quantizable tensor.*{names[1]}"),
             ({**full, "blk.0.attn_norm.weight": T.Q8_0}, "never quantizes that tensor \\(1-D\\)"),
             ({**full, "blk.0.ffn_down.weight": T.Q4_K}, None)]     # rows of 512: admitted
    for type_map, message in cases:
        options = QuantizeOptions(FileType.Q4_0, tensor_type_map=type_map)
        if message is None:
            plan_quantization(model, options)
        else:
            with pytest.raises(QtoolError, match=message):
                plan_quantization(model, options)
    odd = write_llama_gguf(tmp_path / "odd-F16.gguf", n_layer=1, hidden=96, ffn=128, n_head=4, n_head_kv=2,
                           vocab=64, sparse=True)
    type_map = {c.name: T.Q8_0 for c in _quantizable(odd)}
    type_map["blk.0.attn_q.weight"] = T.Q4_K
    with pytest.raises(QtoolError, match="rows of 96 are not a multiple of Q4_K's 256-element blocks"):
        plan_quantization(odd, QuantizeOptions(FileType.Q8_0, tensor_type_map=type_map))


# --- the sensitivity model ----------------------------------------------------------------------------------------

def test_weighted_error_equals_a_plain_numpy_sum():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 64)) * 0.05).astype(np.float32)
    w = rng.gamma(0.7, 1.0, 64).astype(np.float32)
    for qtype in (T.Q4_0, T.Q5_1, T.IQ4_NL, T.Q8_0):
        deq = formats.dequantize(formats.quantize(x, qtype, w), qtype, 64).astype(np.float64)
        reference = float((((deq - x) ** 2) * w[None, :]).sum())
        assert weighted_error(x, qtype, w, w) == pytest.approx(reference, rel=1e-9)
    assert weighted_error(x, T.Q4_0, w, w) > weighted_error(x, T.Q5_0, w, w) > weighted_error(x, T.Q8_0, w, w)


def fake_sensitivity(rng, n_tensors=12) -> Sensitivity:
    types = [T.Q2_K, T.Q4_0, T.Q5_0, T.Q8_0]
    tensors = []
    for i in range(n_tensors):
        shape = (int(rng.integers(1, 8)) * 32, 256)
        err = sorted(rng.random(len(types)) * 10, reverse=True)
        ts = TensorSensitivity(f"blk.{i}.attn_q.weight", shape, types, [tensor_nbytes(shape, t) for t in types],
                               err, reference=types[1], reference_error=err[1], kld_at_reference=float(rng.random()))
        tensors.append(ts)
    n = sum(t.n_elements for t in tensors) + 4096
    return Sensitivity(Path("x.gguf"), "0", None, None, types, "calib", 512, n, 4096 * 4, tensors)


def test_choose_mix_stays_within_the_target_and_gets_better_with_more_bits():
    sens = fake_sensitivity(np.random.default_rng(5))
    previous = np.inf
    for target in np.linspace(sens.min_bpw, sens.max_bpw + 0.5, 9):
        choice = choose_mix(sens, float(target))
        assert choice.bits_per_weight <= target + 1e-12
        assert choice.predicted_kld <= previous + 1e-12
        previous = choice.predicted_kld
    with pytest.raises(QtoolError, match=r"--target-bpw 1 is below the smallest this model admits .* \d\.\d{4} bpw"):
        choose_mix(sens, 1.0)


def test_a_measurement_restricted_to_fewer_candidates_keeps_the_gains():
    sens = fake_sensitivity(np.random.default_rng(6))
    fewer = sens.restricted("Q4_0,Q8_0")
    assert fewer.candidates == [T.Q4_0, T.Q8_0]
    for a, b in zip(sens.tensors, fewer.tensors):
        assert b.types == [T.Q4_0, T.Q8_0] and b.gain == a.gain
        assert b.predicted_kld(0) == a.predicted_kld(1) and b.nbytes == a.nbytes[1:4:2]
    assert set(choose_mix(fewer, 6.0).types.values()) <= {T.Q4_0, T.Q8_0}
    with pytest.raises(QtoolError, match="no candidate left for tensor blk.0.attn_q.weight"):
        sens.restricted("Q6_K")


def test_mix_rows_group_layers_by_class():
    types = {"token_embd.weight": T.Q6_K, **{f"blk.{i}.attn_q.weight": T.Q5_0 if i < 2 else T.Q4_0 for i in range(5)}}
    assert mix_rows(types) == [("token_embd", "Q6_K"), ("attn_q", "0-1 Q5_0 · 2-4 Q4_0")]


# --- a tiny real model end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(checkpoint_factory, tmp_path_factory):
    """A converted tiny llama (hidden 64, ffn 176: only 32-element types fit, and nothing fits ffn_down's rows of
    176, which stay F16) with an imatrix and a calibration text."""
    root = tmp_path_factory.mktemp("tbpw_tiny")
    model = root / "tiny-F32.gguf"
    plan = plan_conversion(checkpoint_factory("llama-spm"), "f32")
    try:
        write_plan(plan, model)
    finally:
        plan.close()
    calibration = root / "calib.txt"
    calibration.write_text(CALIBRATION.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    from qtool.evaluate.imatrix import compute_imatrix_file
    imatrix = compute_imatrix_file(model, str(calibration), root / "imatrix.gguf", n_ctx=128, n_chunks=4).path
    return model, imatrix, calibration


@pytest.mark.slow
def test_sensitivity_gains_predict_the_measured_kld(tiny):
    """The additive model on the calibration text: predicted and measured KLD of whole mixes agree."""
    from qtool.evaluate.model import Model
    from qtool.evaluate.perplexity import kl_divergence, log_softmax_nll
    from qtool.evaluate.tokenizer import Tokenizer
    from qtool.evaluate.weights import GGUFWeights

    model, imatrix, calibration = tiny
    sens = measure_sensitivity(model, imatrix=imatrix, calibration=str(calibration), candidates="Q4_0,Q5_0,Q8_0",
                               n_chunks=2, n_ctx=128)
    down = [t for t in sens.tensors if "ffn_down" in t.name]
    assert down and all(t.types == [T.F16] for t in down)       # no candidate fits rows of 176
    assert all(t.reference is not None and t.kld_at_reference > 0 for t in sens.tensors if t not in down)
    weights = GGUFWeights(model)
    tokens = np.asarray(Tokenizer.from_gguf(weights.gguf).encode(calibration.read_text()), np.int64)[:256]
    tokens = tokens.reshape(2, 128)
    base = Model(weights, activations="float32").forward(tokens)
    for target in (sens.min_bpw + 0.01, 6.0):
        choice = choose_mix(sens, target)
        mixed = {name: formats.dequantize(formats.quantize(weights.get(name), qtype,
                                                           _imatrix_column(imatrix, name)), qtype,
                                          weights.shape(name)[-1])
                 for name, qtype in choice.types.items()}
        swapped = GGUFWeights(model)
        swapped._cache.update(mixed)
        logits = Model(swapped, activations="float32").forward(tokens)
        measured = np.mean([kl_divergence(base[b], log_softmax_nll(base[b], tokens[b])[0], logits[b])
                            for b in range(2)])
        print(f"target {target:.3f} bpw: predicted KLD {choice.predicted_kld:.6f}, measured {measured:.6f}")
        assert measured == pytest.approx(choice.predicted_kld, rel=0.25), (target, measured, choice.predicted_kld)


def _imatrix_column(imatrix, name):
    from qtool.quantize.imatrix_file import column_weights, read_imatrix
    return column_weights(read_imatrix(imatrix))[0].get(name)


def test_cli_target_bpw_then_mix_gives_the_same_file(tiny, tmp_path):
    model, imatrix, calibration = tiny
    runner = CliRunner()
    out, mix = tmp_path / "tiny-5.5bpw.gguf", tmp_path / "mix.toml"
    result = runner.invoke(main, ["quantize", str(model), str(out), "--target-bpw", "5.5", "--imatrix", str(imatrix),
                                  "--calibration", str(calibration), "--candidates", "Q4_0,Q4_1,Q5_0,Q8_0,IQ4_NL",
                                  "--chunks", "1", "--save-mix", str(mix)])
    assert result.exit_code == 0, result.output
    assert "predicted mean KLD" in result.output and "attn_q" in result.output
    saved = read_mix(mix)
    assert saved.provenance["target_bpw"] == 5.5 and saved.provenance["achieved_bpw"] <= 5.5
    g = read_gguf(out)
    types = {t.name: t.qtype for t in g.tensors}
    assert all(types[name] == qtype for name, qtype in saved.tensors.items())
    assert {saved.tensors[n] for n in saved.tensors if "ffn_down" not in n} <= {T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0,
                                                                                T.IQ4_NL}
    assert {saved.tensors[n] for n in saved.tensors if "ffn_down" in n} == {T.F16}    # rows of 176: nothing fits
    n_params = sum(int(np.prod(t.shape)) for t in g.tensors)
    assert 8 * sum(t.nbytes for t in g.tensors) / n_params <= 5.5
    assert "token_embd.weight" in saved.tensors            # the (tied or not) embedding is in the budget too

    again = tmp_path / "again.gguf"
    result = runner.invoke(main, ["quantize", str(model), str(again), "--mix", str(mix), "--imatrix", str(imatrix)])
    assert result.exit_code == 0, result.output
    h = read_gguf(again)
    for a, b in zip(g.tensors, h.tensors):
        assert a.name == b.name and np.array_equal(g.raw(a), h.raw(b))
    # the prediction travels in the file, and `qtool ppl` sets the measured KLD beside it
    predicted = saved.provenance["predicted_kld"]
    assert g.value(PREDICTED_KLD_KEY) == h.value(PREDICTED_KLD_KEY) == pytest.approx(predicted, rel=1e-12)
    report = tmp_path / "ppl.json"
    result = runner.invoke(main, ["ppl", str(model), str(out), "--dataset", str(calibration), "--ctx", "128",
                                  "--chunks", "2", "--json", str(report)])
    assert result.exit_code == 0, result.output
    doc = json.loads(report.read_text())
    assert doc["models"][0]["predicted_kld"] is None
    assert doc["models"][1]["predicted_kld"] == pytest.approx(predicted, rel=1e-12)
    assert doc["models"][1]["kld_mean"] > 0
    assert "predicted" in result.output


@pytest.mark.parametrize("args, message", [
    (["--target-bpw", "1.0", "--candidates", "Q4_0,Q8_0"], "below the smallest this model admits"),
    (["--target-bpw", "5", "--candidates", "Q4_0,Q7_X"], "unknown tensor type 'Q7_X'"),
    (["--target-bpw", "5", "--no-calibration"], "--target-bpw needs --calibration"),
    (["--target-bpw", "5", "--tensor-type", "attn_v=q8_0"], "set every tensor's type"),
    (["--candidates", "Q4_0", "--type", "Q4_0"], "go with --target-bpw"),
])
def test_cli_errors_are_one_line(tiny, tmp_path, args, message):
    model, imatrix, calibration = tiny
    args = list(args)
    if "--no-calibration" in args:
        args.remove("--no-calibration")
    elif "--target-bpw" in args:
        args += ["--calibration", str(calibration)]
    result = CliRunner().invoke(main, ["quantize", str(model), str(tmp_path / "o.gguf"), "--imatrix", str(imatrix),
                                       *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o.gguf").exists()


def test_cli_mix_naming_a_missing_tensor_or_an_inadmissible_type(tiny, tmp_path):
    model, _, _ = tiny
    choices = _quantizable(model)
    valid = {c.name: T.Q8_0 if c.shape[-1] % 32 == 0 else T.F16 for c in choices}
    for extra, message in (({"blk.7.attn_q.weight": T.Q4_0}, "names tensor blk.7.attn_q.weight"),
                           ({choices[0].name: T.Q4_K}, "are not a multiple of Q4_K's 256-element blocks"),
                           ({"blk.0.ffn_down.weight": T.Q8_0}, "rows of 176 are not a multiple of Q8_0's 32")):
        path = write_mix(MixFile({**valid, **extra}), tmp_path / f"m{len(message)}.toml")
        result = CliRunner().invoke(main, ["quantize", str(model), str(tmp_path / "o.gguf"), "--mix", str(path)])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "o.gguf").exists()


@pytest.mark.interop
def test_llama_cpp_loads_and_runs_a_mix(tiny, tmp_path):
    from tests.interop import need_tool, run_logged

    exe = need_tool("llama-completion")
    model, _, _ = tiny
    choices = _quantizable(model)
    # every 32-element type of the candidates at least once, so each block layout is loaded and run
    cycle = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL]
    mix = write_mix(MixFile({c.name: cycle[i % len(cycle)] if c.shape[-1] % 32 == 0 else T.F16
                             for i, c in enumerate(choices)}), tmp_path / "mix.toml")
    out = tmp_path / "mixed.gguf"
    result = CliRunner().invoke(main, ["quantize", str(model), str(out), "--mix", str(mix)])
    assert result.exit_code == 0, result.output
    # exit status 0 and llama.cpp's timings of the 4 decoded tokens
    run_logged([exe, "-m", out, "-p", "Hello", "-n", "4", "--temp", "0", "-t", "2", "-c", "128", "-no-cnv",
                "--no-warmup", "--no-repack"], expect=(r"\beval time =.*/\s*\d+ runs",), timeout=300)


# --- recipes ------------------------------------------------------------------------------------------------------

RECIPE = """
[source]
path = "model.gguf"
[quantize]
types = ["Q4_K_M"]
[quantize.overrides.Q4_K_M]
{override}
"""


def test_recipe_accepts_a_mix_and_refuses_a_bad_one(tmp_path):
    from qtool.recipe import parse_recipe

    write_mix(MixFile({"blk.0.attn_q.weight": T.Q4_0}), tmp_path / "mix.toml")
    recipe = parse_recipe(RECIPE.format(override='mix = "mix.toml"'), tmp_path / "r.toml")
    assert recipe.overrides["Q4_K_M"] == {"mix": "mix.toml"}
    for override, message in (('mix = "missing.toml"', "quantize.overrides.Q4_K_M.mix: mix file .*missing.toml not found"),
                              ('mix = "mix.toml"\npure = true', "cannot be combined with pure"),
                              ("mix = 3", "must be a path to a mix file")):
        with pytest.raises(QtoolError, match=message):
            parse_recipe(RECIPE.format(override=override), tmp_path / "r.toml")
