"""`gantrain tune`: the search space and settings, one trial in-process, and tiny Ray experiments.

The Ray experiments share one local Ray instance (2 CPUs, so at most 2 trials at once) started once per
session, and the session's metrics cache (conftest: the FashionMNIST extractor is fitted once per session,
or reused from pytest's cache). Trials train 64 FashionMNIST images at batch 16 (4 steps per epoch) with
8-channel models and evaluate 100 generated images (FD against the real test split).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image
import pytest
from extras import needs
from processes import alive, descendants, free_port
import torch
from torch import nn

from gantrain.engine.config import load_toml, override, preset
from gantrain.engine.errors import ConfigError
from gantrain.engine.state.checkpoint import load_checkpoint
from gantrain.engine.train.loop import Trainer
from gantrain.tune.settings import TuneSettings, settings_from
from gantrain.tune.space import load_space, parse_space
from gantrain.tune.trainable import DivergenceMonitor, apply_hyperparameters, run_trial, trial_config

TINY = dict(limit=64, batch_size=16, ngf=8, ndf=8, log_every=2, sample_every=0, amp="off", channels_last=False,
            device="cpu", eval_samples=100)
TINY_FLAGS = ["--limit", "64", "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "2",
              "--sample-every", "0", "--amp", "off", "--no-channels-last", "--eval-samples", "100",
              "--cpus-per-trial", "1", "--max-concurrent", "2", "--no-baseline"]


def tiny_base(train_root: Path, **overrides):
    return override(preset("fashion32"), {"data_root": str(train_root), **TINY, **overrides})


# ----- the search space -------------------------------------------------------------------------------------
def test_default_space_is_the_issue_space(train_root: Path) -> None:
    space = load_space(None, tiny_base(train_root))
    dims = {d.name: (d.kind, d.values) for d in space.dimensions}
    assert dims == {"lr_g": ("loguniform", (1e-5, 1e-2)), "lr_d": ("loguniform", (1e-5, 1e-2)),
                    "beta1": ("choice", (0.0, 0.5, 0.9)), "label_smoothing": ("uniform", (0.0, 0.3))}
    assert space.baseline_point(preset("fashion32")) == {"lr_g": 2e-4, "lr_d": 2e-4, "beta1": 0.5,
                                                         "label_smoothing": 0.0}


@pytest.mark.parametrize("text, message", [
    ("[optimiser]\nlr_g = { uniform = [0.1, 0.2] }", "unknown section [optimiser]"),
    ("[optim]\nlr_x = { uniform = [0.1, 0.2] }", "optim.lr_x: no such config field"),
    ("[loss]\nlr_g = { uniform = [0.1, 0.2] }", "loss.lr_g: no such config field"),
    ("[run]\nepochs = { choice = [1, 2] }", "run.epochs: cannot be searched (set by --max-epochs)"),
    ("[optim]\nlr_g = { normal = [0.1, 0.2] }", "unknown distribution 'normal'"),
    ("[optim]\nlr_g = { loguniform = [0.0, 0.2] }", "loguniform needs low > 0"),
    ("[optim]\nlr_g = { uniform = [0.2, 0.1] }", "needs finite low < high"),
    ("[model]\nngf = { uniform = [8, 16] }", "uniform is for float fields"),
    ("[loss]\nlabel_smoothing = { uniform = [0.0, 0.6] }", "--label-smoothing: must be in [0, 0.5), got 0.6"),
    ("[loss]\nnoise = { choice = [\"normal\", \"cauchy\"] }", "--noise: must be normal or uniform"),
    ("[optim]\nlr_g = 0.1", "must be one distribution"),
    ("[optim]\nlr_g = { uniform = [0.1, 0.2", "is not valid TOML"),
    ("", "searches no field"),
])
def test_space_errors_name_the_field(train_root: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_space(text, tiny_base(train_root), "space.toml")
    assert message in str(info.value) and str(info.value).startswith("--space:")


def test_space_file_can_search_any_field(train_root: Path, tmp_path: Path) -> None:
    path = tmp_path / "space.toml"
    path.write_text("[model]\nngf = { randint = [8, 16] }\n[data]\nhflip = { choice = [true, false] }\n"
                    "[optim]\nlr_d = { grid = [1e-3, 2e-3] }\n")
    space = load_space(path, tiny_base(train_root))
    assert space.names == ["ngf", "hflip", "lr_d"] and space.has_grid
    assert space.baseline_point(tiny_base(train_root)) is None  # grid points are the runs; no extra point
    with pytest.raises(ConfigError, match="--space: no such file"):
        load_space(tmp_path / "absent.toml", tiny_base(train_root))


# ----- settings ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, message", [
    ({"scheduler": "hyperband"}, "--scheduler: must be one of asha, pbt, fifo"),
    ({"search": "grid"}, "--search: must be one of random, optuna, hyperopt"),
    ({"scheduler": "pbt", "search": "optuna"}, "--search: pbt explores the space by itself"),
    ({"gpus_per_trial": 1.5}, "--gpus-per-trial: a trial uses one process"),
    ({"cpus_per_trial": 0}, "--cpus-per-trial: must be > 0"),
    ({"num_samples": 0}, "--num-samples: must be at least 1"),
    ({"reduction_factor": 1.0}, "--reduction-factor: must be > 1"),
    ({"metric": "is"}, "--metric: must be one of fd"),
])
def test_settings_errors_name_the_flag(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        settings_from(values)


def test_settings_modes() -> None:
    assert TuneSettings().mode == "min" and settings_from({"metric": "recall"}).mode == "max"
    assert settings_from({"gpus_per_trial": 0.5, "scheduler": "pbt"}).gpus_per_trial == 0.5


def test_cli_errors_are_one_line(cli, train_root: Path, tmp_path: Path, unwrap) -> None:
    needs("tune")
    space = tmp_path / "space.toml"
    space.write_text("[loss]\nlabel_smoothing = { uniform = [0.0, 0.7] }\n")
    result = cli("tune", "--data-root", train_root, "--space", space, "--storage", tmp_path)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "--label-smoothing: must be in [0, 0.5), got 0.7" in unwrap(result.stderr)
    result = cli("tune", "--scheduler", "pbt", "--search", "hyperopt", "--storage", tmp_path)
    assert result.exit_code == 2 and "pbt explores the space by itself" in unwrap(result.stderr)
    result = cli("tune", "--resume", "--storage", tmp_path, "--name", "none-here")
    assert result.exit_code == 2 and "no gantrain tune experiment in" in unwrap(result.stderr)


# ----- one trial, in this process -----------------------------------------------------------------------------
def test_trial_config_applies_values_budget_and_device(train_root: Path, tmp_path: Path) -> None:
    import numpy as np

    base = tiny_base(train_root, epochs=20, device="auto").to_dict()
    cfg = trial_config(base, {"lr_g": np.float64(1e-3), "beta1": np.float64(0.0), "ngf": np.int64(12)},
                       settings_from({"max_epochs": 3}), tmp_path / "run")
    assert (cfg.optim.lr_g, cfg.optim.beta1, cfg.model.ngf) == (1e-3, 0.0, 12) and type(cfg.model.ngf) is int
    assert (cfg.run.epochs, cfg.run.device, cfg.run.out) == (3, "cpu", str(tmp_path / "run"))
    assert trial_config(base, {}, settings_from({"gpus_per_trial": 0.5}), tmp_path).run.device == "cuda"


def _reports(train_root: Path, tmp_path: Path, settings: TuneSettings, **values):
    """Runs one trial in-process; returns its reports (metrics, whether a checkpoint came with it)."""
    reports = []
    cfg = trial_config(tiny_base(train_root).to_dict(), values, settings, tmp_path / "run")
    run_trial(cfg, settings, lambda metrics, folder: reports.append((metrics, folder is not None)))
    return reports


def test_nan_trial_reports_once_and_stops(train_root: Path, tmp_path: Path) -> None:
    reports = _reports(train_root, tmp_path, settings_from({"max_epochs": 3}), lr_d=1e30)
    assert len(reports) == 1
    metrics, with_checkpoint = reports[0]
    assert metrics["diverged"] == "non-finite weights" and metrics["epoch"] == 1 and not with_checkpoint
    assert metrics["fd"] == math.inf and math.isnan(metrics["kid_mean"])  # the objective ranks it last
    assert "stopping at step 4: diverged: non-finite weights" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()  # Tune keeps the checkpoints, not the run folder


def test_epoch_losses_and_collapse_do_not_depend_on_the_log_interval(train_root: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Epochs shorter than --log-every: each report still carries the epoch's mean losses, and a collapsed D is
    caught after exactly --collapse-patience epochs (before, both read the last log record: none was written)."""
    import gantrain.tune.trainable as trainable

    monkeypatch.setattr(trainable, "evaluate", lambda trainer, num_samples: {"fd": 1.0})  # the losses are the point
    collapsing = settings_from({"max_epochs": 4, "collapse_loss": 100.0, "collapse_patience": 2})
    reports = []
    cfg = trial_config(tiny_base(train_root, log_every=1000).to_dict(), {}, collapsing, tmp_path / "quiet")
    run_trial(cfg, collapsing, lambda metrics, folder: reports.append(metrics))
    assert [r["epoch"] for r in reports] == [1, 2]
    assert [r["diverged"] for r in reports] == ["", "D loss below 100 for 2 epochs"]

    # the reference: the same training logged at every step; epoch 1's mean of its 4 step records
    never = settings_from({"max_epochs": 1, "collapse_loss": 0.0})
    cfg = trial_config(tiny_base(train_root, log_every=1).to_dict(), {}, never, tmp_path / "verbose")
    run_trial(cfg, never, lambda metrics, folder: None)
    steps = [json.loads(line) for line in (tmp_path / "verbose" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "loss_d" in r and r["epoch"] == 1]
    assert len(steps) == 4
    for key in ("loss_d", "loss_g", "d_real", "d_fake"):
        assert reports[0][key] == pytest.approx(sum(r[key] for r in steps) / 4, abs=1e-4), key
    assert reports[1]["loss_d"] != pytest.approx(reports[0]["loss_d"], abs=1e-6)  # epoch 2 has its own mean


def test_divergence_monitor() -> None:
    monitor = DivergenceMonitor(collapse_loss=0.01, patience=3)
    trainer = SimpleNamespace(gan=SimpleNamespace(g=nn.Linear(2, 2), d=nn.Linear(2, 2)), epoch_means={})
    verdicts = []
    for loss_d in (0.5, 0.001, 0.0, 0.7, 0.002, 0.003, 0.0):  # collapsed for 2, recovered, collapsed for 3
        trainer.epoch_means = {"loss_d": loss_d, "loss_g": 9.0}
        verdicts.append(monitor.check(trainer))
    assert verdicts[:6] == [None] * 6 and verdicts[6] == "D loss below 0.01 for 3 epochs"
    trainer.epoch_means = {"loss_d": 0.6, "loss_g": math.inf}
    assert monitor.check(trainer) == "non-finite loss"
    with torch.no_grad():
        trainer.gan.g.weight[0, 0] = math.nan
    assert monitor.check(trainer) == "non-finite weights"


def test_restore_takes_the_trial_values_over_the_checkpoint(train_root: Path, tmp_path: Path, quiet_console) -> None:
    """PBT's exploit: a trial restarts from a donor checkpoint with perturbed lr and label smoothing."""
    donor = tiny_base(train_root, epochs=2, out=str(tmp_path / "donor"))
    Trainer(donor, console=quiet_console).fit()
    changed = override(donor, {"lr_g": 3e-3, "lr_d": 1e-4, "label_smoothing": 0.2, "epochs": 3,
                               "out": str(tmp_path / "trial")})
    trainer = Trainer(changed, console=quiet_console, resume=str(tmp_path / "donor" / "checkpoints" / "last.pt"))
    apply_hyperparameters(trainer)
    assert trainer.step == 8
    assert [g["lr"] for g in trainer.gan.opt_g.param_groups] == [3e-3]
    assert [g["lr"] for g in trainer.gan.opt_d.param_groups] == [1e-4]
    assert torch.all(trainer.gan.real_target == 0.8)
    assert trainer.gan.opt_g.state  # Adam moments came from the donor


# ----- tiny Ray experiments -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_session(metrics_cache_dir: Path):
    """One local Ray for the session. Its workers inherit the environment at start-up: the session's metrics
    cache, and no auth token written to ~/.ray."""
    needs("tune")
    import ray
    env = {"GANTRAIN_CACHE": str(metrics_cache_dir), "RAY_AUTH_MODE": "disabled"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 2**20)
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _rows(folder: Path) -> list[dict]:
    with (folder / "results.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_tiny_experiment_ranks_a_sabotaged_lr_last(ray_session, fashion_extractor, cli, train_root: Path,
                                                  tmp_path: Path, unwrap) -> None:
    space = tmp_path / "space.toml"
    # The sabotage is a generator that cannot learn (lr 1e-7). A huge lr (1.0, tried before) is no sabotage here:
    # BatchNorm after every convolution makes G's layers scale-invariant, and that trial had the best FD (131
    # against 156-168). 256 images (16 steps an epoch, 48 in all) move the sound trials' FD clearly below the
    # untrained generator's, so the ranking is the objective's, not the noise of 100-sample FDs.
    space.write_text("[optim]\nlr_g = { grid = [2e-3, 3e-3, 4e-3, 1e-7] }\n")
    result = cli("tune", "--data-root", train_root, *TINY_FLAGS, "--limit", "256", "--lr-d", "2e-3", "--space", space,
                 "--num-samples", "1", "--scheduler", "fifo", "--max-epochs", "3", "--storage", tmp_path,
                 "--name", "tiny")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "tiny"
    assert "top 4 of 4 trials by fd (min)" in unwrap(result.stdout)

    rows = _rows(folder)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["lr_g"]) == 1e-7  # the objective comes from the generator: the sabotaged run is worst
    assert all(r["status"] in ("done", "diverged") for r in rows) and rows[0]["status"] == "done"
    fds = [float(r["fd"]) for r in rows]
    assert fds == sorted(fds) and all(math.isfinite(v) for v in fds)

    best = load_toml(folder / "best.toml")  # a valid config: the best trial's values at the experiment's budget
    assert best.optim.lr_g == float(rows[0]["lr_g"]) and best.optim.lr_d == 2e-3 and best.run.epochs == 3
    assert (best.data.limit, best.model.ngf, best.data.data_root) == (256, 8, str(train_root))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trial had (--cpus-per-trial 1): the same summation order, the same numbers
    try:
        again = cli("run", "--config", folder / "best.toml", "--out", tmp_path / "again")
    finally:
        torch.set_num_threads(threads)
    assert again.exit_code == 0, again.output
    evals = [json.loads(line) for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "fd" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3]
    assert evals[-1]["fd"] == pytest.approx(float(rows[0]["fd"]), rel=1e-5)  # best.toml reproduces the trial

    trial = folder / f"trial_{rows[0]['trial']}"
    assert Path(rows[0]["checkpoint"]).is_file() and Path(rows[0]["checkpoint"]).is_relative_to(trial)
    assert (trial / "run" / "metrics.jsonl").is_file() and (trial / "run" / "final.png").is_file()
    assert (folder / "trials.png").is_file() and (folder / "tune.log").is_file()


