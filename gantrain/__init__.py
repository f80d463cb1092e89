"""gantrain: a performance-tuned DCGAN training engine.

The Python API, for notebooks and scripts (:mod:`gantrain.api`; the engine is imported on first use, so
``import gantrain`` stays light)::

    import gantrain
    result = gantrain.train("fashion32-tuned", max_steps=300, out="runs/nb")   # as `gantrain run` does
    grid = gantrain.generate(result.last_checkpoint, n=16, out="grid.png")       # as `gantrain generate` does
    generator, cfg = gantrain.load_generator(result.last_checkpoint)             # the nn.Module and its config

The engine's own API (the Trainer, configs, metrics) is ``gantrain.engine``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
API = ("train", "generate", "load_generator")
__all__ = ["__version__", *API]


def __getattr__(name: str) -> Any:
    if name not in API:
        raise AttributeError(f"module 'gantrain' has no attribute {name!r}")
    return getattr(importlib.import_module("gantrain.api"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
