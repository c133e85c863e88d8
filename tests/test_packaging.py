"""The wheel is the product: what `pip install qtool` (not `-e`) gives must hold every module and run every command.

The fast tests read pyproject.toml and the source tree: every package folder is listed, every third-party import is a
declared dependency and every declared dependency is used. The slow one builds the wheel, installs it into a fresh
virtual environment (its dependencies from this environment: no network in tests), and runs every subcommand from a
directory outside the checkout — first twice with the installed package on a read-only mount, to show numba's
kernel cache then lives in the user's cache directory and the second run compiles nothing.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import SHARED
from tests.fixtures.checkpoints import make_checkpoint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]

# Declared dependencies that qtool never imports by name, and why they are still needed at run time.
USED_INDIRECTLY = {
    "protobuf": "sentencepiece's sentencepiece_model_pb2 (read and written by convert and export-hf) imports it",
}
# Optional imports: a package of an extra, imported inside a function that falls back when it is missing, and only
# by the files named here (what it buys is said).
OPTIONAL_IMPORTS = {
    "torch": ({"convert/qwen35.py"}, "interop", "ssm_a = -exp(A_log) bit for bit as llama.cpp's converter computes it "
                                                 "(torch's float32 exp is not correctly rounded); without it numpy's, "
                                                 "and the converter says the last bit may differ"),
    "ray": ({"qtool/cluster.py"}, "ray", "qtool run --cluster: imported when --cluster is given, never otherwise"),
}
# Imports of qtool's own code that are not dependencies: the benchmark helper's --ggml mode needs the checkout.
NOT_DEPENDENCIES = {"qtool", "tests"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _package_folders() -> dict[str, Path]:
    """Dotted package name -> folder, for every folder with an __init__.py under the mapped roots."""
    found = {}
    for top in ("qtool", "qtool.convert", "qtool.quantize", "qtool.evaluate"):
        folder = ROOT / SETUPTOOLS["package-dir"][top]
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            if "__pycache__" in rel.parts:
                continue
            dotted = ".".join((top, *rel.parts))
            if top == "qtool" and rel.parts and rel.parts[0] in ("convert", "quantize", "evaluate"):
                continue  # not folders of qtool/ (the stages are mapped from the top level)
            found[dotted] = init.parent
    return found


def test_every_package_folder_is_listed_in_pyproject():
    assert sorted(SETUPTOOLS["packages"]) == sorted(_package_folders())


def _third_party_imports() -> dict[str, set[str]]:
    imports: dict[str, set[str]] = {}
    for folder in _package_folders().values():
        for path in folder.glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in NOT_DEPENDENCIES:
                        imports.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return imports


def _declared() -> set[str]:
    return {_norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) for req in PYPROJECT["project"]["dependencies"]}


def test_every_import_is_a_declared_dependency_and_every_dependency_is_used():
    dists = md.packages_distributions()
    declared = _declared()
    used = set()
    conditional = {_norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0])
                   for req in PYPROJECT["project"]["dependencies"] if ";" in req}   # e.g. tomli before 3.11
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, where in sorted(_third_party_imports().items()):
        if module in OPTIONAL_IMPORTS:
            files, extra, _ = OPTIONAL_IMPORTS[module]
            assert where <= files, f"{module} is optional, imported only by {sorted(files)}, not {sorted(where - files)}"
            assert any(_norm(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]) == _norm(module) for req in extras[extra]), \
                f"{module} must be in the {extra!r} extra"
            continue
        owners = {_norm(d) for d in dists.get(module, [])}
        if not owners and _norm(module) in conditional:
            used.add(_norm(module))
            continue
        assert owners, f"{module} (imported by {sorted(where)}) is not installed"
        hit = owners & declared
        assert hit, f"{module} (imported by {sorted(where)}) comes from {sorted(owners)}, not a declared dependency"
        used |= hit
    unused = declared - used - set(USED_INDIRECTLY)
    assert not unused, f"declared but never imported: {sorted(unused)}"
    test_only = {"pytest", "torch", "transformers"}
    assert not declared & test_only, "test-only packages belong in the extras"


def test_version_is_one_number():
    import qtool

    assert qtool.__version__ == PYPROJECT["project"]["version"] == md.version("qtool")


# --- the built wheel, installed and used ---------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("build")
    # No build isolation: the isolated build would fetch setuptools from the network (the test extra installs it).
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    # the sources only (not the 176 MB llama.cpp tree in .cache/, nor outputs)
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", ".cache", "out", "*.gguf")
    shutil.copytree(ROOT, build / "src", ignore=ignore)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist),
          str(build / "src")], cwd=build, env=env)
    wheels = list(dist.glob("qtool-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_holds_every_module_and_the_real_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for dotted, folder in _package_folders().items():
        for path in folder.glob("*.py"):
            expected.add("/".join(dotted.split(".")) + "/" + path.name)
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
    assert any(n.startswith("qtool/quantize/kernels/") for n in names)
    assert not any(n.startswith(("tests/", "convert/", "quantize/", "evaluate/", "benchmarks/")) for n in names)
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    required = {_norm(re.split(r"[<>=!~;\[ ]", line.split(":", 1)[1].strip(), maxsplit=1)[0])
                for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert required == _declared()


def _venv(tmp: Path, wheel: Path) -> tuple[Path, dict]:
    venv = tmp / "venv"
    # The environment's own packages provide the dependencies (tests never reach the network); the wheel's qtool
    # sits in the venv's site-packages, which comes before them on sys.path.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "NUMBA_CACHE_DIR", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["XDG_CACHE_HOME"] = str(tmp / "user-cache")       # numba's user-wide cache goes here, not in ~/.cache
    env["HF_HUB_OFFLINE"] = env["HF_DATASETS_OFFLINE"] = "1"
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp, env)
    return venv, env


def _site_qtool(venv: Path, env: dict, cwd: Path) -> Path:
    r = _run([str(venv / "bin" / "python"), "-c", "import qtool.quantize.kernels as k, os; print(os.path.dirname("
              "os.path.dirname(os.path.dirname(k.__file__))))"], cwd, env)
    return Path(r.stdout.strip())


def _read_only(cmd: list[str], package_dir: Path) -> list[str]:
    """cmd run with the installed package on a read-only bind mount (root ignores file modes; a mount it obeys)."""
    if os.geteuid() != 0:
        return cmd  # the caller made the folder read-only with chmod
    if not shutil.which("unshare"):
        pytest.fail("running as root and `unshare` (util-linux) is missing: cannot make the install read-only")
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", str(package_dir), *cmd]


@pytest.mark.slow
def test_installed_wheel_runs_every_command_outside_the_checkout(wheel, tmp_path):
    venv, env = _venv(tmp_path, wheel)
    work = tmp_path / "work"
    work.mkdir()
    qtool = str(venv / "bin" / "qtool")
    package_dir = _site_qtool(venv, env, work)
    assert Path(package_dir).is_relative_to(venv), f"qtool imported from {package_dir}, not the wheel's install"
    kernel_cache = package_dir / "quantize" / "kernels" / "__pycache__"
    assert not list(kernel_cache.glob("*.nb[ic]"))

    r = _run([qtool, "--version"], work, env)
    assert PYPROJECT["project"]["version"] in r.stdout

    make_checkpoint("llama-spm", work / "ckpt", hidden_size=256, intermediate_size=512)
    _run([qtool, "convert", "ckpt", "--outfile", "m-f16.gguf", "--outtype", "f16"], work, env)
    info = json.loads(_run([qtool, "info", "m-f16.gguf", "--json"], work, env).stdout)
    assert info

    # Kernels from a read-only install: compiled once into the user's cache directory, loaded from it after.
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(package_dir)], check=True, timeout=60)
    ro_env = {**env, "NUMBA_DEBUG_CACHE": "1"}
    try:
        runs = [_run(_read_only([qtool, "quantize", "m-f16.gguf", f"ro{i}.gguf", "--type", "Q4_K_M"], package_dir),
                     work, ro_env) for i in (1, 2)]
    finally:
        if os.geteuid() != 0:
            subprocess.run(["chmod", "-R", "u+w", str(package_dir)], check=True, timeout=60)
    saved = [ln for ln in runs[0].stdout.splitlines() if "data saved to" in ln]
    assert saved, "the first run from a read-only install cached no kernel:\n" + runs[0].stdout[-2000:]
    assert all(str(tmp_path / "user-cache") in ln for ln in saved), saved[:3]
    assert not any("data saved to" in ln for ln in runs[1].stdout.splitlines()), "the second run compiled again"
    assert any("data loaded from" in ln for ln in runs[1].stdout.splitlines())
    assert not list(kernel_cache.glob("*.nb[ic]"))
    assert (work / "ro1.gguf").read_bytes() == (work / "ro2.gguf").read_bytes()

    text = (SHARED / "data" / "wikitext-2-raw-v1" / "wiki.test.raw").read_text(encoding="utf-8")
    (work / "eval.txt").write_text(text[:20000], encoding="utf-8")
    (work / "calib.txt").write_text((SHARED / "data" / "calibration" / "groups_merged.txt")
                                    .read_text(encoding="utf-8")[:20000], encoding="utf-8")
    _run([qtool, "imatrix", "m-f16.gguf", "--dataset", "calib.txt", "--ctx", "64", "--chunks", "4",
          "-o", "imatrix.gguf"], work, env)
    _run([qtool, "quantize", "m-f16.gguf", "q4km.gguf", "--type", "Q4_K_M", "--imatrix", "imatrix.gguf"], work, env)
    _run([qtool, "quantize", "m-f16.gguf", "q4_0.gguf", "--type", "Q4_0"], work, env)
    _run([qtool, "ppl", "m-f16.gguf", "q4km.gguf", "q4_0.gguf", "--dataset", "eval.txt", "--ctx", "64",
          "--chunks", "2", "--json", "ppl.json"], work, env)
    assert json.loads((work / "ppl.json").read_text())
    r = _run([qtool, "generate", "q4km.gguf", "-p", "The meaning of life", "-n", "4", "--greedy"], work, env)
    assert r.stdout.startswith("The meaning of life")
    _run([qtool, "export-hf", "q4_0.gguf", "hf-out"], work, env)
    assert (work / "hf-out" / "config.json").exists()

    (work / "recipe.toml").write_text(
        '[source]\npath = "ckpt"\n[quantize]\ntypes = ["Q8_0", "Q4_0"]\n'
        '[eval]\ndataset = "eval.txt"\nctx = 64\nchunks = 2\n[output]\ndir = "out"\n')
    _run([qtool, "run", "recipe.toml"], work, env)
    assert json.loads((work / "out" / "report.json").read_text())["passed"] is True
