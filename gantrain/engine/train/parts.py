"""The parts of a training step, built one way for the Trainer and for ``gantrain bench``'s speed rows (which
time :class:`~gantrain.engine.gan.step.GANStep` fed by its loader and nothing else of a run).

:func:`data_parts` may refuse on one rank only (the device, a node's data), so the Trainer builds it where every
rank learns of any rank's refusal; :func:`gan_part` is collective under DDP (the model broadcast) and comes after.
"""

from __future__ import annotations

import logging

import torch

from gantrain.engine.config import Config
from gantrain.engine.data import Shard, build_loader
from gantrain.engine.dist.runtime import DistInfo, configure_runtime, pick_device
from gantrain.engine.gan.hardware import describe_rewrites, layer_rewrites, rules_only, strided_layers
from gantrain.engine.gan.precision import PrecisionPolicy
from gantrain.engine.gan.step import GANStep

log = logging.getLogger("gantrain")


def data_parts(cfg: Config, dist: DistInfo = DistInfo()) -> tuple[torch.device, PrecisionPolicy, object]:
    """This rank's device (``run.device``, its local GPU), the precision policy (``perf``) and the loader of its
    shard of the data (``data``, ``run.seed``)."""
    device = pick_device(cfg.run.device, dist.local_rank)
    policy = PrecisionPolicy(device, cfg.perf.amp, cfg.perf.channels_last)
    loader = build_loader(cfg.data, cfg.run.seed, device, Shard(dist.rank, dist.world_size), policy=policy)
    return device, policy, loader


def gan_part(cfg: Config, device: torch.device, policy: PrecisionPolicy, dist: DistInfo = DistInfo()) -> GANStep:
    """The process-wide settings (:func:`~gantrain.engine.dist.runtime.configure_runtime`, and on a CPU which
    layer rewrites beat oneDNN here: :func:`choose_rewrites`), then the GAN step; its ``layer_rewrites`` is the
    record of that choice (None where there was none to make)."""
    configure_runtime(cfg.perf, device)
    record = choose_rewrites(cfg, policy, dist) if has_cpu_rewrites(cfg, device) else None
    step = GANStep.for_config(cfg, device, policy, dist)
    step.layer_rewrites = record
    if step.d_eager and dist.is_main:
        log.info("--r1-gamma with %s: G is compiled, D runs eagerly (R1 needs D's double backward, which compiled "
                 "graphs lack)", "--cuda-graphs" if cfg.perf.cuda_graphs else "--compile")
    return step


def has_cpu_rewrites(cfg: Config, device: torch.device) -> bool:
    """Whether ``cfg``'s models on ``device`` have strided layers whose CPU gradient rewrites a probe decides."""
    return device.type == "cpu" and cfg.perf.layer_impl == "fast" and cfg.model.arch != "dense" and \
        cfg.model.kernel_size == 4


def choose_rewrites(cfg: Config, policy: PrecisionPolicy, dist: DistInfo = DistInfo()) -> dict:
    """Which CPU gradient rewrites each strided layer of ``cfg``'s models uses in this process: rank 0 measures
    them at the layers' shapes (batch ``data.batch_size``) in the step's compute dtype and layout
    (:func:`~gantrain.engine.gan.hardware.layer_rewrites`, once per machine) and says so in one log line; a
    probe that fails leaves the rules (said in that line). Under DDP every rank takes rank 0's choice
    (collective), so no two ranks time at once and all compute alike. Returns the record."""
    from gantrain.kernels import conv

    dtype = policy.autocast_dtype or torch.float32
    record = None
    if dist.is_main:
        try:
            shapes = strided_layers(cfg.model, cfg.data.image_size, cfg.data.channels, cfg.data.batch_size)
            record = layer_rewrites(dtype, policy.channels_last, shapes)
        except Exception as exc:  # noqa: BLE001 - a probe must not end a run, nor skip the broadcast below
            record = rules_only(dtype, policy.channels_last, f"{type(exc).__name__}: {exc}")
    if dist.enabled:
        box = [record]
        torch.distributed.broadcast_object_list(box, src=0)
        record = box[0]
        if not dist.is_main:
            conv.reset_rewrites()
            conv.set_rewrites({(r["rewrite"], dtype, *r["shape"][1:]): r["used"] for r in record["layers"]})
    if dist.is_main:
        log.info("%s", describe_rewrites(record))
    return record
