"""Atomic writes give files the mode a plain open() would: colleagues on a shared machine can read a run."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gantrain.engine.state.files import atomic_write_text, current_umask


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_0666_less_the_umask(tmp_path: Path, umask, mask: int, mode: int) -> None:
    umask(mask)
    assert current_umask() == mask
    written = atomic_write_text(tmp_path / "a.txt", "x")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() does: the reference
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == mode


def test_a_replaced_file_keeps_its_mode(tmp_path: Path, umask) -> None:
    umask(0o022)
    path = tmp_path / "config.toml"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_every_file_of_a_run_is_readable_by_others_under_umask_022(trained_run: Path) -> None:
    """The shared tiny run (written by this test process, whose umask pytest leaves at the usual 022)."""
    if current_umask() & 0o044:
        pytest.skip("this test process runs under a umask that hides files from others")
    private = [str(p.relative_to(trained_run)) for p in trained_run.rglob("*")
               if p.is_file() and not stat.S_IMODE(p.stat().st_mode) & 0o044]
    assert private == []


def test_an_export_and_a_json_report_are_readable_by_others_too(trained_run: Path, cli, tmp_path: Path) -> None:
    """The other files a user makes from a run: the exported generator and `gantrain eval --json`'s report."""
    if current_umask() & 0o044:
        pytest.skip("this test process runs under a umask that hides files from others")
    export, report = tmp_path / "g.safetensors", tmp_path / "eval.json"
    assert cli("export", trained_run / "checkpoints" / "last.pt", "--out", export).exit_code == 0
    assert cli("eval", export, "-n", "100", "--json", report).exit_code == 0
    for path in (export, report):
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path
