"""A perplexity run as a rich table, JSON (a stable, documented schema) and Markdown.

JSON schema (version 1), every number a JSON number, `null` where a field does not apply:

    {
      "schema": "qtool.ppl/1",
      "dataset": str,                 # "wikitext-2-raw-v1/test" or the dataset file path
      "n_ctx": int,                   # tokens per chunk
      "n_chunks": int,                # chunks evaluated
      "n_tokens_scored": int,         # n_chunks * (n_ctx - n_ctx // 2 - 1)
      "wall_seconds": float,          # the evaluation loop (loading and tokenizing excluded)
      "tokens_per_second": float,     # forward-pass tokens of all models / wall_seconds
      "activations": str,             # "llama.cpp" (matrix-product inputs rounded as llama.cpp's CPU backend
                                      # rounds them for each weight type) or "float32"
      "models": [                     # the base first, then the variants in command-line order
        {"path": str, "size_bytes": int, "n_params": int, "bpw": float,   # bpw: tensor bits per parameter
         "ppl": float, "ppl_err": float,
         # variants only (null for the base); KLD in nats, KL(base || variant), over the whole vocabulary:
         "delta_ppl": float, "delta_ppl_pct": float,
         "kld_mean": float, "kld_err": float, "kld_median": float, "kld_p99": float, "kld_p999": float,
         "kld_max": float,
         "same_top1_pct": float,      # % of scored positions whose most likely token equals the base's
         "rms_dp_pct": float,         # RMS over scored tokens of p(next token) - p_base(next token), in %
         "predicted_kld": float}      # the mean KLD `qtool quantize --target-bpw/--mix` predicted (on its
                                      # calibration text), null when the file records none
      ]
    }
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from qtool.evaluate.perplexity import ModelSummary, PerplexityRun
from qtool.gguf_io import atomic_write

SCHEMA = "qtool.ppl/1"


def to_json_dict(run: PerplexityRun) -> dict[str, Any]:
    return {"schema": SCHEMA, "dataset": run.dataset, "n_ctx": run.n_ctx, "n_chunks": run.n_chunks,
            "n_tokens_scored": run.n_tokens_scored, "wall_seconds": run.wall_seconds,
            "tokens_per_second": run.tokens_per_second, "activations": run.activations,
            "models": [dataclasses.asdict(m) for m in run.models]}




def write_json(run: PerplexityRun, path: Path) -> None:
    atomic_write(path, json.dumps(to_json_dict(run), indent=2) + "\n")


def _name(m: ModelSummary) -> str:
    return Path(m.path).name


def _rows(run: PerplexityRun) -> list[list[str]]:
    rows = []
    for i, m in enumerate(run.models):
        variant = i > 0
        rows.append([
            _name(m) + ("" if variant else " (base)"),
            f"{m.size_bytes / 1e6:,.1f}",
            f"{m.bpw:.3f}",
            f"{m.ppl:.4f} ± {m.ppl_err:.4f}",
            f"{m.delta_ppl:+.4f} ({m.delta_ppl_pct:+.2f}%)" if variant else "",
            (f"{m.kld_mean:.6f} ± {m.kld_err:.6f}" + ("" if m.predicted_kld is None else
                                                      f" (predicted {m.predicted_kld:.6f})")) if variant else "",
            f"{m.kld_median:.6f}" if variant else "",
            f"{m.kld_p99:.6f}" if variant else "",
            f"{m.kld_p999:.6f}" if variant else "",
            f"{m.same_top1_pct:.2f}" if variant else "",
            f"{m.rms_dp_pct:.3f}" if variant else "",
        ])
    return rows


HEADERS = ["model", "size MB", "bpw", "PPL", "ΔPPL", "KLD", "KLD median", "KLD 99%", "KLD 99.9%",
           "same top-1 %", "RMS Δp %"]


def _caption(run: PerplexityRun) -> str:
    return (f"{run.dataset}: {run.n_chunks} chunks of {run.n_ctx} tokens, {run.n_tokens_scored:,} scored; "
            f"{run.activations} activations; {run.wall_seconds:.1f} s, {run.tokens_per_second:,.0f} tokens/s")


def table(run: PerplexityRun) -> Table:
    t = Table(title="perplexity and KL divergence against the base", caption=_caption(run))
    for i, h in enumerate(HEADERS):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in _rows(run):
        t.add_row(*row)
    return t


def to_markdown(run: PerplexityRun) -> str:
    lines = [f"**{_caption(run)}**", "", "| " + " | ".join(HEADERS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|"]
    for row in _rows(run):
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(run: PerplexityRun, path: Path) -> None:
    atomic_write(path, to_markdown(run))
