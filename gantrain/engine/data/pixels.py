"""Pixel values between storage and the model: uint8 0..255 <-> float in [-1, 1], in one place.

``x = u / 127.5 - 1`` (so 0 -> -1, 255 -> 1; written ``u * (2 / 255) - 1``) and back ``u = round((x + 1) * 127.5)``
clipped to 0..255, the DCGAN convention (tanh output, Normalize((0.5,), (0.5,)) input).
"""

from __future__ import annotations

import torch

HALF_RANGE = 127.5
"""(u - 127.5) / 127.5 maps uint8 onto [-1, 1] (DALI's crop_mirror_normalize takes it as mean and std)."""


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (any shape) -> float32 in [-1, 1]; float input is taken as already in [-1, 1] (returned as float32)."""
    return images.float().mul(2.0 / 255.0).sub(1.0) if images.dtype == torch.uint8 else images.float()


def to_unit_(images: torch.Tensor) -> torch.Tensor:
    """:func:`to_unit` in place, for a float tensor holding 0..255 (the hot path converts a fresh copy)."""
    return images.mul_(2.0 / 255.0).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] (clipped) -> uint8, rounded to the nearest level."""
    return images.float().clamp(-1, 1).add(1).mul(HALF_RANGE).round().to(torch.uint8)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> the nearest of the 256 levels a stored image can hold, still in [-1, 1] (float32)."""
    return to_unit(to_uint8(images))
