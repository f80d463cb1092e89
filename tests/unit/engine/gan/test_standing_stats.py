"""Standing BatchNorm statistics (``--ema-bn standing``): against a numpy reference worked out layer by layer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from gantrain.engine.gan.sampling import standing_bn_stats_

NZ, BATCH, SEED, EPS = 6, 16, 3, 1e-5


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(NZ, 5), nn.BatchNorm1d(5), nn.ReLU(),
                          nn.Linear(5, 3), nn.BatchNorm1d(3, momentum=0.3))
    with torch.no_grad():  # non-trivial affine parameters, so the second layer depends on them
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    return model.eval()


def _reference(model: nn.Sequential, num_batches: int, kind: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each BN's running (mean, var) after the pass, in numpy: per-batch statistics of train-mode activations
    (normalised with the biased batch variance), running values the plain average of the batch means and of the
    unbiased batch variances; the noise is the documented stream: N(0, 1) or U(-1, 1) batches drawn on the CPU from
    the seed."""
    w1, b1 = model[0].weight.detach().double().numpy(), model[0].bias.detach().double().numpy()
    g1, c1 = model[1].weight.detach().double().numpy(), model[1].bias.detach().double().numpy()
    w2, b2 = model[3].weight.detach().double().numpy(), model[3].bias.detach().double().numpy()
    noise = torch.Generator().manual_seed(SEED)
    sums = [[0.0, 0.0], [0.0, 0.0]]
    for _ in range(num_batches):
        z = (torch.randn(BATCH, NZ, generator=noise) if kind == "normal"
             else torch.rand(BATCH, NZ, generator=noise) * 2 - 1).double().numpy()
        h1 = z @ w1.T + b1
        sums[0][0] += h1.mean(0)
        sums[0][1] += h1.var(0, ddof=1)
        a1 = np.maximum((h1 - h1.mean(0)) / np.sqrt(h1.var(0) + EPS) * g1 + c1, 0.0)
        h2 = a1 @ w2.T + b2
        sums[1][0] += h2.mean(0)
        sums[1][1] += h2.var(0, ddof=1)
    return [(m / num_batches, v / num_batches) for m, v in sums]


@pytest.mark.parametrize("num_samples, num_batches, kind", [(64, 4, "normal"), (70, 4, "uniform"), (8, 1, "normal")])
def test_standing_statistics_match_numpy(num_samples: int, num_batches: int, kind: str) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # stale statistics to be replaced, not averaged into
        model[1].running_mean.fill_(7.0)
        model[4].running_var.fill_(9.0)
    out = standing_bn_stats_(model, NZ, kind, BATCH, SEED, num_samples=num_samples)
    assert out is model and not model.training, "mode restored (eval)"
    assert model[1].momentum == 0.1 and model[4].momentum == 0.3, "momenta restored"
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "weights untouched"
    for bn, (mean, var) in zip((model[1], model[4]), _reference(model, num_batches, kind)):
        np.testing.assert_allclose(bn.running_mean.double().numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn.running_var.double().numpy(), var, rtol=1e-5, atol=1e-6)
        assert bn.num_batches_tracked.item() == num_batches


def test_standing_statistics_depend_on_the_seed_only_and_leave_the_global_rng_alone() -> None:
    a, b, c = _model(), _model(), _model()
    torch.manual_seed(1)
    standing_bn_stats_(a, NZ, "normal", BATCH, SEED)
    torch.manual_seed(2)
    standing_bn_stats_(b, NZ, "normal", BATCH, SEED)
    standing_bn_stats_(c, NZ, "normal", BATCH, SEED + 1)
    assert torch.equal(a[1].running_mean, b[1].running_mean) and torch.equal(a[4].running_var, b[4].running_var)
    assert not torch.equal(a[1].running_mean, c[1].running_mean)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    standing_bn_stats_(a, NZ, "normal", BATCH, SEED)
    assert torch.equal(torch.rand(3), expected), "the pass draws from its own generator, not the global stream"


def test_model_in_train_mode_stays_in_train_mode() -> None:
    model = _model().train()
    standing_bn_stats_(model, NZ, "normal", BATCH, SEED)
    assert model.training and all(m.training for m in model.modules())
