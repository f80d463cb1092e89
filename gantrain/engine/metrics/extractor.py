"""Domain feature extractors: a small CNN per dataset whose pooled last hidden layer gives the features.

The standard FID uses ImageNet Inception features, whose weights would have to be downloaded at run time;
the FID authors advise, for MNIST-like data, a classifier trained on that data instead. So:

* labelled data (fashion-mnist, mnist): a 10-class classifier trained on the train split; its test-split
  accuracy is stored with its weights.
* an unlabelled image folder (cats): a **self-supervised rotation classifier** (Gidaris et al. 2018): it
  learns to tell whether an image was turned by 0, 90, 180 or 270 degrees, which needs the object's shape
  and pose (eyes above nose above mouth), the semantics a cat-face GAN must get right. It trains like the
  supervised one (no decoder as an autoencoder would need, no augmentation pipeline to tune), and its
  rotation accuracy on the held-out split says whether it learnt anything. Its "classifier score" is over
  the four rotations of each image.

Features are the 128 global-average-pooled activations before the linear head, in fp32, eval mode.
Extractors are cached under ``<cache>/extractors/<dataset>-<train-data sha256>-v<version>.pt``; the real
features they give are cached per extractor weights (:attr:`Extractor.key`). The FashionMNIST and MNIST
extractors of the official files ship with gantrain (``gantrain/resources/extractors/``, listed with their
SHA-256 and test accuracy in ``extractors.json``), so a first run starts without a fit; one in the cache (a
refit: ``gantrain metrics fit-extractor --dataset D --force``) takes precedence.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from gantrain.engine.data.pixels import to_unit
from gantrain.engine.errors import GantrainError
from gantrain.engine.gan.precision import resolve_amp
from gantrain.engine.metrics.cache import cache_dir, load_artifact, save_artifact
from gantrain.engine.metrics.progress import task_bar
from gantrain.engine.metrics.reference import DatasetSpec, Split, load_split, split_sha256
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.checkpoint import state_digest



class ExtractorNearChance(GantrainError):
    """A feature extractor whose held-out accuracy is near chance: its features carry no information."""


FORMAT = "gantrain-extractor"
VERSION = 1  # bump when the architecture or the fit recipe changes: old cache files are then ignored
FEATURE_DIM = 128
FIT_EPOCHS = 3
#: The fitted extractors gantrain ships (the official FashionMNIST and MNIST files'); see extractors.json there.
SHIPPED = Path(__file__).resolve().parents[2] / "resources" / "extractors"
FIT_BATCH = 256
FIT_LR = 3e-3
FIT_WEIGHT_DECAY = 5e-4
_EVAL_BATCH = 1000


class FeatureNet(nn.Module):
    """3x3 conv-BN-ReLU stages, each halving the size with a 2x2 max-pool, down to 4x4 (where a last stage
    widens to 128 channels), global average pool, linear head. ~7 MFLOP per 32-pixel image, so the three
    FashionMNIST epochs of a fit (90.7% test accuracy) take about a minute on two idle CPU cores."""

    def __init__(self, channels: int, size_px: int, num_classes: int, base_width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width_in = channels
        for stage in range(int(math.log2(size_px // 4))):
            width = min(base_width * 2**stage, FEATURE_DIM)
            layers += [*_conv_bn_relu(width_in, width), nn.MaxPool2d(2)]
            width_in = width
        layers += _conv_bn_relu(width_in, FEATURE_DIM)
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return features, self.head(features)


def _conv_bn_relu(width_in: int, width_out: int) -> list[nn.Module]:
    return [nn.Conv2d(width_in, width_out, 3, padding=1, bias=False), nn.BatchNorm2d(width_out), nn.ReLU(inplace=True)]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range generators emit; floats pass through."""
    return to_unit(images)


def task_batch(images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the extractor's task: the labels, or the four rotations of each image."""
    if labels is not None:
        return images, labels
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(4)])
    targets = torch.arange(4, device=images.device).repeat_interleave(len(images))
    return rotated, targets


