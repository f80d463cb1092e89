"""I/O faults: every rewrite is atomic, every OSError is one line naming the path and the cause (a full disk,
a read-only folder, a file in the way), and damaged run files are read tolerantly."""

from __future__ import annotations

import errno
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from faults import one_error_line, strict_records, tiny_flags
from gantrain.engine.state.checkpoint import load_checkpoint


# ===== every rewrite is atomic ================================================================================
def _rewrite_metrics(path: Path) -> None:
    from gantrain.engine.outputs.runlog import MetricsWriter

    MetricsWriter(path, resume_step=1)


def _rewrite_grid(path: Path) -> None:
    from gantrain.engine.outputs.images import save_grid

    save_grid(torch.zeros(4, 1, 8, 8), path)


def _rewrite_gif(path: Path) -> None:
    from PIL import Image

    from gantrain.engine.outputs.images import save_gif

    frame = path.parent.parent / "frame.png"
    Image.new("L", (64, 64)).save(frame)
    save_gif([frame, frame], path)


def _rewrite_plot(path: Path) -> None:
    from gantrain.engine.outputs.images import plot_curves

    plot_curves([{"step": s, "loss_d": 1.0 / s} for s in range(1, 50)], ["loss_d"], path, "t", "y")


def _rewrite_eval_json(path: Path) -> None:
    from gantrain.engine.metrics.evaluate import MetricReport
    from gantrain.engine.metrics.report import EvalResult, write_json

    info = {"label": "x", "task": "classes", "test_accuracy": 0.9, "train_sha256": "0" * 64, "epochs": 1,
            "weights_sha256": "1" * 64}
    write_json(EvalResult("generator", MetricReport({"fd": 1.0}, 100, 100), info), path)


REWRITERS = {"metrics.jsonl": _rewrite_metrics, "grid.png": _rewrite_grid, "progress.gif": _rewrite_gif,
             "losses.png": _rewrite_plot, "eval.json": _rewrite_eval_json}


@pytest.mark.parametrize("name", list(REWRITERS))
def test_a_rewrite_cut_short_leaves_the_old_file(name: str, tmp_path: Path, io_faults) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / name
    old = b'{"step": 1}\n{"step": 2}\n' * 2000  # stands for a long history (or any earlier version of the file)
    path.write_bytes(old)
    io_faults.disk_full(folder, after_bytes=10)  # killed, or out of space, ten bytes into the new version
    with pytest.raises(Exception) as info:
        REWRITERS[name](path)
    assert "No space left on device" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == old
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temporary file left


def test_a_resume_whose_config_rewrite_fails_keeps_config_and_history(trained_copy: Path, train_root: Path,
                                                                      cli, io_faults) -> None:
    config, metrics = (trained_copy / "config.toml").read_bytes(), (trained_copy / "metrics.jsonl").read_bytes()
    io_faults.disk_full(trained_copy, after_bytes=500)  # the lock file fits; config.toml (several KB) does not
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    assert one_error_line(result) == (f"error: cannot write {trained_copy / 'config.toml'}: No space left on "
                                       "device (ENOSPC)")
    assert (trained_copy / "config.toml").read_bytes() == config
    assert (trained_copy / "metrics.jsonl").read_bytes() == metrics


# ===== I/O failures: one line naming the path and the cause ===================================================
def test_out_that_is_a_file_or_under_a_file(cli, train_root: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder\n")
    result = cli("run", *tiny_flags(train_root, a_file), "--max-steps", 1)
    assert result.exit_code == 1
    assert one_error_line(result) == f"error: --out: {a_file} is a file, not a folder"
    under = cli("run", *tiny_flags(train_root, a_file / "run"), "--max-steps", 1)
    assert under.exit_code == 1
    assert one_error_line(under) == (f"error: --out: cannot create the folder {a_file / 'run'}: {a_file} is a "
                                      "file, not a folder")
    assert a_file.read_text() == "not a folder\n"


def test_out_on_a_read_only_filesystem(cli, unwrap, train_root: Path, tmp_path: Path, io_faults) -> None:
    io_faults.make_read_only(tmp_path / "ro")
    result = cli("run", *tiny_flags(train_root, tmp_path / "ro" / "run"), "--max-steps", 1)
    assert result.exit_code == 1
    assert "Read-only file system (EROFS)" in one_error_line(result)
    assert str(tmp_path / "ro") in unwrap(result.stderr)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(trained_copy: Path, train_root: Path, cli,
                                                              io_faults) -> None:
    folder = trained_copy / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    io_faults.disk_full(folder, after_bytes=4096)
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--log-every", 2, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    assert one_error_line(result) == (f"error: cannot write {folder / 'step_00000008.pt'}: No space left on device "
                                       "(ENOSPC)")
    assert (folder / "last.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000006.pt"]
    assert load_checkpoint(folder / "last.pt")["position"]["step"] == 6
    assert not (trained_copy / ".gantrain.lock").exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a tmpfs: Linux, as root")
