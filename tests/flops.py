"""Model FLOPs of a 32-px DCGAN training step counted by hand, layer by layer (the reference for MFU)."""

from __future__ import annotations


def _conv(cin: int, cout: int, k: int, out_hw: int) -> int:
    return 2 * cin * cout * k * k * out_hw * out_hw


def _conv_transpose(cin: int, cout: int, k: int, in_hw: int) -> int:
    return 2 * cin * cout * k * k * in_hw * in_hw


def dcgan32_step_flops(nz: int, ngf: int, ndf: int, channels: int) -> int:
    """Per image: G 1->4->8->16->32 and D 32->16->8->4->1 with 4x4 kernels. A tutorial step runs D forward 3 times
    (real, detached fake, fake for G) and G once; each backward costs twice its forward (input and weight
    gradients), except where no input gradient is needed: D's first layer on real and detached inputs, G's first
    layer (the noise)."""
    g = [_conv_transpose(nz, ngf * 4, 4, 1), _conv_transpose(ngf * 4, ngf * 2, 4, 4),
         _conv_transpose(ngf * 2, ngf, 4, 8), _conv_transpose(ngf, channels, 4, 16)]
    d = [_conv(channels, ndf, 4, 16), _conv(ndf, ndf * 2, 4, 8), _conv(ndf * 2, ndf * 4, 4, 4), _conv(ndf * 4, 1, 4, 1)]
    return 9 * sum(d) - 2 * d[0] + 3 * sum(g) - g[0]
