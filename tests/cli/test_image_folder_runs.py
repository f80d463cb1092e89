"""Users' image folders through `gantrain run`: the issue's folders end to end, and schedules that cannot run refused
before anything is written (in-process CLI runs, slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gantrain.engine.data import load_images

LOADERS = ["memory", "torch", "dali"]
SIZE = 64


def _needs(kind: str) -> None:
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda120) is not installed")


def _jpegs(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((SIZE, SIZE, 3), i * 7 % 256, np.uint8)).save(folder / f"{i:03d}.jpg")


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_cli_refuses_an_impossible_schedule_before_writing_anything(tmp_path: Path, kind: str, cli, unwrap,
                                                                     train_root: Path) -> None:
    _needs(kind)
    _jpegs(tmp_path / "d", 21)
    out = tmp_path / "run"
    result = cli("run", "--preset", "dcgan64", "--data-root", str(tmp_path / "d"), "--batch-size", "32", "--loader", kind,
                 "--device", "cpu", "--out", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --batch-size: the dataset has 21 images, fewer than one global batch of 32" in unwrap(result.output)
    assert not out.exists()
    fashion = cli("run", "--data-root", str(train_root), "--limit", "64", "--loader", kind, "--device", "cpu",
                  "--out", str(out))
    assert fashion.exit_code == 2 and not out.exists()
    assert ("error: --limit: 64 leaves 64 images, fewer than one global batch of 128 (--batch-size); raise --limit "
            "or lower --batch-size") in unwrap(fashion.output)


@pytest.mark.slow
def test_resuming_a_finished_run_is_refused(tmp_path: Path, cli, unwrap, train_root: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--data-root", str(train_root), "--limit", "64", "--batch-size", "32", "--ngf", "8", "--ndf", "8",
            "--max-steps", "2", "--device", "cpu", "--sample-every", "0", "--out", str(out)]
    assert cli(*args).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = cli(*args, "--resume", "auto")
    assert again.exit_code == 2 and "Traceback" not in again.output
    assert "error: --max-steps: the run in" in unwrap(again.output)
    assert "already took 2 steps, --max-steps 2 allows 2;" in unwrap(again.output)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # nothing rewritten


@pytest.mark.slow
@pytest.mark.parametrize("kind", LOADERS)
def test_the_issues_folder_trains_with_the_ramp_as_a_ramp(tmp_path: Path, kind: str, cli, cats_dir: Path) -> None:
    """The issue's case: a 16-bit ramp PNG among 16 JPEGs, dcgan64, batch 8, 2 steps, in every loader."""
    _needs(kind)
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted(cats_dir.glob("*.jpg"))[:16]:
        shutil.copy(src, folder / src.name)
    Image.fromarray(np.linspace(0, 65535, 64)[None].repeat(64, 0).astype(np.uint16)).save(folder / "ramp.png")
    out = tmp_path / "run"
    result = cli("run", "--preset", "dcgan64", "--data-root", str(folder), "--batch-size", "8", "--max-steps", "2",
                 "--loader", kind, "--device", "cpu", "--ngf", "8", "--ndf", "8", "--num-workers", "0",
                 "--out", str(out))
    assert result.exit_code == 0, result.output
    log_text = (out / "train.log").read_text()
    assert f"folder {folder}: 17 images (JPEG 16, PNG 1); no file left out" in log_text
    assert "decoded as a viewer shows them: 1 with 16/32-bit integer samples (scaled to 8 bits)" in log_text
    if kind == "dali":
        assert "dali: " not in log_text  # 16-bit grayscale PNGs are among those DALI decodes itself
    ramp = load_images("folder", str(folder), 64, 3)[16]  # ramp.png sorts last
    assert ramp[:, 0, :4].tolist() == [[0, 4, 8, 12]] * 3