"""Index-stable noise: image i of seed s is the same whatever is drawn with it (n, batch size, which indices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gantrain.engine.gan.sampling import NOISE_BLOCK, fixed_noise, indexed_noise


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
