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
from gantrain.engine.config import Config, from_dict, to_toml
from gantrain.engine.data import Shard, build_loader
from gantrain.engine.errors import CheckpointError, ConfigError
from gantrain.engine.images import plot_curves, read_metrics, save_gif, save_grid
from gantrain.engine.logging import DeviceStats, MetricsWriter, PhaseTimer, log, progress_bar, setup_logging
from gantrain.engine.models import Generator, build_models, sample_noise
from gantrain.engine.precision import PrecisionPolicy
from gantrain.engine.runtime import DistInfo, StopAgreement, configure_cuda, pick_device

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
        ``trainer.stop_reason`` to end the run cleanly (final checkpoint and outputs still written)."""
        self.console = console or Console(stderr=True)
        self.epoch_callbacks = list(epoch_callbacks)
        self.stop_reason: str | None = None
        self.last_record: dict = {}
        self.epoch_means: dict = {}  # loss_d, loss_g, d_real, d_fake over the last whole epoch (epoch callbacks)
        self.dist = dist_info
        self.resume_path = ckpt.find_resume(resume, cfg.run_dir) if resume else None
        resume_state = ckpt.load_checkpoint(self.resume_path) if self.resume_path else None
        self.cfg = self._resumed_config(cfg, resume_state)
        self.run_dir = self.cfg.run_dir
        self._prepare_run_dir(resume_state is not None)
        self.device = pick_device(self.cfg.run.device, self.dist.local_rank)
        self.policy = PrecisionPolicy(self.device, self.cfg.perf.amp, self.cfg.perf.channels_last)
        self._build_data()
        self._build_models()
        self._build_state()
        if resume_state is not None:
            self.load_state(resume_state, self.resume_path)
        self.tracker = self._build_tracker()

    # ----- construction -------------------------------------------------------------------------------
    def _resumed_config(self, cfg: Config, state: dict | None) -> Config:
        """A resumed run keeps the checkpoint's model; the run may change schedule and output options."""
        if state is None:
            return cfg
        saved = from_dict({k: v for k, v in state["config"].items() if k != "preset"})
        if saved.model != cfg.model or saved.data.image_size != cfg.data.image_size or saved.data.channels != cfg.data.channels:
            raise CheckpointError(f"{self.resume_path}: the checkpoint's model config differs from this run's "
                                  f"(preset {state['config'].get('preset')}); pass the same --preset/--config")
        return cfg

    def _prepare_run_dir(self, resuming: bool) -> None:
        if not self.dist.is_main:
            return
        if not resuming and (self.run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(f"--out: {self.run_dir} already holds a run; continue it with --resume auto "
                              "or choose another --out")
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        world, batch = self.dist.world_size, self.cfg.data.batch_size
        effective = f"\n# effective batch: {batch} per process x {world} process(es) = {batch * world}\n"
        (self.run_dir / "config.toml").write_text(to_toml(self.cfg) + effective)
        setup_logging(self.console, self.run_dir / "train.log")

    def _build_data(self) -> None:
        shard = Shard(self.dist.rank, self.dist.world_size)
        self.loader = build_loader(self.cfg.data, self.cfg.run.seed, self.device, shard, policy=self.policy)
        run = self.cfg.run
        by_epochs = run.epochs * self.loader.steps_per_epoch
        self.total_steps = min(by_epochs, run.max_steps) if run.max_steps else by_epochs
        global_batch = self.cfg.data.batch_size * self.dist.world_size
        if self.dist.is_main:
            log.info("%s: %d images, %d steps/epoch, batch %d x %d processes = %d, %d steps in total",
                     self.cfg.data.dataset, self.loader.num_images, self.loader.steps_per_epoch,
                     self.cfg.data.batch_size, self.dist.world_size, global_batch, self.total_steps)
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
        self.step = 0
        self.noise_gen = torch.Generator(self.device).manual_seed(cfg.run.seed * 7919 + 1 + self.dist.rank)
        fixed_gen = torch.Generator().manual_seed(cfg.run.seed)
        self.fixed_noise = sample_noise(NUM_FIXED_SAMPLES, cfg.model.nz, cfg.loss.noise, "cpu", fixed_gen).to(self.device)
        self.real_target = torch.full((b,), 1.0 - cfg.loss.label_smoothing, device=self.device)
        self.fake_target = torch.zeros(b, device=self.device)
        self.gen_target = torch.ones(b, device=self.device)
        self.stats, self.timer = DeviceStats(self.device), PhaseTimer(self.device)
        self.stop_signal: int | None = None  # the signal this process received
        self.agreed_stop: int | None = None  # the one every rank acts on, at the same step (StopAgreement)
        self.stop_agreement = StopAgreement(self.dist.enabled)
        self.last_checkpoint: Path | None = None
        self.best_fd: float | None = None
        self.last_eval: dict = {}  # the latest quality-metrics record (--eval-every), for epoch callbacks

    def _build_tracker(self):
        """Quality metrics every --eval-every epochs, on rank 0 (the extractor is fitted here when missing)."""
        if not self.cfg.run.eval_every or not self.dist.is_main:
            return None
        from gantrain.engine.metrics.tracking import QualityTracker

        return QualityTracker(self.cfg, self.device, self.console, best_fd=self.best_fd)

    # ----- the loop ------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        steps_per_epoch = self.loader.steps_per_epoch
        with self._signals(), self._progress() as bar:
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, steps_per_epoch)
                self._train_epoch(epoch, start, bar)
                if self.agreed_stop is not None:
                    self.stop_agreement.close()
                    raise Interrupted(self.agreed_stop, self.save_checkpoint())
                if self.step % steps_per_epoch == 0:
                    self.epoch_means = self.stats.read_epoch()
                    self._end_epoch(epoch + 1, bar)
                    for callback in self.epoch_callbacks:
                        callback(self, epoch + 1)
                if self.stop_reason:
                    log.warning("stopping at step %d: %s", self.step, self.stop_reason)
                    break
        self.stop_agreement.close()
        return self._finish()

    def _end_epoch(self, epochs_done: int, bar) -> None:
        """In this order: quality metrics, the checkpoint (it stores the best FD), then best.pt when FD improved."""
        improved = self._evaluate_quality(epochs_done, bar) if self.tracker and self.tracker.due(epochs_done) else False
        if epochs_done % self.cfg.run.checkpoint_every == 0:
            self.save_checkpoint()
        if improved:
            ckpt.save_best(self.run_dir / "checkpoints", self.step, self.state_dict)

    def _evaluate_quality(self, epochs_done: int, bar) -> bool:
        generator = self.g_ema if self.g_ema is not None else self.g
        record, improved = self.tracker.evaluate(generator, self.step, epochs_done)
        self.best_fd, self.last_eval = self.tracker.best_fd, record
        self.metrics.write(record)
        self.tracker.plot(self.run_dir)
        summary = self.tracker.summary(record)
        bar.update(self.task, quality=f" | {summary}")
        log.info("epoch %d: %s (%d samples, %.1f s)%s", epochs_done, summary, record["eval_samples"], record["eval_s"],
                 ", best so far: checkpoints/best.pt" if improved else "")
        return improved

    def _train_epoch(self, epoch: int, start: int, bar) -> None:
        self.window_start = time.perf_counter(), self.step
        batches = self.loader.epoch(epoch, start)
        while self.step < self.total_steps and self.agreed_stop is None:
            with self.timer.phase("data"):
                real = next(batches, None)
            if real is None:
                break
            self.train_step(real)
            self.step += 1
            self._after_step(epoch, bar)
            self.agreed_stop = self.stop_agreement.after_step(self.stop_signal)

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
        if not self.dist.is_main:
            return
        record = {"step": self.step, "epoch": epoch + 1, **{k: round(v, 5) for k, v in stats.items()},
                  "images_per_s": round(images_per_s, 1),
                  **{f"{k}_ms": round(v / steps, 2) for k, v in phases_ms.items()}, "time": time.time()}
        self.last_record = record
        self.metrics.write(record)
        bar.update(self.task, completed=self.step, epoch=f"{epoch + 1}/{self.cfg.run.epochs}",
                   loss_d=f"{stats['loss_d']:.3f}", loss_g=f"{stats['loss_g']:.3f}", images_per_s=f"{images_per_s:.0f}")

    def sample(self, noise: torch.Tensor) -> torch.Tensor:
        """Images from the EMA generator when on, else G; eval mode, no grad, BatchNorm statistics untouched."""
        model = self.g_ema if self.g_ema is not None else self.g
        return generate_images(model, noise, self.policy)

    def write_samples(self) -> Path:
        return save_grid(self.sample(self.fixed_noise), self.run_dir / "samples" / f"step_{self.step:06d}.png")

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"step": self.step, "epoch": self.step // self.loader.steps_per_epoch, "config": self.cfg.to_dict(),
                 "generator": self.g.state_dict(), "discriminator": self.d.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "scaler": self.policy.scaler.state_dict(), "rng": rng, "world_size": self.dist.world_size}
        if self.g_ema is not None:
            state["generator_ema"] = self.g_ema.state_dict()
        if self.best_fd is not None:
            state["best_fd"] = self.best_fd
        return state

    def load_state(self, state: dict, path: Path | str) -> None:
        ckpt.load_module_state(self.g, state["generator"], "generator", path)
        ckpt.load_module_state(self.d, state["discriminator"], "discriminator", path)
        if self.g_ema is not None:
            ckpt.load_module_state(self.g_ema, state.get("generator_ema", state["generator"]), "EMA generator", path)
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        if state.get("scaler"):
            self.policy.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.best_fd = state.get("best_fd")
        self._load_rng(state["rng"])
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def _load_rng(self, rng: dict) -> None:
        torch.set_rng_state(rng["torch"])
        if self.dist.world_size == 1 and rng["noise"].numel() == self.noise_gen.get_state().numel():
            self.noise_gen.set_state(rng["noise"])
        else:  # another world size or device: a fresh, still deterministic, per-rank stream
            self.noise_gen.manual_seed(self.cfg.run.seed * 7919 + 1 + self.dist.rank + self.step)
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def save_checkpoint(self) -> Path | None:
        if self.dist.is_main and self.step > 0:
            self.last_checkpoint = ckpt.save_checkpoint(self.state_dict(), self.run_dir / "checkpoints", self.step,
                                                        self.cfg.run.keep_checkpoints)
        return self.last_checkpoint

    def _finish(self) -> FitResult:
        if self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:08d}.pt"):
            self.save_checkpoint()
        if self.dist.enabled:
            self.replica_max_abs_diff = replica_max_abs_diff([self.g, self.d])
        if self.dist.is_main:
            if self.dist.enabled:
                log.info("DDP: parameters of the %d replicas differ by at most %g", self.dist.world_size,
                         self.replica_max_abs_diff)
                self.metrics.write({"step": self.step, "ddp_replica_max_abs_diff": self.replica_max_abs_diff})
            self.write_final_outputs()
        epochs_done = self.step // self.loader.steps_per_epoch
        return FitResult(self.step, epochs_done, self.run_dir, self.last_checkpoint)

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
        """SIGINT/SIGTERM end the current step (under DDP: the step all ranks agree on, one later), then rank 0
        saves a checkpoint and :class:`Interrupted` is raised on every rank."""
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
