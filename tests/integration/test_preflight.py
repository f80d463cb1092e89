"""A multi-process launch (--ddp, a local --ray) refuses what no restart can cure in the launcher, before any worker
starts: one `error:` line, the exit code one process gives, within seconds, nothing started and nothing written.
The line is the one a single process prints for the same run (the same checks, not copies of them)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN_ARGS
from faults import one_error_line

DDP = ["--ddp", "--nproc", "2"]


@pytest.fixture
def no_workers(monkeypatch: pytest.MonkeyPatch):
    """Fails the test the moment workers would start (torchrun's agent, Ray Train)."""
    from gantrain.engine.dist import launch, raytrain

    def started(*args, **kwargs):
        raise AssertionError("workers were started")

    monkeypatch.setattr(launch, "launch_workers", started)
    monkeypatch.setattr(raytrain, "train_on_ray", started)


def _refused(cli, *args) -> tuple[int, str, float]:
    started = time.perf_counter()
    result = cli("run", *args)
    return result.exit_code, one_error_line(result), time.perf_counter() - started


def _as_one_process(args: tuple, *drop: str) -> list:
    """The same command without the multi-process flags (a flag in ``drop`` takes its value with it)."""
    out, skip = [], 0
    for arg in args:
        if skip:
            skip -= 1
        elif arg in drop:
            skip = 0 if arg in ("--ddp", "--ray") else 1
        else:
            out.append(arg)
    return out


@pytest.mark.parametrize("launch", [DDP, ["--ray", "--ray-workers", "2"]], ids=["ddp", "ray"])
def test_a_dataset_smaller_than_one_global_batch(cli, no_workers, train_root: Path, tmp_path: Path,
                                                 launch: list) -> None:
    """The case of the issue: 40 images, 32 per process x 2 processes = 64: no step can be taken."""
    out = tmp_path / "run"
    args = ("--preset", "fashion32", "--ngf", 8, "--ndf", 8, "--device", "cpu", *launch, "--limit", 40,
            "--batch-size", 32, "--max-steps", 2, "--data-root", train_root, "--out", out)
    code, line, seconds = _refused(cli, *args)
    assert code == 2 and seconds < 15
    assert line == ("error: --limit: 40 leaves 40 images, fewer than one global batch of 64 (32 per process x 2 "
                    "processes); raise --limit or lower --batch-size")
    assert not out.exists()


def test_a_ddp_resume_with_another_model(cli, no_workers, trained_copy: Path, train_root: Path, unwrap) -> None:
    """--ngf 8 against a checkpoint of --ngf 16: refused naming the setting, with one process's exit code."""
    args = ("--data-root", train_root, *TINY_RUN_ARGS, "--max-steps", 12, "--ngf", 8, *DDP, "--out", trained_copy,
            "--resume", "auto")
    code, line, seconds = _refused(cli, *args)
    one = cli("run", *_as_one_process(args, "--ddp", "--nproc"))
    assert code == one.exit_code == 1 and seconds < 15
    assert "--ngf 16 -> 8" in line and line == one_error_line(one)


def test_a_finished_run_resumed_under_ddp(cli, no_workers, trained_copy: Path, train_root: Path) -> None:
    args = ("--data-root", train_root, *TINY_RUN_ARGS, *DDP, "--out", trained_copy, "--resume", "auto")
    code, line, _ = _refused(cli, *args)
    assert code == 2 and line.startswith("error: --max-steps: the run in")
    assert "already took 6 steps, --max-steps 6 allows 6;" in line


def test_a_new_ddp_run_into_a_folder_that_holds_one(cli, no_workers, trained_copy: Path, train_root: Path) -> None:
    args = ("--data-root", train_root, *TINY_RUN_ARGS, *DDP, "--out", trained_copy)
    code, line, _ = _refused(cli, *args)
    assert code == 2 and f"already holds a run; continue it with --resume auto --out {trained_copy} " in line


def test_a_folder_in_use_by_a_live_run(cli, no_workers, train_root: Path, tmp_path: Path) -> None:
    """Another process owns the folder: refused naming its owner, and its lock is left as it was."""
    from gantrain.engine.state.files import RunLock

    out = tmp_path / "busy"
    owner = RunLock(out)
    owner.take(lambda _: None)
    try:
        code, line, _ = _refused(cli, "--data-root", train_root, *TINY_RUN_ARGS, *DDP, "--out", out)
        assert code == 2 and "is in use by another gantrain run" in line
        assert owner.held and owner.path.exists()
    finally:
        owner.release()


def test_a_folder_in_use_that_holds_a_run_is_called_in_use(cli, no_workers, trained_copy: Path,
                                                            train_root: Path) -> None:
    """Before: a live run's folder that also held a checkpoint was answered "already holds a run; continue it with
    --resume auto", advice that the lock then refused. In use comes first, as in one process."""
    from gantrain.engine.state.files import RunLock

    owner = RunLock(trained_copy)
    owner.take(lambda _: None)
    try:
        for extra in ([], ["--resume", "auto"]):
            code, line, _ = _refused(cli, "--data-root", train_root, *TINY_RUN_ARGS, *DDP, "--out", trained_copy,
                                     *extra)
            assert code == 2 and "is in use by another gantrain run" in line, line
            one = cli("run", "--data-root", train_root, *TINY_RUN_ARGS, "--out", trained_copy, *extra)
            assert one_error_line(one) == line  # the same line as one process
    finally:
        owner.release()


@pytest.mark.parametrize("data", ["missing", "empty"])
def test_a_data_root_with_no_images_is_a_wrong_setting(cli, no_workers, tmp_path: Path, data: str) -> None:
    """Before: exit 1, where the README says 2 for a wrong setting."""
    root = tmp_path / "images"
    if data == "empty":
        root.mkdir()
    args = ["--dataset", "folder", "--channels", "3", "--data-root", root, "--device", "cpu", "--out", tmp_path / "r"]
    code, line, seconds = _refused(cli, *args, *DDP)
    assert code == 2 and seconds < 15 and str(root) in line, line
    assert one_error_line(cli("run", *args)) == line


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto picks CUDA here")
def test_sync_bn_with_the_default_device_on_a_cpu_machine(cli, no_workers, train_root: Path,
                                                          tmp_path: Path) -> None:
    """The issue's case: --sync-bn with --device auto on a CPU-only machine took 3 restarts and 8 error lines."""
    args = ["--data-root", train_root, *TINY_RUN_ARGS, "--sync-bn", *DDP, "--out", tmp_path / "r"]
    args.remove("--device"), args.remove("cpu")
    code, line, seconds = _refused(cli, *args)
    assert code == 2 and seconds < 15
    assert line == "error: --sync-bn: SyncBatchNorm needs CUDA (it is not implemented for the CPU)"


def test_a_damaged_checkpoint_to_resume(cli, no_workers, trained_copy: Path, train_root: Path) -> None:
    last = trained_copy / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shutil.copy(last, trained_copy / "kept.pt")
    last.write_bytes(bytes(data))
    code, line, _ = _refused(cli, "--data-root", train_root, *TINY_RUN_ARGS, "--max-steps", 12, *DDP,
                             "--out", trained_copy, "--resume", "auto")
    assert code == 1 and "last.pt" in line and ("corrupt" in line or "checksum" in line)


def test_a_launch_that_can_run_gets_past_the_preflight(cli, monkeypatch, train_root: Path, tmp_path: Path) -> None:
    """The checks let a sound launch through to the workers and leave no folder or lock behind them."""
    from gantrain.engine.dist import launch

    calls = []
    monkeypatch.setattr(launch, "launch_workers", lambda cfg, resume, console: calls.append((cfg.run_dir, resume)))
    out = tmp_path / "fresh"
    result = cli("run", "--data-root", train_root, *TINY_RUN_ARGS, *DDP, "--out", out)
    assert result.exit_code == 0, result.output
    assert calls == [(out, None)] and not out.exists()


def test_what_only_the_workers_can_decide_is_left_to_them(cli, monkeypatch, trained_copy: Path,
                                                          train_root: Path) -> None:
    """A local --ray relaunch into a run folder continues from Ray Train's own checkpoint (no --resume needed), and
    on a multi-node --ddp launch the run folder is rank 0's, perhaps on another node: neither is refused here."""
    from gantrain.engine.dist import launch, raytrain

    calls = []
    monkeypatch.setattr(raytrain, "train_on_ray", lambda cfg, resume, console: calls.append("ray"))
    monkeypatch.setattr(launch, "launch_workers", lambda cfg, resume, console: calls.append("ddp"))
    flags = ["--data-root", train_root, *TINY_RUN_ARGS, "--max-steps", 12, "--out", trained_copy]
    assert cli("run", *flags, "--ray", "--ray-workers", 2).exit_code == 0
    assert cli("run", *flags, *DDP, "--nnodes", 2, "--node-rank", 1).exit_code == 0
    assert calls == ["ray", "ddp"]


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_master_port_in_use_is_refused_before_anything_is_measured(cli, no_workers, monkeypatch, train_root: Path,
                                                                     tmp_path: Path, host: str) -> None:
    """A port another process listens on (on loopback or on every interface) is refused in the launcher, before
    the workers are launched (and their peak probe measured); a free port gets past the check."""
    import socket

    with socket.socket() as busy:
        busy.bind((host, 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ("--device", "cpu", *DDP, "--master-port", port, "--max-steps", 2, "--data-root", train_root,
                "--limit", 256, "--out", tmp_path / "run")
        code, line, _ = _refused(cli, *args)
    assert code == 2
    assert line == (f"error: --master-port: port {port} on 127.0.0.1 is already in use (another DDP run?); choose "
                    "a free one with --master-port")
    assert not (tmp_path / "run").exists()
    from gantrain.engine.config import override, preset
    from gantrain.engine.dist.preflight import require_free_port

    require_free_port(override(preset("fashion32"), {"ddp": True, "master_port": port}))  # closed now: free