@pytest.mark.slow
def test_trials_log_like_runs_and_compare_in_one_tensorboard(ray_session, fashion_extractor, cli, train_root: Path,
                                                             tmp_path: Path) -> None:
    needs("tensorboard")
    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr_g = { grid = [5e-4, 2e-3] }\n")
    result = cli("tune", "--data-root", train_root, *TINY_FLAGS, "--space", space, "--num-samples", "1",
                 "--scheduler", "fifo", "--max-epochs", "2", "--storage", tmp_path, "--name", "tb",
                 "--logger", "tensorboard")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "tb"
    rows = _rows(folder)
    assert len(rows) == 2 and (folder / "results.csv").is_file()

    # --logger tensorboard: every trial's run logs as a plain run does, and one TensorBoard over the experiment
    # folder shows them side by side, each quality curve equal to its trial's metrics.jsonl
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer(size_guidance={"scalars": 0})
    multiplexer.AddRunsFromDirectory(str(folder))
    multiplexer.Reload()
    # Ray Tune writes its own event files in each trial folder; gantrain's are the trials' run/tb folders
    runs = {Path(name).parts[0]: name for name in multiplexer.Runs() if Path(name).parts[1:] == ("run", "tb")}
    assert set(runs) == {f"trial_{r['trial']}" for r in rows}
    for row in rows:
        run_folder = folder / f"trial_{row['trial']}" / "run"
        truth = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
        fd_truth = [(r["step"], r["fd"]) for r in truth if "fd" in r]
        tags = multiplexer.GetAccumulator(runs[f"trial_{row['trial']}"]).Tags()["scalars"]
        found = [(e.step, e.value) for e in multiplexer.Scalars(runs[f"trial_{row['trial']}"], "quality/fd")] \
            if "quality/fd" in tags else []
        assert [s for s, _ in found] == [s for s, _ in fd_truth]
        assert [v for _, v in found] == pytest.approx([v for _, v in fd_truth], rel=1e-6)
        assert fd_truth or row["status"] == "diverged"
        assert "train/loss_d" in tags


