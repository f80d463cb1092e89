"""The training loop. ``Trainer.fit`` reads as the table of contents; each phase is a small method.

One iteration is two named phases, each timed and marked for the profiler:

* ``d_step``: G makes a batch from fresh noise; D sees the real batch and the detached fakes; BCE-with-logits
  with one-sided label smoothing on the real targets; D's optimiser steps.
* ``g_step``: the updated D scores the same fakes against "real" targets; D's parameters are frozen so no D
  weight-gradients are computed (and under DDP D does not all-reduce); G's optimiser steps.
"""

from __future__ import annotations

import copy
import contextlib
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gantrain.engine import checkpoint as ckpt
from gantrain.engine.config import Config, _flag, from_dict, to_toml
from gantrain.engine.data import Shard, build_loader
from gantrain.engine.errors import CheckpointError, ConfigError, RunIOError, TrainingDiverged
from gantrain.engine.files import RunLock, atomic_write_text, make_folder, os_reason
from gantrain.engine.images import plot_curves, read_metrics, save_gif, save_grid
from gantrain.engine.logging import (DeviceStats, MetricsWriter, PhaseTimer, attach_log_file, log, progress_bar,
                                    setup_logging)
from gantrain.engine.models import Generator, build_models, sample_noise
from gantrain.engine.precision import PrecisionPolicy
from gantrain.engine.runtime import DistInfo, configure_cuda, pick_device

