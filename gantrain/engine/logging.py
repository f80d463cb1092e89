"""Run logging: on-device statistics, per-phase timers, metrics.jsonl and the live progress bar."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gantrain.engine.files import atomic_write_text, io_error, read_json_lines

log = logging.getLogger("gantrain")


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
PENDING_RECORDS = 100_000  # records held for a log file that does not exist yet (start-up writes a few dozen)


def setup_logging(console: Console, log_file: Path | None = None, level: int = logging.INFO, *,
                  pending: bool = False) -> None:
    """Messages go to the rich console and, when given, to a plain log file in the run folder.

    ``pending``: no file yet; records are held until :func:`attach_log_file` writes them to it, so a run that is
    refused during start-up (bad data, an impossible schedule) leaves no file behind, yet a run that starts
    keeps its start-up lines in train.log.
    """
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(level)
    log.propagate = False
    log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    if log_file is not None:
        attach_log_file(log_file)
    elif pending:
        log.addHandler(logging.handlers.MemoryHandler(PENDING_RECORDS, flushLevel=logging.CRITICAL + 1, target=None,
                                                      flushOnClose=False))


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


class DeviceStats:
    """Sums step statistics on the device; only :meth:`read` synchronises with the host."""

    KEYS = ("loss_d", "loss_g", "d_real", "d_fake")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.KEYS), device=device)
        self.count = 0

    def add(self, *values: torch.Tensor) -> None:
        self.sums += torch.stack([v.detach().float() for v in values])
        self.count += 1

    def read(self) -> dict[str, float]:
        """Means since the last read, then reset. Deliberate host sync: called only at the log interval."""
        if self.count == 0:
            return {}
        sums = self.sums
        if torch.distributed.is_initialized():  # every rank reads at the same step: average over ranks
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
            sums /= torch.distributed.get_world_size()
        means = (sums / self.count).tolist()
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.KEYS, means))


class PhaseTimer:
    """Wall time per named phase (data, d_step, g_step), also marked for torch.profiler.

    On CUDA the phases are bracketed by events and resolved only in :meth:`read_ms`, so timing adds no
    host sync to the hot loop; on the CPU the ops are synchronous and host time is exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_ms: dict[str, float] = defaultdict(float)
        self.events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)

    @contextlib.contextmanager
    def phase(self, name: str):
        with torch.profiler.record_function(name):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self.events[name].append((start, end))
            else:
                t0 = time.perf_counter()
                yield
                self.host_ms[name] += (time.perf_counter() - t0) * 1e3

    def read_ms(self) -> dict[str, float]:
        """Total milliseconds per phase since the last read, then reset."""
        totals = dict(self.host_ms)
        if self.events:
            torch.cuda.synchronize()  # deliberate: resolve the events at the log interval only
            for name, pairs in self.events.items():
                totals[name] = totals.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs)
        self.host_ms.clear()
        self.events.clear()
        return totals


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


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("D {task.fields[loss_d]} G {task.fields[loss_g]} | {task.fields[images_per_s]} img/s{task.fields[quality]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
