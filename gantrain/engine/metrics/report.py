"""``gantrain eval`` behind the CLI: evaluate a checkpoint (or real data against itself), show a rich table,
write JSON."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from gantrain.engine.config import Config, override, with_env_defaults
from gantrain.engine.errors import ConfigError
from gantrain.engine.metrics import inception as inc
from gantrain.engine.metrics.evaluate import Evaluator, MetricReport, generated_batches
from gantrain.engine.metrics.reference import load_split, parse_dataset
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.files import atomic_write_text

_HIST_BAR_WIDTH = 30
EXTRACTOR_KEYS = ("label", "task", "test_accuracy", "train_sha256", "epochs", "weights_sha256")
_ROWS = (  # key, label, how to read it
    ("fd", "Fréchet distance (FD)", "lower is better; real-vs-real gives the floor"),
    ("kid", "KID (mean ± std)", "lower is better; unbiased, ~0 for matching distributions"),
    ("precision", "precision", "share of generated images on the real manifold (fidelity)"),
    ("recall", "recall", "share of real images on the generated manifold (diversity)"),
    ("density", "density", "real neighbourhoods per generated image / k; ~1 when matched (fidelity)"),
    ("coverage", "coverage", "share of real neighbourhoods holding a generated image (falls with dropped modes)"),
    ("classifier_score", "classifier score", "exp E[KL(p(y|x) || p(y))]; max = number of classes"),
)


@dataclass
class EvalResult:
    """One `gantrain eval`: the metrics and what they were computed from."""

    mode: str
    """generator or real-vs-real."""
    report: MetricReport
    extractor: dict[str, Any]
    checkpoint: str | None = None
    step: int | None = None
    seed: int = 0
    inception: dict[str, Any] | None = None
    """With --inception: inception_fid, inception_kid_mean/std, num_real, seconds_per_1000 and the network's
    provenance (package, file, SHA-256)."""
    inception_note: str = "not requested (--inception)"

    @property
    def warnings(self) -> list[str]:
        """What the sample sizes make unreliable, domain metrics first."""
        return [*self.report.warnings, *(self.inception or {}).get("warnings", [])]

    @property
    def inception_fid(self) -> float | None:
        return self.inception["inception_fid"] if self.inception else None

    def to_json(self) -> dict[str, Any]:
        values = self.report.values
        return {"mode": self.mode, "checkpoint": self.checkpoint, "step": self.step, "seed": self.seed,
                "dataset": self.extractor["label"], "num_generated": self.report.num_generated,
                "num_real": self.report.num_real,
                "metrics": {k: v for k, v in values.items() if not k.startswith("hist_")},
                "class_histogram": self.report.histogram, "inception_fid": self.inception_fid,
                "inception": self.inception, "inception_note": self.inception_note, "seconds": round(self.report.seconds, 2),
                "warnings": self.warnings,
                "extractor": {k: self.extractor[k] for k in EXTRACTOR_KEYS}}


def evaluate_checkpoint(checkpoint: Path, *, num_samples: int, seed: int = 0, device: str = "auto",
                        data_root: str | None = None, cache: str | None = None, use_ema: bool = True,
                        inception: bool = False, console: Console | None = None) -> EvalResult:
    """Metrics of a checkpoint's generator (its EMA copy when present) against the real test split; with
    ``inception`` also the standard FID/KID (raises :class:`InceptionUnavailable` without the fid extra, before
    any work)."""
    from gantrain.engine.outputs.generate import load_generator

    if inception:
        inc.network_file()  # refuse at once, not after minutes of domain metrics
    generator, cfg = load_generator(checkpoint, device, use_ema)
    cfg = _eval_config(cfg, data_root, cache)
    evaluator = Evaluator.for_config(cfg, device=next(generator.parameters()).device, console=console)
    report = evaluator.evaluate(generator, cfg, num_samples=num_samples, seed=seed)
    result = EvalResult("generator", report, evaluator.reference.extractor.info, str(checkpoint),
                        _checkpoint_step(checkpoint), seed)
    if inception:
        device_ = next(generator.parameters()).device
        fake = generated_batches(generator, cfg, evaluator.reference.spec, num_samples, seed, device_)
        _add_inception(result, evaluator.reference.spec, fake, num_samples, cache, seed, device_)
    return result


def evaluate_real(cfg: Config, *, num_samples: int, seed: int = 0, data_root: str | None = None,
                  cache: str | None = None, device: str = "cpu", console: Console | None = None,
                  inception: bool = False) -> EvalResult:
    """The floor: two disjoint halves of the real test split compared with each other (with ``inception``
    also in Inception features: the floor of the standard FID at this sample size)."""
    if inception:
        inc.network_file()
    cfg = _eval_config(cfg, data_root, cache)
    evaluator = Evaluator.for_config(cfg, device=device, console=console)
    report = evaluator.real_vs_real(num_samples=num_samples, seed=seed)
    result = EvalResult("real-vs-real", report, evaluator.reference.extractor.info, seed=seed)
    if inception:
        net = inc.load_inception(device)
        half_a, half_b = evaluator.real_halves(report.num_generated, seed)
        started = time.perf_counter()
        fake, _ = inc.extract_features(net, half_a.split(inc.BATCH * 10))
        real, _ = inc.extract_features(net, half_b.split(inc.BATCH * 10))
        seconds = time.perf_counter() - started
        result.inception = {**inc.inception_scores(fake, real, seed=seed), "num_real": len(real),
                            "seconds_per_1000": round(1000 * seconds / (len(fake) + len(real)), 1),
                            "network": net.provenance}
        result.inception_note = "real half A vs real half B, Inception-v3 pool features"
    return result


def real_config(checkpoint: Path | None, dataset: str | None, data_root: str | None) -> Config:
    """The config naming the data of `gantrain eval --real-vs-real`: the checkpoint's, or a preset for --dataset."""
    from gantrain.engine.config import preset
    from gantrain.engine.outputs.generate import load_generator

    if dataset is None:
        if checkpoint is None:
            raise ConfigError("--real-vs-real needs a CHECKPOINT (for its dataset) or --dataset")
        return load_generator(checkpoint, "cpu")[1]
    spec = parse_dataset(dataset, data_root)
    if spec.dataset == "folder":
        return override(preset("cats64"), {"data_root": str(spec.root), "channels": spec.channels})
    return override(preset("mnist32" if spec.dataset == "mnist" else "fashion32"), {"data_root": data_root})


