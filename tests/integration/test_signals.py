"""Ctrl-C (SIGINT) and SIGTERM during training: a checkpoint, exit code 128 + signal, no traceback, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gantrain.engine.state.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def _flags(train_root: Path, out: Path) -> list[str]:
    return ["--data-root", str(train_root), "--limit", "256", "--batch-size", "32", "--ngf", "8", "--ndf", "8",
            "--log-every", "1", "--sample-every", "0", "--device", "cpu", "--out", str(out)]


def _start_and_signal(train_root: Path, out: Path, tmp_path: Path, signum: int) -> subprocess.CompletedProcess:
    """Starts a long tiny run, waits for its first metrics line, sends ``signum`` and waits for the exit."""
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["COLUMNS"] = "200"
    command = [sys.executable, "-m", "gantrain", "run", *_flags(train_root, out), "--epochs", "1000",
               "--max-steps", "100000"]
    # SIGHUP as a terminal session has it (the tests may run under nohup, whose SIG_IGN the child would inherit)
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.is_file() and metrics.read_text().strip()):
            if proc.poll() is not None:
                pytest.fail(f"training exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no metrics line within 120 s")
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_resumes(train_root: Path, tmp_path: Path, cli, unwrap) -> None:
    out = tmp_path / "run"
    done = _start_and_signal(train_root, out, tmp_path, signal.SIGINT)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert "KeyboardInterrupt" not in done.stderr

    last = out / "checkpoints" / "last.pt"
    assert last.is_file()
    step = load_checkpoint(last)["position"]["step"]
    assert step >= 1
    numbered = out / "checkpoints" / f"step_{step:08d}.pt"
    assert numbered.read_bytes() == last.read_bytes()
    message = unwrap(done.stderr)
    assert f"interrupted at step {step}" in message and str(numbered) in message
    # one line says it, the error line: where it saved and how to continue (a WARNING said it again before)
    assert message.count(str(numbered)) == 1 and f"{numbered}; continue with --resume auto --out {out}" in message
    assert f"WARNING interrupted at step {step}; checkpoint saved to {numbered}; continue with --resume auto --out {out}" in \
        (out / "train.log").read_text()  # the run's log keeps it

    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, len(logged) + 1)) and logged[-1] <= step

    result = cli("run", *_flags(train_root, out), "--max-steps", step + 3, "--resume", "auto")
    assert result.exit_code == 0, result.output
    state = load_checkpoint(last)
    assert state["position"]["step"] == step + 3
    assert state["gan"]["opt_g"]["state"][0]["step"] == step + 3
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, step + 4))
    assert (out / "final.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_exit_128_n_with_a_checkpoint(train_root: Path, tmp_path: Path, signum: int) -> None:
    """SIGHUP (a closed terminal or ssh session) killed a run silently (exit 129, no checkpoint, the lock left);
    it now stops as SIGTERM does."""
    out = tmp_path / "run"
    done = _start_and_signal(train_root, out, tmp_path, signum)
    assert done.returncode == 128 + signum, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    step = load_checkpoint(out / "checkpoints" / "last.pt")["position"]["step"]
    assert step >= 1 and f"error: interrupted at step {step}; checkpoint saved to" in done.stderr
    assert not (out / ".gantrain.lock").exists()


def test_under_nohup_sighup_leaves_the_run_training(train_root: Path, tmp_path: Path) -> None:
    """`nohup gantrain run ... &` then logging out: the run must go on (SIGHUP ignored, as nohup asks); catching
    SIGHUP for the stop would have ended it."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    command = [sys.executable, "-m", "gantrain", "run", *_flags(train_root, out), "--epochs", "1000",
               "--max-steps", "100000"]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # as nohup does
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and metrics.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        lines = len(metrics.read_text().splitlines())
        time.sleep(3)
        assert proc.poll() is None and len(metrics.read_text().splitlines()) > lines  # still training
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM


def _gantrain_script() -> Path:
    """The installed `gantrain` command beside this Python (the console script of pyproject.toml)."""
    return Path(sys.executable).with_name("gantrain")


