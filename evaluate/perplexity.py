"""Perplexity as llama-perplexity computes it, and KL divergence against a base model, in lockstep.

The protocol (tools/perplexity/perplexity.cpp, `perplexity`):
- the whole text is tokenized once (with BOS when the vocabulary adds one); chunk k is tokens[k*n_ctx:(k+1)*n_ctx],
  the tail after the last whole chunk is dropped, `--chunks` caps the count;
- every chunk is a fresh sequence at positions 0..n_ctx-1, and when the vocabulary adds BOS the chunk's first
  token is replaced by BOS for the forward pass (so later chunks lose their first text token);
- only the second half is scored: the logits at positions first = n_ctx//2 .. n_ctx-2 predict the next token,
  n_ctx - first - 1 tokens per chunk;
- PPL = exp(mean nll), reported +/- PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1)).

Lockstep: the base model and every variant run on the same group of chunks before the next group, so the
variant's per-token KL(base || variant) is computed from both models' float32 logits directly, over the
whole vocabulary (llama.cpp stores base log-probs in 16 bits and drops those below e^-16).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import qtool.numba_start  # noqa: F401  (before numba: its start-up without SciPy)
from numba import njit, prange

from qtool.errors import QtoolError
from qtool.gguf_io import PREDICTED_KLD_KEY

# llama-perplexity's default n_batch: it evaluates max(1, n_batch / n_ctx) chunks at a time.
DEFAULT_BATCH_TOKENS = 2048
# Cap on the float32 logits one group of chunks keeps for the base model (large vocabularies).
GROUP_LOGIT_BYTES = 512 * 1024 * 1024
MIN_CTX = 4


class LanguageModel(Protocol):
    n_vocab: int

    def forward(self, tokens: np.ndarray, *, output_from: int = 0) -> np.ndarray: ...


@dataclass
class TokenScores:
    """Per scored token, in chunk order. KLD fields are filled for variants only."""

    nll: np.ndarray                          # float64, -log p(next token)
    kld: np.ndarray | None = None            # float64, KL(base || this model) of the next-token distribution
    p_diff: np.ndarray | None = None         # float64, p(next token) - p_base(next token)
    same_top1: np.ndarray | None = None      # bool, argmax equals the base's argmax


@dataclass
class Progress:
    chunks_done: int
    n_chunks: int
    tokens_evaluated: int        # forward-pass tokens over all models so far
    elapsed: float
    running_ppl: list[float]     # per model, over the chunks done


# --- the protocol, piece by piece ------------------------------------------------------------------------------

def count_chunks(n_tokens: int, n_ctx: int, max_chunks: int | None = None) -> int:
    if n_ctx < MIN_CTX:
        raise QtoolError(f"--ctx {n_ctx} is too small (at least {MIN_CTX})")
    n = n_tokens // n_ctx
    if n == 0:
        raise QtoolError(f"the dataset tokenizes to {n_tokens} tokens, fewer than one chunk of --ctx {n_ctx}")
    if max_chunks is not None:
        if max_chunks <= 0:
            raise QtoolError("--chunks must be positive")
        n = min(n, max_chunks)
    return n


def scored_per_chunk(n_ctx: int) -> int:
    return n_ctx - n_ctx // 2 - 1


def chunk_inputs(tokens: np.ndarray, first_chunk: int, n: int, n_ctx: int,
                 bos_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(forward-pass inputs (n, n_ctx), targets (n, scored_per_chunk)) of chunks first_chunk..first_chunk+n-1.

    `bos_id` None: no BOS substitution (the vocabulary adds no BOS).
    """
    chunks = np.asarray(tokens[first_chunk * n_ctx:(first_chunk + n) * n_ctx], dtype=np.int64).reshape(n, n_ctx)
    first = n_ctx // 2
    targets = chunks[:, first + 1:].copy()
    inputs = chunks.copy()
    if bos_id is not None:
        inputs[:, 0] = bos_id
    return inputs, targets


