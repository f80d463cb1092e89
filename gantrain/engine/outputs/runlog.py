"""Run logging: the console and train.log, metrics.jsonl and the live progress bar (statistics: :mod:`gantrain.engine.train.stats`)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from gantrain.engine.state.files import atomic_write_text, io_error, read_json_lines

log = logging.getLogger("gantrain")


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
PENDING_RECORDS = 100_000  # records held for a log file that does not exist yet (start-up writes a few dozen)


def setup_logging(console: Console, log_file: Path | None = None, level: int = logging.INFO, *,
                  pending: bool = False) -> None:
    """Messages go to the rich console and, when given, to a plain log file in the run folder.

    ``pending``: no file yet; records are held until :func:`attach_log_file` writes them to it, so a run that is
    refused during start-up (bad data, an impossible schedule) leaves no file behind, yet a run that starts
    keeps its start-up lines in train.log, also those held by an earlier pending set-up (the command's, before
    the Trainer's).
    """
    held = [record for handler in log.handlers if isinstance(handler, logging.handlers.MemoryHandler)
            for record in handler.buffer] if pending and log_file is None else []
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(level)
    log.propagate = False
    log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    if log_file is not None:
        attach_log_file(log_file)
    elif pending:
        memory = logging.handlers.MemoryHandler(PENDING_RECORDS, flushLevel=logging.CRITICAL + 1, target=None,
                                                flushOnClose=False)
        memory.buffer.extend(held)
        log.addHandler(memory)


def attach_log_file(log_file: Path) -> None:
    """Starts writing the log to ``log_file``, first the records held since ``setup_logging(pending=True)``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    for held in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(handler)
        held.flush()
        log.removeHandler(held)
        held.close()
    log.addHandler(handler)


def discard_held() -> None:
    """Drops the records held for a log file (``setup_logging(pending=True)``) and stops holding more: a run
    refused during start-up (or a dry run) writes no train.log, and the next run in this process must take
    neither its lines nor what other work logs meanwhile."""
    for handler in [h for h in log.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        handler.buffer.clear()
        log.removeHandler(handler)
        handler.close()


def log_to_file(level: int, message: str) -> None:
    """``message`` into the run's log file only (train.log, or the records held for it), not on the console: for
    a line the command itself then prints (an interruption's ``error:`` line)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in log.handlers:
        if isinstance(handler, (logging.FileHandler, logging.handlers.MemoryHandler)) and level >= handler.level:
            handler.handle(record)


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl; on resume drops records past the resumed step.

    The file stays strict JSON: a NaN or infinite value is written as ``null`` and named, with its kind, under
    ``"nonfinite"`` (``{"loss_d": null, "nonfinite": {"loss_d": "nan"}}``). On resume the file is read
    tolerantly (damaged lines dropped, and said so in one log line) and rewritten atomically, so a kill
    during the rewrite leaves the old history. Raises :class:`RunIOError` when the file cannot be written.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is None:
            atomic_write_text(path, "")
            return
        found = read_json_lines(path)
        if found.skipped:
            log.warning("%s", found.describe_skipped(path, "dropping"))
        kept = [r for r in found.records if r["step"] <= resume_step]
        if len(kept) < len(found.records):
            log.info("%s: dropping %d records logged after step %d, where this run resumes", path,
                     len(found.records) - len(kept), resume_step)
        atomic_write_text(path, "".join(json_line(r) for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json_line(record))
        except OSError as exc:
            raise io_error("append to", self.path, exc) from None


def json_line(record: dict[str, Any]) -> str:
    """One strict-JSON line (RFC 8259 has no NaN or Infinity): non-finite floats become null, listed under
    ``"nonfinite"`` as "nan", "inf" or "-inf"."""
    bad = {k: repr(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        record = {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False) + "\n"


_WARNED: set[str] = set()


def warn_once(notes: list[str]) -> None:
    """Logs each note as a warning the first time this process meets it (an evaluation per epoch repeats them)."""
    for note in notes:
        if note not in _WARNED:
            _WARNED.add(note)
            log.warning("%s", note)


#: Below this console width the bar drops the losses, the quality summary and the elapsed time (never the ETA).
WIDE_BAR = 110


class ImagesPerSecond(ProgressColumn):
    """Images/s from rich's own estimate of steps/s over the last half minute (updated every step, so it shows
    from the first steps on), times the images of a step; then the MFU of that same rate, where the task's
    ``mfu_per_image_s`` field gives the fraction of the peak one image per second is (metrics.jsonl keeps the
    figures of each log window)."""

    def __init__(self, images_per_step: int) -> None:
        super().__init__()
        self.images_per_step = images_per_step

    def render(self, task) -> Text:
        speed = task.speed
        if not speed:
            return Text("- img/s")
        images_per_s = speed * self.images_per_step
        scale = task.fields.get("mfu_per_image_s")
        return Text(f"{images_per_s:,.0f} img/s" + (f", MFU {images_per_s * scale:.0%}" if scale else ""))


def progress_bar(console: Console, images_per_step: int = 1) -> Progress:
    """The training bar: epoch (of the run's real total), steps, images/s (and MFU), ETA; on a console of at least
    :data:`WIDE_BAR` columns also the losses, the quality summary and the elapsed time. Refreshed 4 times a
    second from the step counter the loop advances every step."""
    wide = console.width >= WIDE_BAR
    columns = [TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(bar_width=None if wide else 12),
               MofNCompleteColumn()]
    if wide:
        columns.append(TextColumn("D {task.fields[loss_d]} G {task.fields[loss_g]} |"))
    columns.append(ImagesPerSecond(images_per_step))
    if wide:
        columns += [TextColumn("{task.fields[quality]}"), TimeElapsedColumn()]
    columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False, refresh_per_second=4, speed_estimate_period=30.0)
