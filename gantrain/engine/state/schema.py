"""The checkpoint schema: a dict of tensors and builtins (loadable with ``weights_only=True``) holding one sub-dict
per component that contributes to it (:data:`KEYS`), a version, and :func:`upgrade` from every older version.

Version 3 on disk: ``{"format", "version": 3, "gan": {...}, "position": {...}, "run": {...}, "quality": {...},
"digest"}``; the envelope (``format``, ``version``, ``digest``) is written by the checkpoint module.

Version history (what :func:`upgrade` turns into the current version, one step at a time):

- 1 (gantrain 0.1.0 until the v2 schema): one flat dict: ``format``, ``version``, the GAN part, ``step``,
  ``epoch``, ``config``, ``world_size``; later files add, one by one, ``digest``, ``epoch_images``,
  ``images_seen``, ``global_batch``, ``num_images``, ``best_fd``, ``best_fd_measured_by``, ``planned_steps``.
  Any of these may be absent.
- 2: still flat; every key of :data:`KEYS` is present; a value the writer did not know is ``None`` (see
  :data:`NULLABLE`).
- 3: nested by component: each part of :data:`KEYS` is a sub-dict under its component's name (``generator_ema``,
  when kept, in ``gan``); the keys and their values are those of version 2.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gantrain.engine.errors import CheckpointError

FORMAT = "gantrain-checkpoint"
VERSION = 3

#: The top-level parts, each a sub-dict of the keys its component contributes.
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
#: Keys of a part present only sometimes: the EMA generator only when the run keeps one (--ema).
OPTIONAL: dict[str, tuple[str, ...]] = {"gan": ("generator_ema",)}
#: Keys whose value may be None: unknown to the writer (an upgraded version-1 file) or not measured yet.
NULLABLE = ("epoch_images", "num_images", "planned_steps", "best_fd", "best_fd_measured_by")
#: Written around the body by the checkpoint module (:func:`~gantrain.engine.state.checkpoint.sealed`).
ENVELOPE = ("format", "version", "digest")

#: The part each key belongs to.
PART_OF: dict[str, str] = {key: name for name, keys in KEYS.items() for key in (*keys, *OPTIONAL.get(name, ()))}


def assemble(**parts: Mapping[str, Any]) -> dict[str, Any]:
    """One checkpoint body, ``{"gan": {...}, "position": {...}, ...}``, from each component's part
    (``gan=..., position=..., run=..., quality=...``).

    Raises ``ValueError`` when a part lacks one of its keys or holds one it does not own: a component that
    forgot a key would otherwise write files that only fail on resume."""
    if sorted(parts) != sorted(KEYS):
        raise ValueError(f"checkpoint parts {sorted(parts)}, expected {sorted(KEYS)}")
    body: dict[str, Any] = {}
    for name, keys in KEYS.items():
        part = parts[name]
        missing, foreign = set(keys) - set(part), set(part) - set(keys) - set(OPTIONAL.get(name, ()))
        if missing or foreign:
            raise ValueError(f"checkpoint part {name!r}: missing {sorted(missing)}, not its own {sorted(foreign)}")
        body[name] = dict(part)
    return body


@dataclass(frozen=True)
class Parts:
    """A checkpoint (current version) by its parts, as attributes (a view: nothing is copied); the one place
    outside :func:`assemble` and :func:`upgrade` that names them."""

    gan: dict[str, Any]
    position: dict[str, Any]
    run: dict[str, Any]
    quality: dict[str, Any]

    @classmethod
    def of(cls, state: Mapping[str, Any]) -> Parts:
        return cls(**{name: state[name] for name in KEYS})

    @property
    def step(self) -> int:
        """The optimiser step it was written at."""
        return int(self.position["step"])

    @property
    def config(self) -> dict[str, Any]:
        """The resolved config of the run that wrote it (``Config.to_dict``)."""
        return self.run["config"]


def step_of(state: Mapping[str, Any]) -> int:
    """The optimiser step a checkpoint (current version) was written at."""
    return Parts.of(state).step


def generator_weights(gan: Mapping[str, Any], use_ema: bool = True) -> tuple[dict[str, Any], str]:
    """The generator weights a checkpoint's images come from, given its ``"gan"`` part: the EMA generator's when
    ``use_ema`` and the run kept one, else G's; and which they are ("EMA generator" or "generator")."""
    if use_ema and "generator_ema" in gan:
        return gan["generator_ema"], "EMA generator"
    return gan["generator"], "generator"


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
    if version <= 2:
        state = _from_v2(state)
    missing: list[str] = []
    for name, keys in KEYS.items():
        part = state.get(name)
        missing += [key for key in keys if key not in part] if isinstance(part, Mapping) else [name]
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
    return {**state, "version": 2, "scaler": state.get("scaler") or {}, "epoch": int(state.get("epoch", 0)),
            "epoch_images": state.get("epoch_images"), "images_seen": seen, "global_batch": batch,
            "num_images": state.get("num_images"), "world_size": world, "planned_steps": state.get("planned_steps"),
            "best_fd": state.get("best_fd"), "best_fd_measured_by": state.get("best_fd_measured_by")}


def _from_v2(state: dict[str, Any]) -> dict[str, Any]:
    """Version 2 -> 3: each key moves into its component's part (the key order of :data:`KEYS`); keys of no part
    are dropped. A key the file lacks stays absent, for :func:`upgrade` to name."""
    nested: dict[str, Any] = {"format": state["format"], "version": 3}
    for name, keys in KEYS.items():
        nested[name] = {key: state[key] for key in (*keys, *OPTIONAL.get(name, ())) if key in state}
    return nested
