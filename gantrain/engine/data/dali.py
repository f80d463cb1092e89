"""``--loader dali``: NVIDIA DALI pipelines behind the same loader interface as the memory and torch loaders.

Image folders go through ``fn.readers.file`` -> ``fn.decoders.image`` (``mixed``, i.e. nvJPEG, when training on
CUDA; ``cpu`` otherwise) -> ``fn.resize`` (short side to the model size, cubic) -> ``fn.crop_mirror_normalize``
(center crop, optional mirror, ``(x - 127.5) / 127.5`` into [-1, 1], NHWC for channels-last, fp16 under fp16
AMP). In-memory datasets (FashionMNIST/MNIST, synthetic) go through a parallel, batch-mode
``fn.external_source`` into the same normalisation. DALI is imported on first use: gantrain runs without it.

Order and determinism. The order is not DALI's own shuffle (``random_shuffle`` is a buffer of ``initial_fill``
samples, not a permutation of the epoch): every epoch the loader hands the reader the epoch's global order from
:func:`~gantrain.engine.data.loaders.epoch_plan`, a function of (seed, epoch). So DALI yields the same images
in the same batches, with the same mirror flips, as the memory and torch loaders; only the pixels differ by
decoder and resize rounding. A folder pipeline is built afresh per epoch (about 0.1 s); ``start_step`` (resume)
starts the reader's list at that step, so no skipped image is decoded.

Sharding and epoch length. The reader gets ``num_shards`` = world size, ``shard_id`` = rank and
``stick_to_shard=True``; DALI's shard r is the r-th contiguous slice of the list, so the list is laid out
rank-major, slice r being rank r's part of the epoch (disjoint, together covering the epoch). The list holds
exactly ``steps * batch * world`` files, with steps = floor(N / (batch * world)): every shard has the same
size, a whole number of batches, so ``LastBatchPolicy.DROP`` drops nothing and ``pad_last_batch`` is never
needed. (Handed all N files, DALI's shards would differ by up to one sample, ``pad_last_batch`` would repeat a
shard's last sample to even them out, and DROP could leave ranks with different step counts: a DDP hang.)

Unreadable images. DALI cannot skip a sample: an undecodable or empty file fails the whole pipeline
("Critical error in pipeline ... Current pipeline object is no longer valid"), and its message does not
always name the file ("nvImageCodec failure: '#3'"). The loader finds the file (in the message, else by
decoding the in-flight batches' files with PIL). With ``--strict`` it stops with an error naming the file;
otherwise it logs a warning, puts the next readable image in its place (as the torch loader does), rebuilds the
pipeline and carries on at the same step, so the epoch keeps its length.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch

from PIL import Image

from gantrain.engine.data.decode import decode_or_skip, decode_to_viewer, to_channels
from gantrain.engine.data.discovery import Discovery, ImageFile
from gantrain.engine.data.pixels import HALF_RANGE
from gantrain.engine.data.plan import EpochPlan, Shard, epoch_plan
from gantrain.engine.data.sources import discover_folder, load_images, log_discovery
from gantrain.engine.errors import ConfigError, DataError

log = logging.getLogger("gantrain")

INSTALL_HINT = "pip install 'gantrain[dali]' (the nvidia-dali-cuda120 wheel)"
READER_NAME = "reader"
PREFETCH_BATCHES = 2  # DALI's prefetch_queue_depth: batches prepared while the model trains on the current one
PIXEL_HALF_RANGE = HALF_RANGE  # (x - 127.5) / 127.5 maps uint8 onto [-1, 1], as PrecisionPolicy.prepare_batch does
# DALI places a crop at round(pos * margin); a hair under 0.5 rounds odd margins down, like decode_image's
# (w - size) // 2, so DALI and the other loaders crop the same pixels.
CENTER_CROP_POS = 0.5 - 1e-6


def dali_installed() -> bool:
    """Whether ``nvidia.dali`` can be imported (checked without importing it: that takes a second)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no ``nvidia`` namespace package at all
        return False


