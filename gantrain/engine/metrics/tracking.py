"""Quality tracking during training (``--eval-every N``, ``--eval-every-steps``, ``--eval-every-images``): the
Trainer's view of the metrics.

When an evaluation is due (rank 0 only; the Trainer decides when) the generator (its EMA copy when on) makes
``--eval-samples`` images from a fixed noise in eval mode, so BatchNorm statistics are untouched, and no RNG stream of the
run is advanced: a run with evaluation trains exactly as one without. The metrics go to metrics.jsonl and
the progress bar; the checkpoint with the lowest FD so far is kept as ``checkpoints/best.pt``; the best FD
is stored in every checkpoint, with how it was measured (the extractor's weights, the sample count, the noise
seed), so a resumed run keeps comparing against it. A resume that measures otherwise (another --eval-samples or
--seed, a refitted extractor) first measures best.pt again its own way: FDs of two measurements do not compare.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from gantrain.engine.config import Config, EvalConfig
from gantrain.engine.gan.sampling import Latent
from gantrain.engine.errors import CheckpointError
from gantrain.engine.metrics import inception
from gantrain.engine.metrics.evaluate import METRIC_KEYS, Evaluator
from gantrain.engine.outputs.images import Panel, plot_panels, read_metrics
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.rundir import RunDir

#: metrics.png: one axis per scale.
QUALITY_PANELS = (
    Panel("Fréchet distance (lower is better)", ("fd", "inception_fid"), "FD"),
    Panel("KID (bars: its spread over subsets)", ("kid_mean", "inception_kid_mean"), "KID",
          spreads={"kid_mean": "kid_std", "inception_kid_mean": "inception_kid_std"}),
    Panel("precision, recall, density, coverage", ("precision", "recall", "density", "coverage"),
          "share (density may exceed 1)", unit_range=True),
    Panel("classifier score", ("classifier_score",), "score"),
)


class Outputs(Protocol):
    """Where an evaluation shows (a run's :class:`~gantrain.engine.outputs.writer.RunOutputs`; metrics import no trainer
    part)."""

    run_dir: Path

    def write(self, record: dict) -> None: ...

    def show_quality(self, summary: str) -> None: ...


class QualityTracker:
    """Evaluates when the Trainer asks and remembers the best FD. It takes its own section (``eval``), the
    :class:`Evaluator` of the run's data, the generator's latent space and the run's seed (the evaluation noise);
    :meth:`for_config` picks them from a whole config."""

    def __init__(self, eval_cfg: EvalConfig, evaluator: Evaluator, latent: Latent, *, seed: int, use_ema: bool,
                 device: torch.device, best_fd: float | None = None, best_measured_by: dict | None = None,
                 best_path: Path | None = None) -> None:
        """``best_fd``: a resumed run's best FD so far, measured as ``best_measured_by`` says (None: by a checkpoint
        from before that was stored); when that is not how this run measures, ``best_path`` (best.pt) is measured
        again (:meth:`_measure_best_again`, with its EMA generator when ``use_ema``)."""
        self.eval_cfg, self.latent, self.seed, self.use_ema, self.device = eval_cfg, latent, seed, use_ema, device
        self.inception = inception.requested(eval_cfg.eval_metrics)
        if self.inception:  # refused here, at start, not at the first evaluation an epoch later
            inception.load_inception(device, eval_cfg.inception_mode)
        self.evaluator = evaluator
        self.evaluator.quiet = True  # inside the loop the training bar is the one live display
        self.measured_by = {"extractor_weights_sha256": self.evaluator.reference.extractor.weights_sha256,
                            "eval_samples": eval_cfg.eval_samples, "eval_seed": seed}
        """How this run measures FD; stored in checkpoints beside the best FD."""
        spec = self.evaluator.reference.spec
        if spec.round_trip:  # real images made at the training size first (a best FD from before was biased)
            self.measured_by["real_images_via_px"] = spec.train_px
        self.best_fd = best_fd
        best_pt = best_path if best_path is not None and best_path.is_file() else None
        if best_fd is not None and (best_measured_by != self.measured_by or best_pt is None):
            self.best_fd = self._measure_best_again(best_fd, best_measured_by, best_pt)
        self.last_record: dict = {}  # the last evaluation's metrics.jsonl record

    @classmethod
    def for_config(cls, cfg: Config, device: torch.device, console: Console, **best) -> QualityTracker:
        """The tracker of a whole config (``best``: the keyword arguments of a resume). The extractor is fitted
        here when missing, with its own progress bar, before the training bar goes live."""
        evaluator = Evaluator.for_config(cfg, device=device, console=console, quiet=False)
        return cls(cfg.eval, evaluator, Latent.of(cfg), seed=cfg.run.seed, use_ema=cfg.gan.ema_on,
                   device=device, **best)

    def _measure_best_again(self, best_fd: float, measured_by: dict | None, best_pt: Path | None) -> float | None:
        """best.pt's FD as this run measures it (its EMA generator when this run keeps one), said in one log line;
        None, also said, when there is no best.pt (``best_pt`` None) or it cannot be read: the next evaluation then
        becomes the best."""
        if measured_by is None:
            how = "by a checkpoint that does not record how (written before gantrain stored it)"
        elif measured_by == self.measured_by:
            how = "as this run measures"
        else:
            names = {"extractor_weights_sha256": "extractor weights", "eval_samples": "--eval-samples",
                     "eval_seed": "seed", "real_images_via_px": "real images made at the training size, px"}
            how = "with " + ", ".join(
                f"{names.get(key, key)} {_short(measured_by.get(key))} (now {_short(value)})"
                for key, value in self.measured_by.items() if measured_by.get(key) != value)
        from gantrain.engine.outputs.generate import load_generator

        try:
            if best_pt is None:
                raise CheckpointError("there is no best.pt")
            with torch.random.fork_rng(devices=[]):  # building the network draws; the run's RNG stays untouched
                generator, _ = load_generator(best_pt, "cpu", use_ema=self.use_ema)
        except CheckpointError as exc:
            log.warning("resume: the best FD so far (%.4g) was measured %s, and best.pt cannot be measured again "
                        "(%s): the next evaluation starts the comparison afresh", best_fd, how, exc)
            return None
        generator = generator.to(self.device)
        fd = self.evaluator.evaluate(generator, self.latent, num_samples=self.eval_cfg.eval_samples,
                                     seed=self.seed).values["fd"]
        log.info("resume: best.pt's FD %.4g was measured %s; measured again as this run measures: FD %.4g", best_fd,
                 how, fd)
        return fd

    def evaluate(self, generator: torch.nn.Module, step: int, epoch: float) -> tuple[dict, bool]:
        """The metrics.jsonl record of one evaluation, and whether its FD is the best so far."""
        samples, seed = self.eval_cfg.eval_samples, self.seed
        started = time.perf_counter()
        # The run seed fixes the evaluation noise: every evaluation of a run sees the same latents.
        report = self.evaluator.evaluate(generator, self.latent, num_samples=samples, seed=seed)
        fd = report.values["fd"]
        improved = self.best_fd is None or fd < self.best_fd
        if improved:
            self.best_fd = fd
        values = dict(report.values)
        if self.inception:
            values.update(inception.generator_scores(generator, self.latent, self.evaluator.reference.spec,
                                                     self.eval_cfg.inception_mode,
                                                     num_samples=samples, seed=seed,
                                                     cache=self.eval_cfg.metrics_cache or None))
        record = {"step": step, "epoch": epoch, **{k: round(v, 6) for k, v in values.items()},
                  "best_fd": round(self.best_fd, 6), "eval_samples": samples,
                  "eval_s": round(time.perf_counter() - started, 2), "time": time.time()}
        return record, improved

    def evaluate_and_show(self, generator: torch.nn.Module, step: int, epoch: float, outputs: Outputs,
                          when: str) -> tuple[dict, bool]:
        """One evaluation after step ``step`` (``epoch``: epochs done, a fraction mid-epoch), everywhere it shows:
        metrics.jsonl and the --logger trackers (through ``outputs``), metrics.png, the progress bar and a log line
        that starts with ``when`` ("epoch 3", "step 1200"). Returns the record and whether its FD is the best so
        far."""
        record, improved = self.evaluate(generator, step, epoch)
        self.last_record = record
        outputs.write(record)
        self.plot(outputs.run_dir)
        summary = self.summary(record)
        outputs.show_quality(summary)
        log.info("%s: %s (%d samples, %.1f s)%s", when, summary, record["eval_samples"], record["eval_s"],
                 ", best so far: checkpoints/best.pt" if improved else "")
        return record, improved

    @staticmethod
    def summary(record: dict) -> str:
        """Short text for the progress bar and the log."""
        text = (f"FD {record['fd']:.2f} KID {record['kid_mean']:.4f} P {record['precision']:.2f} "
                f"R {record['recall']:.2f} C {record['coverage']:.2f} CS {record['classifier_score']:.2f}")
        return text + (f" Inception FID {record['inception_fid']:.1f}" if "inception_fid" in record else "")

    @staticmethod
    def plot(run_dir: Path) -> Path | None:
        """metrics.png from metrics.jsonl's evaluation records: one axis per scale (:data:`QUALITY_PANELS`: FD and
        Inception FID; KID with its spread as error bars; precision, recall, density, coverage from 0 to 1 (growing
        for a density above 1); the classifier score), points marked, against the step (the epoch on top)."""
        files = RunDir(run_dir)
        records = [r for r in read_metrics(files.metrics) if "fd" in r]
        return plot_panels(records, QUALITY_PANELS, files.metrics_plot, "Quality metrics (--eval-every)")


def _short(value) -> str:
    """A hash cut to 12 characters; other values as they are."""
    return value[:12] if isinstance(value, str) and len(value) == 64 else str(value)


__all__ = ["METRIC_KEYS", "QualityTracker"]
