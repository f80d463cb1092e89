"""The real data that metrics compare against: which dataset, its train/test splits, and their content hashes.

* fashion-mnist / mnist: the official splits (60000 train, 10000 test), 28-pixel images resized to 32 pixels
  exactly as the training loader does, so real images look like the ones the GAN learned from.
* an image folder (e.g. cats): no labels and no official split. The sorted list of the images training
  discovers (:mod:`gantrain.engine.data.discovery`) is split
  deterministically: every 5th file is test, the rest train. Images are decoded at 64 pixels.

Real and generated images reach the extractor through the same preprocessing (clean-fid's point): a generator
trained at another size than the metric's makes images at its training size, which :func:`to_metric_size`
brings to the metric's; the real reference images then take the same road, first to the training size as the
training loader makes them, then through :func:`to_metric_size` (``DatasetSpec.train_px``). A perfect generator
thus scores at the train-vs-test floor at every training size. The extractor itself is fitted on images taken
straight to the metric's size, whatever the training size.

Hashes are of the files' bytes (plus relative names for folders), computed without decoding, so looking an
extractor up in the cache costs a read of the files, not a decode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gantrain.engine.config import Config
from gantrain.engine.data.decode import decode_or_skip
from gantrain.engine.data.discovery import discover_images
from gantrain.engine.data.download import IDX_DATASETS, ensure_idx_files
from gantrain.engine.data.pixels import quantize, to_uint8, to_unit
from gantrain.engine.data.sources import data_root, read_idx, resize_uint8
from gantrain.engine.errors import ConfigError, DataError, DataNotFound
from gantrain.engine.metrics.cache import sha256_files

IDX_SIZE_PX = 32
FOLDER_SIZE_PX = 64
FOLDER_TEST_EVERY = 5
SPLITS = ("train", "test")
ROUND_TRIP_CHUNK = 1000  # images resized at a time on the round trip (bounds the float copy's memory)

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
ROTATION_CLASSES = ("0deg", "90deg", "180deg", "270deg")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as the metrics see it: where it is, and the image format its extractor works at."""

    dataset: str
    """fashion-mnist, mnist or folder."""
    root: Path
    """For IDX datasets the folder holding FashionMNIST/raw (or MNIST/raw); for folder the image folder."""
    channels: int = 1
    """Image channels the extractor sees (IDX datasets are grayscale)."""
    train_px: int | None = None
    """The size the generator under test makes images at (its training size): real reference images are first made
    at this size, as the training loader makes them, then resized as generated images are. None: the metric's."""

    @property
    def size_px(self) -> int:
        return FOLDER_SIZE_PX if self.dataset == "folder" else IDX_SIZE_PX

    @property
    def round_trip(self) -> bool:
        """Whether real images pass through the training size on their way to the metric's."""
        return self.train_px is not None and self.train_px != self.size_px

    @property
    def via(self) -> str:
        """What cached real features of this spec are named with: "" or ``-via128px``."""
        return f"-via{self.train_px}px" if self.round_trip else ""

    def extractor_spec(self) -> DatasetSpec:
        """The spec the extractor is fitted and named by: real images taken straight to the metric's size."""
        return replace(self, train_px=None)

    @property
    def task(self) -> str:
        """classes (supervised, labelled data) or rotation (self-supervised, for unlabelled folders)."""
        return "rotation" if self.dataset == "folder" else "classes"

    @property
    def class_names(self) -> tuple[str, ...]:
        return {"fashion-mnist": FASHION_CLASSES, "mnist": DIGIT_CLASSES}.get(self.dataset, ROTATION_CLASSES)

    @property
    def label(self) -> str:
        """A file-name-safe name: fashion-mnist, mnist or folder-<folder name>-<channels>ch."""
        if self.dataset != "folder":
            return self.dataset
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in self.root.resolve().name)
        return f"folder-{safe}-{self.channels}ch"


@dataclass
class Split:
    images: torch.Tensor
    """uint8 (N, C, S, S) at the spec's size."""
    labels: torch.Tensor | None
    """int64 (N,) class labels, or None for an unlabelled folder."""


def refuse_metrics_without_data(cfg: Config) -> None:
    """Raises :class:`ConfigError` for a run that evaluates (--eval-every...) data without a metric domain
    (synthetic): checked before anything is measured or written, by the run and its dry run alike."""
    if cfg.eval.evaluates and cfg.data.dataset not in METRIC_DATASETS:
        raise ConfigError(f"--dataset: quality metrics need fashion-mnist, mnist or folder data, not "
                          f"{cfg.data.dataset}")


def spec_from_config(cfg: Config) -> DatasetSpec:
    """The metric dataset of a training config (synthetic data has none)."""
    dataset = cfg.data.dataset
    if dataset not in METRIC_DATASETS:
        raise ConfigError(f"--dataset: quality metrics need fashion-mnist, mnist or folder data, not {dataset}")
    if dataset == "folder" and cfg.data.data_root is None:
        raise DataNotFound("an image-folder dataset needs --data-root (the folder holding the images)")
    return DatasetSpec(dataset, data_root(cfg.data.data_root), 1 if dataset != "folder" else cfg.data.channels,
                       train_px=cfg.data.image_size)


