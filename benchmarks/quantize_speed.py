#!/usr/bin/env python3
"""Side-by-side benchmark: ``qtool quantize`` against llama.cpp's ``llama-quantize``.

    python benchmarks/quantize_speed.py                        # SmolLM2-135M F16 + a synthetic 1.2B llama
    python benchmarks/quantize_speed.py --models smollm2 --types Q4_K_M --repeats 1   # quick

Both tools run as subprocesses on the same F16 GGUF with the same thread count, each ``--repeats`` times in
alternating order, for the file types Q8_0, Q4_0, Q4_K_M, Q6_K and IQ4_XS (``--types``). Per run: wall time, CPU
time (user + system: less sensitive than wall time to other jobs on a shared machine) and
the peak RSS of the process (GNU time's maximum resident set size: the kernel's high-water mark,
file-backed pages included).
qtool's numba kernels are compiled once beforehand; the time that takes (from an empty cache, and loading from
the cache as every run does) is reported separately. The outputs of the two tools are compared byte for byte:
a speed comparison of programs that write different files would be worthless.

Models: SmolLM2-135M-Instruct as F16 (``tests/fixtures/smollm2.py``), and a synthetic llama with
Llama-3.2-1B's shapes (16 layers, hidden 2048, FFN 8192, GQA 4, 128256-token vocab, tied; 1.24 B parameters,
2.5 GB) written once into ``--workdir``.

Types that llama-quantize refuses without an importance matrix (IQ2_XXS, IQ2_XS, IQ2_S, IQ1_*, IQ3_XXS and the
file types built on them, Q2_K_S) get one for both tools: random sums of fixed seed (the gamma-distributed values of
tests/test_quantize.py's random_imatrix_entries), written once per model; `--imatrix` gives it to every type.

    python benchmarks/quantize_speed.py --models 1b --types IQ2_XXS,IQ2_M,IQ3_M,TQ2_0 --repeats 1

Target: qtool's wall time ≤ 1.5 × llama-quantize's. Exit code 0 when every run succeeded, the outputs are
identical and the target is met; 1 otherwise. Units: s, MB = 10^6 bytes.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qtool  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "IQ4_XS"]
NEED_IMATRIX = {"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"}
TARGET = 1.5


@dataclass
class Run:
    tool: str
    wall: float
    peak_rss: int      # bytes
    cpu: float         # user + system seconds
    output: Path


def run_with_rss(cmd: list[str], env: dict | None = None) -> tuple[float, int, float, str]:
    """Wall time, peak RSS (bytes), CPU seconds (user + system) and output of one child process.

    GNU time measures from its own small process: a child forked straight from this (large) Python process would
    report at least our RSS at fork time as its high-water mark. The output goes to a file: llama-quantize prints
    a line per tensor, more than a pipe holds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rss_file, log_file = Path(tmp) / "rss", Path(tmp) / "log"
        timed = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *cmd] if Path("/usr/bin/time").exists() \
            else cmd
        with open(log_file, "wb") as log:
            t0 = time.perf_counter()
            proc = subprocess.run(timed, stdout=log, stderr=subprocess.STDOUT, env=env)
            wall = time.perf_counter() - t0
        text = log_file.read_text(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} … failed ({proc.returncode}):\n{text[-3000:]}")
        rss, cpu = 0, 0.0
        if rss_file.exists():
            kb, user, system = rss_file.read_text().split()[-3:]
            rss, cpu = int(kb) * 1024, float(user) + float(system)
    return wall, rss, cpu, text


def qtool_env(threads: int, cache_dir: str | None = None) -> dict:
    env = qtool.foreign_env()      # llama-quantize runs in it too: without qtool's own thread settings
    env["NUMBA_NUM_THREADS"] = str(threads)
    if cache_dir is not None:
        env["NUMBA_CACHE_DIR"] = cache_dir
    return env


def compile_bytecode() -> None:
    """qtool's modules as a regular install has them: compiled to bytecode once (pip does it when it installs a
    wheel, Python on first import). With PYTHONDONTWRITEBYTECODE set, as on some CI machines, an editable install
    would otherwise compile every module again in every run (~0.15 s)."""
    import compileall
    import importlib
    dirs = {Path(importlib.import_module(m).__file__).parent
            for m in ("qtool", "qtool.quantize", "qtool.evaluate", "qtool.convert")}
    for d in sorted(dirs):
        compileall.compile_dir(str(d), quiet=1)
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        print("PYTHONDONTWRITEBYTECODE is set: compiled qtool's bytecode once, as installing a wheel would",
              file=sys.stderr)


