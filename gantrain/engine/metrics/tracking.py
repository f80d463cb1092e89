"""Quality tracking during training (``--eval-every N``): the Trainer's view of the metrics.

At the end of every N-th epoch (rank 0 only) the generator (its EMA copy when on) makes ``--eval-samples``
images from a fixed noise in eval mode, so BatchNorm statistics are untouched, and no RNG stream of the
run is advanced: a run with evaluation trains exactly as one without. The metrics go to metrics.jsonl and
the progress bar; the checkpoint with the lowest FD so far is kept as ``checkpoints/best.pt``; the best FD
is stored in every checkpoint so a resumed run keeps comparing against it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from gantrain.engine.config import Config
from gantrain.engine.images import plot_curves, read_metrics
from gantrain.engine.metrics import inception
from gantrain.engine.metrics.evaluate import METRIC_KEYS, Evaluator
from gantrain.engine.runlog import log

PLOT_PRIMARY = ("fd",)
PLOT_SECONDARY = ("precision", "recall", "coverage", "kid_mean")


class Outputs(Protocol):
    """Where an evaluation shows (a run's :class:`~gantrain.engine.outputs.RunOutputs`; metrics import no trainer
    part)."""

    run_dir: Path

    def write(self, record: dict) -> None: ...

    def show_quality(self, summary: str) -> None: ...


class QualityTracker:
    """Evaluates at epoch ends and remembers the best FD."""

    def __init__(self, cfg: Config, device: torch.device, console: Console, best_fd: float | None = None) -> None:
        self.cfg = cfg
        self.inception = inception.requested(cfg.run.eval_metrics)
        if self.inception:  # refused here, at start, not at the first evaluation an epoch later
            inception.load_inception(device)
        # Built before the training bar goes live: fitting the extractor shows its own progress bar here.
        self.evaluator = Evaluator.for_config(cfg, device=device, console=console, quiet=False)
        self.evaluator.quiet = True  # inside the loop the training bar is the one live display
        self.best_fd = best_fd
        self.last_record: dict = {}  # the last evaluation's metrics.jsonl record

    def due(self, epochs_done: int) -> bool:
        every = self.cfg.run.eval_every
        return every > 0 and epochs_done % every == 0

    def evaluate(self, generator: torch.nn.Module, step: int, epochs_done: int) -> tuple[dict, bool]:
        """The metrics.jsonl record of one evaluation, and whether its FD is the best so far."""
        run = self.cfg.run
        started = time.perf_counter()
        # The run seed fixes the evaluation noise: every evaluation of a run sees the same latents.
        report = self.evaluator.evaluate(generator, self.cfg, num_samples=run.eval_samples, seed=run.seed)
        fd = report.values["fd"]
        improved = self.best_fd is None or fd < self.best_fd
        if improved:
            self.best_fd = fd
        values = dict(report.values)
        if self.inception:
            values.update(inception.generator_scores(generator, self.cfg, self.evaluator.reference.spec,
                                                     num_samples=run.eval_samples, seed=run.seed,
                                                     cache=self.cfg.run.metrics_cache or None))
        record = {"step": step, "epoch": epochs_done, **{k: round(v, 6) for k, v in values.items()},
                  "best_fd": round(self.best_fd, 6), "eval_samples": run.eval_samples,
                  "eval_s": round(time.perf_counter() - started, 2), "time": time.time()}
        return record, improved

    def evaluate_epoch(self, generator: torch.nn.Module, step: int, epochs_done: int, outputs: Outputs) -> bool:
        """One evaluation at an epoch end, everywhere it shows: metrics.jsonl and the --logger trackers (through
        ``outputs``), metrics.png, the progress bar and a line in the log. Returns whether the FD is the best so
        far."""
        record, improved = self.evaluate(generator, step, epochs_done)
        self.last_record = record
        outputs.write(record)
        self.plot(outputs.run_dir)
        summary = self.summary(record)
        outputs.show_quality(summary)
        log.info("epoch %d: %s (%d samples, %.1f s)%s", epochs_done, summary, record["eval_samples"], record["eval_s"],
                 ", best so far: checkpoints/best.pt" if improved else "")
        return improved

    @staticmethod
    def summary(record: dict) -> str:
        """Short text for the progress bar and the log."""
        text = (f"FD {record['fd']:.2f} KID {record['kid_mean']:.4f} P {record['precision']:.2f} "
                f"R {record['recall']:.2f} C {record['coverage']:.2f} CS {record['classifier_score']:.2f}")
        return text + (f" Inception FID {record['inception_fid']:.1f}" if "inception_fid" in record else "")

    @staticmethod
    def plot(run_dir: Path) -> Path | None:
        """metrics.png: FD (left axis) and precision, recall, coverage, KID (right axis) against the step."""
        records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "fd" in r]
        return plot_curves(records, PLOT_PRIMARY, run_dir / "metrics.png", "Quality metrics (domain extractor)",
                           "Fréchet distance", secondary=PLOT_SECONDARY, secondary_ylabel="precision, recall, coverage, KID")


__all__ = ["METRIC_KEYS", "QualityTracker"]
