"""Non-finite training: NaN/inf settings refused, a diverging run stops at the step with the last finite
checkpoint kept and named, strict JSON records, and nothing reads non-finite weights as a result."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from faults import one_error_line, strict_records, tiny, tiny_flags
from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.train.loop import Trainer


# ===== non-finite training stops, keeps the last finite checkpoint, says which ==============================
FLOAT_FIELDS = {"leaky_slope", "init_std", "lr_g", "lr_d", "beta1", "beta2", "lr_decay_start", "label_smoothing", "r1_gamma", "ema_decay",
                "ema_rampup",
                "checkpoint_every_minutes", "gpus_per_worker", "cpus_per_worker", "dist_timeout", "stall_warning",
                "ray_wait"}


def test_the_float_fields_are_the_ones_checked_below() -> None:
    from gantrain.engine.config import field_index

    assert {name for name, (_, typ) in field_index().items() if typ is float} == FLOAT_FIELDS


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name", sorted(FLOAT_FIELDS))
def test_every_float_setting_must_be_finite(name: str, value: float) -> None:
    from gantrain.engine.config import ConfigError, field_index, from_dict

    section = field_index()[name][0]
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}: must be a finite number"):
        from_dict({section: {name: value}})


def test_init_std_inf_in_a_toml_exits_2(cli, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[model]\ninit_std = inf\n")
    result = cli("run", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: --init-std: must be a finite number, got inf"]
    assert not (tmp_path / "run").exists()


def _poison_after(monkeypatch: pytest.MonkeyPatch, step: int, poison) -> None:
    """Runs ``poison(trainer)`` right after the optimiser steps of training step ``step`` (1-based)."""
    from types import SimpleNamespace

    from gantrain.engine.gan.step import GANStep

    original, calls = GANStep.__call__, []

    def train_step(self, real):
        original(self, real)
        calls.append(1)
        if len(calls) == step:
            poison(SimpleNamespace(gan=self))

    monkeypatch.setattr(GANStep, "__call__", train_step)


def _nan_weight(trainer) -> None:
    with torch.no_grad():
        next(trainer.gan.g.parameters()).view(-1)[0] = math.nan


def test_nan_weights_stop_the_run_at_the_step_and_keep_the_last_finite_checkpoint(
        tiny_cfg, quiet_console, monkeypatch: pytest.MonkeyPatch) -> None:
    from gantrain.engine.errors import TrainingDiverged

    # 64 images / batch 32 = 2 steps per epoch, a checkpoint per epoch, only one numbered one kept.
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=8, log_every=1, keep_checkpoints=1)
    _poison_after(monkeypatch, 3, _nan_weight)
    trainer = Trainer(cfg, console=quiet_console)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    folder = cfg.run_dir / "checkpoints"
    assert "steps 4-4" in message and f"{folder / 'step_00000002.pt'} (step 2)" in message
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000002.pt"]  # never rotated away
    assert load_checkpoint(folder / "last.pt")["position"]["step"] == 2
    records = strict_records(cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[3]["loss_d"] is None and records[3]["nonfinite"]["loss_d"] == "nan"
    assert all(math.isfinite(r["loss_d"]) for r in records[:3])
    assert not (cfg.run_dir / ".gantrain.lock").exists()  # the folder is released


def test_nan_batchnorm_statistics_with_finite_losses_are_never_checkpointed(
        tiny_cfg, quiet_console, monkeypatch: pytest.MonkeyPatch) -> None:
    from gantrain.engine.errors import TrainingDiverged

    def poison(trainer):  # train-mode BatchNorm ignores running statistics: the losses stay finite
        bn = next(m for m in trainer.gan.g.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.running_var[:3] = math.inf

    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=4, log_every=1)
    _poison_after(monkeypatch, 1, poison)
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at step 2 \(3 in the generator\)"):
        Trainer(cfg, console=quiet_console).fit()
    assert all(math.isfinite(r["loss_d"]) for r in strict_records(cfg.run_dir / "metrics.jsonl"))
    assert not (cfg.run_dir / "checkpoints").exists()


@pytest.mark.parametrize("patience, stops", [(1, True), (2, False)])
def test_nonfinite_patience_counts_log_intervals(tiny_cfg, quiet_console, monkeypatch: pytest.MonkeyPatch,
                                                 patience: int, stops: bool) -> None:
    from gantrain.engine.errors import TrainingDiverged
    from gantrain.engine.train.stats import Stats as DeviceStats

    original, reads = DeviceStats.read, []

    def read(self):  # the second log interval reads as inf (an fp16 overflow the scaler skipped, say)
        values = original(self)
        reads.append(1)
        return {**values, "loss_g": math.inf} if len(reads) == 2 else values

    monkeypatch.setattr(DeviceStats, "read", read)
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=6, log_every=2, nonfinite_patience=patience)
    trainer = Trainer(cfg, console=quiet_console)
    if stops:
        with pytest.raises(TrainingDiverged, match=r"loss_g inf\) in 1 log interval\(s\) in a row, steps 3-4"):
            trainer.fit()
    else:
        assert trainer.fit().steps == 6
    records = strict_records(cfg.run_dir / "metrics.jsonl")
    assert records[1]["step"] == 4 and records[1]["loss_g"] is None and records[1]["nonfinite"] == {"loss_g": "inf"}


def test_patience_0_goes_on_but_writes_no_nonfinite_checkpoint(tiny_cfg, quiet_console,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=4, log_every=1, nonfinite_patience=0)
    _poison_after(monkeypatch, 3, _nan_weight)
    result = Trainer(cfg, console=quiet_console).fit()
    assert result.steps == 4 and result.last_checkpoint.name == "step_00000002.pt"
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]
    assert "not saving a checkpoint at step 4: non-finite weights" in (cfg.run_dir / "train.log").read_text()


def test_a_caller_that_watches_divergence_keeps_the_users_config(tiny_cfg, quiet_console,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """tune's trials and the to-quality bench pass divergence_watch=False (and evaluation=False) instead of
    overriding the config: the run goes on past NaN weights, saves no non-finite checkpoint, builds no --eval-every
    tracker, and the config it stores is the user's (patience 1, eval every epoch)."""
    cfg = tiny(tiny_cfg, limit=64, batch_size=32, max_steps=4, log_every=1, eval_every=1)
    _poison_after(monkeypatch, 3, _nan_weight)
    trainer = Trainer(cfg, console=quiet_console, evaluation=False, divergence_watch=False)
    assert trainer.tracker is None and trainer.watch is None
    result = trainer.fit()
    assert result.steps == 4 and result.last_checkpoint.name == "step_00000002.pt"
    stored = load_checkpoint(result.last_checkpoint)["run"]["config"]
    assert stored["run"]["nonfinite_patience"] == 1 and stored["eval"]["eval_every"] == 1
    records = strict_records(cfg.run_dir / "metrics.jsonl")
    assert records[-1]["nonfinite"]["loss_d"] == "nan" and not any("fd" in r for r in records)
    assert not (cfg.run_dir / "checkpoints" / "best.pt").exists()


