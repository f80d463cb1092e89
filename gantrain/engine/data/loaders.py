"""Loaders: batches of images on the training device, the same epochs whatever the loader.

Every loader draws its order (and its --hflip coin flips) from :func:`epoch_plan` (seeded by run seed and
epoch, sharded by rank), so the loop does not know which loader it has, and a resumed run sees the same
batches. The memory and torch loaders yield uint8; conversion to float in [-1, 1] (and channels-last, and the
AMP dtype) happens in :mod:`gantrain.engine.gan.precision`. The DALI loader (:mod:`gantrain.engine.data.dali`)
normalises in its pipeline and yields floats.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import DataLoader, Dataset

from gantrain.engine.data.decode import decode_or_skip
from gantrain.engine.data.plan import Shard, epoch_plan, mirror, steps_per_epoch
from gantrain.engine.data.sources import decode_folder, discover_folder, load_images, log_discovery
from gantrain.engine.errors import DataError

log = logging.getLogger("gantrain")

MEMORY_LIMIT_BYTES = 4 << 30  # auto keeps a dataset device-resident when its uint8 form is below this


class BatchLoader(Protocol):
    """What the training loop needs from a loader (the DALI one yields floats already in [-1, 1])."""

    num_images: int
    steps_per_epoch: int

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """uint8 batches (B, C, S, S) on the device for ``epoch``, starting at step ``start_step``."""
        ...


class MemoryLoader:
    """The whole dataset as uint8 on the training device; batches are gathered there (no worker round trip)."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, device: torch.device, shard: Shard = Shard(),
                 hflip: bool = False):
        self.images = images.to(device)
        self.num_images, self.batch_size, self.seed, self.shard = len(images), batch_size, seed, shard
        self.steps_per_epoch = self.num_images // (batch_size * shard.world_size)  # checked by build_loader
        self.hflip = hflip

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        plan = epoch_plan(self.num_images, self.batch_size, epoch, self.seed, self.shard, self.hflip)
        batches = plan.indices[start_step:].to(self.images.device, non_blocking=True)
        flips = plan.flips[start_step:].to(self.images.device, non_blocking=True) if plan.flips is not None else None
        for step, index in enumerate(batches):
            images = self.images.index_select(0, index)
            yield images if flips is None else mirror(images, flips[step])


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
        # which files were said to be replaced: in shared memory, so the workers of every epoch (new processes
        # each epoch) say each file once
        self.said = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        for offset in range(len(self.paths)):
            index = (i + offset) % len(self.paths)
            path = self.paths[index]
            array, why = decode_or_skip(path, self.size, self.channels)
            if array is not None:
                return torch.from_numpy(array)
            if self.strict:
                raise DataError(f"unreadable image {path}: {why}")
            if not self.said[index]:  # once per file, not once per epoch and worker
                self.said[index] = True
                log.warning("unreadable image %s (%s): the next readable image takes its place (the memory loader "
                            "leaves it out; --strict stops instead)", path, why)
        raise DataError(f"none of the {len(self.paths)} images discovered is readable now (the first: "
                        f"{self.paths[0] if self.paths else '-'}); were they changed or removed since the run "
                        "started?")


class TorchLoader:
    """A torch DataLoader (worker processes, pinned memory on CUDA) over the same epoch order."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, device: torch.device, num_workers: int,
                 shard: Shard = Shard(), hflip: bool = False):
        self.dataset, self.batch_size, self.seed, self.shard = dataset, batch_size, seed, shard
        self.device, self.num_workers, self.hflip = device, num_workers, hflip
        self.num_images = len(dataset)  # type: ignore[arg-type]
        self.steps_per_epoch = self.num_images // (batch_size * shard.world_size)  # checked by build_loader

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        plan = epoch_plan(self.num_images, self.batch_size, epoch, self.seed, self.shard, self.hflip)
        batches = plan.indices[start_step:]
        flips = plan.flips[start_step:] if plan.flips is not None else None
        # Its own generator: DataLoader would otherwise draw the workers' base seed from the global torch RNG,
        # so a resumed run (which starts one more epoch iterator) would end with a different global RNG state.
        seeds = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        loader = DataLoader(self.dataset, batch_sampler=batches.tolist(), num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False, generator=seeds)
        for step, batch in enumerate(loader):
            batch = batch.to(self.device, non_blocking=True)
            yield batch if flips is None else mirror(batch, flips[step].to(self.device, non_blocking=True))


def choose_loader(data_cfg, device: torch.device) -> str:
    """--loader, with auto resolved for image folders: DALI when it is installed and training runs on CUDA.

    GPU decoding pays there; on the CPU the memory loader (decode once) trains faster than DALI decoding every
    epoch on the same cores (README, "Data loaders and DALI"). IDX and synthetic data fit in memory, so auto
    keeps them device-resident.
    """
    if data_cfg.loader != "auto" or data_cfg.dataset != "folder" or device.type != "cuda":
        return data_cfg.loader
    from gantrain.engine.data.dali import dali_installed

    return "dali" if dali_installed() else "auto"


def build_loader(data_cfg, seed: int, device: torch.device, shard: Shard = Shard(), progress=None,
                 policy=None) -> BatchLoader:
    """The loader named by --loader (auto: see :func:`choose_loader`, then device-resident memory when it fits).

    ``policy`` (a PrecisionPolicy) lets DALI write batches in the model's layout and dtype; without it DALI gives
    fp32 NCHW, which ``prepare_batch`` converts.
    """
    kind = choose_loader(data_cfg, device)
    loader = _build(kind, data_cfg, seed, device, shard, progress, policy)
    steps_per_epoch(loader.num_images, data_cfg.batch_size, shard.world_size, data_cfg.limit)  # the flag to change
    return loader


def _build(kind: str, data_cfg, seed: int, device: torch.device, shard: Shard, progress, policy) -> BatchLoader:
    folder = data_cfg.dataset == "folder"
    found = discover_folder(data_cfg.data_root, strict=data_cfg.strict, limit=data_cfg.limit) if folder else None
    if kind == "dali":
        from gantrain.engine.data.dali import build_dali_loader

        return build_dali_loader(data_cfg, seed, device, shard, policy, progress, found)
    if kind == "torch" and found is not None:
        log_discovery(found, data_cfg.image_size, data_cfg.channels)
        dataset = _FolderDataset(found.paths, data_cfg.image_size, data_cfg.channels, data_cfg.strict)
        return TorchLoader(dataset, data_cfg.batch_size, seed, device, data_cfg.num_workers, shard, data_cfg.hflip)
    if found is not None:
        images = torch.from_numpy(decode_folder(found, data_cfg.image_size, data_cfg.channels,
                                                strict=data_cfg.strict, progress=progress))
        log_discovery(found, data_cfg.image_size, data_cfg.channels)
    else:
        images = load_images(data_cfg.dataset, data_cfg.data_root, data_cfg.image_size, data_cfg.channels,
                             limit=data_cfg.limit, synthetic_size=data_cfg.synthetic_size, seed=seed)
    if kind == "torch" or (kind == "auto" and images.numel() > MEMORY_LIMIT_BYTES):
        return TorchLoader(_TensorDataset(images), data_cfg.batch_size, seed, device, data_cfg.num_workers, shard,
                           data_cfg.hflip)
    return MemoryLoader(images, data_cfg.batch_size, seed, device, shard, data_cfg.hflip)
