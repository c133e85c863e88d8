"""Text generation: prefill the prompt in one batched pass, then decode one token at a time with a KV cache.

    result = generate_text("model.gguf", "The meaning of life is", n_predict=64,
                           sampling=SamplingParams(seed=1), on_text=print_without_newline)

Sampling follows llama.cpp's default chain (common/sampling.cpp with common_params_sampling defaults; penalties,
DRY, top-n-sigma, typical-p and XTC are off there, so they are absent here):

    top-k -> top-p -> min-p -> temperature -> dist

top-p and min-p see the distribution at temperature 1; the temperature only reshapes what they kept, and a
temperature <= 0 keeps the single best candidate (greedy). Each step works on `Candidates` as llama.cpp's
llama_token_data_array does, including its "sorted" flag: min-p on unsorted candidates (top-k and top-p off)
keeps vocabulary order, and `dist` walks the candidates in their current order, so the order decides which
token a given random number selects.

The random numbers are llama.cpp's too: std::mt19937 seeded with the 32-bit seed, one
uniform_real_distribution<double>(0, 1) draw per sampled token, made of two 32-bit outputs as libstdc++'s
generate_canonical combines them. Given the same logits and seed, a step picks the token llama.cpp picks; our
float32 logits differ from llama.cpp's in the last bits, so long sampled runs agree only for a while.

The KV cache holds keys and values as float16 by default, as llama.cpp's does (`cache_type="f32"`: float32): a
decoded token reads half the bytes, and its attention sees the values llama.cpp's sees.

Streaming: each token's bytes (llama_token_to_piece, special tokens as empty text, as llama-cli prints them) go
through an incremental UTF-8 decoder, so a character split over two byte tokens is emitted once it is whole.
"""
from __future__ import annotations

import codecs
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from qtool.errors import QtoolError
from qtool.evaluate.model import KVCache, Model
from qtool.evaluate.tokenizer import Tokenizer
from qtool.evaluate.weights import GGUFWeights, MemoryBudget

TextCallback = Callable[[str], None]
CACHE_TYPES = ("f16", "f32")        # the KV cache's element type (llama.cpp: --cache-type-k / -v, default f16)

# 2^32 and 2^64 as doubles: generate_canonical<double, 53> over a 32-bit engine takes two draws.
_TWO_32 = 4294967296.0
_TWO_64 = 18446744073709551616.0
_BELOW_ONE = float(np.nextafter(1.0, 0.0))


# --- random numbers ------------------------------------------------------------------------------------------------

class LlamaRng:
    """std::mt19937(seed) and uniform_real_distribution<double>(0, 1) as llama.cpp's dist sampler draws them."""

    def __init__(self, seed: int):
        if not 0 <= seed < 2**32:
            raise QtoolError(f"seed {seed} is outside 0..{2**32 - 1}")
        self.seed = seed
        # RandomState seeds MT19937 with init_genrand, exactly as std::mt19937's constructor does.
        state = np.random.RandomState(seed).get_state(legacy=False)["state"]
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": state}

    def next_uint32(self) -> int:
        return int(self._bits.random_raw())

    def uniform(self) -> float:
        low, high = (float(x) for x in self._bits.random_raw(2))
        value = (low + high * _TWO_32) / _TWO_64
        return _BELOW_ONE if value >= 1.0 else value


# --- the sampler chain ---------------------------------------------------------------------------------------------

