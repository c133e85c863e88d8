"""`qtool run --cluster`: the same recipe on a two-node Ray cluster on this machine gives the local run's bytes and
numbers, survives a killed worker, and refuses a node that cannot see the output directory.

The exactness rests on pieces tested here without Ray first: ranges of chunks merge into the whole run's scores,
and replayed imatrix increments give one process's float32 sums.

The clusters are started with `ray start` (separate --temp-dir per node) and ended process by process: every
process whose command line names the cluster's temp folder, and their children (not `ray stop`, which ends every
Ray process of the machine, other people's included).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED
from tests.interop import unavailable
from tests.ray_cluster import RAY, Cluster

WIKI = SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw"
# ctx 512: 4 chunks per imatrix pass and per evaluation group, so 8 chunks make two ranges of each on two nodes.
RECIPE = """
[source]
path = "ckpt"
[imatrix]
dataset = "calib.txt"
chunks = 8
ctx = 512
[quantize]
types = ["Q8_0", "Q4_0", "IQ4_NL"]
[eval]
dataset = "eval.txt"
ctx = 512
chunks = 8
[gates]
default = { max_kld = 5.0 }
[output]
dir = "out"
"""
RUN_TIMEOUT = 300


# --- the pieces, without Ray ----------------------------------------------------------------------------------------

def test_partition_covers_everything_on_step_boundaries():
    from qtool.cluster import partition

    assert partition(40, 4, 4) == [(0, 12), (12, 12), (24, 8), (32, 8)]
    assert partition(8, 4, 8) == [(0, 4), (4, 4)]            # never more ranges than steps
    assert partition(10, 4, 2) == [(0, 8), (8, 2)]
    assert partition(3, 32, 4) == [(0, 3)]
    for n, step, parts in [(1, 1, 1), (97, 3, 5), (100, 4, 7)]:
        ranges = partition(n, step, parts)
        assert sum(c for _, c in ranges) == n and all(first % step == 0 for first, _ in ranges)
        assert all(a + c == b for (a, c), (b, _) in zip(ranges, ranges[1:]))


class _ToyModel:
    """A deterministic 'language model' whose logits depend on the tokens, for lockstep evaluation."""

    n_vocab = 37

    def __init__(self, seed: int):
        self.table = np.random.default_rng(seed).standard_normal((self.n_vocab, self.n_vocab)).astype(np.float32)

    def forward(self, tokens: np.ndarray, *, output_from: int = 0) -> np.ndarray:
        return self.table[tokens[:, output_from:] % self.n_vocab]


def test_chunk_ranges_merge_into_the_whole_run():
    from qtool.evaluate.perplexity import merge_scores, score_chunks

    models = [_ToyModel(0), _ToyModel(1), _ToyModel(2)]
    n_ctx, n_chunks = 512, 12               # group_size(512, ...) = 4 chunks
    tokens = np.random.default_rng(3).integers(0, 37, n_chunks * n_ctx)
    whole = score_chunks(models, tokens, n_ctx, 1)
    parts = [score_chunks(models, tokens[a * n_ctx:(a + n) * n_ctx], n_ctx, 1) for a, n in [(0, 4), (4, 8)]]
    for w, m in zip(whole, merge_scores(parts)):
        for field in ("nll", "kld", "p_diff", "same_top1"):
            a, b = getattr(w, field), getattr(m, field)
            assert (a is None and b is None) or np.array_equal(a, b), field


def test_replayed_increments_are_the_sums_of_one_process():
    from qtool.evaluate.imatrix import ImatrixCollector, RecordingCollector, replay

    rng = np.random.default_rng(0)
    calls = [("blk.0.attn_q.weight", rng.standard_normal((64, 48)).astype(np.float32) * 10 ** rng.uniform(-3, 3))
             for _ in range(20)]
    direct = ImatrixCollector()
    recorders = [RecordingCollector(), RecordingCollector()]
    for i, (name, x) in enumerate(calls):
        direct(name, x)
        recorders[i // 10](name, x)
        direct("blk.0.ffn_gate_exps.weight", x[:5], expert=i % 3, n_expert=3)
        recorders[i // 10]("blk.0.ffn_gate_exps.weight", x[:5], expert=i % 3, n_expert=3)
    merged = ImatrixCollector()
    for r in recorders:
        replay(merged, r.increments)
    for name in direct.sums:
        assert merged.sums[name].tobytes() == direct.sums[name].tobytes()
        assert np.array_equal(merged.counts[name], direct.counts[name])


def test_finished_units_are_remembered_until_the_stage_is(tmp_path):
    from qtool.pipeline import Manifest, UnitStore

    manifest = Manifest(tmp_path / "manifest.json")
    store = UnitStore(tmp_path / ".qtool-units" / "eval", "eval", "k1", manifest, fresh=False)
    store.dir.mkdir(parents=True)
    store.path("chunks-0-4").write_bytes(b"scores")
    store.record("chunks-0-4")
    again = Manifest(tmp_path / "manifest.json")            # a later run reads what the interrupted one recorded
    assert UnitStore(store.dir, "eval", "k1", again, False).finished() == {"chunks-0-4": store.path("chunks-0-4")}
    assert UnitStore(store.dir, "eval", "k2", again, False).finished() == {}     # other inputs: start over
    assert UnitStore(store.dir, "eval", "k1", again, True).finished() == {}      # --force
    (tmp_path / "eval.json").write_text("{}")
    again.record("eval", "k1", [tmp_path / "eval.json"])
    store.clear()
    assert "eval units" not in json.loads((tmp_path / "manifest.json").read_text())
    assert not (tmp_path / ".qtool-units").exists()


def test_without_cluster_ray_is_never_imported():
    code = ("import sys; from qtool.cli import main; import qtool.pipeline, qtool.recipe; "
            "print('ray' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_bad_cluster_address_is_one_line(tmp_path):
    from click.testing import CliRunner

    from qtool.cli import main

    (tmp_path / "recipe.toml").write_text(RECIPE)
    r = CliRunner().invoke(main, ["run", str(tmp_path / "recipe.toml"), "--cluster", "spark"])
    assert r.exit_code == 2
    assert "--cluster 'spark'" in r.output and "Traceback" not in r.output


# --- a two-node cluster on this machine -----------------------------------------------------------------------------

def _need_ray() -> None:
    if importlib.util.find_spec("ray") is None or not RAY.exists():
        unavailable('ray is not installed (pip install -e ".[test,interop,ray]")')


def _qtool_run(cluster: Cluster | None, recipe: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-c", "from qtool.cli import main; main()", "run", str(recipe), *args]
    if cluster is not None:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address}
        cmd += ["--cluster", "ray"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, cwd=recipe.parent)


@pytest.fixture(scope="module")
def workdir(checkpoint_factory, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cluster")
    shutil.copytree(checkpoint_factory("llama-spm"), d / "ckpt")
    raw = WIKI.read_text(encoding="utf-8")
    (d / "eval.txt").write_text(raw[:40000], encoding="utf-8")
    (d / "calib.txt").write_text(raw[100000:140000], encoding="utf-8")
    (d / "recipe.toml").write_text(RECIPE)
    return d


@pytest.fixture(scope="module")
def local_run(workdir) -> Path:
    """The single-machine run, one thread per stage like the cluster's 1-CPU tasks (BLAS's sums depend on the
    thread count), moved aside so that the cluster runs write the same paths (GGUFs record the imatrix's path)."""
    r = _qtool_run(None, workdir / "recipe.toml", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    (workdir / "out").rename(workdir / "out-local")
    return workdir / "out-local"


@pytest.fixture(scope="module")
def cluster():
    _need_ray()
    c = Cluster()
    try:
        yield c
    finally:
        c.stop()


def _assert_same_as_local(out: Path, local: Path) -> None:
    names = sorted(p.name for p in local.glob("*.gguf"))
    assert names == sorted(p.name for p in out.glob("*.gguf")) and len(names) == 5   # F16, imatrix, 3 types
    for name in names:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    from qtool.quantize.imatrix_file import read_imatrix
    a, b = read_imatrix(out / "imatrix.gguf"), read_imatrix(local / "imatrix.gguf")
    for name, (sums, counts) in b.entries.items():
        np.testing.assert_allclose(a.entries[name][0], sums, rtol=1e-6)
        assert np.array_equal(a.entries[name][1], counts)
    mine, theirs = (json.loads((d / "report.json").read_text()) for d in (out, local))
    assert [m["type"] for m in mine["models"]] == ["base", "Q8_0", "Q4_0", "IQ4_NL"]
    for m, t in zip(mine["models"], theirs["models"]):
        for k, v in t.items():
            if isinstance(v, float):
                assert m[k] == pytest.approx(v, rel=1e-9, abs=0), (t["type"], k)
            elif k != "path":
                assert m[k] == v, (t["type"], k)
    assert mine["passed"] == theirs["passed"]
    left = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not left, f"temporary files left behind: {left}"
    assert not any(k.endswith(" units") for k in json.loads((out / "manifest.json").read_text()))


@pytest.mark.slow
def test_a_cluster_run_has_the_local_runs_bytes_and_numbers(workdir, local_run, cluster):
    r = _qtool_run(cluster, workdir / "recipe.toml")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cluster: 2 node(s), 2 task slot(s)" in r.stderr
    assert re.search(r"cluster: \d+/\d+ units done \(eval 2/2\)", r.stderr)       # one display for all units
    _assert_same_as_local(workdir / "out", local_run)
    again = _qtool_run(cluster, workdir / "recipe.toml")                          # nothing to do the second time
    assert again.returncode == 0 and "ran: nothing" in again.stderr
    shutil.rmtree(workdir / "out")


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_report_is_the_same(workdir, local_run, cluster):
    """A worker process of the second node killed while it runs a unit: Ray runs the unit again."""
    killed: list[bytes] = []
    done = threading.Event()

    def kill_one() -> None:
        while not done.is_set() and not killed:
            for pid, title in cluster.worker_processes().items():
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(title)
                except ProcessLookupError:
                    continue
                break
            time.sleep(0.02)
    killer = threading.Thread(target=kill_one, daemon=True)
    killer.start()
    try:
        r = _qtool_run(cluster, workdir / "recipe.toml")
    finally:
        done.set()
        killer.join(timeout=10)
    assert killed, "no worker was seen running a unit"
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_as_local(workdir / "out", local_run)
    shutil.rmtree(workdir / "out")


@pytest.mark.slow
def test_a_node_that_cannot_see_the_output_directory_is_one_line(workdir):
    _need_ray()
    blind = Cluster(hide=workdir)
    try:
        r = _qtool_run(blind, workdir / "recipe.toml", "--set", "output.dir=out-blind")
    finally:
        blind.stop()
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "cannot see" in errors[0] and str(workdir / "out-blind") in errors[0] and "node " in errors[0]
    assert not (workdir / "out-blind").exists()        # nothing written, not even the folder
