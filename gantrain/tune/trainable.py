"""One Tune trial: a normal gantrain training run that reports quality metrics and checkpoints to Ray.

The trial builds its config from the experiment's base config and the trial's sampled values, trains with
the engine's :class:`~gantrain.engine.train.loop.Trainer`, and after every ``--eval-every`` epochs (every epoch
when 0) evaluates the generator (FD and the other metrics of
:func:`gantrain.engine.metrics.evaluate_generator`) and calls ``tune.report`` with the metrics, the losses
and a checkpoint. That checkpoint is a regular gantrain
checkpoint file, so ``gantrain generate`` reads it and a restored trial (a retry after an error, ASHA's
paused trials, or PBT's exploit step copying a donor) resumes G, D and both optimisers from it.

A diverged trial (non-finite weights or losses, or a D loss collapsed to ~0 for ``collapse_patience``
epochs) reports once more, with ``diverged`` naming why, and ends cleanly: the experiment goes on.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

from gantrain.engine import (CheckpointError, Config, DistInfo, GantrainError, Interrupted, METRIC_KEYS, RunDir,
                             Trainer, atomic_save, evaluate_generator, from_dict, load_checkpoint, log, override,
                             rebuild, sealed, worker_main)
from gantrain.tune.settings import TuneSettings

CHECKPOINT_FILE = "checkpoint.pt"
RUN_FOLDER = "run"
QUALITY_KEYS = METRIC_KEYS  # what evaluate_generator returns (besides the class histogram)
LOSS_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")
REFUSED = "refused"  # the report of a trial whose run was refused (its reason)

Report = Callable[[dict[str, Any], Path | None], None]


def trial_epochs(base: Config, settings: TuneSettings) -> int:
    """Epochs each trial trains: --max-epochs, else the config's --epochs."""
    return settings.max_epochs or base.run.epochs


def report_every(cfg: Config) -> int:
    """Epochs between reports: the run's --eval-every, where 0 (no evaluation in a plain run) means every epoch."""
    return max(1, cfg.eval.eval_every)


def trial_config(base: dict[str, Any], params: dict[str, Any], settings: TuneSettings, run_dir: Path) -> Config:
    """The base config with the trial's values, its own folder and device, and the experiment's budget."""
    cfg = from_dict(base)
    device = "cuda" if settings.gpus_per_trial > 0 else "cpu"
    budget = {"epochs": trial_epochs(cfg, settings), "max_steps": 0, "out": str(run_dir), "device": device,
              "checkpoint_every": 0, "keep_checkpoints": 1}  # Tune keeps the checkpoints
    return override(cfg, {**{k: _plain(v) for k, v in params.items()}, **budget})


def _plain(value: Any) -> Any:
    """Searchers may sample numpy scalars; the config accepts Python numbers only."""
    return value.item() if hasattr(value, "item") else value


class DivergenceMonitor:
    """Names why a trial has diverged, or returns None: non-finite weights or losses, or a collapsed D."""

    def __init__(self, collapse_loss: float, patience: int) -> None:
        self.collapse_loss, self.patience = collapse_loss, patience
        self.collapsed_epochs = 0

    def check(self, trainer: Trainer) -> str | None:
        if not all(bool(torch.isfinite(p).all()) for m in (trainer.gan.g, trainer.gan.d) for p in m.parameters()):
            return "non-finite weights"
        losses = [trainer.epoch_means.get(k) for k in ("loss_d", "loss_g")]  # the epoch's, not the last log's
        if any(v is not None and not math.isfinite(v) for v in losses):
            return "non-finite loss"
        loss_d = losses[0]
        self.collapsed_epochs = self.collapsed_epochs + 1 if loss_d is not None and loss_d < self.collapse_loss else 0
        if self.collapsed_epochs >= self.patience:
            return f"D loss below {self.collapse_loss:g} for {self.collapsed_epochs} epochs"
        return None