def _loaded(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("after_s", [0.0, 0.4])
@pytest.mark.parametrize("how", ["module", "script"])
def test_ctrl_c_while_gantrain_is_starting_is_one_line(tmp_path: Path, after_s: float, how: str) -> None:
    """Before: a 28-39-line KeyboardInterrupt traceback from inside an import. The signal is sent once torch's
    library is loading (or ``after_s`` later), so it lands inside gantrain's imports, however busy the machine."""
    if how == "script" and not _gantrain_script().exists():
        pytest.skip("gantrain is not installed as a command beside this Python")
    start = [sys.executable, "-m", "gantrain"] if how == "module" else [str(_gantrain_script())]
    env = {k: v for k, v in os.environ.items() if k not in ("GANTRAIN_DATA", "GANTRAIN_LAUNCH_STATUS")}
    proc = subprocess.Popen([*start, "presets"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _loaded(proc.pid, "libtorch"):
        assert proc.poll() is None and time.monotonic() < deadline, "torch was never loaded"
        time.sleep(0.002)
    time.sleep(after_s)
    if proc.poll() is not None:
        pytest.skip(f"gantrain finished within {after_s} s of loading torch: no import left to interrupt")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    # during the imports, or (on a fast machine, 0.4 s later) in the command: one line either way
    assert len(lines) == 1 and lines[0] in ("error: SIGINT while gantrain was starting; nothing was done",
                                            "error: interrupted by SIGINT (Ctrl-C)"), stderr


def test_ctrl_c_in_a_command_without_its_own_handling_is_one_line(cli, monkeypatch) -> None:
    """After the imports: a KeyboardInterrupt a command does not handle is one line and 130, not click's
    "Aborted!" with exit 1."""
    from gantrain.engine.config import ModelConfig

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gantrain.engine.config.preset", interrupted)
    result = cli("presets")
    assert result.exit_code == 130, result.output
    assert [line for line in result.stderr.splitlines() if line.strip()] == ["error: interrupted by SIGINT (Ctrl-C)"]
    assert ModelConfig  # (imported before the patch)


_STOP_DURING_FINAL = """
import os, signal, sys
from gantrain.engine.outputs.writer import RunOutputs

original = RunOutputs.write_final

def write_final(self, images, step):
    os.kill(os.getpid(), signal.SIGTERM)  # a stop signal just as the end of the run is being written
    return original(self, images, step)

RunOutputs.write_final = write_final
from gantrain.cli import main
sys.argv = ["gantrain", "run", *sys.argv[1:]]
main()
"""


def test_sigterm_while_the_final_outputs_are_written_finishes_them(train_root: Path, tmp_path: Path) -> None:
    """Before: the process died without a word, none of final.png, losses.png, progress.gif was written, and
    `--resume auto` called the run complete, so they never were."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["COLUMNS"] = "200"
    done = subprocess.run([sys.executable, "-c", _STOP_DURING_FINAL, *_flags(train_root, out), "--max-steps", "4"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert all((out / name).is_file() for name in ("final.png", "losses.png", "progress.gif")), done.stderr
    assert "SIGTERM came at the end of the run: its final outputs were written first" in done.stderr


def test_a_finished_run_whose_end_was_cut_short_writes_what_is_missing(train_root: Path, tmp_path: Path, cli,
                                                                       unwrap) -> None:
    out = tmp_path / "run"
    assert cli("run", *_flags(train_root, out), "--max-steps", "4").exit_code == 0
    again = cli("run", *_flags(train_root, out), "--max-steps", "4", "--resume", "auto")
    assert again.exit_code == 2  # complete: refused
    assert "already took 4 steps, --max-steps 4 allows 4;" in unwrap(again.stderr)
    checkpoint = (out / "checkpoints" / "last.pt").read_bytes()
    for name in ("final.png", "progress.gif"):
        (out / name).unlink()
    result = cli("run", *_flags(train_root, out), "--max-steps", "4", "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert (out / "final.png").is_file() and (out / "progress.gif").is_file()
    assert "its end was cut short: writing the missing final.png, progress.gif" in unwrap(result.stderr)
    assert (out / "checkpoints" / "last.pt").read_bytes() == checkpoint  # no step, no new checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
    elsewhere = tmp_path / "elsewhere"  # another run's complete checkpoint into a new folder: still refused
    other = cli("run", *_flags(train_root, elsewhere), "--max-steps", "4", "--resume", out / "checkpoints" / "last.pt")
    assert other.exit_code == 2 and "already took 4 steps, --max-steps 4 allows 4;" in unwrap(other.stderr)
    assert not elsewhere.exists()
