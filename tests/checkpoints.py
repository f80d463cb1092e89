"""A complete checkpoint body of the current schema with small placeholder values, for tests of the files
around it (pruning, tune's newest-checkpoint search) rather than of its contents; and a current body in the flat
layout of versions 1 and 2, for tests of older files."""

from __future__ import annotations

from typing import Any

import torch

from gantrain.engine.state.schema import KEYS, NULLABLE, PART_OF


def placeholder_state(step: int, **values: Any) -> dict[str, Any]:
    """The body by part (``{"gan": {...}, "position": {...}, ...}``); ``values`` by key name, each put in its part."""
    flat: dict[str, Any] = {key: None if key in NULLABLE else 0 for keys in KEYS.values() for key in keys}
    flat.update(generator={"w": torch.zeros(1)}, discriminator={"w": torch.zeros(1)}, opt_g={}, opt_d={},
                scaler={}, rng={}, config={}, world_size=1, step=step)
    flat.update(values)
    state: dict[str, Any] = {name: {} for name in KEYS}
    for key, value in flat.items():
        state[PART_OF[key]][key] = value
    return state


def flattened(state: dict[str, Any]) -> dict[str, Any]:
    """A current-version checkpoint (or body) as versions 1 and 2 held it: its parts' keys at the top level, without
    the envelope (``format``, ``version``, ``digest``)."""
    return {key: value for name in KEYS if name in state for key, value in state[name].items()}