def import_dali() -> SimpleNamespace:
    """The DALI modules this loader uses; a one-line error naming the extra when DALI is not installed."""
    try:
        import nvidia.dali as dali
        import nvidia.dali.fn as fn
        import nvidia.dali.types as types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but one of its libraries does not load
        raise ConfigError(f"--loader: dali needs NVIDIA DALI, which is not installed here ({exc}); "
                          f"install the extra: {INSTALL_HINT}") from None
    return SimpleNamespace(Pipeline=dali.Pipeline, fn=fn, types=types, Iterator=DALIGenericIterator,
                           LastBatchPolicy=LastBatchPolicy)


def pipeline_device(requested: str, device: torch.device) -> str:
    """'gpu' or 'cpu': where DALI decodes and augments. auto follows the training device."""
    if requested == "gpu" and device.type != "cuda":
        raise ConfigError(f"--dali-device: a GPU pipeline needs a CUDA GPU to train on, but this run trains on "
                          f"{device}; use --dali-device cpu (or auto)")
    if requested == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return requested


@dataclass(frozen=True)
class BatchFormat:
    """How DALI hands batches over: the dtype and memory layout the model takes them in."""

    dtype: torch.dtype = torch.float32
    channels_last: bool = False

    @classmethod
    def of(cls, policy: Any | None) -> BatchFormat:
        """From a :class:`~gantrain.engine.gan.precision.PrecisionPolicy` (None: fp32 NCHW, which every policy accepts)."""
        if policy is None:
            return cls()
        # DALI has no bfloat16: under bf16 it gives fp32 and prepare_batch casts on the device.
        dtype = torch.float16 if policy.autocast_dtype == torch.float16 else torch.float32
        return cls(dtype, bool(policy.channels_last))


@dataclass(frozen=True)
class DaliOptions:
    """What a DALI loader does besides reading: decode device, output format, flips, threads, strictness."""

    decode_device: str = "cpu"
    fmt: BatchFormat = BatchFormat()
    hflip: bool = False
    num_workers: int = 2  # CPU threads of the pipeline; Python worker processes of an external_source
    strict: bool = False


class DaliBatch(NamedTuple):
    """One batch with its provenance: the images, the dataset index of each, and whether it was mirrored."""

    images: torch.Tensor
    indices: torch.Tensor
    flips: torch.Tensor


