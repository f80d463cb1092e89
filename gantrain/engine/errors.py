"""Errors the CLI turns into one clear line and a non-zero exit code (never a traceback)."""

from __future__ import annotations

import signal
from pathlib import Path


class GantrainError(Exception):
    """A user-facing error; ``exit_code`` is what the CLI exits with. ``final``: a property of the config, the
    data, the checkpoint or the run folder, which a restart of the same run meets again (a multi-process launch
    does not restart its workers for it; see :mod:`gantrain.engine.dist.worker`)."""

    exit_code = 1
    final = True


class ConfigError(GantrainError):
    """An invalid configuration value, named by its CLI flag."""

    exit_code = 2


class DataError(GantrainError):
    """Missing, corrupt or unreadable training data."""


class DataNotFound(DataError):
    """No training data where the flags point (a missing --data-root, a folder without images, a dataset that is
    not on this machine): a wrong setting, exit 2 like one."""

    exit_code = 2


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


class LostPeers(GantrainError):
    """A collective failed because another DDP worker is gone (killed, crashed, its node lost): a restart of the
    worker group cures it."""

    final = False


class Interrupted(GantrainError):
    """A signal (SIGINT, SIGTERM, SIGHUP) stopped a run or a tune experiment; ``exit_code`` is 128 + its number.

    ``checkpoint``: what the run saved on the way out (None: nothing); ``step``: where training stopped (None:
    before the training loop, or no run, as for an experiment). The message says how to continue."""

    def __init__(self, signum: int, message: str | None = None, *, checkpoint: Path | None = None,
                 step: int | None = None) -> None:
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.final = False
        self.signum, self.exit_code, self.checkpoint, self.step = signum, 128 + signum, checkpoint, step


def rebuild(kind: str, message: str, exit_code: int, final: bool = True) -> GantrainError:
    """The error another process raised, by its class name (:class:`GantrainError` for a name not in this module),
    with its message, exit code and ``final``: how a launcher (or another rank) says a worker's error as the
    worker would have. An :class:`Interrupted` comes back as one, with its signal."""
    if kind == "Interrupted":
        return Interrupted(exit_code - 128, message)
    cls = globals().get(kind)
    if not (isinstance(cls, type) and issubclass(cls, GantrainError)):
        cls = GantrainError
    error = cls(message)
    error.exit_code, error.final = exit_code, final
    return error