@njit(parallel=True, cache=True)
def _row_log_z_argmax(logits: np.ndarray, log_z: np.ndarray, top: np.ndarray) -> None:
    for r in prange(logits.shape[0]):
        row = logits[r]
        best, i_best = row[0], 0
        for i in range(1, row.size):
            if row[i] > best:          # first index on ties, as llama.cpp
                best, i_best = row[i], i
        total = 0.0
        for i in range(row.size):
            total += math.exp(row[i] - best)
        log_z[r] = math.log(total) + best
        top[r] = i_best


def log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log Z, -log p(target), argmax) per row of float32 logits (rows, vocab); log Z = max + log sum e^(l - max).

    The sum of exponentials is accumulated in float64 and nll = log Z - l[target], as llama.cpp's log_softmax.
    """
    logits = np.ascontiguousarray(logits)
    log_z = np.empty(logits.shape[0], np.float64)
    top = np.empty(logits.shape[0], np.int64)
    _row_log_z_argmax(logits, log_z, top)
    return log_z, log_z - logits[np.arange(len(targets)), targets].astype(np.float64), top


@njit(parallel=True, cache=True)
def _row_kl(base_logits: np.ndarray, base_log_z: np.ndarray, logits: np.ndarray, out: np.ndarray) -> None:
    for r in prange(base_logits.shape[0]):
        lb, lq = base_logits[r], logits[r]
        total = first = second = 0.0
        for i in range(lb.size):
            p = math.exp(np.float64(lb[i]) - base_log_z[r])
            d = np.float64(lb[i] - lq[i])
            total += p
            first += p * d
            second += p * math.exp(-d)
        out[r] = first / total + math.log(second / total)


def kl_divergence(base_logits: np.ndarray, base_log_z: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(base || model) per row = sum_i p_i (log p_i - log q_i), over the whole vocabulary (float32 logit rows).

    With d = l_base - l (float32 differences: nearly exact for similar models) and p = softmax(l_base):
    KL = sum p d + log sum p e^-d, everything after d in float64. No term carries a row's log-partition
    rounding, which float32 log-probabilities would (~1e-7 * |log p| per term: as large as the KLD of a
    good 8-bit model).
    """
    out = np.empty(base_logits.shape[0], np.float64)
    _row_kl(np.ascontiguousarray(base_logits), base_log_z, np.ascontiguousarray(logits), out)
    bad = ~np.isfinite(out)
    if bad.any():  # e^-d overflowed: models absurdly far apart; plain log-softmax differences are accurate there
        out[bad] = _kl_direct(base_logits[bad], logits[bad])
    return out


