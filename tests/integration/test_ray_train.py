"""`gantrain run --ray`: the Trainer as 2 DDP workers of a Ray Train TorchTrainer on a local Ray (CPU, gloo).
Its reference is the same run under torchrun: the same ranks, seeds and data shards give the same weights, bit
for bit; its checkpoint then resumes under torchrun and in one process, and `gantrain generate` reads it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from extras import marks
from processes import alive, descendants, free_port
import torch

from gantrain.engine.state.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow, marks("tune")]


def _run(train_root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["RAY_AUTH_MODE"] = "disabled"
    args = [sys.executable, "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "256",
            "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--amp", "off", "--no-channels-last", "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=400, env=env)


def _weights(path: Path) -> dict:
    state = load_checkpoint(path)["gan"]
    return {f"{part}.{name}": t for part in ("generator", "discriminator") for name, t in state[part].items()}


def test_ray_train_run_matches_torchrun_and_its_checkpoint_resumes_anywhere(train_root, tmp_path):
    out = tmp_path / "ray"
    ray = _run(train_root, out, "--ray", "--ray-workers", "2", "--max-steps", "12")
    assert ray.returncode == 0, ray.stderr[-4000:]
    for name in ("config.toml", "metrics.jsonl", "train.log", "final.png", "losses.png", "progress.gif"):
        assert (out / name).is_file(), name
    assert "# effective batch: 16 per process x 2 process(es) = 32" in (out / "config.toml").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_d" in r] == list(range(1, 13))
    assert records[-1] == {"step": 12, "ddp_replica_max_abs_diff": 0.0}
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (state["position"]["step"], state["run"]["world_size"]) == (12, 2)
    # the epoch-end checkpoint (step 8) was reported to Ray Train, under the storage path inside the run folder
    reported = sorted((out / "ray" / "train").glob("checkpoint_*/last.pt"))
    assert len(reported) == 1 and load_checkpoint(reported[0])["position"]["step"] == 8

    reference = tmp_path / "torchrun"
    torchrun = _run(train_root, reference, "--ddp", "--nproc", "2", "--master-port", str(free_port()),
                    "--max-steps", "12")
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    got, want = _weights(out / "checkpoints" / "last.pt"), _weights(reference / "checkpoints" / "last.pt")
    assert [k for k in want if not torch.equal(got[k], want[k])] == []

    again = _run(train_root, out, "--ddp", "--nproc", "2", "--master-port", str(free_port()), "--max-steps", "14",
                 "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    alone = _run(train_root, out, "--max-steps", "16", "--resume", "auto")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["step"] == 16
    grid = subprocess.run([sys.executable, "-m", "gantrain", "generate", str(out / "checkpoints" / "last.pt"), "--out",
                           str(tmp_path / "grid.png"), "-n", "16", "--device", "cpu"], capture_output=True, text=True,
                          timeout=120)
    assert grid.returncode == 0 and (tmp_path / "grid.png").is_file(), grid.stderr[-2000:]


def test_a_ray_launch_never_takes_an_earlier_launchs_checkpoint_from_the_storage(train_root, tmp_path):
    """Ray Train hands every launch the newest checkpoint its storage holds for the run name: a NEW run B sharing
    run A's --ray-storage resumed from A's step 8 (A's seed and weights, 4 steps of its own), and A continued
    with --resume auto from that step-8 report instead of its last.pt at step 12 (the steps between lost). Only a
    checkpoint this launch reported is a restart's now."""
    storage = tmp_path / "shared-storage"
    a, b = tmp_path / "a", tmp_path / "b"
    first = _run(train_root, a, "--ray", "--ray-workers", "2", "--ray-storage", storage, "--max-steps", "12")
    assert first.returncode == 0, first.stderr[-4000:]
    assert sorted(load_checkpoint(p)["position"]["step"] for p in storage.glob("train/checkpoint_*/last.pt")) == [8]
    other = _run(train_root, b, "--ray", "--ray-workers", "2", "--ray-storage", storage, "--max-steps", "12",
                 "--seed", "5")
    assert other.returncode == 0, other.stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps[:12] == list(range(1, 13)) and "resumed from" not in (b / "train.log").read_text()
    assert load_checkpoint(b / "checkpoints" / "last.pt")["run"]["config"]["run"]["seed"] == 5
    again = _run(train_root, a, "--ray", "--ray-workers", "2", "--ray-storage", storage, "--max-steps", "14",
                 "--resume", "auto")
    assert again.returncode == 0, again.stderr[-4000:]
    log = (a / "train.log").read_text()
    assert re.search(r"resumed from \S*a/checkpoints/last\.pt at step 12", log), log[-3000:]
    steps = [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text().splitlines() if "loss_d" in line]
    assert steps == list(range(1, 15))


def test_ray_and_ddp_together_are_refused_in_one_line(train_root, tmp_path):
    done = _run(train_root, tmp_path / "x", "--ray", "--ddp", "--max-steps", "2")
    assert done.returncode == 2 and done.stderr.strip() == "error: --ray: --ray runs DDP workers itself; leave out --ddp"


# ----- a Ray Train worker killed mid-run -------------------------------------------------------------------------
# 256 images, 16 per worker x 2 workers: 8 steps an epoch, so Ray Train is told of a checkpoint at steps 8, 16, ...
STEPS = 48
ANSI = re.compile(r"\x1b\[[0-9;]*m")
FORWARDED = re.compile(r"^\(\w+ pid=\d+")  # a line Ray forwards from one of its actors (workers, controller)


def _ray_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}  # PYTHONPATH passes on: this checkout
    env.update(RAY_AUTH_MODE="disabled", COLUMNS="400", **extra)  # one console line per log message
    return env