def numba_times(threads: int) -> tuple[float, float]:
    """Seconds to get every kernel ready: compiled into an empty cache, and loaded from the warm cache."""
    snippet = ("import time, numpy as np; t=time.perf_counter();"
               "from qtool.quantize import formats;"
               "x=np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32);"
               "[formats.quantize(x, t_, w) for t_, f in formats.FORMATS.items()"
               " for w in (np.ones(256, np.float32),) + (() if f.needs_imatrix else (None,))];"
               "print(time.perf_counter()-t)")
    with tempfile.TemporaryDirectory() as empty:
        cold = float(subprocess.run([sys.executable, "-c", snippet], env=qtool_env(threads, empty), check=True,
                                    capture_output=True, text=True).stdout.split()[-1])
    subprocess.run([sys.executable, "-c", snippet], env=qtool_env(threads), check=True, capture_output=True)
    warm = float(subprocess.run([sys.executable, "-c", snippet], env=qtool_env(threads), check=True,
                                capture_output=True, text=True).stdout.split()[-1])
    return cold, warm


def tiny_model(workdir: Path) -> Path:
    """A 2-layer llama 256 wide (~1 MB): quantizing it costs what every run costs whatever the model's size."""
    from tests.test_quantize import write_llama_gguf
    path = workdir / "tiny-F16.gguf"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        write_llama_gguf(tmp, n_layer=2, hidden=256, ffn=512, n_head=4, n_head_kv=2, vocab=320, seed=2, name="tiny")
        tmp.rename(path)
    return path


def synthetic_1b(workdir: Path) -> Path:
    from tests.test_quantize import write_llama_gguf
    path = workdir / "synthetic-1.2B-F16.gguf"
    if not path.exists():
        print(f"writing {path} (2.5 GB, once) …", file=sys.stderr)
        tmp = path.with_suffix(".tmp")
        write_llama_gguf(tmp, n_layer=16, hidden=2048, ffn=8192, n_head=32, n_head_kv=8, vocab=128256, tied=True,
                         seed=1, name="synthetic-1.2B")
        tmp.rename(path)
    return path


def imatrix_for(model: Path) -> Path:
    """A fixed-seed random importance matrix for `model`, next to it (written once)."""
    from qtool.quantize.imatrix_file import write_imatrix_gguf
    from tests.test_quantize import random_imatrix_entries
    path = model.with_name(model.stem + "-imatrix.gguf")
    if not path.exists():
        write_imatrix_gguf(path, random_imatrix_entries(model, seed=3), datasets=["random"], chunk_count=10,
                           chunk_size=512)
    return path