def _kl_direct(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(base_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


# --- the loop ---------------------------------------------------------------------------------------------------

def group_size(n_ctx: int, n_vocab: int, batch_tokens: int = DEFAULT_BATCH_TOKENS) -> int:
    """Chunks evaluated together: llama-perplexity's n_seq, bounded by the base log-probs kept per group."""
    n_seq = max(1, batch_tokens // n_ctx)
    per_chunk = 4 * scored_per_chunk(n_ctx) * n_vocab
    return max(1, min(n_seq, GROUP_LOGIT_BYTES // max(1, per_chunk)))


def evaluate(models: Sequence[LanguageModel], tokens: np.ndarray, n_ctx: int, *, n_chunks: int | None = None,
             bos_id: int | None = None, chunks_per_group: int | None = None,
             progress: Callable[[Progress], None] | None = None) -> list[TokenScores]:
    """Score `tokens` with every model in lockstep; models[0] is the base of the KL divergences.

    `bos_id`: the BOS that replaces each chunk's first token (None when the vocabulary adds no BOS).
    """
    if not models:
        raise ValueError("no models")
    tokens = np.asarray(tokens, dtype=np.int64)
    n_total = count_chunks(len(tokens), n_ctx, n_chunks)
    n_vocab = models[0].n_vocab
    for m in models[1:]:
        if m.n_vocab != n_vocab:
            raise QtoolError(f"models have different vocabulary sizes ({n_vocab} and {m.n_vocab})")
    first = n_ctx // 2
    group = chunks_per_group or group_size(n_ctx, n_vocab)
    per_model: list[dict[str, list[np.ndarray]]] = [
        {"nll": [], "kld": [], "p_diff": [], "same_top1": []} for _ in models]
    t0 = time.perf_counter()
    for start in range(0, n_total, group):
        n = min(group, n_total - start)
        inputs, targets = chunk_inputs(tokens, start, n, n_ctx, bos_id)
        base_logits = base_log_z = base_nll = base_top = None
        for mi, model in enumerate(models):
            # logits at n_ctx-1 predict past the chunk: llama.cpp computes and ignores them, so do we
            logits = model.forward(inputs, output_from=first)[:, :-1]
            if len(models) > 1 and hasattr(model, "unmap"):
                model.unmap()          # one model's pages at a time
            acc = per_model[mi]
            if mi == 0:
                base_logits, base_log_z = logits, np.empty(targets.shape, np.float64)
                base_nll, base_top = np.empty(targets.shape, np.float64), np.empty(targets.shape, np.int64)
            for j in range(n):
                log_z, nll, top = log_softmax_nll(logits[j], targets[j])
                acc["nll"].append(nll)
                if mi == 0:
                    base_log_z[j], base_nll[j], base_top[j] = log_z, nll, top
                else:
                    acc["kld"].append(kl_divergence(base_logits[j], base_log_z[j], logits[j]))
                    acc["p_diff"].append(np.exp(-nll) - np.exp(-base_nll[j]))
                    acc["same_top1"].append(top == base_top[j])
            if mi > 0:
                del logits             # before the next model's forward makes its own
        if progress is not None:
            progress(Progress(start + n, n_total, (start + n) * n_ctx * len(models), time.perf_counter() - t0,
                              [float(np.exp(np.mean(np.concatenate(acc["nll"])))) for acc in per_model]))
    out = []
    for mi, acc in enumerate(per_model):
        s = TokenScores(np.concatenate(acc["nll"]))
        if mi > 0:
            s.kld, s.p_diff = np.concatenate(acc["kld"]), np.concatenate(acc["p_diff"])
            s.same_top1 = np.concatenate(acc["same_top1"])
        out.append(s)
    return out


# --- statistics ---------------------------------------------------------------------------------------------------

def perplexity(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its uncertainty) exactly as llama-perplexity's final estimate."""
    nll = np.asarray(nll, dtype=np.float64)
    n = nll.size
    mean = float(nll.sum() / n)
    ppl = float(np.exp(mean))
    var = float((nll * nll).sum() / n - mean * mean)
    return ppl, (ppl * float(np.sqrt(var / (n - 1))) if var > 0 and n > 1 else 0.0)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty: the mean and the standard error of the mean (0 for n <= 10)."""
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    mean = float(x.sum() / n)
    var = float((x * x).sum() / n - mean * mean)
    return mean, (float(np.sqrt(var / (n - 1))) if var > 0 and n > 10 else 0.0)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear interpolation at fraction * (n - 1) of sorted values."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, len(v) - 1)])


def median(sorted_values: np.ndarray) -> float:
    v, n = sorted_values, len(sorted_values)
    return float(0.5 * (v[n // 2] + v[n // 2 - 1]) if n % 2 == 0 else v[n // 2])


@dataclass
class ModelSummary:
    path: str
    size_bytes: int
    n_params: int
    bpw: float
    ppl: float
    ppl_err: float
    delta_ppl: float | None = None
    delta_ppl_pct: float | None = None
    kld_mean: float | None = None
    kld_err: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_p999: float | None = None
    kld_max: float | None = None
    same_top1_pct: float | None = None
    rms_dp_pct: float | None = None
    predicted_kld: float | None = None     # what `qtool quantize --target-bpw/--mix` predicted (PREDICTED_KLD_KEY)


def summarize(scores: TokenScores, base: TokenScores | None, *, path: str, size_bytes: int, n_params: int,
              bpw: float) -> ModelSummary:
    ppl, err = perplexity(scores.nll)
    s = ModelSummary(path=path, size_bytes=size_bytes, n_params=n_params, bpw=bpw, ppl=ppl, ppl_err=err)
    if base is None:
        return s
    base_ppl, _ = perplexity(base.nll)
    s.delta_ppl = ppl - base_ppl
    s.delta_ppl_pct = 100.0 * s.delta_ppl / base_ppl
    s.kld_mean, s.kld_err = mean_and_uncertainty(scores.kld)
    kld_sorted = np.sort(scores.kld)
    s.kld_median = median(kld_sorted)
    s.kld_p99 = percentile(kld_sorted, 0.99)
    s.kld_p999 = percentile(kld_sorted, 0.999)
    s.kld_max = float(kld_sorted[-1])
    s.same_top1_pct = 100.0 * float(np.mean(scores.same_top1))
    s.rms_dp_pct = 100.0 * float(np.sqrt(np.mean(np.square(scores.p_diff))))
    return s


# --- a whole run from files ---------------------------------------------------------------------------------------

@dataclass
class PerplexityRun:
    dataset: str
    n_ctx: int
    n_chunks: int
    n_tokens_scored: int
    wall_seconds: float
    tokens_per_second: float       # forward-pass tokens of all models per second of the evaluation loop
    activations: str = "llama.cpp"
    models: list[ModelSummary] = field(default_factory=list)


def _vocab_signature(weights) -> tuple:
    g = weights.gguf
    return (g.value("tokenizer.ggml.model"), g.value("tokenizer.ggml.tokens"))


def check_same_vocab(base, variant) -> None:
    """Variants must share the base's vocabulary (token texts) and logit count, or KLD is meaningless."""
    b, v = _vocab_signature(base.weights), _vocab_signature(variant.weights)
    if b[0] != v[0]:
        raise QtoolError(f"{variant.weights.path}: tokenizer model {v[0]!r} differs from the base's {b[0]!r}")
    if b[1] != v[1] or base.n_vocab != variant.n_vocab:
        nb, nv = len(b[1] or []), len(v[1] or [])
        detail = (f"{nv} tokens vs {nb}" if nb != nv else f"{variant.n_vocab} logits vs {base.n_vocab}"
                  if base.n_vocab != variant.n_vocab else "same size, different tokens")
        raise QtoolError(f"{variant.weights.path}: vocabulary differs from the base {base.weights.path} ({detail})")


def open_models(paths: Sequence[str | Path], *, max_memory: int | None = None, activations: str = "llama.cpp",
                n_ctx: int | None = None) -> list:
    """The base (first) and the variants, memory-mapped, checked to share a vocabulary (and, given `n_ctx`, a
    context that long): what a whole run and each of its chunk ranges (`score_chunks`) evaluate."""
    from qtool.evaluate.model import Model, Workspace
    from qtool.evaluate.weights import GGUFWeights, MemoryBudget

    budget = MemoryBudget(max_memory)
    shared = Workspace()           # the models run one after another: one set of work buffers for all of them
    models = [Model(GGUFWeights(Path(p), budget), activations=activations, workspace=shared) for p in paths]
    for m in models[1:]:
        check_same_vocab(models[0], m)
    for m in models:
        if n_ctx is not None and n_ctx > m.config.context_length:
            raise QtoolError(f"--ctx {n_ctx} exceeds {m.weights.path.name}'s context length {m.config.context_length}")
    return models


def chunked_tokens(gguf_file, text: str, n_ctx: int, n_chunks: int | None, *, parse_special: bool = False,
                   what: str | None = None) -> tuple[np.ndarray, int, int | None]:
    """(tokens of `text` in the vocabulary of the model file `gguf_file`, tokenized as llama-perplexity and
    llama-imatrix tokenize it, the whole chunks of n_ctx tokens to use, the BOS that starts each chunk or None).
    `what` names the text in the error for a text too short for one chunk."""
    from qtool.evaluate.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf_file)
    # With a chunk count only the tokens those chunks take (the whole text's first ones: Tokenizer.encode)
    limit = n_chunks * n_ctx if n_chunks is not None and n_chunks > 0 and n_ctx > 0 else None
    tokens = np.asarray(tokenizer.encode(text, add_special=True, parse_special=parse_special, max_tokens=limit),
                        dtype=np.int64)
    try:
        n = count_chunks(len(tokens), n_ctx, n_chunks)
    except QtoolError as e:
        if what is None:
            raise
        raise QtoolError(f"{what}: {e}") from None
    return tokens, n, tokenizer.bos_id if tokenizer.add_bos else None


def score_chunks(models: Sequence[LanguageModel], chunk_tokens: np.ndarray, n_ctx: int, bos_id: int | None, *,
                 progress: Callable[[Progress], None] | None = None) -> list[TokenScores]:
    """One range of whole chunks (`chunk_tokens`, n * n_ctx tokens) in lockstep: a whole run is the one-range case.

    Groups are `group_size` chunks from the range's start, so a range that starts on a group boundary runs
    exactly the forward passes a whole run runs there, and `merge_scores` of the ranges equals the whole run.
    """
    n = len(chunk_tokens) // n_ctx
    return evaluate(models, chunk_tokens[:n * n_ctx], n_ctx, n_chunks=n, bos_id=bos_id,
                    chunks_per_group=group_size(n_ctx, models[0].n_vocab), progress=progress)


def merge_scores(parts: Sequence[list[TokenScores]]) -> list[TokenScores]:
    """Per model, the per-token scores of consecutive chunk ranges, in chunk order (a concatenation: exact)."""
    def cat(field_name: str, mi: int) -> np.ndarray | None:
        arrays = [getattr(part[mi], field_name) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays)
    return [TokenScores(cat("nll", mi), cat("kld", mi), cat("p_diff", mi), cat("same_top1", mi))
            for mi in range(len(parts[0]))]


def summarize_run(models, scores: list[TokenScores], *, dataset_name: str, n_ctx: int, n_chunks: int,
                  wall: float, activations: str) -> PerplexityRun:
    """The statistics of a run from its per-token scores (base first) and the models' files."""
    summaries = [summarize(s, scores[0] if i else None, path=str(m.weights.path), size_bytes=m.weights.size_bytes,
                           n_params=m.weights.n_params, bpw=m.weights.bits_per_weight)
                 for i, (s, m) in enumerate(zip(scores, models))]
    for summary, m in zip(summaries[1:], models[1:]):
        predicted = m.weights.value(PREDICTED_KLD_KEY)
        summary.predicted_kld = float(predicted) if isinstance(predicted, (int, float)) else None
    return PerplexityRun(dataset=dataset_name, n_ctx=n_ctx, n_chunks=n_chunks,
                         n_tokens_scored=n_chunks * scored_per_chunk(n_ctx), wall_seconds=wall,
                         tokens_per_second=len(models) * n_chunks * n_ctx / wall if wall > 0 else 0.0,
                         activations=activations, models=summaries)


def run_perplexity(base_path: str | Path, variant_paths: Sequence[str | Path], text: str, *, dataset_name: str,
                   n_ctx: int = 512, n_chunks: int | None = None, max_memory: int | None = None,
                   activations: str = "llama.cpp",
                   progress: Callable[[Progress], None] | None = None) -> PerplexityRun:
    """Load the models, tokenize `text` with the base's vocabulary, evaluate in lockstep, summarize.

    `activations`: "llama.cpp" rounds every matrix product's input as llama.cpp's CPU backend does for the
    weight's type (the numbers llama-perplexity prints), "float32" keeps activations exact.
    """
    models = open_models([base_path, *variant_paths], max_memory=max_memory, activations=activations, n_ctx=n_ctx)
    tokens, n_total, bos = chunked_tokens(models[0].weights.gguf, text, n_ctx, n_chunks)
    t0 = time.perf_counter()
    scores = score_chunks(models, tokens[:n_total * n_ctx], n_ctx, bos, progress=progress)
    return summarize_run(models, scores, dataset_name=dataset_name, n_ctx=n_ctx, n_chunks=n_total,
                         wall=time.perf_counter() - t0, activations=activations)
