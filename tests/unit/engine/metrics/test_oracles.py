"""gantrain's metric formulas against reference libraries on the same features: torchmetrics
(FrechetInceptionDistance, KernelInceptionDistance, InceptionScore, each given a custom ``feature=`` module, so
no download) and prdc (precision, recall, density, coverage; Naeem et al. 2020's own code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gantrain.engine.metrics import formulas

torchmetrics = pytest.importorskip("torchmetrics", reason="the dev extra's torchmetrics is not installed")


class _Passthrough(torch.nn.Module):
    """The 'feature extractor' handed to torchmetrics: the inputs already are feature vectors (N, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _feature_sets(dim: int = 32, n_real: int = 600, n_fake: int = 500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two different Gaussians with full, unequal covariances: every term of FD and KID matters."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    b = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    real = rng.normal(size=(n_real, dim)) @ a + 0.5
    fake = rng.normal(size=(n_fake, dim)) @ b + rng.normal(0, 0.3, size=dim)
    return real, fake


@pytest.mark.parametrize("dim", [8, 64])
def test_fd_matches_torchmetrics_fid(dim: int) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _feature_sets(dim)
    metric = FrechetInceptionDistance(feature=_Passthrough(dim))
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected = float(metric.compute())
    ours = formulas.frechet_distance(*formulas.mean_and_covariance(fake), *formulas.mean_and_covariance(real))
    assert expected > 1.0
    assert ours == pytest.approx(expected, rel=1e-7)


def test_kid_matches_torchmetrics_on_whole_sets() -> None:
    """With one subset as large as each set, the estimate does not depend on how either draws subsets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _feature_sets(16, n_real=400, n_fake=400)
    metric = KernelInceptionDistance(feature=_Passthrough(16), subsets=1, subset_size=400)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected_mean, expected_std = (float(v) for v in metric.compute())
    mean, std = formulas.kernel_inception_distance(fake, real, subsets=1, subset_size=400)
    assert expected_mean > 0.01
    assert mean == pytest.approx(expected_mean, rel=1e-9)
    # torchmetrics reports a spread of 0 over one subset that is both whole sets; gantrain says it was not measured
    assert expected_std == 0.0 and math.isnan(std)


def test_kid_subset_average_agrees_with_torchmetrics_statistically() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _feature_sets(16, n_real=600, n_fake=600, seed=3)
    torch.manual_seed(0)
    metric = KernelInceptionDistance(feature=_Passthrough(16), subsets=100, subset_size=200)
    metric.update(torch.from_numpy(real), real=True)
    metric.update(torch.from_numpy(fake), real=False)
    expected_mean, expected_std = (float(v) for v in metric.compute())
    mean, std = formulas.kernel_inception_distance(fake, real, subsets=100, subset_size=200)
    # both average 100 subset estimates: their means differ by a few standard errors at most
    assert abs(mean - expected_mean) < 4 * expected_std / np.sqrt(100) * np.sqrt(2)
    assert std == pytest.approx(expected_std, rel=0.3)


def test_classifier_score_matches_torchmetrics_inception_score() -> None:
    from torchmetrics.image.inception import InceptionScore

    logits = torch.from_numpy(np.random.default_rng(1).normal(0, 2.0, size=(700, 10)))
    metric = InceptionScore(feature=_Passthrough(10), splits=1)
    metric.update(logits)
    expected, _ = metric.compute()
    ours = formulas.classifier_score(logits.softmax(dim=1))
    assert 1.5 < float(expected) < 10
    assert ours == pytest.approx(float(expected), rel=1e-9)


prdc = pytest.importorskip("prdc", reason="the dev extra's prdc is not installed")


@pytest.mark.parametrize("k", [3, 5])
def test_precision_recall_density_coverage_match_prdc(k: int) -> None:
    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, (500, 12))
    fake = np.concatenate([rng.normal(0, 1, (200, 12)), rng.normal(0.8, 1.5, (200, 12))])  # half matches
    expected = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=k)
    ours = formulas.manifold_metrics(real, fake, k)
    assert set(ours) == set(expected)
    for key in expected:
        assert ours[key] == pytest.approx(float(expected[key]), abs=1e-12), key
    assert 0.05 < ours["precision"] < 0.95 and 0.05 < ours["coverage"] < 0.95  # not a degenerate case


def test_coverage_catches_a_dropped_mode_that_recall_misses() -> None:
    """Real data: two far-apart clusters. Generated: only the first cluster, plus a few scattered outliers
    whose huge k-NN balls swallow the second cluster, so recall stays high; coverage halves."""
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (300, 4)), rng.normal(20, 1, (300, 4))])
    fake = np.concatenate([rng.normal(0, 1, (290, 4)), rng.uniform(-40, 60, (10, 4))])
    values = formulas.manifold_metrics(real, fake, 3)
    reference = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=3)
    assert values["coverage"] == pytest.approx(float(reference["coverage"]), abs=1e-12)
    assert values["recall"] > 0.9
    assert values["coverage"] < 0.55
