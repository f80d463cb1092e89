"""The Trainer: wires the components of a run and runs its epochs; ``Trainer.fit`` reads as the table of contents.

What each component owns (docs/architecture.md): :class:`~gantrain.engine.gan.step.GANStep` the models, optimisers and
the objective; :mod:`gantrain.engine.data` the batches; :class:`~gantrain.engine.state.checkpoint.Checkpointer` what a
checkpoint holds and when one is due, :class:`~gantrain.engine.state.checkpoint.Position` where the run stands;
:class:`RunOutputs` the run folder, log, metrics and grids; the quality tracker the metrics. The Trainer holds the
signals and calls the hooks (tune, Ray Train and the to-quality bench take part through them).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from gantrain.engine.config import Config
from gantrain.engine.data.plan import plan_schedule
from gantrain.engine.dist.runtime import DistInfo, StallWatch, StopAgreement, stop_signals
from gantrain.engine.errors import Interrupted
from gantrain.engine.gan.lr_schedule import LRDecay
from gantrain.engine.gan import hardware
from gantrain.engine.gan.precision import compute_name
from gantrain.engine.gan.sampling import fixed_noise
from gantrain.engine.gan.step import replica_max_abs_diff
from gantrain.engine.metrics.reference import refuse_metrics_without_data
from gantrain.engine.outputs.runlog import discard_held, log, setup_logging
from gantrain.engine.outputs.writer import RunOutputs
from gantrain.engine.state import checkpoint as ckpt
from gantrain.engine.state.files import RunLock
from gantrain.engine.state.rundir import RunDir, own_checkpoint
from gantrain.engine.train.cadence import Cadence
from gantrain.engine.train.parts import data_parts, gan_part
from gantrain.engine.train.profile import StepProfiler
from gantrain.engine.train.stats import NonFiniteWatch


def _position(name: str) -> property:
    return property(lambda trainer: getattr(trainer.pos, name), doc=f"``trainer.pos.{name}`` (read-only)")


class Hook(Protocol):
    """What a caller adds to a run (bench --to-quality, tune, Ray Train): any of these methods, each optional, on
    every rank. A returned string ends the run cleanly with that reason (the final checkpoint and outputs are still
    written); under DDP every rank must return the same (decide on rank 0 and broadcast)."""

    def after_step(self, trainer: Trainer) -> str | None:
        """After each optimiser step, its log, samples, evaluation and checkpoint: ``trainer.pos`` says where the
        run is."""

    def after_eval(self, trainer: Trainer, record: dict) -> str | None:
        """After each evaluation, with its record, on the ranks that evaluated (rank 0 for the run's own tracker;
        where a caller's :class:`Evaluation` was given); under DDP rank 0's reason stops every rank."""

    def after_epoch(self, trainer: Trainer, epochs_done: int) -> str | None:
        """After each whole epoch, its evaluation and checkpoint."""


class Evaluation(Protocol):
    """A caller's measurement of quality in place of the run's own tracker (bench --to-quality's clock): when it
    is due (``cadence``, in the run's clock) and the measurement itself. Under DDP give it on every rank, with the
    same cadence: every rank comes to each evaluation and takes rank 0's stop reason."""

    cadence: Cadence

    def evaluate(self, trainer: Trainer) -> dict:
        """The evaluation's record (``fd`` at least); the after-eval hooks receive it."""


@dataclass
class FitResult:
    steps: int
    epochs_done: int
    run_dir: Path
    last_checkpoint: Path | None
    stop_reason: str | None = None  # why the run ended before its last step (a hook's reason), or None


class Trainer:
    def __init__(self, cfg: Config, *, console: Console | None = None, dist_info: DistInfo = DistInfo(),
                 resume: str | None = None, hooks: Sequence[Hook] = (),
                 epoch_callbacks: Sequence[Callable[[Trainer, int], str | None]] = (),
                 finished_ok: bool = False, last_step: Callable[[int], int] | None = None,
                 evaluation: bool | Evaluation = True, divergence_watch: bool = True) -> None:
        """``hooks`` (:class:`Hook`) take part after each step and each epoch; ``epoch_callbacks`` are after-epoch
        hooks as plain functions ``callback(trainer, epochs_done)``. A hook ends the run by returning a reason.
        ``last_step``: the run ends at ``last_step(steps per epoch)`` when that comes before --epochs and
        --max-steps (bench --to-quality: a budget of a fraction of epochs); --lr-decay spans it.
        ``evaluation``: True, the run's own quality tracker on rank 0 when the config asks for one (--eval-every,
        --eval-every-steps, --eval-every-images: best.pt, metrics.jsonl); False, none (tune's trials evaluate in
        their epoch hook); an :class:`Evaluation`, the caller's in its place, on its cadence (no best.pt).
        ``divergence_watch`` False: the caller watches divergence itself (no stop on non-finite losses; non-finite
        weights are still never saved). Either way the config keeps the user's values.

        Rank 0 takes the run folder's lock here and holds it until :meth:`fit` ends (or :meth:`close`); nothing is
        written before the run is known to take a step. Raises :class:`RunLocked` (exit 2) when another run holds
        the folder, :class:`ConfigError` (exit 2) for a schedule of zero steps (too few images; a resume with
        nothing left, unless ``finished_ok``, which tune's restored trials use), :class:`RunIOError` when the
        folder cannot be written, :class:`CheckpointError` for a resume that cannot continue."""
        self.console, self.dist, self.finished_ok = console or Console(stderr=True), dist_info, finished_ok
        self.last_step, self.evaluation, self.divergence_watch = last_step, evaluation, divergence_watch
        self.step_hooks = [hook.after_step for hook in hooks if hasattr(hook, "after_step")]
        self.eval_hooks = [hook.after_eval for hook in hooks if hasattr(hook, "after_eval")]
        self.epoch_hooks = [*(hook.after_epoch for hook in hooks if hasattr(hook, "after_epoch")), *epoch_callbacks]
        self.stop_reason: str | None = None  # why the run ends before its last step (a hook's reason)
        self.epoch_means: dict = {}  # loss_d, loss_g, d_real, d_fake over the last whole epoch (epoch callbacks)
        self.run_dir, self.lock, notes = cfg.run_dir, RunLock(cfg.run_dir), []
        # first: its group carries the agreements below
        self.stop_agreement = StopAgreement(self.dist.enabled, cfg.dist.dist_timeout)
        self.stall = StallWatch(self.dist, cfg.dist.stall_warning, lambda text: log.warning("%s", text))
        try:
            self._build(cfg, resume, notes)
        except BaseException:
            self.close()
            self.lock.abandon()
            discard_held()  # the refused start's lines are not the next run's
            raise

    def _build(self, cfg: Config, resume: str | None, notes: list[str]) -> None:
        # What may refuse on some ranks only (rank 0 owns the run folder; each node reads its own data) comes
        # before the first collective, and every rank raises what any rank refused: none is left waiting.
        with self.stop_agreement.refusals():
            RunOutputs.refuse_an_out_inside_the_images(cfg)  # before the folder is made or its lock taken
            if self.evaluation is True:  # the run's own evaluations: before the layer probe measures anything
                refuse_metrics_without_data(cfg)
            if self.dist.is_main:  # one owner per run folder; under DDP rank 0 owns it for all ranks
                self.lock.take(notes.append)
                self.lock.remove_leftovers(notes.append)  # what a killed run's atomic writes left
            self.resume_path, state, changes = ckpt.open_resume(cfg, resume)
            if self.dist.is_main:
                RunOutputs.check(cfg, resuming=state is not None)
                setup_logging(self.console, pending=True)  # held until the run folder is written
            self.cfg = cfg
            self.device, self.policy, self.loader = data_parts(cfg, self.dist)
        self.global_batch = cfg.data.batch_size * self.dist.world_size
        self.gan = gan_part(cfg, self.device, self.policy, self.dist)
        self.fixed_noise = fixed_noise(cfg.model.nz, cfg.loss.noise, cfg.run.seed, self.device)
        self.watch = NonFiniteWatch(cfg.run.nonfinite_patience) if self.divergence_watch else None
        self.agreed_stop: int | None = None  # the stop signal every rank acts on, at the same step
        self.checkpoints = ckpt.Checkpointer(cfg.checkpoint, cfg.run_dir, cfg.to_dict(),
                                             samples_from_best=cfg.eval.samples_from_best, is_main=self.dist.is_main,
                                             world_size=self.dist.world_size, group=self.stop_agreement.group,
                                             raise_non_finite=self.divergence_watch and cfg.run.nonfinite_patience > 0)
        start = self.checkpoints.start_from(state, self.resume_path, self.gan, cfg, self.loader, self.global_batch,
                                            changes)
        self.pos, self.best_fd, self.best_measured_by = start.pos, start.best_fd, start.best_measured_by
        self.stop_agreement.require_same_step(self.step, self.checkpoints.files.checkpoints)
        self.stop_agreement.require_same_precision(self.policy.amp, self.policy.requested)
        # A finished run resumed whose end was cut short (a stop signal or a kill while writing final.png, losses.png,
        # progress.gif) writes what is missing instead of being refused as complete.
        missing = (RunDir(cfg.run_dir).missing_final_outputs()
                   if state is not None and own_checkpoint(cfg.run_dir, self.resume_path) else [])
        self.total_steps = plan_schedule(self.pos, cfg, self.loader.steps_per_epoch, self.run_dir,
                                         self.finished_ok or bool(missing))
        self.finish_only = bool(missing) and not self.finished_ok and self.step >= self.total_steps
        if self.finish_only:
            self.checkpoints.saved_step = self.step  # its last checkpoint is this step's
            notes.append(f"the run had taken all its {self.step} steps, but its end was cut short: writing the "
                         f"missing {', '.join(missing)}")
        if self.last_step is not None:
            self.total_steps = min(self.total_steps, self.last_step(self.loader.steps_per_epoch))
        with self.stop_agreement.refusals():  # rank 0's files and evaluation, as above
            self._build_outputs(cfg, state is not None, notes, start)
        self.first_step = self.step  # where this process began: its end is evaluated if it trained since

    def _build_outputs(self, cfg: Config, resuming: bool, notes: list[str], start: ckpt.Start) -> None:
        self.tracker, self.evaluated_step, self.own_cadence = None, None, Cadence()
        if self.evaluation is True and cfg.eval.evaluates:  # every rank knows when (their stop must agree)
            e = cfg.eval
            self.own_cadence = Cadence(epochs=e.eval_every, steps=e.eval_every_steps, images=e.eval_every_images)
        if self.own_cadence.active and self.dist.is_main:  # rank 0 evaluates; the extractor is fitted here if missing
            from gantrain.engine.metrics.tracking import QualityTracker

            self.tracker = QualityTracker.for_config(cfg, self.device, self.console, best_fd=self.best_fd,
                                                     best_measured_by=self.best_measured_by,
                                                     best_path=self.checkpoints.files.best)
            self.best_fd, self.best_measured_by = self.tracker.best_fd, self.tracker.measured_by
        self.outputs = RunOutputs(cfg, self.console, self.dist.is_main, self.dist.world_size)
        self.outputs.describe(self.loader, self.total_steps, self.device, self.policy.describe())
        if self.dist.is_main:  # MFU's divisor: the model's FLOPs per image, and the peak of all the ranks
            try:
                peaks = hardware.device_peaks(self.device)
                compute = compute_name(self.policy.amp)
                world = self.dist.world_size
                ranks = _ranks_of_the_roof(cfg, self.device, world)
                self.outputs.set_roof(hardware.step_flops(cfg.model, cfg.data.image_size, cfg.data.channels),
                                      peaks.of(compute) * ranks, self.device,
                                      f"{compute}, {peaks.source}" + (f", x {ranks} processes" if ranks > 1 else "")
                                      + (f" (of {world}: the cores they share)" if ranks < world else ""))
            except (RuntimeError, OSError) as exc:  # a probe the device cannot run (an OOM, no bf16 GEMM)
                log.warning("MFU left out of the records: the device's peak could not be measured (%s: %s)",
                            type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else "")
        self.outputs.prepare(resuming, notes, self.step)  # only now: a run that cannot start wrote nothing
        self.profiler = None  # --profile-steps, rank 0
        if cfg.logging.profile_range is not None and self.dist.is_main:
            self.profiler = StepProfiler(*cfg.logging.profile_range, RunDir(cfg.run_dir).profile, self.device)
            self.profiler.announce(self.step, self.total_steps)
        self.lr_decay = LRDecay.of_gan(cfg.optim, self.gan.opt_g, self.gan.opt_d, self.total_steps)
        if self.lr_decay.active and self.dist.is_main:
            log.info("%s", self.lr_decay.describe(self.step))
            planned = start.planned_steps
            if planned and planned != self.total_steps:
                log.warning("--lr-decay: this resume ends the run at step %d, not at %d as planned when checkpointed; "
                            "the decay is computed on the new length, so at step %d the rates jump: %s",
                            self.total_steps, planned, self.step, self.lr_decay.describe_jump(self.step, planned))

    def close(self) -> None:
        """Closes the --logger trackers (unfinished unless :meth:`fit` finished them) and releases the run folder
        (its lock); :meth:`fit` does this itself when it ends, however it ends."""
        try:
            self.stall.close()
            if getattr(self, "profiler", None) is not None:
                self.profiler.discard()
            if hasattr(self, "outputs"):
                self.outputs.close()
        finally:
            self.lock.release()

    # ----- the loop ------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Trains to ``total_steps``; releases the run folder when it ends, however it ends.

        Raises :class:`Interrupted` after SIGINT/SIGTERM, :class:`TrainingDiverged` when losses or weights go
        non-finite (see --nonfinite-patience), :class:`RunIOError` when a file cannot be written.
        """
        per_epoch = self.loader.steps_per_epoch
        try:
            # A signal ends the step all ranks agree on (one later under DDP): rank 0 saves, then Interrupted.
            with stop_signals(self.stop_agreement.on_signal):
                self._loop(per_epoch)
                # The end of the run is inside the signal handling too: a stop signal now is said once the final
                # outputs are written (seconds), instead of killing the process with half of them missing.
                self.stop_agreement.close()
                self.stall.phase = "writing the run's end"
                with stop_signals(self._signal_at_the_end):
                    result = self._finish()
            if self.stop_agreement.local_signal is not None:
                log.warning("%s came at the end of the run: its final outputs were written first; the run is "
                            "complete", signal.Signals(self.stop_agreement.local_signal).name)
            return result
        finally:
            self.close()

    def _signal_at_the_end(self, signum: int) -> None:
        """A stop signal while the run's end is written: the first waits for it (seconds); a second stops now
        (a tracker's upload that hangs), and --resume auto writes what is then missing."""
        if self.stop_agreement.local_signal is not None and getattr(self, "_end_signals", 0):
            raise Interrupted(signum, f"{signal.Signals(signum).name} twice while the run's end was written: stopped; "
                                      f"{self.cfg.resume_flags} writes what is missing", step=self.step,
                              checkpoint=self.last_checkpoint)
        self._end_signals = getattr(self, "_end_signals", 0) + 1
        self.stop_agreement.on_signal(signum)

    def _loop(self, per_epoch: int) -> None:
        """The epochs, until the last step, a hook's stop, or a stop signal (raised as :class:`Interrupted`)."""
        self.stall.step, self.stall.phase = self.step, "training"
        with self.outputs.live(self.step, self.total_steps, self.resume_path is not None, per_epoch, self.epoch,
                               self.epoch_step):
            if self.step == 0 and self.cfg.logging.sample_every and self.dist.is_main:
                self.write_samples()  # step 0: what the untrained generator makes, before anything is waited for
            while self.step < self.total_steps:
                if self.epoch_step < per_epoch:
                    self._train_epoch()
                if self.agreed_stop is not None:  # every rank is at the same step: rank 0 saves
                    self.stop_agreement.close()
                    saved = self.save_checkpoint()
                    where = ("rank 0 saves the checkpoint" if not self.dist.is_main else
                             f"checkpoint saved to {saved}" if saved else "no checkpoint (no step done)")
                    raise Interrupted(self.agreed_stop, f"interrupted at step {self.step}; {where}; continue with "
                                      f"{self.cfg.resume_flags}", checkpoint=saved, step=self.step)
                if self.epoch_step >= per_epoch:
                    self.pos.epoch, self.pos.epoch_step = self.epoch + 1, 0
                    self.epoch_means = self.gan.stats.read_epoch()
                    self.stall.phase = "at an epoch end (evaluation, checkpoint)"
                    self._end_epoch(self.epoch)
                    self.stall.phase = "training"
                if self.stop_reason:
                    log.warning("stopping at step %d: %s", self.step, self.stop_reason)
                    break

    def _train_epoch(self) -> None:
        self.outputs.start_window(self.step)
        batches = self.loader.epoch(self.epoch, self.epoch_step)
        while self.step < self.total_steps and self.agreed_stop is None and not self.stop_reason:
            if self.profiler is not None:
                self.profiler.before_step(self.step + 1)
            with self.gan.timer.phase("data"):
                real = next(batches, None)
            if real is None:
                break
            self.lr_decay.apply(self.step)
            self.gan(real)
            images_before = self.pos.images_seen
            self.pos.advance(self.global_batch)
            self.stall.step = self.step  # (a plain assignment: what the stall watch says others wait after)
            self.outputs.advance(self.step)
            log_now, sample_now = self.outputs.due(self.step, self.total_steps)
            if log_now:
                self._log()
            if sample_now:
                self.write_samples()
            self.agreed_stop, save_now = self.stop_agreement.after_step(self.checkpoints.minutes_due())
            epoch_ended = self.epoch_step >= self.loader.steps_per_epoch
            improved = False  # (due at an epoch's last step: at the epoch's end, after its statistics)
            if not epoch_ended and self.eval_cadence.after_step(self.step, images_before, self.pos.images_seen,
                                                                self.total_steps):
                improved = self._evaluate(f"step {self.step}",
                                          round(self.epoch + self.epoch_step / self.loader.steps_per_epoch, 4))
            if self.agreed_stop is None and self.checkpoints.due_after_step(self.step, save_now, epoch_ended):
                self.save_checkpoint()  # (a stop saves anyway)
            if improved:
                self._save_best()
            for hook in self.step_hooks:
                self.stop_reason = hook(self) or self.stop_reason
            if self.profiler is not None:
                self.profiler.after_step(self.step)

    def _log(self) -> None:
        stats = self.gan.stats.read()
        first = self.outputs.log(self.step, self.epoch, stats, self.gan.timer.read_ms(), self.lr_decay.rates())
        diverged = self.watch.check(stats, first, self.step) if self.watch is not None else None
        if diverged:
            raise self.checkpoints.diverged(diverged)

    def _end_epoch(self, epochs_done: int) -> None:
        """Quality metrics, the checkpoint (it stores the best FD), best.pt when FD improved, the callbacks."""
        improved, cadence, seen = False, self.eval_cadence, self.pos.images_seen
        # by epochs, or by steps or images at the epoch's last step (a pure predicate: a run stopped at that step
        # and resumed evaluates here too)
        due = cadence.at_epoch_end(epochs_done) or cadence.after_step(self.step, seen - self.global_batch, seen,
                                                                       self.total_steps)
        if due and self.evaluated_step != self.step:
            improved = self._evaluate(f"epoch {epochs_done}", epochs_done)
        if self.checkpoints.due_at_epoch_end(epochs_done):
            self.save_checkpoint()
        if improved:
            self._save_best()
        for hook in self.epoch_hooks:
            self.stop_reason = hook(self, epochs_done) or self.stop_reason

    def _evaluate(self, when: str, epoch: float) -> bool:
        """One evaluation now (``epoch``: epochs done, a fraction mid-epoch), by the run's tracker (rank 0) or the
        caller's :class:`Evaluation`, then the after-eval hooks where it ran; under DDP every rank comes here at
        the same step and takes rank 0's stop reason. Returns whether its FD is the best so far (best.pt follows
        the checkpoint)."""
        phase, self.stall.phase = self.stall.phase, "evaluating"
        record, improved = None, False
        if self.tracker is not None:
            record, improved = self.tracker.evaluate_and_show(self.gan.generator, self.step, epoch, self.outputs, when)
            self.best_fd = self.tracker.best_fd
        elif not isinstance(self.evaluation, bool):
            record = self.evaluation.evaluate(self)
        self.stall.phase, self.evaluated_step = phase, self.step
        if record is not None:
            for hook in self.eval_hooks:
                self.stop_reason = hook(self, record) or self.stop_reason
        if self.dist.enabled:  # one verdict: rank 0's
            self.stop_reason = self.stop_agreement.broadcast_from_main(self.stop_reason)
        return improved

    def _save_best(self) -> None:
        if not self.gan.non_finite_weights(collective=False):
            ckpt.save_best(self.checkpoints.files, self.step, self.state_dict)

    def _finish(self) -> FitResult:
        if self.profiler is not None:  # a run that ended (a hook's stop) inside the profiled steps
            self.profiler.finish(self.step)
        improved = False
        if self.own_cadence.active and self.evaluated_step != self.step and self.step > self.first_step:
            # the run ends between evaluations (--max-steps, a cadence that does not divide the run): its last
            # weights are measured too, so best.pt and the final samples are never an older, worse step's
            if self.dist.is_main:
                log.info("evaluating the last step (%d): the run ended between its evaluations", self.step)
            improved = self._evaluate(f"step {self.step}, the run's end",
                                      round(self.epoch + self.epoch_step / self.loader.steps_per_epoch, 4))
            improved = self.stop_agreement.broadcast_from_main(improved)  # rank 0 evaluated; every rank saves
        if self.checkpoints.saved_step != self.step or improved:  # (improved: last.pt stores the new best FD)
            self.save_checkpoint()
        if improved and self.dist.is_main:
            self._save_best()
        if self.dist.enabled:  # a collective: every rank takes part
            self.outputs.write_replica_diff(self.step, replica_max_abs_diff([self.gan.g, self.gan.d]))
        if self.dist.is_main:
            self.outputs.write_final(self.checkpoints.final_samples(self.gan, self.fixed_noise, self.step, self.best_fd),
                                     self.step)
        return FitResult(self.step, self.epoch, self.run_dir, self.last_checkpoint, self.stop_reason)

    # ----- state and samples ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint: the GAN step's state, the place in the data, the config, the best FD and how it was
        measured, and the step the run was planned to end at (a resume tells a new length from it)."""
        return self.checkpoints.state(self.gan.state_dict(), self.pos.state(self.global_batch, self.loader.num_images),
                                      self.best_fd, self.best_measured_by, self.total_steps)

    def save_checkpoint(self, collective: bool = True) -> Path | None:
        """A checkpoint now (rank 0), refused for non-finite weights: see :meth:`Checkpointer.save`."""
        return self.checkpoints.save(self.step, self.state_dict, self.gan, collective)

    def write_samples(self) -> Path | None:
        return self.outputs.write_samples(self.gan.sample(self.fixed_noise), self.step)

    @property
    def eval_cadence(self) -> Cadence:
        """When an evaluation is due: the caller's :class:`Evaluation`'s cadence, else the config's."""
        return self.own_cadence if isinstance(self.evaluation, bool) else self.evaluation.cadence

    @property
    def last_checkpoint(self) -> Path | None:
        return self.checkpoints.last

    @property
    def last_record(self) -> dict:
        return self.outputs.last_record if hasattr(self, "outputs") else {}

    @property
    def last_eval(self) -> dict:
        return self.tracker.last_record if self.tracker is not None else {}

    # where the run stands, read from its Position: optimiser updates, completed epochs, steps into this epoch
    step, epoch, epoch_step = _position("step"), _position("epoch"), _position("epoch_step")


def _ranks_of_the_roof(cfg: Config, device: torch.device, world: int) -> int:
    """How many ranks' peaks the MFU roof adds up: all of them, but on CPU (torchrun) no more per node than its
    cores hold at each process's threads (--nproc 3 on 2 cores shares them: 2 processes' worth of peak)."""
    if device.type != "cpu" or cfg.dist.ray or world <= 1:
        return world
    nodes = max(cfg.dist.nnodes, 1)
    per_node = max(1, (os.cpu_count() or 1) // max(torch.get_num_threads(), 1))
    return min(world, nodes * per_node)