METRIC_DATASETS = ("fashion-mnist", "mnist", "folder")  # the datasets with a metric domain (an extractor)


def parse_dataset(text: str, root: str | None = None, channels: int = 3) -> DatasetSpec:
    """``fashion-mnist``, ``mnist`` or ``folder:PATH`` (the form of ``gantrain metrics fit-extractor --dataset``)."""
    if channels not in (1, 3):
        raise ConfigError(f"--channels: must be 1 or 3, got {channels}")
    if text in IDX_DATASETS:
        return DatasetSpec(text, data_root(root), 1)
    if text.startswith("folder:") and len(text) > len("folder:"):
        return DatasetSpec("folder", Path(text[len("folder:"):]).expanduser(), channels)
    raise ConfigError(f"--dataset: must be fashion-mnist, mnist or folder:PATH, got {text!r}")


def split_sha256(spec: DatasetSpec, split: str) -> str:
    """Content hash of the files making up ``split``."""
    if spec.dataset == "folder":
        return sha256_files(folder_split_paths(spec.root, split), spec.root)
    files = ensure_idx_files(spec.dataset, spec.root)
    prefix = "train" if split == "train" else "t10k"
    return sha256_files([files[f"{prefix}-images-idx3-ubyte"], files[f"{prefix}-labels-idx1-ubyte"]])


def split_count(spec: DatasetSpec, split: str) -> int:
    """How many images ``split`` has, without decoding them (a folder's unreadable files included)."""
    if spec.dataset == "folder":
        return len(folder_split_paths(spec.root, split))
    files = ensure_idx_files(spec.dataset, spec.root)
    return len(read_idx(files[f"{'train' if split == 'train' else 't10k'}-labels-idx1-ubyte"]))


def to_metric_size(images: torch.Tensor, size: int) -> torch.Tensor:
    """float [-1, 1] (N, C, H, W) -> float32 [-1, 1] (N, C, size, size) on the 256 levels of an 8-bit image:
    bilinear with antialias (when the size differs), then quantised. What generated images go through, and real
    ones with :attr:`DatasetSpec.round_trip`, between the training size and the extractor."""
    images = images.float().clamp(-1, 1)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True).clamp(-1, 1)
    return quantize(images)


def load_split(spec: DatasetSpec, split: str) -> Split:
    """The images (and labels) of ``split``, uint8 at the spec's size: decoded straight to it, or with
    :attr:`DatasetSpec.round_trip` made at the training size as the training loader makes them, then brought to
    the metric's size by :func:`to_metric_size`."""
    if not spec.round_trip:
        return _load_split_at(spec, split, spec.size_px)
    at_training_size = _load_split_at(spec, split, spec.train_px)
    chunks = [to_uint8(to_metric_size(to_unit(chunk), spec.size_px))
              for chunk in at_training_size.images.split(ROUND_TRIP_CHUNK)]
    return Split(torch.cat(chunks), at_training_size.labels)


def _load_split_at(spec: DatasetSpec, split: str, size: int) -> Split:
    if spec.dataset == "folder":
        return _load_folder_split(spec, split, size)
    files = ensure_idx_files(spec.dataset, spec.root)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(files[f"{prefix}-images-idx3-ubyte"])
    labels = read_idx(files[f"{prefix}-labels-idx1-ubyte"])
    if len(images) != len(labels):
        raise DataError(f"{spec.dataset} {split}: {len(images)} images but {len(labels)} labels")
    resized = resize_uint8(torch.from_numpy(images.copy()).unsqueeze(1), size)  # as load_images does for training
    return Split(resized, torch.from_numpy(labels.astype(np.int64)))


def folder_split_paths(root: Path, split: str) -> list[Path]:
    """The image files of a folder's ``split``: every 5th of the sorted images training discovers is test."""
    paths = discover_images(root).paths  # the files training discovers, so metrics judge against the same images
    if len(paths) < 2 * FOLDER_TEST_EVERY:
        raise DataError(f"{root} has {len(paths)} images; metrics need at least {2 * FOLDER_TEST_EVERY}")
    is_test = [(i % FOLDER_TEST_EVERY) == FOLDER_TEST_EVERY - 1 for i in range(len(paths))]
    return [p for p, test in zip(paths, is_test) if test == (split == "test")]


def _load_folder_split(spec: DatasetSpec, split: str, size: int) -> Split:
    paths = folder_split_paths(spec.root, split)
    arrays = []
    for path in paths:
        array, _ = decode_or_skip(path, size, spec.channels)  # as training decodes them; broken files are skipped
        if array is not None:
            arrays.append(array)
    if not arrays:
        raise DataError(f"no readable images in the {split} split of {spec.root}")
    return Split(torch.from_numpy(np.stack(arrays)), None)

