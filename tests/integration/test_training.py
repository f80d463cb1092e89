"""Training end to end: run-folder outputs, exact resume, a golden loss trace, samples and label smoothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from paths import GOLDEN as GOLDEN_DIR
import torch
from PIL import Image

from gantrain.engine.config import load_toml, override, preset, resolve
from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.state.schema import step_of
from gantrain.engine.train.loop import Trainer

METRIC_KEYS = {"step", "epoch", "loss_d", "loss_g", "d_real", "d_fake", "images_per_s"}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ----- the tiny CLI run (conftest.trained_run: 256 images, batch 32, 6 steps, samples every 3, log every 2) ----
def test_run_folder_outputs(trained_run: Path) -> None:
    run = trained_run
    for name in ("config.toml", "metrics.jsonl", "losses.png", "progress.gif", "final.png", "train.log",
                 "samples/step_000003.png", "samples/step_000006.png", "checkpoints/last.pt",
                 "checkpoints/step_00000006.pt"):
        assert (run / name).is_file(), name
    # step 0 (the untrained generator) too; no early grid under --sample-every 10
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000.png", "step_000003.png",
                                                                   "step_000006.png"]

    records = _metrics(run)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert METRIC_KEYS <= r.keys()
        assert r["epoch"] == 1  # 8 steps per epoch: all in the first (1-based in the log)
        for key in ("loss_d", "loss_g"):
            assert math.isfinite(r[key]) and 0 < r[key] < 10
        assert 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1
        assert r["images_per_s"] > 0

    # 64 fixed samples of 32x32 in 8 columns with 2 px padding: 8 * 34 + 2 = 274 px square, grayscale.
    with Image.open(run / "samples" / "step_000003.png") as grid:
        assert grid.size == (274, 274) and grid.mode == "L"
    with Image.open(run / "final.png") as final, Image.open(run / "samples" / "step_000006.png") as last:
        assert final.tobytes() == last.tobytes()  # the same generator state at step 6, in eval mode
    with Image.open(run / "progress.gif") as gif:
        assert gif.n_frames == 3 and gif.size[0] == 274  # steps 0, 3, 6
    with Image.open(run / "losses.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 200

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["position"]["step"] == 6 and state["position"]["epoch"] == 0
    assert (run / "checkpoints" / "last.pt").read_bytes() == (run / "checkpoints" / "step_00000006.pt").read_bytes()


def test_written_config_loads_with_config_flag(trained_run: Path, train_root: Path, cli, tmp_path: Path) -> None:
    cfg = load_toml(trained_run / "config.toml")
    assert (cfg.data.limit, cfg.data.batch_size, cfg.run.max_steps, cfg.model.ngf, cfg.model.ndf) == (256, 32, 6, 16, 16)
    assert cfg.data.data_root == str(train_root) and cfg.run.out == str(trained_run)
    assert resolve(None, str(trained_run / "config.toml"), {}) == cfg
    out = tmp_path / "again"
    result = cli("run", "--config", trained_run / "config.toml", "--out", out, "--max-steps", 2, "--sample-every", 0)
    assert result.exit_code == 0, result.output
    again = load_toml(out / "config.toml")
    assert again.run.out == str(out) and again.run.max_steps == 2 and again.data.limit == 256
    assert again.model == cfg.model
    assert step_of(load_checkpoint(out / "checkpoints" / "last.pt")) == 2


def test_rerun_into_the_same_out_without_resume_exits_2(trained_copy: Path, train_root: Path, cli, unwrap) -> None:
    before = (trained_copy / "checkpoints" / "last.pt").read_bytes()
    metrics_before = (trained_copy / "metrics.jsonl").read_text()
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--max-steps", 6,
                 "--ngf", 16, "--ndf", 16, "--out", trained_copy)
    assert result.exit_code == 2
    message = unwrap(result.stderr)
    assert "--out" in message and "already holds a run" in message and "--resume auto" in message
    assert "Traceback" not in result.output
    assert (trained_copy / "checkpoints" / "last.pt").read_bytes() == before
    assert (trained_copy / "metrics.jsonl").read_text() == metrics_before


def test_resume_auto_without_a_checkpoint_exits_1(cli, unwrap, train_root: Path, tmp_path: Path) -> None:
    result = cli("run", "--data-root", train_root, "--limit", 64, "--out", tmp_path / "fresh", "--resume", "auto")
    assert result.exit_code == 1
    assert "--resume auto: no checkpoint" in unwrap(result.stderr)


# ----- exact resume ------------------------------------------------------------------------------------
# 128 images in batches of 32: 4 steps per epoch. A run of 2N steps must equal N steps + resume to 2N, bit for bit.
RESUME_CASES = [
    pytest.param(2, [], id="mid-epoch"),               # resume at step 2 of 4, finish inside epoch 1
    pytest.param(3, [], id="mid-epoch-across-epoch"),  # resume at step 3, cross the epoch boundary at 4, stop at 6
    pytest.param(4, [], id="at-epoch-boundary"),       # resume exactly at the start of epoch 2
    pytest.param(3, ["--loader", "torch", "--num-workers", 0], id="torch-loader"),
    pytest.param(3, ["--ema-decay", 0.9, "--label-smoothing", 0.1, "--noise", "uniform"], id="ema-smoothing"),
    # DiffAugment draws its parameters from the step's noise stream, which the checkpoint carries
    pytest.param(3, ["--diffaug", "color,translation,cutout"], id="diffaug"),
]


@pytest.mark.parametrize("n, extra", RESUME_CASES)
def test_exact_resume(n: int, extra: list, cli, train_root: Path, tmp_path: Path, same_tree) -> None:
    common = ["--data-root", train_root, "--limit", 128, "--batch-size", 32, "--ngf", 16, "--ndf", 16,
              "--log-every", 1, "--sample-every", 0, "--device", "cpu", "--seed", 3, *extra]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli("run", *common, "--max-steps", 2 * n, "--out", straight).exit_code == 0
    first = cli("run", *common, "--max-steps", n, "--out", split)
    assert first.exit_code == 0, first.output
    assert step_of(load_checkpoint(split / "checkpoints" / "last.pt")) == n
    second = cli("run", *common, "--max-steps", 2 * n, "--out", split, "--resume", "auto")
    assert second.exit_code == 0, second.output

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(split / "checkpoints" / "last.pt")
    assert step_of(a) == step_of(b) == 2 * n
    for key in ("generator", "discriminator", "opt_g", "opt_d", "rng", "scaler"):
        same_tree(a["gan"][key], b["gan"][key], key)
    same_tree(a["position"]["epoch"], b["position"]["epoch"], "epoch")
    assert ("generator_ema" in a["gan"]) == ("--ema-decay" in extra)
    if "generator_ema" in a["gan"]:
        same_tree(a["gan"]["generator_ema"], b["gan"]["generator_ema"], "generator_ema")
    assert a["gan"]["opt_g"]["state"][0]["step"] == 2 * n  # Adam's step counter carried over too
    # The resumed run's log continues the first one: the same per-step losses as the straight run.
    losses = lambda run: [(r["step"], r["loss_d"], r["loss_g"], r["d_real"], r["d_fake"]) for r in _metrics(run)]  # noqa: E731
    assert losses(straight) == losses(split)
    assert [r["step"] for r in _metrics(split)] == list(range(1, 2 * n + 1))


# ----- golden run --------------------------------------------------------------------------------------
# The golden trace is data (tests/golden/fashion32-tiny-seed1234.json says what it is and when it may change).
GOLDEN = [tuple(row) for row in json.loads((GOLDEN_DIR / "fashion32-tiny-seed1234.json")
                                           .read_text())["losses"]]


def test_golden_losses(tiny_cfg, quiet_console) -> None:
    result = Trainer(tiny_cfg(seed=1234, max_steps=5), console=quiet_console).fit()
    assert result.steps == 5
    got = [(r["step"], r["loss_d"], r["loss_g"]) for r in _metrics(result.run_dir)]
    assert [g[0] for g in got] == [g[0] for g in GOLDEN]
    for (step, loss_d, loss_g), (_, want_d, want_g) in zip(got, GOLDEN):
        assert loss_d == pytest.approx(want_d, abs=1e-4), f"loss_d at step {step}"
        assert loss_g == pytest.approx(want_g, abs=1e-4), f"loss_g at step {step}"


def test_another_seed_gives_other_losses(tiny_cfg, quiet_console) -> None:
    result = Trainer(tiny_cfg(seed=1235, max_steps=1), console=quiet_console).fit()
    first = _metrics(result.run_dir)[0]
    assert abs(first["loss_d"] - GOLDEN[0][1]) > 1e-3


# ----- samples, targets --------------------------------------------------------------------------------
def test_progress_gif_without_sample_grids_holds_the_final_grid(tiny_cfg, quiet_console) -> None:
    run = Trainer(tiny_cfg("none", max_steps=1, sample_every=0), console=quiet_console).fit().run_dir
    assert not list((run / "samples").glob("step_*.png"))  # --sample-every 0: only the final grid
    with Image.open(run / "progress.gif") as gif, Image.open(run / "final.png") as final:
        assert gif.n_frames == 1 and gif.size[0] == final.size[0]


def test_a_run_shorter_than_sample_every_still_has_pictures(tiny_cfg, quiet_console) -> None:
    """Step 0 (the untrained generator) and step N/10 of --sample-every N: a run stopped early shows progress."""
    run = Trainer(tiny_cfg("short", max_steps=3, sample_every=20), console=quiet_console).fit().run_dir
    assert sorted(p.name for p in (run / "samples").glob("step_*.png")) == ["step_000000.png", "step_000002.png"]
    with Image.open(run / "progress.gif") as gif:
        assert gif.n_frames == 3  # steps 0 and 2, then the final grid of step 3


def test_samples_leave_batchnorm_statistics_alone(tiny_cfg, quiet_console) -> None:
    trainer = Trainer(tiny_cfg(max_steps=2), console=quiet_console)
    trainer.fit()
    g = trainer.gan.g
    assert g.training
    before = {name: buf.clone() for name, buf in g.named_buffers()}
    assert any("running_mean" in n and buf.abs().sum() > 0 for n, buf in before.items())  # trained statistics
    path = trainer.write_samples()
    assert path.is_file() and path.parent.name == "samples"
    after = dict(g.named_buffers())
    for name, buf in before.items():
        assert torch.equal(buf, after[name]), f"{name} changed while sampling"
    assert g.training  # the mode is restored
    # The check can fail: a train-mode forward of the same noise does move the statistics.
    with torch.no_grad():
        g(trainer.fixed_noise)
    assert not all(torch.equal(buf, dict(g.named_buffers())[n]) for n, buf in before.items())


def test_samples_use_the_fixed_noise(tiny_cfg, quiet_console) -> None:
    trainer = Trainer(tiny_cfg(max_steps=1), console=quiet_console)
    noise = trainer.fixed_noise.clone()
    assert noise.shape == (64, 100)
    trainer.fit()
    assert torch.equal(trainer.fixed_noise, noise)
    a = trainer.write_samples().read_bytes()
    b = trainer.write_samples().read_bytes()
    assert a == b


@pytest.mark.parametrize("smoothing, real", [(0.1, 0.9), (0.0, 1.0), (0.25, 0.75)])
def test_label_smoothing_targets(tiny_cfg, quiet_console, smoothing: float, real: float) -> None:
    trainer = Trainer(tiny_cfg(label_smoothing=smoothing), console=quiet_console)
    assert trainer.gan.real_target.shape == (32,)
    assert torch.allclose(trainer.gan.real_target, torch.full((32,), real))
    assert torch.equal(trainer.gan.fake_target, torch.zeros(32))
    assert torch.equal(trainer.gan.gen_target, torch.ones(32))  # G's targets are never smoothed


def test_epoch_callbacks_run_after_each_epoch_and_can_stop(tiny_cfg, quiet_console) -> None:
    seen = []

    def callback(trainer, epochs_done):
        seen.append((epochs_done, trainer.step, trainer.last_record["step"]))
        return "enough" if epochs_done == 2 else None

    # 512 images / batch 32 = 16 steps per epoch; 5 epochs planned, stopped after 2
    trainer = Trainer(tiny_cfg(max_steps=0, epochs=5, log_every=4), console=quiet_console, epoch_callbacks=[callback])
    result = trainer.fit()
    assert seen == [(1, 16, 16), (2, 32, 32)]
    assert result.steps == 32 and result.last_checkpoint.name == "step_00000032.pt"
    assert trainer.stop_reason == "enough"


def test_after_step_hooks_see_the_runs_clock_and_can_stop_mid_epoch(tmp_path, quiet_console) -> None:
    """An after-step hook runs after each step's log, samples and checkpoint, with the step and images seen as the
    run counts them (160 synthetic images, batch 32: 5 steps per epoch); its reason ends the run at that step,
    mid-epoch, with the final checkpoint of that step; after-epoch hooks run at whole epochs only."""
    from gantrain.engine.config import override, preset

    seen, epochs = [], []

    class Hook:
        def after_step(self, trainer):
            seen.append((trainer.step, trainer.epoch, trainer.pos.images_seen))
            return "measured enough" if trainer.step == 7 else None

        def after_epoch(self, trainer, epochs_done):
            epochs.append((epochs_done, trainer.step))

    cfg = override(preset("fashion32"), dict(dataset="synthetic", synthetic_size=160, batch_size=32, ngf=4, ndf=4,
                                             nz=8, epochs=4, sample_every=0, log_every=2, device="cpu", amp="off",
                                             channels_last=False, out=str(tmp_path / "run")))
    trainer = Trainer(cfg, console=quiet_console, hooks=[Hook()])
    result = trainer.fit()
    assert seen == [(s, (s - 1) // 5, 32 * s) for s in range(1, 8)]
    assert epochs == [(1, 5)] and result.steps == 7 and trainer.stop_reason == "measured enough"
    assert result.last_checkpoint.name == "step_00000007.pt"
    assert load_checkpoint(result.last_checkpoint)["position"]["epoch_images"] == 64  # 2 steps into the second epoch


def test_lr_decay_by_step_survives_a_resume(tiny_cfg, quiet_console, same_tree) -> None:
    """--lr-decay linear over a 2-epoch run (128 images, batch 32: 8 updates): the rate of every update is logged
    as worked out by hand, the optimisers train with it, and a run stopped after epoch 1 and resumed continues the
    decay where it stood (the schedule is a function of the step): the same weights and logs as the straight run."""
    flat = dict(limit=128, max_steps=0, epochs=2, lr_decay="linear", lr_decay_start=0.25, lr_g=1e-3, lr_d=4e-4)
    straight = Trainer(tiny_cfg("straight", **flat), console=quiet_console)
    straight.fit()
    # updates 0-1 at the full rate (0.25 of 8), then 1 - i/6 for i = 0..5; the record of step s shows update s - 1
    factors = [1, 1, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]
    records = _metrics(straight.run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr_g"] for r in records] == pytest.approx([1e-3 * f for f in factors], rel=1e-3)
    assert [r["lr_d"] for r in records] == pytest.approx([4e-4 * f for f in factors], rel=1e-3)
    assert straight.gan.opt_g.param_groups[0]["lr"] == pytest.approx(1e-3 / 6)
    assert "learning rates decay (linear) from step 2 towards 0 at the run's last step 8" in (
        straight.run_dir / "train.log").read_text()

    def stop_after_one(trainer, epochs_done):
        return "split here"

    first = Trainer(tiny_cfg("split", **flat), console=quiet_console, epoch_callbacks=[stop_after_one])
    assert first.fit().steps == 4
    second = Trainer(tiny_cfg("split", **flat), console=quiet_console, resume="auto")
    second.fit()
    log = (second.run_dir / "train.log").read_text()
    assert "at step 4: lr_g 0.000667, lr_d 0.000267" in log
    assert "settings changed" not in log and "--lr-decay: this resume" not in log  # the decayed rates are no change
    a = load_checkpoint(straight.run_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(second.run_dir / "checkpoints" / "last.pt")
    for key in ("generator", "discriminator", "opt_g", "opt_d"):
        same_tree(a["gan"][key], b["gan"][key], key)
    assert [r["lr_g"] for r in _metrics(second.run_dir)] == [r["lr_g"] for r in records]


def test_a_resume_that_changes_the_runs_length_says_the_rates_jump(tiny_cfg, quiet_console) -> None:
    """Linear decay over 8 updates, stopped after 4 and resumed with --epochs 4 (16 updates): the rate of update
    4 goes from 1 - 4/8 to 1 - 4/16 of lr_g 1e-3, and one warning says so with both values."""
    flat = dict(limit=128, max_steps=0, epochs=2, lr_decay="linear", lr_g=1e-3, lr_d=4e-4)

    def stop_after_one(trainer, epochs_done):
        return "split here"

    Trainer(tiny_cfg("run", **flat), console=quiet_console, epoch_callbacks=[stop_after_one]).fit()
    longer = Trainer(tiny_cfg("run", **{**flat, "epochs": 4}), console=quiet_console, resume="auto")
    longer.fit()
    log = (longer.run_dir / "train.log").read_text()
    assert ("--lr-decay: this resume ends the run at step 16, not at 8 as planned when checkpointed; the decay is "
            "computed on the new length, so at step 4 the rates jump: lr_g 0.00075 (was 0.0005), lr_d 0.0003 "
            "(was 0.0002)") in log
    assert [r["lr_g"] for r in _metrics(longer.run_dir)][3:6] == pytest.approx([1e-3 * 5 / 8, 1e-3 * 12 / 16,
                                                                                1e-3 * 11 / 16])


@pytest.mark.parametrize("golden_checkpoint", ["fashion32-tiny-v0.1.0-step3.pt", "fashion32-tiny-v2-step3.pt",
                                               "fashion32-tiny-v3-step3.pt"])
def test_golden_checkpoints_of_every_schema_version_resume_exactly(tmp_path, train_root, quiet_console,
                                                                  golden_checkpoint) -> None:
    """Checkpoints of each schema version (tests/golden: version 1, written by gantrain 0.1.0 before the component
    split, version 2 (flat) and version 3 (nested by component); step 3 of a 6-step run) load through the schema's
    upgrade and continue bit-for-bit: the losses of steps 4-6 are those of the old code's uninterrupted run."""
    golden = json.loads((GOLDEN_DIR / "fashion32-tiny-v0.1.0.json").read_text())
    old = GOLDEN_DIR / golden_checkpoint
    cfg = override(preset("fashion32"), dict(data_root=str(train_root), limit=256, batch_size=32, ngf=4, ndf=4,
                                             nz=16, sample_every=0, device="cpu", amp="off", channels_last=False,
                                             seed=7, log_every=1, max_steps=6, out=str(tmp_path / "run")))
    result = Trainer(cfg, console=quiet_console, resume=str(old)).fit()
    got = [(r["step"], r["loss_d"], r["loss_g"]) for r in _metrics(result.run_dir)]
    assert [g[0] for g in got] == [4, 5, 6]
    for (step, loss_d, loss_g), (_, want_d, want_g) in zip(got, golden["losses"][3:]):
        assert loss_d == pytest.approx(want_d, abs=1e-5) and loss_g == pytest.approx(want_g, abs=1e-5), step
