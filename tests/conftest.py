from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.exists():  # CI lays shared/ beside the clone
    SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VOCAB_DIR = SHARED / "data" / "vocab"


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    if not VOCAB_DIR.exists():
        pytest.fail(f"shared vocab data not found at {VOCAB_DIR}")
    return VOCAB_DIR


from tests.fixtures.conftest_helpers import checkpoint_factory, hf_checkpoint  # noqa: E402,F401
