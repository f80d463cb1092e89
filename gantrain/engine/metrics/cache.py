"""The metrics cache: fitted feature extractors and real-data features, keyed by content hashes.

Location: ``--metrics-cache`` (config field ``eval.metrics_cache``), else ``$GANTRAIN_CACHE``, else
``$XDG_CACHE_HOME/gantrain/metrics``, else ``~/.cache/gantrain/metrics``. Files are written atomically, so
two processes filling the cache at once leave complete files; a corrupt or foreign file is treated as absent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gantrain.engine.state.checkpoint import atomic_save
from gantrain.engine.state.files import cache_dir  # noqa: F401 - re-exported: where the metrics find it

_READ_BLOCK_BYTES = 1 << 20


def sha256_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """Content hash of files in the given order; with ``root``, relative names are hashed too (renames count)."""
    digest = hashlib.sha256()
    for path in paths:
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_READ_BLOCK_BYTES), b""):
                digest.update(block)
    return digest.hexdigest()


def save_artifact(obj: dict[str, Any], path: Path) -> Path:
    atomic_save(obj, path)
    return path


def load_artifact(path: Path) -> dict[str, Any] | None:
    """A cached dict of tensors and builtins, or None when absent or unreadable (the caller recomputes it)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a torn or foreign file: recompute rather than fail the run
        return None
    return state if isinstance(state, dict) else None
