"""What a run shows and writes besides checkpoints (rank 0): the run folder with config.toml and train.log,
metrics.jsonl and the live progress bar at the log cadence, the fixed-noise sample grids, and at the end the
final grid, the loss plot and the progress GIF (cf. torchtitan ``components/metrics.py``).

Records are built from statistics already reduced at log time; nothing here runs per step but :meth:`due`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch
from rich.console import Console

from gantrain.engine.config import Config, to_toml
from gantrain.engine.data.discovery import refuse_writing_inside
from gantrain.engine.errors import ConfigError, RunIOError
from gantrain.engine.gan.hardware import peak_mem_gib
from gantrain.engine.outputs.images import plot_curves, read_metrics, save_gif, save_grid
from gantrain.engine.outputs.runlog import MetricsWriter, attach_log_file, progress_bar
from gantrain.engine.outputs.trackers import Trackers, check_loggers, parse_loggers
from gantrain.engine.state.files import atomic_write_text, make_folder, os_reason
from gantrain.engine.state.rundir import RunDir

log = logging.getLogger("gantrain")


#: Seconds between the progress lines of a console that is not a terminal (no bar is drawn there).
PLAIN_LINE_EVERY_S = 30.0


def _clock(seconds: float) -> str:
    """``seconds`` as H:MM:SS, as the bar's ETA reads."""
    whole = max(int(round(seconds)), 0)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class RunOutputs:
    """The run folder's files and the console, for one run; every method is a no-op off rank 0."""

    def __init__(self, cfg: Config, console: Console, is_main: bool, world_size: int) -> None:
        self.cfg, self.console, self.is_main, self.world_size = cfg, console, is_main, world_size
        self.run_dir, self.files = cfg.run_dir, RunDir(cfg.run_dir)
        self.metrics: MetricsWriter | None = None
        self.trackers: Trackers | None = None
        self.last_record: dict = {}
        self.last_eval: dict = {}
        self.roof: tuple[float, float] | None = None  # (model FLOPs per image, the ranks' summed peak TFLOP/s)
        self.roof_how, self.said_mfu_over_peak = "", False
        # the bar's epoch count (:meth:`live` sets them)
        self.per_epoch, self.epochs_in_run, self.epoch_origin = 1, cfg.run.epochs, 0
        self.device: torch.device | None = None
        # a console that is not a terminal gets a line at most every PLAIN_LINE_EVERY_S (:meth:`live` sets them)
        self.plain_lines, self.plain_line_at, self.plain_line_step, self.total_steps = False, time.perf_counter(), 0, 0

    @staticmethod
    def check(cfg: Config, resuming: bool) -> None:
        """Refuses, before anything is written, what the outputs cannot do: a new run into a folder that holds
        one (its checkpoints/last.pt), a --logger whose extra is missing."""
        if not resuming and RunDir(cfg.run_dir).last.exists():
            raise ConfigError(f"--out: {cfg.run_dir} already holds a run; continue it with "
                              f"{cfg.resume_flags} or choose another --out")
        RunOutputs.refuse_an_out_inside_the_images(cfg)
        check_loggers(parse_loggers(cfg.logging.logger))

    @staticmethod
    def refuse_an_out_inside_the_images(cfg: Config) -> None:
        """A run folder inside the image folder it trains on is refused (see
        :func:`~gantrain.engine.data.discovery.refuse_writing_inside`); a pure check of the config, made before
        the run folder is touched (its lock)."""
        if cfg.data.dataset == "folder":
            refuse_writing_inside(cfg.data.data_root, cfg.run_dir, "--out")

    def describe(self, loader, total_steps: int, device: torch.device, precision: str) -> None:
        """The run's first lines in the log: the data and the schedule, then the device and how it computes."""
        if not self.is_main:
            return
        data, world = self.cfg.data, self.world_size
        log.info("%s: %d images, %d steps/epoch, batch %d x %d processes = %d, %d steps in total", data.dataset,
                 loader.num_images, loader.steps_per_epoch, data.batch_size, world, data.batch_size * world, total_steps)
        log.info("device %s, %s, %s loader%s", device, precision, type(loader).__name__,
                 ", torch.compile" if self.cfg.perf.compile else "")
        idle = self.cfg.without_effect(distributed=world > 1)
        if idle:
            log.warning("settings without effect in this run: %s", "; ".join(idle))

    def set_roof(self, flops_per_image: float, peak_tflops: float, device: torch.device, how: str) -> None:
        """What MFU divides by from now on: the model FLOPs of one image's step and the peak of every rank together
        (``how`` says where the peak comes from, in the log's words)."""
        self.roof, self.device, self.roof_how = (flops_per_image, peak_tflops), device, how
        if self.is_main:
            log.info("MFU = images/s x %.3g GFLOP/image over %.3g TFLOP/s (%s)", flops_per_image / 1e9, peak_tflops,
                     how)

    def prepare(self, resuming: bool, notes: list[str], step: int = 0) -> None:
        """Writes config.toml (atomically), starts train.log with the lines held since start-up, clears the
        sample grids of an earlier run into this folder that saved no checkpoint, and opens the --logger
        trackers (continuing their runs from ``step`` on resume). Raises :class:`RunIOError`."""
        if not self.is_main:
            return
        stale_grids = [] if resuming else self.files.sample_grids()
        leftovers = [] if resuming else [p.name for p in (self.files.metrics, self.files.final_grid) if p.exists()]
        make_folder(self.files.samples)
        batch = self.cfg.data.batch_size
        effective = f"\n# effective batch: {batch} per process x {self.world_size} process(es) = {batch * self.world_size}\n"
        atomic_write_text(self.files.config, to_toml(self.cfg) + effective)
        try:
            attach_log_file(self.files.log)
        except OSError as exc:
            raise RunIOError(f"cannot write {self.files.log}: {os_reason(exc)}") from None
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
        self.trackers = Trackers(self.cfg, self.run_dir, resume_step=step if resuming else None)

    @contextlib.contextmanager
    def live(self, step: int, total_steps: int, resuming: bool, steps_per_epoch: int = 0, epoch: int = 0,
             epoch_step: int = 0):
        """metrics.jsonl (cut back to ``step`` on resume) and the progress bar, for the training loop; the bar counts
        epochs of the run's real length (``total_steps``, which --max-steps may cut short of --epochs) from where
        the run stands (``epoch``, 0-based, and ``epoch_step`` steps into it: a resume with another world size
        has other steps per epoch than the steps before it)."""
        if self.is_main:
            self.metrics = MetricsWriter(self.files.metrics, step if resuming else None)
        self.bar = progress_bar(self.console, self.cfg.data.batch_size * self.world_size)
        self.per_epoch = max(steps_per_epoch, 1)
        self.epoch_origin = step - epoch_step - epoch * self.per_epoch  # the step epoch 0 would have started at
        self.epochs_in_run = -(-(total_steps - self.epoch_origin) // self.per_epoch)
        flops, peak = self.roof if self.roof is not None else (0.0, 0.0)
        self.task = self.bar.add_task("train", total=total_steps, completed=step, epoch=self._epoch_text(step),
                                      loss_d="-", loss_g="-", quality="",
                                      mfu_per_image_s=flops / (peak * 1e12) if peak > 0 else None)
        self.window = time.perf_counter(), step
        # the lines a console without a bar gets (a log file, a pipe; a terminal or Jupyter draws the bar)
        self.plain_lines = not (self.console.is_terminal or self.console.is_jupyter)
        self.plain_line_at, self.plain_line_step, self.total_steps = self.window[0], step, total_steps
        if not self.is_main:
            yield self
            return
        with self.bar:
            yield self

    def _epoch_text(self, step: int) -> str:
        return f"{min((step - self.epoch_origin) // self.per_epoch + 1, self.epochs_in_run)}/{self.epochs_in_run}"

    def advance(self, step: int) -> None:
        """The bar's step count (every step: a host-side counter, no device sync); rank 0 only. A console without
        a bar gets its lines at log steps (:meth:`log`); when 2 x PLAIN_LINE_EVERY_S pass without one (sparse log
        steps), a line between them, without the losses (they are reduced at log steps only)."""
        if not self.is_main:
            return
        self.bar.update(self.task, completed=step, epoch=self._epoch_text(step))
        if self.plain_lines and step % self.cfg.logging.log_every and step != self.total_steps \
                and time.perf_counter() - self.plain_line_at >= 2 * PLAIN_LINE_EVERY_S:
            self._plain_line(step, time.perf_counter(), "")

    def _plain_line(self, step: int, now: float, losses: str, images_per_s: float | None = None) -> None:
        """One progress line for a console without a bar: ``losses`` and ``images_per_s`` (the record's) at log
        steps, else the images/s since the previous line (``now``: the clock of this step's end); its MFU, and
        the ETA at that rate."""
        per_step = self.cfg.data.batch_size * self.world_size
        if images_per_s is None:
            images_per_s = (step - self.plain_line_step) * per_step / max(now - self.plain_line_at, 1e-9)
        self.plain_line_at, self.plain_line_step = now, step
        left = (self.total_steps - step) * per_step / images_per_s if images_per_s > 0 else 0.0
        flops, peak = self.roof if self.roof is not None else (0.0, 0.0)
        mfu_text = f", MFU {images_per_s * flops / (peak * 1e12):.0%}" if peak > 0 else ""
        self.console.print(f"step {step:,}/{self.total_steps:,} (epoch {self._epoch_text(step)}){losses} | "
                           f"{images_per_s:,.0f} img/s{mfu_text} | ETA {_clock(left)}", soft_wrap=True,
                           highlight=False, markup=False)

    def due(self, step: int, total_steps: int) -> tuple[bool, bool]:
        """(log now, write a sample grid now) after ``step``: grids every --sample-every steps and once early, at
        :meth:`early_grid_step` (0 --sample-every: only the final grid)."""
        logging = self.cfg.logging
        sample = bool(logging.sample_every) and (step % logging.sample_every == 0 or step == self.early_grid_step())
        return step % logging.log_every == 0 or step == total_steps, self.is_main and sample

    def early_grid_step(self) -> int | None:
        """The step of the early sample grid: a tenth of --sample-every (50 of 500), so a run stopped early has
        pictures; None when --sample-every is under 10 (grids come often anyway) or 0."""
        every = self.cfg.logging.sample_every
        return every // 10 if every >= 10 else None

    def start_window(self, step: int) -> None:
        self.window = time.perf_counter(), step

    def log(self, step: int, epoch: int, stats: dict[str, float], phases_ms: dict[str, float],
            rates: dict[str, float] | None = None) -> int:
        """Writes one record (means since the last log, images/s, MFU (a fraction), the process's peak memory in GiB,
        ms per phase per step, and ``rates``, the learning rates of the last update when --lr-decay changes them)
        and updates the bar; returns the first step of the window it covers."""
        t0, step0 = self.window
        now = time.perf_counter()
        steps = max(step - step0, 1)
        images_per_s = steps * self.cfg.data.batch_size * self.world_size / max(now - t0, 1e-9)
        self.window = now, step
        if self.is_main:
            roof = {}
            if self.roof is not None:
                flops, peak = self.roof
                roof = {"mfu": round(images_per_s * flops / (peak * 1e12), 5) if peak > 0 else None,
                        "peak_mem_gib": round(peak_mem_gib(self.device), 3)}
                if (roof["mfu"] or 0) > 1 and not self.said_mfu_over_peak:
                    self.said_mfu_over_peak = True
                    fix = ("measured while the machine was busy?; delete the cached peak to measure it again"
                           if "measured" in self.roof_how else "check the device it names")
                    log.warning("MFU %.0f%% at step %d: above the peak it divides by (%s), so that peak is too low "
                                "(%s)", 100 * roof["mfu"], step, self.roof_how, fix)
            record = {"step": step, "epoch": epoch + 1, **{k: round(v, 5) for k, v in stats.items()},
                      "images_per_s": round(images_per_s, 1), **roof,
                      **{f"{k}_ms": round(v / steps, 2) for k, v in phases_ms.items()}, **(rates or {}),
                      "time": time.time()}
            self.last_record = record
            self.write(record)
            self.bar.update(self.task, completed=step, epoch=self._epoch_text(step),
                            loss_d=f"{stats['loss_d']:.3f}", loss_g=f"{stats['loss_g']:.3f}")
            if self.plain_lines and now - self.plain_line_at >= PLAIN_LINE_EVERY_S:
                self._plain_line(step, now, f": D {stats['loss_d']:.3f} G {stats['loss_g']:.3f}", images_per_s)
        return step0 + 1

    def write(self, record: dict) -> None:
        """One more line of metrics.jsonl (the source of truth), and the same record to the --logger trackers."""
        if self.metrics is not None:
            self.metrics.write(record)
        if self.trackers is not None:
            self.trackers.record(record)
        if "fd" in record:
            self.last_eval = record

    def write_replica_diff(self, step: int, diff: float) -> None:
        """The end of a DDP run: how far the replicas' parameters drifted apart (0 when DDP kept them identical)."""
        if not self.is_main:
            return
        log.info("DDP: parameters of the %d replicas differ by at most %g", self.world_size, diff)
        self.write({"step": step, "ddp_replica_max_abs_diff": diff})

    def show_quality(self, summary: str) -> None:
        self.bar.update(self.task, quality=f" | {summary}")

    def write_samples(self, images: torch.Tensor, step: int) -> Path | None:
        """The fixed-noise grid ``samples/step_NNNNNN.png``."""
        if not self.is_main:
            return None
        path = save_grid(images, self.files.sample_grid(step))
        if self.trackers is not None:
            self.trackers.image(step, path)
        return path

    def write_final(self, images: torch.Tensor, step: int) -> None:
        """The final grid, losses.png (from metrics.jsonl, so resumed runs plot whole) and progress.gif.

        The GIF ends on the final grid, so it exists even when the run ended before its first sample grid.
        """
        if not self.is_main:
            return
        final = save_grid(images, self.files.final_grid)
        records = read_metrics(self.files.metrics)
        plot_curves(records, ["loss_d", "loss_g"], self.files.losses_plot, "GAN losses", "BCE loss")
        frames = self.files.sample_grids()
        captions = [f"step {self.files.grid_step(frame)}" for frame in frames]
        if not frames or frames[-1] != self.files.sample_grid(step):
            frames.append(final)
            captions.append(f"step {step} (final)")
        save_gif(frames, self.files.gif, captions=captions)
        shown = [self.files.final_grid, self.files.losses_plot, self.files.metrics_plot, self.files.gif]
        log.info("run folder: %s (%s, checkpoints/)", self.run_dir, ", ".join(p.name for p in shown if p.exists()))
        if self.trackers is not None:
            if not self.files.sample_grid(step).exists():
                self.trackers.image(step, final)
            self.trackers.finish({**self.last_record, **self.last_eval}, ok=True)
            self.trackers = None

    def close(self) -> None:
        """Closes the --logger trackers of a run that did not finish (marked unfinished); a failure to close is
        one warning, never a replacement of the run's own error."""
        trackers, self.trackers = self.trackers, None
        if trackers is None:
            return
        try:
            trackers.finish({**self.last_record, **self.last_eval}, ok=False)
        except Exception as exc:  # closing after a failure must not hide that failure
            log.warning("closing the --logger trackers failed: %s: %s", type(exc).__name__, exc)
