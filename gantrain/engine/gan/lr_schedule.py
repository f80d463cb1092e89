"""Learning-rate decay over a run (``--lr-decay``, ``--lr-decay-start``): both optimisers' rates by step.

The rate is a function of (step, the run's last step) alone, not a scheduler's state: a resumed run continues the
schedule from its step, and every DDP rank computes the same rate. A resume that changes the run's length in
steps (``--epochs``, ``--max-steps``, another batch size or process count) computes the rate on the new length,
so it jumps there (half-way through a linear decay over 10 epochs, resumed with ``--epochs 20``: from 0.5 to 0.75
of the base rate); the Trainer warns in one line, giving both rates. Setting a Python float on a param group is no
host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from gantrain.engine.config import LR_DECAYS, OptimConfig


def decay_factor(kind: str, start: float, step: int, total_steps: int) -> float:
    """The multiplier of the base learning rates for the update taken after ``step`` updates (0-based) of a run
    of ``total_steps``; a float in (0, 1].

    The first ``round(start * total_steps)`` updates keep the full rate; over the ``span`` updates left, the
    update ``i`` steps into the decay is scaled by ``1 - i / span`` (``linear``: the linear decay of pix2pix and
    CycleGAN, Isola et al. 2017, Zhu et al. 2017, which keep the rate for the first half: ``start`` 0.5) or by
    ``(1 + cos(pi * i / span)) / 2`` (``cosine``: SGDR's annealing without restarts, Loshchilov & Hutter 2017,
    arXiv:1608.03983); the rate would reach 0 one update after the last. These are the rates of
    ``torch.optim.lr_scheduler.LinearLR(start_factor=1, end_factor=0, total_iters=span)`` and
    ``CosineAnnealingLR(T_max=span, eta_min=0)`` stepped once per update. ``none``: 1.0 throughout.

    Raises ``ValueError`` for an unknown ``kind``.
    """
    if kind not in LR_DECAYS:
        raise ValueError(f"unknown learning-rate decay {kind!r}: must be one of {', '.join(LR_DECAYS)}")
    begin = round(start * total_steps)
    span = total_steps - begin
    if kind == "none" or step < begin or span <= 0:
        return 1.0
    t = min(step - begin, span - 1) / span  # updates past the planned end (none are taken) keep the last rate
    return 1.0 - t if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))


class LRDecay:
    """Sets the learning rate of every param group of G's and D's optimisers before each update.

    ``optimizers``: (name, optimiser, base rate) triples, e.g. ``[("lr_g", opt_g, 1.5e-3), ("lr_d", opt_d,
    4e-4)]``; ``total_steps``: the update at which the run ends. With ``--lr-decay none`` :meth:`apply` touches
    nothing (the rates stay what the optimisers were built or restored with).
    """

    def __init__(self, optim: OptimConfig, optimizers: Sequence[tuple[str, torch.optim.Optimizer, float]],
                 total_steps: int) -> None:
        self.kind, self.start, self.total_steps = optim.lr_decay, optim.lr_decay_start, total_steps
        self.optimizers = list(optimizers)
        self.factor = 1.0

    @classmethod
    def of_gan(cls, optim: OptimConfig, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
               total_steps: int) -> LRDecay:
        """The decay of a GAN's two optimisers from the config's rates (``lr_g``, ``lr_d``): what the Trainer and
        both to-quality contenders (gantrain's step, the plain loop) build."""
        return cls(optim, [("lr_g", opt_g, optim.lr_g), ("lr_d", opt_d, optim.lr_d)], total_steps)

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def apply(self, step: int) -> None:
        """The rates for the update after ``step`` updates."""
        if not self.active:
            return
        self.factor = decay_factor(self.kind, self.start, step, self.total_steps)
        for _, opt, base in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = base * self.factor

    def rates(self) -> dict[str, float]:
        """``{"lr_g": ..., "lr_d": ...}`` of the last :meth:`apply` (4 significant digits), {} when inactive: the
        metrics record's learning-rate columns."""
        if not self.active:
            return {}
        return {name: float(f"{base * self.factor:.4g}") for name, _, base in self.optimizers}

    def describe_jump(self, step: int, old_total_steps: int) -> str:
        """'lr_g 0.00075 (was 0.0005), lr_d ...': the rates at ``step`` on this run's length and on ``old_total_steps``."""
        now = decay_factor(self.kind, self.start, step, self.total_steps)
        was = decay_factor(self.kind, self.start, step, old_total_steps)
        return ", ".join(f"{name} {base * now:.3g} (was {base * was:.3g})" for name, _, base in self.optimizers)

    def describe(self, step: int) -> str:
        """One line: the decay, where it starts and ends, and the rates at ``step``."""
        begin = round(self.start * self.total_steps)
        factor = decay_factor(self.kind, self.start, step, self.total_steps)
        now = ", ".join(f"{name} {base * factor:.3g}" for name, _, base in self.optimizers)
        return (f"learning rates decay ({self.kind}) from step {begin:,} towards 0 at the run's last step "
                f"{self.total_steps:,}; at step {step:,}: {now}")
