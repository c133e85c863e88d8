"""The results of a `qtool run` (RunResult, GateResult) and their report: report.json (stable, for machines),
report.md (for people), report.png (plot). The pipeline produces them; this module only reads them."""
from __future__ import annotations

import io
import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qtool.gguf_io import atomic_write

from qtool.recipe import GATE_KEYS

if TYPE_CHECKING:  # pragma: no cover
    from qtool.recipe import Recipe


# --- results ----------------------------------------------------------------------------------------------------

@dataclass
class GateResult:
    ftype: str
    gate: str            # recipe key, e.g. max_kld
    measured: float
    allowed: float
    passed: bool

    def message(self) -> str:
        op = ">" if self.gate.startswith("min_") else "<"
        word = "passed" if self.passed else "FAILED"
        return (f"{self.ftype}: {GATE_KEYS[self.gate]} {self.measured:.4g} "
                f"({'needs' if not self.passed else 'within'} {op}= {self.allowed:g}) {word}")


@dataclass
class RunResult:
    recipe: Path
    out_dir: Path
    base: Path | None = None
    variants: dict[str, Path] = field(default_factory=dict)
    imatrix: Path | None = None
    evaluation: dict[str, Any] | None = None
    gates: list[GateResult] = field(default_factory=list)
    stages_run: list[str] = field(default_factory=list)
    stages_skipped: list[str] = field(default_factory=list)
    report_paths: list[Path] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]


def rows(result: RunResult, recipe: "Recipe") -> list[dict[str, Any]]:
    """One row per model (base first) with the numbers a reader compares, plus the gate verdict."""
    ev = result.evaluation or {"models": []}
    out = []
    types = ["base", *recipe.types]
    for label, m in zip(types, ev["models"]):
        gates = [g for g in result.gates if g.ftype == label]
        out.append({
            "type": label, "path": m["path"], "size_bytes": m["size_bytes"], "bpw": m["bpw"],
            "ppl": m["ppl"], "ppl_err": m["ppl_err"], "delta_ppl_pct": m.get("delta_ppl_pct"),
            "kld_mean": m.get("kld_mean"), "kld_err": m.get("kld_err"), "kld_p99": m.get("kld_p99"),
            "same_top1_pct": m.get("same_top1_pct"), "predicted_kld": m.get("predicted_kld"),
            "gate": None if label == "base" or not gates else ("pass" if all(g.passed for g in gates) else "fail"),
        })
    return out


def _fmt(v: Any, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _predicted(r: dict[str, Any]) -> str:
    return "" if r.get("predicted_kld") is None else f" (predicted {r['predicted_kld']:.5f})"


def to_markdown(result: RunResult, recipe: "Recipe") -> str:
    ev = result.evaluation or {}
    lines = [f"# qtool run: {recipe.path.name}", "",
             f"Evaluation: {ev.get('dataset')}, ctx {ev.get('n_ctx')}, {ev.get('n_chunks')} chunks, "
             f"{ev.get('n_tokens_scored')} tokens scored; run took {result.wall_seconds:.0f} s.", "",
             "| type | size MB | bpw | PPL | ΔPPL % | mean KLD | KLD p99 | same top-1 % | gate |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows(result, recipe):
        lines.append(f"| {r['type']} | {r['size_bytes'] / 1e6:.1f} | {r['bpw']:.3f} | {r['ppl']:.4f} ± {r['ppl_err']:.4f} "
                     f"| {_fmt(r['delta_ppl_pct'], '+.2f')} | {_fmt(r['kld_mean'], '.5f')}{_predicted(r)} | {_fmt(r['kld_p99'], '.4f')} "
                     f"| {_fmt(r['same_top1_pct'], '.2f')} | {r['gate'] or ''} |")
    if result.gates:
        lines += ["", "## Gates", ""]
        lines += [f"- {g.message()}" for g in result.gates]
    lines.append("")
    return "\n".join(lines)




def plot(result: RunResult, recipe: "Recipe", path: Path) -> None:
    """Size vs mean KL divergence, one labelled point per type: the trade-off at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [r for r in rows(result, recipe) if r["kld_mean"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    xs = [r["bpw"] for r in pts]
    ys = [max(r["kld_mean"], 1e-6) for r in pts]
    colors = ["tab:red" if r["gate"] == "fail" else "tab:blue" for r in pts]
    ax.scatter(xs, ys, c=colors, zorder=3)
    for r, x, y in zip(pts, xs, ys):
        ax.annotate(r["type"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("mean KL divergence vs base (log)")
    ev = result.evaluation or {}
    dataset = Path(str(ev.get("dataset"))).name        # a local path would run off the figure
    ax.set_title(f"{recipe.path.stem}: size vs quality ({dataset}, {ev.get('n_chunks')} chunks)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    atomic_write(path, png.getvalue())


def write_reports(result: RunResult, recipe: "Recipe") -> list[Path]:
    out = result.out_dir
    data = {
        "recipe": str(recipe.path), "out_dir": str(out), "base": str(result.base),
        "imatrix": str(result.imatrix) if result.imatrix else None,
        "wall_seconds": result.wall_seconds, "passed": not result.failed_gates,
        "models": rows(result, recipe),
        "gates": [{"type": g.ftype, "gate": g.gate, "measured": g.measured, "allowed": g.allowed, "passed": g.passed}
                  for g in result.gates],
        "evaluation": result.evaluation,
    }
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    atomic_write(paths[0], json.dumps(data, indent=2))
    atomic_write(paths[1], to_markdown(result, recipe))
    plot(result, recipe, paths[2])
    return paths
