"""`qtool run --cluster`: a recipe's units of work as Ray tasks, with the numbers of a single-machine run.

The only module that imports Ray (lazily, in `connect`). It changes who runs a unit, never what a unit computes:
- imatrix: ranges of whole passes of the calibration text (`evaluate.imatrix.collect_increments`); the driver
  replays their float32 increments in chunk order into one collector, so the file has one process's bytes;
- quantize: one task per file type (`pipeline.quantize_unit`, what a local run calls);
- eval: ranges of whole groups of chunks, base and variants in lockstep (`evaluate.perplexity.score_chunks`);
  the per-token scores are concatenated in chunk order and summarized as a local run summarizes them.
Ranges start on pass / group boundaries, so every forward pass is one a local run makes too.

Data stays on the shared output directory: tasks read the GGUFs there and write their results there (GGUFs
through the same atomic writer, unit results as .npz under `.qtool-units/`); only token ids and small
dictionaries travel through Ray's object store. The manifest records each finished unit, so a rerun after an
interrupted cluster run redoes only the units that were missing; a task whose worker dies is retried by Ray.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from qtool.errors import QtoolError
from qtool.gguf_io import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from qtool.evaluate.perplexity import PerplexityRun
    from qtool.pipeline import UnitStore

# CPUs a task reserves, and the threads it runs, unless --threads says otherwise: one per task keeps every core
# busy with its own unit (no threads waiting on each other) and makes the partition the parallelism. The thread
# count is part of the numbers: BLAS (OpenBLAS) sums a matrix product in an order that depends on it, so a cluster
# run gives the bytes of a local run with the same --threads (on the same kind of CPU), and only those.
DEFAULT_TASK_CPUS = 1
# Ranges per task slot: more than one, so that a slow or restarted worker delays the end less.
UNITS_PER_SLOT = 2
# Retries of a task whose worker died (Ray's max_retries); a QtoolError is a result, not retried.
MAX_RETRIES = 3
PROBE_TIMEOUT_S = 120
PROGRESS_EVERY_S = 5.0
# Memory a task needs beyond the model files it maps: the interpreter, numba, work buffers.
TASK_OVERHEAD_BYTES = 512 << 20


def connect(spec: str, log: Callable[[str], None] = lambda m: None, threads: int | None = None) -> RayCluster:
    """`--cluster ray` (RAY_ADDRESS, or a local Ray instance when it is unset), `ray://HOST:PORT` (Ray Client)
    or `HOST:PORT` (a head's GCS address, as `ray start --head` prints it). `threads`: CPUs (and threads) per task."""
    address = _address(spec)
    try:
        import ray
    except ImportError:
        raise QtoolError('--cluster ray needs Ray: pip install "qtool[ray]"') from None
    from qtool import THREAD_ENV_DEFAULTS

    options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False,
                               # workers import numpy before qtool can set these (qtool/__init__.py says why)
                               "runtime_env": {"env_vars": dict(THREAD_ENV_DEFAULTS)}}
    if address is None:
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except Exception as e:  # noqa: BLE001  (Ray raises several kinds; the user needs one line)
        where = address or "a local instance"
        raise QtoolError(f"--cluster {spec}: cannot start or reach Ray ({where}): {_one_line(e)}") from None
    cluster = RayCluster(ray, log, threads or DEFAULT_TASK_CPUS)
    log(f"cluster: {len(cluster.nodes())} node(s), {cluster.slots} task slot(s) of {cluster.task_cpus} CPU"
        + ("" if address else " (a local Ray instance)"))
    return cluster


def _address(spec: str) -> str | None:
    if spec == "ray":
        return os.environ.get("RAY_ADDRESS") or None
    if spec.startswith("ray://") or (":" in spec and "/" not in spec):
        return spec
    raise QtoolError(f"--cluster {spec!r}: use ray (RAY_ADDRESS or a local instance), ray://HOST:PORT or HOST:PORT")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def partition(n_items: int, step: int, n_parts: int) -> list[tuple[int, int]]:
    """(first, count) ranges covering 0..n_items-1, each starting on a multiple of `step`, as even as can be."""
    blocks = math.ceil(n_items / step)
    n_parts = max(1, min(n_parts, blocks))
    ranges, block = [], 0
    for i in range(n_parts):
        size = blocks // n_parts + (1 if i < blocks % n_parts else 0)
        first = block * step
        ranges.append((first, min(n_items, (block + size) * step) - first))
        block += size
    return ranges