def _eval_config(cfg: Config, data_root: str | None, cache: str | None) -> Config:
    """The data root: --data-root, else the checkpoint's, else $GANTRAIN_DATA. A checkpoint's metrics_cache may
    name another machine's folder: only the command line or the env decide."""
    return with_env_defaults(override(cfg, {"data_root": data_root, "metrics_cache": cache or ""}))


def _checkpoint_step(path: Path) -> int | None:
    from gantrain.engine.outputs.export import export_step, is_export
    from gantrain.engine.state.checkpoint import load_checkpoint

    return export_step(path) if is_export(path) else int(load_checkpoint(path)["step"])


def _add_inception(result: EvalResult, spec, fake_batches, num_generated: int, cache: str | None, seed: int,
                   device: torch.device) -> None:
    """The standard FID/KID of the generated images against as many real test images (at most the split)."""
    net = inc.load_inception(device)
    log.info("computing the Inception FID (Inception-v3 at 299 px: slow on a CPU)")
    started = time.perf_counter()
    fake, _ = inc.extract_features(net, fake_batches)
    seconds = time.perf_counter() - started
    real = inc.real_inception_features(net, spec, min(num_generated, _test_size(spec)), cache=cache)
    result.inception = {**inc.inception_scores(fake, real, seed=seed), "num_real": len(real),
                        "seconds_per_1000": round(1000 * seconds / max(len(fake), 1), 1), "network": net.provenance}
    result.inception_note = f"{len(fake)} generated vs {len(real)} real test images, Inception-v3 pool features"


def _test_size(spec) -> int:
    return len(load_split(spec, "test").images)


def render(result: EvalResult) -> list[Table]:
    """The metrics table and the class-histogram table."""
    return [_metrics_table(result), _histogram_table(result)]


def _metrics_table(result: EvalResult) -> Table:
    values, info = result.report.values, result.extractor
    what = result.checkpoint if result.mode == "generator" else "real vs real (two halves of the test split)"
    table = Table(title=f"gantrain eval: {what}", caption=_caption(result), show_lines=False)
    table.add_column("metric", style="bold", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("reading")
    for key, label, reading in _ROWS:
        value = _kid(values["kid_mean"], values["kid_std"]) if key == "kid" else f"{values[key]:.4f}"
        table.add_row(label, value, reading)
    if result.inception:
        table.add_row("Inception FID", f"{result.inception['inception_fid']:.3f}", result.inception_note)
        table.add_row("Inception KID", _kid(result.inception["inception_kid_mean"], result.inception["inception_kid_std"]),
                      "the standard KID (Inception features)")
    else:
        table.add_row("Inception FID", "-", result.inception_note)
    table.add_row("extractor", f"{100 * info['test_accuracy']:.2f}%", f"{info['label']} {info['task']} "
                  f"accuracy on the test split")
    return table


def _kid(mean: float, std: float) -> str:
    """KID as ``mean ± std``; a spread that was not measured (both sets whole in every subset) reads n/a."""
    return f"{mean:.5f} ± {std:.5f}" if math.isfinite(std) else f"{mean:.5f} ± n/a"


def _caption(result: EvalResult) -> str:
    step = f"step {result.step}, " if result.step is not None else ""
    return (f"{step}{result.report.num_generated} generated vs {result.report.num_real} real test images, "
            f"seed {result.seed}, {result.report.seconds:.1f} s")


def _histogram_table(result: EvalResult) -> Table:
    histogram = result.report.histogram
    table = Table(title="predicted classes of the generated images (mode collapse shows as spikes and gaps)")
    table.add_column("class", no_wrap=True)
    table.add_column("share", justify="right")
    table.add_column("")
    largest = max(histogram.values(), default=0.0) or 1.0
    for name, share in histogram.items():
        table.add_row(name, f"{100 * share:.1f}%", "█" * round(share / largest * _HIST_BAR_WIDTH))
    return table


def write_json(result: EvalResult, path: Path) -> Path:
    """The results as strict JSON (a non-finite metric is null), written atomically; raises RunIOError."""
    return atomic_write_text(path, json.dumps(_strict(result.to_json()), indent=2, allow_nan=False) + "\n")


def _strict(value: Any) -> Any:
    """NaN and infinity (a collapsed generator's FD can be either) as null: RFC 8259 JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