def _interrupt_at_epoch_2(marker: Path):
    """A Tune callback that presses Ctrl-C once, at a trial's second report (its first checkpoint is then
    registered with Tune; the one of the report in hand may not be yet)."""
    from ray import tune

    class Interrupt(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            if result.get("epoch") == 2 and not marker.exists():
                marker.touch()
                os.kill(os.getpid(), signal.SIGINT)

    return Interrupt()


@pytest.mark.slow
def test_nan_trial_stops_while_the_other_finishes_across_a_resume(ray_session, fashion_extractor, cli,
                                                                  train_root: Path, tmp_path: Path) -> None:
    from gantrain.tune.experiment import experiment_folder, run_experiment

    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr_d = { grid = [2e-3, 1e30] }\n")
    settings = settings_from({"num_samples": 1, "scheduler": "fifo", "max_epochs": 4, "max_concurrent": 2,
                              "baseline": False})
    folder = experiment_folder(tmp_path, "nan")
    first = run_experiment(folder, cfg=tiny_base(train_root, lr_g=2e-3), settings=settings, space_file=space,
                           callbacks=[_interrupt_at_epoch_2(tmp_path / "interrupted")])
    assert first.interrupted and (tmp_path / "interrupted").exists()
    assert any(r.status == "unfinished" for r in first.rows)

    result = cli("tune", "--resume", "--storage", tmp_path, "--name", "nan")
    assert result.exit_code == 0, result.output
    healthy, nan = _rows(folder.path)
    assert (healthy["lr_d"], healthy["status"], healthy["epoch"]) == ("0.002", "done", "4")
    assert (nan["status"], nan["note"], nan["epoch"], nan["fd"]) == ("diverged", "non-finite weights", "1", "inf")
    assert "resumed from" in (folder.path / f"trial_{healthy['trial']}" / "run" / "train.log").read_text()


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"ray start exited with code {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"the Ray head did not listen on port {port} within {timeout_s:.0f} s")


@pytest.mark.slow
def test_address_joins_a_running_cluster(fashion_extractor, metrics_cache_dir: Path, train_root: Path,
                                         tmp_path: Path) -> None:
    needs("tune")
    # The multi-node path on one node: `ray start --head` makes a cluster, `gantrain tune --address HOST:PORT`
    # joins it from a fresh process (not the session's in-process Ray), its trials run on the cluster's
    # workers, and those use the driver's data and metrics cache (made absolute in the trial config), not
    # the cluster's own default cache.
    ray_cli = Path(sys.executable).parent / "ray"
    if not ray_cli.is_file():
        pytest.skip("the ray command is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("GANTRAIN_CACHE", "XDG_CACHE_HOME")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    # The cluster's own default cache is elsewhere and empty; workers must not fall back on it.
    cluster_cache = tmp_path / "cluster-cache"
    cluster_env = {**env, "XDG_CACHE_HOME": str(cluster_cache)}
    # A foreground (--block) head in its own process group, stopped by signalling that group: `ray stop`
    # would also kill the session's in-process Ray, and this pytest process with it.
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--object-store-memory=134217728", "--disable-usage-stats"],
                            env=cluster_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        _wait_for_port(port, head)
        command = [sys.executable, "-m", "gantrain", "tune", "--address", f"127.0.0.1:{port}", "--data-root",
                   str(train_root), *TINY_FLAGS, "--num-samples", "2", "--scheduler", "fifo", "--max-epochs",
                   "2", "--storage", str(tmp_path), "--name", "joined"]
        done = subprocess.run(command, env={**env, "GANTRAIN_CACHE": str(metrics_cache_dir)}, capture_output=True,
                              text=True, timeout=600)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = _rows(tmp_path / "joined")
    assert len(rows) == 2 and all(r["status"] == "done" and r["epoch"] == "2" for r in rows)
    assert all(math.isfinite(float(r["fd"])) for r in rows)
    assert not (cluster_cache / "gantrain").exists()


# ----- pieces that need Ray installed but no cluster ------------------------------------------------------------
def test_schedulers_and_searchers(train_root: Path) -> None:
    needs("tune")
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    from gantrain.tune.experiment import ClipToSpace, make_scheduler, make_searcher

    base = tiny_base(train_root)
    space = load_space(None, base)
    asha = make_scheduler(settings_from({"grace_period": 5}), space, reports=3)
    assert isinstance(asha, ASHAScheduler) and asha._max_t == 3  # the grace period is capped at the budget
    pbt = make_scheduler(settings_from({"scheduler": "pbt"}), space, reports=3)
    assert isinstance(pbt, PopulationBasedTraining)
    assert set(pbt._hyperparam_mutations) == {"lr_g", "lr_d", "label_smoothing"}  # beta1 is sampled, not perturbed
    clip = ClipToSpace({d.name: d.bounds for d in space.dimensions if d.bounds})
    assert clip({"lr_g": 0.5, "lr_d": 1e-9, "label_smoothing": 0.36, "beta1": 0.9}) == \
        {"lr_g": 1e-2, "lr_d": 1e-5, "label_smoothing": 0.3, "beta1": 0.9}
    assert make_scheduler(settings_from({"scheduler": "fifo"}), space, reports=3) is None
    for search in ("random", "optuna", "hyperopt"):
        assert make_searcher(settings_from({"search": search}), space, space.baseline_point(base)) is not None
    grid = parse_space("[optim]\nlr_g = { grid = [1e-3, 2e-3] }\n", base, "space.toml")
    with pytest.raises(ConfigError, match="--search: grid dimensions need --search random"):
        make_searcher(settings_from({"search": "optuna"}), grid, None)


def test_missing_ray_names_the_extra(cli, monkeypatch, unwrap) -> None:
    import gantrain.tune

    monkeypatch.setattr(gantrain.tune.importlib.util, "find_spec", lambda name: None)
    result = cli("tune")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "pip install 'gantrain[tune]'" in unwrap(result.stderr)


def test_a_trial_that_reported_its_whole_budget_is_done_whatever_rays_flag_says() -> None:
    """`gantrain tune --resume` of a finished experiment turned done trials into "unfinished" (Ray's saved state
    held their last result before it was marked done) and called the experiment interrupted, on every resume."""
    from gantrain.tune.results import trial_status

    assert trial_status({"epoch": 3, "done": False, "fd": 1.0}, None, 3) == ("done", "")
    assert trial_status({"epoch": 3, "done": True, "fd": 1.0}, None, 3) == ("done", "")
    assert trial_status({"epoch": 2, "done": False, "fd": 1.0}, None, 3) == ("unfinished", "")
    assert trial_status({"epoch": 2, "done": True, "fd": 1.0}, None, 3)[0] == "stopped"
    assert trial_status({"epoch": 3, "done": False}, RuntimeError("x"), 3)[0] == "error"


def test_ranking_puts_trials_without_a_finite_objective_last() -> None:
    from gantrain.tune.results import TrialRow, rank

    rows = [TrialRow("a", {}, {"fd": math.inf}, "diverged"), TrialRow("b", {}, {"fd": 12.0}, "done"),
            TrialRow("c", {}, {}, "error"), TrialRow("d", {}, {"fd": 9.5}, "stopped")]
    assert [r.trial_id for r in rank(rows, "fd", "min")] == ["d", "b", "a", "c"]
    rows = [TrialRow("a", {}, {"recall": 0.2}, "done"), TrialRow("b", {}, {"recall": 0.6}, "done")]
    assert [(r.trial_id, r.rank) for r in rank(rows, "recall", "max")] == [("b", 1), ("a", 2)]


# ----- flags and combinations refused before anything starts ---------------------------------------------------
@pytest.fixture
def nothing_starts(monkeypatch):
    """Fails a test the moment an experiment would start (Ray, the metrics fit, the experiment folder)."""
    needs("tune")
    import gantrain.tune.experiment as experiment

    def started(*args, **kwargs):
        raise AssertionError("the experiment started")

    monkeypatch.setattr(experiment, "warm_metrics", started)
    monkeypatch.setattr(experiment, "create", started)


@pytest.mark.parametrize("flags, message", [
    (["--max-steps", "30"], "--max-steps: not a tune option: trials are budgeted in epochs: use --max-epochs, and "
                            "--limit for shorter epochs"),
    (["--out", "somewhere"], "--out: not a tune option: each trial writes into <storage>/<name>/trial_<id>/run: "
                             "choose the folder with --storage and --name"),
    (["--checkpoint-every", "2"], "--checkpoint-every: not a tune option: a trial checkpoints at every report"),
    (["--keep-checkpoints", "3"], "--keep-checkpoints: not a tune option"),
    (["--nproc", "2"], "--nproc: not a tune option: a trial is one process"),
    (["--master-port", "29999"], "--master-port: not a tune option: a trial is one process"),
    (["--epochs", "5", "--max-epochs", "2"], "--epochs: --max-epochs sets the trials' budget; give one of the two"),
    (["--device", "cpu", "--gpus-per-trial", "1"], "--device: --gpus-per-trial 1 puts the trials on cuda; choose the device with --gpus-per-trial"),
    (["--device", "auto"], "--device: --gpus-per-trial 0 puts the trials on cpu"),
])
def test_tune_refuses_run_flags_a_trial_sets_itself(cli, nothing_starts, train_root: Path, tmp_path: Path,
                                                    unwrap, flags: list[str], message: str) -> None:
    result = cli("tune", "--data-root", train_root, *flags, "--storage", tmp_path, "--name", "x")
    assert result.exit_code == 2, result.output
    assert unwrap(result.stderr).startswith(f"error: {message}"), result.stderr
    assert not (tmp_path / "x").exists()


def test_tune_refuses_max_steps_from_a_config_file_and_flags_with_resume(cli, nothing_starts, train_root: Path,
                                                                         tmp_path: Path, unwrap) -> None:
    config = tmp_path / "run.toml"
    config.write_text("[run]\nmax_steps = 30\n")
    result = cli("tune", "--data-root", train_root, "--config", config, "--storage", tmp_path, "--name", "x")
    assert result.exit_code == 2 and "--max-steps: the config sets max_steps = 30, but trials are budgeted in " \
        "epochs: use --max-epochs" in unwrap(result.stderr), result.output
    # (--epochs acts: it is the budget when --max-epochs is not given)
    result = cli("tune", "--resume", "--lr-g", "1e-3", "--max-epochs", "3", "--storage", tmp_path, "--name", "x")
    assert result.exit_code == 2 and unwrap(result.stderr) == (
        "error: --resume continues the experiment with the config, space and settings it started with; drop "
        "--lr-g, --max-epochs"), result.output


def test_pbt_with_a_grid_is_refused_before_anything_starts(cli, nothing_starts, train_root: Path,
                                                           tmp_path: Path, unwrap) -> None:
    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr_g = { loguniform = [1e-4, 1e-2] }\nlr_d = { grid = [1e-3, 2e-3] }\n")
    result = cli("tune", "--data-root", train_root, "--scheduler", "pbt", "--space", space, "--storage", tmp_path,
                 "--name", "x")
    assert result.exit_code == 2, result.output
    assert unwrap(result.stderr) == ("error: --scheduler pbt: its exploit step copies a better trial's whole config, "
                                     "so the grid values of lr_d would not be kept; search them with choice = [...] "
                                     "in --space, or use --scheduler asha or fifo")
    space.write_text("[optim]\nbeta1 = { choice = [0.0, 0.5] }\n")  # nothing PBT can perturb: also before start
    result = cli("tune", "--data-root", train_root, "--scheduler", "pbt", "--space", space, "--storage", tmp_path,
                 "--name", "x")
    assert result.exit_code == 2 and "pbt perturbs lr_g, lr_d, label_smoothing" in unwrap(result.stderr)
    assert not (tmp_path / "x").exists()


def test_tune_storage_inside_the_image_folder_is_refused(cli, nothing_starts, tmp_path: Path, unwrap) -> None:
    """An experiment folder inside the image folder its trials read (with subfolders) would put tune.log, the
    results plots and each trial's grids among the images; refused before anything is written, also through a
    link; the folder beside it passes the check (and reaches the start, which the fixture stops)."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(images / f"{i}.png")
    (tmp_path / "link").symlink_to(images)
    for storage, name in ((images, "x"), (tmp_path / "link" / "runs", "x"), (tmp_path, "imgs")):
        result = cli("tune", "--dataset", "folder", "--data-root", images, "--image-size", "32", "--channels", "3",
                     "--storage", storage, "--name", name)
        assert result.exit_code == 2, result.output
        folder = Path(os.path.realpath(storage / name))  # the experiment folder, its links resolved
        assert unwrap(result.stderr).startswith(f"error: --storage/--name {folder} is inside the image "
                                                f"folder --data-root {images}"), result.stderr
    assert sorted(p.name for p in images.iterdir()) == [f"{i}.png" for i in range(4)]
    result = cli("tune", "--dataset", "folder", "--data-root", images, "--image-size", "32", "--channels", "3",
                 "--storage", tmp_path, "--name", "x")
    assert isinstance(result.exception, AssertionError) and "the experiment started" in str(result.exception)


def test_a_restarted_trial_continues_from_its_newest_checkpoint_on_disk(tmp_path: Path) -> None:
    from gantrain.engine.state import checkpoint as ckpt
    from gantrain.tune.trainable import newest_checkpoint

    from checkpoints import placeholder_state

    trial, donor = tmp_path / "trial_a", tmp_path / "trial_b"
    paths = []
    for folder, index, step in ((trial, 0, 4), (trial, 1, 8), (trial, 2, 12), (donor, 0, 6)):
        path = folder / f"checkpoint_{index:06d}" / "checkpoint.pt"
        ckpt.atomic_save(ckpt.sealed(placeholder_state(step)), path)
        os.utime(path, (1000 + index, 1000 + index))  # written in this order
        paths.append(path)
    # the experiment state (saved every so often) knew only the first: the newest on disk wins
    assert newest_checkpoint(paths[0].parent, trial) == paths[2]
    assert newest_checkpoint(None, trial) == paths[2]
    paths[2].write_bytes(paths[2].read_bytes()[:100])  # torn by the kill: the one before it
    assert newest_checkpoint(paths[0].parent, trial) == paths[1]
    assert newest_checkpoint(paths[3].parent, trial) == paths[3]  # PBT's exploit: the donor's, as Tune says
    assert newest_checkpoint(None, tmp_path / "trial_new") is None


# ----- a killed driver -------------------------------------------------------------------------------------------


def _newest_checkpoint_step(trial: Path) -> int:
    from gantrain.engine.state.checkpoint import load_checkpoint

    newest = max(trial.glob("checkpoint_*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    return load_checkpoint(newest)["position"]["step"]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_killed_driver_leaves_no_process_and_resume_continues_every_trial(fashion_extractor, metrics_cache_dir: Path,
                                                                          train_root: Path, tmp_path: Path) -> None:
    """SIGKILL to `gantrain tune` once both trials have two checkpoints on disk: Ray's processes go with it, and
    --resume continues each trial from its newest checkpoint on disk, with its whole history in its run folder."""
    needs("tune")
    env = {**os.environ, "GANTRAIN_CACHE": str(metrics_cache_dir), "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("GANTRAIN_DATA", None)
    flags = ["--data-root", str(train_root), *TINY_FLAGS, "--log-every", "1", "--num-samples", "2",
             "--scheduler", "fifo", "--max-epochs", "6", "--storage", str(tmp_path), "--name", "killed"]
    driver = subprocess.Popen([sys.executable, "-m", "gantrain", "tune", *flags], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    folder = tmp_path / "killed"
    processes: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while len([t for t in folder.glob("trial_*") if len(list(t.glob("checkpoint_*/checkpoint.pt"))) >= 2]) < 2:
            assert driver.poll() is None, f"the experiment ended early ({driver.returncode})"
            assert time.monotonic() < deadline, "no two checkpoints per trial within 300 s"
            processes.update(descendants(driver.pid))
            time.sleep(0.2)
        processes.update(descendants(driver.pid))
        driver.kill()
        killed = time.monotonic()
        driver.wait()
        while any(alive(p) for p in processes) and time.monotonic() - killed < 120:
            time.sleep(0.1)
        left = [p for p in processes if alive(p)]
        seconds = time.monotonic() - killed
    finally:
        for pid in processes:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    print(f"SIGKILL to the tune driver: its {len(processes)} processes gone after {seconds:.1f} s")
    assert not left and seconds < 10, f"{len(left)} processes still ran {seconds:.0f} s after the driver was killed"

    trials = sorted(folder.glob("trial_*"))
    newest = {t.name: _newest_checkpoint_step(t) for t in trials}
    done = subprocess.run([sys.executable, "-m", "gantrain", "tune", "--resume", "--storage", str(tmp_path), "--name",
                           "killed"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(folder)
    assert len(rows) == 2 and all((r["status"], r["epoch"]) == ("done", "6") for r in rows), rows
    for trial in trials:
        run = trial / "run"
        log = (run / "train.log").read_text()
        step = newest[trial.name]
        resumed = (rf"resumed from {re.escape(str(trial))}/checkpoint_\d+/checkpoint.pt at step {step} "
                   r"\(epoch \d+, image \d+ of this epoch\)\n")
        assert re.search(resumed, log), (trial.name, step, log[-2000:])
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in logged if "loss_d" in r] == list(range(1, 25))  # 6 epochs x 4 steps, whole
        assert (run / "final.png").is_file()


@pytest.mark.slow
def test_two_trials_of_two_ddp_workers_each(ray_session, fashion_extractor, cli, train_root: Path,
                                            tmp_path: Path) -> None:
    """--workers-per-trial 2: each trial is a Ray Train TorchTrainer job of 2 gloo workers driven by Tune."""
    space = tmp_path / "space.toml"
    space.write_text("[optim]\nlr_g = { grid = [1e-3, 2e-3] }\n")
    # one trial at a time: its 2 workers of 0.9 CPU and the trial's driver (0.01 CPU) fill the 2 CPUs
    flags = [*TINY_FLAGS[:-5], "--cpus-per-trial", "0.9", "--no-baseline"]
    result = cli("tune", "--data-root", train_root, *flags, "--max-concurrent", "1", "--workers-per-trial", "2",
                 "--space", space, "--num-samples", "1", "--scheduler", "fifo", "--max-epochs", "2", "--storage",
                 tmp_path, "--name", "ddp")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "ddp")
    assert len(rows) == 2 and all(r["status"] == "done" for r in rows), rows
    assert all(math.isfinite(float(r["fd"])) for r in rows)
    for row in rows:
        run = tmp_path / "ddp" / f"trial_{row['trial']}" / "run"
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        # 64 images / (16 x 2 workers) = 2 steps per epoch, 2 epochs; the replicas stayed identical
        assert records[-1] == {"step": 4, "ddp_replica_max_abs_diff": 0.0}
        assert "batch 16 x 2 processes = 32" in (run / "train.log").read_text()
        kept = sorted((run.parent / "train").glob("checkpoint_*/checkpoint.pt"))
        assert kept and load_checkpoint(kept[-1])["run"]["world_size"] == 2
        # results.csv names it (before: empty for such trials, and no "best generator" line)
        assert row["checkpoint"] and load_checkpoint(Path(row["checkpoint"]))["position"]["step"] == 4
    # best.toml reruns the best trial as it trained: 2 DDP processes (before: one process at half the batch)
    best = load_toml(tmp_path / "ddp" / "best.toml")
    assert (best.dist.ddp, best.dist.nproc, best.data.batch_size) == (True, 2, 16)
    assert "best generator:" in result.output


def test_a_trial_measures_with_the_runs_noise_seed(monkeypatch) -> None:
    """A trial evaluates its generator with the run's seed, as `gantrain run --eval-every` does, so rerunning the
    best trial's config logs the FD the trial reported (it used seed 0 whatever the run's seed)."""
    from gantrain.tune import trainable

    calls = []

    def fake_evaluate(model, cfg, *, num_samples, device, seed):
        calls.append((num_samples, seed))
        return {"fd": 1.5, "kid_mean": 0.1, "hist_0": 0.5}

    monkeypatch.setattr(trainable, "evaluate_generator", fake_evaluate)
    for seed in (0, 7):
        trainer = SimpleNamespace(gan=SimpleNamespace(generator=nn.Linear(1, 1)), device=torch.device("cpu"),
                                  cfg=override(preset("fashion32"), {"seed": seed}))
        assert trainable.evaluate(trainer, 300) == {"fd": 1.5, "kid_mean": 0.1, "hist_0": 0.5}
    assert calls == [(300, 0), (300, 7)]


# ----- trials that can never be placed ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--cpus-per-trial", str(4 * (os.cpu_count() or 1))],
     f"--cpus-per-trial: 1 x {4 * (os.cpu_count() or 1)} CPU = {4 * (os.cpu_count() or 1)} CPU, but this Ray cluster"),
    (["--gpus-per-trial", "1"], "1 x 1 GPU = 1 GPU, but this Ray cluster has 0 GPU"),
    (["--workers-per-trial", "2", "--cpus-per-trial", str(os.cpu_count())],
     f"2 x {os.cpu_count()} CPU + 0.01 CPU for the trial's driver"),
])
def test_a_trial_larger_than_the_local_ray_is_refused_not_waited_for(train_root: Path, tmp_path: Path, flags,
                                                                       message) -> None:
    """Before: each of these waited forever (the last without printing anything)."""
    needs("tune")
    if "--gpus-per-trial" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "300"}
    env.pop("GANTRAIN_DATA", None)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gantrain", "tune", "--data-root", str(train_root), *TINY_FLAGS,
                           "--num-samples", "1", "--max-epochs", "1", "--storage", str(tmp_path), *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(errors) == 1 and message in errors[0], done.stderr[-3000:]
    assert time.monotonic() - started < 120


def test_a_trials_history_adds_the_reports_ray_never_took_in(tmp_path: Path) -> None:
    """Before: reports a trial sent while the driver was being killed were missing from results (they are in the
    trial's metrics.jsonl); the trial's own evaluations fill the gaps, Ray's values win where both have one."""
    from gantrain.tune.results import merged_history, own_history

    run = tmp_path / "trial_x" / "run"
    run.mkdir(parents=True)
    records = [{"step": 4, "loss_d": 1.0}, {"step": 4, "epoch": 1, "fd": 30.0, "eval_samples": 100},
               {"step": 8, "epoch": 2, "fd": 20.0, "eval_samples": 100},
               {"step": 12, "epoch": 3, "fd": float("nan"), "eval_samples": 100},
               {"step": 16, "epoch": 4, "fd": 12.5, "eval_samples": 100}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records).replace("NaN", "null"))
    own = own_history(tmp_path / "trial_x", "fd")
    assert own == [(1.0, 30.0), (2.0, 20.0), (4.0, 12.5)]  # no training records, no non-finite value
    assert merged_history([(1.0, 31.0), (4.0, 12.5)], own) == [(1.0, 31.0), (2.0, 20.0), (4.0, 12.5)]
    assert own_history(tmp_path / "absent", "fd") == []


@pytest.mark.slow
def test_a_trial_whose_run_is_refused_reports_why_once_and_is_not_retried(ray_session, fashion_extractor, cli,
                                                                         train_root: Path, tmp_path: Path) -> None:
    """A sampled batch larger than the data makes a run that cannot start: before, Tune retried the trial
    --max-failures times (the same ConfigError each time) and listed it as an error; now it reports the reason
    once, ranks last, and the other trials go on."""
    space = tmp_path / "space.toml"
    space.write_text("[data]\nbatch_size = { grid = [16, 128] }\n")
    result = cli("tune", "--data-root", train_root, *TINY_FLAGS, "--space", space, "--num-samples", "1",
                 "--scheduler", "fifo", "--max-epochs", "1", "--max-failures", "2", "--storage", tmp_path,
                 "--name", "refused")
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path / "refused")
    assert [int(r["batch_size"]) for r in rows] == [16, 128]  # ranked last
    assert rows[0]["status"] == "done"
    assert rows[1]["status"] == "refused" and "--batch-size" in rows[1]["note"], rows[1]
    trial = tmp_path / "refused" / f"trial_{rows[1]['trial']}"
    assert len((trial / "result.json").read_text().splitlines()) == 1  # one report, no retry's


