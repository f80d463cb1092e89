"""Noise and images from a generator: what the training loop, the metrics, ``gantrain generate`` and tune share.

Metrics judge a generator, not a trainer (as stylegan2-ada's ``calc_metric(G=...)``): everything here takes a
generator module and noise, never a Trainer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

NUM_FIXED_SAMPLES = 64
"""Images in the fixed-noise sample grid (8 x 8)."""
STANDING_STATS_SAMPLES = 2048
"""Noise vectors behind standing BatchNorm statistics (:func:`standing_bn_stats_`), rounded down to whole batches."""
STANDING_STATS_SEED_OFFSET = 1_000_003
"""Added to the run's seed for the standing-statistics noise, so that it is not the noise of the sample grid or of
the metrics (both drawn from a seed itself): the statistics never see the latents they are judged on."""


@dataclass(frozen=True)
class Latent:
    """G's input space: ``nz`` dimensions drawn from ``noise`` ("normal": N(0, 1); "uniform": U(-1, 1)). What the
    metrics need of a run to make its generator's images (:meth:`of` reads it from a config)."""

    nz: int
    noise: str = "normal"

    @classmethod
    def of(cls, cfg) -> Latent:
        """A config's latent: ``model.nz`` and ``loss.noise``."""
        return cls(cfg.model.nz, cfg.loss.noise)


