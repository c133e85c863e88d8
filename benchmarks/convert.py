#!/usr/bin/env python3
"""Side-by-side benchmark: ``qtool convert`` against llama.cpp's ``convert_hf_to_gguf.py``.

    python benchmarks/convert.py                     # 8-layer Llama-2-7B-shaped checkpoint, ~3.8 GB
    python benchmarks/convert.py --layers 2 --hidden 1024 --repeats 1    # quick smoke run

Both converters run as subprocesses on the same synthetic checkpoint (Llama-2-7B shapes, fewer layers,
the real Llama-2 SentencePiece vocab from ``tests.fixtures.tokenizers``), each ``--repeats`` times in
alternating order. For every run it records wall time, CPU time and the peak RSS of the child process
tree (the kernel's high-water mark via ``/usr/bin/time -v``, or ``getrusage(RUSAGE_CHILDREN)`` in a
fresh intermediate process; plus a sampled sum over the whole tree split into anonymous and
file-backed pages). It then checks the two GGUFs hold identical tensors (name, type, shape, bytes) --
a speed comparison of programs that write different files would be worthless -- and prints a table
with the ratios qtool / llama.cpp and qtool's memory target (peak RSS < 2 x largest tensor + 300 MB).

Units: MB = 10^6 bytes, s = seconds. The checkpoint is kept in ``--workdir`` and reused by later runs
with the same shape options; the output GGUFs are deleted unless ``--keep``.

Exit code: 0 when every run succeeded, the tensors are identical and qtool meets the target; 1 otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import qtool  # noqa: E402
from benchmarks._measure import BLAS_LIBRARY_PROBE  # noqa: E402

# Where the llama-cpp-python 0.3.36 sdist was unpacked by hand before tests/llamacpp.py existed.
FALLBACK_LLAMACPP = Path("/tmp/llsrc/llama_cpp_python-0.3.36/vendor/llama.cpp")
# House rule: these make numpy's bundled OpenBLAS pick a slow kernel on these machines.
UNSET_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
MB = 1_000_000
TIME_BIN = "/usr/bin/time"

VOCAB_SIZE = 32000  # Llama-2's SentencePiece vocabulary


def log(msg: str = "") -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------

def _meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


# Run in a child with the converters' environment so it reports the BLAS kernel *they* get.
_BLAS_PROBE = BLAS_LIBRARY_PROBE + r"""
try:
    import threadpoolctl
    out["threadpoolctl"] = [
        {k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
        for d in threadpoolctl.threadpool_info()]
except ImportError:
    pass
try:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    out["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
except Exception:
    pass
print(json.dumps(out))
"""


def machine_report(env: dict[str, str], workdir: Path) -> list[str]:
    lines = []
    aff = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"machine   : {_cpu_model()}; nproc {aff} (cpu_count {os.cpu_count()}); "
                 f"RAM {_meminfo_kb('MemTotal') / 1024**2:.1f} GiB total, "
                 f"{_meminfo_kb('MemAvailable') / 1024**2:.1f} GiB available")
    du = shutil.disk_usage(workdir)
    lines.append(f"disk      : {workdir} -- {du.free / 1e9:.1f} GB free of {du.total / 1e9:.1f} GB")
    lines.append(f"software  : Python {platform.python_version()} ({platform.system()} {platform.release()}); "
                 f"numpy {_version('numpy')}, gguf {_version('gguf')}, safetensors {_version('safetensors')}, "
                 f"torch {_version('torch')}, transformers {_version('transformers')}, "
                 f"qtool {_version('qtool')}")
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"qtool repo: {REPO_ROOT} @ {rev or '?'}{' (+ uncommitted changes)' if dirty else ''}")
    except (OSError, subprocess.SubprocessError):
        pass
    parent_vals = ", ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in UNSET_ENV)
    try:
        probe = subprocess.run([sys.executable, "-c", _BLAS_PROBE], env=env, capture_output=True,
                               text=True, timeout=60)
        info = json.loads(probe.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001 - purely informative
        info = {"error": str(e)}
    if "threadpoolctl" in info:
        blas = "; ".join(f"{d['internal_api']} {d['version']} kernel={d['architecture']} "
                         f"threads={d['num_threads']}" for d in info["threadpoolctl"]) or "none loaded"
        lines.append(f"BLAS      : (threadpoolctl) {blas}")
    else:
        lines.append(f"BLAS      : (threadpoolctl not installed; read from the library) "
                     f"{info.get('numpy_blas', '?')}, kernel={info.get('corename', '?')}, "
                     f"threads={info.get('threads', '?')}; config: {info.get('config', '?')}")
    lines.append(f"BLAS env  : converters run with `env {' '.join('-u ' + k for k in UNSET_ENV)}` "
                 f"(this shell: {parent_vals})")
    return lines


# ------------------------------------------------------------------------------------------------
# synthetic checkpoint
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    dtype: str  # "float16" | "bfloat16"
    shards: int
    seed: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """The HF Llama state dict in module order (the order transformers fills shards in)."""
        H, F, V = self.hidden, self.intermediate, self.vocab
        kv = H // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, H))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + "self_attn.q_proj.weight", (H, H)), (p + "self_attn.k_proj.weight", (kv, H)),
                    (p + "self_attn.v_proj.weight", (kv, H)), (p + "self_attn.o_proj.weight", (H, H)),
                    (p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H)),
                    (p + "mlp.down_proj.weight", (H, F)),
                    (p + "input_layernorm.weight", (H,)), (p + "post_attention_layernorm.weight", (H,))]
        out += [("model.norm.weight", (H,)), ("lm_head.weight", (V, H))]
        return out

    def nbytes(self) -> int:
        return sum(math.prod(s) * 2 for _, s in self.tensors())

    def dirname(self) -> str:
        return (f"llama2-L{self.layers}-H{self.hidden}-F{self.intermediate}-A{self.heads}-KV{self.kv_heads}"
                f"-{self.dtype}-{self.shards}shards-seed{self.seed}")

    def config(self) -> dict:
        # meta-llama/Llama-2-7b-hf's config.json, key for key, with the depth (and optionally width) changed
        return {
            "_name_or_path": "meta-llama/Llama-2-7b-hf",
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate,
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers,
            "num_key_value_heads": self.kv_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "tie_word_embeddings": False,
            "torch_dtype": self.dtype,
            "transformers_version": "4.31.0.dev0",
            "use_cache": True,
            "vocab_size": self.vocab,
        }


GENERATION_CONFIG = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "pad_token_id": 0,
                     "temperature": 0.6, "max_length": 4096, "top_p": 0.9,
                     "transformers_version": "4.31.0.dev0"}

_CHUNK_ELEMS = 8 << 20  # 8M values (32 MB of float32) per generation step


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch rounds; no NaNs here)."""
    u = x.view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def _fill_random(out: np.ndarray, name: str, shape: Shape) -> None:
    """Fill ``out`` (float16, or uint16 bf16 bits) with N(0, 0.02), norms 1 + N(0, 0.1), chunk by chunk,
    so no full-size float32/float64 temporary ever exists. Deterministic per (seed, name)."""
    rng = np.random.default_rng(np.random.SeedSequence([shape.seed, zlib.crc32(name.encode())]))
    is_norm = name.endswith("norm.weight")
    flat = out.reshape(-1)
    for start in range(0, flat.size, _CHUNK_ELEMS):
        n = min(_CHUNK_ELEMS, flat.size - start)
        x = rng.standard_normal(n, dtype=np.float32)
        if is_norm:
            x *= np.float32(0.1)
            x += np.float32(1.0)
        else:
            x *= np.float32(0.02)
        flat[start:start + n] = _bf16_bits(x) if shape.dtype == "bfloat16" else x


def _save_shard(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    if dtype == "float16":
        from safetensors.numpy import save_file

        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        # numpy has no bfloat16: hand the uint16 bit patterns to the same serializer save_file
        # uses, labelled BF16 (save_file itself would label them U16).
        from safetensors import TensorSpec, serialize_file

        specs = {k: TensorSpec(dtype="bfloat16", shape=v.shape, data_ptr=v.ctypes.data, data_len=v.nbytes)
                 for k, v in tensors.items()}
        serialize_file(specs, str(path), metadata={"format": "pt"})


def _shard_groups(items: list[tuple[str, int]], n: int) -> list[list[str]]:
    limit = math.ceil(sum(b for _, b in items) / n)
    groups: list[list[str]] = [[]]
    cur = 0
    for name, b in items:
        if groups[-1] and cur + b > limit and len(groups) < n:
            groups.append([])
            cur = 0
        groups[-1].append(name)
        cur += b
    return groups


def _write_tokenizer(outdir: Path, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            from tests.fixtures.tokenizers import write_hf_tokenizer
            break
        except ImportError as e:
            if time.monotonic() > deadline:
                raise SystemExit(f"tests.fixtures.tokenizers.write_hf_tokenizer is not available: {e}")
            log(f"  tests/fixtures/tokenizers.py not importable yet ({e}); retrying in 60 s")
            time.sleep(60)
    write_hf_tokenizer("llama-spm", outdir)


def ensure_checkpoint(shape: Shape, workdir: Path, wait_s: float) -> Path:
    ckpt = workdir / shape.dirname()
    marker = ckpt / ".benchmark-complete.json"
    params = {"shape": shape.__dict__, "generator": 1}
    if marker.exists() and json.loads(marker.read_text()) == params:
        log(f"checkpoint: reusing {ckpt}")
        return ckpt
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    t0 = time.perf_counter()
    log(f"checkpoint: writing {shape.nbytes() / MB:,.0f} MB into {ckpt} ...")
    _write_tokenizer(ckpt, wait_s)
    (ckpt / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    (ckpt / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")

    specs = dict(shape.tensors())
    groups = _shard_groups([(n, math.prod(s) * 2) for n, s in specs.items()], shape.shards)
    np_dtype = np.float16 if shape.dtype == "float16" else np.uint16
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        # save_file takes a whole dict, so one shard is in memory at a time (~total / shards).
        tensors = {}
        for name in group:
            arr = np.empty(specs[name], dtype=np_dtype)
            _fill_random(arr, name, shape)
            tensors[name] = arr
            weight_map[name] = fname
        _save_shard(ckpt / fname, tensors, shape.dtype)
        del tensors
        log(f"  {fname}: {len(group)} tensors, {(ckpt / fname).stat().st_size / MB:,.0f} MB")
    index = {"metadata": {"total_size": shape.nbytes()}, "weight_map": dict(sorted(weight_map.items()))}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    marker.write_text(json.dumps(params))
    log(f"  done in {time.perf_counter() - t0:.1f} s")
    return ckpt


# ------------------------------------------------------------------------------------------------
# measuring one run
# ------------------------------------------------------------------------------------------------

# Fallback when /usr/bin/time is missing: a fresh intermediate process whose RUSAGE_CHILDREN covers
# exactly this one run (ru_maxrss of the largest process in the tree that was waited for).
_RUSAGE_WRAPPER = r"""
import json, resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kb": ru.ru_maxrss, "user": ru.ru_utime, "sys": ru.ru_stime,
               "majflt": ru.ru_majflt, "inblock": ru.ru_inblock}, f)
sys.exit(rc)
"""


class TreeSampler(threading.Thread):
    """Polls /proc for the summed RSS (total / anonymous / file-backed) of a process tree."""

    def __init__(self, root_pid: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.root = root_pid
        self.interval = interval
        self.stop_evt = threading.Event()
        self.peak = {"rss": 0, "anon": 0, "file": 0, "procs": 0}

    def _children(self, pid: int) -> list[int]:
        kids: list[int] = []
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
        return kids

    def _sample(self) -> None:
        # the root is /usr/bin/time or the rusage wrapper: count only what it runs
        todo, seen = self._children(self.root), set()
        tot = {"rss": 0, "anon": 0, "file": 0}
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        k, _, v = line.partition(":")
                        if k == "VmRSS":
                            tot["rss"] += int(v.split()[0]) * 1024
                        elif k == "RssAnon":
                            tot["anon"] += int(v.split()[0]) * 1024
                        elif k in ("RssFile", "RssShmem"):
                            tot["file"] += int(v.split()[0]) * 1024
            except OSError:
                continue
            todo += self._children(pid)
        for k, v in tot.items():
            self.peak[k] = max(self.peak[k], v)
        self.peak["procs"] = max(self.peak["procs"], len(seen))

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self._sample()
            self.stop_evt.wait(self.interval)

    def stop(self) -> dict[str, int]:
        self.stop_evt.set()
        self.join()
        return self.peak


@dataclass
class Run:
    tool: str
    index: int
    rc: int = -1
    wall: float = float("nan")
    cpu: float = float("nan")
    user: float = float("nan")
    sys: float = float("nan")
    maxrss: int = 0  # bytes, kernel high-water mark of the largest process in the tree
    tree: dict = field(default_factory=dict)  # sampled sums over the tree
    majflt: int = 0
    log: Path | None = None
    cold: bool = False

    @property
    def ok(self) -> bool:
        return self.rc == 0


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure(tool: str, index: int, cmd: list[str], env: dict[str, str], cwd: Path, logfile: Path,
            cold: bool, timeout: float) -> Run:
    run = Run(tool, index, log=logfile)
    subprocess.run(["sync"], check=False)  # earlier outputs' writeback must not land in this run
    run.cold = cold and drop_caches()
    statfile = logfile.with_suffix(".rusage")
    statfile.unlink(missing_ok=True)
    if os.access(TIME_BIN, os.X_OK):
        full = [TIME_BIN, "-v", "-o", str(statfile), *cmd]
    else:
        full = [sys.executable, "-c", _RUSAGE_WRAPPER, str(statfile), *cmd]
    with open(logfile, "w") as lf:
        lf.write("$ " + " ".join(cmd) + "\n")
        lf.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, cwd=str(cwd), env=env, stdout=lf, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid)
        sampler.start()
        try:
            run.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            run.rc = proc.wait()
            lf.write(f"\n[benchmark] killed after {timeout:.0f} s\n")
        run.wall = time.perf_counter() - t0
        run.tree = sampler.stop()
    if statfile.exists():
        text = statfile.read_text()
        if full[0] == TIME_BIN:
            vals = {}
            for line in text.splitlines():
                k, _, v = line.strip().rpartition(": ")
                vals[k] = v
            run.maxrss = int(vals.get("Maximum resident set size (kbytes)", 0)) * 1024
            run.user = float(vals.get("User time (seconds)", "nan"))
            run.sys = float(vals.get("System time (seconds)", "nan"))
            run.cpu = run.user + run.sys
            run.majflt = int(vals.get("Major (requiring I/O) page faults", 0))
        else:
            vals = json.loads(text)
            run.maxrss = int(vals["maxrss_kb"]) * 1024
            run.user, run.sys = vals["user"], vals["sys"]
            run.cpu = run.user + run.sys
            run.majflt = int(vals["majflt"])
    return run


def tail(path: Path, n: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------
# comparing outputs
# ------------------------------------------------------------------------------------------------

def _field_value(f):
    import gguf

    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - older gguf versions
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        return [p.tolist() for p in (f.parts[i] for i in f.data)]


def _extent(reader, t) -> int:
    """Bytes from this tensor's data offset to the next tensor's (or n_bytes, whichever is smaller for
    the last tensor / padding): the header's own size claim for the data, minus alignment padding."""
    offsets = sorted(int(x.data_offset) for x in reader.tensors)
    i = offsets.index(int(t.data_offset))
    end = offsets[i + 1] if i + 1 < len(offsets) else len(reader.data)
    n = int(t.n_bytes)
    return n if n <= end - int(t.data_offset) and end - int(t.data_offset) - n < 64 else end - int(t.data_offset)


def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison (name, type, shape, bytes) plus metadata and whole-file checks."""
    import gguf

    ra, rb = gguf.GGUFReader(str(a)), gguf.GGUFReader(str(b))
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    same_order = [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    identical, data_equal, problems = 0, 0, []
    chunk = 64 << 20
    for name, t in ta.items():
        u = tb.get(name)
        if u is None:
            problems.append(f"{name}: only in qtool's file")
            continue
        sa, sb = [int(x) for x in t.shape], [int(x) for x in u.shape]
        head_same = t.tensor_type == u.tensor_type and sa == sb
        what = (f"qtool {t.tensor_type.name}{sa} vs llama.cpp {u.tensor_type.name}{sb}"
                if not head_same else f"{t.tensor_type.name}{sa}")
        # the data region of a tensor runs to the next tensor's offset: compare that many bytes,
        # so data can be judged even when a header's shape (and so n_bytes) is wrong
        na, nb = _extent(ra, t), _extent(rb, u)
        if na != nb:
            problems.append(f"{name}: {what}; data {na:,} vs {nb:,} bytes")
            continue
        da = ra.data[t.data_offset:t.data_offset + na]
        db = rb.data[u.data_offset:u.data_offset + nb]
        data_same = all(np.array_equal(da[i:i + chunk], db[i:i + chunk]) for i in range(0, na, chunk))
        data_equal += data_same
        if head_same and data_same:
            identical += 1
        elif data_same:
            problems.append(f"{name}: {what} (tensor data bytes equal)")
        else:
            problems.append(f"{name}: {what}; data bytes differ")
    problems += [f"{n}: only in llama.cpp's file" for n in tb if n not in ta]
    skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    fa = {k: _field_value(f) for k, f in ra.fields.items() if k not in skip}
    fb = {k: _field_value(f) for k, f in rb.fields.items() if k not in skip}
    kv_diff = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<missing>") != fb.get(k, "<missing>"))
    # from llama.cpp's file, the reference (qtool's header is what is being checked)
    largest = max((int(t.n_bytes), t.name) for t in rb.tensors) if rb.tensors else (0, "?")
    del ra, rb
    # whole files: are they the same bytes altogether (metadata, alignment, order included)?
    size_a, size_b = a.stat().st_size, b.stat().st_size
    files_same = size_a == size_b
    if files_same:
        with open(a, "rb") as fa_, open(b, "rb") as fb_:
            while files_same:
                x, y = fa_.read(chunk), fb_.read(chunk)
                if x != y:
                    files_same = False
                if not x:
                    break
    return {"n_a": len(ta), "n_b": len(tb), "identical": identical, "data_equal": data_equal,
            "problems": problems,
            "same_order": same_order, "kv_diff": kv_diff, "kv_a": fa, "kv_b": fb,
            "largest": largest, "files_same": files_same, "size_a": size_a, "size_b": size_b}


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------

def find_llamacpp() -> Path | None:
    try:
        from tests.llamacpp import llamacpp_dir

        d = llamacpp_dir()
        if d is not None:
            return Path(d)
    except ImportError:
        pass
    return FALLBACK_LLAMACPP if (FALLBACK_LLAMACPP / "convert_hf_to_gguf.py").is_file() else None


def llamacpp_env(tree: Path, base: dict[str, str]) -> dict[str, str]:
    try:
        from tests.llamacpp import converter_env

        return converter_env(tree, base)
    except ImportError:
        env = dict(base)
        env.pop("NO_LOCAL_GGUF", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree / "gguf-py"), env.get("PYTHONPATH")]))
        env["HF_HUB_OFFLINE"] = env["TRANSFORMERS_OFFLINE"] = "1"
        return env


def qtool_cmd() -> list[str]:
    exe = shutil.which("qtool")
    return [exe] if exe else [sys.executable, "-c", "import sys; from qtool.cli import main; sys.exit(main())"]


def fmt_mb(b: float) -> str:
    return f"{b / MB:,.0f}" if b else "-"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "qtool-bench-convert"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=default_workdir(),
                    help="where the checkpoint (reused if already there) and outputs go")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=None,
                    help="default: Llama's rule, 8/3 x hidden rounded up to 256 (11008 for 4096)")
    ap.add_argument("--heads", type=int, default=None, help="default: hidden / 128 (32 for 4096)")
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA, like Llama-2-7B)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                    help="checkpoint weight dtype (Llama-2-7b-hf ships float16)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--outtype", default="f16", help="passed to both converters")
    ap.add_argument("--repeats", type=int, default=2, help="runs per tool (alternating order)")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="cold: drop the page cache before every run (needs root); warm: read the "
                         "checkpoint once first and keep it cached")
    ap.add_argument("--skip-llamacpp", action="store_true", help="measure qtool only")
    ap.add_argument("--keep", action="store_true", help="keep the output GGUFs (the checkpoint is always kept)")
    ap.add_argument("--timeout", type=float, default=3600, help="per run, seconds")
    ap.add_argument("--wait-fixtures", type=float, default=0,
                    help="seconds to wait for tests/fixtures/tokenizers.py to appear")
    a = ap.parse_args(argv)
    a.intermediate = a.intermediate or 256 * math.ceil(8 * a.hidden / 3 / 256)
    a.heads = a.heads or max(1, a.hidden // 128)
    a.kv_heads = a.kv_heads or a.heads
    if a.hidden % a.heads or a.heads % a.kv_heads:
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    shape = Shape(a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads, VOCAB_SIZE, a.dtype, a.shards, a.seed)
    workdir = a.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    base_env = qtool.foreign_env()      # without the thread settings importing qtool added
    for k in UNSET_ENV:
        base_env.pop(k, None)
    base_env.setdefault("PYTHONUNBUFFERED", "1")

    log("== qtool convert vs llama.cpp convert_hf_to_gguf.py ==")
    for line in machine_report(base_env, workdir):
        log(line)

    tree = None if a.skip_llamacpp else find_llamacpp()
    if not a.skip_llamacpp and tree is None:
        log("llama.cpp tree not found (run tests/fetch_llamacpp.py); measuring qtool only")
    if tree is not None:
        log(f"llama.cpp : {tree}/convert_hf_to_gguf.py (gguf-py from {tree / 'gguf-py'})")

    need = shape.nbytes() * (1 + (2 if tree else 1))
    ckpt_dir = workdir / shape.dirname()
    have = shutil.disk_usage(workdir).free + (shape.nbytes() if ckpt_dir.exists() else 0)
    if need > have * 0.95:
        log(f"not enough disk: need ~{need / 1e9:.1f} GB in {workdir}, {have / 1e9:.1f} GB free")
        return 1

    log(f"model     : Llama-2-7B shapes, {shape.layers} layers, hidden {shape.hidden}, ffn {shape.intermediate}, "
        f"{shape.heads} heads ({shape.kv_heads} kv), vocab {shape.vocab}, {shape.dtype}, "
        f"{shape.shards} safetensors shards, seed {shape.seed}: {shape.nbytes() / MB:,.0f} MB of weights")
    ckpt = ensure_checkpoint(shape, workdir, a.wait_fixtures)

    outputs = {"qtool": workdir / f"out-qtool-{a.outtype}.gguf"}
    cmds = {"qtool": [*qtool_cmd(), "convert", str(ckpt), "--outfile", str(outputs["qtool"]),
                      "--outtype", a.outtype, "--force"]}
    envs = {"qtool": base_env}
    cwds = {"qtool": REPO_ROOT}
    if tree is not None:
        outputs["llama.cpp"] = workdir / f"out-llamacpp-{a.outtype}.gguf"
        cmds["llama.cpp"] = [sys.executable, str(tree / "convert_hf_to_gguf.py"), str(ckpt),
                             "--outfile", str(outputs["llama.cpp"]), "--outtype", a.outtype]
        envs["llama.cpp"] = llamacpp_env(tree, base_env)
        cwds["llama.cpp"] = tree
    tools = list(cmds)
    unset = " ".join(f"-u {k}" for k in UNSET_ENV)
    for t in tools:
        extra = ""
        if t == "llama.cpp":
            extra = f"PYTHONPATH={envs[t]['PYTHONPATH']} HF_HUB_OFFLINE=1 "
        log(f"command   : [{t}] (cd {cwds[t]} && env {unset} {extra}{' '.join(cmds[t])})")

    cold = a.cache == "cold"
    if cold and not drop_caches():
        log("cache     : cannot drop the page cache here (not root?): falling back to warm runs")
        cold = False
    if not cold:
        # one untimed read so every timed run starts from the same (cached) state
        for p in sorted(ckpt.iterdir()):
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass
    log(f"cache     : {'cold -- sync + drop_caches before every run (weights come from disk)' if cold else 'warm -- checkpoint read once beforehand, stays in page cache'}; "
        f"order alternates between repeats; sync before each run")
    log(f"RSS       : peak = kernel high-water mark of the largest process in the tree "
        f"({'/usr/bin/time -v' if os.access(TIME_BIN, os.X_OK) else 'getrusage(RUSAGE_CHILDREN) in a fresh wrapper'}); "
        f"tree/anon/file = sums over the tree sampled every 50 ms")
    log("")

    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    runs: list[Run] = []
    for rep in range(a.repeats):
        order = tools if rep % 2 == 0 else tools[::-1]
        for t in order:
            outputs[t].unlink(missing_ok=True)
            logfile = logs / f"{t.replace('.', '')}-run{rep + 1}.log"
            r = measure(t, rep + 1, cmds[t], envs[t], cwds[t], logfile, cold, a.timeout)
            runs.append(r)
            status = "ok" if r.ok and outputs[t].exists() else f"FAILED (exit {r.rc}; log {logfile})"
            log(f"run {rep + 1} {t:<9}: {r.wall:7.1f} s wall, {r.cpu:5.1f} s CPU ({r.user:.1f} user + {r.sys:.1f} sys), peak RSS {fmt_mb(r.maxrss)} MB "
                f"(tree {fmt_mb(r.tree.get('rss', 0))}, anon {fmt_mb(r.tree.get('anon', 0))}, "
                f"file {fmt_mb(r.tree.get('file', 0))} MB; {r.tree.get('procs', 0)} proc), "
                f"{r.majflt} major faults -- {status}")
            if not (r.ok and outputs[t].exists()):
                r.rc = r.rc if r.rc else 1
                log(tail(logfile))
    log("")

    ok_runs = {t: [r for r in runs if r.tool == t and r.ok] for t in tools}
    all_ok = all(r.ok for r in runs)

    # --- identical output? ---
    cmp = None
    if "llama.cpp" in tools and all(outputs[t].exists() for t in tools):
        log("comparing outputs tensor by tensor (gguf.GGUFReader: name, type, shape, bytes) ...")
        cmp = compare_outputs(outputs["qtool"], outputs["llama.cpp"])
        log(f"identical tensors: {cmp['identical']}/{max(cmp['n_a'], cmp['n_b'])}"
            f"{'' if cmp['same_order'] else ' (tensor order differs)'}")
        for p in cmp["problems"][:10]:
            log(f"  DIFF {p}")
        if len(cmp["problems"]) > 10:
            log(f"  ... and {len(cmp['problems']) - 10} more")
        if cmp["identical"] != cmp["data_equal"]:
            log(f"tensor data bytes equal (headers aside): {cmp['data_equal']}/{max(cmp['n_a'], cmp['n_b'])}")
        if cmp["kv_diff"]:
            log(f"metadata keys that differ ({len(cmp['kv_diff'])}): ")
            for k in cmp["kv_diff"][:10]:
                va, vb = (repr(c.get(k, "<missing>"))[:80] for c in (cmp["kv_a"], cmp["kv_b"]))
                log(f"  {k}: qtool {va} | llama.cpp {vb}")
        else:
            log("metadata: all KV pairs equal")
        log(f"whole files byte-identical: {'yes' if cmp['files_same'] else 'no'} "
            f"({cmp['size_a']:,} vs {cmp['size_b']:,} bytes)")
        log("")

    # --- largest tensor & target ---
    # from llama.cpp's output (the reference) when there is one, else from the checkpoint's shapes
    largest_bytes, largest_name = (cmp["largest"] if cmp else (0, "?"))
    if not largest_bytes:
        per_value = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}.get(a.outtype.lower(), 2.0)
        largest_bytes, largest_name = max((int(math.prod(s) * per_value), n) for n, s in shape.tensors())

    # --- table ---
    rows = []
    best = {}
    for t in tools:
        rs = ok_runs[t]
        size = outputs[t].stat().st_size if outputs[t].exists() else 0
        if rs:
            best[t] = (min(r.wall for r in rs), min(r.maxrss for r in rs), min(r.cpu for r in rs), size)
            walls = " / ".join(f"{r.wall:.1f}" for r in runs if r.tool == t)
            rsss = " / ".join(fmt_mb(r.maxrss) for r in runs if r.tool == t)
            rows.append([t, f"{best[t][0]:.1f}", walls, f"{best[t][2]:.1f}", fmt_mb(best[t][1]), rsss,
                         fmt_mb(max(r.tree.get("anon", 0) for r in rs)), fmt_mb(size)])
        else:
            rows.append([t, "failed", "", "", "", "", "", fmt_mb(size)])
    if "qtool" in best and "llama.cpp" in best:
        q, l = best["qtool"], best["llama.cpp"]
        rows.append(["ratio qtool/llama.cpp", f"{q[0] / l[0]:.2f}x", "", f"{q[2] / l[2]:.2f}x",
                     f"{q[1] / l[1]:.2f}x", "", "", f"{q[3] / l[3]:.2f}x" if l[3] else ""])
    log(table(rows, ["tool", "best wall s", "all wall s", "best CPU s", "best peak RSS MB", "all peak RSS MB",
                     "anon peak MB", "output MB"]))
    log("")

    target_ok = False
    limit = 2 * largest_bytes + 300 * MB
    log(f"largest tensor: {largest_name}, {largest_bytes / MB:,.1f} MB -> target peak RSS < 2 x "
        f"{largest_bytes / MB:,.1f} + 300 = {limit / MB:,.0f} MB")
    if ok_runs["qtool"]:
        worst = max(r.maxrss for r in ok_runs["qtool"])
        target_ok = worst < limit
        log(f"qtool peak RSS (worst of {len(ok_runs['qtool'])} runs) {worst / MB:,.0f} MB: "
            f"{'PASS' if target_ok else 'FAIL'}")
    else:
        log("qtool: no successful run -- target not checked (FAIL)")
    if cmp is not None:
        log(f"identical tensors: {cmp['identical']}/{max(cmp['n_a'], cmp['n_b'])}")

    if a.keep:
        log(f"kept: {', '.join(str(p) for p in outputs.values() if p.exists())}")
    else:
        for p in outputs.values():
            p.unlink(missing_ok=True)
    log(f"checkpoint kept for reuse: {ckpt} ({shape.nbytes() / MB:,.0f} MB; `rm -r {workdir}` to free it); "
        f"logs in {logs}")
    same = cmp is None or (cmp["identical"] == cmp["n_a"] == cmp["n_b"])
    return 0 if (all_ok and same and target_ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
