"""The reference for ``--ema-bn standing`` that the integration tests share: torch's own update_bn."""

from __future__ import annotations

import copy

import torch
from torch.optim.swa_utils import update_bn


def bn_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm layer's running mean and variance, in module order."""
    return [t for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            for t in (m.running_mean, m.running_var)]


def update_bn_reference(g_ema: torch.nn.Module, cfg, offset: int = 1_000_003,
                        state: dict | None = None) -> torch.nn.Module:
    """torch's own update_bn on a copy of the EMA generator (with ``state`` loaded when given), fed the documented
    noise: 2,048 N(0, 1) vectors in batches of the training batch size, drawn on the CPU from the run's seed +
    1,000,003."""
    ref = copy.deepcopy(g_ema)
    if state is not None:
        ref.load_state_dict(state)
    noise = torch.Generator().manual_seed(cfg.run.seed + offset)
    batch = cfg.data.batch_size
    update_bn([torch.randn(batch, cfg.model.nz, generator=noise) for _ in range(2048 // batch)], ref)
    return ref
