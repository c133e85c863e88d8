"""The qtool command line: parse, call a stage, print. Only this module prints or exits."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from qtool.errors import QtoolError

# emoji=False: a ":name:" in a path or a tensor name stays as written (and rich skips loading its emoji table)
err = Console(stderr=True, highlight=False, emoji=False)
out = Console(highlight=False, emoji=False)


class QtoolGroup(click.Group):
    """Turns QtoolError (and a few OS errors) into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QtoolError as e:
            err.print(f"[bold red]error:[/] {e}", markup=True, soft_wrap=True)
            sys.exit(2)
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)


@click.group(cls=QtoolGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qtool")
def main() -> None:
    """HuggingFace checkpoints -> llama.cpp GGUF files, quantized and measured."""


def _apply_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None:
        from qtool.threads import set_threads
        note = set_threads(value)
        if note:
            _note(note)
    return value


def threads_option(f):
    """--threads for a command: numba's kernels and BLAS use that many threads (default: all cores)."""
    return click.option("--threads", type=int, default=None, metavar="N", callback=_apply_threads,
                        help="Threads for the numba kernels and BLAS (default: all cores).")(f)


def _note(msg: str) -> None:
    style = "yellow" if msg.lower().startswith("warning") else "dim"
    err.print(f"[{style}]{msg}[/]", soft_wrap=True)


@main.command()
@click.argument("model")
@click.option("--outfile", type=click.Path(path_type=Path), help="Output file, directory, or template with {ftype}.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0", "auto"], case_sensitive=False),
              default="auto", show_default=True, help="Type of the 2-D weights (auto: follow the checkpoint).")
@click.option("--vocab-only", is_flag=True, help="Write only the tokenizer and metadata.")
@click.option("--split-max-size", default=None, help="Start a new split file past this size (e.g. 500M, 2G).")
@click.option("--split-max-tensors", type=int, default=0, help="Start a new split file past N tensors.")
@click.option("--pre", default=None, help="Force the BPE pre-tokenizer name (e.g. llama-bpe, qwen2, smollm, gpt-2).")
@click.option("--normhead/--no-normhead", default=None,
              help="Force Baichuan2's NormHead on/off (default: detect by vocab size 125696).")
@click.option("--no-mtp", "--no-nextn", "no_mtp", is_flag=True,
              help="Qwen3.5: leave the multi-token prediction (MTP) layer out, as llama.cpp's --no-mtp.")
@click.option("--revision", default=None, help="Hub revision when MODEL is a repo id.")
@click.option("--model-name", default=None, help="general.name to write (default: from README/config/dir).")
@click.option("--dry-run", is_flag=True, help="List tensors, shapes, types and metadata; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@threads_option
def convert(model, outfile, outtype, vocab_only, split_max_size, split_max_tensors, pre, normhead, no_mtp, revision,
            model_name, dry_run, force, threads):
    """Convert a HuggingFace checkpoint (directory or Hub repo id) to GGUF."""
    from qtool.convert import hub
    from qtool.convert.converter import output_path, plan_conversion, write_plan
    from qtool.gguf_io import parse_size

    max_size = parse_size(split_max_size) if split_max_size else 0
    if split_max_tensors < 0:
        raise QtoolError("--split-max-tensors must be positive")
    from_hub = not Path(model).exists() and hub.looks_like_repo_id(model)
    model_dir = hub.fetch(model, revision) if from_hub else Path(model)
    if not model_dir.exists():
        raise QtoolError(f"{model}: no such directory")
    plan = plan_conversion(model_dir, outtype, pre=pre, normhead_override=normhead,
                           model_name=model_name or (model if from_hub else None), vocab_only=vocab_only,
                           no_mtp=no_mtp)
    try:
        path = output_path(plan, outfile, vocab_only=vocab_only, default_dir=Path.cwd() if from_hub else None)
        if dry_run:
            for note in plan.notes:
                _note(note)
            _print_plan(plan, path, split_max_tensors, max_size, vocab_only)
            return
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]converting[/] {task.fields[tensor]}"), BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                      disable=not err.is_terminal) as bar:
            task = bar.add_task("convert", total=None, tensor="")

            def progress(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total, tensor=name)

            paths = write_plan(plan, path, vocab_only=vocab_only, split_max_tensors=split_max_tensors,
                               split_max_size=max_size, force=force, progress=progress)
        dt = time.perf_counter() - t0
        # Notes come after the work, so that a failure is one line and nothing else.
        for note in plan.notes:
            _note(note)
        size = sum(p.stat().st_size for p in paths)
        err.print(f"wrote {len(plan.tensors) if not vocab_only else 0} tensors, {size / 1e6:.1f} MB in {dt:.1f} s")
        for p in paths:
            out.print(str(p), soft_wrap=True)
    finally:
        plan.close()


