"""The run log's held records: lines said before the run folder exists reach its train.log, and only its own."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from rich.console import Console

from gantrain.engine.outputs.runlog import attach_log_file, discard_held, log, setup_logging


@pytest.fixture()
def console() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(autouse=True)
def _restore_handlers():
    discard_held()  # what earlier tests of the session left held is not these tests' lines
    saved, level, propagate = list(log.handlers), log.level, log.propagate
    yield
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    for handler in saved:
        log.addHandler(handler)
    log.setLevel(level)
    log.propagate = propagate


def _lines(path: Path) -> list[str]:
    """The messages of a log file, without the time and level LOG_FORMAT puts before them."""
    return [line.split(" ", 3)[3] for line in path.read_text().splitlines()]


def test_a_second_pending_setup_keeps_what_the_first_held(console: Console, tmp_path: Path) -> None:
    """The command holds its lines (the resume's config source) before the Trainer sets up its own pending log;
    both reach the file, in order, and the console shows each once."""
    setup_logging(console, pending=True)
    log.info("first, from the command")
    setup_logging(console, pending=True)
    log.warning("second, from the run's start-up")
    attach_log_file(tmp_path / "train.log")
    log.info("third, once the file exists")
    assert _lines(tmp_path / "train.log") == ["first, from the command", "second, from the run's start-up",
                                              "third, once the file exists"]
    shown = console.file.getvalue()
    assert [shown.count(word) for word in ("first", "second", "third")] == [1, 1, 1]


def test_a_refused_start_leaves_nothing_for_the_next_run(console: Console, tmp_path: Path) -> None:
    setup_logging(console, pending=True)
    log.info("a refused run's line")
    discard_held()
    log.info("other work's line, logged before the next run")  # not held: nothing holds lines now
    assert not [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]
    setup_logging(console, pending=True)
    log.info("the next run's line")
    attach_log_file(tmp_path / "train.log")
    assert _lines(tmp_path / "train.log") == ["the next run's line"]


def test_a_setup_with_a_file_or_without_pending_holds_nothing_over(console: Console, tmp_path: Path) -> None:
    """Only a pending set-up takes held lines over; one that writes a file at once (tune's) starts it clean, and
    one without a file holds nothing."""
    setup_logging(console, pending=True)
    log.info("held, then dropped")
    setup_logging(console, tmp_path / "tune.log")
    log.info("tune's own")
    assert _lines(tmp_path / "tune.log") == ["tune's own"]
    setup_logging(console)
    assert not [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]


def test_the_bars_mfu_is_that_of_the_rate_it_shows() -> None:
    """Before: the bar's img/s was rich's estimate over its last half minute and its MFU the last log window's,
    so they disagreed (`19 img/s, MFU 28%` where 19 img/s is 12%; `936 img/s, MFU 0%` under --compile)."""
    from types import SimpleNamespace

    from gantrain.engine.outputs.runlog import ImagesPerSecond

    column = ImagesPerSecond(images_per_step=32)
    flops, peak_tflops = 0.41e9, 0.4
    task = SimpleNamespace(speed=2.5, fields={"mfu_per_image_s": flops / (peak_tflops * 1e12)})
    # 2.5 steps/s x 32 = 80 img/s; 80 x 0.41 GFLOP = 32.8 GFLOP/s of 400: 8.2%
    assert column.render(task).plain == "80 img/s, MFU 8%"
    task.speed = 50.0  # 1,600 img/s: 164%, as computed (a peak probe can read low)
    assert column.render(task).plain == "1,600 img/s, MFU 164%"
    assert column.render(SimpleNamespace(speed=2.5, fields={"mfu_per_image_s": None})).plain == "80 img/s"
    assert column.render(SimpleNamespace(speed=None, fields={})).plain == "- img/s"
