"""Resume faults: a resume runs the settings the user gives (refusing what cannot change, naming it), and the
place in the data survives another batch size, process count or an old checkpoint without it.

References are worked out by hand (Adam's update rule, the epoch permutation drawn with torch, step counts).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from checkpoints import flattened
from faults import one_error_line, tiny, tiny_flags
from gantrain.engine.errors import ConfigError
from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.train.loop import Trainer


# ===== resume applies what the user sets ==================================================================
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def test_resume_runs_the_new_learning_rates_betas_and_adam_kind(cli, train_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli("run", *tiny_flags(train_root, out), "--max-steps", 2).exit_code == 0
    resumed = cli("run", *tiny_flags(train_root, out), "--max-steps", 3, "--lr-g", 1e-3, "--lr-d", 1e-3,
                  "--beta1", 0.9, "--no-fused-adam", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    before = load_checkpoint(out / "checkpoints" / "step_00000002.pt")["gan"]
    after = load_checkpoint(out / "checkpoints" / "step_00000003.pt")["gan"]
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8
    for opt, model in (("opt_g", "generator"), ("opt_d", "discriminator")):
        for group in after[opt]["param_groups"]:
            assert (group["lr"], tuple(group["betas"])) == (lr, (b1, b2))
            assert not group["fused"] and group["foreach"]  # --no-fused-adam: the multi-tensor kernel
        # Step 3 by Adam's rule, from the weights of step 2 and the moments after step 3:
        # w3 = w2 - lr * m / (1 - b1^3) / (sqrt(v / (1 - b2^3)) + eps)
        names = [n for n in before[model] if not n.endswith(_BN_BUFFERS)]
        assert len(names) == len(after[opt]["state"])
        for index, name in enumerate(names):
            state = after[opt]["state"][index]
            assert float(state["step"]) == 3
            m_hat = state["exp_avg"] / (1 - b1 ** 3)
            v_hat = state["exp_avg_sq"] / (1 - b2 ** 3)
            expected = before[model][name] - lr * m_hat / (v_hat.sqrt() + eps)
            torch.testing.assert_close(after[model][name], expected, rtol=0, atol=2e-7, msg=f"{model}.{name}")
    log = (out / "train.log").read_text()
    for change in ("--lr-g 0.0002 -> 0.001", "--lr-d 0.0002 -> 0.001", "--beta1 0.5 -> 0.9",
                   "--fused-adam True -> False"):
        assert change in log, change


def test_resume_refuses_what_cannot_change_naming_it(trained_copy: Path, train_root: Path, cli) -> None:
    before = (trained_copy / "checkpoints" / "last.pt").read_bytes()
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 12,
                 "--image-size", 64, "--max-steps", 8, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    line = one_error_line(result)
    assert "--image-size 32 -> 64" in line and "--ndf 16 -> 12" in line and "cannot change mid-run" in line
    assert (trained_copy / "checkpoints" / "last.pt").read_bytes() == before


# ===== the place in the data survives a change of batch or process count ====================================
def test_a_finished_epoch_stays_finished_when_the_batch_changes(tiny_cfg, quiet_console) -> None:
    # 256 images: batch 32 is 8 steps per epoch, batch 16 is 16 (the DDP case: 16 x 2 then 16 x 1).
    first = Trainer(tiny(tiny_cfg, limit=256, batch_size=32, max_steps=0, epochs=1), console=quiet_console).fit()
    assert (first.steps, first.epochs_done) == (8, 1)
    second = Trainer(tiny(tiny_cfg, limit=256, batch_size=16, max_steps=0, epochs=2), console=quiet_console,
                     resume="auto").fit()
    assert (second.steps, second.epochs_done) == (8 + 16, 2)  # one more epoch of 16 steps, not 8 + 24
    state = load_checkpoint(second.last_checkpoint)["position"]
    assert (state["epoch"], state["epoch_images"], state["images_seen"]) == (2, 0, 2 * 256)
    with pytest.raises(ConfigError, match="--epochs: the run in .* already took 24 steps, --epochs .* allows 24; raise --epochs"):
        Trainer(tiny(tiny_cfg, limit=256, batch_size=16, max_steps=0, epochs=2), console=quiet_console,
                resume="auto")  # a finished run stays finished: nothing left to train is refused


def test_the_place_mid_epoch_is_kept_in_images(tiny_cfg, quiet_console) -> None:
    cfg = tiny(tiny_cfg, limit=256, batch_size=32, max_steps=3)
    Trainer(cfg, console=quiet_console).fit()  # 3 x 32 = 96 images into epoch 1
    resumed = Trainer(tiny(tiny_cfg, limit=256, batch_size=16, max_steps=5), console=quiet_console, resume="auto")
    assert (resumed.epoch, resumed.epoch_step, resumed.step) == (0, 96 // 16, 3)
    # The next batch is images 96..111 of epoch 1's permutation (documented: randperm(N) seeded seed*1_000_003+epoch).
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + 0))
    first = next(resumed.loader.epoch(resumed.epoch, resumed.epoch_step))
    assert torch.equal(first.cpu(), resumed.loader.images[perm[96:112]].cpu())
    result = resumed.fit()
    state = load_checkpoint(result.last_checkpoint)["position"]
    assert (state["step"], state["epoch"], state["epoch_images"], state["images_seen"]) == (5, 0, 96 + 2 * 16, 128)
    log = (result.run_dir / "train.log").read_text()
    assert "global batch 32 -> 16" in log and "step 6 of 16" in log


def test_a_place_between_batches_rounds_back_and_says_so(tiny_cfg, quiet_console) -> None:
    Trainer(tiny(tiny_cfg, limit=256, batch_size=32, max_steps=3), console=quiet_console).fit()  # 96 images in
    resumed = Trainer(tiny(tiny_cfg, limit=256, batch_size=64, max_steps=5), console=quiet_console, resume="auto")
    resumed.close()
    assert (resumed.epoch, resumed.epoch_step) == (0, 1)  # 96 // 64: images 64..95 come again
    assert "32 images of that epoch are trained on twice" in (resumed.run_dir / "train.log").read_text()


def _as_old_checkpoint(path: Path, target: Path) -> Path:
    """``path`` as gantrain wrote checkpoints before the place in images was stored (and before digests): schema
    version 1 (flat), without the keys added since and without the ones whose value was unknown."""
    state = flattened(torch.load(path, map_location="cpu", weights_only=True))
    for key in ("epoch_images", "images_seen", "global_batch", "num_images", "planned_steps"):
        state.pop(key)
    for key in ("best_fd", "best_fd_measured_by"):
        if state[key] is None:
            del state[key]
    torch.save({"format": "gantrain-checkpoint", "version": 1, **state}, target)
    return target


def test_old_checkpoints_without_the_place_still_resume(tiny_cfg, quiet_console, tmp_path: Path) -> None:
    # 64 images, batch 32: 2 steps per epoch; 3 steps is epoch 2, 1 step (32 images) in.
    first = Trainer(tiny(tiny_cfg, limit=64, batch_size=32, max_steps=3), console=quiet_console).fit()
    old = _as_old_checkpoint(first.last_checkpoint, tmp_path / "old.pt")
    for batch, place in ((32, (1, 1)), (16, (1, 2))):
        trainer = Trainer(tiny(tiny_cfg, limit=64, batch_size=batch, max_steps=6, out=str(tmp_path / f"b{batch}")),
                          console=quiet_console, resume=str(old))
        trainer.close()
        assert (trainer.step, trainer.epoch, trainer.epoch_step) == (3, *place), batch
    from gantrain.engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="predates stored data positions"):  # its epoch length is unknown
        Trainer(tiny(tiny_cfg, limit=96, batch_size=32, max_steps=6, out=str(tmp_path / "other")),
                console=quiet_console, resume=str(old))
    # such a checkpoint may hold its data root as it was typed (relative to where the run started): the same
    # folder as this run's (now stored absolute), so it resumes
    state = torch.load(old, map_location="cpu", weights_only=True)
    absolute = state["config"]["data"]["data_root"]
    state["config"]["data"]["data_root"] = os.path.relpath(absolute)
    torch.save(state, tmp_path / "relative.pt")
    trainer = Trainer(tiny(tiny_cfg, limit=64, batch_size=32, max_steps=6, out=str(tmp_path / "rel")),
                      console=quiet_console, resume=str(tmp_path / "relative.pt"))
    trainer.close()
    assert (trainer.step, trainer.epoch, trainer.epoch_step) == (3, 1, 1)


