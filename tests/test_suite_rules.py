"""Rules the test suite keeps so that it cannot pass by skipping or hang CI: checked on its own source."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# The skips that are by design, file name -> reason (none today). Anything else that is missing is
# tests.interop.unavailable(): a failure unless --allow-skip-interop.
BY_DESIGN_SKIPS: dict[str, str] = {}
RUNNERS = ("run", "call", "check_call", "check_output", "Popen")


def _sources():
    for path in sorted(TESTS.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"))


def test_every_subprocess_a_test_starts_has_a_timeout():
    missing = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RUNNERS
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"
                    and not any(k.arg == "timeout" for k in node.keywords)):
                missing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not missing, f"subprocess calls without a timeout: {missing}"


def test_only_tests_interop_decides_to_skip():
    found = []
    for path, tree in _sources():
        if path.name in ("interop.py", Path(__file__).name):
            continue
        for node in ast.walk(tree):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if name in ("skip", "skipif", "importorskip", "xfail") and path.name not in BY_DESIGN_SKIPS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, f"skips outside tests/interop.py (use unavailable/need_tool/need_module): {found}"


def test_the_time_limit_is_on():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert 0 < int(options["timeout"]) <= 1800
