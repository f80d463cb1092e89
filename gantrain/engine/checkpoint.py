"""Checkpoints: written atomically (temp file, fsync, rename), ``last.pt`` plus numbered ones, the last K kept.

A checkpoint is a plain dict of tensors and builtins (loadable with ``weights_only=True``): G, D, the G EMA
when on, both optimisers, the GradScaler, step and epoch, every RNG state the run draws from, and the
resolved config. A SHA-256 of every value in it is stored alongside (``digest``) and checked on load:
torch's zip reader does not check CRCs, so without it a checkpoint damaged in the middle of its weights
would load silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gantrain.engine.errors import CheckpointError
from gantrain.engine.files import atomic_write, io_error

FORMAT = "gantrain-checkpoint"
VERSION = 1
_NUMBERED = re.compile(r"step_(\d+)\.pt$")


def state_digest(state: Any) -> str:
    """SHA-256 over a checkpoint's values in order: tensors by dtype, shape and bytes, the rest by ``repr``."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself, no copy
        elif isinstance(value, dict):
            for key, item in value.items():
                digest.update(f"K{key!r}".encode())
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(state)
    return digest.hexdigest()


def sealed(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with the checkpoint format, version and ``digest`` that :func:`load_checkpoint` checks."""
    body = {"format": FORMAT, "version": VERSION, **state}
    return {**body, "digest": state_digest(body)}


def atomic_save(obj: Any, path: Path) -> None:
    """Writes ``obj`` so that ``path`` holds either the old file or the complete new one, never a torn write.

    Raises :class:`~gantrain.engine.errors.RunIOError` naming ``path`` when the write fails (a full disk, a
    read-only folder); torch reports those as a bare 'unexpected pos' RuntimeError, which says neither.
    """
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _atomic_link(source: Path, path: Path) -> None:
    """Points ``path`` at ``source``'s bytes atomically (hard link, or a copy where links are not allowed)."""
    tmp = path.with_name(f".{path.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise io_error("write", path, exc) from None


def save_checkpoint(state: dict[str, Any], folder: Path, step: int, keep: int) -> Path:
    """Saves ``state`` as ``step_NNNNNNNN.pt`` and ``last.pt``; removes numbered ones beyond the last ``keep``."""
    numbered = folder / f"step_{step:08d}.pt"
    atomic_save(sealed(state), numbered)
    _atomic_link(numbered, folder / "last.pt")
    for old in numbered_checkpoints(folder)[:-keep]:
        try:
            old.unlink(missing_ok=True)
        except OSError as exc:
            raise io_error("remove the old checkpoint", old, exc) from None
    return numbered


def save_best(folder: Path, step: int, state: Callable[[], dict[str, Any]]) -> Path:
    """``best.pt``: the step's numbered checkpoint (hard-linked, or copied, atomically) when there is one, else
    ``state()`` written anew. Numbered files are only ever replaced, never rewritten, so the link stays intact."""
    numbered, best = folder / f"step_{step:08d}.pt", folder / "best.pt"
    if numbered.is_file():
        _atomic_link(numbered, best)
    else:
        atomic_save(sealed(state()), best)
    return best


def numbered_checkpoints(folder: Path) -> list[Path]:
    found = [p for p in folder.glob("step_*.pt") if _NUMBERED.search(p.name)]
    return sorted(found, key=lambda p: int(_NUMBERED.search(p.name).group(1)))  # type: ignore[union-attr]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads and checks a checkpoint on the CPU; any problem is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gantrain checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this gantrain reads {VERSION}")
    stored = state.pop("digest", None)  # absent in checkpoints written before digests were added
    if stored is not None and stored != state_digest(state):
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum stored in it")
    return state


def find_resume(resume: str, run_dir: Path) -> Path:
    """``--resume auto`` means the run folder's ``last.pt``; anything else is a path."""
    if resume != "auto":
        return Path(resume)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise CheckpointError(f"--resume auto: no checkpoint in {last.parent} (is --out the run folder?)")
    return last


def check_finite(weights: dict[str, torch.Tensor], what: str, path: Path | str) -> None:
    """Raises :class:`CheckpointError` when any floating-point tensor of ``weights`` (a module state dict)
    holds NaN or infinity: images or training from such weights would be garbage that looks like a result."""
    bad = sum(int(torch.count_nonzero(~torch.isfinite(t))) for t in weights.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point())
    if bad:
        total = sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point())
        raise CheckpointError(f"{path}: the {what} holds {bad:,} non-finite values of {total:,} (training had "
                              "diverged when it was saved); use an earlier checkpoint")


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path | str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: the {what} weights do not match this model config ({first})") from None
