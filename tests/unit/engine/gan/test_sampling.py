"""Index-stable noise: image i of seed s is the same whatever is drawn with it (n, batch size, which indices);
its truncation (against scipy's truncnorm) and the slerp/lerp of interpolations (against hand-worked values)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gantrain.engine.gan.sampling import (NOISE_BLOCK, check_truncation, fixed_noise, indexed_noise, latent_walk, lerp,
                                        slerp, truncated_noise)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
@pytest.mark.parametrize("nz", [100, 3, 7, 128])
def test_image_i_of_a_seed_does_not_depend_on_how_many_are_drawn(nz: int, kind: str) -> None:
    big = indexed_noise(NOISE_BLOCK * 2 + 5, nz, kind, seed=3)
    for n in (1, 2, 5, 63, 64, NOISE_BLOCK - 1, NOISE_BLOCK + 1):
        assert torch.equal(indexed_noise(n, nz, kind, seed=3), big[:n]), n
    picked = [NOISE_BLOCK * 2 + 4, 0, 100, 100]  # any order, repeats allowed
    assert torch.equal(indexed_noise(picked, nz, kind, seed=3), big[picked])
    assert not torch.equal(indexed_noise(4, nz, kind, seed=4), big[:4])


def test_torch_randn_alone_is_not_prefix_stable() -> None:
    """Why indexed_noise exists (the fault of `generate -n 1` vs `-n 64`): if torch ever fixes this, the block
    drawing is still correct, only no longer needed."""
    one = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    many = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(one[0], many[0])


@pytest.mark.parametrize("nz", [100, 3])
def test_the_grid_and_whole_batches_keep_the_noise_drawn_before(nz: int) -> None:
    """n x nz a multiple of 16 (the 64-image grid for every nz; 2,000 metric samples of nz 100): the same noise as
    one randn(n, nz) from the seed, so sample grids and metrics of older runs are unchanged."""
    for n in (64, 2000):
        if (n * nz) % 16:
            continue
        before = torch.randn(n, nz, generator=torch.Generator().manual_seed(9))
        assert torch.equal(indexed_noise(n, nz, "normal", 9), before)
    assert torch.equal(fixed_noise(nz, "normal", 9, "cpu"), torch.randn(64, nz, generator=torch.Generator().manual_seed(9)))


def test_the_noise_has_the_distribution_it_names() -> None:
    normal = indexed_noise(4000, 100, "normal", 0).numpy().ravel()
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    uniform = indexed_noise(4000, 100, "uniform", 0).numpy().ravel()
    assert uniform.min() >= -1 and uniform.max() <= 1
    assert abs(uniform.mean()) < 0.01 and abs(uniform.std() - 1 / np.sqrt(3)) < 0.01  # U(-1, 1): sd 1/sqrt(3)


def test_no_indices_and_negative_indices() -> None:
    assert indexed_noise([], 10, "normal", 0).shape == (0, 10)
    with pytest.raises(ValueError, match=">= 0"):
        indexed_noise([-1], 10, "normal", 0)


# ----- the truncation trick ------------------------------------------------------------------------------
@pytest.mark.parametrize("psi", [0.5, 1.0, 2.0])
def test_truncated_normal_noise_is_scipys_truncnorm(psi: float) -> None:
    """200,000 values (2000 x 100) against scipy.stats.truncnorm(-psi, psi): all inside, mean 0 and the
    variance within 5 standard errors (of the sample variance: sqrt((mu4 - var^2) / N)), and a KS test."""
    stats = pytest.importorskip("scipy.stats")
    values = truncated_noise(2000, 100, "normal", 0, psi).double().numpy().ravel()
    assert values.shape == (200_000,) and np.abs(values).max() <= psi
    ref = stats.truncnorm(-psi, psi)
    var, mu4 = ref.var(), ref.moment(4)
    assert abs(values.mean()) < 5 * np.sqrt(var / values.size)
    assert abs(values.var() - var) < 5 * np.sqrt((mu4 - var**2) / values.size), (values.var(), var)
    assert stats.kstest(values, ref.cdf).pvalue > 1e-3
    if psi < 2:  # the truncation is real: the untruncated variance (1) is far outside the error
        assert abs(values.var() - 1) > 0.1


def test_truncation_keeps_the_values_inside_and_redraws_the_rest() -> None:
    base = indexed_noise(300, 64, "normal", 5)
    cut = truncated_noise(300, 64, "normal", 5, 0.7)
    inside = base.abs() <= 0.7
    assert torch.equal(cut[inside], base[inside])
    assert not torch.equal(cut[~inside], base[~inside]) and (cut[~inside].abs() <= 0.7).all()


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_truncated_noise_is_index_stable(kind: str) -> None:
    big = truncated_noise(NOISE_BLOCK + 40, 100, kind, 3, 0.6)
    for n in (1, 7, 64):
        assert torch.equal(truncated_noise(n, 100, kind, 3, 0.6), big[:n]), n
    picked = [NOISE_BLOCK + 39, 0, 17, 17]
    assert torch.equal(truncated_noise(picked, 100, kind, 3, 0.6), big[picked])
    assert not torch.equal(truncated_noise(4, 100, kind, 4, 0.6), big[:4])


def test_truncated_uniform_noise_is_scaled() -> None:
    base = indexed_noise(2000, 100, "uniform", 1)
    half = truncated_noise(2000, 100, "uniform", 1, 0.5)
    assert torch.equal(half, base * 0.5)
    values = half.double().numpy().ravel()
    assert np.abs(values).max() <= 0.5 and abs(values.std() - 0.5 / np.sqrt(3)) < 0.005  # U(-0.5, 0.5)
    for psi in (1.0, 2.0):  # already inside
        assert torch.equal(truncated_noise(2000, 100, "uniform", 1, psi), base)


@pytest.mark.parametrize("off", [None, float("inf")])
def test_no_truncation_is_the_plain_noise(off) -> None:
    for kind in ("normal", "uniform"):
        assert torch.equal(truncated_noise([5, 0, 300], 10, kind, 2, off), indexed_noise([5, 0, 300], 10, kind, 2))


@pytest.mark.parametrize("psi", [0.0, -1.0, float("nan"), 1e-4, -float("inf")])
def test_truncation_refuses_psi_not_above_0(psi: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        truncated_noise(2, 10, "normal", 0, psi)
    with pytest.raises(ValueError, match="must be"):
        check_truncation(psi)


# ----- slerp, lerp and walks -------------------------------------------------------------------------------
def _slerp_reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Shoemake's formula, as White 2016 writes it for latents (numpy, float64)."""
    omega = np.arccos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))
    return np.sin((1 - t) * omega) / np.sin(omega) * a + np.sin(t * omega) / np.sin(omega) * b