class _DALILoader(ABC):
    """What the folder and the in-memory DALI loaders share: epoch length, plans, pipelines, the output format."""

    def __init__(self, dali: SimpleNamespace, num_images: int, image_size: int, batch_size: int, seed: int,
                 device: torch.device, shard: Shard, options: DaliOptions):
        self.dali, self.num_images, self.image_size, self.batch_size = dali, num_images, image_size, batch_size
        self.seed, self.device, self.shard, self.options = seed, device, shard, options
        self.steps_per_epoch = num_images // (batch_size * shard.world_size)  # checked by build_loader

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        for batch in self.labelled(epoch, start_step):
            yield batch.images

    @abstractmethod
    def labelled(self, epoch: int, start_step: int = 0) -> Iterator[DaliBatch]:
        """The batches of ``epoch`` from ``start_step``, with the dataset index and flip of every image."""

    def global_order(self, epoch: int) -> EpochPlan:
        """The epoch over all ranks, as (steps, batch * world): rank r's images are the columns r, r + world, ..."""
        return epoch_plan(self.num_images, self.batch_size * self.shard.world_size, epoch, self.seed, Shard(),
                          self.options.hflip)

    def new_pipeline(self, epoch: int, **kwargs: Any):
        gpu = self.options.decode_device == "gpu"
        device_id = (self.device.index or 0) if gpu else None  # None: a CPU-only pipeline, no CUDA needed
        return self.dali.Pipeline(batch_size=self.batch_size, num_threads=max(1, self.options.num_workers),
                                  device_id=device_id, seed=pipeline_seed(self.seed, epoch, self.shard.rank),
                                  prefetch_queue_depth=PREFETCH_BATCHES, **kwargs)

    def normalise(self, images, labels):
        """Center crop, mirror where the label's low bit says so, [-1, 1], in the model's layout and dtype."""
        fmt, size, types = self.options.fmt, self.image_size, self.dali.types
        mirror = {"mirror": labels & 1} if self.options.hflip else {}
        return self.dali.fn.crop_mirror_normalize(
            images, crop=(size, size), crop_pos_x=CENTER_CROP_POS, crop_pos_y=CENTER_CROP_POS,
            mean=PIXEL_HALF_RANGE, std=PIXEL_HALF_RANGE,
            output_layout="HWC" if fmt.channels_last else "CHW",
            dtype=types.FLOAT16 if fmt.dtype == torch.float16 else types.FLOAT, **mirror)

    def build(self, pipe) -> None:
        try:
            pipe.build()
        except RuntimeError as exc:
            where = f"GPU (cuda:{pipe.device_id})" if self.options.decode_device == "gpu" else "CPU"
            raise DataError(f"DALI could not build its {where} pipeline: {dali_reason(str(exc))}"
                            + ("; try --dali-device cpu" if where != "CPU" else "")) from None

    def to_batch(self, outputs: dict[str, torch.Tensor]) -> DaliBatch:
        images = outputs["images"]
        if self.options.fmt.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: torch's channels-last format
        labels = outputs["labels"].reshape(-1).long()
        return DaliBatch(images.to(self.device, non_blocking=True), labels // 2, (labels & 1).bool())


def pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """DALI's own seed, a function of (seed, epoch, rank); nothing random is left to DALI (flips are planned)."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**31 - 1)


def encode_labels(indices: torch.Tensor, flips: torch.Tensor | None) -> torch.Tensor:
    """The reader's labels: dataset index times two, plus one when the image is to be mirrored."""
    return indices * 2 + (flips.long() if flips is not None else 0)


def rank_major(order: torch.Tensor, world_size: int, batch_size: int, start_step: int) -> torch.Tensor:
    """Global (steps, batch * world) -> one flat list whose r-th contiguous slice is rank r's part, from start_step.

    DALI's reader gives shard r the r-th contiguous slice of its list; :func:`epoch_plan` gives rank r every
    world-th image. This lays the second out as the first.
    """
    steps = order.shape[0]
    per_rank = order.reshape(steps * batch_size, world_size).t().reshape(world_size, steps, batch_size)
    return per_rank[:, start_step:].reshape(-1)


def dali_reason(message: str) -> str:
    """The line of a multi-line DALI error that says what went wrong."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    useful = [line for line in lines if "no longer valid" not in line and not line.startswith("Critical error")]
    return (useful or lines or ["unknown DALI error"])[-1]


# ----- image folders -----------------------------------------------------------------------------------
# (Pillow format, modes) DALI's decoders give the same 8-bit pixels for as gantrain's decoder, checked file by
# file by the image-zoo test. JPEG includes the EXIF orientation, which DALI applies too. Every other file (alpha,
# palette transparency, CMYK, 32-bit integer or float samples, GIF, animations, other formats) is decoded by
# gantrain first; DALI then reads that 8-bit PNG through the same resize and crop.
DALI_NATIVE = {"JPEG": {"L", "RGB"}, "PNG": {"1", "L", "P", "RGB", "I;16"}, "BMP": {"RGB"}, "TIFF": {"RGB", "I;16B"},
               "WEBP": {"RGB"}}


def dali_native(image: ImageFile) -> bool:
    """Whether DALI decodes ``image`` to the pixels of :func:`~gantrain.engine.data.decode.decode_to_viewer`."""
    return (image.mode in DALI_NATIVE.get(image.format, ()) and not image.alpha and not image.animated
            and (image.orientation == 1 or image.format == "JPEG"))


class DALIFolderLoader(_DALILoader):
    """An image folder read by ``fn.readers.file`` and decoded by DALI, a fresh pipeline per epoch.

    Files DALI would decode differently (see :data:`DALI_NATIVE`) are decoded once by gantrain's decoder into
    8-bit PNGs in a temporary folder (removed with the loader), which DALI reads in their place.
    """

    def __init__(self, dali: SimpleNamespace, found: Discovery, channels: int, **common: Any):
        super().__init__(dali, len(found.images), **common)
        self.paths, self.channels = [str(p) for p in found.paths], channels
        self.unreadable: set[int] = set()
        self._convert_foreign(found.images)

    def _convert_foreign(self, images: Sequence[ImageFile]) -> None:
        foreign = [i for i, image in enumerate(images) if not dali_native(image)]
        if not foreign:
            return
        folder = tempfile.mkdtemp(prefix="gantrain-dali-")
        weakref.finalize(self, shutil.rmtree, folder, True)
        converted = 0
        for i in foreign:
            try:
                with Image.open(images[i].path) as img:
                    to_channels(decode_to_viewer(img), self.channels).save(Path(folder) / f"{i:07d}.png")
            except Exception:  # unreadable past its header: DALI meets the original and it is skipped as usual
                continue
            self.paths[i] = str(Path(folder) / f"{i:07d}.png")
            converted += 1
        kinds = sorted({f"{images[i].format} {images[i].mode}" + (" with alpha" if images[i].alpha else "")
                        for i in foreign})
        log.info("dali: %d of %d images decoded by gantrain first (DALI decodes these differently: %s)", converted,
                 len(images), ", ".join(kinds[:6]) + (", ..." if len(kinds) > 6 else ""))

    def labelled(self, epoch: int, start_step: int = 0) -> Iterator[DaliBatch]:
        plan, step = self.global_order(epoch), start_step
        while step < self.steps_per_epoch:
            for batch in self._run(plan, epoch, step):  # stops early when DALI failed on a file it then skips
                yield batch
                step += 1

    def _run(self, plan: EpochPlan, epoch: int, start_step: int) -> Iterator[DaliBatch]:
        world, b = self.shard.world_size, self.batch_size
        indices = rank_major(plan.indices, world, b, start_step)
        labels = rank_major(encode_labels(plan.indices, plan.flips), world, b, start_step)
        files = [self.paths[self._readable(i)] for i in indices.tolist()]
        iterator = self._iterator(files, labels.tolist(), epoch)
        per_rank = len(files) // world
        mine = files[per_rank * self.shard.rank:per_rank * (self.shard.rank + 1)]  # DALI's shard of this rank
        for step in range(self.steps_per_epoch - start_step):
            try:
                outputs = next(iterator)
            except StopIteration:
                return
            except RuntimeError as exc:  # DALI fails the whole pipeline on one bad file
                self._skip_unreadable(exc, mine[step * b:(step + PREFETCH_BATCHES + 2) * b])
                return
            yield self.to_batch(outputs[0])

    def _iterator(self, files: list[str], labels: list[int], epoch: int):
        dali, gpu = self.dali, self.options.decode_device == "gpu"
        color = dali.types.RGB if self.channels == 3 else dali.types.GRAY
        pipe = self.new_pipeline(epoch)
        with pipe:
            encoded, label = dali.fn.readers.file(
                files=files, labels=labels, name=READER_NAME, shard_id=self.shard.rank,
                num_shards=self.shard.world_size, stick_to_shard=True, random_shuffle=False, pad_last_batch=False)
            images = dali.fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=color)
            images = dali.fn.resize(images, resize_shorter=self.image_size, interp_type=dali.types.INTERP_CUBIC,
                                    antialias=True)
            pipe.set_outputs(self.normalise(images, label), label)
        self.build(pipe)
        # No first-batch prefetch in the constructor: a bad file among the first batches then fails in next(),
        # where it is handled like any other.
        return dali.Iterator(pipe, ["images", "labels"], reader_name=READER_NAME, auto_reset=False,
                             last_batch_policy=dali.LastBatchPolicy.DROP, prepare_first_batch=False)

    def _readable(self, index: int) -> int:
        """``index``, or the next image (in sorted order, wrapping) not found unreadable: the torch loader's rule."""
        if len(self.unreadable) == len(self.paths):
            raise DataError(f"no readable images among the {len(self.paths)} files of the folder")
        while index in self.unreadable:
            index = (index + 1) % len(self.paths)
        return index

    def _skip_unreadable(self, exc: RuntimeError, in_flight: list[str]) -> None:
        """Names the file DALI failed on; --strict stops there, else later pipelines read another in its place."""
        reason = dali_reason(str(exc))
        named = max((p for p in in_flight if p in str(exc)), key=len, default=None)  # longest: a/b.jpg, not b.jpg
        path = named or first_unreadable(in_flight, self.channels)
        if path is None:
            raise DataError(f"DALI failed on one of {len(in_flight)} images it was reading: {reason}") from None
        if self.options.strict:
            raise DataError(f"unreadable image {path}: DALI says {reason} (drop --strict to skip such files)") from None
        log.warning("unreadable image %s (DALI: %s): the next readable image takes its place (the memory loader "
                    "leaves it out; --strict stops instead)", path, reason)
        self.unreadable.add(self.paths.index(path))


def first_unreadable(paths: Sequence[str], channels: int) -> str | None:
    """The first of ``paths`` that PIL cannot decode (for DALI errors that do not name their file)."""
    for path in dict.fromkeys(paths):
        if decode_or_skip(Path(path), 8, channels)[0] is None:
            return path
    return None


# ----- in-memory datasets (IDX, synthetic) ----------------------------------------------------------------
class PlanSource:
    """The parallel ``external_source`` callback: batch ``iteration`` of epoch ``first_epoch + epoch_idx``.

    A pure function of its argument, as DALI requires: it runs in worker processes, ahead of the consumer and
    past the end of an epoch (where it keeps raising StopIteration). Workers started by fork share the parent's
    images; spawned ones (CUDA runs) reload them, since ``load_images`` is deterministic.
    """

    def __init__(self, images: np.ndarray, load_args: dict, batch_size: int, seed: int, shard: Shard, hflip: bool,
                 first_epoch: int, start_step: int):
        self.images, self.load_args = images, load_args
        self.batch_size, self.seed, self.shard, self.hflip = batch_size, seed, shard, hflip
        self.first_epoch, self.start_step = first_epoch, start_step
        self.steps = len(images) // (batch_size * shard.world_size)
        self._plan: tuple[int, EpochPlan] | None = None
        self.owner_pid, self._one_thread = os.getpid(), False

    def __call__(self, info) -> tuple[np.ndarray, np.ndarray]:
        if os.getpid() != self.owner_pid and not self._one_thread:
            torch.set_num_threads(1)  # a worker process, as in torch's DataLoader: the trainer has the cores
            self._one_thread = True
        step = info.iteration + (self.start_step if info.epoch_idx == 0 else 0)
        if step >= self.steps:
            raise StopIteration
        plan = self.plan(self.first_epoch + info.epoch_idx)
        index = plan.indices[step]
        labels = encode_labels(index, plan.flips[step] if plan.flips is not None else None)
        return self.nhwc()[index.numpy()], labels.to(torch.int32).numpy().reshape(-1, 1)

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan[0] != epoch:  # one permutation per epoch, not per batch
            self._plan = epoch, epoch_plan(len(self.nhwc()), self.batch_size, epoch, self.seed, self.shard, self.hflip)
        return self._plan[1]

    def nhwc(self) -> np.ndarray:
        if self.images is None:
            self.images = as_nhwc(load_images(**self.load_args))
        return self.images

    def __getstate__(self) -> dict:
        return {**self.__dict__, "images": None, "_plan": None}  # a spawned worker reloads instead of unpickling


def as_nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()


class DALIArrayLoader(_DALILoader):
    """uint8 images already at the model size (IDX, synthetic) through a parallel, batch-mode external_source.

    One pipeline serves consecutive epochs (DALI's epoch index counts them); a jump to another epoch, or an
    epoch left unfinished, builds a new one.
    """

    def __init__(self, dali: SimpleNamespace, images: torch.Tensor, load_args: dict, **common: Any):
        super().__init__(dali, len(images), **common)
        self.images, self.load_args = as_nhwc(images), load_args
        self._live: tuple[Any, int] | None = None  # an iterator reset for the next epoch, and that epoch

    def labelled(self, epoch: int, start_step: int = 0) -> Iterator[DaliBatch]:
        if start_step >= self.steps_per_epoch:
            return
        iterator, finished = self._iterator(epoch, start_step), False
        try:
            for outputs in iterator:
                yield self.to_batch(outputs[0])
            finished = True
        finally:
            self._live = (iterator, epoch + 1) if finished else None
        iterator.reset()  # starts preparing the next epoch now

    def _iterator(self, epoch: int, start_step: int):
        if self._live is not None and self._live[1] == epoch and start_step == 0:
            return self._live[0]
        self._live = None  # drop the old pipeline (and its workers) before starting another
        o = self.options
        source = PlanSource(self.images, self.load_args, self.batch_size, self.seed, self.shard, o.hflip, epoch,
                            start_step)
        dali, parallel = self.dali, o.num_workers > 0  # --num-workers 0: the callback runs in this process
        # fork shares the images with the workers, but a process holding a CUDA context must not fork.
        workers = dict(py_num_workers=o.num_workers, py_start_method="spawn" if self.device.type == "cuda" else "fork")
        pipe = self.new_pipeline(epoch, **(workers if parallel else {}))
        with pipe:
            images, labels = dali.fn.external_source(
                source=source, num_outputs=2, batch=True, parallel=parallel, batch_info=True,
                dtype=[dali.types.UINT8, dali.types.INT32], ndim=[3, 1], layout=["HWC"],
                **({"prefetch_queue_depth": PREFETCH_BATCHES} if parallel else {}))
            pipe.set_outputs(self.normalise(images.gpu() if o.decode_device == "gpu" else images, labels), labels)
        self.build(pipe)
        return dali.Iterator(pipe, ["images", "labels"])


# ----- construction -------------------------------------------------------------------------------------
def build_dali_loader(data_cfg: Any, seed: int, device: torch.device, shard: Shard = Shard(),
                      policy: Any | None = None, progress=None, found: Discovery | None = None) -> _DALILoader:
    """The DALI loader for ``data_cfg``: a folder pipeline for image folders (``found``: their discovery, made
    here when not given), external_source for the rest."""
    dali = import_dali()
    options = DaliOptions(decode_device=pipeline_device(data_cfg.dali_device, device), fmt=BatchFormat.of(policy),
                          hflip=data_cfg.hflip, num_workers=data_cfg.num_workers, strict=data_cfg.strict)
    common = dict(image_size=data_cfg.image_size, batch_size=data_cfg.batch_size, seed=seed, device=device,
                  shard=shard, options=options)
    if data_cfg.dataset == "folder":
        found = found or discover_folder(data_cfg.data_root, strict=data_cfg.strict, limit=data_cfg.limit)
        log_discovery(found, data_cfg.image_size, data_cfg.channels)
        return DALIFolderLoader(dali, found, data_cfg.channels, **common)
    load_args = dict(dataset=data_cfg.dataset, root=data_cfg.data_root, size=data_cfg.image_size,
                     channels=data_cfg.channels, strict=data_cfg.strict, limit=data_cfg.limit,
                     synthetic_size=data_cfg.synthetic_size, seed=seed)
    return DALIArrayLoader(dali, load_images(**load_args, progress=progress), load_args, **common)

