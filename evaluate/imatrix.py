"""Importance matrices from our own forward pass, as llama-imatrix computes them (docs/reference/quantization.md
§6, docs/reference/conversion-and-evaluation.md §D.4).

The model calls `on_matmul_input(weight_name, x)` with the input rows of every matrix product; an
`ImatrixCollector` adds, per input column, the sum of x² over the rows, and counts the rows. It keeps what
llama-imatrix keeps: every `blk.*` product; `output.weight` only with `process_output` (a tied output reads
`token_embd.weight`, which llama-imatrix never collects); and only products of at least 16 rows.

That 16-row rule makes the batch shapes part of the result, so the text runs in llama-imatrix's shapes:
passes of n_seq = 2048 // n_ctx chunks, each split into micro-batches the way llama.cpp's batch allocator
splits it (`micro_batches`). Any other batching gives the same sums whenever every micro-batch has 16 rows.

Sums are float32, as llama-imatrix keeps them: merging files (`add_file`) does llama-imatrix's float32
arithmetic, so combined files are byte-identical to its own. A call's rows are summed at once rather than
row by row, which changes the rounding at ~1e-6 relative: far below the differences between two forward
passes (llama.cpp rounds an F16 model's matmul inputs to F16; we compute in float32).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from qtool.errors import QtoolError
from qtool.quantize.imatrix_file import Imatrix, read_imatrix, write_imatrix_dat, write_imatrix_gguf

# llama-imatrix ignores matrix products with fewer rows (tokens) than this (its "ask" filter).
MIN_ROWS = 16
# llama-imatrix's defaults for -b and -ub: chunks per pass and rows per micro-batch derive from them.
BATCH_TOKENS = 2048
UBATCH_TOKENS = 512
FORMATS = ("gguf", "dat")


# --- collection --------------------------------------------------------------------------------------------------

class ImatrixCollector:
    """Sums of squared matmul inputs per weight and column, and tokens seen, in llama-imatrix's bookkeeping.

    `sums[name]` is float32 [n_mat, n_cols] (n_mat = 1 for the dense weights our model has), `counts[name]`
    int64 [n_mat]. Earlier files are added with `add_file` before collecting, as `llama-imatrix --in-file`.
    """

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.datasets: list[str] = []

    def collects(self, weight_name: str) -> bool:
        return weight_name.startswith("blk.") or (self.process_output and weight_name == "output.weight")

    def __call__(self, weight_name: str, x: np.ndarray, expert: int | None = None, n_expert: int = 0) -> None:
        if expert is not None:
            self._add_expert(weight_name, x, expert, n_expert)
            return
        if x.shape[0] < MIN_ROWS or not self.collects(weight_name):
            return
        with np.errstate(over="ignore"):      # an overflow is reported below, as llama-imatrix does
            squares = np.einsum("ij,ij->j", x, x, dtype=np.float32)
        self.add_squares(weight_name, squares, x.shape[0])

    def add_squares(self, weight_name: str, squares: np.ndarray, rows: int) -> None:
        """Add one product's column sums of x² (float32, n_cols) over `rows` rows to a dense weight's entry."""
        sums = self.sums.get(weight_name)
        if sums is None:
            sums = self.sums[weight_name] = np.zeros((1, squares.size), np.float32)
            self.counts[weight_name] = np.zeros(1, np.int64)
        elif sums.size != squares.size:
            raise QtoolError(f"imatrix entry {weight_name} has {sums.size} values but the model's input has "
                             f"{squares.size} columns: the --in-file imatrix belongs to another model")
        counts = self.counts[weight_name]
        if len(counts) > 1 and (counts == counts[0]).all():
            # a dense weight keeps one count (older files stored one per slice); unequal ones all grow
            counts = self.counts[weight_name] = counts[:1].copy()
            sums = self.sums[weight_name] = sums.reshape(1, -1)
        with np.errstate(over="ignore"):
            sums.reshape(-1)[:] += squares
        counts += rows
        if not np.isfinite(sums).all():
            raise QtoolError(f"non-finite sums of squared activations at the input of {weight_name}: the model "
                             f"overflows on this text (llama-imatrix aborts too)")

    def _add_expert(self, weight_name: str, x: np.ndarray, expert: int, n_expert: int) -> None:
        """The rows routed to one expert of a 3-D weight (llama-imatrix's MUL_MAT_ID branch: any number of rows,
        one sum and one count per expert)."""
        with np.errstate(over="ignore"):
            squares = np.einsum("ij,ij->j", x, x, dtype=np.float32)
        self.add_expert_squares(weight_name, squares, x.shape[0], expert, n_expert)

    def add_expert_squares(self, weight_name: str, squares: np.ndarray, rows: int, expert: int,
                           n_expert: int) -> None:
        """Add one expert's column sums of x² over `rows` routed rows to its row of a 3-D weight's entry."""
        sums = self.sums.get(weight_name)
        if sums is None:
            sums = self.sums[weight_name] = np.zeros((n_expert, squares.size), np.float32)
            self.counts[weight_name] = np.zeros(n_expert, np.int64)
        elif sums.shape != (n_expert, squares.size):
            if sums.shape == (1, squares.size) and len(self.counts[weight_name]) == 1:   # an older file: one count
                sums = self.sums[weight_name] = np.repeat(sums, n_expert, axis=0)        # and sum for all experts
                self.counts[weight_name] = np.repeat(self.counts[weight_name], n_expert)
            else:
                raise QtoolError(f"imatrix entry {weight_name} has shape {sums.shape} but the model's experts take "
                                 f"{(n_expert, squares.size)}: the --in-file imatrix belongs to another model")
        with np.errstate(over="ignore"):
            sums[expert] += squares
        self.counts[weight_name][expert] += rows
        if not np.isfinite(sums[expert]).all():
            raise QtoolError(f"non-finite sums of squared activations at the input of {weight_name} (expert "
                             f"{expert}): the model overflows on this text (llama-imatrix aborts too)")

    def add_file(self, im: Imatrix, chunk_size: int, source: str | Path = "") -> None:
        """Merge an earlier imatrix the way llama-imatrix's `load_imatrix` does.

        GGUF entries hold raw sums and counts, added as they are. Legacy entries hold (sum / count) * ncall
        and ncall, so they come back as sums * chunk_size and ncall * chunk_size tokens: exact when every
        chunk had `chunk_size` tokens, which is all the format remembers.
        """
        source = source or "imatrix"
        for name, (sums, counts) in im.entries.items():
            sums = np.asarray(sums, np.float32).reshape(-1)
            have = self.sums.get(name)
            if im.legacy:
                if have is None:
                    have = self.sums[name] = np.zeros((1, sums.size), np.float32)
                    self.counts[name] = np.zeros(1, np.int64)
                if have.size != sums.size:
                    raise QtoolError(f"{source}: entry {name} has {sums.size} values, earlier files have {have.size}")
                have.reshape(-1)[:] += sums * np.float32(chunk_size)
                self.counts[name] += int(counts[0]) * chunk_size
                continue
            n_mat = len(counts)
            if have is None:
                self.sums[name] = sums.reshape(n_mat, -1).copy()
                self.counts[name] = np.asarray(counts, np.int64).copy()
                continue
            if have.size != sums.size:
                raise QtoolError(f"{source}: entry {name} has {sums.size} values, earlier files have {have.size}")
            known = self.counts[name]
            if len(known) == 1 and n_mat > 1:          # an older file with one count for all experts
                known = np.full(n_mat, known[0], np.int64)
            elif len(known) != n_mat:
                raise QtoolError(f"{source}: entry {name} has {n_mat} counts, earlier files have {len(known)}")
            self.sums[name] = have.reshape(n_mat, -1) + sums.reshape(n_mat, -1)
            self.counts[name] = known + np.asarray(counts, np.int64)
        self.datasets.extend(im.datasets)

    def chunk_count(self, chunk_size: int) -> int:
        """llama-imatrix's `m_last_chunk`: the most tokens any matrix saw, in whole chunks."""
        most = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        return most // chunk_size

    def entries(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """name -> (float32 sums [n_mat, n_cols], int64 counts [n_mat]), what the file writers take."""
        return {name: (self.sums[name], self.counts[name]) for name in self.sums}


# One increment: (weight name, expert or -1, n_expert, float32 column sums of x², rows).
Increment = tuple[str, int, int, np.ndarray, int]


class RecordingCollector(ImatrixCollector):
    """Keeps every increment, in order, instead of adding it.

    A float32 sum depends on the order of its additions, so partial sums of chunk ranges computed apart
    (`qtool run --cluster`) could not add up to one process's bytes; their increments, `replay`ed range after
    range into one collector, are exactly the additions one process makes.
    """

    def __init__(self, process_output: bool = False):
        super().__init__(process_output)
        self.increments: list[Increment] = []

    def add_squares(self, weight_name: str, squares: np.ndarray, rows: int) -> None:
        self.increments.append((weight_name, -1, 0, squares, rows))

    def add_expert_squares(self, weight_name: str, squares: np.ndarray, rows: int, expert: int,
                           n_expert: int) -> None:
        self.increments.append((weight_name, expert, n_expert, squares, rows))


def replay(collector: ImatrixCollector, increments: Sequence[Increment]) -> None:
    """Add recorded increments to `collector` in their order (see RecordingCollector)."""
    for name, expert, n_expert, squares, rows in increments:
        if expert < 0:
            collector.add_squares(name, squares, rows)
        else:
            collector.add_expert_squares(name, squares, rows, expert, n_expert)


def collect_increments(model_path: str | Path, chunk_tokens: np.ndarray, n_ctx: int, bos_id: int | None,
                       max_memory: int | None = None) -> list[Increment]:
    """One unit of a distributed imatrix: the increments of whole chunks `chunk_tokens` (n * n_ctx tokens).

    A range that starts on a pass boundary (a multiple of BATCH_TOKENS // n_ctx chunks) runs the passes one
    process runs there, so replaying the ranges in order gives that process's sums bit for bit.
    """
    from qtool.evaluate.model import Model

    recorder = RecordingCollector()
    model = Model(_load_model_weights(Path(model_path), max_memory), on_matmul_input=recorder)
    collect(model, chunk_tokens, n_ctx, len(chunk_tokens) // n_ctx, bos_id, recorder)
    return recorder.increments


def micro_batches(n_ctx: int, n_seqs: int, batch_tokens: int = BATCH_TOKENS,
                  ubatch_tokens: int = UBATCH_TOKENS) -> list[tuple[int, int]]:
    """(first position, tokens per sequence) of each micro-batch of a pass of `n_seqs` chunks, in order.

    llama-imatrix gives llama_decode n_seq = batch_tokens // n_ctx chunks at once (one sequence each). With
    several sequences the KV cache has one stream per sequence and the allocator's split_equal takes
    max(1, ubatch // n_seqs) tokens of every sequence per micro-batch; with one sequence it cuts each logical
    batch of min(batch_tokens, n_ctx) tokens into pieces of the micro-batch size (split_simple).
    """
    n_seq_max = max(1, batch_tokens // n_ctx)
    if not 1 <= n_seqs <= n_seq_max:
        raise ValueError(f"a pass holds 1..{n_seq_max} chunks, not {n_seqs}")
    n_batch = min(batch_tokens, n_seq_max * n_ctx)
    n_ubatch = min(n_batch, ubatch_tokens)
    out = []
    if n_seq_max == 1:
        for batch_start in range(0, n_ctx, n_batch):
            batch_end = min(n_ctx, batch_start + n_batch)
            out += [(s, min(n_ubatch, batch_end - s)) for s in range(batch_start, batch_end, n_ubatch)]
    else:
        step = max(1, n_ubatch // n_seqs)
        out = [(s, min(step, n_ctx - s)) for s in range(0, n_ctx, step)]
    return out


@dataclass
class ImatrixProgress:
    chunks_done: int
    n_chunks: int
    tokens_done: int
    n_tokens: int
    elapsed: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        rate = self.tokens_per_second
        return (self.n_tokens - self.tokens_done) / rate if rate > 0 else None


def collect(model, tokens: np.ndarray, n_ctx: int, n_chunks: int, bos_id: int | None, collector: ImatrixCollector,
            *, batch_tokens: int = BATCH_TOKENS, ubatch_tokens: int = UBATCH_TOKENS,
            progress: Callable[[ImatrixProgress], None] | None = None) -> None:
    """Run chunks 0..n_chunks-1 of `tokens` through `model` (whose hook is `collector`) in llama-imatrix's shapes.

    `bos_id`: the BOS that replaces each chunk's first token (None when the vocabulary adds no BOS).
    """
    from qtool.evaluate.model import KVCache
    from qtool.evaluate.perplexity import chunk_inputs

    if model.on_matmul_input is not collector:
        raise ValueError("the model's on_matmul_input must be the collector")
    n_seq_max = max(1, batch_tokens // n_ctx)
    want_logits = collector.collects(model.output_name)   # otherwise the output projection is not needed
    n_tokens = n_chunks * n_ctx
    cache: KVCache | None = None
    done, t0 = 0, time.perf_counter()
    for first in range(0, n_chunks, n_seq_max):
        n = min(n_seq_max, n_chunks - first)
        inputs, _ = chunk_inputs(tokens, first, n, n_ctx, bos_id)
        plan = micro_batches(n_ctx, n, batch_tokens, ubatch_tokens)
        if not want_logits and n_ctx <= ubatch_tokens and all(n * length >= MIN_ROWS for _, length in plan):
            # Every micro-batch passes the 16-row filter, so the whole pass at once collects the same sums,
            # and faster (no KV cache); logits, and chunks longer than a micro-batch, would cost memory.
            plan = [(0, n_ctx)]
        for start, length in plan:
            if len(plan) == 1:
                model.forward(inputs, output_from=0 if want_logits else n_ctx)
            else:
                if cache is None or cache.k[0].shape[0] != n:
                    cache = KVCache.allocate(model.config, n, n_ctx)
                if start == 0:
                    cache.length = 0
                model.forward(inputs[:, start:start + length], output_from=0 if want_logits else length,
                              cache=cache)
            done += n * length
            if progress is not None:
                progress(ImatrixProgress(first + (n if start + length == n_ctx else 0), n_chunks, done, n_tokens,
                                         time.perf_counter() - t0))


# --- files -------------------------------------------------------------------------------------------------------

def output_format(path: Path, fmt: str | None) -> str:
    """The format asked for; without one, `.dat` files get the legacy format and everything else GGUF.

    (llama-imatrix writes GGUF whatever the name unless told `--output-format dat`; a GGUF inside a file
    named .dat only surprises.)
    """
    if fmt is None:
        return "dat" if path.suffix.lower() == ".dat" else "gguf"
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise QtoolError(f"--format {fmt!r}: choose gguf or dat")
    return fmt


def write_collected(collector: ImatrixCollector, path: Path, fmt: str, chunk_size: int, force: bool) -> Path:
    entries = collector.entries()
    if not entries:
        raise QtoolError("nothing was collected: every matrix product had fewer than "
                         f"{MIN_ROWS} rows (llama-imatrix skips those); use a larger --ctx")
    writer = write_imatrix_dat if fmt == "dat" else write_imatrix_gguf
    return writer(path, entries, datasets=collector.datasets, chunk_count=collector.chunk_count(chunk_size),
                  chunk_size=chunk_size, force=force)


def check_entries_match_model(collector: ImatrixCollector, weights, sources: Sequence[str | Path]) -> None:
    """Every merged entry must name a matrix of this model with as many columns (llama-quantize needs that)."""
    where = ", ".join(str(s) for s in sources)
    for name, sums in collector.sums.items():
        if not weights.has(name):
            raise QtoolError(f"{where}: entry {name} names no tensor of {weights.path.name}: "
                             f"the imatrix was computed on another model")
        shape = weights.shape(name)
        n_mat = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
        if len(shape) < 2 or sums.size != shape[-1] * n_mat:
            raise QtoolError(f"{where}: entry {name} has {sums.size} values but the tensor of "
                             f"{weights.path.name} has shape {tuple(reversed(shape))}: "
                             f"the imatrix was computed on another model")


@dataclass
class ImatrixRun:
    path: Path
    format: str
    datasets: list[str]
    n_ctx: int
    n_chunks: int              # chunks of the calibration text evaluated in this run (0: files merged only)
    n_tokens: int              # tokens evaluated in this run
    chunk_count: int           # recorded in the file: the most tokens any matrix saw, in chunks
    n_entries: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def _load_model_weights(model_path: Path, max_memory: int | None):
    from qtool.evaluate.weights import GGUFWeights, MemoryBudget

    weights = GGUFWeights(model_path, MemoryBudget(max_memory))
    if weights.value("general.type") == "imatrix":
        raise QtoolError(f"{model_path} is an imatrix file, not a model")
    return weights


def calibration_tokens(weights, dataset: str, n_ctx: int, n_chunks: int | None,
                       parse_special: bool = False) -> tuple[np.ndarray, int, int | None, str]:
    """(tokens of the calibration text, chunks to collect, the BOS that starts each chunk or None, its name)."""
    from qtool.evaluate.datasets import load_eval_text
    from qtool.evaluate.perplexity import chunked_tokens

    text = load_eval_text(dataset)
    tokens, n_total, bos = chunked_tokens(weights.gguf, text.text, n_ctx, n_chunks, parse_special=parse_special,
                                          what=f"calibration text {text.name}")
    return tokens, n_total, bos, text.name


def compute_imatrix_file(model_path: str | Path | None, dataset: str | None, output: str | Path, *,
                         n_ctx: int = 512, n_chunks: int | None = None, fmt: str | None = None,
                         process_output: bool = False, in_files: Sequence[str | Path] = (),
                         parse_special: bool = False, max_memory: int | None = None, force: bool = False,
                         progress: Callable[[ImatrixProgress], None] | None = None) -> ImatrixRun:
    """`llama-imatrix -m MODEL -f DATASET -c n_ctx [--chunks N] [--in-file F ...] -o OUTPUT`, with our model.

    Without a dataset the `in_files` are only combined (and checked against the model when one is given).
    The output is written once, atomically, at the end.
    """
    output = Path(output)
    fmt = output_format(output, fmt)
    if not output.parent.is_dir():
        raise QtoolError(f"output directory {output.parent} does not exist")
    if output.exists() and not force:     # before an hour of work, not after
        raise QtoolError(f"{output} already exists (use --force to overwrite)")
    if n_chunks is not None and n_chunks <= 0:
        raise QtoolError("--chunks must be positive")
    if dataset is None and not in_files:
        raise QtoolError("nothing to do: give a calibration --dataset, or --in-file files to combine")
    t0 = time.perf_counter()
    collector = ImatrixCollector(process_output)
    for f in in_files:
        collector.add_file(read_imatrix(f), n_ctx, f)
    notes: list[str] = []
    if dataset is None:
        if model_path is not None:
            check_entries_match_model(collector, _load_model_weights(Path(model_path), 0), in_files)
        path = write_collected(collector, output, fmt, n_ctx, force)
        return ImatrixRun(path, fmt, collector.datasets, n_ctx, 0, 0, collector.chunk_count(n_ctx),
                          len(collector.sums), time.perf_counter() - t0)
    if model_path is None:
        raise QtoolError("collecting needs a MODEL.gguf")

    from qtool.evaluate.model import Model

    weights = _load_model_weights(Path(model_path), max_memory)
    check_entries_match_model(collector, weights, in_files)
    model = Model(weights, on_matmul_input=collector)
    if process_output and model.config.tied_output:
        notes.append("the model's output projection is token_embd.weight (tied); llama-imatrix does not collect "
                     "it, so --process-output adds nothing")
    if n_ctx > model.config.context_length:
        notes.append(f"warning: --ctx {n_ctx} exceeds the model's training context {model.config.context_length}")
    tokens, n_total, bos, name = calibration_tokens(weights, dataset, n_ctx, n_chunks, parse_special)
    t_collect = time.perf_counter()
    collect(model, tokens, n_ctx, n_total, bos, collector, progress=progress)
    seconds = time.perf_counter() - t_collect
    collector.datasets.append(name)
    path = write_collected(collector, output, fmt, n_ctx, force)
    return ImatrixRun(path, fmt, collector.datasets, n_ctx, n_total, n_total * n_ctx, collector.chunk_count(n_ctx),
                      len(collector.sums), seconds, notes)


# --- statistics --------------------------------------------------------------------------------------------------

@dataclass
class TensorStats:
    name: str
    n_cols: int
    n_mat: int
    matrices_with_data: int
    tokens: int | None         # tokens seen (the largest count of its matrices); legacy files keep only chunks
    chunks: float              # tokens / chunk size (legacy: its ncall)
    coverage: float            # tokens (legacy: chunks) relative to the most any entry of the file saw, 0..1
    total: float               # sum over columns of the mean squared activation (llama-imatrix's Σ(Act²))
    mean: float
    min: float
    max: float
    zero_columns: int          # mean squared activation exactly 0: llama-quantize ignores these columns

    @property
    def layer(self) -> int | None:
        m = re.match(r"blk\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None


@dataclass
class ImatrixSummary:
    path: Path
    legacy: bool
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    tensors: list[TensorStats]
    missing: list[str] = field(default_factory=list)   # the model's matmul weights without an entry

    @property
    def zero_columns(self) -> int:
        return sum(t.zero_columns for t in self.tensors)


def tensor_stats(im: Imatrix) -> list[TensorStats]:
    """Per entry: the mean squared activation per column (over matrices that saw tokens), summarized."""
    out = []
    most = max((int(c.max()) for _, c in im.entries.values()), default=0)
    for name, (sums, counts) in im.entries.items():
        counts = np.asarray(counts, np.int64)
        sums = np.asarray(sums, np.float64).reshape(len(counts), -1)
        if im.legacy:
            ncall = int(counts[0])
            means = sums / ncall if ncall > 0 else sums
            seen, tokens, chunks = 1, None, float(ncall)
        else:
            used = counts > 0
            means = sums[used] / counts[used, None]
            seen, tokens = int(used.sum()), int(counts.max())
            chunks = tokens / im.chunk_size if im.chunk_size else 0.0
        values = means.reshape(-1)
        if values.size == 0:
            values = np.zeros(1)
        amount = chunks if im.legacy else tokens
        out.append(TensorStats(
            name=name, n_cols=sums.shape[1], n_mat=len(counts), matrices_with_data=seen, tokens=tokens,
            chunks=chunks, coverage=amount / most if most > 0 else 0.0, total=float(values.sum()),
            mean=float(values.mean()), min=float(values.min()), max=float(values.max()),
            zero_columns=int((means == 0).sum())))
    out.sort(key=lambda t: (t.layer if t.layer is not None else math.inf, t.name))
    return out


def summarize_imatrix(path: str | Path, model_path: str | Path | None = None) -> ImatrixSummary:
    """The statistics `qtool imatrix --show` prints; with a model, also its matmul weights without an entry."""
    path = Path(path)
    im = read_imatrix(path)
    summary = ImatrixSummary(path, im.legacy, im.datasets, im.chunk_count, im.chunk_size, tensor_stats(im))
    if model_path is not None:
        weights = _load_model_weights(Path(model_path), 0)
        summary.missing = [n for n in weights.names()
                           if n.startswith("blk.") and n.endswith(".weight") and len(weights.shape(n)) >= 2
                           and n not in im.entries]
    return summary
