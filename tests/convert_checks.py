"""What the convert error tests share: broken copies of fixture checkpoints, and the one-line refusal check."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from qtool.cli import main
from tests.fixtures.checkpoints import DROP, read_checkpoint_tensors, write_safetensors


def fails(model_dir: Path, out_dir: Path, *extra: str, expect: str) -> str:
    """`qtool convert` exits 2 with one stderr line containing `expect`, no traceback, and nothing left in out_dir."""
    out_dir.mkdir(exist_ok=True)
    before = set(out_dir.iterdir())
    result = CliRunner().invoke(main, ["convert", str(model_dir), "--outfile", str(out_dir / "m.gguf"), *extra],
                                catch_exceptions=False)
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert expect in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert set(out_dir.iterdir()) == before, "a file was left behind"
    return lines[0]


def edited(checkpoint_factory, variant: str, tmp_path: Path, **changes) -> Path:
    """A copy of a fixture whose config.json (only) is changed; DROP deletes a key."""
    d = tmp_path / "model"
    shutil.copytree(checkpoint_factory(variant), d)
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def single_file_copy(checkpoint_factory, variant: str, tmp_path: Path) -> Path:
    """A writable single-file copy of a fixture, to be broken by the test."""
    d = tmp_path / "model"
    shutil.copytree(checkpoint_factory(variant, fmt="safetensors"), d)
    return d


def rewrite_tensors(d: Path, edit) -> None:
    """Reads the single-file checkpoint in `d`, lets `edit` change the name -> array dict, writes it back."""
    tensors = read_checkpoint_tensors(d)
    edit(tensors)
    write_safetensors(d / "model.safetensors", tensors)


def drop_tensor(d: Path, name: str) -> None:
    rewrite_tensors(d, lambda tensors: tensors.pop(name))
