"""The Trainer: wires the components of a run and runs its epochs; ``Trainer.fit`` reads as the table of contents.

What each component owns (docs/architecture.md): :class:`~gantrain.engine.step.GANStep` the models, optimisers and
the objective; :mod:`gantrain.engine.data` the batches; :class:`~gantrain.engine.checkpoint.Checkpointer` and
:class:`~gantrain.engine.checkpoint.Position` what is saved and where the run stands; :class:`RunOutputs` the run
folder, log, metrics and grids; the quality tracker the metrics. The Trainer holds the schedule, the signals and
the epoch callbacks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from gantrain.engine import checkpoint as ckpt
from gantrain.engine.config import Config
from gantrain.engine.data import Shard, build_loader
from gantrain.engine.data.plan import plan_schedule
from gantrain.engine.errors import CheckpointError, ConfigError, Interrupted
from gantrain.engine.files import RunLock, make_folder
from gantrain.engine.outputs import RunOutputs
from gantrain.engine.precision import PrecisionPolicy
from gantrain.engine.runlog import log, setup_logging
from gantrain.engine.runtime import DistInfo, StopAgreement, pick_device, stop_signals
from gantrain.engine.sampling import fixed_noise
from gantrain.engine.stats import NonFiniteWatch
from gantrain.engine.step import GANStep, replica_max_abs_diff


@dataclass
class FitResult:
    steps: int
    epochs_done: int
    run_dir: Path
    last_checkpoint: Path | None


class Trainer:
    def __init__(self, cfg: Config, *, console: Console | None = None, dist_info: DistInfo = DistInfo(),
                 resume: str | None = None, epoch_callbacks: Sequence[Callable[[Trainer, int], None]] = (),
                 finished_ok: bool = False) -> None:
        """``epoch_callbacks`` run after each completed epoch as ``callback(trainer, epochs_done)``; one may set
        ``trainer.stop_reason`` to end the run cleanly (final checkpoint and outputs still written).

        Rank 0 takes the run folder's lock here and holds it until :meth:`fit` ends (or :meth:`close`); nothing is
        written before the run is known to take a step. Raises :class:`RunLocked` (exit 2) when another run holds
        the folder, :class:`ConfigError` (exit 2) for a schedule of zero steps (too few images; a resume with
        nothing left, unless ``finished_ok``, which tune's restored trials use), :class:`RunIOError` when the
        folder cannot be written, :class:`CheckpointError` for a resume that cannot continue."""
        self.console, self.dist, self.finished_ok = console or Console(stderr=True), dist_info, finished_ok
        self.epoch_callbacks, self.stop_reason, self.last_eval = list(epoch_callbacks), None, {}
        self.epoch_means: dict = {}  # loss_d, loss_g, d_real, d_fake over the last whole epoch (epoch callbacks)
        self.run_dir, self.lock, notes = cfg.run_dir, RunLock(cfg.run_dir), []
        created = not self.run_dir.exists()
        if self.dist.is_main:  # one owner per run folder; under DDP rank 0 owns it for all ranks
            make_folder(self.run_dir, "--out")
            self.lock.acquire(notes.append)
        try:
            self._build(cfg, resume, notes)
        except BaseException:
            self.close()
            if created and self.dist.is_main:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()  # only when still empty: the lock file is gone with the lock
            raise

    def _build(self, cfg: Config, resume: str | None, notes: list[str]) -> None:
        self.resume_path = ckpt.find_resume(resume, cfg.run_dir) if resume else None
        state = ckpt.load_checkpoint(self.resume_path) if self.resume_path else None
        changes = ckpt.resumed_config(cfg, state, self.resume_path)
        if self.dist.is_main:
            if state is None and (self.run_dir / "checkpoints" / "last.pt").exists():
                raise ConfigError(f"--out: {self.run_dir} already holds a run; continue it with --resume auto "
                                  "or choose another --out")
            RunOutputs.check(cfg)
            setup_logging(self.console, pending=True)  # held until the run folder is written
        self.cfg = cfg
        self.device = pick_device(cfg.run.device, self.dist.local_rank)
        self.policy = PrecisionPolicy(self.device, cfg.perf.amp, cfg.perf.channels_last)
        self.loader = build_loader(cfg.data, cfg.run.seed, self.device, Shard(self.dist.rank, self.dist.world_size),
                                   policy=self.policy)
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        self.gan = GANStep(cfg, self.device, self.policy, self.dist)
        self.fixed_noise = fixed_noise(cfg.model.nz, cfg.loss.noise, cfg.run.seed, self.device)
        self.pos, self.best_fd = ckpt.Position(), None
        self.checkpoints = ckpt.Checkpointer(self.run_dir / "checkpoints", cfg.run.keep_checkpoints, self.dist.is_main,
                                             cfg.run.nonfinite_patience)
        self.watch, self.stop_signal = NonFiniteWatch(cfg.run.nonfinite_patience), None  # the signal this process got
        self.agreed_stop: int | None = None  # the one every rank acts on, at the same step (StopAgreement)
        self.stop_agreement = StopAgreement(self.dist.enabled)
        if state is not None:
            self.pos, self.best_fd = ckpt.restore(state, self.resume_path, self.gan, self.cfg, self.loader,
                                                  self.global_batch, changes, self.dist.is_main)
            self.checkpoints.last_finite = (Path(self.resume_path), self.step)
        low, high = self.stop_agreement.steps_agree(self.step)
        if low != high:  # ranks with other weights and optimiser states would train on, silently apart
            raise CheckpointError(f"the DDP ranks resumed from different steps ({low} to {high}): every node must "
                                  f"see the same {self.run_dir / 'checkpoints'} (a shared filesystem) to resume")
        self.save_pending, self.last_save_time, self.ranks_rng = False, time.monotonic(), None
        self.total_steps = plan_schedule(self.pos, cfg, self.loader.steps_per_epoch, self.run_dir, self.finished_ok)
        if self.dist.is_main:
            log.info("%s: %d images, %d steps/epoch, batch %d x %d processes = %d, %d steps in total",
                     cfg.data.dataset, self.loader.num_images, self.loader.steps_per_epoch, cfg.data.batch_size,
                     self.dist.world_size, self.global_batch, self.total_steps)
            log.info("device %s, %s, %s loader%s", self.device, self.policy.describe(), type(self.loader).__name__,
                     ", torch.compile" if cfg.perf.compile else "")
        self.outputs = RunOutputs(cfg, self.console, self.dist.is_main, self.dist.world_size)
        self.outputs.prepare(state is not None, notes, self.step)  # only now: a run with no step wrote nothing
        self.tracker = self._build_tracker()

    def close(self) -> None:
        """Closes the --logger trackers (unfinished unless :meth:`fit` finished them) and releases the run folder
        (its lock); :meth:`fit` does this itself when it ends, however it ends."""
        try:
            if hasattr(self, "outputs"):
                self.outputs.close()
        finally:
            self.lock.release()

    def _build_tracker(self):
        """Quality metrics every --eval-every epochs, on rank 0 (the extractor is fitted here when missing)."""
        if not self.cfg.run.eval_every or not self.dist.is_main:
            return None
        from gantrain.engine.metrics.tracking import QualityTracker

        return QualityTracker(self.cfg, self.device, self.console, best_fd=self.best_fd)

    # ----- the loop ------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Trains to ``total_steps``; releases the run folder when it ends, however it ends.

        Raises :class:`Interrupted` after SIGINT/SIGTERM, :class:`TrainingDiverged` when losses or weights go
        non-finite (see --nonfinite-patience), :class:`RunIOError` when a file cannot be written.
        """
        per_epoch = self.loader.steps_per_epoch
        try:
            with stop_signals(self._on_signal), self.outputs.live(self.step, self.total_steps, self.resume_path is not None):
                while self.step < self.total_steps:
                    if self.epoch_step < per_epoch:
                        self._train_epoch()
                    if self.agreed_stop is not None:  # every rank is at the same step: rank 0 saves
                        self.stop_agreement.close()
                        raise Interrupted(self.agreed_stop, checkpoint=self.save_checkpoint(), step=self.step)
                    if self.epoch_step >= per_epoch:
                        self.pos.epoch, self.pos.epoch_step = self.epoch + 1, 0
                        self.epoch_means = self.gan.stats.read_epoch()
                        self._end_epoch(self.epoch)
                    if self.stop_reason:
                        log.warning("stopping at step %d: %s", self.step, self.stop_reason)
                        break
            self.stop_agreement.close()
            return self._finish()
        finally:
            self.close()

    def _train_epoch(self) -> None:
        per_epoch = self.loader.steps_per_epoch
        self.outputs.start_window(self.step)
        batches = self.loader.epoch(self.epoch, self.epoch_step)
        while self.step < self.total_steps and self.agreed_stop is None:
            with self.gan.timer.phase("data"):
                real = next(batches, None)
            if real is None:
                break
            self.gan(real)
            self.pos.advance(self.global_batch)
            log_now, sample_now = self.outputs.due(self.step, self.total_steps)
            if log_now:
                self._log()
            if sample_now:
                self.write_samples()
            self.agreed_stop, save_now = self.stop_agreement.after_step(self.stop_signal, self._minutes_due())
            if self.agreed_stop is None and (save_now or self._steps_due()):  # a stop saves anyway
                if self.epoch_step < per_epoch:
                    self.save_checkpoint()
                else:  # the epoch's end saves it, after the epoch's metrics, as an epoch checkpoint
                    self.save_pending = True

    def _log(self) -> None:
        stats = self.gan.stats.read()
        first = self.outputs.log(self.step, self.epoch, stats, self.gan.timer.read_ms())
        diverged = self.watch.check(stats, first, self.step)
        if diverged:
            raise self.checkpoints.diverged(diverged)

    def _end_epoch(self, epochs_done: int) -> None:
        """Quality metrics, the checkpoint (it stores the best FD), best.pt when FD improved, the callbacks."""
        improved = self.tracker is not None and self.tracker.due(epochs_done) and self._evaluate_quality(epochs_done)
        if epochs_done % self.cfg.run.checkpoint_every == 0 or self.save_pending:
            self.save_checkpoint()
        if improved and not self.gan.non_finite_weights(collective=False):
            ckpt.save_best(self.run_dir / "checkpoints", self.step, self.state_dict)
        for callback in self.epoch_callbacks:
            callback(self, epochs_done)

    def _steps_due(self) -> bool:
        every = self.cfg.run.checkpoint_every_steps
        return bool(every) and self.step % every == 0

    def _minutes_due(self) -> bool:
        """This rank's clock; the ranks agree on the step to save at (StopAgreement)."""
        minutes = self.cfg.run.checkpoint_every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes

    def _evaluate_quality(self, epochs_done: int) -> bool:
        record, improved = self.tracker.evaluate(self.gan.generator, self.step, epochs_done)
        self.best_fd, self.last_eval = self.tracker.best_fd, record
        self.outputs.write(record)
        self.tracker.plot(self.run_dir)
        summary = self.tracker.summary(record)
        self.outputs.show_quality(summary)
        log.info("epoch %d: %s (%d samples, %.1f s)%s", epochs_done, summary, record["eval_samples"], record["eval_s"],
                 ", best so far: checkpoints/best.pt" if improved else "")
        return improved

    def _finish(self) -> FitResult:
        if self.checkpoints.saved_step != self.step:
            self.save_checkpoint()
        if self.dist.enabled:
            self.replica_max_abs_diff = replica_max_abs_diff([self.gan.g, self.gan.d])
            if self.dist.is_main:
                log.info("DDP: parameters of the %d replicas differ by at most %g", self.dist.world_size,
                         self.replica_max_abs_diff)
                self.outputs.write({"step": self.step, "ddp_replica_max_abs_diff": self.replica_max_abs_diff})
        if self.dist.is_main:
            self.outputs.write_final(self.gan.sample(self.fixed_noise), self.step)
        return FitResult(self.step, self.epoch, self.run_dir, self.last_checkpoint)

    # ----- state and samples ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint: the GAN step's state, the place in the data, the config, the best FD."""
        state = {**self.gan.state_dict(), **self.pos.state(self.global_batch, self.loader.num_images),
                 "config": self.cfg.to_dict(), "world_size": self.dist.world_size}
        if self.best_fd is not None:
            state["best_fd"] = self.best_fd
        if self.ranks_rng is not None and self.ranks_rng[0] == self.step:
            state["rng"] = {**state["rng"], "ranks": self.ranks_rng[1]}
        return state

    def save_checkpoint(self, collective: bool = True) -> Path | None:
        """A checkpoint now (rank 0), refused for non-finite weights (see :class:`Checkpointer`). ``collective``:
        all ranks are here at the same step (not so after a signal), so they can agree on the check."""
        non_finite = self.gan.non_finite_weights(collective) if self.step else ""
        if collective and self.dist.enabled and self.step:
            # Each rank draws its own noise: rank 0's checkpoint holds every rank's streams, so that a resume
            # (a restarted worker group's, say) continues exactly where each rank stood.
            states: list = [None] * self.dist.world_size
            torch.distributed.all_gather_object(states, self.gan.rng_state(), group=self.stop_agreement.group)
            self.ranks_rng = (self.step, states)
        self.save_pending, self.last_save_time = False, time.monotonic()
        return self.checkpoints.save(self.step, self.state_dict, non_finite)

    def write_samples(self) -> Path | None:
        return self.outputs.write_samples(self.gan.sample(self.fixed_noise), self.step)

    def _on_signal(self, signum: int) -> None:
        self.stop_signal = signum  # the step all ranks agree on (one later under DDP) ends, rank 0 saves, Interrupted

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last

    @property
    def last_record(self) -> dict:
        return self.outputs.last_record if hasattr(self, "outputs") else {}

    @property
    def step(self) -> int:
        return self.pos.step

    @property
    def epoch(self) -> int:
        return self.pos.epoch

    @property
    def epoch_step(self) -> int:
        return self.pos.epoch_step
