"""--checkpoint-every-steps and --checkpoint-every-minutes (what a restarted DDP worker group resumes from),
in one process; the DDP side is exercised by tests/integration/test_ddp_elastic.py. Extra saves must not change
training. And --checkpoint-every with --keep-checkpoints over several epochs."""

from __future__ import annotations

import pytest
import torch

from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.state.rundir import RunDir
from gantrain.engine.train.loop import Trainer

pytestmark = pytest.mark.slow


def _steps(run) -> list[int]:
    return [int(p.stem.split("_")[1]) for p in RunDir(run).numbered_checkpoints()]


def test_step_and_minute_cadences_save_where_due_and_change_nothing(tiny_cfg, quiet_console):
    # 512 images / 32 = 16 steps per epoch; 20 steps cross one epoch end (step 16, the per-epoch save)
    every3 = Trainer(tiny_cfg("steps", max_steps=20, checkpoint_every_steps=3, keep_checkpoints=100),
                     console=quiet_console)
    every3.fit()
    assert _steps(every3.run_dir) == [3, 6, 9, 12, 15, 16, 18, 20]
    # a minute cadence shorter than a step: due after every step
    clock = Trainer(tiny_cfg("minutes", max_steps=5, checkpoint_every_minutes=1e-9, keep_checkpoints=100),
                    console=quiet_console)
    clock.fit()
    assert _steps(clock.run_dir) == [1, 2, 3, 4, 5]
    plain = Trainer(tiny_cfg("plain", max_steps=20), console=quiet_console)
    plain.fit()
    assert _steps(plain.run_dir) == [16, 20]
    a, b = load_checkpoint(every3.run_dir / "checkpoints" / "last.pt"), load_checkpoint(plain.run_dir / "checkpoints" / "last.pt")
    assert all(torch.equal(a["gan"]["generator"][k], b["gan"]["generator"][k]) for k in a["gan"]["generator"])


def test_training_keeps_the_last_k_epoch_checkpoints(tiny_cfg, quiet_console) -> None:
    from gantrain.engine.train.loop import Trainer

    # 64 images / batch 32 = 2 steps per epoch; 5 epochs with a checkpoint each, keep 2.
    cfg = tiny_cfg(limit=64, max_steps=0, epochs=5, keep_checkpoints=2, checkpoint_every=1, log_every=5)
    result = Trainer(cfg, console=quiet_console).fit()
    folder = result.run_dir / "checkpoints"
    assert [p.name for p in RunDir(result.run_dir).numbered_checkpoints()] == ["step_00000008.pt", "step_00000010.pt"]
    assert load_checkpoint(folder / "last.pt")["position"]["step"] == 10