def sample_noise(n: int, nz: int, kind: str, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latent noise (n, nz), float32: N(0, 1) (``kind="normal"``) or U(-1, 1) (``"uniform"``), drawn from
    ``generator`` so runs are reproducible."""
    if kind == "uniform":
        return torch.rand(n, nz, device=device, generator=generator).mul_(2).sub_(1)
    return torch.randn(n, nz, device=device, generator=generator)


NOISE_BLOCK = 256
"""Rows of noise drawn at a time by :func:`indexed_noise` (256 x nz values: a multiple of 16 for every nz)."""


def indexed_noise(indices: int | Sequence[int], nz: int, kind: str, seed: int,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise vectors (len(indices), nz) of ``seed`` at ``indices`` (an int n: 0..n-1): row i is image i of
    seed s, whatever else is drawn, so ``-n 1`` and ``-n 64`` share image 0 and ``--seeds 100`` is image 100.

    Why blocks: torch's CPU ``randn`` transforms its uniform draws 16 values at a time and redraws a tail that is
    not a multiple of 16, so ``randn(1, nz)`` is not the first row of ``randn(64, nz)``. The noise of ``seed`` is
    therefore drawn in whole blocks of :data:`NOISE_BLOCK` rows from one CPU generator seeded with ``seed``;
    the first n rows equal ``randn(n, nz)`` (as drawn before) whenever n x nz is a multiple of 16."""
    rows = torch.arange(indices) if isinstance(indices, int) else torch.as_tensor(list(indices), dtype=torch.long)
    if rows.numel() == 0:
        return torch.empty(0, nz, device=device)
    if int(rows.min()) < 0:
        raise ValueError(f"noise indices must be >= 0, got {int(rows.min())}")
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(rows.numel(), nz)
    block_of = rows // NOISE_BLOCK
    for b in range(int(rows.max()) // NOISE_BLOCK + 1):  # only the rows asked for are kept: memory O(block)
        block = sample_noise(NOISE_BLOCK, nz, kind, "cpu", gen)
        here = block_of == b
        if bool(here.any()):
            out[here] = block[rows[here] % NOISE_BLOCK]
    return out.to(device)


def fixed_noise(nz: int, kind: str, seed: int, device: torch.device | str, n: int = NUM_FIXED_SAMPLES) -> torch.Tensor:
    """The run's fixed sample noise (n, nz): rows 0..n-1 of ``seed`` (:func:`indexed_noise`), drawn on the CPU,
    so every device, process layout and resumed run draws the same grid."""
    return indexed_noise(n, nz, kind, seed, device)


MIN_TRUNCATION = 1e-3
"""The smallest truncation :func:`truncated_noise` accepts: below it the redraws of normal noise (acceptance
about 0.8 psi) grow without use, every image being the image of z = 0 to 8 bits."""
TRUNCATION_STREAM = 0x7472_756E  # "trun"
"""Mixed with the seed and an image's index into the seed of that image's redraws (:func:`truncated_noise`)."""


def check_truncation(psi: float | None) -> float | None:
    """``psi`` as :func:`truncated_noise` uses it: None for no truncation (None or +inf), else the float.
    Raises ValueError for NaN, psi <= 0 and psi below :data:`MIN_TRUNCATION`."""
    if psi is None or psi == math.inf:
        return None
    psi = float(psi)
    if not psi > 0:  # NaN included
        raise ValueError(f"must be > 0 (inf: no truncation), got {psi}")
    if psi < MIN_TRUNCATION:
        raise ValueError(f"must be at least {MIN_TRUNCATION} (below it every image is the image of z = 0), got {psi}")
    return psi


def _redraw_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s redraw stream: a function of (seed, index) alone (numpy's SeedSequence hash)."""
    state = np.random.SeedSequence([TRUNCATION_STREAM, seed % 2**64, index]).generate_state(1, np.uint64)
    return int(state[0])


def truncated_noise(indices: int | Sequence[int], nz: int, kind: str, seed: int, truncation: float | None = None,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """:func:`indexed_noise` with the truncation trick (Brock et al. 2019, BigGAN, arXiv:1809.11096, sec. 3.1):
    (len(indices), nz) float32 on ``device``; ``truncation`` (psi) None or inf: exactly :func:`indexed_noise`.

    ``kind="normal"``: every coordinate with |z| > psi is redrawn from N(0, 1) until |z| <= psi, so each coordinate
    is N(0, 1) truncated to [-psi, psi] (``scipy.stats.truncnorm(-psi, psi)``); psi = 1 truncates to [-1, 1].
    Coordinates already inside keep their value. Image i's redraws come from a CPU generator of its own, seeded
    from (seed, i) alone: each round draws an (m, nz) block, m = ceil(1 / P(|z| <= psi)), and a coordinate still
    outside takes the first of its m values (column j) that is inside; so row i is the same whatever else is drawn.
    ``kind="uniform"``: U(-1, 1) scaled to U(-psi, psi) (z * psi in float32) when psi < 1; psi >= 1 changes nothing
    (the noise is inside already). Raises ValueError as :func:`check_truncation` and for a negative index."""
    psi = check_truncation(truncation)
    z = indexed_noise(indices, nz, kind, seed)
    if psi is None:
        return z.to(device)
    if kind == "uniform":
        return (z * psi if psi < 1 else z).to(device)
    rows = list(range(indices)) if isinstance(indices, int) else [int(i) for i in indices]
    per_round = math.ceil(1 / math.erf(psi / math.sqrt(2)))
    values = z.numpy()  # the same memory; numpy: small single-threaded steps, compared in float64 (exact)
    outside = np.abs(values.astype(np.float64)) > psi
    for r in np.flatnonzero(outside.any(1)).tolist():
        gen = torch.Generator().manual_seed(_redraw_seed(seed, rows[r]))
        todo = outside[r]
        while todo.any():
            draw = torch.randn(per_round, nz, generator=gen).numpy()
            inside = np.abs(draw.astype(np.float64)) <= psi
            cols = np.flatnonzero(todo & inside.any(0))
            values[r, cols] = draw[inside[:, cols].argmax(0), cols]  # argmax of bools: the first True
            todo[cols] = False
    return z.to(device)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Spherical interpolation from ``a`` to ``b`` (both (nz,)) at fractions ``t`` ((T,)): (T, nz) float32.

    slerp(a, b; t) = sin((1 - t) W) / sin W * a + sin(t W) / sin W * b, W = arccos(a.b / (|a| |b|)): Shoemake's
    formula (1985, "Animating rotation with quaternion curves"), applied to the latents as given (not normalised)
    as in White (2016, "Sampling generative networks", arXiv:1609.04468): for |a| = |b| the norm stays |a| along
    the arc, e.g. orthogonal a, b at t = 0.5 give (a + b) / sqrt(2). Computed in float64; t = 0 and t = 1 give a and
    b exactly. Where sin W < 1e-7 (a, b parallel or opposite: no single great circle) it is :func:`lerp`."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    norms = a64.norm() * b64.norm()
    omega = torch.arccos((a64 @ b64 / norms).clamp(-1, 1)) if norms > 0 else torch.tensor(0.0, dtype=torch.float64)
    if torch.sin(omega) < 1e-7:
        return lerp(a, b, t)
    s = torch.sin(omega)
    return (torch.sin((1 - t64) * omega) / s * a64 + torch.sin(t64 * omega) / s * b64).float()


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Linear interpolation (1 - t) a + t b of ``a`` and ``b`` (both (nz,)) at fractions ``t`` ((T,)): (T, nz)
    float32, computed in float64 (t = 0 and 1 give a and b exactly). For uniform noise: the segment stays in the
    cube [-1, 1]^nz the noise fills, where slerp's arc would leave it."""
    t64 = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    return ((1 - t64) * a.double().flatten() + t64 * b.double().flatten()).float()


def latent_walk(points: torch.Tensor, frames: int, kind: str) -> torch.Tensor:
    """The path through ``points`` ((K, nz), K >= 2): (K - 1, frames, nz) float32, row k the ``frames`` latents from
    point k to point k + 1 (both included, at t = linspace(0, 1, frames)) by :func:`slerp` for ``kind="normal"``
    noise and :func:`lerp` for ``"uniform"``. Raises ValueError for K < 2 or frames < 2."""
    if points.shape[0] < 2 or frames < 2:
        raise ValueError(f"a walk needs at least 2 points and 2 frames, got {points.shape[0]} and {frames}")
    step = lerp if kind == "uniform" else slerp  # as sample_noise: anything but "uniform" is normal noise
    t = torch.linspace(0, 1, frames, dtype=torch.float64)
    return torch.stack([step(points[k], points[k + 1], t) for k in range(points.shape[0] - 1)])


@torch.no_grad()
def generate_images(model: nn.Module, noise: torch.Tensor, policy=None) -> torch.Tensor:
    """``model(noise)`` as float32 images (N, C, S, S) in [-1, 1], in eval mode (BatchNorm uses its running
    statistics and updates none), restoring the model's mode; under ``policy``'s autocast when given (a
    :class:`~gantrain.engine.gan.precision.PrecisionPolicy`)."""
    was_training = model.training
    model.eval()
    try:
        with policy.autocast() if policy else contextlib.nullcontext():
            images = model(noise)
    finally:
        model.train(was_training)
    return images.float()


@torch.no_grad()
def standing_bn_stats_(model: nn.Module, nz: int, kind: str, batch_size: int, seed: int, policy=None,
                       num_samples: int = STANDING_STATS_SAMPLES) -> nn.Module:
    """Recomputes ``model``'s BatchNorm running statistics, in place, for its current weights; returns ``model``.

    ``model`` runs in train mode on ``num_samples // batch_size`` (at least 1) batches of ``batch_size`` noise
    vectors (``nz`` wide, ``kind`` as :func:`sample_noise`) drawn on the CPU from ``seed`` alone, under
    ``policy``'s autocast when given; each BatchNorm's running mean and variance become the plain averages of its
    per-batch means and unbiased variances (``torch.optim.swa_utils.update_bn``, momentum ``None``), and its
    momentum and the model's train/eval mode are restored. No other random stream is drawn from: the result is a
    function of the weights and the arguments.

    Why: an EMA generator's weights average many steps of G, but G's own running statistics follow G's latest
    weights; BigGAN's "standing statistics" (Brock et al. 2019, arXiv:1809.11096) and SWA's BatchNorm pass
    (Izmailov et al. 2018, arXiv:1803.05407) recompute them for the averaged weights.
    """
    from torch.optim.swa_utils import update_bn

    device = next(model.parameters()).device
    noise = torch.Generator().manual_seed(seed)
    batches = (sample_noise(batch_size, nz, kind, "cpu", noise).to(device)
               for _ in range(max(1, num_samples // batch_size)))
    with policy.autocast() if policy else contextlib.nullcontext():
        update_bn(batches, model)
    return model
