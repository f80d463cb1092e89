"""DCGAN generators and discriminators built from :class:`ModelConfig`.

Two families:

* ``dcgan`` (all-convolutional, the PyTorch tutorial/examples layout): G projects z (as a 1x1 map) to 4x4
  with a 4x4 transposed convolution, then doubles the resolution with stride-2 transposed convolutions
  (kernel 4, or 5 with output padding) down to ``ngf`` channels; D mirrors it and ends in a 4x4 valid
  convolution to one logit. At 32 pixels this is exactly 256-128-64 (G) and 64-128-256 (D).
* ``dense`` (the 128-pixel cat tutorial): G is a dense layer to (size/16)^2 x 16*ngf, then four 5x5
  stride-2 transposed convolutions and a 5x5 stride-1 one to the image; D is five 5x5 convolutions
  (strides 2, 2, 2, 1, 2) with BatchNorm and LeakyReLU, flattened into a dense logit.

D always returns raw logits: the loss is BCE-with-logits, which stays correct under autocast. The dcgan
layers come from :mod:`gantrain.engine.gan.layers` (``impl="fast"`` computes some of them in faster exact forms).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gantrain.engine.config import ModelConfig
from gantrain.engine.gan.layers import ProjectFromVector, ReduceToVector, StridedConv2d, StridedConvTranspose2d


def _up(cin: int, cout: int, kernel: int, impl: str = "fast") -> nn.ConvTranspose2d:
    """A stride-2 transposed convolution that exactly doubles height and width."""
    if kernel == 4:
        return StridedConvTranspose2d(cin, cout, impl)
    return nn.ConvTranspose2d(cin, cout, 5, 2, 2, output_padding=1, bias=False)


def _down(cin: int, cout: int, kernel: int, stride: int = 2, impl: str = "fast") -> nn.Conv2d:
    """A convolution that divides height and width by ``stride`` exactly."""
    if kernel == 4 and stride == 2:
        return StridedConv2d(cin, cout, impl)
    return nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 if kernel == 5 else 1, bias=False)


def _act(kind: str, slope: float) -> nn.Module:
    return nn.ReLU(inplace=True) if kind == "relu" else nn.LeakyReLU(slope, inplace=True)


class Generator(nn.Module):
    """Maps noise ``z`` of shape (N, nz) to images in [-1, 1] of shape (N, C, S, S)."""

    def __init__(self, cfg: ModelConfig, image_size: int, channels: int, impl: str = "fast") -> None:
        super().__init__()
        self.nz = cfg.nz
        self.net = _dense_g(cfg, image_size, channels) if cfg.arch == "dense" else _conv_g(cfg, image_size, channels, impl)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Discriminator(nn.Module):
    """Maps images (N, C, S, S) to one real/fake logit per image, shape (N,)."""

    def __init__(self, cfg: ModelConfig, image_size: int, channels: int, impl: str = "fast") -> None:
        super().__init__()
        self.net = _dense_d(cfg, image_size, channels) if cfg.arch == "dense" else _conv_d(cfg, image_size, channels, impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def _conv_g(cfg: ModelConfig, size: int, channels: int, impl: str) -> nn.Sequential:
    n_up = int(math.log2(size)) - 2  # stride-2 layers from 4x4 to size x size, the last one emits the image
    width = cfg.ngf * 2 ** (n_up - 1)
    layers: list[nn.Module] = [
        nn.Unflatten(1, (cfg.nz, 1, 1)),
        ProjectFromVector(cfg.nz, width, 4, impl),
        nn.BatchNorm2d(width),
        _act(cfg.g_activation, cfg.leaky_slope),
    ]
    for _ in range(n_up - 1):
        layers += [_up(width, width // 2, cfg.kernel_size, impl), nn.BatchNorm2d(width // 2), _act(cfg.g_activation, cfg.leaky_slope)]
        width //= 2
    layers += [_up(width, channels, cfg.kernel_size, impl), nn.Tanh()]
    return nn.Sequential(*layers)


def _conv_d(cfg: ModelConfig, size: int, channels: int, impl: str) -> nn.Sequential:
    n_down = int(math.log2(size)) - 2
    layers: list[nn.Module] = [_down(channels, cfg.ndf, cfg.kernel_size, impl=impl), nn.LeakyReLU(cfg.leaky_slope, inplace=True)]
    width = cfg.ndf
    for _ in range(n_down - 1):
        layers += [_down(width, width * 2, cfg.kernel_size, impl=impl), nn.BatchNorm2d(width * 2), nn.LeakyReLU(cfg.leaky_slope, inplace=True)]
        width *= 2
    layers.append(ReduceToVector(width, 1, 4, impl))
    return nn.Sequential(*layers)


def _dense_g(cfg: ModelConfig, size: int, channels: int) -> nn.Sequential:
    start, width = size // 16, cfg.ngf * 16
    layers: list[nn.Module] = [
        nn.Linear(cfg.nz, width * start * start),
        nn.Unflatten(1, (width, start, start)),
        _act(cfg.g_activation, cfg.leaky_slope),
    ]
    for _ in range(4):
        layers += [_up(width, width // 2, 5), nn.BatchNorm2d(width // 2), _act(cfg.g_activation, cfg.leaky_slope)]
        width //= 2
    layers += [nn.ConvTranspose2d(width, channels, 5, 1, 2), nn.Tanh()]
    return nn.Sequential(*layers)


def _dense_d(cfg: ModelConfig, size: int, channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin, width = channels, cfg.ndf
    for stride in (2, 2, 2, 1, 2):
        layers += [_down(cin, width, 5, stride), nn.BatchNorm2d(width), nn.LeakyReLU(cfg.leaky_slope, inplace=True)]
        cin, width = width, width * 2
    final = size // 16
    layers += [nn.Flatten(), nn.Linear(cin * final * final, 1)]
    return nn.Sequential(*layers)


def init_weights(module: nn.Module, std: float) -> None:
    """DCGAN initialisation: conv/dense weights N(0, std), BatchNorm gamma N(1, std) and beta 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def build_models(cfg: ModelConfig, image_size: int, channels: int, impl: str = "fast") -> tuple[Generator, Discriminator]:
    """G and D, initialised; ``impl`` picks how the layers of :mod:`gantrain.engine.gan.layers` compute."""
    g, d = Generator(cfg, image_size, channels, impl), Discriminator(cfg, image_size, channels, impl)
    init_weights(g, cfg.init_std)
    init_weights(d, cfg.init_std)
    return g, d