def _print_plan(plan, path: Path, split_max_tensors: int, max_size: int, vocab_only: bool) -> None:
    from qtool.convert.converter import all_kvs, planned_shards
    from qtool.gguf_io import tensor_nbytes

    table = Table(title=f"{plan.spec.hf_arch} -> {plan.spec.arch.gguf_name}, {plan.outtype_label}", show_lines=False)
    for col in ("tensor", "shape", "type", "bytes", "from"):
        table.add_column(col)
    if not vocab_only:
        for t in plan.tensors:
            table.add_row(t.name, "×".join(str(d) for d in reversed(t.shape)), t.qtype.name,
                          f"{tensor_nbytes(t.shape, t.qtype):,}", t.source or "(generated)")
    out.print(table)
    meta = Table(title="metadata")
    meta.add_column("key")
    meta.add_column("type")
    meta.add_column("value")
    for kv in all_kvs(plan):
        v = kv.value
        shown = f"[{len(v)} items] {v[:3]!r}…" if isinstance(v, list) else repr(v)
        if len(shown) > 100:
            shown = shown[:100] + "…"
        meta.add_row(kv.key, kv.type.name + (f"[{kv.sub_type.name}]" if kv.sub_type else ""), shown)
    out.print(meta)
    if vocab_only:
        out.print(f"would write {path}")
        return
    for p, n, nbytes in planned_shards(plan, path, split_max_tensors, max_size):
        out.print(f"would write {p}: {n} tensors, {nbytes / 1e6:.1f} MB", soft_wrap=True)


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
def info(file, as_json):
    """Architecture, metadata, tensor types and sizes, bits per weight and tokenizer of a GGUF file."""
    from qtool.info import summarize

    s = summarize(file)
    if as_json:
        out.print_json(json.dumps(s, default=str))
        return
    out.print(f"[bold]{s['path']}[/]  {s['architecture']}  {s['name'] or ''}  file type {s['file_type']}")
    if len(s["files"]) > 1:
        out.print(f"split into {len(s['files'])} files")
    out.print(f"{s['tensor_count']} tensors, {s['parameters']:,} parameters, file {s['file_size'] / 1e6:.2f} MB, "
              + (f"{s['bits_per_weight']:.3f} bits per weight" if s["bits_per_weight"] else "no tensors"))
    if s["hparams"]:
        out.print("  ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s["hparams"].items()),
                  soft_wrap=True)
    t = Table(title="tensor types")
    for col in ("type", "tensors", "bytes", "params", "bpw"):
        t.add_column(col, justify="right")
    for name, e in s["types"].items():
        t.add_row(name, str(e["tensors"]), f"{e['bytes']:,}", f"{e['params']:,}",
                  f"{8 * e['bytes'] / e['params']:.3f}" if e["params"] else "-")
    out.print(t)
    tok = s["tokenizer"]
    if tok:
        specials = ", ".join(f"{k}={v['id']} {v['text']!r}" for k, v in tok.items() if isinstance(v, dict))
        out.print(f"tokenizer: {tok['model']} (pre {tok['pre']}), {tok['tokens']:,} tokens, {tok['merges']:,} merges; "
                  f"{specials}; add_bos={tok['add_bos']} add_eos={tok['add_eos']}"
                  + (f" add_space_prefix={tok['add_space_prefix']}" if tok["add_space_prefix"] is not None else "")
                  + ("; chat template" if tok["chat_template"] else ""), soft_wrap=True)


@main.command()
@click.argument("input_path", metavar="IN.gguf", required=False, type=click.Path(path_type=Path))
@click.argument("output_path", metavar="[OUT.gguf]", required=False, type=click.Path(path_type=Path))
@click.option("--type", "-t", "type_name", metavar="TYPE", help="File type, e.g. Q4_K_M (see --list).")
@click.option("--imatrix", metavar="FILE", help="Importance matrix (llama-imatrix .gguf or legacy .dat).")
@click.option("--output-tensor-type", metavar="T", help="Type of output.weight (no rules, no fallback).")
@click.option("--token-embedding-type", metavar="T", help="Type of token_embd.weight (no rules, no fallback).")
@click.option("--tensor-type", "tensor_types", metavar="REGEX=T", multiple=True,
              help="Type for tensors whose name matches REGEX (first match wins; repeatable).")
@click.option("--pure", is_flag=True, help="No mixture rules: the file type's tensor type everywhere.")
@click.option("--leave-output-tensor", is_flag=True, help="Keep output.weight in its source type.")
@click.option("--allow-requantize", is_flag=True, help="Allow re-quantizing already quantized tensors.")
@threads_option
@click.option("--dry-run", is_flag=True, help="Show every tensor's type and the sizes; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--list", "list_types", is_flag=True, help="List the file types and exit.")
@click.option("--target-bpw", type=float, default=None, metavar="FLOAT",
              help="Choose every tensor's type: least predicted KL divergence within this many bits per weight "
                   "(measured on --calibration; use --imatrix).")
