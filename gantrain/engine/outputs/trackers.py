"""Experiment trackers (``--logger tensorboard,wandb,mlflow``): the dashboards users already have.

Every tracker is fed from the records the Trainer writes to metrics.jsonl (which stays the source of truth),
at the moments it writes them: the training statistics every ``--log-every`` steps, the quality metrics at
``--eval-every`` epochs, each fixed-noise sample grid as it is saved, the resolved config at start and the
final values at the end. Nothing here reads a device tensor, so no host sync is added to the training loop.
Only rank 0 builds trackers.

* **tensorboard** (the ``tensorboard`` extra): event files in ``<run>/tb/``; scalars, the sample grids as
  images, in the hparams plugin the preset and the fields whose value differs from it (:func:`changed_config`;
  the scalar tags as its metrics). A resumed run writes into the same folder with ``purge_step`` = the first new
  step, so TensorBoard drops whatever an interrupted process logged after the checkpoint it resumes from: one
  continuous curve, as metrics.jsonl has.
* **wandb** (the ``wandb`` extra): offline unless ``WANDB_MODE`` says otherwise (no key needed; ``wandb sync
  <run>/wandb/offline-run-*`` uploads later); files under ``<run>/wandb/``; the config as the W&B config, the
  final values in the run summary. A resumed run continues the same run id.
* **mlflow** (the ``mlflow`` extra): the tracking URI ``$MLFLOW_TRACKING_URI`` when set, else a SQLite store
  ``<run>/mlflow.db`` with artifacts (the sample grids) in ``<run>/mlartifacts``: one file, no server, and it
  travels with the run folder (``mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db``). Not the plain
  ``mlruns`` file store: MLflow 3 refuses it by default (maintenance mode). The config as params, metrics
  with the training step. A resumed run continues the same run id.

W&B and MLflow cannot delete logged points, so after a crash (no checkpoint at the last logged step) a
resumed run does not log again the steps those trackers already hold: each tracker's last logged step is kept
in ``<run>/trackers.json``, and the overlap is said in one log line. TensorBoard purges them instead.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gantrain.engine.config import Config, preset, shown
from gantrain.engine.errors import ConfigError, GantrainError
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.files import atomic_write_text
from gantrain.engine.state.rundir import RunDir

LOGGERS = ("tensorboard", "wandb", "mlflow")
SAMPLES_TAG = "samples/fixed_noise"
_SKIP = {"step", "time", "nonfinite", "eval_samples"}
QUALITY_KEYS = ("fd", "kid_mean", "kid_std", "precision", "recall", "density", "coverage", "classifier_score",
                "best_fd", "inception_fid", "inception_kid_mean", "inception_kid_std")
HPARAM_METRICS = ("train/loss_d", "train/loss_g", "quality/fd", "quality/precision", "quality/recall",
                  "quality/coverage")


class TrackerError(GantrainError):
    """A tracker that could not start or write (its library's own error, in one line); often its server out of
    reach for a while, so not ``final``: a multi-process launch may restart for it."""

    final = False


class MissingExtra(GantrainError):
    """A --logger whose package is not installed (or cannot be imported)."""


def parse_loggers(loggers: str | Sequence[str]) -> list[str]:
    """``"tensorboard, wandb"`` (or the names as a sequence) -> ["tensorboard", "wandb"]; ``none`` or empty -> [].
    Raises ConfigError."""
    items = loggers.split(",") if isinstance(loggers, str) else list(loggers)
    names = [n.strip().lower() for n in items if n.strip()]
    if names == ["none"]:
        return []
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise ConfigError(f"--logger: must be none or a comma list of {', '.join(LOGGERS)}, got {bad[0]!r}")
    return list(dict.fromkeys(names))


def tag(key: str) -> str | None:
    """The dashboard name of a metrics.jsonl key: grouped as train/, time/, perf/, quality/ (None: not logged)."""
    if key in _SKIP:
        return None
    if key in QUALITY_KEYS or key.startswith("inception_"):
        return f"quality/{key}"
    if key.startswith("hist_"):
        return f"quality/class_share/{key.removeprefix('hist_')}"
    if key.endswith("_ms") or key in ("eval_s",):
        return f"time/{key}"
    if key == "images_per_s":
        return "perf/images_per_s"
    if key.startswith("ddp_"):
        return f"ddp/{key}"
    return f"train/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The loggable numbers of a record under their tags (bools and strings are left out)."""
    out = {}
    for key, value in record.items():
        name = tag(key)
        if name is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def flat_config(cfg: Config) -> dict[str, Any]:
    """{'optim.lr_g': 0.0002, ...}: the resolved config as hyperparameters (None as '')."""
    flat: dict[str, Any] = {"preset": cfg.preset}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": ("" if v is None else shown(v)) for k, v in values.items()})
    return flat


def changed_config(cfg: Config) -> dict[str, Any]:
    """{'preset': 'fashion32', 'optim.lr_g': 0.001, ...}: the preset's name and the fields (named and shown as
    :func:`flat_config` does) whose value differs from that preset's (``config.preset(cfg.preset)``); a preset
    gantrain does not know (any more) is compared as the field defaults."""
    try:
        base = preset(cfg.preset)
    except ConfigError:
        base = Config(preset=cfg.preset)
    ours, theirs = flat_config(cfg), flat_config(base)
    return {"preset": cfg.preset, **{k: v for k, v in ours.items() if k != "preset" and theirs.get(k) != v}}


def _require(module: str, extra: str):
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:  # a broken install raises anything, not only ImportError
        what = "is not installed" if isinstance(exc, ModuleNotFoundError) else f"cannot be imported ({type(exc).__name__})"
        raise MissingExtra(f"--logger {extra}: {module.split('.')[0]} {what}; pip install 'gantrain[{extra}]'") from None


class _Tracker:
    name = ""

    def config(self, hparams: dict[str, Any]) -> None: ...

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def image(self, step: int, path: Path) -> None: ...

    def finish(self, final: dict[str, float], ok: bool) -> None: ...


class TensorBoardTracker(_Tracker):
    name = "tensorboard"

    def __init__(self, folder: Path, first_step: int) -> None:
        _require("tensorboard", "tensorboard")
        module = _require("torch.utils.tensorboard", "tensorboard")
        # purge_step: TensorBoard discards events of earlier files at and after it, i.e. what an interrupted
        # process logged past the checkpoint this run resumes from; for a fresh run (step 1) whatever an earlier
        # run without a checkpoint left in the folder (a tune trial's failed attempt, say)
        self.writer = module.SummaryWriter(str(folder), purge_step=first_step)
        self.folder = folder

    def config(self, hparams: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
        experiment, start, _ = hparams_summary(values, {name: 0.0 for name in HPARAM_METRICS})
        for summary in (experiment, start):
            self.writer.file_writer.add_summary(summary)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def image(self, step: int, path: Path) -> None:
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(SAMPLES_TAG, pixels, step, dataformats="HWC")

    def finish(self, final: dict[str, float], ok: bool) -> None:
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        if ok:
            _, _, end = hparams_summary({}, {})
            self.writer.file_writer.add_summary(end)
        self.writer.close()


class WandbTracker(_Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, run_id: str | None, hparams: dict[str, Any]) -> None:
        wandb = _require("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE") or "offline"
        if not os.environ.get("WANDB_MODE"):
            log.info("W&B: logging offline to %s (no key needed; set WANDB_MODE=online to log live, or upload "
                     "later with `wandb sync`)", RunDir(run_dir).wandb)
        settings = wandb.Settings(console="off", x_disable_stats=True, disable_git=True, save_code=False, silent=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "gantrain", dir=str(run_dir), id=run_id,
                              resume="allow" if run_id else None, name=run_dir.name, mode=mode, config=hparams,
                              settings=settings, reinit="create_new")
        self.run_id = self.run.id
        self.wandb = wandb

    def config(self, hparams: dict[str, Any]) -> None:
        self.run.config.update(hparams, allow_val_change=True)  # a resume's changed settings win, as in the run

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, path: Path) -> None:
        self.run.log({SAMPLES_TAG: self.wandb.Image(str(path))}, step=step)

    def finish(self, final: dict[str, float], ok: bool) -> None:
        self.run.summary.update(final)
        self.run.finish(exit_code=0 if ok else 1)


class MlflowTracker(_Tracker):
    name = "mlflow"

    def __init__(self, run_dir: Path, run_id: str | None, recorded_uri: str | None = None) -> None:
        """``recorded_uri``: the tracking URI trackers.json holds for the run ``run_id`` continues; the run lives
        there, so a resume uses it whatever $MLFLOW_TRACKING_URI says now (said in one line when they differ)."""
        _require("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        import logging

        for name in ("mlflow", "alembic"):  # their INFO lines (database set-up) would break the progress bar
            logging.getLogger(name).setLevel(logging.WARNING)
        own_db = f"sqlite:///{RunDir(run_dir.resolve()).mlflow_db}"
        here = os.environ.get("MLFLOW_TRACKING_URI") or own_db
        if recorded_uri and recorded_uri.startswith("sqlite:///") and \
                Path(recorded_uri.removeprefix("sqlite:///")).name == RunDir(run_dir).mlflow_db.name:
            recorded_uri = own_db  # a run folder's own store travels with the folder (copied or moved)
        self.uri = recorded_uri if run_id is not None and recorded_uri else here
        if self.uri != here:
            log.warning("--logger mlflow: continuing run %s in the store it was started in (%s), not %s", run_id,
                        self.uri, "$MLFLOW_TRACKING_URI's " + here if os.environ.get("MLFLOW_TRACKING_URI") else here)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.params = dict(self.client.get_run(run_id).data.params)
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "gantrain"
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found else self.client.create_experiment(
                name, artifact_location=None if os.environ.get("MLFLOW_TRACKING_URI")
                else RunDir(run_dir.resolve()).mlflow_artifacts.as_uri())
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            self.params = {}

    def config(self, hparams: dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        values = {k: str(v) for k, v in hparams.items()}
        new = [Param(k, v) for k, v in values.items() if k not in self.params]
        # MLflow params cannot change once logged: a resume's changed setting is kept as a tag
        changed = [RunTag(f"changed.{k}", f"{self.params[k]} -> {v}") for k, v in values.items()
                   if k in self.params and self.params[k] != v]
        for start in range(0, len(new), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)
        self.params.update(values)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def image(self, step: int, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=RunDir(Path(".")).samples.name)  # as in the run folder

    def finish(self, final: dict[str, float], ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "KILLED")


class Trackers:
    """The run's trackers, fed from metrics.jsonl records; empty (and free) with ``--logger none``.

    Raises :class:`MissingExtra` naming the extra to install when a tracker's package is absent, and
    :class:`ConfigError` for an unknown --logger name."""

    def __init__(self, cfg: Config, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.names = parse_loggers(cfg.logging.logger)
        self.run_dir = run_dir
        self.trackers: list[_Tracker] = []
        self.finished = False
        if not self.names:
            return
        self.state_path = RunDir(run_dir).trackers
        state = self._read_state() if resume_step is not None else {}
        self.last_step: dict[str, int] = {}
        # Steps an earlier (crashed) process already logged past the resumed checkpoint, per tracker that cannot
        # delete them: this process logs only after them.
        self.skip_through: dict[str, int] = {}
        first_step = (resume_step or 0) + 1
        hparams = flat_config(cfg)  # W&B's config and MLflow's params: every field, searchable there
        changed = changed_config(cfg)  # TensorBoard's hparams table: a column per key, so only what differs
        overlap = []
        for name in self.names:
            saved = state.get(name, {})
            last = int(saved.get("last_step", 0))
            if resume_step is not None and last > resume_step and name != "tensorboard":
                overlap.append(f"{name} keeps steps {resume_step + 1}-{last}")
                self.skip_through[name] = last
            self.last_step[name] = max(last, resume_step or 0) if resume_step is not None else 0
            run_id = saved.get("run_id") if resume_step is not None else None
            try:
                if name == "tensorboard":
                    tracker: _Tracker = TensorBoardTracker(RunDir(run_dir).tensorboard, first_step)
                elif name == "wandb":
                    tracker = WandbTracker(run_dir, run_id, hparams)
                else:
                    tracker = MlflowTracker(run_dir, run_id, saved.get("tracking_uri"))
                self.trackers.append(tracker)
                tracker.config(changed if name == "tensorboard" else hparams)
            except GantrainError:
                self.finish({}, ok=False)
                raise
            except Exception as exc:  # any library's failure to start is one line naming the tracker
                self.finish({}, ok=False)
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise TrackerError(f"--logger {name}: could not start ({type(exc).__name__}: {first})") from None
        if overlap:
            log.warning("resume: %s logged before the interruption (W&B and MLflow cannot delete points); new values "
                        "are logged after them; metrics.jsonl holds this run's own", "; ".join(overlap))
        self._write_state()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (training statistics or an evaluation), at its ``step``."""
        if not self.trackers:
            return
        step, values = int(record["step"]), scalars(record)
        if not values:
            return
        for tracker in self.trackers:
            if step > self.skip_through.get(tracker.name, 0):
                tracker.scalars(step, values)
                self.last_step[tracker.name] = max(step, self.last_step.get(tracker.name, 0))
        self._write_state()

    def image(self, step: int, path: Path) -> None:
        """A fixed-noise sample grid, as saved to samples/ (step 0's too: the untrained generator)."""
        for tracker in self.trackers:
            if step > self.skip_through.get(tracker.name, -1):
                tracker.image(step, path)

    def finish(self, final: dict[str, Any], ok: bool = True) -> None:
        """The final values (the last training record and the last evaluation), then close every tracker."""
        if self.finished:
            return
        self.finished = True
        values = {k: v for k, v in scalars(final).items() if math.isfinite(v)}
        errors: list[BaseException] = []
        for tracker in self.trackers:
            try:
                tracker.finish(values, ok)
            except Exception as exc:  # every tracker gets closed even when one fails
                errors.append(exc)
        if self.trackers and hasattr(self, "state_path"):
            self._write_state()
        if errors:
            raise errors[0]

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable (%s); the trackers start new runs", self.state_path, exc)
            return {}
        return state if isinstance(state, dict) else {}

    def _write_state(self) -> None:
        state = {}
        for tracker in self.trackers:
            entry: dict[str, Any] = {"last_step": self.last_step.get(tracker.name, 0)}
            if isinstance(tracker, (WandbTracker, MlflowTracker)):
                entry["run_id"] = tracker.run_id
            if isinstance(tracker, MlflowTracker):
                entry["tracking_uri"] = tracker.uri
            state[tracker.name] = entry
        atomic_write_text(self.state_path, json.dumps(state, indent=1) + "\n")


def check_loggers(names: Sequence[str]) -> None:
    """Fails fast (before data and models are built) when a requested tracker's package is missing."""
    extra = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
    for name in names:
        _require(extra[name], name)
