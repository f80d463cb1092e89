"""Quality of a generator against real data, in the features of the dataset's extractor.

``evaluate_generator`` is the one entry point the tuner (and any script) needs: generator + config in,
metrics dict out; it fits/loads the extractor and the real statistics on first use and keeps them in
memory for later calls in the same process. The CLI's ``gantrain eval`` and the training loop use the
:class:`Evaluator` underneath it, which also returns the class histogram and notes for display.

Protocol: generated images are resized to the extractor's size and quantised to 8 bits (as real images are
stored), and compared with the real **test** split (never seen by the extractor's fit), whose images take the
same road from the generator's training size (:mod:`gantrain.engine.metrics.reference`):

* ``fd``: Fréchet distance of feature Gaussians (all test images as the reference);
* ``kid_mean``/``kid_std``: KID over 50 random subsets of up to 1000 images per set;
* ``precision``/``recall``/``density``/``coverage``: k=3 nearest-neighbour manifolds, with as many real as
  generated images;
* ``classifier_score``: the Inception-score formula on the extractor's class probabilities;
* ``hist_<class>``: the share of generated images predicted as each class (mode collapse shows here).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from gantrain.engine.config import Config
from gantrain.engine.gan.sampling import Latent
from gantrain.engine.metrics import formulas, inception
from gantrain.engine.metrics.generated import (KID_SUBSET_SIZE, KID_SUBSETS, generated_batches)
from gantrain.engine.metrics.cache import cache_dir, load_artifact, save_artifact
from gantrain.engine.metrics.extractor import Extractor, check_usable, ensure_extractor, task_batch, to_unit_range
from gantrain.engine.metrics.progress import resolve_quiet, task_bar
from gantrain.engine.metrics.reference import DatasetSpec, load_split, spec_from_config, split_sha256
from gantrain.engine.outputs.runlog import log, warn_once

METRIC_KEYS = ("fd", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "classifier_score")
FEATURE_BATCH = 1000
PR_REAL_SEED = 12345  # fixes which real images form the precision/recall reference, so runs compare


@dataclass
class RealFeatures:
    """Features of one real split and their Gaussian statistics."""

    features: torch.Tensor
    """float32 (N, D)."""
    mean: np.ndarray
    covariance: np.ndarray


@dataclass
class MetricReport:
    """What one evaluation found."""

    values: dict[str, float]
    """The metrics (METRIC_KEYS) plus ``hist_<class>`` shares."""
    num_generated: int
    num_real: int
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    """What the sample sizes make unreliable (:func:`~gantrain.engine.metrics.formulas.sample_size_warnings`)."""

    @property
    def histogram(self) -> dict[str, float]:
        return {k.removeprefix("hist_"): v for k, v in self.values.items() if k.startswith("hist_")}


@dataclass
class Reference:
    """Everything a comparison needs about the real data: the extractor and the test split's features."""

    spec: DatasetSpec
    extractor: Extractor
    real: RealFeatures


def load_reference(spec: DatasetSpec, *, cache: str | Path | None = None, device: torch.device | str = "cpu",
                   console: Console | None = None, quiet: bool = False) -> Reference:
    """The extractor (fitted when missing) and the test split's features (computed once, then cached).

    Raises :class:`ExtractorNearChance` when the extractor's held-out accuracy is near chance."""
    extractor = ensure_extractor(spec, cache=cache, device=device, console=console, quiet=quiet)
    check_usable(extractor)
    real = real_features(extractor, spec, "test", cache=cache, console=console, quiet=quiet)
    return Reference(spec, extractor, real)


def real_features(extractor: Extractor, spec: DatasetSpec, split: str, *, cache: str | Path | None = None,
                  console: Console | None = None, quiet: bool = False) -> RealFeatures:
    """Features of a real split, cached per extractor, split and split content."""
    path = cache_dir(cache) / "real" / f"{extractor.key}-{split}-{split_sha256(spec, split)[:16]}{spec.via}.pt"
    state = load_artifact(path)
    if state is None or "features" not in state:
        images = load_split(spec, split).images
        features, _ = extract(extractor, iter(images.split(FEATURE_BATCH)), len(images),
                              f"{split} features", console=console, quiet=quiet)
        mean, covariance = formulas.mean_and_covariance(features)
        state = {"features": features, "mean": torch.from_numpy(mean), "covariance": torch.from_numpy(covariance)}
        save_artifact(state, path)
    return RealFeatures(state["features"], state["mean"].numpy(), state["covariance"].numpy())


