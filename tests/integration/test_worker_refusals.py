"""Refusals that only the workers of a multi-process run can meet (the launcher's pre-flight cannot see them): the
worker says the refusal is final in its record, exits so that nothing restarts it, and the launcher says one
`error:` line with the exit code one process gives, within seconds, leaving no process and no run folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from processes import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun on Linux")]

TINY = ["--ngf", "8", "--ndf", "8", "--device", "cpu", "--max-steps", "2", "--log-every", "1", "--sample-every", "0"]


def _run(tmp_path: Path, *args: str, timeout: float = 240) -> tuple[int, list[str], str, float]:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["COLUMNS"] = "250"  # one line per message
    env["TMPDIR"] = str(tmp_path / "tmp")  # what the launch leaves in the temporary folder (nothing)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gantrain", "run", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=timeout)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return proc.returncode, errors, proc.stderr, time.monotonic() - started


def _assert_refused_once(code: int, errors: list[str], stderr: str, expected_code: int, text: str) -> None:
    assert code == expected_code, stderr
    assert len(errors) == 1 and text in errors[0], stderr
    assert "restart" not in stderr.lower(), stderr  # neither the agent's restart nor advice to resume
    assert "Traceback" not in stderr, stderr


def test_a_dataset_that_is_not_on_the_machine_is_refused_once_without_restarts(tmp_path: Path) -> None:
    """The IDX files are downloaded by the workers, so the pre-flight leaves them be; before, the agent restarted
    the group three times and the line came 8 times, exit 1."""
    empty = tmp_path / "data"
    empty.mkdir()
    code, errors, stderr, seconds = _run(tmp_path, "--data-root", str(empty), "--ddp", "--nproc", "2",
                                         "--master-port", str(free_port()), "--max-restarts", "3",
                                         "--out", str(tmp_path / "run"), *TINY)
    _assert_refused_once(code, errors, stderr, 2, "fashion-mnist is not on this machine")
    assert seconds < 60, seconds
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "tmp").iterdir())  # before: $TMPDIR/torchelastic_* after every DDP run


def _image_folder(folder: Path, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "a").mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a" / f"{i}.png")
    return folder


def test_a_refusal_only_rank_0_meets_ends_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone evaluates (--eval-every), and 8 images are too few for its reference split: rank 1 learns it
    through the agreement instead of waiting in a collective for gloo's 10-minute timeout."""
    data = _image_folder(tmp_path / "few", 8)
    code, errors, stderr, seconds = _run(tmp_path, "--dataset", "folder", "--data-root", str(data), "--channels", "3",
                                         "--batch-size", "2", "--eval-every", "1", "--ddp", "--nproc", "2",
                                         "--master-port", str(free_port()), "--out", str(tmp_path / "run"), *TINY)
    _assert_refused_once(code, errors, stderr, 1, "metrics need at least 10")
    assert seconds < 90, seconds
    assert not (tmp_path / "run").exists()


def test_the_same_refusal_in_one_process_reads_the_same(tmp_path: Path) -> None:
    empty = tmp_path / "data"
    empty.mkdir()
    code, errors, stderr, _ = _run(tmp_path, "--data-root", str(empty), "--out", str(tmp_path / "run"), *TINY)
    _assert_refused_once(code, errors, stderr, 2, "fashion-mnist is not on this machine")
