"""`qtool generate`: the KV-cache decode loop against full recomputation, the sampler chain against hand-computed
results and a plain-Python reference, seeded reproducibility, streaming of split UTF-8, chat templates, the CLI."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qtool.cli import main
from qtool.convert.converter import plan_conversion, write_plan
from qtool.errors import QtoolError
from qtool.evaluate.generate import (Candidates, LlamaRng, Sampler, SamplingParams, TextStream,
                                     Timings, apply_chat_template, decode_steps, generate, generate_text, min_p,
                                     prompt_tokens, sample_distribution, softmax, temperature, top_k, top_p)
from qtool.evaluate.model import WARM_UP_TOKENS, Model
from qtool.evaluate.tokenizer import Tokenizer
from qtool.evaluate.weights import GGUFWeights
from qtool.gguf_io import read_gguf
from tests.conftest import VOCAB_DIR

VARIANTS = ["llama-spm", "llama-bpe", "qwen2", "qwen3", "baichuan-7b", "baichuan-13b", "baichuan2"]
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="session")
def tiny_gguf(checkpoint_factory, tmp_path_factory):
    """(variant, **config overrides) -> an f32 GGUF of the tiny checkpoint, converted once per session."""
    cache: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("generate_gguf")

    def get(variant: str, **overrides) -> Path:
        key = variant + repr(sorted(overrides.items()))
        if key not in cache:
            plan = plan_conversion(checkpoint_factory(variant, **overrides), "f32")
            try:
                out = root / f"m{len(cache)}-{variant}.gguf"
                write_plan(plan, out)
            finally:
                plan.close()
            cache[key] = out
        return cache[key]

    return get


def load(path: Path) -> tuple[Model, Tokenizer]:
    weights = GGUFWeights(path)
    return Model(weights), Tokenizer.from_gguf(weights.gguf)


# --- the decode loop ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decoding_gives_the_logits_of_a_full_recomputation_at_every_step(variant, tiny_gguf):
    model, tok = load(tiny_gguf(variant))
    prompt = tok.encode(PROMPT, parse_special=True)
    seen_shapes, seen_caches = [], []
    forward = model.forward

    def recording_forward(tokens, **kw):
        seen_shapes.append(np.shape(tokens))
        seen_caches.append(kw.get("cache"))
        return forward(tokens, **kw)

    model.forward = recording_forward
    # a seeded sampler, so that the steps do not settle into one repeated token; a float32 cache, which holds the
    # full pass's own keys and values (an F16 cache: test_eval_model's test_f16_kv_cache_...)
    steps = list(decode_steps(model, prompt, Sampler(SamplingParams(seed=3, temperature=1.5)), 10, cache_type="f32"))
    model.forward = forward

    # the warm-up pass over the prompt's first tokens in a cache of its own, then one batched prefill, then one token
    # per forward pass: the prefix is never recomputed
    assert seen_shapes == [(1, min(len(prompt), WARM_UP_TOKENS)), (1, len(prompt))] + [(1, 1)] * 9
    assert seen_caches[0] is not seen_caches[1] and all(c is seen_caches[1] for c in seen_caches[1:])
    assert len(steps) == 10
    tokens = list(prompt)
    for i, step in enumerate(steps):
        full = model.forward(np.asarray(tokens))[-1]
        np.testing.assert_allclose(step.logits, full, rtol=1e-4, atol=1e-5, err_msg=f"{variant} step {i}")
        tokens.append(step.token)
    assert len(set(tokens[len(prompt):])) > 1


def test_the_warm_up_pass_changes_no_result_and_stays_away_from_an_input_hook(tiny_gguf):
    """decode_steps' warm-up (Model.warm_up, as llama.cpp's tools run one before timing) is a pass in a scratch cache:
    the logits are those of a model that never ran one, and a model with an input hook (imatrix) runs none."""
    results = []
    for warm in (True, False):
        model, tok = load(tiny_gguf("llama-spm"))
        prompt = tok.encode(PROMPT, parse_special=True)
        if not warm:
            model.warm_up = lambda *a, **k: None
        timings = Timings()
        results.append([s.logits for s in decode_steps(model, prompt, lambda logits: 5, 4, timings=timings)])
        assert timings.load_seconds > 0 and timings.prompt_tokens == len(prompt)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    seen = []
    model, _ = load(tiny_gguf("llama-spm"))
    model.on_matmul_input = lambda name, x: seen.append(name)
    model.warm_up(prompt)
    assert seen == []


TWINS_PROBE = """
import sys
import numpy as np
from qtool.evaluate import model as M
from qtool.evaluate.weights import GGUFWeights
m = M.Model(GGUFWeights(sys.argv[1]))
lopsided = lambda: sum(set(p.signatures) != set(s.signatures) for p, s in M._TWINS)
tokens = np.arange(1, 20)
m.forward(tokens[None, :8], output_from=7, cache=M.KVCache.allocate(m.config, batch=1, max_len=8, f16=True))
before = lopsided()
m.warm_up(tokens)
print(before, lopsided())
"""


def test_the_warm_up_loads_the_parallel_and_the_serial_build_of_every_kernel_it_ran(tiny_gguf):
    """A pass of a few tokens runs the serial builds of the batched path's kernels; the warm-up then loads their
    parallel twins too (and the other way round), so that a longer prompt does not load them while it is timed.
    In a fresh process: in this one, other tests may already have run both."""
    out = subprocess.run([sys.executable, "-c", TWINS_PROBE, str(tiny_gguf("llama-spm"))], capture_output=True,
                         text=True, check=True, timeout=600).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before > 0 and after == 0


def test_decode_steps_stop_at_a_stop_token_and_at_the_budget(tiny_gguf):
    model, tok = load(tiny_gguf("qwen2"))
    prompt = tok.encode(PROMPT)
    script = iter([11, 12, 13, 14, 15])
    steps = list(decode_steps(model, prompt, lambda logits: next(script), 5, stop_ids={13}))
    assert [s.token for s in steps] == [11, 12, 13]
    assert [s.token for s in decode_steps(model, prompt, lambda logits: 7, 4)] == [7, 7, 7, 7]
    assert list(decode_steps(model, prompt, lambda logits: 7, 0)) == []


class ScriptedSampler(Sampler):
    """A sampler that returns given tokens in turn (the model still runs for real)."""

    def __init__(self, tokens):
        super().__init__(SamplingParams(temperature=0.0))
        self.tokens = list(tokens)

    def __call__(self, logits):
        return self.tokens.pop(0) if len(self.tokens) > 1 else self.tokens[0]


def test_generate_stops_at_end_of_generation_and_does_not_print_it(tiny_gguf):
    model, tok = load(tiny_gguf("qwen2"))
    eot = min(tok.eot_ids)
    hello, world = tok.encode("Hello"), tok.encode(" world")
    assert len(hello) == len(world) == 1
    printed = []
    result = generate(model, tok, tok.encode(PROMPT), 20, ScriptedSampler([hello[0], world[0], eot, hello[0]]),
                      printed.append)
    assert result.tokens == [hello[0], world[0]]
    assert result.stop_reason == "eog"
    assert result.text == "".join(printed) == "Hello world"
    assert result.timings.samples == 3 and result.timings.decode_runs == 2
    assert result.seed is None


def test_generate_stops_at_the_context_and_at_n(tiny_gguf):
    model, tok = load(tiny_gguf("llama-spm", max_position_embeddings=24))
    assert model.config.context_length == 24
    prompt = tok.encode(PROMPT)
    filler = tok.encode("x", add_special=False)[-1]
    whole = generate(model, tok, prompt, -1, ScriptedSampler([filler]))
    assert (len(whole.tokens), whole.stop_reason, whole.notes) == (24 - len(prompt), "context", [])
    cut = generate(model, tok, prompt, 100, ScriptedSampler([filler]))
    assert (len(cut.tokens), cut.stop_reason) == (24 - len(prompt), "context")
    assert "cut to" in cut.notes[0]
    few = generate(model, tok, prompt, 3, ScriptedSampler([filler]))
    assert (len(few.tokens), few.stop_reason) == (3, "length")
    with pytest.raises(QtoolError, match="prompt has 30 tokens; the model's context is 24"):
        generate(model, tok, prompt[:1] + [filler] * 29, 4, ScriptedSampler([filler]))
    with pytest.raises(QtoolError, match="-n -2"):
        generate(model, tok, prompt, -2, ScriptedSampler([filler]))
    with pytest.raises(QtoolError, match="prompt is empty"):
        generate(model, tok, [], 4, ScriptedSampler([filler]))


def test_a_fixed_seed_reproduces_the_sampled_text(tiny_gguf):
    path = tiny_gguf("llama-bpe")
    runs = [generate_text(path, PROMPT, n_predict=12, sampling=SamplingParams(seed=s, temperature=1.0))
            for s in (7, 7, 8)]
    assert runs[0].tokens == runs[1].tokens and runs[0].text == runs[1].text
    assert runs[0].seed == 7
    assert runs[2].tokens != runs[0].tokens
    unseeded = generate_text(path, PROMPT, n_predict=4, sampling=SamplingParams(temperature=1.0))
    again = generate_text(path, PROMPT, n_predict=4, sampling=SamplingParams(temperature=1.0, seed=unseeded.seed))
    assert again.tokens == unseeded.tokens


def test_greedy_takes_the_argmax_at_every_step(tiny_gguf):
    model, tok = load(tiny_gguf("qwen3"))
    steps = list(decode_steps(model, tok.encode(PROMPT), Sampler(SamplingParams(temperature=0.0)), 6))
    assert [s.token for s in steps] == [int(np.argmax(s.logits)) for s in steps]


# --- the sampler chain ------------------------------------------------------------------------------------------

PROBS = np.array([0.05, 0.5, 0.15, 0.3])       # tokens by probability: 1, 3, 2, 0


def cands(probs=PROBS) -> Candidates:
    return Candidates.from_logits(np.log(np.asarray(probs)).astype(np.float32))


def test_softmax_sums_left_to_right():
    np.testing.assert_allclose(softmax(np.log(PROBS).astype(np.float32)), PROBS, rtol=1e-6)


def test_top_k_keeps_the_k_best_sorted_and_ties_in_vocabulary_order():
    c = top_k(Candidates.from_logits(np.array([1, 3, 2, 3, 0], np.float32)), 3)
    assert c.ids.tolist() == [1, 3, 2] and c.sorted
    assert top_k(cands(), 10).ids.tolist() == [1, 3, 2, 0]
    unchanged = top_k(cands(), 0)
    assert unchanged.ids.tolist() == [0, 1, 2, 3] and not unchanged.sorted


@pytest.mark.parametrize("p, kept", [(0.4, [1]), (0.7, [1, 3]), (0.9, [1, 3, 2]), (0.99, [1, 3, 2, 0]),
                                     (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, kept):
    c = top_p(cands(), p)
    assert c.ids.tolist() == kept
    assert c.sorted == (p < 1.0)


def test_top_p_min_keep_and_sorted_input():
    assert top_p(cands(), 0.4, min_keep=3).ids.tolist() == [1, 3, 2]
    assert top_p(top_k(cands(), 3), 0.7).ids.tolist() == [1, 3]


@pytest.mark.parametrize("p, kept", [(0.05, [0, 1, 2, 3]), (0.2, [1, 2, 3]), (0.5, [1, 3]), (0.7, [1]),
                                     (0.0, [0, 1, 2, 3])])
def test_min_p_keeps_tokens_at_least_p_times_the_best_in_vocabulary_order(p, kept):
    c = min_p(cands(), p)
    assert c.ids.tolist() == kept and not c.sorted


def test_min_p_on_sorted_candidates_and_min_keep():
    assert min_p(top_k(cands(), 4), 0.2).ids.tolist() == [1, 3, 2]
    assert min_p(cands(), 0.7, min_keep=2).ids.tolist() == [1, 3]


def test_temperature_scales_logits_and_zero_keeps_the_first_best():
    c = Candidates.from_logits(np.array([1.0, 4.0, -2.0, 4.0], np.float32))
    np.testing.assert_array_equal(temperature(c, 2.0).logits, [0.5, 2.0, -1.0, 2.0])
    greedy = temperature(c, 0.0).logits
    assert greedy[1] == 4.0 and np.isneginf(greedy[[0, 2, 3]]).all()


class FixedUniform:
    def __init__(self, *values):
        self.values = list(values)

    def uniform(self):
        return self.values.pop(0)


@pytest.mark.parametrize("u, token", [(0.0, 0), (0.49, 0), (0.51, 1), (0.79, 1), (0.81, 2), (0.999, 2)])
def test_distribution_sampling_inverts_the_cumulative_mass(u, token):
    c = Candidates.from_logits(np.log(np.array([0.5, 0.3, 0.2])).astype(np.float32))
    assert sample_distribution(c, FixedUniform(u)) == token


def test_a_single_candidate_still_advances_the_random_numbers():
    rng = FixedUniform(0.3, 0.6)
    assert sample_distribution(Candidates(np.array([9]), np.array([0.0], np.float32)), rng) == 9
    assert rng.values == [0.6]
    with pytest.raises(QtoolError, match="every candidate"):
        sample_distribution(Candidates(np.array([], np.int64), np.array([], np.float32)), rng)


def reference_chain(logits: np.ndarray, params: SamplingParams, u: float) -> int:
    """The default chain in plain Python and float64, over (logit, id) pairs."""
    order = sorted(range(len(logits)), key=lambda i: (-float(logits[i]), i))
    kept = order if params.top_k <= 0 else order[:params.top_k]

    def probs(ids):
        top = max(float(logits[i]) for i in ids)
        e = [math.exp(float(logits[i]) - top) for i in ids]
        return [x / sum(e) for x in e]

    if params.top_p < 1.0:
        total, cut = 0.0, len(kept)
        for n, q in enumerate(probs(kept), start=1):
            total += q
            if total >= params.top_p:
                cut = n
                break
        kept = kept[:cut]
    if params.min_p > 0.0:
        best = float(logits[kept[0]])
        kept = [i for i in kept if float(logits[i]) >= best + math.log(params.min_p)]
    if params.temperature <= 0:
        return kept[0]
    scaled = np.array([float(logits[i]) / params.temperature for i in kept])
    e = np.exp(scaled - scaled.max())
    running = np.cumsum(e)
    return kept[int(np.searchsorted(running, running[-1] * u))]


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.3, top_k=5, top_p=0.8, min_p=0.1),
                                    SamplingParams(temperature=0.5, top_k=0, top_p=0.9, min_p=0.0),
                                    SamplingParams(temperature=0.0)])
def test_the_chain_matches_a_plain_reference_on_random_logits(params):
    rng = np.random.default_rng(11)
    draws = LlamaRng(42)
    sampler = Sampler(SamplingParams(params.temperature, params.top_k, params.top_p, params.min_p, seed=42))
    for _ in range(200):
        logits = (rng.standard_normal(300) * 3).astype(np.float32)
        u = draws.uniform() if not params.greedy else 0.0
        assert sampler(logits) == reference_chain(logits, params, u)


def test_unsorted_min_p_samples_in_vocabulary_order():
    # top-k and top-p off: min-p leaves vocabulary order, and the cumulative walk follows it
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=1)
    logits = np.log(PROBS).astype(np.float32)           # kept: 1 (0.5), 2 (0.15), 3 (0.3), in that order
    u = LlamaRng(1).uniform()
    walk = np.cumsum([0.5, 0.15, 0.3]) / 0.95
    assert Sampler(params)(logits) == [1, 2, 3][int(np.searchsorted(walk, u))]


def test_llama_rng_is_std_mt19937_with_generate_canonical():
    # The C++ standard fixes the 10000th output of a default-constructed mt19937 (seed 5489).
    rng = LlamaRng(5489)
    outputs = [rng.next_uint32() for _ in range(10000)]
    assert outputs[:2] == [3499211612, 581869302] and outputs[-1] == 4123659995
    assert LlamaRng(5489).uniform() == (3499211612 + 581869302 * 2.0**32) / 2.0**64
    with pytest.raises(QtoolError, match="seed"):
        LlamaRng(2**32)


@pytest.mark.parametrize("kw, message", [({"top_p": 1.5}, "top-p"), ({"min_p": -0.1}, "min-p"), ({"seed": -5}, "seed")])
def test_bad_sampling_parameters_are_one_line_errors(kw, message):
    with pytest.raises(QtoolError, match=message):
        SamplingParams(**kw)


# --- text ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vocab", ["llama-spm", "qwen2"])
def test_streaming_holds_back_a_character_split_over_byte_tokens(vocab):
    tok = Tokenizer.from_gguf(read_gguf(VOCAB_DIR / f"ggml-vocab-{vocab}.gguf"))
    byte_token = {}
    for i in range(tok.n_vocab):
        piece = tok.token_piece(i)
        if len(piece) == 1 and piece[0] >= 0x80 and piece[0] not in byte_token:
            byte_token[piece[0]] = i
    euro = [byte_token[b] for b in "€".encode()]          # e2 82 ac
    stream = TextStream(tok)
    assert [stream.push(t) for t in euro] == ["", "", "€"]
    stream = TextStream(tok)
    assert [stream.push(t) for t in euro[:2]] == ["", ""]
    assert stream.flush() == "\ufffd"


SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_template_renders_one_user_turn_and_parses_its_special_tokens():
    tok = Tokenizer.from_gguf(read_gguf(VOCAB_DIR / "ggml-vocab-qwen2.gguf"))
    text = apply_chat_template(SMOL_TEMPLATE, "Hi there", tok)
    assert text == "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n" \
                   "<|im_start|>assistant\n"
    ids = prompt_tokens(tok, "Hi there", SMOL_TEMPLATE)
    im_start = tok.encode("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1 and ids[0] == im_start[0] and ids.count(im_start[0]) == 3


def test_chat_template_drops_a_bos_the_tokenizer_adds_itself():
    tok = Tokenizer.from_gguf(read_gguf(VOCAB_DIR / "ggml-vocab-llama-spm.gguf"))
    assert tok.add_bos
    template = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]{{ eos_token }}"
    assert apply_chat_template(template, "hello", tok) == "[INST] hello [/INST]</s>"
    ids = prompt_tokens(tok, "hello", template)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_chat_template_has_transformers_extras():
    tok = Tokenizer.from_gguf(read_gguf(VOCAB_DIR / "ggml-vocab-qwen2.gguf"))
    template = ("{% for m in messages %}{{ m['content'] }}{% break %}{% endfor %}"
                "{{ ' ' + strftime_now('%Y') if add_generation_prompt }}")
    text = apply_chat_template(template, "hi", tok)
    assert text.startswith("hi ") and text[3:].isdigit()


def test_chat_template_errors_are_one_line():
    tok = Tokenizer.from_gguf(read_gguf(VOCAB_DIR / "ggml-vocab-qwen2.gguf"))
    with pytest.raises(QtoolError, match="chat template failed: only user turns"):
        apply_chat_template("{{ raise_exception('only user turns') }}", "x", tok)
    with pytest.raises(QtoolError, match="chat template failed"):
        apply_chat_template("{% for %}", "x", tok)


# --- the command ------------------------------------------------------------------------------------------------

def run_cli(*args):
    return CliRunner().invoke(main, ["generate", *map(str, args)])


def test_cli_greedy_streams_the_continuation_and_reports_timings(tiny_gguf):
    path = tiny_gguf("qwen2")
    result = run_cli(path, "-p", PROMPT, "-n", 6, "--greedy")
    assert result.exit_code == 0, result.output
    expected = generate_text(path, PROMPT, n_predict=6, sampling=SamplingParams(temperature=0.0))
    assert result.stdout == PROMPT + expected.text + "\n"
    assert "prompt eval" in result.stderr and "tokens per second" in result.stderr
    assert f"stopped: {expected.stop_reason} after {len(expected.tokens)} tokens; greedy" in result.stderr


def test_cli_cache_type_f32_and_f16_decode_the_same_text_here(tiny_gguf):
    """--cache-type picks the KV cache's element type (default f16, as llama.cpp); a wrong one is refused by name."""
    path = tiny_gguf("qwen2")
    results = {t: run_cli(path, "-p", PROMPT, "-n", 6, "--greedy", "--cache-type", t) for t in ("f16", "f32")}
    assert all(r.exit_code == 0 for r in results.values()), [r.output for r in results.values()]
    expected = generate_text(path, PROMPT, n_predict=6, sampling=SamplingParams(temperature=0.0), cache_type="f32")
    assert results["f32"].stdout == PROMPT + expected.text + "\n"
    bad = run_cli(path, "-p", PROMPT, "--cache-type", "q8_0")
    assert bad.exit_code != 0 and "q8_0" in bad.output
    with pytest.raises(QtoolError, match="cache type"):
        next(decode_steps(Model(GGUFWeights(path)), [1, 2], lambda logits: 0, 2, cache_type="bf16"))


def test_cli_seeded_runs_repeat(tiny_gguf):
    path = tiny_gguf("llama-spm")
    a, b = (run_cli(path, "-p", PROMPT, "-n", 8, "--seed", 99, "--temp", 1.0) for _ in range(2))
    assert a.exit_code == b.exit_code == 0
    assert a.stdout == b.stdout and "seed 99" in a.stderr


def test_cli_chat_uses_the_template_and_errors_without_one(tiny_gguf):
    path = tiny_gguf("qwen2")
    has_template = bool(read_gguf(path).value("tokenizer.chat_template"))
    result = run_cli(path, "-p", "Hi", "-n", 3, "--greedy", "--chat")
    if has_template:
        assert result.exit_code == 0, result.output
        assert not result.stdout.startswith("Hi")
    else:
        assert result.exit_code == 2 and "no tokenizer.chat_template" in result.stderr
    bad = run_cli(path, "-p", "Hi", "--top-p", 2)
    assert bad.exit_code == 2 and "top-p 2.0 is outside 0..1" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