def extract(extractor: Extractor, batches: Iterator[torch.Tensor], total: int, what: str, *,
            console: Console | None = None, quiet: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) and task probabilities of image batches (uint8, or floats in [-1, 1])."""
    features, probabilities = [], []
    with task_bar(what, total, console=console, quiet=quiet) as advance:
        for images in batches:
            batch_features, batch_probs = extractor(images)
            features.append(batch_features.cpu())
            probabilities.append(_task_probabilities(extractor, images, batch_probs).cpu())
            advance(len(images))
    return torch.cat(features), torch.cat(probabilities)


def _task_probabilities(extractor: Extractor, images: torch.Tensor, upright: torch.Tensor) -> torch.Tensor:
    """Class probabilities; for the rotation task those of all four rotations (what its score is over)."""
    if extractor.info["task"] != "rotation":
        return upright
    rotated, _ = task_batch(to_unit_range(images.to(extractor.device)), None)
    with torch.no_grad():
        logits = extractor.net(rotated)
    return logits.float().softmax(dim=1).view(4, len(images), -1).transpose(0, 1)


def compare(fake_features: torch.Tensor, fake_probs: torch.Tensor, reference: Reference, *, seed: int = 0,
            real: RealFeatures | None = None) -> dict[str, float]:
    """All metrics of generated features against the reference's real features (or ``real``)."""
    real = real or reference.real
    mean, covariance = formulas.mean_and_covariance(fake_features)
    kid_mean, kid_std = formulas.kernel_inception_distance(fake_features, real.features, subsets=KID_SUBSETS,
                                                        subset_size=KID_SUBSET_SIZE, seed=seed)
    manifold = formulas.manifold_metrics(_pr_subset(real.features, len(fake_features)), fake_features)
    values = {"fd": formulas.frechet_distance(mean, covariance, real.mean, real.covariance),
              "kid_mean": kid_mean, "kid_std": kid_std, **manifold,
              "classifier_score": formulas.classifier_score(fake_probs.reshape(-1, fake_probs.shape[-1]))}
    upright = fake_probs[:, 0] if fake_probs.dim() == 3 else fake_probs
    names = reference.extractor.info["class_names"]
    values.update({f"hist_{name}": float(share) for name, share in zip(names, formulas.class_histogram(upright))})
    return values


def _pr_subset(real_features: torch.Tensor, count: int) -> torch.Tensor:
    """A fixed random subset of the real features, as large as the generated set (PR is size-sensitive)."""
    if count >= len(real_features):
        return real_features
    order = torch.randperm(len(real_features), generator=torch.Generator().manual_seed(PR_REAL_SEED))
    return real_features[order[:count]]


