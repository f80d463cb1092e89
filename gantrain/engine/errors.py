"""Errors the CLI turns into one clear line and a non-zero exit code (never a traceback)."""

from __future__ import annotations

import signal
from pathlib import Path


class GantrainError(Exception):
    """A user-facing error; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class ConfigError(GantrainError):
    """An invalid configuration value, named by its CLI flag."""

    exit_code = 2


class DataError(GantrainError):
    """Missing, corrupt or unreadable training data."""


class CheckpointError(GantrainError):
    """A checkpoint that is missing, corrupt or does not match the config."""


class RunIOError(GantrainError):
    """A file or folder gantrain could not write or read (disk full, read-only, a file where a folder should
    be); the message names the path and the operating system's reason."""


class RunLocked(GantrainError):
    """The run folder is in use by another gantrain run."""

    exit_code = 2


class TrainingDiverged(GantrainError):
    """Losses or weights became non-finite; the message names the step and the last finite checkpoint."""


class Interrupted(GantrainError):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped a run or a tune experiment; ``exit_code`` is 128 + its number.

    ``checkpoint``: what the run saved on the way out (None: nothing); ``step``: where training stopped (None:
    before the training loop, or no run, as for an experiment). The message says how to continue."""

    def __init__(self, signum: int, message: str | None = None, *, checkpoint: Path | None = None,
                 step: int | None = None) -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum, self.exit_code, self.checkpoint, self.step = signum, 128 + signum, checkpoint, step
