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


def test_no_timeout_marker_raises_the_limit_past_30_minutes():
    """pytest.mark.timeout(N) on a test or a module overrides the suite's limit: each one stays within 30 minutes too,
    and is a plain number of seconds this rule can read."""
    markers, unreadable = [], []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "timeout"
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "mark"):
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                seconds = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "timeout"),
                                                              None)
                if not isinstance(seconds, ast.Constant) or not isinstance(seconds.value, (int, float)):
                    unreadable.append(where)
                else:
                    markers.append((where, seconds.value))
    assert not unreadable, f"timeout markers whose seconds are not a literal number: {unreadable}"
    too_long = [(where, s) for where, s in markers if not 0 < s <= 1800]
    assert not too_long, f"timeout markers past 30 minutes (or not positive): {too_long}"
    assert markers, "the walk found no timeout marker, not even tests/test_interop_ppl.py's: it reads nothing"


def test_run_logged_runs_a_tool_again_when_its_log_lost_the_end(tmp_path):
    """tests.interop.run_logged: a run that exits 0 without the expected lines (llama.cpp's logger thread lost them)
    is run again; one that exits non-zero fails at once; one that never prints them fails after LOGGED_TRIES."""
    import sys

    import pytest

    from tests.interop import LOGGED_TRIES, run_logged

    count = tmp_path / "runs"
    script = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); n = int(p.read_text() or 0) + 1 if p.exists() else 1;"
              " p.write_text(str(n)); print('eval time = 1 ms / 4 runs' if n >= int(sys.argv[2]) else 'generate:');"
              " sys.exit(int(sys.argv[3]))")
    proc = run_logged([sys.executable, "-c", script, count, 2, 0], expect=(r"/ (\d+) runs",), timeout=60)
    assert b"4 runs" in proc.stdout and count.read_text() == "2"
    count.unlink()
    with pytest.raises(pytest.fail.Exception, match="exited 0 3 times without printing"):
        run_logged([sys.executable, "-c", script, count, 99, 0], expect=(r"/ (\d+) runs",), timeout=60)
    assert count.read_text() == str(LOGGED_TRIES)
    count.unlink()
    with pytest.raises(AssertionError):
        run_logged([sys.executable, "-c", script, count, 1, 3], expect=(r"/ (\d+) runs",), timeout=60)
    assert count.read_text() == "1"
