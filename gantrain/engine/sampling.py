"""Noise and images from a generator: what the training loop, the metrics, ``gantrain generate`` and tune share.

Metrics judge a generator, not a trainer (as stylegan2-ada's ``calc_metric(G=...)``): everything here takes a
generator module and noise, never a Trainer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

NUM_FIXED_SAMPLES = 64
"""Images in the fixed-noise sample grid (8 x 8)."""


def sample_noise(n: int, nz: int, kind: str, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latent noise (n, nz), float32: N(0, 1) (``kind="normal"``) or U(-1, 1) (``"uniform"``), drawn from
    ``generator`` so runs are reproducible."""
    if kind == "uniform":
        return torch.rand(n, nz, device=device, generator=generator).mul_(2).sub_(1)
    return torch.randn(n, nz, device=device, generator=generator)


def fixed_noise(nz: int, kind: str, seed: int, device: torch.device | str, n: int = NUM_FIXED_SAMPLES) -> torch.Tensor:
    """The run's fixed sample noise (n, nz): drawn on the CPU from ``seed`` alone, so every device, process
    layout and resumed run draws the same grid."""
    return sample_noise(n, nz, kind, "cpu", torch.Generator().manual_seed(seed)).to(device)


@torch.no_grad()
def generate_images(model: nn.Module, noise: torch.Tensor, policy=None) -> torch.Tensor:
    """``model(noise)`` as float32 images (N, C, S, S) in [-1, 1], in eval mode (BatchNorm uses its running
    statistics and updates none), restoring the model's mode; under ``policy``'s autocast when given (a
    :class:`~gantrain.engine.precision.PrecisionPolicy`)."""
    was_training = model.training
    model.eval()
    try:
        with policy.autocast() if policy else contextlib.nullcontext():
            images = model(noise)
    finally:
        model.train(was_training)
    return images.float()