def smollm2(workdir: Path) -> Path:
    from tests.fixtures.smollm2 import smollm2_gguf
    return Path(smollm2_gguf(workdir, kind="F16"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1b", help="comma list of smollm2, 1b, or paths to F16 GGUFs")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "qtool-bench-quantize")
    ap.add_argument("--imatrix", action="store_true", help="an importance matrix for every type, not only those "
                                                           "that need one")
    args = ap.parse_args()

    from tests.build_llamacpp import tool_path
    llama = tool_path("llama-quantize")
    if llama is None:
        print("llama-quantize is not built: python tests/build_llamacpp.py", file=sys.stderr)
        return 1
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = []
    for m in args.models.split(","):
        models.append((m, smollm2(args.workdir) if m == "smollm2" else synthetic_1b(args.workdir) if m == "1b"
                       else Path(m)))

    compile_bytecode()
    cold, warm = numba_times(args.threads)
    print(f"numba kernels (all types, both paths): compile from an empty cache {cold:.1f} s, "
          f"load from the cache {warm:.2f} s (included in every qtool run below)")

    # Start-up: the same commands on a ~1 MB model. qtool pays Python, its imports, numba's import and first-use
    # set-up and the kernel loads (~0.8 s here) on every run; llama-quantize a few milliseconds.
    tiny = tiny_model(args.workdir)
    floors: dict[str, dict[str, float]] = {}
    def commands(path: Path, out: Path, qtype: str) -> dict[str, list[str]]:
        im = imatrix_for(path) if args.imatrix or qtype in NEED_IMATRIX else None
        return {"llama": [str(llama), *(["--imatrix", str(im)] if im else []), str(path), str(out), qtype,
                          str(args.threads)],
                "qtool": [sys.executable, "-m", "qtool.cli", "quantize", str(path), str(out), "--type", qtype,
                          "--threads", str(args.threads), "--force", *(["--imatrix", str(im)] if im else [])]}

    for qtype in args.types.split(","):
        floors[qtype] = {}
        out = args.workdir / "out-tiny.gguf"
        for tool, cmd in commands(tiny, out, qtype).items():
            walls = []
            for _ in range(max(3, args.repeats)):
                out.unlink(missing_ok=True)
                walls.append(run_with_rss(cmd, qtool_env(args.threads) if tool == "qtool" else None)[0])
            floors[qtype][tool] = min(walls)
        out.unlink(missing_ok=True)

    rows, ok = [], True
    for label, path in models:
        size = path.stat().st_size
        for qtype in args.types.split(","):
            best = {}
            outs = {"llama": args.workdir / f"out-llama-{qtype}.gguf", "qtool": args.workdir / f"out-qtool-{qtype}.gguf"}
            cmds = {tool: commands(path, outs[tool], qtype)[tool] for tool in outs}
            for r in range(args.repeats):
                order = ["llama", "qtool"] if r % 2 == 0 else ["qtool", "llama"]
                for tool in order:
                    outs[tool].unlink(missing_ok=True)
                    env = qtool_env(args.threads) if tool == "qtool" else None
                    wall, rss, cpu, _ = run_with_rss(cmds[tool], env)
                    prev = best.get(tool)
                    best[tool] = Run(tool, min(wall, prev.wall) if prev else wall,
                                     max(rss, prev.peak_rss) if prev else rss,
                                     min(cpu, prev.cpu) if prev else cpu, outs[tool])
            same = filecmp.cmp(outs["llama"], outs["qtool"], shallow=False)
            ratio = best["qtool"].wall / best["llama"].wall
            ok &= same and ratio <= TARGET
            rows.append((label, size, qtype, best["llama"], best["qtool"], ratio, same, floors[qtype]))
            for o in outs.values():
                o.unlink(missing_ok=True)
            print(f"{label} {qtype}: llama {best['llama'].wall:.2f} s, qtool {best['qtool'].wall:.2f} s, "
                  f"ratio {ratio:.2f}, identical {same}", file=sys.stderr)

    load = os.getloadavg()[0]
    print(f"\nthreads {args.threads}, best of {args.repeats} (wall and CPU = user + system seconds); "
          f"peak RSS = max over runs; load average at the end {load:.1f} on {os.cpu_count()} cores\n")
    header = (f"{'model':<10} {'input MB':>9} {'type':<7} {'llama s':>8} {'qtool s':>8} {'ratio':>6} "
              f"{'llama cpu':>10} {'qtool cpu':>10} {'ratio':>6} {'llama RSS MB':>13} {'qtool RSS MB':>13} "
              f"{'same bytes':>10} {'start-up s':>11} {'past it':>8}")
    print(header)
    print("-" * len(header))
    for label, size, qtype, lr, qr, ratio, same, floor in rows:
        past = (qr.wall - floor["qtool"]) / max(lr.wall - floor["llama"], 1e-9)
        print(f"{label:<10} {size / 1e6:>9.0f} {qtype:<7} {lr.wall:>8.2f} {qr.wall:>8.2f} {ratio:>6.2f} "
              f"{lr.cpu:>10.2f} {qr.cpu:>10.2f} {qr.cpu / max(lr.cpu, 1e-9):>6.2f} "
              f"{lr.peak_rss / 1e6:>13.0f} {qr.peak_rss / 1e6:>13.0f} {'yes' if same else 'NO':>10} "
              f"{floor['llama']:>5.2f}/{floor['qtool']:<5.2f} {past:>8.2f}")
    print("\nstart-up s: llama/qtool wall time on a ~1 MB model (best of 3 or more); "
          "past it: (qtool − its start-up) / (llama − its start-up), the ratio once each tool has started")
    print(f"\ntarget: qtool ≤ {TARGET} × llama-quantize wall time — {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