@pytest.mark.slow
def test_a_multi_worker_trial_whose_run_is_refused_is_not_retried(ray_session, fashion_extractor, cli,
                                                                 train_root: Path, tmp_path: Path) -> None:
    """The same under --workers-per-trial 2: every worker refuses alike (the ranks agree), rank 0 hands the
    reason to the trial, which reports it once; before, the Train job failed and Tune retried it."""
    space = tmp_path / "space.toml"
    space.write_text("[data]\nbatch_size = { grid = [64] }\n")  # 64 images, 2 workers: a global batch of 128
    flags = [*TINY_FLAGS[:-5], "--cpus-per-trial", "0.9", "--no-baseline"]
    result = cli("tune", "--data-root", train_root, *flags, "--max-concurrent", "1", "--workers-per-trial", "2",
                 "--space", space, "--num-samples", "1", "--scheduler", "fifo", "--max-epochs", "1",
                 "--max-failures", "2", "--storage", tmp_path, "--name", "ddp-refused")
    rows = _rows(tmp_path / "ddp-refused")
    assert len(rows) == 1 and rows[0]["status"] == "refused", (rows, result.output)
    assert "--batch-size" in rows[0]["note"] or "--limit" in rows[0]["note"], rows[0]
    trial = tmp_path / "ddp-refused" / f"trial_{rows[0]['trial']}"
    assert len((trial / "result.json").read_text().splitlines()) == 1


