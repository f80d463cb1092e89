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
