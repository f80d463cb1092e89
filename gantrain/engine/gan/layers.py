"""The DCGAN layers as ``nn.Module`` shells over :mod:`gantrain.kernels.conv`.

Every layer keeps the parameters (names, shapes, initialisation) of the ``nn.Conv2d`` or ``nn.ConvTranspose2d``
it stands for, so checkpoints do not depend on the implementation; ``impl`` ("fast", the default, or "aten", the
reference) picks how :mod:`gantrain.kernels.conv` computes it.
"""

from __future__ import annotations

import torch
from torch import nn

from gantrain.kernels import conv
from gantrain.kernels.conv import IMPLS, check_impl

__all__ = ["IMPLS", "ProjectFromVector", "ReduceToVector", "StridedConv2d", "StridedConvTranspose2d"]


class ProjectFromVector(nn.ConvTranspose2d):
    """(N, C_in, 1, 1) -> (N, C_out, k, k): a transposed convolution of a 1x1 map, i.e. ``z @ W``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, impl: str = "fast") -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, bias=False)
        self.impl = check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv.project_from_vector(x, self.weight, self.impl)


class ReduceToVector(nn.Conv2d):
    """(N, C_in, k, k) -> (N, C_out, 1, 1): a valid k x k convolution of a k x k map, i.e. a dense layer."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, impl: str = "fast") -> None:
        super().__init__(in_channels, out_channels, kernel_size, 1, 0, bias=False)
        self.impl = check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv.reduce_to_vector(x, self.weight, self.impl)


class StridedConv2d(nn.Conv2d):
    """A 4x4 stride-2 padding-1 convolution that halves height and width (D's downsampling layers)."""

    def __init__(self, in_channels: int, out_channels: int, impl: str = "fast") -> None:
        super().__init__(in_channels, out_channels, 4, 2, 1, bias=False)
        self.impl = check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv.strided_conv2d(x, self.weight, self.impl)


class StridedConvTranspose2d(nn.ConvTranspose2d):
    """A 4x4 stride-2 padding-1 transposed convolution that doubles height and width (G's upsampling layers)."""

    def __init__(self, in_channels: int, out_channels: int, impl: str = "fast") -> None:
        super().__init__(in_channels, out_channels, 4, 2, 1, bias=False)
        self.impl = check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv.strided_conv_transpose2d(x, self.weight, self.impl)
