"""The epoch plan: which image sits in every batch slot of every rank, and which are mirrored.

Every loader (memory, torch, DALI) draws its epochs from :func:`epoch_plan`, a function of (seed, epoch) sharded
by rank, so the loop does not know which loader it has and a resumed run sees the same batches. This module is
the bottom of ``gantrain.engine.data``: the loaders import it, it imports none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gantrain.engine.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    """This process's place in data-parallel training."""

    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: the image index of every slot, and which images to mirror, both (steps, batch_size)."""

    indices: torch.Tensor
    flips: torch.Tensor | None  # bool; None when --hflip is off


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1, limit: int = 0) -> int:
    """floor(N / (batch x world)): the steps of one epoch, the same for every loader.

    Raises :class:`ConfigError` (exit code 2) naming the flag to change when it is 0: fewer images than one
    global batch can take no step, and a run that cannot take one step must not start.
    """
    global_batch = batch_size * world_size
    steps = num_images // global_batch
    if steps == 0:
        per = f"{batch_size} per process x {world_size} processes" if world_size > 1 else "--batch-size"
        if limit and num_images == limit:
            raise ConfigError(f"--limit: {limit} leaves {num_images} images, fewer than one global batch of "
                              f"{global_batch} ({per}); raise --limit or lower --batch-size")
        raise ConfigError(f"--batch-size: the dataset has {num_images} images, fewer than one global batch of "
                          f"{global_batch} ({per}); lower --batch-size")
    return steps


def epoch_plan(n: int, batch_size: int, epoch: int, seed: int, shard: Shard = Shard(), hflip: bool = False) -> EpochPlan:
    """Index batches of one epoch for one rank (int64 on the CPU), with a seeded coin flip per image under hflip.

    All ranks draw the same permutation; rank r takes every world_size-th index of it, so shards are
    disjoint and together cover the epoch. The tail that does not fill a global batch is dropped (it is
    different every epoch, so no image is left out for good). The flips are drawn after the permutation,
    so --hflip leaves the order unchanged.
    """
    global_batch = batch_size * shard.world_size
    steps = steps_per_epoch(n, batch_size, shard.world_size)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)[: steps * global_batch]
    flips = torch.rand(steps * global_batch, generator=gen) < 0.5 if hflip else None

    def mine(order: torch.Tensor) -> torch.Tensor:
        return order[shard.rank :: shard.world_size].view(steps, batch_size)

    return EpochPlan(mine(perm), mine(flips) if flips is not None else None)


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, shard: Shard = Shard()) -> torch.Tensor:
    """Index batches of one epoch for one rank: (steps, batch_size), int64 on the CPU (see :func:`epoch_plan`)."""
    return epoch_plan(n, batch_size, epoch, seed, shard).indices


def mirror(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Images (B, C, H, W) with those where ``flips`` (B,) is true mirrored left-right."""
    return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)




def plan_schedule(pos, cfg, per_epoch: int, run_dir, finished_ok: bool = False) -> int:
    """The step (optimiser update) at which the run ends: the end of epoch --epochs from where ``pos`` (a
    :class:`~gantrain.engine.state.checkpoint.Position`) stands, capped by --max-steps (which counts updates, whatever
    the batch). Raises :class:`ConfigError` (exit 2) when no step is left, unless ``finished_ok``."""
    run = cfg.run
    remaining = max(run.epochs * per_epoch - (pos.epoch * per_epoch + pos.epoch_step), 0)
    total = min(pos.step + remaining, run.max_steps) if run.max_steps else pos.step + remaining
    if pos.step >= total and not finished_ok:  # nothing left to train: zero steps is no run
        flag = "--max-steps" if run.max_steps and run.max_steps <= pos.step else "--epochs"
        value = run.max_steps if flag == "--max-steps" else run.epochs
        raise ConfigError(f"{flag}: the run in {run_dir} already took {pos.step} steps, {flag} {value} allows "
                          f"{total}; raise {flag} to train on")
    return total
