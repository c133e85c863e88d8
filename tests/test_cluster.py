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
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED
from tests.interop import unavailable

RAY = Path(sys.executable).parent / "ray"
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


def _processes() -> dict[int, tuple[int, bytes]]:
    """pid -> (parent pid, command line) of every process (Linux /proc)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out[int(d.name)] = (ppid, cmd)
    return out


def _cluster_processes(marker: str) -> set[int]:
    """The processes whose command line names `marker` (the cluster's temp folder), and their descendants."""
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if marker.encode() in cmd}
    grown = True
    while grown:
        more = {pid for pid, (ppid, _) in procs.items() if ppid in found} - found
        found |= more
        grown = bool(more)
    me, ancestors = os.getpid(), set()
    while me > 1 and me not in ancestors:
        ancestors.add(me)
        me = procs.get(me, (1, b""))[0]
    return found - ancestors


def _end_processes(pids: set[int]) -> None:
    """SIGTERM each, by pid; SIGKILL those still running 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_running(p) for p in pids):
            time.sleep(0.2)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Cluster:
    """A head and one worker node, 1 CPU each, started with `ray start` in their own temp folders."""

    def __init__(self, hide: Path | None = None):
        _need_ray()
        self.root = Path(tempfile.mkdtemp(prefix="qtray-", dir="/tmp"))     # short: Ray's socket paths must fit
        # Token authentication with a token of its own (Ray 2.60: a token in ~/.ray, which a local ray.init()
        # writes, would otherwise switch it on for some of the nodes and not others).
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
        try:
            head = self._start(["--head", "--port", "0", "--include-dashboard", "false"], "head")
            self.address = re.search(r"--address='([^']+)'", head).group(1)
            # `hide`: the worker node runs in its own mount namespace with an empty tmpfs over that folder
            prefix = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hide)] if hide else []
            self._start(["--address", self.address], "worker", prefix)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], name: str, prefix: list[str] = ()) -> str:
        r = subprocess.run([*prefix, str(RAY), "start", *args, "--num-cpus", "1", "--temp-dir", str(self.root / name),
                            "--object-store-memory", "100000000", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=180, env=self.env)
        assert r.returncode == 0, f"ray start {name}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        return r.stdout + r.stderr

    def worker_processes(self) -> dict[int, bytes]:
        """Ray worker processes of the worker node now running a task ('ray::qtool …' titles)."""
        procs = _processes()
        return {pid: procs[pid][1] for pid in _cluster_processes(str(self.root / "worker"))
                if pid in procs and procs[pid][1].startswith(b"ray::qtool")}

    def stop(self) -> None:
        _end_processes(_cluster_processes(str(self.root)))
        shutil.rmtree(self.root, ignore_errors=True)


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
