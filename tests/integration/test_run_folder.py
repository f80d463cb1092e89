"""One owner per run folder: a second run is refused, a stale lock is taken over and said, an earlier run
without a checkpoint is replaced with a warning, a SIGKILLed owner leaves a lock the next run takes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import one_error_line, strict_records, tiny, tiny_flags
from gantrain.engine.train.loop import Trainer


# ===== one owner per run folder ================================================================================
def test_a_second_run_into_a_busy_folder_exits_2(tiny_cfg, quiet_console, cli, unwrap, train_root: Path) -> None:
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=2)
    owner = Trainer(cfg, console=quiet_console)  # holds the folder until fit() ends or close()
    try:
        lock = json.loads((cfg.run_dir / ".gantrain.lock").read_text())
        assert lock["pid"] == os.getpid()
        contents = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
        for extra in ([], ["--resume", "auto"]):
            result = cli("run", *tiny_flags(train_root, cfg.run_dir), "--max-steps", 2, *extra)
            assert result.exit_code == 2, result.output
            line = unwrap(one_error_line(result))
            assert f"--out: {cfg.run_dir} is in use by another gantrain run (pid {os.getpid()} on" in line
            assert {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()} == contents  # nothing touched
    finally:
        owner.close()
    assert not (cfg.run_dir / ".gantrain.lock").exists()
    assert cli("run", *tiny_flags(train_root, cfg.run_dir), "--max-steps", 2).exit_code == 0


def test_a_stale_lock_is_taken_over_and_said(tiny_cfg, quiet_console) -> None:
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=1)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / ".gantrain.lock").write_text('{"pid": 999999, "host": "elsewhere", "started": "then"}\n')
    Trainer(cfg, console=quiet_console).fit()
    assert "took over a stale lock (pid 999999 on elsewhere, since then)" in (cfg.run_dir / "train.log").read_text()
    assert not (cfg.run_dir / ".gantrain.lock").exists()


def test_an_earlier_run_without_a_checkpoint_is_replaced_with_a_warning(tiny_cfg, quiet_console) -> None:
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=1)
    (cfg.run_dir / "samples").mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text('{"step": 500}\n')
    (cfg.run_dir / "samples" / "step_000500.png").write_bytes(b"old grid")
    Trainer(cfg, console=quiet_console).fit()
    assert "holds files of an earlier run that saved no checkpoint (metrics.jsonl, 1 sample grids)" in \
        (cfg.run_dir / "train.log").read_text()
    assert [r["step"] for r in strict_records(cfg.run_dir / "metrics.jsonl")] == [1]
    assert not (cfg.run_dir / "samples" / "step_000500.png").exists()  # it would have been a frame of progress.gif


def _long_run(train_root: Path, out: Path, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    command = [sys.executable, "-m", "gantrain", "run", *map(str, tiny_flags(train_root, out, limit=256)),
               "--epochs", "1000", "--max-steps", "100000", "--checkpoint-every", "1000"]  # no checkpoint before the kill
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no metrics line within 120 s")
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_two_processes_one_folder_then_sigkill_leaves_a_stale_lock(train_root: Path, tmp_path: Path, cli,
                                                                   unwrap) -> None:
    out = tmp_path / "run"
    proc = _long_run(train_root, out, tmp_path)
    try:
        second = cli("run", *tiny_flags(train_root, out, limit=256), "--max-steps", 2)
        assert second.exit_code == 2
        assert f"is in use by another gantrain run (pid {proc.pid} on" in unwrap(one_error_line(second))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert json.loads((out / ".gantrain.lock").read_text())["pid"] == proc.pid  # left behind by SIGKILL
    # SIGKILL lands before the first checkpoint (the 1000th epoch's): nothing to resume, a fresh run takes over.
    assert not (out / "checkpoints").exists()
    again = cli("run", *tiny_flags(train_root, out, limit=256), "--max-steps", 2)
    assert again.exit_code == 0, again.output
    log = (out / "train.log").read_text()
    assert f"took over a stale lock (pid {proc.pid} on" in log and "saved no checkpoint (metrics.jsonl)" in log
    assert [r["step"] for r in strict_records(out / "metrics.jsonl")] == [1, 2]


