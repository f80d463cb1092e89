"""Differentiable augmentation (DiffAugment) of the images D sees.

Zhao, Liu, Lin, Zhu and Han, "Differentiable Augmentation for Data-Efficient GAN Training", NeurIPS 2020
(arXiv:2006.10738); the ops are those of the authors' ``DiffAugment_pytorch.py`` (mit-han-lab/data-efficient-gans):

* ``color``: per image, in this order, brightness (add ``b ~ U(-0.5, 0.5)``), saturation (scale each pixel's
  channels around their mean by ``s ~ U(0, 2)``) and contrast (scale around the image's mean over channels and
  pixels by ``c ~ U(0.5, 1.5)``). For 1-channel images saturation is the identity (a pixel's one channel is its
  own mean): its factor is still drawn, so the random stream is the same whatever the channel count.
* ``translation``: per image, shift by whole pixels, ``dy, dx`` each uniform in ``[-r, r]`` with
  ``r = int(size / 8 + 0.5)`` (4 px at 32, 8 at 64, 16 at 128); pixels shifted in are zero.
* ``cutout``: per image, zero a square of ``int(size / 2 + 0.5)`` pixels a side centred at a uniform position
  (any pixel, or one past the last for even sides, as the reference draws it), clipped at the border.

Every op is differentiable in the images (gradients reach G through D's view of its fakes): brightness has
gradient 1, saturation and contrast are affine in the pixels, translation moves gradients back the way the
pixels came and cutout zeroes them under the square. The random parameters come from a ``torch.Generator``
the caller owns (the training step's noise stream, saved in checkpoints), drawn on its device: no host sync,
no Python-side randomness, and the same generator state gives the same output.

The randomness is split from the arithmetic: :func:`draw_params` draws :class:`AugmentParams` for a policy
and :func:`apply` applies them, so a test can feed known parameters; :func:`diff_augment` does both.

Shapes, dtypes, ranges: images are ``(B, C, H, W)`` floats (float32, or bf16/fp16 as autocast makes them),
in [-1, 1] for data and G's tanh output, in either memory format. The arithmetic runs in float32 (float64 input
stays float64) and the result comes back in the input's dtype and memory format: channels-last stays
channels-last. Values are not clipped: ``color`` moves pixels out of [-1, 1] (brightness alone to [-1.5, 1.5];
brightness, saturation and contrast together to at most 7 in magnitude for RGB, 3 for grayscale, as
saturation reaches 3.5 and contrast doubles that at worst); translation and cutout only insert zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gantrain.engine.config import DIFFAUG_OPS

OPS = DIFFAUG_OPS
"""The op names of a policy, as ``--diffaug`` takes them: color, translation, cutout."""
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(policy: str | Sequence[str]) -> tuple[str, ...]:
    """``'color, cutout'`` (or a sequence of names) -> ``('color', 'cutout')``; ``''`` -> ``()`` (off).
    Raises ``ValueError`` naming the known ops for an unknown one (the config gives users a one-line error first)."""
    names = policy.split(",") if isinstance(policy, str) else list(policy)
    ops = tuple(n.strip() for n in names if n.strip())
    unknown = [n for n in ops if n not in OPS]
    if unknown:
        raise ValueError(f"unknown DiffAugment op {unknown[0]!r} (known: {', '.join(OPS)})")
    return ops


def max_shift(size: int) -> int:
    """Largest translation in pixels for an image side of ``size`` (the reference's ``int(size * 1/8 + 0.5)``)."""
    return int(size * TRANSLATION_RATIO + 0.5)


def cutout_size(size: int) -> int:
    """Side of the cutout square for an image side of ``size`` (the reference's ``int(size * 1/2 + 0.5)``)."""
    return int(size * CUTOUT_RATIO + 0.5)


@dataclass(frozen=True)
class AugmentParams:
    """The random parameters of one augmentation of a batch of B images; None for an op not in the policy."""

    brightness: torch.Tensor | None = None
    """(B,) float32 in [-0.5, 0.5): added to every pixel of the image."""
    saturation: torch.Tensor | None = None
    """(B,) float32 in [0, 2): factor on each pixel's deviation from its channel mean."""
    contrast: torch.Tensor | None = None
    """(B,) float32 in [0.5, 1.5): factor on each value's deviation from the image mean."""
    translation: torch.Tensor | None = None
    """(B, 2) int64 ``(dy, dx)`` in [-max_shift, max_shift]: output pixel (i, j) is input (i - dy, j - dx), or 0."""
    cutout: torch.Tensor | None = None
    """(B, 2) int64 ``(cy, cx)``: the square covers rows ``cy - k // 2`` to ``cy - k // 2 + k - 1`` (k the side),
    columns alike, clipped to the image."""


def draw_params(policy: str | Sequence[str], batch: int, height: int, width: int,
                generator: torch.Generator) -> AugmentParams:
    """Draws the parameters of ``policy`` for ``batch`` images of ``height`` x ``width`` from ``generator``, on its
    device, op by op in the policy's order (color: brightness, saturation, contrast; translation: dy, dx; cutout:
    cy, cx), as the reference draws them. An empty policy draws nothing."""
    device, found = generator.device, {}
    for op in parse_policy(policy):
        if op == "color":
            found["brightness"] = torch.rand(batch, generator=generator, device=device) - 0.5
            found["saturation"] = torch.rand(batch, generator=generator, device=device) * 2.0
            found["contrast"] = torch.rand(batch, generator=generator, device=device) + 0.5
        elif op == "translation":
            ry, rx = max_shift(height), max_shift(width)
            dy = torch.randint(-ry, ry + 1, (batch,), generator=generator, device=device)
            dx = torch.randint(-rx, rx + 1, (batch,), generator=generator, device=device)
            found["translation"] = torch.stack([dy, dx], dim=1)
        else:  # cutout
            ky, kx = cutout_size(height), cutout_size(width)
            cy = torch.randint(0, height + (1 - ky % 2), (batch,), generator=generator, device=device)
            cx = torch.randint(0, width + (1 - kx % 2), (batch,), generator=generator, device=device)
            found["cutout"] = torch.stack([cy, cx], dim=1)
    return AugmentParams(**found)


# ----- the ops: (B, C, H, W) float tensors in, the same shape out --------------------------------------------------
def _per_image(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def brightness(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x + b`` per image."""
    return x + _per_image(b, x)


def saturation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(x - m) * s + m`` per image, m each pixel's mean over channels; the identity for one channel."""
    if x.shape[1] == 1:
        return x
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_image(s, x) + mean


def contrast(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(x - m) * c + m`` per image, m the image's mean over channels and pixels."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_image(c, x) + mean


def translate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shifts image n by ``shift[n] = (dy, dx)`` whole pixels: ``out[n, :, i, j] = x[n, :, i - dy, j - dx]``,
    0 where that lies outside the image. Gathers from a zero-padded copy (its gradient is a scatter in which
    each input pixel receives at most one value, so it is deterministic)."""
    b, c, h, w = x.shape
    shift = shift.to(x.device)
    padded = F.pad(x, (1, 1, 1, 1))  # row/column 0 and h+1 (w+1) are the zeros every outside index is clamped to
    rows = (torch.arange(h, device=x.device) - shift[:, :1] + 1).clamp_(0, h + 1)  # (B, H) rows of padded
    cols = (torch.arange(w, device=x.device) - shift[:, 1:] + 1).clamp_(0, w + 1)  # (B, W)
    out = padded.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, w + 2))
    return out.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def cutout(x: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """Zeroes, in image n, the square of side ``cutout_size`` centred at ``centre[n] = (cy, cx)`` (see
    :class:`AugmentParams`), clipped at the border; a multiplication by a 0/1 mask."""
    h, w = x.shape[2:]
    ky, kx = cutout_size(h), cutout_size(w)
    centre = centre.to(x.device)
    top, left = centre[:, :1] - ky // 2, centre[:, 1:] - kx // 2  # (B, 1) each
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + ky)  # (B, H)
    in_cols = (cols >= left) & (cols < left + kx)  # (B, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])  # (B, H, W)
    return x * keep.unsqueeze(1).to(x.dtype)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def apply(x: torch.Tensor, policy: str | Sequence[str], params: AugmentParams) -> torch.Tensor:
    """Applies ``policy``'s ops in its order with the given parameters. ``x``: (B, C, H, W) floats; the result has
    its shape, dtype and memory format (the arithmetic runs in float32, or float64 for float64 input)."""
    ops = parse_policy(policy)
    if not ops:
        return x
    missing = [op for op in ops if getattr(params, "brightness" if op == "color" else op) is None]
    if missing:
        raise ValueError(f"no parameters drawn for DiffAugment op {missing[0]!r} (draw_params with this policy)")
    y = x if x.dtype in (torch.float32, torch.float64) else x.float()  # float64 stays (gradcheck)
    for op in ops:
        if op == "color":
            y = contrast(saturation(brightness(y, params.brightness), params.saturation), params.contrast)
        elif op == "translation":
            y = translate(y, params.translation)
        else:
            y = cutout(y, params.cutout)
    return y.to(dtype=x.dtype).contiguous(memory_format=_memory_format(x))


def diff_augment(x: torch.Tensor, policy: str | Sequence[str], generator: torch.Generator) -> torch.Tensor:
    """DiffAugment of a batch: fresh parameters from ``generator`` (:func:`draw_params`), then :func:`apply`.
    An empty policy returns ``x`` itself and draws nothing."""
    ops = parse_policy(policy)
    if not ops:
        return x
    return apply(x, ops, draw_params(ops, x.shape[0], x.shape[2], x.shape[3], generator))
