"""A complete checkpoint body of the current schema with small placeholder values, for tests of the files
around it (pruning, tune's newest-checkpoint search) rather than of its contents."""

from __future__ import annotations

from typing import Any

import torch

from gantrain.engine.state.schema import KEYS, NULLABLE


def placeholder_state(step: int, **values: Any) -> dict[str, Any]:
    state: dict[str, Any] = {key: None if key in NULLABLE else 0 for keys in KEYS.values() for key in keys}
    state.update(generator={"w": torch.zeros(1)}, discriminator={"w": torch.zeros(1)}, opt_g={}, opt_d={},
                 scaler={}, rng={}, config={}, world_size=1, step=step)
    state.update(values)
    return state