def evaluate(trainer: Trainer, num_samples: int) -> dict[str, float]:
    """The quality metrics of the sampling generator (the EMA one when on), as a plain run's --eval-every
    measures it: the same noise (the run's seed), so `gantrain run --config best.toml` logs the FD its trial
    reported; evaluate_generator leaves the model's mode and BatchNorm statistics as they were."""
    model = trainer.gan.generator
    metrics = evaluate_generator(model, trainer.cfg, num_samples=num_samples, device=trainer.device,
                                 seed=trainer.cfg.run.seed)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def worst_metrics(settings: TuneSettings) -> dict[str, float]:
    """What a trial with non-finite weights reports: no metric can be computed, the objective ranks last."""
    metrics = {k: math.nan for k in QUALITY_KEYS}
    metrics[settings.metric] = math.inf if settings.mode == "min" else -math.inf
    return metrics


class EpochReporter:
    """The Trainer's epoch callback: divergence check, evaluation, checkpoint and report."""

    def __init__(self, settings: TuneSettings, report: Report, cfg: Config) -> None:
        self.settings, self.report = settings, report
        self.total_epochs, self.every, self.samples = cfg.run.epochs, report_every(cfg), cfg.eval.eval_samples
        self.monitor = DivergenceMonitor(settings.collapse_loss, settings.collapse_patience)

    def after_epoch(self, trainer: Trainer, epochs_done: int) -> str | None:
        """Reports when due (or diverged); returns why the trial stops early: its divergence."""
        diverged = self.monitor.check(trainer)
        due = epochs_done % self.every == 0 or epochs_done >= self.total_epochs
        if not (due or diverged):
            return None
        finite = diverged not in ("non-finite weights", "non-finite loss")
        metrics = evaluate(trainer, self.samples) if finite else worst_metrics(self.settings)
        if finite:
            self._record(trainer, epochs_done, metrics)
        metrics.update(self._training_metrics(trainer, epochs_done), diverged=diverged or "")
        if diverged:
            self.report(metrics, None)  # nothing worth resuming or copying: no checkpoint
            return f"diverged: {diverged}"
        with tempfile.TemporaryDirectory(prefix="gantrain-trial-") as folder:
            save_trial_checkpoint(trainer, Path(folder))
            self.report(metrics, Path(folder))  # Tune persists the folder before report returns
        return None

    def _record(self, trainer: Trainer, epochs_done: int, metrics: dict[str, float]) -> None:
        """The evaluation as a plain run's --eval-every writes it: into the trial's metrics.jsonl and its
        --logger trackers, so `tensorboard --logdir <experiment>` compares the trials' quality curves."""
        record = {"step": trainer.step, "epoch": epochs_done, **{k: round(v, 6) for k, v in metrics.items()},
                  "eval_samples": self.samples, "time": time.time()}
        trainer.outputs.write(record)  # metrics.jsonl and the --logger trackers

    @staticmethod
    def _training_metrics(trainer: Trainer, epochs_done: int) -> dict[str, float]:
        values = {k: float(v) for k, v in trainer.epoch_means.items() if k in LOSS_KEYS}
        if "images_per_s" in trainer.last_record:  # throughput of the last log window
            values["images_per_s"] = float(trainer.last_record["images_per_s"])
        return {**values, "epoch": epochs_done, "step": trainer.step}


def save_trial_checkpoint(trainer: Trainer, folder: Path) -> Path:
    """A gantrain checkpoint (the format ``gantrain generate`` and ``--resume`` read) in ``folder``."""
    path = folder / CHECKPOINT_FILE
    atomic_save(sealed(trainer.state_dict()), path)
    return path


def apply_hyperparameters(trainer: Trainer) -> None:
    """After a restore, the optimisers carry the checkpoint's learning rates and betas; PBT may have
    changed them, so the trial's config wins. (Label smoothing is read from the config at construction.)"""
    optim = trainer.cfg.optim
    for opt, lr in ((trainer.gan.opt_g, optim.lr_g), (trainer.gan.opt_d, optim.lr_d)):
        for group in opt.param_groups:
            group["lr"] = lr
            group["betas"] = (optim.beta1, optim.beta2)


