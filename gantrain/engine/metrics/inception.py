"""The standard Inception FID, when it can be had offline: torch-fidelity installed and its Inception-v3
weights (``weights-inception-2015-12-05-6726825d.pth``) on disk. Anything missing is a skip with a reason,
never a failure: the domain-extractor metrics are the ones gantrain relies on.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from gantrain.engine.metrics import stats

INCEPTION_BATCH = 100
_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_unavailable(weights: Path | None) -> str | None:
    """Why the Inception FID cannot be computed here, or None when it can."""
    if weights is None:
        return ("no --inception-weights given (torch-fidelity's Inception-v3 weights, "
                f"{_FIDELITY_WEIGHTS}, cannot be downloaded on this machine)")
    if not Path(weights).is_file():
        return f"the Inception weights file {weights} does not exist"
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "torch_fidelity":
            return "torch-fidelity is not installed (pip install torch-fidelity)"
        return f"torch-fidelity cannot be imported: it needs {exc.name}, which is not installed"
    except ImportError as exc:
        return f"torch-fidelity cannot be imported ({exc})"
    return None


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] or uint8, 1 or 3 channels -> uint8 RGB, the input torch-fidelity's Inception takes."""
    if images.dtype != torch.uint8:
        images = images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def inception_fid(fake_batches: Iterator[torch.Tensor], real_images: torch.Tensor, weights: Path,
                  device: torch.device | str = "cpu") -> float:
    """FID in torch-fidelity's Inception-v3 pool features (2048-d); resizing to 299 px happens inside it."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    net = net.to(device).eval()
    fake = torch.cat([_pool_features(net, to_rgb_uint8(batch), device) for batch in fake_batches])
    real = torch.cat([_pool_features(net, to_rgb_uint8(batch), device) for batch in real_images.split(INCEPTION_BATCH)])
    return stats.frechet_distance(*stats.mean_and_covariance(fake), *stats.mean_and_covariance(real))


def _pool_features(net: torch.nn.Module, images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    out = net(images.to(device))
    return (out[0] if isinstance(out, (tuple, list)) else out).double().cpu()