NUM_FIXED_SAMPLES = 64


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` is 128 + the signal number."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.exit_code, self.checkpoint = 128 + signum, checkpoint


@dataclass
class FitResult:
    steps: int
    epochs_done: int
    run_dir: Path
    last_checkpoint: Path | None


def make_adam(params, lr: float, betas: tuple[float, float], device: torch.device, fused: bool) -> torch.optim.Adam:
    """Fused Adam where the device supports it, else the multi-tensor (foreach) one."""
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, betas=betas, foreach=device.type in ("cuda", "cpu"))


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Parameters of ``module`` need no gradient inside the block (the G step needs only input-gradients of D)."""
    module.requires_grad_(False)
    try:
        yield
    finally:
        module.requires_grad_(True)


class Trainer:
    def __init__(self, cfg: Config, *, console: Console | None = None, dist_info: DistInfo = DistInfo(),
                 resume: str | None = None, epoch_callbacks: Sequence[Callable[[Trainer, int], None]] = ()) -> None:
        """``epoch_callbacks`` run after each completed epoch as ``callback(trainer, epochs_done)``; one may set
        ``trainer.stop_reason`` to end the run cleanly (final checkpoint and outputs still written).

        Rank 0 takes the run folder's lock here and holds it until :meth:`fit` ends (or :meth:`close`). Raises
        :class:`RunLocked` (exit 2) when another run holds it, :class:`RunIOError` when the folder cannot be
        made or written, :class:`CheckpointError` for a resume that cannot continue (a missing, damaged or
        non-finite checkpoint, or a change of what the weights are built from)."""
        self.console = console or Console(stderr=True)
        self.epoch_callbacks = list(epoch_callbacks)
        self.stop_reason: str | None = None
        self.last_record: dict = {}
        self.dist = dist_info
        self.run_dir = cfg.run_dir
        self.lock = RunLock(self.run_dir)
        notes: list[str] = []
        created = not self.run_dir.exists()
        if self.dist.is_main:  # one owner per run folder; under DDP rank 0 owns it for all ranks
            make_folder(self.run_dir, "--out")
            self.lock.acquire(notes.append)
        try:
            self.resume_path = ckpt.find_resume(resume, cfg.run_dir) if resume else None
            resume_state = ckpt.load_checkpoint(self.resume_path) if self.resume_path else None
            self.cfg = self._resumed_config(cfg, resume_state)
            self._check_run_dir(resume_state is not None)
            self.device = pick_device(self.cfg.run.device, self.dist.local_rank)
            self.policy = PrecisionPolicy(self.device, self.cfg.perf.amp, self.cfg.perf.channels_last)
            self._build_data()
            self._build_models()
            self._build_state()
            if resume_state is not None:
                self.load_state(resume_state, self.resume_path)
            self._plan_schedule()
            # Only now is the run folder written: a run that cannot take one step (too few images, nothing
            # left to train) is refused before any file of it exists.
            self._prepare_run_dir(resume_state is not None, notes)
            self.tracker = self._build_tracker()
            self.trackers = self._build_trackers()
        except BaseException:
            self.close()
            if created and self.dist.is_main:
                with contextlib.suppress(OSError):
                    self.run_dir.rmdir()  # only when still empty: the lock file is gone with the lock
            raise

    def close(self) -> None:
        """Releases the run folder (its lock) and closes the experiment trackers (marked unfinished unless
        :meth:`fit` finished them); :meth:`fit` does this itself when it ends, however it ends."""
        trackers = getattr(self, "trackers", None)
        try:
            if trackers:
                trackers.finish({**self.last_record, **self.last_eval}, ok=False)
        except Exception as exc:  # closing after a failure must not hide that failure
            log.warning("closing the --logger trackers failed: %s: %s", type(exc).__name__, exc)
        finally:
            self.lock.release()

    # ----- construction -------------------------------------------------------------------------------
    def _resumed_config(self, cfg: Config, state: dict | None) -> Config:
        """On resume the run's config is this one (what the user set is what runs), except what shapes the
        weights: a change of the model or the image size/channels is refused, naming each setting."""
        self.resume_changes: list[str] = []
        if state is None:
            return cfg
        saved = from_dict({k: v for k, v in state["config"].items() if k != "preset"})
        old, new = _flat(saved.to_dict()), _flat(cfg.to_dict())
        changed = [key for key in new if old.get(key) != new[key]]
        fixed = [key for key in changed if key.startswith("model.") or key in FIXED_MID_RUN]
        if fixed:
            what = ", ".join(f"{_flag(k.split('.')[1])} {old[k]!r} -> {new[k]!r}" for k in fixed)
            raise CheckpointError(f"{self.resume_path}: the checkpoint's model config differs from this run's "
                                  f"({what}): these cannot change mid-run; pass the same --preset/--config or "
                                  "start a new --out")
        self.resume_changes = [f"{_flag(k.split('.')[1])} {old[k]!r} -> {new[k]!r}" for k in changed]
        return cfg

    def _check_run_dir(self, resuming: bool) -> None:
        """Refuses an --out that holds another run; starts the log, held until the run folder is written."""
        if not self.dist.is_main:
            return
        if not resuming and (self.run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"--out: {self.run_dir} already holds a run; continue it with --resume auto "
                              "or choose another --out")
        from gantrain.engine.trackers import check_loggers, parse_loggers

        check_loggers(parse_loggers(self.cfg.run.logger))  # a missing extra is refused before any file is written
        setup_logging(self.console, pending=True)

    def _prepare_run_dir(self, resuming: bool, notes: list[str]) -> None:
        if not self.dist.is_main:
            return
        stale_grids = [] if resuming else sorted((self.run_dir / "samples").glob("step_*.png"))
        leftovers = [] if resuming else [n for n in ("metrics.jsonl", "final.png") if (self.run_dir / n).exists()]
        make_folder(self.run_dir / "samples")
        world, batch = self.dist.world_size, self.cfg.data.batch_size
        effective = f"\n# effective batch: {batch} per process x {world} process(es) = {batch * world}\n"
        atomic_write_text(self.run_dir / "config.toml", to_toml(self.cfg) + effective)
        try:
            attach_log_file(self.run_dir / "train.log")
        except OSError as exc:
            raise RunIOError(f"cannot write {self.run_dir / 'train.log'}: {os_reason(exc)}") from None
        for note in notes:
            log.warning(note)
        if stale_grids or leftovers:
            # an earlier run into this --out saved no checkpoint: nothing to resume, and its grids would
            # otherwise end up in this run's progress.gif
            for grid in stale_grids:
                grid.unlink(missing_ok=True)
            found = leftovers + ([f"{len(stale_grids)} sample grids"] if stale_grids else [])
            log.warning("--out: %s holds files of an earlier run that saved no checkpoint (%s); starting afresh, "
                        "they are replaced", self.run_dir, ", ".join(found))

    def _build_data(self) -> None:
        shard = Shard(self.dist.rank, self.dist.world_size)
        self.loader = build_loader(self.cfg.data, self.cfg.run.seed, self.device, shard, policy=self.policy)
        self.global_batch = self.cfg.data.batch_size * self.dist.world_size

    def _plan_schedule(self) -> None:
        """``total_steps``: the step (optimiser update) at which the run ends: the end of epoch --epochs from
        where the run stands, capped by --max-steps (which counts updates, whatever the batch)."""
        run, per_epoch = self.cfg.run, self.loader.steps_per_epoch
        remaining = max(run.epochs * per_epoch - (self.epoch * per_epoch + self.epoch_step), 0)
        by_epochs = self.step + remaining
        self.total_steps = min(by_epochs, run.max_steps) if run.max_steps else by_epochs
        if self.step >= self.total_steps:  # a resumed run with nothing left to train: zero steps is no run
            flag = "--max-steps" if run.max_steps and run.max_steps <= self.step else "--epochs"
            raise ConfigError(f"{flag}: the run in {self.run_dir} already took {self.step} of its {self.total_steps} "
                              f"steps; raise {flag} to train on")
        if self.dist.is_main:
            log.info("%s: %d images, %d steps/epoch, batch %d x %d processes = %d, %d steps in total",
                     self.cfg.data.dataset, self.loader.num_images, per_epoch, self.cfg.data.batch_size,
                     self.dist.world_size, self.global_batch, self.total_steps)
            log.info("device %s, %s, %s loader%s", self.device, self.policy.describe(), type(self.loader).__name__,
                     ", torch.compile" if self.cfg.perf.compile else "")

    def _build_models(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
        g, d = build_models(cfg.model, cfg.data.image_size, cfg.data.channels, cfg.perf.layer_impl)
        self.g, self.d = self.policy.prepare_model(g), self.policy.prepare_model(d)
        self.g_ema = copy.deepcopy(self.g).eval().requires_grad_(False) if cfg.perf.ema_decay > 0 else None
        betas = (cfg.optim.beta1, cfg.optim.beta2)
        self.opt_g = make_adam(self.g.parameters(), cfg.optim.lr_g, betas, self.device, cfg.perf.fused_adam)
        self.opt_d = make_adam(self.d.parameters(), cfg.optim.lr_d, betas, self.device, cfg.perf.fused_adam)
        self.g_train, self.d_train = self._wrap(self.g), self._wrap(self.d)
        if self.device.type == "cuda":
            configure_cuda()

    def _wrap(self, model: nn.Module) -> nn.Module:
        """compile, then DDP around it: the DDP(compile(model)) order."""
        perf = self.cfg.perf
        if self.dist.enabled and self.cfg.dist.sync_bn:
            if self.device.type != "cuda":
                raise ConfigError("--sync-bn: SyncBatchNorm needs CUDA (it is not implemented for the CPU)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # swaps the BN children in place
        if perf.compile or perf.cuda_graphs:
            if perf.compile_cache_dir:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(perf.compile_cache_dir).expanduser())
            mode = "reduce-overhead" if perf.cuda_graphs else perf.compile_mode
            model = torch.compile(model, mode=mode, dynamic=False)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            with warnings.catch_warnings():
                # D runs twice per step, so buffers must not be re-broadcast in forward; torch 2.13 deprecates
                # the flag but its replacement (forward_sync_buffers) still syncs at init, which is harmless
                # here, yet it is not in older torch releases that pyproject admits.
                warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
                model = DDP(model, device_ids=ids, broadcast_buffers=False)
        return model

    def _build_state(self) -> None:
        cfg, b = self.cfg, self.cfg.data.batch_size
        self.step = 0  # optimiser updates so far; the place in the data is (epoch, epoch_step) below
        self.epoch = 0  # completed epochs
        self.epoch_step = 0  # steps done in the current epoch, at this run's global batch
        self.images_seen = 0  # images trained on over the whole run, all processes together
        self.nonfinite_intervals = 0  # log intervals in a row whose statistics were not finite
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.run.seed * 7919 + 1 + self.dist.rank)
        fixed_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.fixed_noise = sample_noise(NUM_FIXED_SAMPLES, cfg.model.nz, cfg.loss.noise, "cpu", fixed_gen).to(self.device)
        self.real_target = torch.full((b,), 1.0 - cfg.loss.label_smoothing, device=self.device)
        self.fake_target = torch.zeros(b, device=self.device)
        self.gen_target = torch.ones(b, device=self.device)
        self.stats, self.timer = DeviceStats(self.device), PhaseTimer(self.device)
        self.stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        self.last_finite: tuple[Path, int] | None = None  # the newest checkpoint known finite, and its step
        self.checkpoint_step: int | None = None  # the step of the last checkpoint written (or refused)
        self.best_fd: float | None = None
        self.last_eval: dict = {}  # the latest quality-metrics record (--eval-every), for epoch callbacks

    def _build_tracker(self):
        """Quality metrics every --eval-every epochs, on rank 0 (the extractor is fitted here when missing)."""
        if not self.cfg.run.eval_every or not self.dist.is_main:
            return None
        from gantrain.engine.metrics.tracking import QualityTracker

        return QualityTracker(self.cfg, self.device, self.console, best_fd=self.best_fd)

    def _build_trackers(self):
        """TensorBoard / W&B / MLflow (--logger) on rank 0, fed from the metrics.jsonl records; the config first."""
        from gantrain.engine.trackers import Trackers

        if not self.dist.is_main:
            return None
        return Trackers(self.cfg, self.run_dir, resume_step=self.step if self.resume_path else None)

    # ----- the loop ------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        """Trains to ``total_steps``; releases the run folder when it ends, however it ends.

        Raises :class:`Interrupted` after SIGINT/SIGTERM, :class:`TrainingDiverged` when losses or weights go
        non-finite (see --nonfinite-patience), :class:`RunIOError` when a file cannot be written.
        """
        steps_per_epoch = self.loader.steps_per_epoch
        try:
            with self._signals(), self._progress() as bar:
                while self.step < self.total_steps:
                    if self.epoch_step < steps_per_epoch:
                        self._train_epoch(self.epoch, self.epoch_step, bar)
                    if self.stop_signal is not None:
                        raise Interrupted(self.stop_signal, self.save_checkpoint(collective=False))
                    if self.epoch_step >= steps_per_epoch:
                        self.epoch, self.epoch_step = self.epoch + 1, 0
                        self._end_epoch(self.epoch, bar)
                        for callback in self.epoch_callbacks:
                            callback(self, self.epoch)
                    if self.stop_reason:
                        log.warning("stopping at step %d: %s", self.step, self.stop_reason)
                        break
            return self._finish()
        finally:
            self.close()

    def _end_epoch(self, epochs_done: int, bar) -> None:
        """In this order: quality metrics, the checkpoint (it stores the best FD), then best.pt when FD improved."""
        improved = self._evaluate_quality(epochs_done, bar) if self.tracker and self.tracker.due(epochs_done) else False
        if epochs_done % self.cfg.run.checkpoint_every == 0:
            self.save_checkpoint()
        if improved and not self._non_finite_weights(collective=False):
            ckpt.save_best(self.run_dir / "checkpoints", self.step, self.state_dict)

    def _evaluate_quality(self, epochs_done: int, bar) -> bool:
        generator = self.g_ema if self.g_ema is not None else self.g
        record, improved = self.tracker.evaluate(generator, self.step, epochs_done)
        self.best_fd, self.last_eval = self.tracker.best_fd, record
        self.metrics.write(record)
        if self.trackers:
            self.trackers.record(record)
        self.tracker.plot(self.run_dir)
        summary = self.tracker.summary(record)
        bar.update(self.task, quality=f" | {summary}")
        log.info("epoch %d: %s (%d samples, %.1f s)%s", epochs_done, summary, record["eval_samples"], record["eval_s"],
                 ", best so far: checkpoints/best.pt" if improved else "")
        return improved

    def _train_epoch(self, epoch: int, start: int, bar) -> None:
        self.window_start = time.perf_counter(), self.step
        batches = self.loader.epoch(epoch, start)
        while self.step < self.total_steps and self.stop_signal is None:
            with self.timer.phase("data"):
                real = next(batches, None)
            if real is None:
                break
            self.train_step(real)
            self.step += 1
            self.epoch_step += 1
            self.images_seen += self.global_batch
            self._after_step(epoch, bar)

    def train_step(self, real_uint8: torch.Tensor) -> None:
        real = self.policy.prepare_batch(real_uint8)
        with self.timer.phase("d_step"):
            fake, loss_d, d_real, d_fake = self.d_step(real)
        with self.timer.phase("g_step"):
            loss_g = self.g_step(fake)
        self.policy.end_iteration()
        if self.g_ema is not None:
            self._update_ema()
        self.stats.add(loss_d, loss_g, d_real, d_fake)

    def d_step(self, real: torch.Tensor):
        z = sample_noise(real.shape[0], self.cfg.model.nz, self.cfg.loss.noise, self.device, self.noise_gen)
        with self.policy.autocast():
            fake = self.g_train(z)
            logits_real = self.d_train(real).float()
            logits_fake = self.d_train(fake.detach()).float()
        loss = (F.binary_cross_entropy_with_logits(logits_real, self.real_target)
                + F.binary_cross_entropy_with_logits(logits_fake, self.fake_target))
        self.opt_d.zero_grad(set_to_none=True)
        self.policy.backward_and_step(loss, self.opt_d)
        return fake, loss.detach(), torch.sigmoid(logits_real).mean().detach(), torch.sigmoid(logits_fake).mean().detach()

    def g_step(self, fake: torch.Tensor) -> torch.Tensor:
        no_sync = self.d_train.no_sync() if isinstance(self.d_train, DDP) else contextlib.nullcontext()
        with frozen(self.d), no_sync:
            with self.policy.autocast():
                logits = self.d_train(fake).float()
            loss = F.binary_cross_entropy_with_logits(logits, self.gen_target)
            self.opt_g.zero_grad(set_to_none=True)
            self.policy.backward_and_step(loss, self.opt_g)
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = self.cfg.perf.ema_decay
        torch._foreach_lerp_(list(self.g_ema.parameters()), list(self.g.parameters()), 1.0 - decay)
        for ema_buf, buf in zip(self.g_ema.buffers(), self.g.buffers()):
            ema_buf.copy_(buf)

    def _after_step(self, epoch: int, bar) -> None:
        run = self.cfg.run
        if self.step % run.log_every == 0 or self.step == self.total_steps:
            self._log(epoch, bar)
        if self.dist.is_main and run.sample_every and self.step % run.sample_every == 0:
            self.write_samples()

    # ----- logging, samples, checkpoints -------------------------------------------------------------------
    def _log(self, epoch: int, bar) -> None:
        t0, step0 = self.window_start
        now = time.perf_counter()
        stats = self.stats.read()
        phases_ms = self.timer.read_ms()
        steps = max(self.step - step0, 1)
        images_per_s = steps * self.cfg.data.batch_size * self.dist.world_size / max(now - t0, 1e-9)
        self.window_start = now, self.step
        # The statistics were reduced (and all-reduced under DDP) just now, so checking them costs no extra
        # host sync, and every rank reaches the same verdict at the same step.
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad and not self.nonfinite_intervals:
            self.nonfinite_since = step0 + 1
        self.nonfinite_intervals = self.nonfinite_intervals + 1 if bad else 0
        if self.dist.is_main:
            record = {"step": self.step, "epoch": epoch + 1, **{k: round(v, 5) for k, v in stats.items()},
                      "images_per_s": round(images_per_s, 1),
                      **{f"{k}_ms": round(v / steps, 2) for k, v in phases_ms.items()}, "time": time.time()}
            self.last_record = record
            self.metrics.write(record)
            if self.trackers:
                self.trackers.record(record)
            bar.update(self.task, completed=self.step, epoch=f"{epoch + 1}/{self.cfg.run.epochs}",
                       loss_d=f"{stats['loss_d']:.3f}", loss_g=f"{stats['loss_g']:.3f}",
                       images_per_s=f"{images_per_s:.0f}")
        patience = self.cfg.run.nonfinite_patience
        if bad and patience and self.nonfinite_intervals >= patience:
            values = ", ".join(f"{k} {stats[k]}" for k in bad)
            raise self._diverged(f"non-finite training statistics ({values}) in {self.nonfinite_intervals} log "
                                 f"interval(s) in a row, steps {self.nonfinite_since}-{self.step} "
                                 f"(--nonfinite-patience {patience})")

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Images from the EMA generator when on, else G; eval mode, no grad, BatchNorm statistics untouched."""
        model = self.g_ema if self.g_ema is not None else self.g
        return generate_images(model, noise, self.policy)

    def write_samples(self) -> Path:
        path = save_grid(self.sample(self.fixed_noise), self.run_dir / "samples" / f"step_{self.step:06d}.png")
        if self.trackers:
            self.trackers.image(self.step, path)
        return path

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        # The place in the data in images, which any later process layout or batch size can continue from
        # (epochs draw one permutation of the images whatever the layout; each step takes the next batch of it).
        state = {"step": self.step, "epoch": self.epoch, "epoch_images": self.epoch_step * self.global_batch,
                 "images_seen": self.images_seen, "global_batch": self.global_batch,
                 "num_images": self.loader.num_images, "config": self.cfg.to_dict(),
                 "generator": self.g.state_dict(), "discriminator": self.d.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "scaler": self.policy.scaler.state_dict(), "rng": rng, "world_size": self.dist.world_size}
        if self.g_ema is not None:
            state["generator_ema"] = self.g_ema.state_dict()
        if self.best_fd is not None:
            state["best_fd"] = self.best_fd
        return state

    def load_state(self, state: dict, path: Path | str) -> None:
        """Continues from a checkpoint: weights, optimiser state (with this run's hyperparameters), RNG streams
        and the place in the data. Raises :class:`CheckpointError` for non-finite weights or a place that
        cannot be found in this run's data."""
        for key, what in (("generator", "generator"), ("discriminator", "discriminator"),
                          ("generator_ema", "EMA generator")):
            if key in state:
                ckpt.check_finite(state[key], what, path)
        ckpt.load_module_state(self.g, state["generator"], "generator", path)
        ckpt.load_module_state(self.d, state["discriminator"], "discriminator", path)
        if self.g_ema is not None:
            ckpt.load_module_state(self.g_ema, state.get("generator_ema", state["generator"]), "EMA generator", path)
        changed = [*_load_optimizer(self.opt_g, state["opt_g"], "G"), *_load_optimizer(self.opt_d, state["opt_d"], "D")]
        if state.get("scaler"):
            self.policy.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_fd = state.get("best_fd")
        self._load_rng(state["rng"])
        moved = self._restore_position(state, path)
        self.last_finite = (Path(path), self.step)
        if self.dist.is_main:
            log.info("resumed from %s at step %d (epoch %d, image %d of this epoch)", path, self.step, self.epoch + 1,
                     self.epoch_step * self.global_batch)
            # The config's changes explain the optimiser's; the optimiser's alone show a checkpoint whose
            # optimiser disagreed with its own config (e.g. one written by a tool that changed the groups).
            changes = self.resume_changes or [f"optimiser {c}" for c in changed]
            if changes:
                log.info("resume: settings changed since the checkpoint, in effect from step %d: %s", self.step + 1,
                         ", ".join(changes))
            if moved:
                log.warning("resume: %s", moved)

    def _restore_position(self, state: dict, path: Path | str) -> str:
        """Sets (epoch, epoch_step, images_seen) from the checkpoint, in this run's layout; returns a note when
        the layout changed (another process count, batch size or dataset size), else ''."""
        per_epoch, batch = self.loader.steps_per_epoch, self.global_batch
        self.epoch = int(state.get("epoch", 0))
        saved_cfg = state.get("config", {})
        saved_per_process = saved_cfg.get("data", {}).get("batch_size", self.cfg.data.batch_size)
        saved_batch = int(state.get("global_batch") or saved_per_process * int(state.get("world_size", 1)))
        if "epoch_images" in state:
            images = int(state["epoch_images"])
        else:  # written before the place was stored: step and epoch count steps of the saved layout
            images = self._legacy_epoch_images(state, saved_batch, path)
        self.images_seen = int(state.get("images_seen", self.step * saved_batch))
        start, extra = divmod(images, batch)
        notes = []
        if images > per_epoch * batch:  # a smaller --limit than when saved, say
            notes.append(f"the checkpoint stood {images} images into epoch {self.epoch + 1}, past this run's "
                         f"epoch of {per_epoch * batch} images: that epoch counts as done")
            start, extra = per_epoch, 0
        if extra:
            notes.append(f"the checkpoint stood {images} images into epoch {self.epoch + 1}, not a multiple of this "
                         f"run's global batch {batch}: continuing from image {start * batch}, so {extra} images of "
                         "that epoch are trained on twice")
        self.epoch_step = start
        saved_num = state.get("num_images")
        if saved_batch != batch or (saved_num is not None and saved_num != self.loader.num_images):
            notes.insert(0, f"global batch {saved_batch} -> {batch}"
                            + (f", images per epoch {saved_num} -> {self.loader.num_images}"
                               if saved_num is not None and saved_num != self.loader.num_images else "")
                            + f": continuing at epoch {self.epoch + 1}, step {start} of {per_epoch} "
                              f"(image {start * batch}), the step count goes on from {self.step}")
        return "; ".join(notes)

    def _legacy_epoch_images(self, state: dict, saved_batch: int, path: Path | str) -> int:
        """Images into the current epoch of a checkpoint without ``epoch_images``: its steps in that epoch times
        its global batch. Past the first epoch that needs its steps per epoch, known only when the images
        are the same as now."""
        if self.epoch == 0:
            return self.step * saved_batch
        saved_data, data = dict(state.get("config", {}).get("data", {})), self.cfg.to_dict()["data"]
        same_images = all(saved_data.get(k, data[k]) == data[k] for k in DATASET_KEYS)
        saved_per_epoch = self.loader.num_images // saved_batch
        in_epoch = self.step - self.epoch * saved_per_epoch
        if not same_images or not 0 <= in_epoch <= saved_per_epoch:
            raise CheckpointError(f"{path}: this checkpoint predates stored data positions and its dataset settings "
                                  f"differ from this run's ({', '.join(DATASET_KEYS)}), so its place in epoch "
                                  f"{self.epoch + 1} is unknown; resume with the data settings it was saved with")
        return in_epoch * saved_batch

    def _load_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        if self.dist.world_size == 1 and rng["noise"].numel() == self.noise_gen.get_state().numel():
            self.noise_gen.set_state(rng["noise"])
        else:  # another world size or device: a fresh, still deterministic, per-rank stream
            self.noise_gen.manual_seed(self.cfg.run.seed * 7919 + 1 + self.dist.rank + self.step)
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save_checkpoint(self, collective: bool = True) -> Path | None:
        """Saves a checkpoint (on rank 0) unless its weights are non-finite: then the run stops with
        :class:`TrainingDiverged` (or, with --nonfinite-patience 0, goes on without it, with a warning), so a
        non-finite checkpoint never replaces, nor rotates away, the last finite one. ``collective``: all ranks
        are here at the same step (not so after a signal), so they can agree on the check."""
        if self.step == 0:
            return self.last_checkpoint
        self.checkpoint_step = self.step  # on every rank: whether _finish saves must not depend on the rank
        bad = self._non_finite_weights(collective)
        if bad:
            if self.cfg.run.nonfinite_patience:
                raise self._diverged(f"non-finite weights at step {self.step} ({bad})")
            if self.dist.is_main:
                log.warning("not saving a checkpoint at step %d: non-finite weights (%s); %s", self.step, bad,
                            self._last_finite_text())
            return self.last_checkpoint
        if self.dist.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(self.state_dict(), self.run_dir / "checkpoints", self.step,
                                                        self.cfg.run.keep_checkpoints)
            self.last_finite = (self.last_checkpoint, self.step)
        return self.last_checkpoint

    @torch.no_grad()
    def _non_finite_weights(self, collective: bool) -> str:
        """'' when every parameter and buffer of G, D (and the EMA G) is finite, else how many are not, per model.
        One host sync (and under DDP one all-reduce when ``collective``): called at checkpoint time only."""
        models = [("generator", self.g), ("discriminator", self.d)]
        if self.g_ema is not None:
            models.append(("EMA generator", self.g_ema))
        counts = torch.stack([
            sum((torch.count_nonzero(~torch.isfinite(t)) for t in [*m.parameters(), *m.buffers()]
                 if t.is_floating_point()), torch.zeros((), dtype=torch.int64, device=self.device))
            for _, m in models])
        if collective and self.dist.enabled:
            import torch.distributed as tdist

            tdist.all_reduce(counts, op=tdist.ReduceOp.MAX)
        return ", ".join(f"{n:,} in the {name}" for (name, _), n in zip(models, counts.tolist()) if n)

    def _last_finite_text(self) -> str:
        if self.last_finite is None:
            return "no finite checkpoint was written in this run"
        path, step = self.last_finite
        return f"the last finite checkpoint is {path} (step {step})"

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error that ends a diverged run: what went non-finite where, and what to resume from."""
        advice = ("; lower the learning rates and continue with --resume" if self.last_finite is not None
                  else "; lower the learning rates and start again")
        return TrainingDiverged(f"training diverged: {what}; {self._last_finite_text()}{advice}")

    def _finish(self) -> FitResult:
        if self.checkpoint_step != self.step:
            self.save_checkpoint()
        if self.dist.enabled:
            self.replica_max_abs_diff = replica_max_abs_diff([self.g, self.d])
        if self.dist.is_main:
            if self.dist.enabled:
                log.info("DDP: parameters of the %d replicas differ by at most %g", self.dist.world_size,
                         self.replica_max_abs_diff)
                self.metrics.write({"step": self.step, "ddp_replica_max_abs_diff": self.replica_max_abs_diff})
            self.write_final_outputs()
            if self.trackers:
                if not (self.run_dir / "samples" / f"step_{self.step:06d}.png").exists():
                    self.trackers.image(self.step, self.run_dir / "final.png")
                self.trackers.finish({**self.last_record, **self.last_eval}, ok=True)
        return FitResult(self.step, self.epoch, self.run_dir, self.last_checkpoint)

    def write_final_outputs(self) -> None:
        """The final grid, losses.png (from metrics.jsonl, so resumed runs plot whole) and progress.gif.

        The GIF ends on the final grid, so it exists even when the run ended before its first sample grid.
        """
        final = save_grid(self.sample(self.fixed_noise), self.run_dir / "final.png")
        records = read_metrics(self.run_dir / "metrics.jsonl")
        plot_curves(records, ["loss_d", "loss_g"], self.run_dir / "losses.png", "GAN losses", "BCE loss")
        frames = sorted((self.run_dir / "samples").glob("step_*.png"))
        if not frames or frames[-1].name != f"step_{self.step:06d}.png":
            frames.append(final)
        save_gif(frames, self.run_dir / "progress.gif")
        log.info("run folder: %s (final.png, losses.png, progress.gif, checkpoints/)", self.run_dir)

    # ----- context --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT/SIGTERM end the current step, then a checkpoint is saved and :class:`Interrupted` raised."""
        def handler(signum, _frame):
            self.stop_signal = signum

        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    @contextlib.contextmanager
    def _progress(self):
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", self.step if self.resume_path else None) \
            if self.dist.is_main else None
        bar = progress_bar(self.console)
        self.task = bar.add_task("train", total=self.total_steps, completed=self.step, epoch="-", loss_d="-",
                                 loss_g="-", images_per_s="-", quality="")
        if not self.dist.is_main:
            yield bar
            return
        with bar:
            yield bar


# Settings the weights' shapes depend on (besides every model.* field): refused when they change on resume.
FIXED_MID_RUN = ("data.image_size", "data.channels")
# Settings that decide which images an epoch holds (a pre-position checkpoint can be placed only without change).
DATASET_KEYS = ("dataset", "data_root", "limit", "synthetic_size", "image_size", "channels")


def _flat(tree: dict, prefix: str = "") -> dict:
    """{'optim': {'lr_g': 1e-3}} -> {'optim.lr_g': 1e-3}, without the preset name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        elif prefix:
            flat[prefix + key] = value
    return flat


def _load_optimizer(opt: torch.optim.Optimizer, state: dict, name: str) -> list[str]:
    """Loads an optimiser's state but keeps the hyperparameters this run built it with.

    ``Optimizer.load_state_dict`` replaces every group setting (lr, betas, eps, fused, ...) with the saved
    ones, so a resumed run would silently train with the old learning rates. Returns the settings whose
    saved value differed, as 'lr(G) 0.0002 -> 0.001'.
    """
    fresh = [{k: v for k, v in group.items() if k != "params"} for group in opt.param_groups]
    opt.load_state_dict(state)
    changed = []
    for group, settings in zip(opt.param_groups, fresh):
        for key, value in settings.items():
            if group.get(key) != value and f"{key}({name})" not in (c.split(" ")[0] for c in changed):
                changed.append(f"{key}({name}) {group.get(key)!r} -> {value!r}")
        group.update(settings)
        # The step counters live where the kernel wants them: on the parameter's device for fused and
        # capturable Adam, on the CPU otherwise (load_state_dict placed them for the saved settings).
        on_device = settings.get("fused") or settings.get("capturable")
        for param in group["params"]:
            step = opt.state.get(param, {}).get("step")
            if isinstance(step, torch.Tensor):
                opt.state[param]["step"] = step.to(param.device if on_device else "cpu", torch.float32)
    return changed


@torch.no_grad()
def replica_max_abs_diff(modules: list[nn.Module]) -> float:
    """Largest difference of any parameter between DDP ranks (0.0 when the replicas are in sync)."""
    import torch.distributed as tdist

    flat = torch.cat([p.detach().float().reshape(-1) for m in modules for p in m.parameters()])  # channels-last safe
    high, low = flat.clone(), flat.clone()
    tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
    return float((high - low).max())  # deliberate sync: once, at the end of the run


@torch.no_grad()
def generate_images(model: Generator, noise: torch.Tensor, policy: PrecisionPolicy | None = None) -> torch.Tensor:
    """Runs ``model`` in eval mode (BatchNorm uses running statistics and updates none), restoring its mode."""
    was_training = model.training
    model.eval()
    try:
        with policy.autocast() if policy else contextlib.nullcontext():
            images = model(noise)
    finally:
        model.train(was_training)
    return images.float()
