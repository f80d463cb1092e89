"""Generators and discriminators: shapes, output ranges, the documented layer layouts and the initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gantrain.engine.config import PRESETS, ModelConfig, preset
from gantrain.engine.gan.models import Discriminator, Generator, build_models, init_weights
from gantrain.engine.gan.sampling import sample_noise


def _convs(module: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_generator_and_discriminator_shapes(name: str) -> None:
    cfg = preset(name)
    size, channels = cfg.data.image_size, cfg.data.channels
    torch.manual_seed(0)
    g, d = build_models(cfg.model, size, channels)
    z = sample_noise(3, cfg.model.nz, cfg.loss.noise, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        images = g(z)
        logits = d(images)
    assert images.shape == (3, channels, size, size)
    assert images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.std() > 0  # not a constant output
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kernel", [4, 5])
@pytest.mark.parametrize("size", [32, 64, 128])
def test_dcgan_any_size_and_kernel(size: int, kernel: int) -> None:
    cfg = ModelConfig(ngf=8, ndf=8, kernel_size=kernel)
    g, d = build_models(cfg, size, 3)
    with torch.no_grad():
        x = g(torch.randn(2, cfg.nz))
        assert x.shape == (2, 3, size, size)
        assert d(x).shape == (2,)


def test_fashion32_layer_widths() -> None:
    cfg = preset("fashion32")
    g, d = build_models(cfg.model, 32, 1)
    g_convs = _convs(g, nn.ConvTranspose2d)
    assert [(c.in_channels, c.out_channels) for c in g_convs] == [(100, 256), (256, 128), (128, 64), (64, 1)]
    assert [c.kernel_size for c in g_convs] == [(4, 4)] * 4
    assert [c.stride for c in g_convs] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    d_convs = _convs(d, nn.Conv2d)
    assert [(c.in_channels, c.out_channels) for c in d_convs] == [(1, 64), (64, 128), (128, 256), (256, 1)]
    assert [c.stride for c in d_convs] == [(2, 2), (2, 2), (2, 2), (1, 1)]
    # BatchNorm on every hidden G layer, and on D's hidden layers but not its first.
    assert [b.num_features for b in _convs(g, nn.BatchNorm2d)] == [256, 128, 64]
    assert [b.num_features for b in _convs(d, nn.BatchNorm2d)] == [128, 256]
    assert isinstance(list(g.modules())[-1], nn.Tanh)


def test_cats128_dense_discriminator_layout() -> None:
    cfg = preset("cats128")
    g, d = build_models(cfg.model, 128, 3)
    convs = _convs(d, nn.Conv2d)
    assert len(convs) == 5
    assert [c.kernel_size for c in convs] == [(5, 5)] * 5
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 2]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1024]
    linears = _convs(d, nn.Linear)
    assert len(linears) == 1 and linears[0].out_features == 1
    assert linears[0].in_features == 1024 * 8 * 8
    assert list(d.modules())[-1] is linears[0]  # the dense head is last: D ends in a raw logit
    # G: dense first, then four stride-2 5x5 transposed convolutions and a stride-1 one to the image.
    g_layers = list(g.net)
    assert isinstance(g_layers[0], nn.Linear) and g_layers[0].out_features == 1024 * 8 * 8
    g_convs = _convs(g, nn.ConvTranspose2d)
    assert [c.stride[0] for c in g_convs] == [2, 2, 2, 2, 1]
    assert [c.kernel_size for c in g_convs] == [(5, 5)] * 5
    assert g_convs[-1].out_channels == 3
    assert any(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in g.modules())


def test_init_std_near_002() -> None:
    torch.manual_seed(0)
    g, d = build_models(preset("fashion32").model, 32, 1)
    for model in (g, d):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 1000:
                assert abs(m.weight.std().item() - 0.02) < 0.002, m
                assert abs(m.weight.mean().item()) < 0.002, m
            elif isinstance(m, nn.BatchNorm2d):
                assert abs(m.weight.mean().item() - 1.0) < 0.01
                assert 0.01 < m.weight.std().item() < 0.03
                assert torch.count_nonzero(m.bias) == 0


def test_init_std_follows_config_and_zeroes_biases() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="dense", kernel_size=5, ngf=8, ndf=8, init_std=0.05)
    g, d = build_models(cfg, 64, 3)
    weights = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Linear, nn.ConvTranspose2d))])
    assert abs(weights.std().item() - 0.05) < 0.003
    for m in list(g.modules()) + list(d.modules()):
        if isinstance(m, (nn.Linear, nn.ConvTranspose2d, nn.Conv2d)) and m.bias is not None:
            assert torch.count_nonzero(m.bias) == 0


def test_same_seed_same_weights() -> None:
    cfg = ModelConfig(ngf=8, ndf=8)
    torch.manual_seed(3)
    a, _ = build_models(cfg, 32, 1)
    torch.manual_seed(3)
    b, _ = build_models(cfg, 32, 1)
    torch.manual_seed(4)
    c, _ = build_models(cfg, 32, 1)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
    assert not all(torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_noise_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    uniform = sample_noise(4096, 100, "uniform", "cpu", gen)
    assert uniform.min() >= -1 and uniform.max() <= 1 and abs(uniform.mean().item()) < 0.01
    assert abs(uniform.std().item() - (1 / 3) ** 0.5) < 0.01
    normal = sample_noise(4096, 100, "normal", "cpu", torch.Generator().manual_seed(0))
    assert abs(normal.std().item() - 1.0) < 0.01 and normal.abs().max() > 3
    again = sample_noise(4096, 100, "normal", "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(normal, again)


def test_discriminator_returns_logits_not_probabilities() -> None:
    torch.manual_seed(0)
    d = Discriminator(ModelConfig(ndf=8), 32, 1)
    init_weights(d, 1.0)  # large weights: logits well outside [0, 1]
    d.eval()
    with torch.no_grad():
        logits = d(torch.rand(8, 1, 32, 32) * 2 - 1)
    assert (logits.abs() > 1).any()


def test_generator_exposes_nz() -> None:
    assert Generator(ModelConfig(nz=17, ngf=4), 32, 1).nz == 17
