"""One owner per run folder: a second run is refused, a stale lock is taken over and said, an earlier run
without a checkpoint is replaced with a warning, a SIGKILLed owner leaves a lock the next run takes."""

from __future__ import annotations

import io
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




# ===== what a killed write leaves ==============================================================================
def test_a_resumed_run_removes_the_temporary_files_a_kill_left(trained_copy: Path, cli, train_root: Path) -> None:
    """Before: `.step_*.pt.*.tmp`, `.metrics.jsonl.*.tmp`, `.final.png.*.tmp` stayed forever. Only names of the
    atomic writer's own pattern go, in the folders it writes; a user's files of similar names stay."""
    leftovers = [trained_copy / "checkpoints" / ".step_4.pt.k2x_9a0b.tmp", trained_copy / ".metrics.jsonl.abcdefgh.tmp",
                 trained_copy / "samples" / ".step_000003.png.0123abcd.tmp"]
    kept = [trained_copy / "notes.tmp", trained_copy / ".hidden.tmp", trained_copy / ".a.b.toolongname.tmp",
            trained_copy / "extra" / ".step_4.pt.k2x_9a0b.tmp"]  # (a folder gantrain does not write)
    for path in leftovers + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x" * 1000)
    result = cli("run", "--config", trained_copy / "config.toml", "--out", trained_copy, "--data-root", train_root,
                 "--resume", "auto", "--max-steps", 8)
    assert result.exit_code == 0, result.output
    assert not [p for p in leftovers if p.exists()], result.output
    assert all(p.exists() for p in kept)
    lines = [line for line in (trained_copy / "train.log").read_text().splitlines() if "temporary file" in line]
    assert len(lines) == 1 and "removed 3 temporary file(s)" in lines[0], lines


