"""Errors the CLI turns into one clear line and a non-zero exit code (never a traceback)."""


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
