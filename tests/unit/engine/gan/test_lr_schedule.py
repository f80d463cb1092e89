"""--lr-decay: the rate per update against torch's own schedulers and hand-worked values; the config's checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gantrain.engine.config import ConfigError, OptimConfig, override, preset
from gantrain.engine.gan.lr_schedule import LRDecay, decay_factor


def _torch_rates(kind: str, span: int, begin: int, total: int, base: float = 1.0) -> list[float]:
    """The rate of every update of a run as torch.optim.lr_scheduler gives it: constant for ``begin`` updates,
    then LinearLR / CosineAnnealingLR stepped once per update (SequentialLR joins the two)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    decay = (torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=span)
             if kind == "linear" else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=span, eta_min=0.0))
    schedule = decay if begin == 0 else torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=begin), decay], milestones=[begin])
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return rates


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("start, total", [(0.0, 10), (0.5, 10), (0.25, 37), (0.9, 7), (0.0, 1)])
def test_rates_match_torch_schedulers(kind: str, start: float, total: int) -> None:
    begin = round(start * total)
    ours = [decay_factor(kind, start, step, total) for step in range(total)]
    assert ours == pytest.approx(_torch_rates(kind, total - begin, begin, total), abs=1e-12)


def test_rates_worked_by_hand() -> None:
    # 10 updates, the decay from update 5: 1, 1, 1, 1, 1, then 1 - i/5 for i = 0..4
    assert [decay_factor("linear", 0.5, s, 10) for s in range(10)] == pytest.approx([1] * 5 + [1, 0.8, 0.6, 0.4, 0.2])
    # cosine over 4 updates: (1 + cos(pi i / 4)) / 2 = 1, 0.8536, 0.5, 0.1464
    assert [decay_factor("cosine", 0.0, s, 4) for s in range(4)] == pytest.approx(
        [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2])
    assert {decay_factor("none", 0.3, s, 10) for s in range(10)} == {1.0}
    assert decay_factor("linear", 0.0, 12, 10) == pytest.approx(0.1)  # past the end: the last update's rate
    with pytest.raises(ValueError, match="unknown learning-rate decay 'step'"):
        decay_factor("step", 0.0, 0, 10)


def test_optimiser_follows_the_decay_like_a_torch_scheduler() -> None:
    """Two Adam optimisers on the same parameters and gradients, one set by LRDecay, one by torch's LinearLR
    after a constant phase: the same parameters after every update."""
    torch.manual_seed(0)
    ours_p, ref_p = nn.Parameter(torch.randn(5)), None
    ref_p = nn.Parameter(ours_p.detach().clone())
    ours = torch.optim.Adam([ours_p], lr=1e-2, betas=(0.0, 0.99))
    ref = torch.optim.Adam([ref_p], lr=1e-2, betas=(0.0, 0.99))
    total, begin = 12, 4
    ref_schedule = torch.optim.lr_scheduler.SequentialLR(
        ref, [torch.optim.lr_scheduler.ConstantLR(ref, factor=1.0, total_iters=begin),
              torch.optim.lr_scheduler.LinearLR(ref, start_factor=1.0, end_factor=0.0, total_iters=total - begin)],
        milestones=[begin])
    decay = LRDecay(OptimConfig(lr_decay="linear", lr_decay_start=begin / total), [("lr_g", ours, 1e-2)], total)
    targets = torch.randn(total, 5)
    for step in range(total):
        decay.apply(step)
        for p, opt in ((ours_p, ours), (ref_p, ref)):
            opt.zero_grad()
            ((p - targets[step]) ** 2).sum().backward()
            opt.step()
        ref_schedule.step()
        assert torch.equal(ours_p, ref_p), step
    assert decay.rates() == {"lr_g": float(f"{1e-2 / 8:.4g}")}  # the last update: 1 - 7/8 of the rate


def test_no_decay_leaves_the_rates_alone() -> None:
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=3e-4)
    decay = LRDecay(OptimConfig(), [("lr_g", opt, 1e-3)], 100)  # another base: apply must not touch the group
    decay.apply(50)
    assert not decay.active and opt.param_groups[0]["lr"] == 3e-4 and decay.rates() == {}


def test_describe_jump_gives_both_lengths_rates() -> None:
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))])
    decay = LRDecay(OptimConfig(lr_decay="linear"), [("lr_g", opt, 1e-3)], 2000)
    # step 500 of a linear decay: 0.75 of the rate over 2,000 steps, 0.5 over the 1,000 first planned
    assert decay.describe_jump(500, 1000) == "lr_g 0.00075 (was 0.0005)"


def test_describe_names_the_decay_and_the_rates_now() -> None:
    opt_g, opt_d = (torch.optim.Adam([nn.Parameter(torch.zeros(1))]) for _ in range(2))
    decay = LRDecay(OptimConfig(lr_decay="cosine", lr_decay_start=0.5), [("lr_g", opt_g, 2e-3), ("lr_d", opt_d, 4e-4)],
                    1000)
    line = decay.describe(750)  # half-way through the cosine: half the rates
    assert line.startswith("learning rates decay (cosine) from step 500 towards 0 at the run's last step 1,000")
    assert line.endswith("at step 750: lr_g 0.001, lr_d 0.0002")


@pytest.mark.parametrize("flat, flag", [
    ({"lr_decay": "exponential"}, "--lr-decay: must be one of none, linear, cosine"),
    ({"lr_decay": "linear", "lr_decay_start": 1.0}, "--lr-decay-start: must be in"),
    ({"lr_decay": "cosine", "lr_decay_start": -0.1}, "--lr-decay-start: must be in"),
    ({"lr_decay": "linear", "lr_decay_start": math.nan}, "--lr-decay-start"),
    ({"lr_decay_start": 0.5}, "--lr-decay-start: 0.5 has no effect without --lr-decay linear or cosine"),
])
def test_config_refuses_bad_decays(flat: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        override(preset("fashion32"), flat)