@dataclass
class Extractor:
    """A fitted feature extractor and what is known about it."""

    net: FeatureNet
    info: dict[str, Any]
    path: Path
    fitted_now: bool = False
    """True when this call fitted it (it was not in the cache)."""

    @property
    def key(self) -> str:
        """Identifies the extractor (dataset, training data hash, version, weights): names its cached real
        features. The weights are part of it because a refit (``--force``, other ``--epochs``, another machine's
        fit) writes the same cache file with other weights, and real features of the old weights would then be
        compared with generated features of the new ones."""
        return f"{self.path.stem}-w{self.weights_sha256[:16]}"

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights (:func:`~gantrain.engine.state.checkpoint.state_digest`): two extractors score alike
        exactly when this is equal."""
        return self.info["weights_sha256"]

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, 128) and class probabilities (N, classes) of images at the extractor's size."""
        features, logits = self.net.features_and_logits(to_unit_range(images.to(self.device)))
        return features.float(), logits.float().softmax(dim=1)


def extractor_path(spec: DatasetSpec, train_sha256: str, cache: Path) -> Path:
    return cache / "extractors" / f"{spec.label}-{train_sha256[:16]}-v{VERSION}.pt"


def ensure_extractor(spec: DatasetSpec, *, cache: str | Path | None = None, device: torch.device | str = "cpu",
                     console: Console | None = None, quiet: bool = False, force: bool = False,
                     epochs: int = FIT_EPOCHS) -> Extractor:
    """The cached extractor of ``spec``'s train split; fitted (with a progress bar) when missing or ``force``.
    Whatever the training size ``spec`` names, the extractor sees images taken straight to the metric's size."""
    spec = spec.extractor_spec()
    train_sha256 = split_sha256(spec, "train")
    path = extractor_path(spec, train_sha256, cache_dir(cache))
    state = None if force else _valid_state(load_artifact(path), train_sha256)
    if state is not None:
        return _from_state(state, path, device)
    shipped = SHIPPED / path.name
    state = None if force or not shipped.is_file() else _valid_state(load_artifact(shipped), train_sha256)
    if state is not None:  # the official files' extractor, as gantrain ships it
        return _from_state(state, shipped, device)
    if not quiet:
        log.info("fitting the %s feature extractor for the quality metrics (not in the cache %s; fitted once per "
                 "dataset and machine, then cached)", spec.label, path.parent)
    state = fit_state(spec, train_sha256, epochs=epochs, device=device, console=console, quiet=quiet)
    save_artifact(state, path)
    extractor = _from_state(state, path, device)
    extractor.fitted_now = True
    return extractor


# An extractor must beat chance by this many binomial standard errors of its test accuracy, and by this margin:
# one that does not has learnt nothing (a rotation classifier fitted on a tiny folder reaches 25%, chance for
# four rotations) and its "features" would score generators by noise.
CHANCE_SIGMAS = 3.0
CHANCE_MARGIN = 0.10


def check_usable(extractor: Extractor) -> None:
    """Raises :class:`ExtractorNearChance` when the extractor's held-out accuracy is not clearly above chance
    (1 / number of classes): by at least 10 points and 3 binomial standard errors of its test-split size."""
    info = extractor.info
    classes = len(info["class_names"])
    chance = 1.0 / classes
    accuracy = float(info["test_accuracy"])
    targets = int(info.get("test_targets") or 0)
    needed = chance + CHANCE_MARGIN
    if targets:
        needed = max(needed, chance + CHANCE_SIGMAS * math.sqrt(chance * (1 - chance) / targets))
    if accuracy < needed:
        size = f" on {targets} held-out targets" if targets else ""
        raise ExtractorNearChance(
            f"the {info['label']} feature extractor ({extractor.path}) reached {100 * accuracy:.1f}% {info['task']} "
            f"accuracy{size}, near chance ({100 * chance:.0f}% for {classes} classes; at least {100 * needed:.1f}% "
            f"needed): its features would score noise, so no metrics are computed; fit it on more images "
            f"(`gantrain metrics fit-extractor --force`), point --metrics-cache at a cache holding a better one, "
            f"or use a labelled dataset's extractor")


def _valid_state(state: dict | None, train_sha256: str) -> dict | None:
    if state is None or state.get("format") != FORMAT or state.get("version") != VERSION:
        return None
    return state if state.get("train_sha256") == train_sha256 else None


def _from_state(state: dict, path: Path, device: torch.device | str) -> Extractor:
    net = FeatureNet(state["channels"], state["size_px"], len(state["class_names"]))
    net.load_state_dict(state["weights"])
    net = net.to(device).eval().requires_grad_(False)
    # Hashed on every load, not stored: a cache file edited or refitted by an older gantrain cannot carry a stale one.
    info = {**{k: v for k, v in state.items() if k != "weights"}, "weights_sha256": state_digest(state["weights"])}
    return Extractor(net, info, path)


