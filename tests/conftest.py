from pathlib import Path

import pytest

import qtool  # noqa: F401  first, so its thread settings reach OpenBLAS and OpenMP before numpy loads them

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # CI lays shared/ beside the clone
    SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOCAB_DIR = SHARED / "data" / "vocab"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--allow-skip-interop", action="store_true",
                     help="skip (instead of failing) comparison tests whose llama.cpp tools, reference packages or "
                          "model are missing")


def pytest_configure(config: pytest.Config) -> None:
    import tests.interop

    tests.interop.ALLOW_SKIP = config.getoption("--allow-skip-interop")


# The files that take longest, longest first (minutes with two xdist workers on 2 AVX2 Zen 3 cores, 2026-12-06:
# 26, 23, 11, 8, 4.5, 4, 5.5, 3, 3, 3, 2). xdist hands each worker whole files (--dist loadfile) in collection order
# (--no-loadscope-reorder; its own reordering by test count started test_interop_ppl.py, 2 tests, 46 minutes into a
# 57-minute run), so these start first and the short files fill in around them. Files not listed keep pytest's
# order after these; within a file the order never changes.
LONGEST_FIRST = ("test_interop_quantize.py", "test_interop_convert.py", "test_interop_ppl.py", "test_matvec.py",
                 "test_formats.py", "test_export_hf.py", "test_demo.py", "test_qdot.py", "test_convert_qwen35.py",
                 "test_convert_moe.py", "test_packaging.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: files stay whole and in order


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    if not VOCAB_DIR.exists():
        pytest.fail(f"shared vocab data not found at {VOCAB_DIR}")
    return VOCAB_DIR


@pytest.fixture(scope="session")
def ggml():
    """libggml built from the pinned llama.cpp tree: kernel tests compare with its ggml_quantize_chunk."""
    from tests import ggml_ref

    ggml_ref.require()
    return ggml_ref


from tests.fixtures.conftest_helpers import checkpoint_factory, hf_checkpoint  # noqa: E402,F401


# --- disk hygiene -------------------------------------------------------------------------------------------------
# A full run writes tens of GB of models (SmolLM2 quants, llama.cpp's outputs beside ours). pytest removes a passed
# test's tmp_path (tmp_path_retention_policy = "failed" in pyproject.toml); what module fixtures made with
# tmp_path_factory goes when the module ends, so the suite never holds more than one module's files at a time.
# The session fixtures of this conftest keep theirs. QTOOL_KEEP_TMP=1 keeps everything for debugging.
_SESSION_DIRS = ("hf_checkpoints",)


@pytest.fixture(scope="module", autouse=True)
def _module_scratch_cleanup(tmp_path_factory: pytest.TempPathFactory):
    import os
    import shutil

    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if os.environ.get("QTOOL_KEEP_TMP"):
        return
    for entry in set(base.iterdir()) - before:
        if not entry.name.startswith(_SESSION_DIRS):
            shutil.rmtree(entry, ignore_errors=True)
