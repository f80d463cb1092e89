"""`gantrain tune`: Ray Tune searches over the training config, optimising a quality metric of the generator.

Modules: :mod:`~gantrain.tune.settings` (the experiment's options), :mod:`~gantrain.tune.space` (the search
space and its validation), :mod:`~gantrain.tune.trainable` (one trial: a normal training run reporting to
Tune), :mod:`~gantrain.tune.experiment` (Ray start-up, Tuner, resume) and :mod:`~gantrain.tune.results`
(ranking, results.csv, best.toml, trials.png). Ray is imported only by the last three, so gantrain works
without the ``tune`` extra; :func:`require_ray` turns its absence into one clear error.
"""

from __future__ import annotations

import importlib.util

from gantrain.engine import GantrainError


def require_ray() -> None:
    """Raises a one-line error naming the extra to install when Ray Tune is missing."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.tune") is None:
        raise GantrainError("gantrain tune needs Ray Tune, which is not installed: pip install 'gantrain[tune]'")