def test_leftovers_are_only_the_atomic_writers_own(tmp_path: Path) -> None:
    from gantrain.engine.state.files import atomic_write_text, remove_leftovers

    target = tmp_path / "a.json"
    real = []

    def fail(fh):  # a write cut short the way a kill would: the temporary file stays, the target is never made
        real.extend(tmp_path.glob(".a.json.*"))
        raise KeyboardInterrupt

    from gantrain.engine.state.files import atomic_write
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert not real[0].exists()  # atomic_write itself removes it when it can; a SIGKILL leaves it, as here:
    real[0].write_bytes(b"partial")
    atomic_write_text(tmp_path / "b.json", "{}")
    (tmp_path / "user.tmp").write_text("mine")
    assert remove_leftovers([tmp_path, tmp_path / "missing"]) == [real[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "user.tmp"]


# ===== a copied run folder =====================================================================================
def _tree(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_copied_run_folders_config_does_not_redirect_the_run(trained_run: Path, tmp_path: Path, cli, unwrap,
                                                                train_root: Path) -> None:
    """Before: `run --config copy/config.toml --resume auto` rewrote the ORIGINAL folder (10 files) and left the
    copy untouched; the only sign was a path in the log."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    original, copied = _tree(trained_run), _tree(copy)
    for extra in (["--resume", "auto"], []):
        result = cli("run", "--config", copy / "config.toml", "--data-root", train_root, "--max-steps", 8, *extra)
        assert result.exit_code == 2, result.output
        line = unwrap(one_error_line(result))
        assert f"records out = {trained_run}, not the folder it sits in ({copy}" in line, line
        assert f"--out {copy}" in line and f"--out {trained_run}" in line
    assert _tree(trained_run) == original and _tree(copy) == copied  # neither folder touched
    result = cli("run", "--config", copy / "config.toml", "--out", copy, "--data-root", train_root, "--max-steps", 8,
                 "--resume", "auto")
    assert result.exit_code == 0, result.output
    assert _tree(trained_run) == original
    assert json.loads((copy / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


def _config_without(path: Path, *keys: str) -> dict:
    """A config.toml as a plain dict (tomllib, not gantrain), without the named ``section.field`` keys."""
    import tomllib

    raw = tomllib.loads(path.read_text())
    for key in keys:
        section, name = key.split(".")
        raw[section].pop(name)
    return raw


def test_a_run_folders_own_config_with_out_unset_is_not_taken_for_a_moved_one(cli, tmp_path: Path, unwrap,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run without --out records `out = ""` (its folder is runs/<preset>). Before, `--config runs/x/config.toml`
    read that as "." and refused the folder as "copied or moved?"; now it is the folder the file sits in, so the
    file loads again as its header says: a new run there is refused as one that holds a run, a resume continues."""
    monkeypatch.chdir(tmp_path)
    tiny = ["--dataset", "synthetic", "--synthetic-size", "256", "--batch-size", "32", "--ngf", "8", "--ndf", "8",
            "--amp", "off", "--device", "cpu"]
    assert cli("run", *tiny, "--max-steps", 2).exit_code == 0
    config = Path("runs") / "fashion32" / "config.toml"
    assert 'out = ""' in config.read_text()
    result = cli("run", "--config", config, "--dry-run")
    assert result.exit_code == 2 and "copied or moved" not in result.output, result.output
    assert "runs/fashion32 already holds a run; continue it with --resume auto --out runs/fashion32" in unwrap(one_error_line(result))
    result = cli("run", "--config", config, "--resume", "auto", "--max-steps", 4)
    assert result.exit_code == 0, result.output
    assert json.loads((config.parent / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_a_resume_without_preset_or_config_continues_with_the_checkpoints_config(trained_run: Path, tmp_path: Path,
                                                                                  cli, unwrap) -> None:
    """Before: `run --out RUN --resume auto` laid the default preset under the flags, so a run of any other
    settings was refused (`--ngf 16 -> 64`) or, where the model matched, silently changed every other setting
    back to fashion32's (the resume line listed them). Now the checkpoint's config is the base: only the flags
    given change, and one line says where the config came from."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = cli("run", "--out", run, "--resume", "auto", "--max-steps", 8)  # no --data-root: the stored one
    assert result.exit_code == 0, result.output
    text = unwrap(result.stderr)
    assert "--resume without --preset or --config: the run continues with the config stored in" in text, text
    assert "(preset fashion32, run folder" in text  # the paths: in config.toml below (the console wraps them)
    assert "settings changed since the checkpoint, in effect from step 7: --max-steps 6 -> 8, --out" in text
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8
    said = "--resume without --preset or --config: the run continues with the config stored in"
    assert (run / "train.log").read_text().count(said) == 1  # said before the run's log existed, kept for it
    # the config the run wrote is the first run's, but for the one flag (TINY_RUN_ARGS: ngf 16, batch 32, ...)
    assert _config_without(run / "config.toml", "run.max_steps", "run.out") == \
        _config_without(trained_run / "config.toml", "run.max_steps", "run.out")
    written = _config_without(run / "config.toml")
    assert (written["model"]["ngf"], written["data"]["batch_size"], written["data"]["limit"]) == (16, 32, 256)
    assert (written["run"]["max_steps"], written["run"]["out"]) == (8, str(run))
    import gantrain  # the Python API resumes the same way
    from rich.console import Console

    before = _config_without(run / "config.toml", "run.max_steps")
    fit = gantrain.train(resume="auto", out=str(run), max_steps=9, console=Console(file=io.StringIO()))
    assert fit.steps == 9 and _config_without(run / "config.toml", "run.max_steps") == before
    assert (run / "train.log").read_text().count(said) == 2
    assert _config_without(run / "config.toml")["run"]["max_steps"] == 9


def test_lines_held_for_a_train_log_that_never_came_are_not_the_next_runs(trained_run: Path, tmp_path: Path,
                                                                          cli) -> None:
    """A dry run of a resume holds its config line for a train.log it never writes; the next run in the same
    process (a notebook, these tests) must not write it into its own."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert cli("run", "--out", run, "--resume", "auto", "--dry-run").exit_code == 0
    assert cli("run", "--out", tmp_path / "none", "--resume", "auto").exit_code != 0  # refused: nothing there
    other = tmp_path / "other"
    result = cli("run", "--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "32", "--max-steps", 1,
                 "--ngf", "8", "--ndf", "8", "--amp", "off", "--device", "cpu", "--out", other)
    assert result.exit_code == 0, result.output
    text = (other / "train.log").read_text()
    assert "continues with the config stored" not in text and "--resume" not in text, text


def test_a_resume_from_a_moved_folders_checkpoint_continues_there(trained_run: Path, tmp_path: Path, cli,
                                                                  unwrap) -> None:
    """`--resume PATH` of a checkpoint in a run folder that was moved or copied (its config records the old
    folder) continues in the folder the checkpoint lies in, says so, and leaves the recorded folder alone;
    --out still names another folder where given."""
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    original = _tree(trained_run)
    checkpoint = moved / "checkpoints" / "step_6.pt"
    shutil.copy(moved / "checkpoints" / "last.pt", checkpoint)  # any checkpoint of the folder, not only last.pt
    result = cli("run", "--resume", checkpoint, "--max-steps", 7)
    assert result.exit_code == 0, result.output
    text = unwrap(result.stderr)
    assert "(preset fashion32, run folder" in text and "settings changed since the checkpoint" in text, text
    assert _tree(trained_run) == original
    assert _config_without(moved / "config.toml")["run"]["out"] == str(moved)
    assert json.loads((moved / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 7
    elsewhere = tmp_path / "elsewhere"
    result = cli("run", "--resume", moved / "checkpoints" / "last.pt", "--out", elsewhere, "--max-steps", 8)
    assert result.exit_code == 0, result.output
    assert _config_without(elsewhere / "config.toml")["run"]["out"] == str(elsewhere)
    assert json.loads((elsewhere / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 8


def test_a_resume_with_a_preset_or_config_lays_them_as_before(trained_run: Path, tmp_path: Path, cli,
                                                              unwrap) -> None:
    """--preset or --config given: they are the base, as for a new run (the checkpoint's config is only compared);
    the dry run names the checkpoint as the source of each value it set otherwise."""
    result = cli("run", "--preset", "fashion32", "--out", trained_run, "--resume", "auto", "--dry-run")
    assert result.exit_code != 0 and "--ndf 16 -> 64" in unwrap(one_error_line(result))
    result = cli("run", "--out", trained_run, "--resume", "auto", "--dry-run", "--json", "-")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    checkpoint = f"checkpoint {trained_run / 'checkpoints' / 'last.pt'}"
    assert plan["config"]["model"]["ngf"] == 16 and plan["resume_changes"] == []
    assert (plan["sources"]["model.ngf"], plan["sources"]["data.limit"], plan["sources"]["model.nz"]) == \
        (checkpoint, checkpoint, "default")


def test_a_config_file_outside_a_run_folder_names_its_out_freely(trained_run: Path, tmp_path: Path) -> None:
    from gantrain.engine.config import resolve

    mine = tmp_path / "config.toml"  # a config.toml of one's own, in a folder that is no run folder
    mine.write_text((trained_run / "config.toml").read_text())
    assert resolve(None, str(mine), {}).run.out == str(trained_run)
    best = tmp_path / "best.toml"
    best.write_text((trained_run / "config.toml").read_text())
    assert resolve(None, str(best), {}).run.out == str(trained_run)
    assert resolve(None, str(trained_run / "config.toml"), {}).run.out == str(trained_run)  # its own folder


def test_a_lock_copied_from_a_live_run_is_not_called_a_killed_run(tiny_cfg, quiet_console) -> None:
    """Before: a copy of a live run's folder carried its lock record, and the copy's first run called it stale
    ("killed?") although that run was alive."""
    import socket

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=1)
        cfg.run_dir.mkdir(parents=True)
        (cfg.run_dir / ".gantrain.lock").write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(),
                                                                 "started": "then"}) + "\n")
        Trainer(cfg, console=quiet_console).fit()
        text = (cfg.run_dir / "train.log").read_text()
        assert f"pid {live.pid} still runs but holds no lock on this folder: the folder was copied from a live run" \
            in text
        assert "killed?" not in text
    finally:
        live.kill()
        live.wait()


def test_dry_run_refuses_what_the_run_would_and_touches_nothing(trained_copy: Path, cli, unwrap,
                                                                 train_root: Path) -> None:
    """Before, --dry-run said yes where the run then refused: a new run into a folder holding one, a --resume
    of another model. Now it refuses the same way (one error line), and for a resume it can make it names what
    changes against the checkpoint; the folder's files are untouched throughout."""
    from gantrain.engine.config import load_toml

    contents = {p: p.read_bytes() for p in trained_copy.rglob("*") if p.is_file()}
    base = ("run", "--dry-run", "--config", trained_copy / "config.toml", "--out", trained_copy,
            "--data-root", train_root)
    result = cli(*base)
    assert result.exit_code == 2 and f"already holds a run; continue it with --resume auto --out {trained_copy} " \
        "or choose another --out" in unwrap(one_error_line(result))
    ndf = load_toml(trained_copy / "config.toml").model.ndf
    result = cli(*base, "--resume", "auto", "--ndf", 2 * ndf)
    assert result.exit_code != 0
    assert f"the checkpoint's model config differs from this run's (--ndf {ndf} -> {2 * ndf})" in \
        unwrap(one_error_line(result))
    result = cli(*base, "--resume", "auto", "--lr-g", "0.00123")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "changed against the checkpoint: --lr-g " in text and "-> 0.00123" in text
    result = cli(*base, "--resume", "auto")  # a copy of the run: only its folder changed
    text = " ".join(result.stdout.split())
    assert result.exit_code == 0 and "changed against the checkpoint: --out " in text and "--lr-g" not in text
    assert {p: p.read_bytes() for p in trained_copy.rglob("*") if p.is_file()} == contents
