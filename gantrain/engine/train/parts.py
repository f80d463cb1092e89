"""The parts of a training step, built one way for the Trainer and for ``gantrain bench``'s speed rows (which
time :class:`~gantrain.engine.gan.step.GANStep` fed by its loader and nothing else of a run).

:func:`data_parts` may refuse on one rank only (the device, a node's data), so the Trainer builds it where every
rank learns of any rank's refusal; :func:`gan_part` is collective under DDP (the model broadcast) and comes after.
"""

from __future__ import annotations

import torch

from gantrain.engine.config import Config
from gantrain.engine.data import Shard, build_loader
from gantrain.engine.dist.runtime import DistInfo, configure_runtime, pick_device
from gantrain.engine.gan.precision import PrecisionPolicy
from gantrain.engine.gan.step import GANStep


def data_parts(cfg: Config, dist: DistInfo = DistInfo()) -> tuple[torch.device, PrecisionPolicy, object]:
    """This rank's device (``run.device``, its local GPU), the precision policy (``perf``) and the loader of its
    shard of the data (``data``, ``run.seed``)."""
    device = pick_device(cfg.run.device, dist.local_rank)
    policy = PrecisionPolicy(device, cfg.perf.amp, cfg.perf.channels_last)
    loader = build_loader(cfg.data, cfg.run.seed, device, Shard(dist.rank, dist.world_size), policy=policy)
    return device, policy, loader


def gan_part(cfg: Config, device: torch.device, policy: PrecisionPolicy, dist: DistInfo = DistInfo()) -> GANStep:
    """The process-wide settings (:func:`~gantrain.engine.dist.runtime.configure_runtime`), then the GAN step."""
    configure_runtime(cfg.perf, device)
    return GANStep.for_config(cfg, device, policy, dist)
