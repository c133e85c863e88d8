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

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


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
@click.option("--revision", default=None, help="Hub revision when MODEL is a repo id.")
@click.option("--model-name", default=None, help="general.name to write (default: from README/config/dir).")
@click.option("--dry-run", is_flag=True, help="List tensors, shapes, types and metadata; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
def convert(model, outfile, outtype, vocab_only, split_max_size, split_max_tensors, pre, normhead, revision,
            model_name, dry_run, force):
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
                           model_name=model_name or (model if from_hub else None), vocab_only=vocab_only)
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


if __name__ == "__main__":  # pragma: no cover
    main()