@dataclass
class Candidates:
    """Token ids and their logits, in the order the chain has left them; `sorted` = by logit, descending."""

    ids: np.ndarray              # int64
    logits: np.ndarray           # float32
    sorted: bool = False

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> Candidates:
        logits = np.asarray(logits, dtype=np.float32)
        return cls(np.arange(logits.size, dtype=np.int64), logits.copy())

    def __len__(self) -> int:
        return int(self.ids.size)

    def take(self, index: np.ndarray | slice, sorted: bool) -> Candidates:
        return Candidates(self.ids[index], self.logits[index], sorted)

    def by_logit(self) -> Candidates:
        """Sorted descending; equal logits keep their current order (llama.cpp's std::partial_sort leaves that
        order unspecified, so exact ties are the one place the two may pick differently)."""
        if self.sorted:
            return self
        return self.take(np.argsort(-self.logits, kind="stable"), sorted=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """float32 probabilities in the given order, summed left to right as llama_sampler_softmax_impl does."""
    e = np.exp(logits - logits.max(), dtype=np.float32)
    return e / np.cumsum(e, dtype=np.float32)[-1]


def top_k(c: Candidates, k: int) -> Candidates:
    """The k highest logits, sorted; k <= 0 disables."""
    if k <= 0 or len(c) == 0:
        return c
    return c.by_logit().take(slice(0, min(k, len(c))), sorted=True)


def top_p(c: Candidates, p: float, min_keep: int = 0) -> Candidates:
    """The smallest sorted prefix whose probabilities (at temperature 1) sum to at least p; p >= 1 disables."""
    if p >= 1.0 or len(c) == 0:
        return c
    probs = softmax(c.logits)
    order = np.arange(len(c)) if c.sorted else np.argsort(-c.logits, kind="stable")
    cumulative = np.cumsum(probs[order], dtype=np.float32)
    enough = (cumulative >= np.float32(p)) & (np.arange(1, len(c) + 1) >= min_keep)
    keep = int(np.argmax(enough)) + 1 if enough.any() else len(c)
    return c.take(order[:keep], sorted=True)


def min_p(c: Candidates, p: float, min_keep: int = 0) -> Candidates:
    """Candidates whose probability is at least p times the best one's; p <= 0 disables.

    In logits: logit >= max logit + log(p). Unsorted candidates stay in their order.
    """
    if p <= 0.0 or len(c) == 0:
        return c
    threshold = np.float32(c.logits.max()) + np.float32(np.log(np.float32(p)))
    if not c.sorted:
        kept = np.flatnonzero(c.logits >= threshold)
        if kept.size and kept.size >= min_keep:
            return c.take(kept, sorted=False)
        c = c.by_logit()
    below = np.flatnonzero(c.logits[1:] < threshold) + 1          # the best token always stays
    below = below[below >= min_keep]
    return c.take(slice(0, int(below[0]) if below.size else len(c)), sorted=True)


def temperature(c: Candidates, t: float) -> Candidates:
    """Logits divided by t; t <= 0 leaves only the first best candidate finite (greedy)."""
    if len(c) == 0:
        return c
    if t <= 0.0:
        logits = np.full_like(c.logits, -np.inf)
        best = int(np.argmax(c.logits))
        logits[best] = c.logits[best]
    else:
        logits = c.logits / np.float32(t)
    return Candidates(c.ids, logits, c.sorted)


def sample_distribution(c: Candidates, rng: LlamaRng) -> int:
    """One token drawn from softmax(logits): the first candidate whose running mass reaches u * total."""
    if len(c) == 0:
        raise QtoolError("sampling removed every candidate token")
    u = rng.uniform()   # drawn even for a single candidate, as llama.cpp keeps its RNG in step that way
    if len(c) == 1:
        return int(c.ids[0])
    weights = np.exp(c.logits - c.logits.max(), dtype=np.float32).astype(np.float64)
    running = np.cumsum(weights)
    index = int(np.searchsorted(running, running[-1] * u, side="left"))
    return int(c.ids[min(index, len(c) - 1)])


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's defaults (common_params_sampling); temperature <= 0 is greedy."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None      # None: a fresh random seed, reported in the result

    def __post_init__(self) -> None:
        if not 0.0 <= self.top_p <= 1.0:
            raise QtoolError(f"top-p {self.top_p} is outside 0..1")
        if not 0.0 <= self.min_p <= 1.0:
            raise QtoolError(f"min-p {self.min_p} is outside 0..1")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise QtoolError(f"seed {self.seed} is outside 0..{2**32 - 1}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Sampler:
    """logits (n_vocab,) -> token id, through the chain; the RNG advances once per call (unless greedy)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(32)
        self.rng = LlamaRng(self.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            # what the chain gives at temperature 0, without sorting the vocabulary
            return int(np.argmax(logits))
        c = Candidates.from_logits(logits)
        c = top_k(c, p.top_k)
        c = top_p(c, p.top_p)
        c = min_p(c, p.min_p)
        c = temperature(c, p.temperature)
        return sample_distribution(c, self.rng)


# --- streaming text ------------------------------------------------------------------------------------------------

class TextStream:
    """Token ids -> text pieces, holding back the bytes of a character that is not complete yet."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.token_piece(token, special=False))

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


# --- chat templates ------------------------------------------------------------------------------------------------

def apply_chat_template(template: str, user_message: str, tokenizer: Tokenizer) -> str:
    """The prompt text of one user turn plus the assistant's generation prompt, as llama.cpp formats it.

    Rendered like transformers' apply_chat_template (sandboxed jinja2, trim_blocks, lstrip_blocks, loop controls,
    raise_exception, strftime_now) with bos_token / eos_token set; then, as common_chat_templates_apply does,
    a leading BOS text is dropped when the tokenizer adds BOS itself (and a trailing EOS when it adds EOS).
    """
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise QtoolError("--chat needs the jinja2 package (pip install jinja2)") from None

    def raise_exception(message: str):
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    bos = tokenizer.token_piece(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos = tokenizer.token_piece(tokenizer.eos_id) if tokenizer.eos_id is not None else ""
    bos, eos = bos.decode("utf-8", "replace"), eos.decode("utf-8", "replace")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        text = env.from_string(template).render(messages=[{"role": "user", "content": user_message}],
                                                add_generation_prompt=True, bos_token=bos, eos_token=eos)
    except TemplateError as e:
        raise QtoolError(f"the chat template failed: {e}") from None
    if tokenizer.add_bos and bos and text.startswith(bos):
        text = text[len(bos):]
    if tokenizer.add_eos and eos and text.endswith(eos):
        text = text[:-len(eos)]
    return text


# --- the decode loop -----------------------------------------------------------------------------------------------

@dataclass
class Timings:
    """Wall-clock seconds of the forward passes (as llama.cpp's prompt eval / eval times) and of sampling."""

    load_seconds: float = 0.0        # before the first pass: compiling the decoding layers, the warm-up pass
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_runs: int = 0             # one-token forward passes after the prefill
    decode_seconds: float = 0.0
    samples: int = 0
    sample_seconds: float = 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_runs / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class Step:
    token: int
    logits: np.ndarray               # (n_vocab,) float32, the distribution `token` was drawn from


def decode_steps(model: Model, prompt: list[int], choose: Callable[[np.ndarray], int], max_new_tokens: int,
                 stop_ids: Iterable[int] = (), timings: Timings | None = None,
                 cache_type: str = "f16") -> Iterator[Step]:
    """Prefill `prompt` in one pass, then feed back each chosen token through the KV cache.

    Yields every chosen token (a stop token too, after which it ends) and at most `max_new_tokens` of them;
    the cache holds exactly prompt + max_new_tokens - 1 positions, since the last token is never fed back.
    `cache_type`: "f16" keeps keys and values as float16, as llama.cpp does by default (its --cache-type-k/-v);
    "f32" as float32.
    """
    if cache_type not in CACHE_TYPES:
        raise QtoolError(f"cache type must be one of {', '.join(CACHE_TYPES)}, not {cache_type!r}")
    timings = timings if timings is not None else Timings()
    if max_new_tokens <= 0:
        return
    stop = set(stop_ids)
    cache = KVCache.allocate(model.config, batch=1, max_len=len(prompt) + max_new_tokens - 1,
                             f16=cache_type == "f16")
    t0 = time.perf_counter()
    if cache_type == "f16" and max_new_tokens > 1:       # tokens will be decoded: compile their layers first
        model.prepare_decoding()
    if len(prompt) > 1:     # and a warm-up pass, as llama.cpp's tools run one (one token: the step just prepared)
        model.warm_up(prompt, f16=cache_type == "f16")
    timings.load_seconds += time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = model.forward(np.asarray([prompt], dtype=np.int64), output_from=len(prompt) - 1, cache=cache)[0, -1]
    timings.prompt_tokens = len(prompt)
    timings.prefill_seconds = time.perf_counter() - t0
    for n in range(1, max_new_tokens + 1):
        t0 = time.perf_counter()
        token = choose(logits)
        timings.samples += 1
        timings.sample_seconds += time.perf_counter() - t0
        yield Step(token, logits)
        if token in stop or n == max_new_tokens:
            return
        t0 = time.perf_counter()
        logits = model.forward(np.asarray([[token]], dtype=np.int64), cache=cache)[0, -1]
        timings.decode_runs += 1
        timings.decode_seconds += time.perf_counter() - t0


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int]                # generated, without the stop token
    text: str                        # what was streamed
    stop_reason: str                 # "eog" (end-of-generation token), "length" (-n) or "context" (context full)
    seed: int | None                 # None when greedy
    timings: Timings
    notes: list[str] = field(default_factory=list)


def generate(model: Model, tokenizer: Tokenizer, prompt: list[int], n_predict: int, sampler: Sampler,
             on_text: TextCallback | None = None, cache_type: str = "f16") -> GenerationResult:
    """Generate up to `n_predict` tokens (-1: until an end-of-generation token or the context is full)."""
    if not prompt:
        raise QtoolError("the prompt is empty (and the vocabulary adds no BOS token)")
    if n_predict < -1:
        raise QtoolError(f"-n {n_predict}: use a count >= 0, or -1 for no limit")
    n_ctx = model.config.context_length
    if len(prompt) >= n_ctx:
        raise QtoolError(f"the prompt has {len(prompt)} tokens; the model's context is {n_ctx}")
    room = n_ctx - len(prompt)
    budget = room if n_predict == -1 else min(n_predict, room)
    notes = []
    if n_predict > room:
        notes.append(f"note: -n {n_predict} is cut to {room}, the room left in the model's {n_ctx}-token context")

    stream, timings = TextStream(tokenizer), Timings()
    tokens, pieces, stop_reason = [], [], "eog"
    for step in decode_steps(model, prompt, sampler, budget, tokenizer.eot_ids, timings, cache_type):
        if step.token in tokenizer.eot_ids:
            stop_reason = "eog"
            break
        tokens.append(step.token)
        piece = stream.push(step.token)
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
    else:  # no end-of-generation token: the budget ran out
        stop_reason = "context" if n_predict == -1 or n_predict > room else "length"
    tail = stream.flush()
    if tail:
        pieces.append(tail)
        if on_text is not None:
            on_text(tail)
    return GenerationResult(list(prompt), tokens, "".join(pieces), stop_reason,
                            None if sampler.params.greedy else sampler.seed, timings, notes)


def prompt_tokens(tokenizer: Tokenizer, prompt: str, chat_template: str | None) -> list[int]:
    """Token ids as llama-completion makes them: specials parsed, BOS when the vocabulary adds one."""
    text = apply_chat_template(chat_template, prompt, tokenizer) if chat_template is not None else prompt
    return tokenizer.encode(text, add_special=True, parse_special=True)


def generate_text(path: str | Path, prompt: str, *, n_predict: int = 128, sampling: SamplingParams = SamplingParams(),
                  chat: bool = False, on_text: TextCallback | None = None,
                  max_memory: int | None = None, cache_type: str = "f16") -> GenerationResult:
    """Open a GGUF model and generate a continuation of `prompt` (with `chat`: the answer to it as a user turn)."""
    weights = GGUFWeights(path, MemoryBudget(max_memory) if max_memory is not None else None)
    tokenizer = Tokenizer.from_gguf(weights.gguf)
    template = None
    if chat:
        template = weights.value("tokenizer.chat_template")
        if not template:
            raise QtoolError(f"{path}: no tokenizer.chat_template in the file; run without --chat")
    ids = prompt_tokens(tokenizer, prompt, template)
    model = Model(weights)
    if tokenizer.n_vocab != model.n_vocab:
        raise QtoolError(f"{path}: the vocabulary has {tokenizer.n_vocab} tokens but token_embd has {model.n_vocab} rows")
    result = generate(model, tokenizer, ids, n_predict, Sampler(sampling), on_text, cache_type)
    return result


__all__ = ["CACHE_TYPES", "Candidates", "GenerationResult", "LlamaRng", "Sampler", "SamplingParams", "Step",
           "TextStream", "Timings", "apply_chat_template", "decode_steps", "generate", "generate_text", "min_p",
           "prompt_tokens", "sample_distribution", "softmax", "temperature", "top_k", "top_p"]
