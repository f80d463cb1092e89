"""--logger tensorboard,wandb,mlflow: what each tool holds, read back with its own reader (TensorBoard's
EventAccumulator, W&B's `wandb leet inspect` of the offline run log, MLflow's MlflowClient), against
metrics.jsonl, the source of truth; and a resumed run is one continuous curve in each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from extras import needs
from gantrain.engine.errors import ConfigError
from gantrain.engine.outputs.trackers import parse_loggers, scalars, tag

# The tiny run: 256 images, batch 32 -> 8 steps per epoch; losses every 2 steps, a grid every 4.
RUN_ARGS = ["--amp", "off", "--no-channels-last", "--limit", "256", "--batch-size", "32", "--log-every", "2",
            "--sample-every", "4", "--ngf", "16", "--ndf", "16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # gantrain's own default (offline) is what is tested
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))


def test_parse_loggers_and_tags() -> None:
    assert parse_loggers("none") == [] and parse_loggers("") == []
    assert parse_loggers(" TensorBoard, mlflow,tensorboard") == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="--logger"):
        parse_loggers("neptune")
    assert [tag(k) for k in ("loss_d", "d_real", "images_per_s", "d_step_ms", "fd", "coverage", "hist_bag",
                             "inception_fid", "step", "time", "eval_samples")] == [
        "train/loss_d", "train/d_real", "perf/images_per_s", "time/d_step_ms", "quality/fd", "quality/coverage",
        "quality/class_share/bag", "quality/inception_fid", None, None, None]
    assert scalars({"step": 3, "loss_d": 1.5, "note": "x", "flag": True}) == {"train/loss_d": 1.5}


def test_unknown_logger_is_a_config_error(cli, unwrap, tmp_path: Path) -> None:
    result = cli("run", "--logger", "neptune", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--logger" in unwrap(result.output) and "Traceback" not in result.output


def test_missing_extra_is_one_line_and_leaves_no_run_folder(cli, unwrap, train_root: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    needs("tensorboard")  # present, before the absent one
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as when it is not installed
    out = tmp_path / "run"
    result = cli("run", "--data-root", train_root, *RUN_ARGS, "--max-steps", "2", "--logger", "tensorboard",
                 "--logger", "wandb", "--out", out)
    assert result.exit_code == 1, result.output
    assert result.output.startswith("error:") and "Traceback" not in result.output
    assert "gantrain[wandb]" in unwrap(result.output)
    assert not out.exists()


# ----- reading back, with each tool's own reader ------------------------------------------------------------
def tensorboard_scalars(run: Path) -> tuple[dict[str, list[tuple[int, float]]], list[int], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()  # applies the purge events a resumed writer leaves
    values = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    images = [e.step for e in acc.Images("samples/fixed_noise")] if "samples/fixed_noise" in acc.Tags()["images"] else []
    return values, images, acc


def wandb_history(run: Path) -> tuple[list[str], list[dict]]:
    """The run ids and history rows of every offline segment, via `wandb leet inspect --json` (wandb-core's
    reader of the .wandb transaction log)."""
    wandb_cli = Path(sys.executable).with_name("wandb")
    ids, rows = [], []
    for log_file in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(log_file)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        records = [json.loads(line) for line in out.splitlines() if line.strip()]
        ids += [r["run"]["run_id"] for r in records if r["type"] == "run"]
        rows += [r["history"]["item"] for r in records if r["type"] == "history"]
    return ids, rows


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    state = json.loads((run / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(state["tracking_uri"])
    return client, client.get_run(state["run_id"])


def jsonl(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_curve(run: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in jsonl(run) if key in r]


def assert_curve(found: list[tuple[int, float]], expected: list[tuple[int, float]], what: str) -> None:
    assert [s for s, _ in found] == [s for s, _ in expected], what
    for (_, got), (_, want) in zip(found, expected):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), what  # TensorBoard stores float32


@pytest.mark.slow
def test_three_trackers_with_eval_and_one_resume_show_one_curve(fashion_extractor, train_root: Path, cli,
                                                                tmp_path: Path) -> None:
    needs("tensorboard", "wandb", "mlflow")
    out = tmp_path / "run"
    common = ["--data-root", train_root, *RUN_ARGS, "--eval-every", "1", "--eval-samples", "100",
              "--logger", "tensorboard,wandb,mlflow", "--out", out]
    first = cli("run", *common, "--max-steps", "8")
    assert first.exit_code == 0, first.output
    second = cli("run", *common, "--max-steps", "16", "--resume", "auto")
    assert second.exit_code == 0, second.output

    records = jsonl(out)
    loss_steps = [s for s, _ in expected_curve(out, "loss_d")]
    assert loss_steps == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [s for s, _ in expected_curve(out, "fd")] == [8, 16]

    # TensorBoard: one run folder, every metric a continuous curve equal to metrics.jsonl, grids as images,
    # the config in the hparams plugin
    tb, images, acc = tensorboard_scalars(out)
    for key, name in (("loss_d", "train/loss_d"), ("loss_g", "train/loss_g"), ("d_real", "train/d_real"),
                      ("d_fake", "train/d_fake"), ("images_per_s", "perf/images_per_s"),
                      ("d_step_ms", "time/d_step_ms"), ("fd", "quality/fd"), ("kid_mean", "quality/kid_mean"),
                      ("precision", "quality/precision"), ("coverage", "quality/coverage"),
                      ("classifier_score", "quality/classifier_score")):
        assert_curve(tb[name], expected_curve(out, key), f"tensorboard {name}")
    assert images == [0, 4, 8, 12, 16]
    assert [p.name for p in (out / "tb").iterdir()] and all(p.is_file() for p in (out / "tb").iterdir())
    hparams = acc.PluginTagToContent("hparams")
    start = hparams["_hparams_/session_start_info"]  # the preset and what differs from it, not every field
    assert b"fashion32" in start and b"model.ngf" in start and b"optim.lr_g" not in start

    # W&B: two offline segments of one run id, steps never repeated, values as metrics.jsonl
    ids, rows = wandb_history(out)
    assert len(ids) == 2 and len(set(ids)) == 1
    for key, name in (("loss_d", "train/loss_d"), ("fd", "quality/fd"), ("coverage", "quality/coverage")):
        found = [(row["_step"], row[name]) for row in rows if name in row]
        assert_curve(found, expected_curve(out, key), f"wandb {name}")
    steps = [row["_step"] for row in rows]
    assert len(steps) == len(set(steps)) and steps == sorted(steps)
    assert [row["_step"] for row in rows if "samples/fixed_noise._type" in row
            or "samples/fixed_noise.path" in row] == [0, 4, 8, 12, 16]

    # MLflow: one run, finished, the config as params, each metric's history equal to metrics.jsonl
    client, run = mlflow_run(out)
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr_g"] == "0.0002" and run.data.params["run.max_steps"] == "8"
    assert run.data.tags.get("changed.run.max_steps") == "8 -> 16"  # params are immutable: the change is a tag
    for key, name in (("loss_d", "train/loss_d"), ("fd", "quality/fd"), ("density", "quality/density")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, name))
        assert_curve(history, expected_curve(out, key), f"mlflow {name}")
    assert len(client.search_runs([run.info.experiment_id])) == 1
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert samples == [f"samples/step_{s:06d}.png" for s in (0, 4, 8, 12, 16)]  # step 0: the untrained generator
    assert records[-1]["step"] == 16


@pytest.mark.slow
def test_resume_after_a_crash_has_no_duplicated_or_missing_steps(tiny_cfg, quiet_console,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run dies at step 11, after logging step 10 but with its last checkpoint at step 8 (the epoch end):
    the resumed run trains 9-16 again. TensorBoard purges the dead process's step 10; W&B and MLflow, which
    cannot delete, keep it and the resumed run logs from step 12 on (said in one log line)."""
    needs("tensorboard", "wandb", "mlflow")
    from gantrain.engine.gan.step import GANStep
    from gantrain.engine.train.loop import Trainer

    cfg = tiny_cfg("crash", limit=256, max_steps=16, log_every=2, sample_every=0, logger="tensorboard,wandb,mlflow")
    trainer = Trainer(cfg, console=quiet_console)
    original, steps = GANStep.__call__, []

    def dying(self, real):
        if len(steps) == 10:  # the 11th step
            raise RuntimeError("simulated crash")
        steps.append(1)
        return original(self, real)

    monkeypatch.setattr(GANStep, "__call__", dying)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit()
    monkeypatch.setattr(GANStep, "__call__", original)
    run = cfg.run_dir
    assert json.loads((run / "trackers.json").read_text())["mlflow"]["last_step"] == 10

    records: list[str] = []
    monkeypatch.setattr("gantrain.engine.outputs.trackers.log.warning", lambda msg, *a: records.append(msg % a))
    Trainer(cfg, console=quiet_console, resume="auto").fit()
    assert any("keeps steps 9-10" in r for r in records), records

    truth = [s for s, _ in expected_curve(run, "loss_d")]
    assert truth == [2, 4, 6, 8, 10, 12, 14, 16]
    tb, _, _ = tensorboard_scalars(run)
    assert_curve(tb["train/loss_d"], expected_curve(run, "loss_d"), "tensorboard after a crash")
    _, rows = wandb_history(run)
    wandb_steps = [row["_step"] for row in rows if "train/loss_d" in row]
    assert wandb_steps == truth  # step 10 once: the dead segment's
    client, mlrun = mlflow_run(run)
    assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, "train/loss_d")) == truth
    # status of the dead segment was KILLED; the resumed run finished it
    assert mlrun.info.status == "FINISHED"