def _ray_command(train_root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "256",
            "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--amp", "off", "--no-channels-last", "--out", str(out), "--ray", "--ray-workers", "2",
            *extra]


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class _RayRun:
    """A `gantrain run --ray` in a session of its own, its stderr in a file; remembers every process seen below
    it (Ray's processes outlive their parents: a process that has lost its parent is no descendant any more)."""

    def __init__(self, args: list[str], stderr: Path, env: dict[str, str]):
        self.stderr_path = stderr
        with open(stderr, "w") as fh:
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=fh, text=True,
                                         start_new_session=True)
        self.seen: dict[int, str | None] = {}

    def scan(self) -> list[int]:
        pids = descendants(self.proc.pid)
        for pid in pids:
            self.seen.setdefault(pid, _start_time(pid))
        return pids

    def running(self) -> list[int]:
        """Processes seen below the run that still run (the same process: its start time is unchanged)."""
        return [pid for pid, start in self.seen.items() if alive(pid) and _start_time(pid) == start]

    def left_after(self, grace_s: float) -> list[int]:
        """The processes of the run still running ``grace_s`` seconds from now (or fewer, once none is)."""
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.running()

    def train_workers(self) -> list[int]:
        return [pid for pid in self.scan() if _cmdline(pid).startswith("ray::RayTrainWorker")]

    def wait(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            self.scan()
            if self.proc.poll() is not None:
                pytest.fail(f"the run exited with {self.proc.returncode} before {what}: {self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not {what} within {timeout_s:.0f} s: {self.stderr()[-3000:]}")
            time.sleep(0.01)

    def stderr(self) -> str:
        return ANSI.sub("", self.stderr_path.read_text(errors="replace"))

    def kill_all(self) -> None:
        self.scan()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in self.running():  # Ray's processes, in sessions of their own too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def ray_run(tmp_path):
    """Starts `gantrain run --ray` commands; none of their processes (Ray's included) outlives the test."""
    runs: list[_RayRun] = []

    def start(args: list[str], **env: str) -> _RayRun:
        runs.append(_RayRun(args, tmp_path / f"stderr{len(runs)}.txt", _ray_env(**env)))
        return runs[-1]

    yield start
    for run in runs:
        run.kill_all()


@pytest.fixture(scope="module")
def unbroken(train_root, tmp_path_factory) -> Path:
    """The reference: the same run of STEPS steps under torchrun, which nobody killed."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    done = _run(train_root, out, "--ddp", "--nproc", "2", "--master-port", str(free_port()), "--max-steps",
                str(STEPS))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _records(out: Path) -> list[dict]:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def _logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in _records(out) if "loss_d" in r]


def _ray_checkpoint_step(out: Path) -> int | None:
    """The step of the newest checkpoint Ray Train has taken in (the one it restarts from), or None."""
    try:
        latest = json.loads((out / "ray" / "train" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return None
    return (latest.get("latest_checkpoint_result") or {}).get("metrics", {}).get("step")


RESTART = re.compile(r"Ray Train restarted the workers after a failure \(--max-restarts 1\); resuming from step "
                     r"(\d+) \(checkpoint (\S+)\)")


@pytest.mark.parametrize("taken_in", [True, False], ids=["ray-has-a-checkpoint", "ray-has-none-yet"])
def test_a_killed_ray_worker_is_restarted_and_the_run_ends_with_the_unbroken_runs_weights(train_root, tmp_path,
                                                                                        unbroken, ray_run, taken_in):
    """Rank 1 is SIGKILLed past the first epoch end. ray-has-a-checkpoint: after Ray Train took in a checkpoint
    (it polls the workers every 2 s); the workers restart from it. ray-has-none-yet: Ray Train's controller is
    stopped (SIGSTOP) as training starts and continued after the kill, so no epoch-end report reached it: the
    workers restart from the last.pt rank 0 saved at the epoch end before the kill (before they did, they
    started from scratch and rank 0 refused the run folder: 'already holds a run')."""
    out = tmp_path / "run"
    run = ray_run(_ray_command(train_root, out, "--max-steps", str(STEPS), "--max-restarts", "1"))
    run.wait(lambda: len(run.train_workers()) == 2 and _logged_steps(out), 300, "training")
    rank0 = json.loads((out / ".gantrain.lock").read_text())["pid"]  # rank 0 holds the run folder
    [rank1] = [pid for pid in run.train_workers() if pid != rank0]
    controller = None
    if taken_in:
        run.wait(lambda: (_ray_checkpoint_step(out) or 0) >= 8 and _logged_steps(out)[-1] > _ray_checkpoint_step(out),
                 120, "a step past the checkpoint Ray Train took in")
    else:
        [controller] = [pid for pid in run.scan() if _cmdline(pid).startswith("ray::TrainController")]
        os.kill(controller, signal.SIGSTOP)  # training goes on (rank 0 waits in its second report, at step 16)
        assert _ray_checkpoint_step(out) is None
        run.wait(lambda: _logged_steps(out)[-1] > 8, 120, "a step past the first epoch end")
    kill_step, ray_step = _logged_steps(out)[-1], _ray_checkpoint_step(out)
    os.kill(rank1, signal.SIGKILL)
    killed_at, killed_wall = time.monotonic(), time.time()
    if controller is not None:
        time.sleep(0.5)
        os.kill(controller, signal.SIGCONT)
    log = out / "train.log"
    run.wait(lambda: RESTART.search(log.read_text()), 300, "the restart")
    resumed, source = int(RESTART.search(log.read_text())[1]), RESTART.search(log.read_text())[2]
    run.wait(lambda: any(r.get("time", 0) > killed_wall for r in _records(out)), 300, "training again")
    recovery_s = time.monotonic() - killed_at
    run.proc.wait(timeout=400)
    stderr = run.stderr()
    assert run.proc.returncode == 0, stderr[-4000:]

    if taken_in:  # the newest checkpoint Ray Train had taken in (maybe a newer one, taken in as rank 1 died)
        assert 8 <= ray_step <= resumed <= kill_step and resumed % 8 == 0, (ray_step, resumed, kill_step)
        assert Path(source).parent.parent == out / "ray" / "train" and Path(source).name == "last.pt", source
    else:  # Ray Train had none: the last.pt of this launch, saved at the last epoch end before the kill
        assert ray_step is None and resumed == kill_step // 8 * 8 >= 8, (resumed, kill_step)
        assert source == str(out / "checkpoints" / "last.pt")
    # the user is told: Ray Train's controller names the dead worker and retries; rank 0 the step it resumed from
    assert f"pid={rank1}) world_rank=1" in stderr and "[FailurePolicy] RETRY" in stderr
    assert RESTART.search(stderr)[1] == str(resumed)
    assert f"resumed from {source} at step {resumed} (epoch {resumed // 8 + 1}, image 0 of this epoch)" in \
        log.read_text()
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == []
    # steps resumed+1 .. kill_step (at least) were trained twice; on resume rank 0 cut metrics.jsonl back to
    # the resumed step, and says so, so every step is in it once, those after `resumed` from the second time
    dropped = re.search(rf"metrics\.jsonl: dropping (\d+) records logged after step {resumed}, where this run "
                        "resumes", log.read_text())
    assert dropped and int(dropped[1]) >= kill_step - resumed, log.read_text()
    records = _records(out)
    assert [r["step"] for r in records if "loss_d" in r] == list(range(1, STEPS + 1))
    assert all(r["time"] > killed_wall for r in records if "loss_d" in r and r["step"] > resumed)
    assert all(r["time"] < killed_wall for r in records if "loss_d" in r and r["step"] <= resumed)
    assert records[-1] == {"step": STEPS, "ddp_replica_max_abs_diff": 0.0}
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (state["position"]["step"], state["run"]["world_size"]) == (STEPS, 2)
    got, want = _weights(out / "checkpoints" / "last.pt"), _weights(unbroken / "checkpoints" / "last.pt")
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert run.left_after(10) == []
    print(f"killed rank 1 after step {kill_step} (Ray Train's checkpoint: step {ray_step}): training again from "
          f"step {resumed} {recovery_s:.1f} s later")


def test_with_no_restarts_allowed_a_killed_ray_worker_ends_the_run_with_one_line(train_root, tmp_path, ray_run):
    out = tmp_path / "run"
    run = ray_run(_ray_command(train_root, out, "--max-steps", "100000", "--max-restarts", "0"))
    run.wait(lambda: len(run.train_workers()) == 2 and len(_logged_steps(out)) >= 2, 300, "step 2")
    rank0 = json.loads((out / ".gantrain.lock").read_text())["pid"]
    [rank1] = [pid for pid in run.train_workers() if pid != rank0]
    os.kill(rank1, signal.SIGKILL)
    killed_at = time.monotonic()
    while run.proc.poll() is None and time.monotonic() - killed_at < 120:
        run.scan()
        time.sleep(0.05)
    exit_s = time.monotonic() - killed_at
    left = run.left_after(10)
    gone_s = time.monotonic() - killed_at
    stderr = run.stderr()
    assert run.proc.returncode == 1, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-4000:]
    assert errors[0].startswith("error: --ray: the Ray Train run failed after 0 restart(s) allowed (--max-restarts): ")
    assert "worker rank 1: The actor died unexpectedly" in errors[0], errors[0]
    # gantrain's own lines (not those Ray forwards from its controller and workers, which print their own
    # tracebacks) hold no traceback
    own = [line for line in stderr.splitlines() if not FORWARDED.match(line)]
    assert not any("Traceback" in line for line in own), "\n".join(own)
    assert len(run.seen) >= 5 and left == [], [(pid, _cmdline(pid)) for pid in left]
    assert exit_s < 60, f"{exit_s:.1f} s from the kill to the exit"
    print(f"restarts used up: the command exited {exit_s:.1f} s after the kill, all {len(run.seen)} processes of "
          f"the run gone {gone_s:.1f} s after the kill\n{errors[0]}")


# ----- what can never run is refused, not waited for ------------------------------------------------------------
def test_more_workers_than_the_local_ray_has_cpus_is_refused_in_one_line(train_root, tmp_path):
    """Before: Ray Train retried the start without limit ("max allowed: inf") and two Ctrl-Cs were ignored."""
    started = time.monotonic()
    workers = (os.cpu_count() or 1) + 1  # a local Ray has as many CPUs as the machine
    done = _run(train_root, tmp_path / "x", "--ray", "--ray-workers", str(workers), "--cpus-per-worker", "1",
                "--max-steps", "2")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and f"{workers} x 1 CPU = {workers} CPU, but this Ray cluster has" in errors[0], done.stderr
    assert time.monotonic() - started < 120


def test_a_refusal_inside_the_ray_workers_is_said_once_and_not_restarted(tmp_path):
    """The IDX files are the workers' to find (the pre-flight leaves a dataset that may be downloaded alone): each
    worker refuses, reports it, and returns, so Ray Train restarts nothing; the driver says it as one process."""
    empty = tmp_path / "data"
    empty.mkdir()
    done = _run(empty, tmp_path / "x", "--ray", "--ray-workers", "2", "--max-restarts", "2", "--max-steps", "2")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and "fashion-mnist is not on this machine" in errors[0], done.stderr[-3000:]
    assert "[FailurePolicy] RETRY" not in done.stderr and "restarted the workers" not in done.stderr, \
        done.stderr[-3000:]


def test_a_relative_storage_path_is_made_absolute(train_root, tmp_path):
    """Before: rc 1, the cause ("URI has empty scheme") hidden behind "after 3 restart(s)"."""
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["RAY_AUTH_MODE"] = "disabled"
    args = [sys.executable, "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "64", "--batch-size",
            "16", "--ngf", "8", "--ndf", "8", "--sample-every", "0", "--device", "cpu", "--amp", "off", "--out", "run",
            "--ray", "--ray-workers", "2", "--ray-storage", "rel", "--max-steps", "2"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rel" / "train").is_dir() and (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_to_a_ray_run_is_one_line_and_exit_130(train_root, tmp_path, signum):
    """Ray Train's own SIGINT handler aborts the workers and returns as if the run had ended: before, the command
    then exited 0 without a word. SIGTERM got Ray's crash dump and exit 134; it is passed on as a SIGINT now and
    said as itself (exit 143)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(_ray_command(train_root, out, "--epochs", "1000"), env=_ray_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (out / "metrics.jsonl").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    errors = [line for line in ANSI.sub("", stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode == 128 + signum, stderr[-3000:]
    name = signal.Signals(signum).name
    assert len(errors) == 1 and errors[0].startswith(f"error: {name}: Ray Train aborted the workers before the "
                                                     "run's end"), stderr[-3000:]
    assert "SIGTERM received" not in stderr
