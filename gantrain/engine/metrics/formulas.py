"""The metric formulas, on feature matrices (numpy/torch, float64 where accuracy matters).

* Fréchet distance (FD): ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2)``. The trace term is computed
  without a general (non-symmetric) matrix square root: ``S1 S2`` is similar to ``S1^1/2 S2 S1^1/2``, which is
  symmetric positive semi-definite, so the trace of its square root is the sum of the square roots of its
  eigenvalues. Two symmetric eigendecompositions replace scipy's Schur-based ``sqrtm`` (faster, no complex
  round-off to discard).
* KID: the unbiased estimator of the squared MMD with the cubic polynomial kernel ``(x.y / d + 1)^3``
  (Binkowski et al. 2018), averaged over random subsets: mean and standard deviation.
* Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls reaching
  each point's k-th nearest neighbour; precision is the share of generated points inside the real manifold,
  recall the share of real points inside the generated one.
* Density and coverage (Naeem et al. 2020, "Reliable fidelity and diversity metrics for generative models"):
  density counts how many real balls hold each generated point (divided by k; ~1 when the sets match, above
  1 where generated points crowd into dense real regions); coverage is the share of real points whose own ball
  holds at least one generated point, so a dropped mode lowers it even when recall, inflated by outlying
  generated points with huge balls, does not notice.
* Classifier score: the Inception-score formula ``exp(E_x KL(p(y|x) || p(y)))`` on a domain classifier.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KID_DEGREE = 3
PR_NEIGHBOURS = 3
_DISTANCE_ROWS = 1024  # rows of a distance matrix computed at once: bounds memory at rows x N x 8 bytes


def mean_and_covariance(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) in float64 of features (N, D)."""
    x = _as_float64(features)
    if x.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0)."""
    symmetric = (matrix + matrix.T) / 2  # round-off can make a covariance slightly asymmetric
    eigenvalues, vectors = np.linalg.eigh(symmetric)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 sigma2)^1/2)`` for symmetric PSD matrices, via the similar matrix ``S1^1/2 S2 S1^1/2``."""
    root1 = sqrtm_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2); never negative."""
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return max(float(value), 0.0)  # round-off can give -1e-12 for identical sets


def kernel_inception_distance(fake: np.ndarray | torch.Tensor, real: np.ndarray | torch.Tensor, *,
                              subsets: int = 50, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID: mean and std over ``subsets`` random subsets of the unbiased polynomial-kernel MMD^2. When both sets
    are no larger than ``subset_size`` every subset is both whole sets: the std is then not measured (NaN), not 0."""
    x, y = _as_tensor64(fake), _as_tensor64(real)
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(x)} and {len(y)}")
    if size == len(x) == len(y):
        return _mmd2_unbiased(x, y), math.nan
    rng = np.random.default_rng(seed)
    values = [_mmd2_unbiased(x[_subset(rng, len(x), size)], y[_subset(rng, len(y), size)]) for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def sample_size_warnings(num_fake: int, num_real: int, dim: int, subset_size: int, space: str = "") -> list[str]:
    """What the sample sizes make unreliable, in words (empty when nothing): an FD from fewer images than the
    feature dimension + 1 (each covariance is then singular, rank < ``dim``, and FD is biased upward, Chong &
    Forsyth 2020), and KID subsets smaller than ``subset_size`` (a spread over identical subsets is not measured)."""
    notes, where = [], f" in {space}" if space else ""
    few = min(num_fake, num_real)
    if few <= dim:
        notes.append(f"FD{where} from {num_fake} generated and {num_real} real images in {dim}-d features: a "
                     f"covariance from <= {dim} images is singular and the FD is biased upward; compare FDs only at "
                     f"equal n, and use n > {dim} (10000 is the convention)")
    if few < subset_size:
        spread = ("its spread is not measured (every subset is both whole sets)" if num_fake == num_real
                  else "its spread is underestimated")
        notes.append(f"KID{where}: subsets of {few} images instead of {subset_size}; {spread}")
    return notes


def _subset(rng: np.random.Generator, count: int, size: int) -> torch.Tensor:
    # A torch index: indexing a tensor with a numpy array takes a slow per-element path.
    return torch.from_numpy(rng.choice(count, size, replace=False))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2: the kernel's diagonal terms k(x_i, x_i) are left out of the within-set means."""
    dim, m = x.shape[1], x.shape[0]
    k_xx = (x @ x.T / dim + 1) ** KID_DEGREE
    k_yy = (y @ y.T / dim + 1) ** KID_DEGREE
    k_xy = (x @ y.T / dim + 1) ** KID_DEGREE
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                     k: int = PR_NEIGHBOURS) -> tuple[float, float]:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    values = manifold_metrics(real, fake, k)
    return values["precision"], values["recall"]


def manifold_metrics(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                     k: int = PR_NEIGHBOURS) -> dict[str, float]:
    """precision, recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020) of features
    real (N, D) and fake (M, D), with k-th-nearest-neighbour balls (a point on a ball's surface is inside).

    Raises ValueError when a set has k points or fewer."""
    r, f = _as_tensor64(real), _as_tensor64(fake)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall with k={k} need more than {k} samples per set")
    radii_real, radii_fake = _knn_radii(r, k), _knn_radii(f, k)
    inside_real = torch.zeros(len(f), dtype=torch.bool)  # fake point i lies in some real ball
    balls_per_fake = torch.zeros(len(f), dtype=torch.float64)  # how many real balls hold fake point i
    covered = torch.zeros(len(r), dtype=torch.bool)  # real ball j holds some fake point
    for start in range(0, len(f), _DISTANCE_ROWS):
        rows = f[start : start + _DISTANCE_ROWS]
        within = torch.cdist(rows, r) <= radii_real  # (rows, N)
        inside_real[start : start + len(rows)] = within.any(dim=1)
        balls_per_fake[start : start + len(rows)] = within.sum(dim=1).double()
        covered |= within.any(dim=0)
    return {"precision": float(inside_real.double().mean()), "recall": _coverage(r, f, radii_fake),
            "density": float(balls_per_fake.sum() / (k * len(f))), "coverage": float(covered.double().mean())}


def _knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest neighbour within the set (the point itself excluded)."""
    # The k+1-th smallest distance: the smallest is the point's zero distance to itself.
    return torch.cat([torch.cdist(rows, points).kthvalue(k + 1, dim=1).values for rows in points.split(_DISTANCE_ROWS)])


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Share of ``queries`` inside at least one ball (centre, radius)."""
    inside = [(torch.cdist(rows, centres) <= radii).any(dim=1) for rows in queries.split(_DISTANCE_ROWS)]
    return float(torch.cat(inside).double().mean())


def classifier_score(probabilities: np.ndarray | torch.Tensor) -> float:
    """``exp(E_x KL(p(y|x) || p(y)))``: 1 when every image gets the same prediction, up to the class count."""
    p = _as_tensor64(probabilities).clamp_min(1e-12)
    marginal = p.mean(dim=0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(dim=1).mean()))


def class_histogram(probabilities: np.ndarray | torch.Tensor) -> np.ndarray:
    """Share of the images whose most likely class is each class (sums to 1): mode collapse shows as spikes."""
    p = _as_tensor64(probabilities)
    counts = torch.bincount(p.argmax(dim=1), minlength=p.shape[1]).double()
    return (counts / counts.sum()).numpy()


def _as_float64(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def _as_tensor64(values: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().double()
    return torch.from_numpy(np.asarray(values, dtype=np.float64))