def run_trial(cfg: Config, settings: TuneSettings, report: Report, resume: Path | str | None = None,
              info: DistInfo = DistInfo(), record: Callable[[Any], None] = lambda _record: None) -> str | None:
    """Trains one trial to the end of its budget (or divergence) in this process, which is the whole trial or,
    under a multi-worker trial, its rank ``info.rank``; returns the reason it stopped early.

    Every rank calls ``report`` at the same epochs (Ray Train wants as many reports from each); rank 0 alone
    owns the run folder (clears a failed attempt's checkpoints, removes them at the end: Tune holds them)."""
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    if resume is None and info.is_main:  # a fresh start in a folder a failed attempt may have used
        shutil.rmtree(RunDir(cfg.run_dir).checkpoints, ignore_errors=True)
    reporter = EpochReporter(settings, report, cfg)
    if info.enabled:
        reporter.monitor.check = _rank0_decides(reporter.monitor.check)

    def start(trainer: Trainer) -> None:
        if resume is not None:
            apply_hyperparameters(trainer)
        if trainer.step >= trainer.total_steps:  # restored with its budget spent: report where it stands
            trainer.stop_reason = reporter.after_epoch(trainer, trainer.step // trainer.loader.steps_per_epoch)

    with open(os.devnull, "w") as sink:  # the trial's log still goes to <run>/train.log
        # the engine's one worker body, as `gantrain run` runs it in one process or in each DDP worker
        # The reporter evaluates (the Trainer's own --eval-every tracker would evaluate the same generator again
        # and keep best.pt copies of what Tune already checkpoints) and stops diverged trials.
        result = worker_main(cfg, info, resume=str(resume) if resume else None, console=Console(file=sink),
                             hooks=[reporter], on_start=start, finished_ok=True, record=record,
                             evaluation=False, divergence_watch=False)
    if info.is_main:  # Tune holds the trial's checkpoints; the run folder keeps samples, curves and logs only
        shutil.rmtree(RunDir(cfg.run_dir).checkpoints, ignore_errors=True)
    return result.stop_reason


def _rank0_decides(check: Callable[[Trainer], str | None]) -> Callable[[Trainer], str | None]:
    """Each rank's epoch losses are its own shard's: rank 0's verdict for all, or the ranks would stop at
    other epochs."""
    import torch.distributed as dist

    def agreed(trainer: Trainer) -> str | None:
        verdict = [check(trainer)]
        dist.broadcast_object_list(verdict, src=0, group=trainer.stop_agreement.group)
        return verdict[0]

    return agreed


def trial_folder_name(trial_id: str) -> str:
    """Short trial folder names (Ray's default appends every sampled value)."""
    return f"trial_{trial_id}"


def train_trial(params: dict[str, Any], *, base: dict[str, Any], settings: TuneSettings, experiment: str) -> None:
    """The Ray Tune function trainable (bound to ``base``, ``settings`` and the experiment folder with
    ``tune.with_parameters``).

    The run folder is ``<experiment>/trial_<id>/run`` itself, not one in Ray's temporary working folder that
    Ray copies over at each report: the storage is a (shared) filesystem, so the trial writes its samples,
    metrics.jsonl and train.log where they stay, and a resumed trial continues the same files.
    """
    from ray import tune

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    trial_dir = Path(experiment) / trial_folder_name(tune.get_context().get_trial_id())
    try:
        cfg = trial_config(base, params, settings, trial_dir / RUN_FOLDER)
        given = tune.get_checkpoint()
        if settings.workers_per_trial > 1:
            # a restarted trial continues from the newest checkpoint its Train job kept (Tune holds only paths)
            run_trial_on_workers(cfg, settings, trial_dir, newest_checkpoint(None, trial_dir / TRAIN_FOLDER))
            return
        resume = newest_checkpoint(Path(given.path) if given is not None else None, trial_dir)
        run_trial(cfg, settings, report, resume)
    except GantrainError as exc:
        if not exc.final or isinstance(exc, Interrupted):
            raise
        # What no retry cures (its sampled values make a run that cannot start: a batch larger than the data): one
        # report saying why, ranking last, and the trial ends; raised, Tune would retry it --max-failures times.
        tune.report({**worst_metrics(settings), REFUSED: str(exc)})


TRAIN_FOLDER = "train"  # a multi-worker trial's Ray Train storage, inside the trial folder


def run_trial_on_workers(cfg: Config, settings: TuneSettings, trial_dir: Path, resume: Path | None) -> None:
    """The trial as a Ray Train DDP job (Tune drives the TorchTrainer): its rank 0 reports to Train, and Train's
    TuneReportCallback passes the reports on to this trial."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray.util.queue import Queue

    resources = {"CPU": settings.cpus_per_trial, **({"GPU": settings.gpus_per_trial} if settings.gpus_per_trial else {})}
    refusals = Queue(actor_options={"num_cpus": 0})  # rank 0's refusal, as (class name, message, exit code)
    job = TorchTrainer(ddp_trial_worker,
                       train_loop_config={"cfg": cfg.to_dict(), "settings": settings,
                                          "resume": str(resume) if resume else None, "refusals": refusals},
                       scaling_config=ScalingConfig(num_workers=settings.workers_per_trial,
                                                    use_gpu=settings.gpus_per_trial > 0,
                                                    resources_per_worker=resources),
                       torch_config=TorchConfig(timeout_s=max(1, round(60 * cfg.dist.dist_timeout))),
                       run_config=RunConfig(name=TRAIN_FOLDER, storage_path=str(trial_dir),
                                            callbacks=[TuneReportCallback()]))
    try:
        job.fit()
        if refusals.qsize():  # every worker refused alike and returned (raised, Ray would call it a failure)
            raise rebuild(*refusals.get_nowait())
    finally:
        refusals.shutdown()


def ddp_trial_worker(config: dict[str, Any]) -> None:
    """One DDP worker of a multi-worker trial: :func:`run_trial` on Ray Train's process group."""
    import ray.train

    ctx = ray.train.get_context()
    info = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        attach = folder is not None and info.is_main  # the replicas are identical: rank 0's checkpoint
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if attach else None)

    ended: list = []
    try:
        run_trial(from_dict(config["cfg"]), config["settings"], report, config["resume"], info, ended.append)
    except GantrainError as exc:
        if not (ended and ended[-1].outcome == "refused"):
            raise
        if info.is_main:  # the trial's driver says it (one report, no retry) as a one-worker trial does
            config["refusals"].put((type(exc).__name__, str(exc), exc.exit_code))


def newest_checkpoint(given: Path | None, trial_dir: Path) -> Path | None:
    """The checkpoint file a (re)started trial continues from.

    Ray hands over the checkpoint its experiment state recorded; a driver killed outright records the state
    only every so often, so a trial's newer checkpoints may be on disk but not in it (before, such trials
    restarted from an older one, or from scratch). The newest complete checkpoint written in the trial's own
    folder is where it really was. A checkpoint from another trial's folder is PBT's exploit step copying a
    donor: that one is the decision to follow.
    """
    if given is not None and given.resolve().parent != trial_dir.resolve():
        return given / CHECKPOINT_FILE
    own = sorted(trial_dir.glob(f"checkpoint_*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in own:
        try:
            load_checkpoint(path)  # a copy torn by the kill is skipped for the one before it
        except CheckpointError as exc:
            log.warning("skipping %s", exc)
            continue
        if given is None or path.parent.resolve() != given.resolve():
            log.info("resuming from %s, newer than the experiment state's %s", path, given or "none")
        return path
    return given / CHECKPOINT_FILE if given is not None else None