def test_a_diverging_cli_run_exits_1_with_strict_json(cli, train_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("run", *tiny_flags(train_root, out), "--max-steps", 4, "--lr-g", 1e30, "--lr-d", 1e30)
    assert result.exit_code == 1
    line = one_error_line(result)
    assert line.startswith("error: training diverged: non-finite") and "no finite checkpoint" in line
    records = strict_records(out / "metrics.jsonl")
    assert records and records[-1]["nonfinite"]
    assert not (out / "checkpoints").exists()


def _poisoned_checkpoint(source: Path, target: Path, key: str) -> tuple[Path, int]:
    """``source`` with one value of its ``key`` weights set to NaN (an EMA copy of G made first when ``key`` is
    generator_ema), sealed again as gantrain seals checkpoints; returns it and the float values in ``key``."""
    from gantrain.engine.state.checkpoint import sealed

    state = load_checkpoint(source)
    gan = state["gan"]
    if key == "generator_ema":
        gan[key] = {k: v.clone() for k, v in gan["generator"].items()}
    weights = gan[key]
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name].view(-1)[0] = math.nan
    torch.save(sealed({k: v for k, v in state.items() if k not in ("format", "version")}), target)
    return target, sum(t.numel() for t in weights.values() if t.is_floating_point())


@pytest.mark.parametrize("key, what", [("generator", "generator"), ("generator_ema", "EMA generator")])
def test_generate_and_eval_refuse_nonfinite_weights(trained_run: Path, tmp_path: Path, cli, unwrap,
                                                    key: str, what: str) -> None:
    path, total = _poisoned_checkpoint(trained_run / "checkpoints" / "last.pt", tmp_path / "nan.pt", key)
    generate = cli("generate", path, "--out", tmp_path / "grid.png", "--device", "cpu")
    assert generate.exit_code == 1
    assert f"{path}: the {what} holds 1 non-finite values of {total:,}" in unwrap(one_error_line(generate))
    assert not (tmp_path / "grid.png").exists()
    evaluate = cli("eval", path, "--device", "cpu")
    assert evaluate.exit_code == 1 and "non-finite values" in one_error_line(evaluate)


def test_resume_refuses_a_nonfinite_checkpoint(trained_copy: Path, train_root: Path, cli, tmp_path: Path) -> None:
    path, _ = _poisoned_checkpoint(trained_copy / "checkpoints" / "last.pt", tmp_path / "nan.pt", "generator")
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--out", trained_copy, "--resume", path)
    assert result.exit_code == 1 and "non-finite values" in one_error_line(result)


