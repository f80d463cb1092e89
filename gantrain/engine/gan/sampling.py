"""Noise and images from a generator: what the training loop, the metrics, ``gantrain generate`` and tune share.

Metrics judge a generator, not a trainer (as stylegan2-ada's ``calc_metric(G=...)``): everything here takes a
generator module and noise, never a Trainer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

NUM_FIXED_SAMPLES = 64
"""Images in the fixed-noise sample grid (8 x 8)."""
STANDING_STATS_SAMPLES = 2048
"""Noise vectors behind standing BatchNorm statistics (:func:`standing_bn_stats_`), rounded down to whole batches."""
STANDING_STATS_SEED_OFFSET = 1_000_003
"""Added to the run's seed for the standing-statistics noise, so that it is not the noise of the sample grid or of
the metrics (both drawn from a seed itself): the statistics never see the latents they are judged on."""


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
    blocks = [sample_noise(NOISE_BLOCK, nz, kind, "cpu", gen) for _ in range(int(rows.max()) // NOISE_BLOCK + 1)]
    return torch.cat(blocks)[rows].to(device)


def fixed_noise(nz: int, kind: str, seed: int, device: torch.device | str, n: int = NUM_FIXED_SAMPLES) -> torch.Tensor:
    """The run's fixed sample noise (n, nz): rows 0..n-1 of ``seed`` (:func:`indexed_noise`), drawn on the CPU,
    so every device, process layout and resumed run draws the same grid."""
    return indexed_noise(n, nz, kind, seed, device)


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
