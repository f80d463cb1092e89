"""Run logging: on-device statistics, per-phase timers, metrics.jsonl and the live progress bar."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger("gantrain")


def setup_logging(console: Console, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Messages go to the rich console and, when given, to a plain log file in the run folder."""
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    log.setLevel(level)
    log.propagate = False
    log.addHandler(RichHandler(console=console, show_path=False, show_time=False, markup=False))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)


class DeviceStats:
    """Sums step statistics on the device; only :meth:`read` synchronises with the host."""

    KEYS = ("loss_d", "loss_g", "d_real", "d_fake")

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(len(self.KEYS), device=device)
        self.count = 0
        # what the log reads took since the last read_epoch (may start negative: see read_epoch)
        self.epoch_sums = torch.zeros(len(self.KEYS), device=device)
        self.epoch_count = 0

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
        self.epoch_sums += self.sums
        self.epoch_count += self.count
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.KEYS, means))

    def read_epoch(self) -> dict[str, float]:
        """This process's means over the steps since the last call (an epoch), whatever the log interval; one
        host sync. The open log window is left as it is, so the next :meth:`read` still covers all its steps."""
        count = self.epoch_count + self.count
        if count == 0:
            return {}
        means = ((self.epoch_sums + self.sums) / count).tolist()
        # the open window's steps belong to this epoch: the next epoch starts without them
        self.epoch_sums = -self.sums.clone()
        self.epoch_count = -self.count
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
    """Appends one JSON object per line to metrics.jsonl; on resume drops records past the resumed step."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


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
