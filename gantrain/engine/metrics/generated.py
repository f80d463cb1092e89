"""What the metrics take from a generator: batches of images from fixed noise, put on the real images' footing
(the extractor's size, 8-bit levels), and the protocol constants both feature spaces (domain, Inception) use."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.sampling import Latent, generate_images, indexed_noise
from gantrain.engine.metrics.reference import DatasetSpec, to_metric_size

GENERATE_BATCH = 500
KID_SUBSETS = 50
KID_SUBSET_SIZE = 1000


def prepare_generated(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """Generator output in [-1, 1] at the extractor's size, then on 8-bit levels (:func:`to_metric_size`, the
    road real images take too): the extractor must not tell generated from real by the resize or by sub-level
    detail."""
    if images.shape[1] != spec.channels:
        raise ConfigError(f"--channels: the generator makes {images.shape[1]}-channel images, the {spec.label} "
                          f"extractor reads {spec.channels}")
    return to_metric_size(images, spec.size_px)


@torch.no_grad()
def generated_batches(generator: torch.nn.Module, latent: Latent, spec: DatasetSpec, num_samples: int, seed: int,
                      device: torch.device) -> Iterator[torch.Tensor]:
    """Batches of generated images from fixed noise (its own RNG: the caller's streams are not advanced), in
    fp32 whatever the training precision, so tracking during training and `gantrain eval` agree."""
    noise = indexed_noise(num_samples, latent.nz, latent.noise, seed)  # image i of seed s, whatever n
    for chunk in noise.split(GENERATE_BATCH):
        yield prepare_generated(generate_images(generator, chunk.to(device)), spec)