def test_slerp_hand_worked_values() -> None:
    s2 = np.sqrt(2)
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])  # orthogonal, norm 3
    out = slerp(a, b, [0.0, 0.5, 1 / 3, 1.0]).double().numpy()
    assert np.allclose(out[1], [3 / s2, 3 / s2, 0], atol=1e-6)  # (a + b) / sqrt(2): norm 3 kept
    assert np.allclose(out[2], [3 * np.sqrt(3) / 2, 3 / 2, 0], atol=1e-6)  # sin(60 deg) a + sin(30 deg) b
    assert np.array_equal(out[0], a.numpy()) and np.array_equal(out[3], b.numpy())
    # 60 degrees apart, norm 2: the midpoint is at 30 degrees, norm 2
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([1.0, np.sqrt(3)])
    assert np.allclose(slerp(a, b, [0.5])[0].numpy(), [np.sqrt(3), 1.0], atol=1e-6)
    # different norms (1 and 2, orthogonal): both coefficients sin(45 deg) = 1/sqrt(2): (1/sqrt(2), sqrt(2))
    mid = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), [0.5])[0].numpy()
    assert np.allclose(mid, [1 / s2, s2], atol=1e-6)


def test_slerp_of_latents_against_the_reference_and_exact_ends() -> None:
    a, b = indexed_noise([0, 1], 100, "normal", 0)
    t = np.linspace(0, 1, 9)
    out = slerp(a, b, t)
    assert out.shape == (9, 100) and out.dtype == torch.float32
    ref = np.stack([_slerp_reference(a.double().numpy(), b.double().numpy(), x) for x in t])
    assert np.allclose(out.double().numpy(), ref, rtol=0, atol=1e-6)
    assert torch.equal(out[0], a) and torch.equal(out[-1], b)
    # parallel and opposite vectors (no single great circle): lerp
    assert torch.allclose(slerp(a, 2 * a, [0.5])[0], 1.5 * a)
    assert torch.allclose(slerp(a, -a, [0.25])[0], 0.5 * a)


def test_lerp_hand_worked_values() -> None:
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([-1.0, 0.5])
    out = lerp(a, b, [0.0, 0.25, 1.0])
    assert np.allclose(out[1].numpy(), [0.5, -0.625])  # 0.75 a + 0.25 b
    assert torch.equal(out[0], a) and torch.equal(out[2], b)


@pytest.mark.parametrize("kind", ["normal", "uniform"])
def test_latent_walk(kind: str) -> None:
    points = indexed_noise([3, 17, 42, 3], 100, kind, 0)
    walk = latent_walk(points, 5, kind)
    assert walk.shape == (3, 5, 100)
    for k in range(3):
        assert torch.equal(walk[k, 0], points[k]) and torch.equal(walk[k, -1], points[k + 1])
    mid = walk[0, 2].double().numpy()
    a, b = points[0].double().numpy(), points[1].double().numpy()
    expected = (a + b) / 2 if kind == "uniform" else _slerp_reference(a, b, 0.5)
    assert np.allclose(mid, expected, atol=1e-6)
    if kind == "uniform":
        assert walk.abs().max() <= 1  # lerp stays in the cube
    with pytest.raises(ValueError, match="at least 2"):
        latent_walk(points[:1], 5, kind)
    with pytest.raises(ValueError, match="at least 2"):
        latent_walk(points, 1, kind)
