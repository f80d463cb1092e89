"""Elastic DDP on the CPU (2 gloo workers under torchrun's in-process elastic agent): a worker killed mid-run is
restarted with the others and every rank resumes from last.pt, ending with the weights of a run nobody killed;
with the restarts used up every process is gone within seconds and one line says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import descendants, free_port
import torch

from gantrain.engine.state.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux signals")]

STEPS = 120


def _command(train_root: Path, out: Path, *extra: str) -> list[str]:
    # fp32, NCHW: resume is exact there, so a recovered run must match an unbroken one bit for bit
    return [sys.executable, "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "256",
            "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--amp", "off", "--no-channels-last", "--out", str(out), "--ddp", "--nproc", "2",
            "--master-port", str(free_port()), "--max-steps", str(STEPS), "--checkpoint-every", "1000",
            "--checkpoint-every-steps", "5", *extra]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["COLUMNS"] = "250"  # one rich line per message
    return env


def _worker(launcher: int, rank: int, timeout_s: float = 60) -> int:
    """The pid of the launcher's worker of ``rank`` (read from its environment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            children = [int(p) for p in Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()]
        except OSError:
            children = []
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and any(v.startswith(b"TORCHELASTIC_RESTART_COUNT=") for v in environ):
                return pid
        time.sleep(0.02)
    pytest.fail(f"no worker of rank {rank} under {launcher}")


def _logged_steps(out: Path) -> list[int]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss_d"' in line]


def _wait(predicate, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run exited with {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s:.0f} s")
        time.sleep(0.01)


@pytest.fixture
def popen():
    """Starts runs in sessions of their own; none of their processes outlives the test."""
    procs: list[subprocess.Popen] = []

    def start(args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        for pid in descendants(proc.pid):  # workers run in sessions of their own
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _weights(out: Path) -> dict:
    state = load_checkpoint(out / "checkpoints" / "last.pt")["gan"]
    return {f"{part}.{name}": t for part in ("generator", "discriminator") for name, t in state[part].items()}


def test_a_killed_worker_is_restarted_and_the_run_ends_with_the_unbroken_runs_weights(train_root, tmp_path,
                                                                                      popen):
    reference = subprocess.run(_command(train_root, tmp_path / "ref"), env=_env(), capture_output=True, text=True,
                               timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "killed"
    proc = popen(_command(train_root, out))
    # past the checkpoint of step 5, well before the end: the restart must resume from a checkpoint, not step 0
    _wait(lambda: len(_logged_steps(out)) >= 7, proc, 120, "step 7")
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    log = out / "train.log"
    _wait(lambda: "restart 1 of 3" in log.read_text(), proc, 120, "the restart")
    resumed = int(log.read_text().split("restart 1 of 3", 1)[1].split("at step ")[1].split()[0])
    _wait(lambda: any(s > resumed for s in _logged_steps(out)), proc, 120, "training again")
    recovery_s = time.monotonic() - killed_at
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]

    assert resumed >= 5 and resumed % 5 == 0, log.read_text()
    lines = [line for line in stderr.splitlines() if "SIGKILL" in line]
    assert lines and lines[0].startswith("WARNING  DDP worker rank 1 (pid ") and \
        "was killed by SIGKILL; restarting the worker group (restart 1 of 3, --max-restarts)" in lines[0], stderr
    assert "Traceback" not in stderr
    assert "after DDP worker rank 1 (pid " in log.read_text() and f"resumed from {out / 'checkpoints' / 'last.pt'} " \
        f"at step {resumed}" in log.read_text()
    # the records after the resumed step were logged again, once each
    assert _logged_steps(out) == list(range(1, STEPS + 1))
    got, want = _weights(out), _weights(tmp_path / "ref")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["step"] == STEPS
    print(f"killed rank 1 after step >= 7: training again {recovery_s:.1f} s later (from step {resumed})")


def test_with_the_restarts_used_up_every_process_exits_within_seconds_with_one_line(train_root, tmp_path, popen):
    out = tmp_path / "run"
    proc = popen(_command(train_root, out, "--max-restarts", "1", "--max-steps", "100000"))
    _wait(lambda: len(_logged_steps(out)) >= 2, proc, 120, "step 2")
    os.kill(_worker(proc.pid, 0), signal.SIGKILL)
    _wait(lambda: (out / "train.log").is_file() and "restart 1 of 1" in (out / "train.log").read_text(), proc, 120,
          "the restart")
    victim = _worker(proc.pid, 1)
    survivor = _worker(proc.pid, 0)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    exit_s = time.monotonic() - killed_at
    assert proc.returncode == 1, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith("error: DDP worker rank 1 was killed by SIGKILL after 1 restart(s), all that "
                                "--max-restarts allows"), errors
    assert "Traceback" not in stderr
    for pid in (victim, survivor):
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
    assert exit_s < 15, f"{exit_s:.1f} s from the last failure to exit"
    print(f"restarts used up: launcher and workers gone {exit_s:.2f} s after the kill")
