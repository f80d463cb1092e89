"""--profile-steps A:B: torch.profiler around steps A..B of a run (rank 0), written into the run folder as a
Chrome/Perfetto trace and a table of the costliest ops. The phases are the PhaseTimer's ``record_function``
ranges (data, d_step, g_step), so the trace shows them by name. Off, the Trainer holds no profiler at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from gantrain.engine.errors import RunIOError
from gantrain.engine.state.files import atomic_write_text, io_error, make_folder

log = logging.getLogger("gantrain")

#: Rows of the top-ops table.
TOP_OPS = 30


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto (the profiler's C++ core) prints a ``USDT: ... profiler_start``/``_stop`` line straight to file
    descriptor 2 on every start and stop; the run's console says what happened instead."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class StepProfiler:
    """Profiles optimiser steps ``first``..``last`` (both included, counted from 1): :meth:`before_step` with the
    number of the step about to run starts it, :meth:`after_step` with the step just done ends it after ``last``
    and writes ``trace_steps_A-B.json`` (Chrome/Perfetto: chrome://tracing, ui.perfetto.dev) and
    ``top_ops_steps_A-B.txt`` into ``folder``. Raises :class:`~gantrain.engine.errors.RunIOError` when they cannot
    be written."""

    def __init__(self, first: int, last: int, folder: Path, device: torch.device) -> None:
        self.first, self.last, self.folder, self.device = first, last, folder, device
        self.active: torch.profiler.profile | None = None
        self.done = False

    def announce(self, start_step: int, total_steps: int) -> None:
        """One line: what will be profiled, or why nothing will (the run starts after B or ends before A)."""
        if start_step >= self.last or total_steps < self.first:
            self.done = True
            log.warning("--profile-steps %d:%d: this run takes steps %d to %d; nothing is profiled", self.first,
                        self.last, start_step + 1, total_steps)
            return
        first, last = max(self.first, start_step + 1), min(self.last, total_steps)
        self.first, self.last = first, last
        log.info("--profile-steps: profiling steps %d to %d into %s", first, last, self.folder)

    def before_step(self, step: int) -> None:
        if self.active is None and not self.done and step == self.first:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.active = torch.profiler.profile(activities=activities, record_shapes=True)
            with _native_stderr_silenced():
                self.active.__enter__()

    def after_step(self, step: int) -> Path | None:
        """Ends the profile after its last step (or when the run stops early: ``step`` past it is fine); returns
        the trace written, else None. A trace that cannot be written is a warning: the run goes on."""
        if self.active is None or step < self.last:
            return None
        try:
            return self.finish(step)
        except RunIOError as exc:
            log.warning("--profile-steps: %s; the run goes on without its profile", exc)
            return None

    def discard(self) -> None:
        """Stops a running profile without writing it (the run failed or was stopped inside the range)."""
        if self.active is not None:
            profile, self.active, self.done = self.active, None, True
            with _native_stderr_silenced():
                profile.__exit__(None, None, None)

    def finish(self, step: int) -> Path | None:
        """Stops a running profile (at the run's end or stop) and writes what it holds."""
        if self.active is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        profile, self.active, self.done = self.active, None, True
        with _native_stderr_silenced():
            profile.__exit__(None, None, None)
        last = min(step, self.last)
        trace = self.folder / f"trace_steps_{self.first}-{last}.json"
        table = self.folder / f"top_ops_steps_{self.first}-{last}.txt"
        make_folder(self.folder)
        part = trace.with_name(f".{trace.name}.part")
        try:
            profile.export_chrome_trace(str(part))
            os.replace(part, trace)
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise io_error("write", trace, exc) from None
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        atomic_write_text(table, f"torch.profiler, steps {self.first} to {last} ({last - self.first + 1} steps), "
                                 f"sorted by {sort}\n\n"
                                 + profile.key_averages().table(sort_by=sort, row_limit=TOP_OPS) + "\n")
        log.info("profiled steps %d to %d: %s (open in ui.perfetto.dev), %s", self.first, last, trace, table.name)
        return trace
