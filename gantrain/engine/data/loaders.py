"""Loaders: batches of uint8 images on the training device, the same epochs whatever the loader.

Every loader draws its order from :func:`epoch_batches` (seeded by run seed and epoch, sharded by rank),
so the loop does not know which loader it has, and a resumed run sees the same batches. Conversion to
float in [-1, 1] (and channels-last, and the AMP dtype) happens in :mod:`gantrain.engine.precision`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from gantrain.engine.data.sources import decode_image, folder_paths, load_images
from gantrain.engine.errors import DataError

log = logging.getLogger("gantrain")

MEMORY_LIMIT_BYTES = 4 << 30  # auto keeps a dataset device-resident when its uint8 form is below this


@dataclass(frozen=True)
class Shard:
    """This process's place in data-parallel training."""

    rank: int = 0
    world_size: int = 1


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, shard: Shard = Shard()) -> torch.Tensor:
    """Index batches of one epoch for one rank: (steps, batch_size), int64 on the CPU.

    All ranks draw the same permutation; rank r takes every world_size-th index of it, so shards are
    disjoint and together cover the epoch. The tail that does not fill a global batch is dropped (it is
    different every epoch, so no image is left out for good).
    """
    global_batch = batch_size * shard.world_size
    steps = n // global_batch
    if steps == 0:
        raise DataError(f"the dataset has {n} images, fewer than one global batch of {global_batch}; lower --batch-size")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen)[: steps * global_batch]
    return perm[shard.rank :: shard.world_size].view(steps, batch_size)


class BatchLoader(Protocol):
    """What the training loop needs from a loader."""

    num_images: int
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """uint8 batches (B, C, S, S) on the device for ``epoch``, starting at step ``start_step``."""
        ...


class MemoryLoader:
    """The whole dataset as uint8 on the training device; batches are gathered there (no worker round trip)."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, device: torch.device, shard: Shard = Shard()):
        self.images = images.to(device)
        self.num_images, self.batch_size, self.seed, self.shard = len(images), batch_size, seed, shard
        self.steps_per_epoch = self.num_images // (batch_size * shard.world_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        batches = epoch_batches(self.num_images, self.batch_size, epoch, self.seed, self.shard)
        batches = batches[start_step:].to(self.images.device, non_blocking=True)
        for index in batches:
            yield self.images.index_select(0, index)


class _TensorDataset(Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class _FolderDataset(Dataset):
    """Decodes each image when asked; an unreadable file is replaced by the next readable one unless strict."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int, strict: bool):
        self.paths, self.size, self.channels, self.strict = list(paths), size, channels, strict

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        for offset in range(len(self.paths)):
            path = self.paths[(i + offset) % len(self.paths)]
            try:
                return torch.from_numpy(decode_image(path, self.size, self.channels))
            except Exception as exc:  # PIL raises many types for broken files
                if self.strict:
                    raise DataError(f"unreadable image {path}: {exc}") from None
                log.warning("skipping unreadable image %s", path)
        raise DataError("no readable images in the folder")


class TorchLoader:
    """A torch DataLoader (worker processes, pinned memory on CUDA) over the same epoch order."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int,
                 shard: Shard = Shard()):
        self.dataset, self.batch_size, self.seed, self.shard = dataset, batch_size, seed, shard
        self.device, self.num_workers = device, num_workers
        self.num_images = len(dataset)  # type: ignore[arg-type]
        self.steps_per_epoch = self.num_images // (batch_size * shard.world_size)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        batches = epoch_batches(self.num_images, self.batch_size, epoch, self.seed, self.shard)[start_step:]
        # Its own generator: DataLoader would otherwise draw the workers' base seed from the global torch RNG,
        # so a resumed run (which starts one more epoch iterator) would end with a different global RNG state.
        seeds = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches.tolist(), num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False, generator=seeds)
        for batch in loader:
            yield batch.to(self.device, non_blocking=True)


def build_loader(data_cfg, seed: int, device: torch.device, shard: Shard = Shard(), progress=None) -> BatchLoader:
    """The loader named by --loader (auto: device-resident memory whenever the dataset fits)."""
    kind = data_cfg.loader
    if kind == "torch" and data_cfg.dataset == "folder":
        paths = folder_paths(data_cfg.data_root, data_cfg.limit)
        dataset = _FolderDataset(paths, data_cfg.image_size, data_cfg.channels, data_cfg.strict)
        return TorchLoader(dataset, data_cfg.batch_size, seed, device, data_cfg.num_workers, shard)
    images = load_images(data_cfg.dataset, data_cfg.data_root, data_cfg.image_size, data_cfg.channels,
                         strict=data_cfg.strict, limit=data_cfg.limit, synthetic_size=data_cfg.synthetic_size,
                         seed=seed, progress=progress)
    if kind == "torch" or (kind == "auto" and images.numel() > MEMORY_LIMIT_BYTES):
        return TorchLoader(_TensorDataset(images), data_cfg.batch_size, seed, device, data_cfg.num_workers, shard)
    return MemoryLoader(images, data_cfg.batch_size, seed, device, shard)
