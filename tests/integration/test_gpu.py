"""CUDA paths (fp16 + GradScaler, bf16, device-resident data, CUDA graphs); skipped without a GPU, as in CI."""

from __future__ import annotations

import pytest
import torch

from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.train.loop import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fp16_amp_uses_one_shared_scaler_and_checkpoints_it(tiny_cfg, quiet_console):
    trainer = Trainer(tiny_cfg(device="cuda", amp="fp16", channels_last=True, max_steps=6), console=quiet_console)
    assert trainer.policy.scaler.is_enabled()
    assert trainer.loader.images.is_cuda, "the memory loader keeps the dataset on the GPU"
    result = trainer.fit()
    state = load_checkpoint(result.last_checkpoint)
    assert state["gan"]["scaler"]["scale"] > 0
    resumed = Trainer(tiny_cfg(device="cuda", amp="fp16", channels_last=True, max_steps=8), console=quiet_console,
                      resume=str(result.last_checkpoint))
    assert resumed.policy.scaler.get_scale() == state["gan"]["scaler"]["scale"]
    resumed.fit()


def test_bf16_auto_on_cuda(tiny_cfg, quiet_console):
    trainer = Trainer(tiny_cfg(device="cuda", amp="auto", max_steps=2), console=quiet_console)
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "off"
    assert trainer.policy.amp == expected
    trainer.fit()


@pytest.mark.slow
def test_cuda_graphs_run(tiny_cfg, quiet_console):
    trainer = Trainer(tiny_cfg(device="cuda", amp="bf16", channels_last=True, cuda_graphs=True, max_steps=6),
                      console=quiet_console)
    result = trainer.fit()
    assert result.steps == 6
    assert all(torch.isfinite(p).all() for p in trainer.gan.g.parameters())
