"""Where images come from: IDX files (FashionMNIST/MNIST), image folders, synthetic noise.

Every source ends as a uint8 tensor of shape (N, C, S, S) already at the model size, decoded once; the
loaders (:mod:`gantrain.engine.data.loaders`) batch it and normalise to [-1, 1] on the device.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gantrain.engine.data.download import IDX_DATASETS, ensure_idx_files
from gantrain.engine.errors import DataError

log = logging.getLogger("gantrain")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
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


def list_images(folder: Path) -> list[Path]:
    """JPEG/PNG files below ``folder`` (recursive), in a stable sorted order."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decodes one image, resizes the short side to ``size`` and center-crops: uint8 (C, size, size)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        scale = size / min(w, h)
        if (w, h) != (size, size):
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        array = np.asarray(img, dtype=np.uint8)
    # A writable, contiguous copy: PIL's buffer is read-only, which torch.from_numpy warns about.
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)).copy()  # C order


@dataclass
class FolderScan:
    """The decodable images of a folder, and how many files were skipped as unreadable."""

    images: np.ndarray
    paths: list[Path]
    skipped: int


def decode_folder(folder: Path, size: int, channels: int, *, strict: bool, limit: int = 0,
                  progress: Callable[[int, int], None] | None = None) -> FolderScan:
    paths = _folder_paths(folder, limit)
    kept, arrays, skipped = [], [], 0
    for i, path in enumerate(paths):
        try:
            arrays.append(decode_image(path, size, channels))
            kept.append(path)
        except Exception as exc:  # PIL raises many types for broken files
            if strict:
                raise DataError(f"unreadable image {path}: {exc} (drop --strict to skip such files)") from None
            skipped += 1
        if progress:
            progress(i + 1, len(paths))
    if not arrays:
        raise DataError(f"no readable images in {folder} ({skipped} unreadable)")
    if skipped:
        log.warning("skipped %d unreadable image(s) in %s", skipped, folder)
    return FolderScan(np.stack(arrays), kept, skipped)


def _folder_paths(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist (pass --data-root pointing at the images)")
    paths = list_images(folder)
    if not paths:
        raise DataError(f"no JPEG/PNG images found below {folder}")
    return paths[:limit] if limit else paths


def synthetic_images(n: int, size: int, channels: int, seed: int) -> torch.Tensor:
    """Random smooth blobs, deterministic in ``seed``: a stand-in dataset for benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=gen) * 255
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).round().to(torch.uint8)


def data_root(explicit: str | None) -> Path:
    """--data-root, else $GANTRAIN_DATA, else the per-user download cache."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get("GANTRAIN_DATA"):
        return Path(os.environ["GANTRAIN_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "gantrain" / "datasets"


def load_images(dataset: str, root: str | None, size: int, channels: int, *, strict: bool = False, limit: int = 0,
                synthetic_size: int = 8192, seed: int = 0,
                progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """The training images of ``dataset`` as uint8 (N, C, size, size) on the CPU."""
    if dataset == "synthetic":
        return synthetic_images(limit or synthetic_size, size, channels, seed)
    if dataset in IDX_DATASETS:
        if channels != 1:
            raise DataError(f"{dataset} is grayscale: use --channels 1")
        images, _ = load_idx_split(dataset, data_root(root))
        images = torch.from_numpy((images[:limit] if limit else images).copy()).unsqueeze(1)
        return resize_uint8(images, size)
    if root is None and not os.environ.get("GANTRAIN_DATA"):
        raise DataError("an image-folder dataset needs --data-root (the folder holding the images)")
    scan = decode_folder(data_root(root), size, channels, strict=strict, limit=limit, progress=progress)
    return torch.from_numpy(scan.images)


def folder_paths(root: str | None, limit: int = 0) -> Sequence[Path]:
    return _folder_paths(data_root(root), limit)
