"""A Ray cluster of `ray start` nodes on this machine, for tests/test_cluster.py and benchmarks/cluster.py.

Each node has its own temp folder under one root; stopping ends exactly the processes started from that root,
by pid (not `ray stop`: it ends every Ray process of the machine, other people's included).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# The `ray` command beside this Python (an environment's own), else the one on PATH (a venv that sees Ray from
# the system's site-packages has no script of its own).
RAY = Path(sys.executable).parent / "ray"
if not RAY.exists() and shutil.which("ray"):
    RAY = Path(shutil.which("ray"))


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
    """A head and worker nodes with `cpus_per_node` CPUs each, started with `ray start` in their own temp folders.
    `hide`: the worker nodes run in their own mount namespace with an empty tmpfs over that folder (they cannot
    see it)."""

    def __init__(self, cpus_per_node: tuple[int, ...] = (1, 1), hide: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="qtray-", dir="/tmp"))     # short: Ray's socket paths must fit
        # Token authentication with a token of its own (Ray 2.60: a token in ~/.ray, which a local ray.init()
        # writes, would otherwise switch it on for some of the nodes and not others).
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
        try:
            head = self._start(["--head", "--port", "0", "--include-dashboard", "false"], "head", cpus_per_node[0])
            self.address = re.search(r"--address='([^']+)'", head).group(1)
            prefix = ["unshare", "-Urm", "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hide)] if hide else []
            for i, cpus in enumerate(cpus_per_node[1:]):
                self._start(["--address", self.address], f"worker{i}" if i else "worker", cpus, prefix)
        except BaseException:
            self.stop()
            raise

    def _start(self, args: list[str], name: str, cpus: int, prefix: list[str] = ()) -> str:
        r = subprocess.run([*prefix, str(RAY), "start", *args, "--num-cpus", str(cpus), "--temp-dir", str(self.root / name),
                            "--object-store-memory", "100000000", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=180, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"ray start {name}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        return r.stdout + r.stderr

    def worker_processes(self) -> dict[int, bytes]:
        """Ray worker processes of the worker node now running a task ('ray::qtool …' titles)."""
        procs = _processes()
        return {pid: procs[pid][1] for pid in _cluster_processes(str(self.root / "worker"))
                if pid in procs and procs[pid][1].startswith(b"ray::qtool")}

    def stop(self) -> None:
        _end_processes(_cluster_processes(str(self.root)))
        shutil.rmtree(self.root, ignore_errors=True)


