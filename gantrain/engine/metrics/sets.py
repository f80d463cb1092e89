"""``gantrain eval`` on what users have on disk: two image folders (pytorch-fid's ``DIR1 DIR2``), a folder against a
dataset's test split, a checkpoint or exported generator against a folder, and reference statistics saved once
(``--save-stats``, an ``.npz``) and reused.

Every side takes the same road to the features: images decoded at one size S (the source folder's, or a
generator's training size), brought to the extractor's size by :func:`~gantrain.engine.metrics.reference.to_metric_size`;
a dataset's test split takes that road from S too (``DatasetSpec.train_px``). The domain extractor is the
dataset's (``--dataset``), else the checkpoint's, else the reference folder's own (a rotation classifier fitted
on it, cached). Inception features are taken of the same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gantrain.engine.data.decode import decode_or_skip, holds_colour
from gantrain.engine.data.discovery import discover_images
from gantrain.engine.data.pixels import to_uint8, to_unit
from gantrain.engine.data.sources import log_discovery
from gantrain.engine.errors import ConfigError, DataError
from gantrain.engine.metrics import formulas
from gantrain.engine.metrics.evaluate import FEATURE_BATCH, RealFeatures, Reference, extract, load_reference
from gantrain.engine.metrics.extractor import check_usable, ensure_extractor
from gantrain.engine.metrics.reference import (IDX_DATASETS, DatasetSpec, folder_split_paths, parse_dataset,
                                               to_metric_size)
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.files import atomic_write

STATS_FORMAT = "gantrain-eval-stats"
STATS_VERSION = 1
MIN_METRIC_IMAGES = formulas.PR_NEIGHBOURS + 1  # the fewest images of a set the metrics are defined for
MAX_DECODE_PX = 1024  # the largest size folders are decoded at (eval --size's upper bound)
COLOUR_SAMPLE = 32
"""Images of a folder looked at in colour before it is read in grayscale (:func:`refuse_colour_for_grayscale`)."""


@dataclass
class Side:
    """One side of a comparison, as given on the command line."""

    kind: str
    """checkpoint (a .pt checkpoint or an exported .safetensors generator), folder, dataset or stats (.npz)."""
    path: Path | None = None
    spec: DatasetSpec | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else f"{self.spec.label} test split"


def parse_side(text: str, channels: int = 3, data_root: str | None = None) -> Side:
    """A command-line argument: an existing folder, a ``.npz`` of saved statistics, a checkpoint or export file,
    or a dataset name (fashion-mnist, mnist under ``data_root``; folder:PATH) meaning its test split. Raises
    :class:`ConfigError`."""
    if text in IDX_DATASETS or text.startswith("folder:"):
        return Side("dataset", spec=parse_dataset(text, data_root, channels))
    path = Path(text).expanduser()
    if path.is_dir():
        return Side("folder", path)
    if not path.exists() and path.suffix in (".pt", ".safetensors"):
        return Side("checkpoint", path)  # loading it says what is wrong with the path
    if not path.is_file():
        raise ConfigError(f"{text}: no such file or folder (give a checkpoint, an exported generator, an image "
                          "folder, a .npz from --save-stats, or fashion-mnist, mnist or folder:PATH)")
    return Side("stats" if path.suffix == ".npz" else "checkpoint", path)


def folder_images(folder: Path, channels: int, size: int | None, size_px: int,
                  paths: list[Path] | None = None, *, gray_domain: str | None = None) -> tuple[torch.Tensor, int]:
    """Every image below ``folder`` (found as training finds them, or ``paths``; unreadable files skipped) decoded
    at S, then taken to the metric size ``size_px`` by :func:`to_metric_size`, a chunk at a time (memory: the
    images at the metric size): uint8 (N, C, size_px, size_px) and S. S is ``size``, else the first image's
    shorter side (non-square images are centre-cropped as in training). ``gray_domain``: the name of a built-in
    grayscale metric domain the images are scored in (:func:`gray_domain_of`), where a folder of colour images is
    refused (:func:`refuse_colour_for_grayscale`). Raises :class:`DataError` for a folder without a readable
    image."""
    found = discover_images(folder) if paths is None else None
    paths = found.paths if found is not None else paths
    if size is None:
        with Image.open(paths[0]) as first:
            size = min(first.size)
        if found is not None and any(min(image.size) != size for image in found.images):
            log.info("%s: images of several sizes, read at %d px, the first one's shorter side (--size sets it)",
                     folder, min(size, MAX_DECODE_PX))
        if size > MAX_DECODE_PX:  # photographs: a chunk of them at full size would not fit in memory
            log.info("%s: read at %d px, not the first image's %d px (the most --size takes)", folder, MAX_DECODE_PX,
                     size)
            size = MAX_DECODE_PX
    if found is not None:  # what training would say of the folder: found, left out, converted, resized
        # in a grayscale dataset's domain colour is refused below; in a folder's own, channels 1 is the run's
        log_discovery(found, size, None if gray_domain is not None else channels)
    if gray_domain is not None:
        refuse_colour_for_grayscale(folder, paths, size, gray_domain)
    chunks, skipped = [], []
    for start in range(0, len(paths), FEATURE_BATCH):
        decoded = [(p, decode_or_skip(p, size, channels)[0]) for p in paths[start:start + FEATURE_BATCH]]
        skipped += [p for p, a in decoded if a is None]
        arrays = [a for _, a in decoded if a is not None]
        if arrays:
            chunks.append(to_uint8(to_metric_size(to_unit(torch.from_numpy(np.stack(arrays))), size_px)))
    if not chunks:
        raise DataError(f"{folder}: no readable image")
    if skipped:
        log.warning("%s: %d image(s) that could not be decoded are left out (%s%s)", folder, len(skipped),
                    ", ".join(p.name for p in skipped[:3]), ", ..." if len(skipped) > 3 else "")
    images = torch.cat(chunks)
    require_images(len(images), f"{folder}: {len(images)} readable image(s)")
    return images, size


def require_images(count: int, what: str) -> None:
    """Raises :class:`DataError` (``what`` names the set) when ``count`` images are too few for the metrics:
    a covariance needs 2, precision/recall more than their k nearest neighbours."""
    if count < MIN_METRIC_IMAGES:
        raise DataError(f"{what}: the metrics need at least {MIN_METRIC_IMAGES} (precision and recall use each "
                        f"image's {formulas.PR_NEIGHBOURS} nearest neighbours), and give stable figures only from "
                        "thousands")


def gray_domain_of(spec: DatasetSpec) -> str | None:
    """The label of ``spec`` when it is a built-in grayscale dataset's domain (FashionMNIST, MNIST), whose
    extractor knows only such images; None for a folder's own domain (a grayscale model of colour photographs is
    scored in their luma, as it trained)."""
    return spec.label if spec.dataset in IDX_DATASETS else None


def refuse_colour_for_grayscale(folder: Path, paths: list[Path], size: int, domain: str) -> None:
    """Raises :class:`DataError` when most of up to :data:`COLOUR_SAMPLE` images of ``folder`` (evenly spaced in
    ``paths``) are in colour (:func:`~gantrain.engine.data.decode.holds_colour`) while they are to be scored in the
    grayscale ``domain`` (a built-in dataset's extractor): colour photographs read in grayscale would give a
    believable but meaningless FD there, not a quality measure. Grayscale images stored as RGB pass."""
    step = max(len(paths) // COLOUR_SAMPLE, 1)
    looked, colour = 0, []
    for path in paths[::step][:COLOUR_SAMPLE]:
        array = decode_or_skip(path, size, 3)[0]
        if array is None:
            continue
        looked += 1
        if holds_colour(array):
            colour.append(path)
    if colour and 2 * len(colour) > looked:
        raise DataError(f"{folder}: holds colour images ({len(colour)} of {looked} looked at, e.g. {colour[0].name}), "
                        f"but they would be scored in the grayscale {domain} domain: an FD across domains, not a "
                        f"quality measure; compare {domain} images with {domain} images (convert the folder to "
                        "grayscale first if that is what it holds)")


def folder_spec(folder: Path, channels: int) -> DatasetSpec:
    """The metric dataset of an image folder: its own rotation extractor. Raises :class:`ConfigError` for
    ``channels`` other than 1 or 3."""
    if channels not in (1, 3):
        raise ConfigError(f"--channels: must be 1 or 3, got {channels}")
    return DatasetSpec("folder", folder, channels)


def reference_of(side: Side, spec: DatasetSpec, train_px: int | None, *, cache: str | None, device,
                 console, quiet: bool) -> tuple[Reference, torch.Tensor | None]:
    """The reference side's :class:`Reference` in ``spec``'s extractor and, for a folder, its images at the metric
    size (for the Inception features); a dataset's test split takes the road from ``train_px``. A folder that is
    its own extractor's data contributes its test split only (every 5th image: the extractor never trained on
    them, as for a dataset's reference); a folder scored in another extractor contributes every image. The
    returned spec's ``train_px`` is the size the reference images were made at (for saved statistics)."""
    if side.kind == "dataset":
        return load_reference(replace(spec, train_px=train_px), cache=cache, device=device, console=console,
                              quiet=quiet), None
    own = spec.dataset == "folder" and Path(spec.root).resolve() == Path(side.path).resolve()
    paths = folder_split_paths(side.path, "test") if own else None
    if paths is not None:  # before its extractor is fitted
        require_images(len(paths), f"{side.path}: {len(paths)} image(s) in its test split (every 5th image)")
    extractor = ensure_extractor(spec, cache=cache, device=device, console=console, quiet=quiet)
    check_usable(extractor)
    images, made_at = folder_images(side.path, spec.channels, train_px, spec.size_px, paths,
                                    gray_domain=gray_domain_of(spec))
    features, _ = extract(extractor, iter(images.split(FEATURE_BATCH)), len(images), "reference features",
                          console=console, quiet=quiet)
    real = RealFeatures(features, *formulas.mean_and_covariance(features))
    return Reference(replace(spec, train_px=made_at), extractor, real), images


def save_stats(path: Path, reference: Reference, inception: dict | None, images_from: str = "folder") -> Path:
    """The reference's domain features (so every domain metric can be computed again) and, with ``inception``,
    the Inception mean and covariance (``mu``/``sigma``, pytorch-fid's key names) and features, as one ``.npz``
    written atomically; ``meta`` (JSON) says which extractor and network they belong to, and ``images_from``
    where the images came from (an IDX dataset's name for its test split, else ``folder``)."""
    spec = reference.spec
    meta = {"format": STATS_FORMAT, "version": STATS_VERSION, "dataset": spec.dataset, "root": str(spec.root),
            "images_from": images_from,
            "channels": spec.channels, "label": spec.label, "size_px": spec.size_px,
            "train_px": spec.train_px or spec.size_px,  # the size the images were made at before the metric's
            "extractor_weights_sha256": reference.extractor.weights_sha256,
            "inception_sha256": inception["sha256"] if inception else None,
            "inception_mode": inception["mode"] if inception else None}
    arrays = {"meta": np.array(json.dumps(meta)), "domain_features": reference.real.features.numpy()}
    if inception:
        features = inception["features"].numpy()
        mu, sigma = formulas.mean_and_covariance(features)
        arrays.update(mu=mu, sigma=sigma, inception_features=features)
    if path.suffix != ".npz":
        raise ConfigError(f"--save-stats: {path} must end in .npz")
    return atomic_write(path, lambda fh: np.savez(fh, **arrays))


def stats_spec(meta: dict) -> DatasetSpec:
    """The metric dataset (its extractor) that saved statistics were computed in."""
    return DatasetSpec(meta["dataset"], Path(meta["root"]), int(meta["channels"]), train_px=meta.get("train_px"))


def load_stats(path: Path) -> tuple[dict, RealFeatures, torch.Tensor | None]:
    """What :func:`save_stats` wrote: its meta, the domain features and the Inception features (or None). Raises
    :class:`ConfigError` for a file of another kind or version."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            domain = torch.from_numpy(data["domain_features"])
            inception = torch.from_numpy(data["inception_features"]) if "inception_features" in data else None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: not statistics written by gantrain eval --save-stats ({exc})") from None
    if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
        raise ConfigError(f"{path}: not statistics written by gantrain eval --save-stats (version "
                          f"{STATS_VERSION})")
    return meta, RealFeatures(domain, *formulas.mean_and_covariance(domain)), inception