@click.option("--candidates", default=None, metavar="LIST",
              help="Types --target-bpw may choose, e.g. Q4_K,Q5_0,Q8_0 "
                   "(default: Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,IQ4_NL).")
@click.option("--calibration", default=None, metavar="PATH",
              help="Text the sensitivities are measured on (.txt/.raw/.jsonl/.parquet); not the evaluation text.")
@click.option("--chunks", "n_chunks", type=int, default=1, show_default=True,
              help="Calibration chunks of 512 tokens for --target-bpw (each costs one forward pass per tensor).")
@click.option("--save-mix", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Save the mix --target-bpw chose (TOML) for --mix or a recipe.")
@click.option("--mix", "mix_path", type=click.Path(path_type=Path), default=None, metavar="PATH",
              help="Quantize with the exact per-tensor types of a mix file (from --save-mix).")
def quantize(input_path, output_path, type_name, imatrix, output_tensor_type, token_embedding_type, tensor_types,
             pure, leave_output_tensor, allow_requantize, threads, dry_run, force, list_types, target_bpw, candidates,
             calibration, n_chunks, save_mix, mix_path):
    """Quantize an F32/F16/BF16 GGUF exactly as llama-quantize does, and report what it did.

    With --target-bpw, choose a type per tensor from measured sensitivities instead (or apply a saved --mix).
    """
    from qtool.quantize.quantizer import quantize_model, quantize_options

    if list_types:
        _print_file_types()
        return
    if input_path is None:
        raise QtoolError("missing IN.gguf (or use --list)")
    choice, mix = None, None
    if target_bpw is not None or mix_path is not None:
        choice, mix, output_path, predicted_kld = _choose_or_read_mix(
            input_path, output_path, target_bpw, mix_path, imatrix=imatrix, candidates=candidates,
            calibration=calibration, n_chunks=n_chunks, save_mix=save_mix, allow_requantize=allow_requantize,
            dry_run=dry_run, force=force,
            rules=(output_tensor_type, token_embedding_type, tensor_types, pure, leave_output_tensor))
    elif candidates or calibration or save_mix:
        raise QtoolError("--candidates, --calibration and --save-mix go with --target-bpw")
    options = quantize_options(
        type_name, input_path, imatrix=imatrix, output_tensor_type=output_tensor_type,
        token_embedding_type=token_embedding_type, tensor_types=tensor_types, pure=pure,
        leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize, threads=threads, force=force,
        mix=mix, predicted_kld=predicted_kld if mix is not None else None)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        overall = bar.add_task("[bold]quantizing[/]", total=None)
        current = bar.add_task("", total=None)

        def progress(u) -> None:
            bar.update(overall, completed=u.work_done, total=u.work_total,
                       description=f"[bold]quantizing[/] {u.tensor_index + 1}/{u.n_tensors}")
            bar.update(current, completed=u.rows_done, total=max(u.rows_total, 1), description=f"  {u.name}")

        report = quantize_model(input_path, output_path, options, dry_run=dry_run, progress=progress)
    _print_quantize_report(report)
    if mix is not None:
        _print_mix(mix, choice, report)


def _choose_or_read_mix(input_path: Path, output_path: Path | None, target_bpw, mix_path, *, imatrix, candidates,
                        calibration, n_chunks, save_mix, allow_requantize, dry_run, force, rules):
    """--target-bpw (measure, choose, maybe save) or --mix (read): (the choice or None, the mix, output path,
    the predicted mean KLD when it holds for this input, else None)."""
    from qtool.gguf_io import check_overwrite
    from qtool.quantize.mix import write_mix
    from qtool.quantize.quantizer import default_output_path
    from qtool.sensitivity import choose_mix, measure_sensitivity, read_mix_for

    if target_bpw is not None and mix_path is not None:
        raise QtoolError("give --target-bpw or --mix, not both")
    if any(rules):
        raise QtoolError("--target-bpw and --mix set every tensor's type; drop --output-tensor-type, "
                         "--token-embedding-type, --tensor-type, --pure and --leave-output-tensor")
    if mix_path is not None:
        if candidates or calibration or save_mix:
            raise QtoolError("--candidates, --calibration and --save-mix go with --target-bpw, not --mix")
        mix, predicted = read_mix_for(mix_path, input_path, imatrix, _note)
        if output_path is None:
            target = mix.provenance.get("target_bpw")
            output_path = default_output_path(input_path, f"{target:g}bpw" if isinstance(target, (int, float))
                                              else "mix")
        return None, mix, output_path, predicted
    if calibration is None:
        raise QtoolError("--target-bpw needs --calibration PATH: the text the sensitivities are measured on "
                         "(e.g. the imatrix's calibration text)")
    if imatrix is None:
        _note("warning: no --imatrix: quantization errors are measured unweighted and quantized without one")
    # everything that can fail cheaply fails before minutes of measuring
    if output_path is None:
        output_path = default_output_path(input_path, f"{target_bpw:g}bpw")
    elif output_path.is_dir():
        output_path = output_path / default_output_path(input_path, f"{target_bpw:g}bpw").name
    if not dry_run:
        check_overwrite([output_path], force)
    if save_mix is not None:
        check_overwrite([save_mix], force)
    with Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("sensitivity", total=None)

        def progress(phase: str, done: int, total: int) -> None:
            what = "quantization errors" if phase == "errors" else "KLD gains (a forward pass per tensor)"
            bar.update(task, completed=done, total=total, description=what)

        sens = measure_sensitivity(input_path, imatrix=imatrix, calibration=calibration, candidates=candidates,
                                   n_chunks=n_chunks, allow_requantize=allow_requantize, target_bpw=target_bpw,
                                   progress=progress)
    for note in sens.notes:
        _note(note)
    choice = choose_mix(sens, target_bpw)
    err.print(f"sensitivity: errors {sens.error_seconds:.1f} s, gains {sens.gain_seconds:.1f} s "
              f"({len(sens.tensors)} tensors × {sens.calibration_tokens} calibration tokens)")
    mix = choice.mix_file()
    if save_mix is not None:
        write_mix(mix, save_mix, force=force)
        err.print(f"mix saved to {save_mix}")
    return choice, mix, output_path, choice.predicted_kld


def _print_mix(mix, choice, report) -> None:
    from qtool.sensitivity import mix_rows

    t = Table(title="the mix: type by tensor class and layer")
    t.add_column("tensor")
    t.add_column("layers: type", overflow="fold")
    for name, row in mix_rows(mix.tensors):
        t.add_row(name, row)
    out.print(t)
    predicted = choice.predicted_kld if choice is not None else mix.provenance.get("predicted_kld")
    target = choice.target_bpw if choice is not None else mix.provenance.get("target_bpw")
    parts = [f"achieved {report.bits_per_weight:.4f} bits per weight"]
    if isinstance(target, (int, float)):
        parts.insert(0, f"target {target:g} bpw")
    if isinstance(predicted, (int, float)):
        parts.append(f"predicted mean KLD {predicted:.5f} (vs the input, on the calibration text)")
    out.print("; ".join(parts), soft_wrap=True)


def _print_file_types() -> None:
    from qtool.quantize.formats import bits_per_weight
    from qtool.quantize.mixtures import FileType, list_file_types, mixture_bits_per_weight

    table = Table(title="file types (8B bpw: the whole Llama-3.1-8B with the mixture)")
    for col, justify in (("type", "left"), ("ftype", "right"), ("base", "left"), ("bpw", "right"),
                         ("8B bpw", "right"), ("llama-quantize's description", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    for name, ftype in list_file_types():
        alias = name != ftype.name
        if ftype == FileType.COPY:      # no number, no tensor type: every tensor keeps its own
            table.add_row(name, "", "(input)", "", f"{mixture_bits_per_weight(ftype):.4f}", ftype.description)
            continue
        table.add_row(name, str(ftype.llama_ftype), ftype.default_type.name, f"{bits_per_weight(ftype.default_type):g}",
                      f"{mixture_bits_per_weight(ftype):.4f}",
                      f"alias for {ftype.name}" if alias else ftype.description)
    out.print(table)


def _group_by_layer(choices) -> list[tuple[str, str, str, str]]:
    """Fallbacks that differ only in their layer number, as one row: blk.[0-29].attn_q.weight."""
    from qtool.quantize.mixtures import layer_of, layer_spans

    groups: dict[tuple, list[int]] = {}
    for c in choices:
        layer = layer_of(c.name)
        template = "blk.{}." + c.name.split(".", 2)[2] if layer >= 0 else c.name
        groups.setdefault((template, c.wanted_type.name, c.target_type.name, c.fallback), []).append(layer)
    rows = []
    for (template, wanted, got, why), layers in groups.items():
        if "{}" in template:
            spans = [str(a) if a == b else f"{a}-{b}" for a, b, _ in layer_spans([(n, None) for n in layers])]
            template = template.format(spans[0] if len(layers) == 1 else "[" + ",".join(spans) + "]")
        rows.append((template, wanted, got, why))
    return rows


def _print_quantize_report(report) -> None:
    def mb(n: int) -> str:
        return f"{n / 1e6:,.2f} MB"

    if report.dry_run:
        tensors = Table(title=f"{report.input_path} as {report.file_type.name} (dry run)")
        for col in ("tensor", "shape", "from", "to", "bytes", "why"):
            tensors.add_column(col, justify="right" if col == "bytes" else "left")
        for t in report.tensors:
            c = t.choice
            tensors.add_row(c.name, "×".join(str(d) for d in reversed(c.shape)), c.source_type.name,
                            c.target_type.name, f"{t.output_bytes:,}", c.reason, style=None if c.quantizable else "dim")
        out.print(tensors)
    types = Table(title=f"{report.file_type.name} ({report.file_type.display_name}): tensors by type")
    for col in ("type", "tensors", "bytes", "params", "bpw", "share of bytes"):
        types.add_column(col, justify="left" if col == "type" else "right")
    total = report.output_bytes or 1
    for name, t in report.by_type.items():
        types.add_row(name, str(t.tensors), f"{t.bytes:,}", f"{t.params:,}", f"{t.bits_per_weight:.3f}",
                      f"{100 * t.bytes / total:.1f} %")
    out.print(types)
    if report.fallbacks:
        fb = Table(title=f"{len(report.fallbacks)} tensors fell back to another type because of their row length")
        for col in ("tensors", "wanted", "got", "why"):
            fb.add_column(col, overflow="fold")
        for names, wanted, got, why in _group_by_layer(report.fallbacks):
            fb.add_row(names, wanted, got, why)
        out.print(fb)
        extra = report.fallback_extra_bytes
        out.print(f"the fallbacks cost {mb(extra)} (+{8 * extra / report.n_params:.3f} bits per weight) over the "
                  f"types the rules wanted", soft_wrap=True)
    verb = "would be" if report.dry_run else "is"
    out.print(f"{report.n_params:,} parameters: {mb(report.input_bytes)} "
              f"({report.input_bits_per_weight:.3f} bits per weight) → {mb(report.output_bytes)} "
              f"({report.bits_per_weight:.4f} bits per weight) {verb} the tensor data", soft_wrap=True)
    for note in report.notes:
        _note(note)
    if not report.dry_run:
        err.print(f"wrote {len(report.tensors)} tensors in {report.seconds:.1f} s")
        out.print(str(report.output_path), soft_wrap=True)


@main.command("export-hf")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("outdir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["auto", "bf16", "f16", "f32"], case_sensitive=False), default="auto",
              show_default=True, help="Stored dtype (auto: the GGUF's float type; bf16 for quantized files).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Start a new model-0000N-of-0000M.safetensors past this size (e.g. 500MB, 2GB).")
@click.option("--force", is_flag=True, help="Overwrite an earlier export in OUTDIR.")
@threads_option
def export_hf_command(model, outdir, dtype, max_shard_size, force, threads):
    """Turn a GGUF file back into a HuggingFace checkpoint directory (weights, config, tokenizer)."""
    from qtool.convert.export_hf import plan_export, write_export
    from qtool.gguf_io import parse_size

    max_size = parse_size(max_shard_size)
    t0 = time.perf_counter()
    plan = plan_export(model, dtype.lower())
    with Progress(TextColumn("[bold]exporting[/] {task.fields[tensor]}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
                  disable=not err.is_terminal) as bar:
        task = bar.add_task("export", total=None, tensor="")

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, tensor=name)

        paths = write_export(plan, outdir, max_shard_size=max_size, force=force, progress=progress)
    for note in plan.notes:
        _note(note)
    shards = sum(p.name.endswith(".safetensors") for p in paths)
    err.print(f"wrote {len(plan.tensors)} tensors ({plan.dtype.torch}, {plan.nbytes / 1e6:.1f} MB) in {shards} "
              f"safetensors file(s) and {len(paths) - shards} other file(s) in {time.perf_counter() - t0:.1f} s")
    out.print(str(outdir), soft_wrap=True)


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("variants", nargs=-1, type=click.Path(path_type=Path))
@click.option("--dataset", default="wikitext", show_default=True,
              help="'wikitext' (WikiText-2 raw test: the Hub, or its local cache offline) or a .txt/.raw, "
                   ".jsonl (a 'text' field per line) or .parquet file.")
@click.option("--ctx", "n_ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", "n_chunks", type=int, default=None, help="Evaluate at most N chunks.")
@click.option("--max-memory", default=None,
              help="Optional cache of decoded float32 weights, all models together (e.g. 8G): tensors that fit "
                   "skip their decode on later chunks. Default: none (weights stay in their stored form).")
@click.option("--activations", type=click.Choice(["llama.cpp", "float32"]), default="llama.cpp", show_default=True,
              help="llama.cpp: round each matrix product's input as llama.cpp's CPU backend does for the weight "
                   "type (8-bit for quantized weights), giving llama-perplexity's numbers; float32: exact.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write the results as JSON.")
@click.option("--markdown", "markdown_path", type=click.Path(path_type=Path), help="Write the table as Markdown.")
@threads_option
def ppl(base, variants, dataset, n_ctx, n_chunks, max_memory, activations, json_path, markdown_path, threads):
    """Perplexity of BASE (llama-perplexity's protocol) and of each VARIANT, with KL divergence against BASE.

    All models run on the same chunk before the next one, so no logits are saved.
    """
    from rich.progress import MofNCompleteColumn

    from qtool.evaluate import report
    from qtool.evaluate.datasets import load_eval_text
    from qtool.evaluate.perplexity import run_perplexity
    from qtool.gguf_io import parse_size

    for p in (json_path, markdown_path):
        if p is not None and not p.parent.is_dir():
            raise QtoolError(f"output directory {p.parent} does not exist")
    budget = parse_size(max_memory) if max_memory else None
    data = load_eval_text(dataset)
    with Progress(TextColumn("[bold]ppl[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), TextColumn("{task.fields[ppl]}"),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("ppl", total=None, rate="", ppl="")

        def progress(p) -> None:
            rate = f"{p.tokens_evaluated / p.elapsed:,.0f} tok/s" if p.elapsed > 0 else ""
            bar.update(task, completed=p.chunks_done, total=p.n_chunks, rate=rate,
                       ppl="PPL " + " | ".join(f"{x:.4f}" for x in p.running_ppl))

        run = run_perplexity(base, variants, data.text, dataset_name=data.name, n_ctx=n_ctx, n_chunks=n_chunks,
                             max_memory=budget, activations=activations, progress=progress)
    # piped output keeps every column whole instead of folding the table to 80 characters
    wide = out if out.is_terminal else Console(file=out.file, width=240, highlight=False, emoji=False)
    wide.print(report.table(run))
    if json_path is not None:
        report.write_json(run, json_path)
    if markdown_path is not None:
        report.write_markdown(run, markdown_path)


@main.command("run")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a recipe value (e.g. eval.chunks=8).")
@click.option("--only", type=click.Choice(["export", "convert", "imatrix", "quantize", "eval"]), default=None,
              help="Run just this stage (the ones before it must be done).")
@click.option("--force", is_flag=True, help="Redo every stage, even when up to date.")
@click.option("--cluster", "cluster_spec", default=None, metavar="ray|ray://HOST:PORT",
              help="Run the imatrix, quantize and eval units as Ray tasks: `ray` connects to RAY_ADDRESS (or starts "
                   "a local Ray instance), or give an address. output.dir must be on storage every node sees; "
                   "--threads N: N CPUs and threads per task (default 1).")
@threads_option
def run_cmd(recipe, sets, only, force, cluster_spec, threads):
    """Run a recipe: convert, imatrix, quantize, evaluate, check the gates, write the report. Exit 1 on a failed gate."""
    from qtool.pipeline import run_recipe
    from qtool.recipe import load_recipe

    r = load_recipe(recipe, list(sets))

    def log(msg: str) -> None:
        err.print(f"[dim]{msg}[/]", soft_wrap=True)

    def chunk_progress(stage: str):
        # a line every tenth of the chunks: the evaluation is the long stage, and a CI log must show it moving
        shown = [0]

        def progress(p) -> None:
            if p.chunks_done == p.n_chunks or p.chunks_done - shown[0] >= max(1, p.n_chunks // 10):
                shown[0] = p.chunks_done
                log(f"{stage}: {p.chunks_done}/{p.n_chunks} chunks, {p.tokens_evaluated / max(p.elapsed, 1e-9):.0f} "
                    f"tokens/s")
        return progress

    cluster = None
    if cluster_spec is not None:
        from qtool.cluster import connect       # only now: without --cluster, Ray is never imported
        cluster = connect(cluster_spec, log, threads)
    try:
        result = run_recipe(r, only=only, force=force, log=log, progress_factory=chunk_progress, cluster=cluster)
    finally:
        if cluster is not None:
            cluster.close()
    if result.evaluation is None:
        err.print(f"stages run: {', '.join(result.stages_run) or 'none'}")
        return
    from qtool.report import rows
    t = Table(title=f"{r.path.name}: {result.evaluation['dataset']}, {result.evaluation['n_chunks']} chunks")
    for col in ("type", "size MB", "bpw", "PPL", "ΔPPL %", "mean KLD", "same top-1 %", "gate"):
        t.add_column(col, justify="right" if col not in ("type", "gate") else "left")
    for row in rows(result, r):
        fmt = lambda v, s: "–" if v is None else format(v, s)  # noqa: E731
        t.add_row(row["type"], f"{row['size_bytes'] / 1e6:.1f}", f"{row['bpw']:.3f}",
                  f"{row['ppl']:.4f} ± {row['ppl_err']:.4f}", fmt(row["delta_ppl_pct"], "+.2f"),
                  fmt(row["kld_mean"], ".5f") + ("" if row.get("predicted_kld") is None
                                                 else f" (predicted {row['predicted_kld']:.5f})"),
                  fmt(row["same_top1_pct"], ".2f"),
                  {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", None: ""}[row["gate"]])
    out.print(t)
    skipped = f" (up to date: {', '.join(result.stages_skipped)})" if result.stages_skipped else ""
    err.print(f"ran: {', '.join(result.stages_run) or 'nothing'}{skipped}; {result.wall_seconds:.0f} s")
    for p in result.report_paths:
        out.print(str(p))
    if result.failed_gates:
        for g in result.failed_gates:
            err.print(f"[bold red]gate failed:[/] {g.message()}", soft_wrap=True)
        sys.exit(1)


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="The text to continue (with --chat: the user's message).")
@click.option("-n", "--n-predict", type=int, default=128, show_default=True,
              help="Tokens to generate at most (-1: until end of generation or a full context).")
@click.option("--temp", type=float, default=0.8, show_default=True, help="Temperature (<= 0: greedy).")
@click.option("--top-k", type=int, default=40, show_default=True, help="Keep the K most likely tokens (<= 0: all).")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus: smallest set with mass P (1: off).")
@click.option("--min-p", type=float, default=0.05, show_default=True,
              help="Drop tokens below P times the best token's probability (0: off).")
@click.option("--seed", type=int, default=None, help="Random seed, 0..2^32-1 (default: a random one, reported).")
@click.option("--greedy", is_flag=True, help="Always take the most likely token (same as --temp 0).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template as one user turn.")
@click.option("--cache-type", type=click.Choice(["f16", "f32"], case_sensitive=False), default="f16", show_default=True,
              help="The KV cache's keys and values: float16 as llama.cpp keeps them, or float32.")
@threads_option
def generate(model, prompt, n_predict, temp, top_k, top_p, min_p, seed, greedy, chat, cache_type, threads):
    """Continue PROMPT with a GGUF model (numpy, KV cache), streaming the text; timings like llama.cpp's at the end."""
    from qtool.evaluate.generate import SamplingParams, generate_text

    sampling = SamplingParams(temperature=0.0 if greedy else temp, top_k=top_k, top_p=top_p, min_p=min_p,
                              seed=None if seed in (None, -1) else seed)
    started = False

    def on_text(piece: str) -> None:
        nonlocal started
        if not started and not chat:
            out.file.write(prompt)     # llama-cli echoes the prompt before the continuation
        started = True
        out.file.write(piece)
        out.file.flush()

    result = generate_text(model, prompt, n_predict=n_predict, sampling=sampling, chat=chat, on_text=on_text,
                           cache_type=cache_type.lower())
    if not started and not chat:
        out.file.write(prompt)
    out.file.write("\n")
    out.file.flush()
    t = result.timings
    for note in result.notes:
        _note(note)
    err.print(f"load        {1e3 * t.load_seconds:10.2f} ms")
    err.print(f"prompt eval {1e3 * t.prefill_seconds:10.2f} ms / {t.prompt_tokens:5d} tokens "
              f"({t.prefill_tokens_per_second:8.2f} tokens per second)")
    err.print(f"eval        {1e3 * t.decode_seconds:10.2f} ms / {t.decode_runs:5d} runs   "
              f"({t.decode_tokens_per_second:8.2f} tokens per second)")
    err.print(f"sampling    {1e3 * t.sample_seconds:10.2f} ms / {t.samples:5d} tokens")
    err.print(f"stopped: {result.stop_reason} after {len(result.tokens)} tokens"
              + (f"; seed {result.seed}" if result.seed is not None else "; greedy"))


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--dataset", "-f", default=None,
              help="Calibration text: a .txt/.raw, .jsonl ('text' field) or .parquet file, or 'wikitext'.")
@click.option("--ctx", "n_ctx", type=int, default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", "n_chunks", type=int, default=None, help="Use at most N chunks.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("imatrix.gguf"), show_default=True,
              help="The imatrix file to write.")
@click.option("--format", "fmt", type=click.Choice(["gguf", "dat"], case_sensitive=False), default=None,
              help="gguf (llama.cpp's current format) or dat (legacy). Default: dat for a .dat name, else gguf.")
@click.option("--process-output", is_flag=True, help="Also collect output.weight (not a tied output).")
@click.option("--in-file", "in_files", multiple=True, type=click.Path(path_type=Path),
              help="An earlier imatrix to add in (repeatable). Without --dataset the files are only combined.")
@click.option("--parse-special", is_flag=True, help="Tokenize special-token texts in the dataset as special tokens.")
@click.option("--max-memory", default=None,
              help="Optional cache of decoded float32 weights kept between chunks (e.g. 8G). Default: none.")
@click.option("--show", "show_file", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="Print per-tensor statistics of an imatrix file (with MODEL: also its uncalibrated tensors).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@threads_option
def imatrix(model, dataset, n_ctx, n_chunks, output, fmt, process_output, in_files, parse_special, max_memory,
            show_file, force, threads):
    """Importance matrix of MODEL over a calibration text, as llama-imatrix computes it (for quantize --imatrix)."""
    from qtool.evaluate.imatrix import compute_imatrix_file, summarize_imatrix
    from qtool.gguf_io import parse_size

    if show_file is not None:
        _print_imatrix_summary(summarize_imatrix(show_file, model))
        return
    if dataset is None and not in_files:
        raise QtoolError("missing --dataset (a calibration text), or --in-file files to combine, or --show FILE")
    with Progress(TextColumn("[bold]imatrix[/]"), BarColumn(), TextColumn("{task.fields[chunks]}"),
                  TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[eta]}"),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("imatrix", total=None, chunks="", rate="", eta="")

        def progress(p) -> None:
            eta = p.eta_seconds
            bar.update(task, completed=p.tokens_done, total=p.n_tokens, chunks=f"{p.chunks_done}/{p.n_chunks} chunks",
                       rate=f"{p.tokens_per_second:,.0f} tok/s",
                       eta=f"ETA {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None else "")

        run = compute_imatrix_file(model, dataset, output, n_ctx=n_ctx, n_chunks=n_chunks, fmt=fmt,
                                   process_output=process_output, in_files=in_files, parse_special=parse_special,
                                   max_memory=parse_size(max_memory) if max_memory else None, force=force,
                                   progress=progress)
    for note in run.notes:
        _note(note)
    merged = f"{len(in_files)} file(s) merged; " if in_files else ""
    collected = (f"{run.n_chunks} chunks of {run.n_ctx} tokens in {run.seconds:.1f} s "
                 f"({run.tokens_per_second:,.0f} tok/s); " if run.n_chunks else "")
    err.print(f"{collected}{merged}{run.n_entries} tensors, {run.chunk_count} chunks recorded ({run.format})")
    out.print(str(run.path), soft_wrap=True)


def _print_imatrix_summary(s) -> None:
    legacy = s.legacy
    t = Table(title=f"{s.path} ({'legacy .dat' if legacy else 'GGUF'}): {len(s.tensors)} tensors")
    cols = ("tensor", "chunks" if legacy else "tokens", "coverage", "Σ(Act²)", "mean", "min", "max", "zero cols")
    for col in cols:
        t.add_column(col, justify="left" if col == "tensor" else "right")
    for ts in s.tensors:
        seen = f"{ts.chunks:g}" if legacy else f"{ts.tokens:,}"
        coverage = f"{100 * ts.coverage:.1f} %"
        if ts.n_mat > 1:
            coverage += f" ({ts.matrices_with_data}/{ts.n_mat} experts)"
        partial = ts.coverage < 1 or ts.matrices_with_data < ts.n_mat
        t.add_row(ts.name, seen, f"[yellow]{coverage}[/]" if partial else coverage, f"{ts.total:.4g}",
                  f"{ts.mean:.4g}", f"{ts.min:.4g}", f"{ts.max:.4g}",
                  f"[yellow]{ts.zero_columns}[/]" if ts.zero_columns else "0")
    wide = out if out.is_terminal else Console(file=out.file, width=200, highlight=False, emoji=False)
    wide.print(t)
    size = "" if legacy else f" of {s.chunk_size} tokens"
    out.print(f"datasets: {', '.join(s.datasets) or '(none recorded)'}; {s.chunk_count} chunks{size}", soft_wrap=True)
    if s.zero_columns:
        n = sum(1 for ts in s.tensors if ts.zero_columns)
        _note(f"warning: {s.zero_columns} columns in {n} tensors never saw a non-zero input; "
              f"quantizers ignore them")
    if s.missing:
        shown = ", ".join(s.missing[:4]) + (", …" if len(s.missing) > 4 else "")
        _note(f"warning: {len(s.missing)} matrices of the model have no entry and will be quantized without "
              f"the imatrix: {shown}")


if __name__ == "__main__":  # pragma: no cover
    main()
