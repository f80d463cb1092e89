"""The checkpoint schema: one flat dict of tensors and builtins (loadable with ``weights_only=True``), its keys
grouped by the component that writes them, a version, and :func:`upgrade` from every older version.

Version history (what :func:`upgrade` turns into the current version):

- 1 (gantrain 0.1.0 until this schema): ``format``, ``version``, the GAN part, ``step``, ``epoch``, ``config``,
  ``world_size``; later files add, one by one, ``digest``, ``epoch_images``, ``images_seen``, ``global_batch``,
  ``num_images``, ``best_fd``, ``best_fd_measured_by``, ``planned_steps``. Any of these may be absent.
- 2: every key of :data:`KEYS` is present; a value the writer did not know is ``None`` (see :data:`NULLABLE`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gantrain.engine.errors import CheckpointError

FORMAT = "gantrain-checkpoint"
VERSION = 2

#: The top-level keys, by the component that contributes them.
KEYS: dict[str, tuple[str, ...]] = {
    # GANStep.state_dict: weights, optimisers, GradScaler, RNG streams ({"torch", "noise", "cuda"?, "ranks"?})
    "gan": ("generator", "discriminator", "opt_g", "opt_d", "scaler", "rng"),
    # Position.state: the place in the data, in images
    "position": ("step", "epoch", "epoch_images", "images_seen", "global_batch", "num_images"),
    # the Trainer: the resolved config (Config.to_dict), the process count, the step the run was planned to end at
    "run": ("config", "world_size", "planned_steps"),
    # the quality tracker: the lowest FD so far and how it was measured (QualityTracker.measured_by)
    "quality": ("best_fd", "best_fd_measured_by"),
}
#: Present only when the run keeps one (--ema).
OPTIONAL = ("generator_ema",)
#: Keys whose value may be None: unknown to the writer (an upgraded version-1 file) or not measured yet.
NULLABLE = ("epoch_images", "num_images", "planned_steps", "best_fd", "best_fd_measured_by")
#: Written around the body by the checkpoint module (:func:`~gantrain.engine.state.checkpoint.sealed`).
ENVELOPE = ("format", "version", "digest")

REQUIRED = tuple(key for keys in KEYS.values() for key in keys)


def assemble(**parts: Mapping[str, Any]) -> dict[str, Any]:
    """One checkpoint body from each component's part (``gan=..., position=..., run=..., quality=...``).

    Raises ``ValueError`` when a part lacks one of its keys or holds one it does not own: a component that
    forgot a key would otherwise write files that only fail on resume."""
    if sorted(parts) != sorted(KEYS):
        raise ValueError(f"checkpoint parts {sorted(parts)}, expected {sorted(KEYS)}")
    body: dict[str, Any] = {}
    for name, part in parts.items():
        owned = set(KEYS[name]) | (set(OPTIONAL) if name == "gan" else set())
        missing, foreign = set(KEYS[name]) - set(part), set(part) - owned
        if missing or foreign:
            raise ValueError(f"checkpoint part {name!r}: missing {sorted(missing)}, not its own {sorted(foreign)}")
        body.update(part)
    return body


def generator_weights(state: Mapping[str, Any], use_ema: bool = True) -> tuple[dict[str, Any], str]:
    """The generator weights a checkpoint's images come from: the EMA generator's when ``use_ema`` and the run kept
    one, else G's; and which they are ("EMA generator" or "generator")."""
    if use_ema and "generator_ema" in state:
        return state["generator_ema"], "EMA generator"
    return state["generator"], "generator"


def upgrade(state: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """``state`` (its envelope checked, ``digest`` removed) in the current version; raises :class:`CheckpointError`
    for a version this gantrain does not know or a file that lacks what its version always held."""
    version = state.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an unknown checkpoint version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version}, written by a newer gantrain; this one "
                              f"reads versions 1 to {VERSION}: upgrade gantrain to resume it")
    if version == 1:
        state = _from_v1(state, path)
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: not a complete gantrain checkpoint")
    return state


def _from_v1(state: dict[str, Any], path: Path | str) -> dict[str, Any]:
    """Version 1 -> 2: absent keys take what the code that wrote the file meant by their absence."""
    for key in ("generator", "discriminator", "opt_g", "opt_d", "rng", "step", "config"):
        if key not in state:
            raise CheckpointError(f"{path} lacks {key}: not a complete gantrain checkpoint")
    world = int(state.get("world_size", 1))
    batch = state.get("global_batch")
    if not batch:  # before it was stored: the per-process batch of the saved config times the processes
        per_process = state["config"].get("data", {}).get("batch_size")
        batch = int(per_process) * world if per_process else None
    seen = state.get("images_seen")
    if seen is None and batch:
        seen = int(state["step"]) * batch
    return {**state, "version": VERSION, "scaler": state.get("scaler") or {}, "epoch": int(state.get("epoch", 0)),
            "epoch_images": state.get("epoch_images"), "images_seen": seen, "global_batch": batch,
            "num_images": state.get("num_images"), "world_size": world, "planned_steps": state.get("planned_steps"),
            "best_fd": state.get("best_fd"), "best_fd_measured_by": state.get("best_fd_measured_by")}