def test_disk_full_on_a_real_3mb_tmpfs(cli, train_root: Path, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "run"  # ngf/ndf 64: G and D with Adam state are ~40 MB, far over 3 MB
        result = cli("run", "--data-root", train_root, "--limit", 64, "--batch-size", 32, "--max-steps", 1,
                     "--sample-every", 0, "--device", "cpu", "--out", out)
        assert result.exit_code == 1
        assert one_error_line(result) == (f"error: cannot write {out / 'checkpoints' / 'step_00000001.pt'}: No "
                                           "space left on device (ENOSPC)")
        assert not list((out / "checkpoints").iterdir())  # no torn checkpoint, no temporary file
    finally:
        from rich.console import Console

        from gantrain.engine.outputs.runlog import setup_logging

        setup_logging(Console(file=io.StringIO()))  # closes the run's train.log, which keeps the mount busy
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("case", ["a-folder", "under-a-file", "disk-full", "read-only"])
def test_generate_out_failures_are_one_line(case: str, trained_run: Path, tmp_path: Path, cli, io_faults) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "dir").mkdir()
    out = {"a-folder": tmp_path / "dir", "under-a-file": a_file / "grid.png", "disk-full": tmp_path / "full" / "g.png",
           "read-only": tmp_path / "ro" / "g.png"}[case]
    if case == "disk-full":
        io_faults.disk_full(out.parent, after_bytes=100)
    if case == "read-only":
        io_faults.make_read_only(out.parent)
    result = cli("generate", trained_run / "checkpoints" / "last.pt", "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    reason = {"a-folder": "Is a directory (EISDIR)", "under-a-file": f"{a_file} is a file, not a folder",
              "disk-full": "No space left on device (ENOSPC)", "read-only": "Read-only file system (EROFS)"}[case]
    assert one_error_line(result) == f"error: cannot write {out}: {reason}"


def test_a_stray_oserror_is_one_line_naming_the_path(capsys) -> None:
    import typer

    from gantrain.cli import user_errors

    @user_errors
    def command():
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 1
    assert capsys.readouterr().err.splitlines() == ["error: /some/where: Permission denied (EACCES)"]


# ===== damaged run files are read tolerantly ====================================================================
DAMAGED = [
    (b'{"step": 1, "loss_d": 1.0}\n', True),
    (b"garbage, not json\n", False),
    (b'{"loss_d": 2.0}\n', False),                      # no step
    (b'{"step": "2", "loss_d": 2.0}\n', False),         # step of the wrong type
    (b"[1, 2, 3]\n", False),                            # not an object
    (b'{"step": 2, "loss_d": \xff\xfe}\n', False),      # invalid UTF-8
    (b'{"step": 3, "loss_d": NaN}\n', True),            # written by gantrain before the JSON became strict
    (b'{"step": 7, "loss_d": 0.5}\n', True),            # past the checkpoint: dropped on resume
    (b'{"step": 8, "loss', False),                      # torn last line
]


def test_read_metrics_skips_damaged_lines_and_counts_them(tmp_path: Path, caplog) -> None:
    from gantrain.engine.outputs.images import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(line for line, _ in DAMAGED))
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 3, 7]
    assert math.isnan(records[1]["loss_d"])
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_resume_over_a_damaged_history(trained_copy: Path, train_root: Path, cli) -> None:
    (trained_copy / "metrics.jsonl").write_bytes(b"".join(line for line, _ in DAMAGED))
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--log-every", 2, "--sample-every", 0, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 0, result.output
    records = strict_records(trained_copy / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 8]  # the good lines up to step 6, then the resumed run
    assert records[1]["loss_d"] is None and records[1]["nonfinite"] == {"loss_d": "nan"}
    log = (trained_copy / "train.log").read_text()
    assert "dropping 6 damaged lines (line 2: not JSON (torn or garbage); line 3: no integer 'step'" in log
    assert "dropping 1 records logged after step 6" in log


def test_a_config_file_that_is_not_utf8_exits_2(cli, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"[optim]\nlr_g = 0.001 # \xff\n")
    result = cli("run", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert one_error_line(result).startswith(f"error: --config: {config} is not valid TOML")