def test_the_driver_times_the_layer_rewrites_once_with_a_trials_threads(train_root: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    """Before trials start (which would each time them on shared cores), the driver measures the fast layers'
    rewrites at the trials' shapes with --cpus-per-trial threads, and gives its own threads back; a config
    without CPU rewrites (torch's layers) measures nothing."""
    from gantrain.kernels import conv
    from gantrain.tune import experiment

    monkeypatch.setenv("GANTRAIN_CACHE", str(tmp_path / "cache"))  # nothing measured yet
    cfg = override(preset("fashion32"), {**TINY, "data_root": str(train_root)})
    seen = []
    monkeypatch.setattr(conv, "measure_rewrite", lambda name, dtype, shape, **_: seen.append(
        (name, tuple(shape), torch.get_num_threads())) or (1.0, 2.0))
    before = torch.get_num_threads()
    try:
        experiment.warm_rewrites(cfg, settings_from({"cpus_per_trial": 1}))
        # batch 16, widths 8: only D's 1-channel convolution (1 -> 8 at 32 px) and G's last layer (the same
        # convolution) are in a rewrite's bounds
        assert seen == [("space_to_depth", (16, 1, 8, 32), 1)] * 2 and torch.get_num_threads() == before
        seen.clear()
        experiment.warm_rewrites(override(cfg, {"layer_impl": "aten"}), settings_from({"cpus_per_trial": 1}))
        assert seen == []
    finally:
        conv.reset_rewrites()