class Evaluator:
    """Holds a :class:`Reference` and evaluates generators against it."""

    def __init__(self, reference: Reference, *, console: Console | None = None, quiet: bool = False) -> None:
        self.reference, self.console, self.quiet = reference, console, quiet

    @classmethod
    def for_config(cls, cfg: Config, *, device: torch.device | str = "cpu", console: Console | None = None,
                   quiet: bool = False, cache: str | Path | None = None) -> Evaluator:
        reference = load_reference(spec_from_config(cfg), cache=cache or cfg.eval.metrics_cache or None,
                                   device=device, console=console, quiet=quiet)
        return cls(reference, console=console, quiet=quiet)

    def evaluate(self, generator: torch.nn.Module, latent: Latent, *, num_samples: int = 2000,
                 seed: int = 0) -> MetricReport:
        """Metrics of ``num_samples`` images of ``generator`` from the fixed noise of ``seed`` in its ``latent``
        space (eval mode; its mode and BN statistics are kept)."""
        started = time.perf_counter()
        device = next(generator.parameters()).device
        batches = generated_batches(generator, latent, self.reference.spec, num_samples, seed, device)
        features, probs = extract(self.reference.extractor, batches, num_samples, "generated features",
                                  console=self.console, quiet=self.quiet)
        values = compare(features, probs, self.reference, seed=seed)
        num_real = len(self.reference.real.features)
        return MetricReport(values, num_samples, num_real, seconds=time.perf_counter() - started,
                            warnings=self.size_warnings(num_samples, num_real, features.shape[1]))

    def size_warnings(self, num_fake: int, num_real: int, dim: int) -> list[str]:
        """:func:`~gantrain.engine.metrics.formulas.sample_size_warnings` in this extractor's features, each also
        logged once per process."""
        notes = formulas.sample_size_warnings(num_fake, num_real, dim, KID_SUBSET_SIZE,
                                              f"the {self.reference.extractor.info['label']} extractor's features")
        warn_once(notes)
        return notes

    def real_halves(self, num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two disjoint random halves of the real test split, uint8 (n, C, S, S) each, n = min(num_samples,
        half the split); the same halves for the same seed."""
        images = load_split(self.reference.spec, "test").images
        half = min(num_samples, len(images) // 2)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        return images[order[:half]], images[order[half : 2 * half]]

    def real_vs_real(self, *, num_samples: int = 10000, seed: int = 0) -> MetricReport:
        """The floor: two disjoint random halves of the real test split, one in the generated role."""
        started = time.perf_counter()
        fake_images, real_images = self.real_halves(num_samples, seed)
        half = len(fake_images)
        lowered = []
        if half < num_samples:  # the halves are disjoint: each holds at most half the split
            lowered = [f"-n {num_samples}: each real half holds at most half the test split, {half} images"]
            log.warning(lowered[0])
        extractor = self.reference.extractor
        fake_features, fake_probs = extract(extractor, iter(fake_images.split(FEATURE_BATCH)), half, "real half A",
                                            console=self.console, quiet=self.quiet)
        real_features_b, _ = extract(extractor, iter(real_images.split(FEATURE_BATCH)), half, "real half B",
                                     console=self.console, quiet=self.quiet)
        real = RealFeatures(real_features_b, *formulas.mean_and_covariance(real_features_b))
        values = compare(fake_features, fake_probs, self.reference, seed=seed, real=real)
        return MetricReport(values, half, half, seconds=time.perf_counter() - started,
                            warnings=lowered + self.size_warnings(half, half, fake_features.shape[1]))


_EVALUATORS: dict[tuple, Evaluator] = {}
_EVALUATORS_LOCK = threading.Lock()


def evaluate_generator(generator: torch.nn.Module, cfg: Config, *, num_samples: int = 2000, device=None,
                       seed: int = 0, quiet: bool | None = None) -> dict[str, float]:
    """Quality metrics of ``generator`` for ``cfg``'s dataset: the objective ``gantrain tune`` optimises.

    Returns at least ``fd``, ``kid_mean``, ``kid_std``, ``precision``, ``recall``, ``density``, ``coverage``
    and ``classifier_score`` (plus ``hist_<class>`` shares; with ``--eval-metrics inception`` also
    ``inception_fid``, ``inception_kid_mean``/``_std`` and ``inception_s_per_1000``). Fits the extractor and caches real statistics on first use; keeps them
    in memory for later calls. No progress bars when ``quiet`` is true, or (by default) off the main thread
    or inside a Ray worker. The generator is evaluated in eval mode and left in the mode it had.
    """
    quiet = resolve_quiet(quiet)
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    evaluator = _shared_evaluator(cfg, device, quiet)
    original_device = next(generator.parameters()).device
    generator.to(device)
    try:
        values = evaluator.evaluate(generator, Latent.of(cfg), num_samples=num_samples, seed=seed).values
        if inception.requested(cfg.eval.eval_metrics):
            values.update(inception.generator_scores(generator, Latent.of(cfg), evaluator.reference.spec,
                                                     cfg.eval.inception_mode, num_samples=num_samples, seed=seed,
                                                     cache=cfg.eval.metrics_cache or None))
        return values
    finally:
        generator.to(original_device)


def _shared_evaluator(cfg: Config, device: torch.device, quiet: bool) -> Evaluator:
    spec = spec_from_config(cfg)
    key = (spec, str(cache_dir(cfg.eval.metrics_cache or None)), str(device))
    with _EVALUATORS_LOCK:  # tune may call from several threads: fit the extractor once
        if key not in _EVALUATORS:
            _EVALUATORS[key] = Evaluator.for_config(cfg, device=device, quiet=quiet)
        evaluator = _EVALUATORS[key]
    return Evaluator(evaluator.reference, quiet=quiet)