def test_tensorboard_logger_in_a_tiny_run(tiny_cfg, quiet_console) -> None:
    """The CI-cheap check: TensorBoard alone, scalars equal to metrics.jsonl, the final grid as an image."""
    needs("tensorboard")
    from gantrain.engine.train.loop import Trainer

    cfg = tiny_cfg("tb", max_steps=4, log_every=1, logger="tensorboard")
    Trainer(cfg, console=quiet_console).fit()
    tb, images, _ = tensorboard_scalars(cfg.run_dir)
    assert_curve(tb["train/loss_g"], expected_curve(cfg.run_dir, "loss_g"), "loss_g")
    assert images == [4]  # no grid during the run (--sample-every 0): the final one
    assert not (cfg.run_dir / "wandb").exists() and not (cfg.run_dir / "mlflow.db").exists()


def test_no_logger_writes_no_tracker_files(tiny_cfg, quiet_console) -> None:
    from gantrain.engine.train.loop import Trainer

    cfg = tiny_cfg("plain", max_steps=2)
    assert cfg.logging.logger == ()
    Trainer(cfg, console=quiet_console).fit()
    assert not any((cfg.run_dir / name).exists() for name in ("tb", "wandb", "mlflow.db", "trackers.json"))


def test_an_mlflow_run_resumed_without_its_tracking_uri_continues_in_its_store(tiny_cfg, quiet_console, tmp_path,
                                                                               monkeypatch) -> None:
    """Before: a run started with $MLFLOW_TRACKING_URI and resumed without it failed with "Run with id=... not
    found" and left an empty mlflow.db, although trackers.json recorded the URI."""
    needs("mlflow")
    from gantrain.engine.train.loop import Trainer

    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    monkeypatch.chdir(tmp_path)  # MLflow puts the artifacts of a store given by URI under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)
    cfg = tiny_cfg("mlflow-uri", max_steps=2, log_every=1, logger="mlflow")
    Trainer(cfg, console=quiet_console).fit()
    first = json.loads((cfg.run_dir / "trackers.json").read_text())["mlflow"]
    assert first["tracking_uri"] == elsewhere
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    from gantrain.engine.config import override

    Trainer(override(cfg, {"max_steps": 4}), console=quiet_console, resume="auto").fit()
    state = json.loads((cfg.run_dir / "trackers.json").read_text())["mlflow"]
    assert state["run_id"] == first["run_id"] and state["tracking_uri"] == elsewhere
    assert not (cfg.run_dir / "mlflow.db").exists()
    client, run = mlflow_run(cfg.run_dir)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_g")] == [1, 2, 3, 4]
    assert "continuing run" in (cfg.run_dir / "train.log").read_text()


def test_a_copied_run_folder_resumes_into_its_own_mlflow_store(tiny_cfg, quiet_console, tmp_path, monkeypatch) -> None:
    """The default store is the run folder's own mlflow.db: a copy resumed with --out copy continues the run in the
    copy's database, never in the original folder's."""
    needs("mlflow")
    import shutil

    from gantrain.engine.config import override
    from gantrain.engine.train.loop import Trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg("mlflow-own", max_steps=2, log_every=1, logger="mlflow")
    Trainer(cfg, console=quiet_console).fit()
    original = (cfg.run_dir / "mlflow.db").read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(cfg.run_dir, copy)
    Trainer(override(cfg, {"max_steps": 4, "out": str(copy)}), console=quiet_console, resume="auto").fit()
    assert (cfg.run_dir / "mlflow.db").read_bytes() == original  # the original's store untouched
    client, run = mlflow_run(copy)
    assert json.loads((copy / "trackers.json").read_text())["mlflow"]["tracking_uri"] == \
        f"sqlite:///{(copy / 'mlflow.db').resolve()}"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_g")] == [1, 2, 3, 4]
