"""Where images come from: IDX files (FashionMNIST/MNIST), image folders, synthetic noise.

Image folders are found by :mod:`gantrain.engine.data.discovery` and decoded by
:mod:`gantrain.engine.data.decode`, the one decode path every loader matches.

Every source ends as a uint8 tensor of shape (N, C, S, S) already at the model size, decoded once; the
loaders (:mod:`gantrain.engine.data.loaders`) batch it and normalise to [-1, 1] on the device.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gantrain.engine.data.decode import decode_or_skip
from gantrain.engine.data.discovery import Discovery, discover_images
from gantrain.engine.data.download import IDX_DATASETS, ensure_idx_files
from gantrain.engine.errors import DataError, DataNotFound

log = logging.getLogger("gantrain")

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped): uint8 images (N, rows, cols) or labels (N,)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 8:
        raise DataError(f"{path} is too short to be an IDX file")
    magic, count = struct.unpack(">II", data[:8])
    if magic == IDX_IMAGES_MAGIC:
        if len(data) < 16:
            raise DataError(f"{path} is too short to be an IDX image file (no rows/cols header)")
        rows, cols = struct.unpack(">II", data[8:16])
        shape, offset = (count, rows, cols), 16
    elif magic == IDX_LABELS_MAGIC:
        shape, offset = (count,), 8
    else:
        raise DataError(f"{path}: bad IDX magic number {magic} (expected {IDX_IMAGES_MAGIC} or {IDX_LABELS_MAGIC})")
    expected = int(np.prod(shape))
    if len(data) - offset != expected:
        raise DataError(f"{path}: header says {expected} bytes of data, file has {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_idx_split(dataset: str, root: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) and labels (N,) of a FashionMNIST/MNIST split, downloading when absent."""
    files = ensure_idx_files(dataset, root)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
    labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
    if len(images) != len(labels):
        raise DataError(f"{dataset} {split}: {len(images)} images but {len(labels)} labels")
    return images, labels


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a uint8 (N, C, H, W) batch to (N, C, size, size), chunked to bound memory."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = []
    for chunk in images.split(4096):
        resized = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(resized.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def discover_folder(root: str | None, *, strict: bool = False, limit: int = 0) -> Discovery:
    """The images of the folder ``root`` (the resolved --data-root) for every loader; see :func:`discover_images`."""
    if root is None:
        raise DataNotFound("an image-folder dataset needs --data-root (the folder holding the images)")
    return discover_images(data_root(root), strict=strict, limit=limit)


def log_discovery(found: Discovery, size: int, channels: int | None = None) -> None:
    """The one line that ends discovery, one more when decoding converts images (alpha, 16-bit, ...), one when
    ``channels`` 1 reads colour images as grayscale (:meth:`Discovery.channel_summary`) and one when reaching
    ``size`` px upscales images or crops away more than half of one (:meth:`Discovery.geometry_summary`)."""
    log.info("%s", found.summary())
    gray = found.channel_summary(channels or 3)
    if gray:  # a warning: colour lost, most often to a preset's channels
        log.warning("%s", gray)
    for line in (found.conversion_summary(), found.geometry_summary(size)):
        if line:
            log.info("%s", line)


def decode_folder(found: Discovery, size: int, channels: int, *, strict: bool,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Decodes every discovered image: uint8 (N, C, size, size). A file that fails past its header (a truncated
    body) moves to the discovery's unreadable files, or under ``strict`` raises :class:`DataError` naming it."""
    arrays, bad = [], set()
    for i, image in enumerate(found.images):
        array, why = decode_or_skip(image.path, size, channels)
        if array is not None:
            arrays.append(array)
        elif strict:
            raise DataError(f"unreadable image {image.path}: {why} (drop --strict to skip such files)")
        else:
            bad.add(image.path)
        if progress:
            progress(i + 1, len(found.images))
    found.drop_unreadable(bad)
    if not arrays:
        raise DataError(f"no readable images in {found.root}: {found.left_out_text()}")
    return np.stack(arrays)


def synthetic_images(n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """Random smooth blobs, deterministic in ``seed``: a stand-in dataset for benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=gen) * 255
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).round().to(torch.uint8)


def data_root(explicit: str | None) -> Path:
    """--data-root (in a resolved config $GANTRAIN_DATA already fills it when unset), else the per-user download
    cache."""
    if explicit:
        return Path(explicit).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "gantrain" / "datasets"


def load_images(dataset: str, root: str | None, size: int, channels: int, *, strict: bool = False, limit: int = 0,
                synthetic_size: int = 8192, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The training images of ``dataset`` as uint8 (N, C, size, size) on the CPU (an image folder's discovery
    is logged in one line)."""
    if dataset == "synthetic":
        return synthetic_images(limit or synthetic_size, size, channels, seed)
    if dataset in IDX_DATASETS:
        if channels != 1:
            raise DataError(f"{dataset} is grayscale: use --channels 1")
        images, _ = load_idx_split(dataset, data_root(root))
        images = torch.from_numpy((images[:limit] if limit else images).copy()).unsqueeze(1)
        return resize_uint8(images, size)
    found = discover_folder(root, strict=strict, limit=limit)
    images = decode_folder(found, size, channels, strict=strict, progress=progress)
    log_discovery(found, size, channels)
    return torch.from_numpy(images)