def fit_state(spec: DatasetSpec, train_sha256: str, *, epochs: int = FIT_EPOCHS, device: torch.device | str = "cpu",
              seed: int = 0, console: Console | None = None, quiet: bool = False) -> dict[str, Any]:
    """Fits an extractor on the train split and measures it on the test split: the cache file's contents."""
    started = time.perf_counter()
    train, test = load_split(spec, "train"), load_split(spec, "test")
    with torch.random.fork_rng(devices=[]):  # the caller's (training run's) RNG stream stays untouched
        torch.manual_seed(seed)
        net = FeatureNet(spec.channels, spec.size_px, len(spec.class_names)).to(device)
    net = net.to(memory_format=torch.channels_last)
    _train(net, train, epochs=epochs, seed=seed, console=console, quiet=quiet)
    accuracy = measure_accuracy(net, test)
    seconds = time.perf_counter() - started
    if not quiet:
        log.info("%s extractor: test %s accuracy %.2f%% after %d epoch(s), %.0f s", spec.label, spec.task,
                 100 * accuracy, epochs, seconds)
    return {"format": FORMAT, "version": VERSION, "dataset": spec.dataset, "label": spec.label, "task": spec.task,
            "channels": spec.channels, "size_px": spec.size_px, "class_names": list(spec.class_names),
            "train_sha256": train_sha256, "test_sha256": split_sha256(spec, "test"), "train_images": len(train.images),
            "test_accuracy": accuracy, "test_targets": len(test.images) * (4 if spec.task == "rotation" else 1),
            "epochs": epochs, "fit_seconds": round(seconds, 1),
            "weights": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def _train(net: FeatureNet, train: Split, *, epochs: int, seed: int, console: Console | None, quiet: bool) -> None:
    """AdamW with a one-cycle schedule: the fastest route to a usable classifier in a few epochs."""
    device = next(net.parameters()).device
    bf16 = resolve_amp("auto", device) == "bf16"  # the fit always runs as --amp auto would
    images_per_batch = FIT_BATCH if train.labels is not None else FIT_BATCH // 4  # rotation: 4 inputs per image
    steps_per_epoch = max(len(train.images) // images_per_batch, 1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, FIT_LR, total_steps=epochs * steps_per_epoch)
    order = torch.Generator().manual_seed(seed)
    net.train()
    with task_bar("fit extractor", epochs * steps_per_epoch, console=console, quiet=quiet) as advance:
        for epoch in range(epochs):
            shuffled = torch.randperm(len(train.images), generator=order)[: steps_per_epoch * images_per_batch]
            for index in shuffled.split(images_per_batch):
                loss = _fit_step(net, optimizer, train, index, bf16)
                schedule.step()
                advance(info=f"epoch {epoch + 1}/{epochs} loss {loss:.3f}")
    net.eval()


def _fit_step(net: FeatureNet, optimizer: torch.optim.Optimizer, train: Split, index: torch.Tensor,
              bf16: bool) -> float:
    device = next(net.parameters()).device
    labels = train.labels[index].to(device) if train.labels is not None else None
    inputs, targets = task_batch(to_unit_range(train.images[index].to(device)), labels)
    # bf16 autocast where it computes faster than fp32 (resolve_amp; ~1.5x on such CPUs); features are fp32.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = net(inputs.contiguous(memory_format=torch.channels_last))
    loss = F.cross_entropy(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())  # a host sync per step is fine here: the fit is not the hot loop


@torch.no_grad()
def measure_accuracy(net: FeatureNet, test: Split) -> float:
    """Share of the test split's task targets predicted right (class or rotation)."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    correct = total = 0
    for start in range(0, len(test.images), _EVAL_BATCH):
        labels = test.labels[start : start + _EVAL_BATCH].to(device) if test.labels is not None else None
        inputs, targets = task_batch(to_unit_range(test.images[start : start + _EVAL_BATCH].to(device)), labels)
        correct += int((net(inputs).argmax(dim=1) == targets).sum())
        total += len(targets)
    net.train(was_training)
    if total == 0:
        raise GantrainError("the test split is empty: cannot measure the extractor")
    return correct / total
