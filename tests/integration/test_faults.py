"""Faults around a run (issue 12, items 1-7): resumes that change settings or the process layout, non-finite
training, two runs in one folder, interrupted rewrites, I/O failures and damaged run files.

Each test names the fault it injects; the references are worked out by hand (Adam's update rule, the epoch
permutation drawn with torch, step counts) or counted with torch, not taken from gantrain.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.errors import ConfigError
from gantrain.engine.train.loop import Trainer


def _flags(datasets_root: Path, out: Path, *, limit: int = 64, batch: int = 32) -> list:
    """A tiny fp32 CPU run: ``limit`` images, batch ``batch``, width 8, a log line every step."""
    return ["--data-root", datasets_root, "--limit", limit, "--batch-size", batch, "--ngf", 8, "--ndf", 8,
            "--log-every", 1, "--sample-every", 0, "--device", "cpu", "--amp", "off", "--no-channels-last",
            "--out", out]


def _strict_records(path: Path) -> list[dict]:
    """metrics.jsonl parsed as RFC 8259 JSON: bare NaN/Infinity (Python's extension) fail the test."""
    def no_constants(name):
        raise AssertionError(f"{path}: {name} is not JSON")

    return [json.loads(line, parse_constant=no_constants) for line in path.read_text(encoding="utf-8").splitlines()]


def _one_error_line(result) -> str:
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback, a clean exit
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# ===== 1. resume applies what the user sets ==================================================================
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def test_resume_runs_the_new_learning_rates_betas_and_adam_kind(cli, datasets_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli("run", *_flags(datasets_root, out), "--max-steps", 2).exit_code == 0
    resumed = cli("run", *_flags(datasets_root, out), "--max-steps", 3, "--lr-g", 1e-3, "--lr-d", 1e-3,
                  "--beta1", 0.9, "--no-fused-adam", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    before = load_checkpoint(out / "checkpoints" / "step_00000002.pt")
    after = load_checkpoint(out / "checkpoints" / "step_00000003.pt")
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


def test_resume_refuses_what_cannot_change_naming_it(trained_copy: Path, datasets_root: Path, cli) -> None:
    before = (trained_copy / "checkpoints" / "last.pt").read_bytes()
    result = cli("run", "--data-root", datasets_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 12,
                 "--image-size", 64, "--max-steps", 8, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert "--image-size 32 -> 64" in line and "--ndf 16 -> 12" in line and "cannot change mid-run" in line
    assert (trained_copy / "checkpoints" / "last.pt").read_bytes() == before


# ===== 2. the place in the data survives a change of batch or process count ====================================
def _tiny(tiny_cfg, **overrides):
    return tiny_cfg("run", **{"ngf": 8, "ndf": 8, "log_every": 4, **overrides})


def test_a_finished_epoch_stays_finished_when_the_batch_changes(tiny_cfg, quiet_console) -> None:
    # 256 images: batch 32 is 8 steps per epoch, batch 16 is 16 (the DDP case: 16 x 2 then 16 x 1).
    first = Trainer(_tiny(tiny_cfg, limit=256, batch_size=32, max_steps=0, epochs=1), console=quiet_console).fit()
    assert (first.steps, first.epochs_done) == (8, 1)
    second = Trainer(_tiny(tiny_cfg, limit=256, batch_size=16, max_steps=0, epochs=2), console=quiet_console,
                     resume="auto").fit()
    assert (second.steps, second.epochs_done) == (8 + 16, 2)  # one more epoch of 16 steps, not 8 + 24
    state = load_checkpoint(second.last_checkpoint)
    assert (state["epoch"], state["epoch_images"], state["images_seen"]) == (2, 0, 2 * 256)
    with pytest.raises(ConfigError, match="--epochs: the run in .* already took 24 of its 24 steps"):
        Trainer(_tiny(tiny_cfg, limit=256, batch_size=16, max_steps=0, epochs=2), console=quiet_console,
                resume="auto")  # a finished run stays finished: nothing left to train is refused


def test_the_place_mid_epoch_is_kept_in_images(tiny_cfg, quiet_console) -> None:
    cfg = _tiny(tiny_cfg, limit=256, batch_size=32, max_steps=3)
    Trainer(cfg, console=quiet_console).fit()  # 3 x 32 = 96 images into epoch 1
    resumed = Trainer(_tiny(tiny_cfg, limit=256, batch_size=16, max_steps=5), console=quiet_console, resume="auto")
    assert (resumed.epoch, resumed.epoch_step, resumed.step) == (0, 96 // 16, 3)
    # The next batch is images 96..111 of epoch 1's permutation (documented: randperm(N) seeded seed*1_000_003+epoch).
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + 0))
    first = next(resumed.loader.epoch(resumed.epoch, resumed.epoch_step))
    assert torch.equal(first.cpu(), resumed.loader.images[perm[96:112]].cpu())
    result = resumed.fit()
    state = load_checkpoint(result.last_checkpoint)
    assert (state["step"], state["epoch"], state["epoch_images"], state["images_seen"]) == (5, 0, 96 + 2 * 16, 128)
    log = (result.run_dir / "train.log").read_text()
    assert "global batch 32 -> 16" in log and "step 6 of 16" in log


def test_a_place_between_batches_rounds_back_and_says_so(tiny_cfg, quiet_console) -> None:
    Trainer(_tiny(tiny_cfg, limit=256, batch_size=32, max_steps=3), console=quiet_console).fit()  # 96 images in
    resumed = Trainer(_tiny(tiny_cfg, limit=256, batch_size=64, max_steps=5), console=quiet_console, resume="auto")
    resumed.close()
    assert (resumed.epoch, resumed.epoch_step) == (0, 1)  # 96 // 64: images 64..95 come again
    assert "32 images of that epoch are trained on twice" in (resumed.run_dir / "train.log").read_text()


def _as_old_checkpoint(path: Path, target: Path) -> Path:
    """``path`` as gantrain wrote checkpoints before the place in images was stored (and before digests): schema
    version 1, without the keys added since and without the ones whose value was unknown."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("epoch_images", "images_seen", "global_batch", "num_images", "digest", "planned_steps"):
        state.pop(key)
    for key in ("best_fd", "best_fd_measured_by"):
        if state[key] is None:
            del state[key]
    state["version"] = 1
    torch.save(state, target)
    return target


def test_old_checkpoints_without_the_place_still_resume(tiny_cfg, quiet_console, tmp_path: Path) -> None:
    # 64 images, batch 32: 2 steps per epoch; 3 steps is epoch 2, 1 step (32 images) in.
    first = Trainer(_tiny(tiny_cfg, limit=64, batch_size=32, max_steps=3), console=quiet_console).fit()
    old = _as_old_checkpoint(first.last_checkpoint, tmp_path / "old.pt")
    for batch, place in ((32, (1, 1)), (16, (1, 2))):
        trainer = Trainer(_tiny(tiny_cfg, limit=64, batch_size=batch, max_steps=6, out=str(tmp_path / f"b{batch}")),
                          console=quiet_console, resume=str(old))
        trainer.close()
        assert (trainer.step, trainer.epoch, trainer.epoch_step) == (3, *place), batch
    from gantrain.engine.errors import CheckpointError

    with pytest.raises(CheckpointError, match="predates stored data positions"):  # its epoch length is unknown
        Trainer(_tiny(tiny_cfg, limit=96, batch_size=32, max_steps=6, out=str(tmp_path / "other")),
                console=quiet_console, resume=str(old))


# ===== 3. non-finite training stops, keeps the last finite checkpoint, says which ==============================
FLOAT_FIELDS = {"leaky_slope", "init_std", "lr_g", "lr_d", "beta1", "beta2", "lr_decay_start", "label_smoothing", "ema_decay",
                "checkpoint_every_minutes", "gpus_per_worker", "cpus_per_worker"}


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
    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=8, log_every=1, keep_checkpoints=1)
    _poison_after(monkeypatch, 3, _nan_weight)
    trainer = Trainer(cfg, console=quiet_console)
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    message = str(info.value)
    folder = cfg.run_dir / "checkpoints"
    assert "steps 4-4" in message and f"{folder / 'step_00000002.pt'} (step 2)" in message
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000002.pt"]  # never rotated away
    assert load_checkpoint(folder / "last.pt")["step"] == 2
    records = _strict_records(cfg.run_dir / "metrics.jsonl")
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

    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=4, log_every=1)
    _poison_after(monkeypatch, 1, poison)
    with pytest.raises(TrainingDiverged, match=r"non-finite weights at step 2 \(3 in the generator\)"):
        Trainer(cfg, console=quiet_console).fit()
    assert all(math.isfinite(r["loss_d"]) for r in _strict_records(cfg.run_dir / "metrics.jsonl"))
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
    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=6, log_every=2, nonfinite_patience=patience)
    trainer = Trainer(cfg, console=quiet_console)
    if stops:
        with pytest.raises(TrainingDiverged, match=r"loss_g inf\) in 1 log interval\(s\) in a row, steps 3-4"):
            trainer.fit()
    else:
        assert trainer.fit().steps == 6
    records = _strict_records(cfg.run_dir / "metrics.jsonl")
    assert records[1]["step"] == 4 and records[1]["loss_g"] is None and records[1]["nonfinite"] == {"loss_g": "inf"}


def test_patience_0_goes_on_but_writes_no_nonfinite_checkpoint(tiny_cfg, quiet_console,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=4, log_every=1, nonfinite_patience=0)
    _poison_after(monkeypatch, 3, _nan_weight)
    result = Trainer(cfg, console=quiet_console).fit()
    assert result.steps == 4 and result.last_checkpoint.name == "step_00000002.pt"
    assert sorted(p.name for p in (cfg.run_dir / "checkpoints").iterdir()) == ["last.pt", "step_00000002.pt"]
    assert "not saving a checkpoint at step 4: non-finite weights" in (cfg.run_dir / "train.log").read_text()


def test_a_diverging_cli_run_exits_1_with_strict_json(cli, datasets_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("run", *_flags(datasets_root, out), "--max-steps", 4, "--lr-g", 1e30, "--lr-d", 1e30)
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert line.startswith("error: training diverged: non-finite") and "no finite checkpoint" in line
    records = _strict_records(out / "metrics.jsonl")
    assert records and records[-1]["nonfinite"]
    assert not (out / "checkpoints").exists()


def _poisoned_checkpoint(source: Path, target: Path, key: str) -> tuple[Path, int]:
    """``source`` with one value of its ``key`` weights set to NaN (an EMA copy of G made first when ``key`` is
    generator_ema), sealed again as gantrain seals checkpoints; returns it and the float values in ``key``."""
    from gantrain.engine.state.checkpoint import sealed

    state = load_checkpoint(source)
    if key == "generator_ema":
        state[key] = {k: v.clone() for k, v in state["generator"].items()}
    weights = state[key]
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
    assert f"{path}: the {what} holds 1 non-finite values of {total:,}" in unwrap(_one_error_line(generate))
    assert not (tmp_path / "grid.png").exists()
    evaluate = cli("eval", path, "--device", "cpu")
    assert evaluate.exit_code == 1 and "non-finite values" in _one_error_line(evaluate)


def test_resume_refuses_a_nonfinite_checkpoint(trained_copy: Path, datasets_root: Path, cli, tmp_path: Path) -> None:
    path, _ = _poisoned_checkpoint(trained_copy / "checkpoints" / "last.pt", tmp_path / "nan.pt", "generator")
    result = cli("run", "--data-root", datasets_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--out", trained_copy, "--resume", path)
    assert result.exit_code == 1 and "non-finite values" in _one_error_line(result)


# ===== 4. one owner per run folder ================================================================================
def test_a_second_run_into_a_busy_folder_exits_2(tiny_cfg, quiet_console, cli, unwrap, datasets_root: Path) -> None:
    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=2)
    owner = Trainer(cfg, console=quiet_console)  # holds the folder until fit() ends or close()
    try:
        lock = json.loads((cfg.run_dir / ".gantrain.lock").read_text())
        assert lock["pid"] == os.getpid()
        contents = {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()}
        for extra in ([], ["--resume", "auto"]):
            result = cli("run", *_flags(datasets_root, cfg.run_dir), "--max-steps", 2, *extra)
            assert result.exit_code == 2, result.output
            line = unwrap(_one_error_line(result))
            assert f"--out: {cfg.run_dir} is in use by another gantrain run (pid {os.getpid()} on" in line
            assert {p: p.read_bytes() for p in cfg.run_dir.rglob("*") if p.is_file()} == contents  # nothing touched
    finally:
        owner.close()
    assert not (cfg.run_dir / ".gantrain.lock").exists()
    assert cli("run", *_flags(datasets_root, cfg.run_dir), "--max-steps", 2).exit_code == 0


def test_a_stale_lock_is_taken_over_and_said(tiny_cfg, quiet_console) -> None:
    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=1)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / ".gantrain.lock").write_text('{"pid": 999999, "host": "elsewhere", "started": "then"}\n')
    Trainer(cfg, console=quiet_console).fit()
    assert "took over a stale lock (pid 999999 on elsewhere, since then)" in (cfg.run_dir / "train.log").read_text()
    assert not (cfg.run_dir / ".gantrain.lock").exists()


def test_an_earlier_run_without_a_checkpoint_is_replaced_with_a_warning(tiny_cfg, quiet_console) -> None:
    cfg = _tiny(tiny_cfg, limit=64, batch_size=32, max_steps=1)
    (cfg.run_dir / "samples").mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text('{"step": 500}\n')
    (cfg.run_dir / "samples" / "step_000500.png").write_bytes(b"old grid")
    Trainer(cfg, console=quiet_console).fit()
    assert "holds files of an earlier run that saved no checkpoint (metrics.jsonl, 1 sample grids)" in \
        (cfg.run_dir / "train.log").read_text()
    assert [r["step"] for r in _strict_records(cfg.run_dir / "metrics.jsonl")] == [1]
    assert not (cfg.run_dir / "samples" / "step_000500.png").exists()  # it would have been a frame of progress.gif


def _long_run(datasets_root: Path, out: Path, cwd: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    command = [sys.executable, "-m", "gantrain", "run", *map(str, _flags(datasets_root, out, limit=256)),
               "--epochs", "1000", "--max-steps", "100000", "--checkpoint-every", "1000"]  # no checkpoint before the kill
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no metrics line within 120 s")
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_two_processes_one_folder_then_sigkill_leaves_a_stale_lock(datasets_root: Path, tmp_path: Path, cli,
                                                                   unwrap) -> None:
    out = tmp_path / "run"
    proc = _long_run(datasets_root, out, tmp_path)
    try:
        second = cli("run", *_flags(datasets_root, out, limit=256), "--max-steps", 2)
        assert second.exit_code == 2
        assert f"is in use by another gantrain run (pid {proc.pid} on" in unwrap(_one_error_line(second))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert json.loads((out / ".gantrain.lock").read_text())["pid"] == proc.pid  # left behind by SIGKILL
    # SIGKILL lands before the first checkpoint (the 1000th epoch's): nothing to resume, a fresh run takes over.
    assert not (out / "checkpoints").exists()
    again = cli("run", *_flags(datasets_root, out, limit=256), "--max-steps", 2)
    assert again.exit_code == 0, again.output
    log = (out / "train.log").read_text()
    assert f"took over a stale lock (pid {proc.pid} on" in log and "saved no checkpoint (metrics.jsonl)" in log
    assert [r["step"] for r in _strict_records(out / "metrics.jsonl")] == [1, 2]


# ===== 5. every rewrite is atomic ================================================================================
def _rewrite_metrics(path: Path) -> None:
    from gantrain.engine.outputs.runlog import MetricsWriter

    MetricsWriter(path, resume_step=1)


def _rewrite_grid(path: Path) -> None:
    from gantrain.engine.outputs.images import save_grid

    save_grid(torch.zeros(4, 1, 8, 8), path)


def _rewrite_gif(path: Path) -> None:
    from PIL import Image

    from gantrain.engine.outputs.images import save_gif

    frame = path.parent.parent / "frame.png"
    Image.new("L", (64, 64)).save(frame)
    save_gif([frame, frame], path)


def _rewrite_plot(path: Path) -> None:
    from gantrain.engine.outputs.images import plot_curves

    plot_curves([{"step": s, "loss_d": 1.0 / s} for s in range(1, 50)], ["loss_d"], path, "t", "y")


def _rewrite_eval_json(path: Path) -> None:
    from gantrain.engine.metrics.evaluate import MetricReport
    from gantrain.engine.metrics.report import EvalResult, write_json

    info = {"label": "x", "task": "classes", "test_accuracy": 0.9, "train_sha256": "0" * 64, "epochs": 1,
            "weights_sha256": "1" * 64}
    write_json(EvalResult("generator", MetricReport({"fd": 1.0}, 100, 100), info), path)


REWRITERS = {"metrics.jsonl": _rewrite_metrics, "grid.png": _rewrite_grid, "progress.gif": _rewrite_gif,
             "losses.png": _rewrite_plot, "eval.json": _rewrite_eval_json}


@pytest.mark.parametrize("name", list(REWRITERS))
def test_a_rewrite_cut_short_leaves_the_old_file(name: str, tmp_path: Path, io_faults) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    path = folder / name
    old = b'{"step": 1}\n{"step": 2}\n' * 2000  # stands for a long history (or any earlier version of the file)
    path.write_bytes(old)
    io_faults.disk_full(folder, after_bytes=10)  # killed, or out of space, ten bytes into the new version
    with pytest.raises(Exception) as info:
        REWRITERS[name](path)
    assert "No space left on device" in str(info.value) and str(path) in str(info.value)
    assert path.read_bytes() == old
    assert sorted(p.name for p in folder.iterdir()) == [name]  # no temporary file left


def test_a_resume_whose_config_rewrite_fails_keeps_config_and_history(trained_copy: Path, datasets_root: Path,
                                                                      cli, io_faults) -> None:
    config, metrics = (trained_copy / "config.toml").read_bytes(), (trained_copy / "metrics.jsonl").read_bytes()
    io_faults.disk_full(trained_copy, after_bytes=500)  # the lock file fits; config.toml (several KB) does not
    result = cli("run", "--data-root", datasets_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    assert _one_error_line(result) == (f"error: cannot write {trained_copy / 'config.toml'}: No space left on "
                                       "device (ENOSPC)")
    assert (trained_copy / "config.toml").read_bytes() == config
    assert (trained_copy / "metrics.jsonl").read_bytes() == metrics


# ===== 6. I/O failures: one line naming the path and the cause ===================================================
def test_out_that_is_a_file_or_under_a_file(cli, datasets_root: Path, tmp_path: Path) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder\n")
    result = cli("run", *_flags(datasets_root, a_file), "--max-steps", 1)
    assert result.exit_code == 1
    assert _one_error_line(result) == f"error: --out: {a_file} is a file, not a folder"
    under = cli("run", *_flags(datasets_root, a_file / "run"), "--max-steps", 1)
    assert under.exit_code == 1
    assert _one_error_line(under) == (f"error: --out: cannot create the folder {a_file / 'run'}: {a_file} is a "
                                      "file, not a folder")
    assert a_file.read_text() == "not a folder\n"


def test_out_on_a_read_only_filesystem(cli, unwrap, datasets_root: Path, tmp_path: Path, io_faults) -> None:
    io_faults.make_read_only(tmp_path / "ro")
    result = cli("run", *_flags(datasets_root, tmp_path / "ro" / "run"), "--max-steps", 1)
    assert result.exit_code == 1
    assert "Read-only file system (EROFS)" in _one_error_line(result)
    assert str(tmp_path / "ro") in unwrap(result.stderr)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(trained_copy: Path, datasets_root: Path, cli,
                                                              io_faults) -> None:
    folder = trained_copy / "checkpoints"
    before = (folder / "last.pt").read_bytes()
    io_faults.disk_full(folder, after_bytes=4096)
    result = cli("run", "--data-root", datasets_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--log-every", 2, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    assert _one_error_line(result) == (f"error: cannot write {folder / 'step_00000008.pt'}: No space left on device "
                                       "(ENOSPC)")
    assert (folder / "last.pt").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_00000006.pt"]
    assert load_checkpoint(folder / "last.pt")["step"] == 6
    assert not (trained_copy / ".gantrain.lock").exists()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="mounts a tmpfs: Linux, as root")
def test_disk_full_on_a_real_3mb_tmpfs(cli, datasets_root: Path, tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mount / "run"  # ngf/ndf 64: G and D with Adam state are ~40 MB, far over 3 MB
        result = cli("run", "--data-root", datasets_root, "--limit", 64, "--batch-size", 32, "--max-steps", 1,
                     "--sample-every", 0, "--device", "cpu", "--out", out)
        assert result.exit_code == 1
        assert _one_error_line(result) == (f"error: cannot write {out / 'checkpoints' / 'step_00000001.pt'}: No "
                                           "space left on device (ENOSPC)")
        assert not list((out / "checkpoints").iterdir())  # no torn checkpoint, no temporary file
    finally:
        from rich.console import Console

        from gantrain.engine.outputs.runlog import setup_logging

        setup_logging(Console(file=io.StringIO()))  # closes the run's train.log, which keeps the mount busy
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("case", ["a-folder", "under-a-file", "disk-full", "read-only"])
def test_generate_out_failures_are_one_line(case: str, trained_run: Path, tmp_path: Path, cli, io_faults) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    (tmp_path / "dir").mkdir()
    out = {"a-folder": tmp_path / "dir", "under-a-file": a_file / "grid.png", "disk-full": tmp_path / "full" / "g.png",
           "read-only": tmp_path / "ro" / "g.png"}[case]
    if case == "disk-full":
        io_faults.disk_full(out.parent, after_bytes=100)
    if case == "read-only":
        io_faults.make_read_only(out.parent)
    result = cli("generate", trained_run / "checkpoints" / "last.pt", "--out", out, "--device", "cpu")
    assert result.exit_code == 1
    reason = {"a-folder": "Is a directory (EISDIR)", "under-a-file": f"{a_file} is a file, not a folder",
              "disk-full": "No space left on device (ENOSPC)", "read-only": "Read-only file system (EROFS)"}[case]
    assert _one_error_line(result) == f"error: cannot write {out}: {reason}"


def test_a_stray_oserror_is_one_line_naming_the_path(capsys) -> None:
    import typer

    from gantrain.cli import user_errors

    @user_errors
    def command():
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 1
    assert capsys.readouterr().err.splitlines() == ["error: /some/where: Permission denied (EACCES)"]


# ===== 7. damaged run files are read tolerantly ====================================================================
DAMAGED = [
    (b'{"step": 1, "loss_d": 1.0}\n', True),
    (b"garbage, not json\n", False),
    (b'{"loss_d": 2.0}\n', False),                      # no step
    (b'{"step": "2", "loss_d": 2.0}\n', False),         # step of the wrong type
    (b"[1, 2, 3]\n", False),                            # not an object
    (b'{"step": 2, "loss_d": \xff\xfe}\n', False),      # invalid UTF-8
    (b'{"step": 3, "loss_d": NaN}\n', True),            # written by gantrain before the JSON became strict
    (b'{"step": 7, "loss_d": 0.5}\n', True),            # past the checkpoint: dropped on resume
    (b'{"step": 8, "loss', False),                      # torn last line
]


def test_read_metrics_skips_damaged_lines_and_counts_them(tmp_path: Path, caplog) -> None:
    from gantrain.engine.outputs.images import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(line for line, _ in DAMAGED))
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 3, 7]
    assert math.isnan(records[1]["loss_d"])
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_resume_over_a_damaged_history(trained_copy: Path, datasets_root: Path, cli) -> None:
    (trained_copy / "metrics.jsonl").write_bytes(b"".join(line for line, _ in DAMAGED))
    result = cli("run", "--data-root", datasets_root, "--limit", 256, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
                 "--max-steps", 8, "--log-every", 2, "--sample-every", 0, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 0, result.output
    records = _strict_records(trained_copy / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3, 8]  # the good lines up to step 6, then the resumed run
    assert records[1]["loss_d"] is None and records[1]["nonfinite"] == {"loss_d": "nan"}
    log = (trained_copy / "train.log").read_text()
    assert "dropping 6 damaged lines (line 2: not JSON (torn or garbage); line 3: no integer 'step'" in log
    assert "dropping 1 records logged after step 6" in log


def test_a_config_file_that_is_not_utf8_exits_2(cli, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_bytes(b"[optim]\nlr_g = 0.001 # \xff\n")
    result = cli("run", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert _one_error_line(result).startswith(f"error: --config: {config} is not valid TOML")