@dataclass
class Unit:
    name: str
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    memory: int                 # bytes the task reserves (Ray's `memory` resource)


class RayCluster:
    """A connected Ray cluster that runs a stage's units and shows one progress display for the whole run."""

    def __init__(self, ray, log: Callable[[str], None], task_cpus: int = DEFAULT_TASK_CPUS):
        self.ray = ray
        self.log = log
        self.task_cpus = task_cpus
        self._task = ray.remote(_run_unit)
        self._probe = ray.remote(_probe)
        self.progress = _Progress(log)

    def close(self) -> None:
        self.ray.shutdown()

    def nodes(self) -> list[dict[str, Any]]:
        """Alive nodes that can run a unit."""
        return [n for n in self.ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= self.task_cpus]

    @property
    def slots(self) -> int:
        return max(1, sum(int(n["Resources"]["CPU"] // self.task_cpus) for n in self.nodes()))

    # --- checks before any work ---------------------------------------------------------------------------------

    def probe(self, out: Path, inputs: Sequence[Path]) -> None:
        """Every node must see `out` (the same directory: a file written here is there) and the `inputs`."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = self.nodes()
        if not nodes:
            raise QtoolError(f"--cluster: no alive node has the {self.task_cpus} CPU(s) a task reserves (--threads)")
        token = uuid.uuid4().hex
        marker = atomic_write(out / f".qtool-probe-{token}", token)
        try:
            refs = [self._probe.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(marker), token, [str(p) for p in inputs]) for n in nodes]
            try:
                problems = self.ray.get(refs, timeout=PROBE_TIMEOUT_S)
            except self.ray.exceptions.GetTimeoutError:
                raise QtoolError(f"--cluster: a node did not answer within {PROBE_TIMEOUT_S} s whether it sees "
                                 f"{out}") from None
        finally:
            marker.unlink(missing_ok=True)
        for node, problem in zip(nodes, problems):
            if problem:
                raise QtoolError(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) cannot see {problem}; "
                                 "every node must see output.dir on shared storage")

    def _check_memory(self, stage: str, units: Sequence[Unit]) -> None:
        """A task no node can hold would wait forever: say so instead."""
        largest = max((n["Resources"].get("memory", 0) for n in self.nodes()), default=0)
        need = max((u.memory for u in units), default=0)
        if need > largest:
            raise QtoolError(f"{stage}: a task needs {need / 2**30:.1f} GiB of memory, more than any node offers "
                             f"({largest / 2**30:.1f} GiB)")

    # --- running units --------------------------------------------------------------------------------------------

    def run_units(self, stage: str, units: Sequence[Unit], on_done: Callable[[int, Any], None]) -> None:
        """Run every unit as a task; `on_done(index, result)` as each finishes, in the order they finish."""
        self._check_memory(stage, units)
        pending = {self._task.options(num_cpus=self.task_cpus, memory=u.memory, max_retries=MAX_RETRIES,
                                      retry_exceptions=False, name=f"qtool {stage} {u.name}")
                   .remote(u.fn, u.kwargs, self.task_cpus): i for i, u in enumerate(units)}
        self.progress.start(stage, len(units))
        while pending:
            ready, _ = self.ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                on_done(i, self._get(ref, stage, units[i].name))
                self.progress.tick()

    def _get(self, ref, stage: str, name: str) -> Any:
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayTaskError as e:
            cause = e.cause
            if isinstance(cause, QtoolError):
                raise QtoolError(str(cause)) from None
            raise QtoolError(f"{stage} {name} failed on the cluster: {type(cause).__name__}: "
                             f"{_one_line(cause)}") from None
        except exceptions.RayError as e:        # a worker or node lost more often than Ray retries
            raise QtoolError(f"{stage} {name}: {type(e).__name__} after {MAX_RETRIES} retries: "
                             f"{_one_line(e)}") from None

    def _run_file_units(self, stage: str, units: Sequence[Unit], store: UnitStore) -> None:
        """Units that leave their result in the store: the ones an interrupted run finished are not redone."""
        finished = store.finished()
        todo = [u for u in units if u.name not in finished]
        if len(todo) < len(units):
            self.log(f"{stage}: {len(units) - len(todo)} of {len(units)} units finished earlier")
        store.dir.mkdir(parents=True, exist_ok=True)
        self.run_units(stage, todo, lambda i, _: store.record(todo[i].name))

    # --- the stages -------------------------------------------------------------------------------------------------

    def imatrix(self, base: Path, dataset: str, output: Path, *, n_ctx: int, n_chunks: int | None,
                units: UnitStore) -> None:
        """`compute_imatrix_file(base, dataset, output)`'s file, computed as ranges of whole passes."""
        from qtool.evaluate.imatrix import BATCH_TOKENS, ImatrixCollector, calibration_tokens, replay, write_collected
        from qtool.evaluate.weights import GGUFWeights

        tokens, n_total, bos, name = calibration_tokens(GGUFWeights(base), dataset, n_ctx, n_chunks)
        memory = base.stat().st_size + TASK_OVERHEAD_BYTES
        work = [Unit(f"chunks-{a}-{a + n}", _imatrix_unit,
                     dict(base=str(base), chunk_tokens=tokens[a * n_ctx:(a + n) * n_ctx], n_ctx=n_ctx, bos_id=bos,
                          dest=str(units.path(f"chunks-{a}-{a + n}"))), memory)
                for a, n in partition(n_total, max(1, BATCH_TOKENS // n_ctx), self.slots * UNITS_PER_SLOT)]
        self._run_file_units("imatrix", work, units)
        collector = ImatrixCollector()
        for u in work:
            replay(collector, _load_increments(units.path(u.name)))
        collector.datasets.append(name)
        write_collected(collector, output, "gguf", n_ctx, force=True)
        units.clear()

    def quantize(self, jobs: Sequence[tuple[str, dict[str, Any]]], base: Path,
                 on_done: Callable[[int, Any], None]) -> None:
        """One task per file type: `quantize_unit(**kwargs)` with the task's threads."""
        from qtool.pipeline import quantize_unit

        t0 = time.time()
        memory = base.stat().st_size // 2 + TASK_OVERHEAD_BYTES      # streams tensors; the output is written as made
        work = [Unit(label, quantize_unit, {**kwargs, "threads": self.task_cpus}, memory) for label, kwargs in jobs]
        self.run_units("quantize", work, on_done)
        _sweep_temporaries(base.parent, since=t0)

    def evaluate(self, base: Path, variants: Sequence[Path], text: str, *, dataset_name: str, n_ctx: int,
                 n_chunks: int | None, units: UnitStore) -> PerplexityRun:
        """`run_perplexity(base, variants, text)`'s numbers, computed as ranges of whole groups of chunks."""
        from qtool.evaluate.perplexity import (chunked_tokens, group_size, merge_scores, open_models, scored_per_chunk,
                                               summarize_run)

        paths = [Path(base), *map(Path, variants)]
        models = open_models(paths, n_ctx=n_ctx)
        tokens, n_total, bos = chunked_tokens(models[0].weights.gguf, text, n_ctx, n_chunks)
        group = group_size(n_ctx, models[0].n_vocab)
        logits = 2 * 4 * group * scored_per_chunk(n_ctx) * models[0].n_vocab       # the base's and one variant's
        memory = max(p.stat().st_size for p in paths) + logits + TASK_OVERHEAD_BYTES
        work = [Unit(f"chunks-{a}-{a + n}", _eval_unit,
                     dict(paths=[str(p) for p in paths], chunk_tokens=tokens[a * n_ctx:(a + n) * n_ctx], n_ctx=n_ctx,
                          bos_id=bos, dest=str(units.path(f"chunks-{a}-{a + n}"))), memory)
                for a, n in partition(n_total, group, self.slots * UNITS_PER_SLOT)]
        t0 = time.perf_counter()
        self._run_file_units("eval", work, units)
        scores = merge_scores([_load_scores(units.path(u.name), len(paths)) for u in work])
        run = summarize_run(models, scores, dataset_name=dataset_name, n_ctx=n_ctx, n_chunks=n_total,
                            wall=time.perf_counter() - t0, activations="llama.cpp")
        units.clear()
        return run


class _Progress:
    """One display for the whole run: units done of those planned so far, and the stage's ETA, every few seconds."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.done = self.total = 0
        self.stage, self.stage_done, self.stage_total = "", 0, 0
        self.t0 = self.shown = 0.0

    def start(self, stage: str, n: int) -> None:
        self.stage, self.stage_done, self.stage_total = stage, 0, n
        self.total += n
        self.t0 = self.shown = time.perf_counter()

    def tick(self) -> None:
        self.done += 1
        self.stage_done += 1
        now = time.perf_counter()
        if self.stage_done < self.stage_total and now - self.shown < PROGRESS_EVERY_S:
            return
        self.shown = now
        left = (now - self.t0) / self.stage_done * (self.stage_total - self.stage_done)
        self.log(f"cluster: {self.done}/{self.total} units done ({self.stage} {self.stage_done}/{self.stage_total}), "
                 f"ETA {left:.0f} s")


# --- what runs on the workers -------------------------------------------------------------------------------------

def _run_unit(fn: Callable[..., Any], kwargs: dict[str, Any], threads: int) -> Any:
    """A unit with as many threads as the task reserved CPUs (Ray's workers would otherwise use every core)."""
    from qtool.threads import set_threads

    set_threads(threads)
    return fn(**kwargs)


def _probe(marker: str, token: str, inputs: list[str]) -> str | None:
    """What this node cannot see, as 'PATH (why)', or None."""
    out = Path(marker).parent
    if not out.is_dir():
        return f"{out} (no such directory here)"
    try:
        same = Path(marker).read_text() == token
    except OSError:
        same = False
    if not same:
        return f"{out} (a different directory here: the driver's probe file is not in it)"
    if not os.access(out, os.W_OK):
        return f"{out} (not writable here)"
    missing = [p for p in inputs if not Path(p).exists()]
    return f"{missing[0]} (no such file here)" if missing else None


def _save(dest: str, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write(dest, buf.getvalue())


def _imatrix_unit(base: str, chunk_tokens: np.ndarray, n_ctx: int, bos_id: int | None, dest: str) -> None:
    from qtool.evaluate.imatrix import collect_increments

    increments = collect_increments(base, chunk_tokens, n_ctx, bos_id)
    meta = [[name, expert, n_expert, rows] for name, expert, n_expert, _, rows in increments]
    _save(dest, {"meta": np.array(json.dumps(meta)), **{f"s{i}": inc[3] for i, inc in enumerate(increments)}})


def _load_increments(path: Path) -> list:
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        return [(name, expert, n_expert, z[f"s{i}"], rows) for i, (name, expert, n_expert, rows) in enumerate(meta)]


def _eval_unit(paths: list[str], chunk_tokens: np.ndarray, n_ctx: int, bos_id: int | None, dest: str) -> None:
    from qtool.evaluate.perplexity import open_models, score_chunks

    scores = score_chunks(open_models(paths), chunk_tokens, n_ctx, bos_id)
    _save(dest, {f"{field}{i}": getattr(s, field) for i, s in enumerate(scores)
                 for field in ("nll", "kld", "p_diff", "same_top1") if getattr(s, field) is not None})


def _load_scores(path: Path, n_models: int) -> list:
    from qtool.evaluate.perplexity import TokenScores

    with np.load(path) as z:
        return [TokenScores(*(z[f"{field}{i}"] if f"{field}{i}" in z.files else None
                              for field in ("nll", "kld", "p_diff", "same_top1"))) for i in range(n_models)]


def _sweep_temporaries(folder: Path, since: float) -> None:
    """Temporary folders of writers whose worker was killed (Ray retried them): nothing else removes them."""
    for tmp in folder.glob(".qtool-tmp-*"):
        try:
            if tmp.is_dir() and tmp.stat().st_mtime >= since:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
