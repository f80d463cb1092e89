"""``gantrain eval`` behind the CLI: evaluate a checkpoint (or real data against itself), show a rich table,
write JSON."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from gantrain.engine.config import Config, env_data_root, override, with_env_defaults
from gantrain.engine.data.download import IDX_DATASETS
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.sampling import Latent
from gantrain.engine.metrics import inception as inc
from gantrain.engine.metrics import sets
from gantrain.engine.metrics.evaluate import (FEATURE_BATCH, Evaluator, MetricReport, Reference, compare, extract,
                                              generated_batches)
from gantrain.engine.metrics.extractor import ensure_extractor
from gantrain.engine.metrics.reference import parse_dataset, split_count
from gantrain.engine.metrics.sets import Side
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
    source: str | None = None
    """What was compared, as named on the command line (a checkpoint, a folder)."""
    reference: str | None = None
    """What it was compared with (a folder, a .npz, a dataset's test split)."""
    total_seconds: float | None = None
    """The whole command's wall time (the CLI sets it), Inception features and fits included."""

    @property
    def warnings(self) -> list[str]:
        """What the sample sizes make unreliable, domain metrics first."""
        return [*self.report.warnings, *(self.inception or {}).get("warnings", [])]

    @property
    def reference_name(self) -> str:
        """What the source was compared with, as the table and the JSON name it: the reference given, else the
        extractor's dataset's test split."""
        return self.reference or f"{self.extractor['label']} test split"

    @property
    def inception_fid(self) -> float | None:
        return self.inception["inception_fid"] if self.inception else None

    def to_json(self) -> dict[str, Any]:
        values = self.report.values
        return {"mode": self.mode, "checkpoint": self.checkpoint, "source": self.source or self.checkpoint,
                "reference": self.reference_name, "step": self.step,
                "seed": self.seed,
                "dataset": self.extractor["label"], "num_generated": self.report.num_generated,
                "num_real": self.report.num_real,
                "metrics": {k: v for k, v in values.items() if not k.startswith("hist_")},
                "class_histogram": self.report.histogram, "inception_fid": self.inception_fid,
                "inception": self.inception, "inception_note": self.inception_note,
                "seconds": round(self.total_seconds if self.total_seconds is not None else self.report.seconds, 2),
                "domain_seconds": round(self.report.seconds, 2),
                "warnings": self.warnings,
                "extractor": {k: self.extractor[k] for k in EXTRACTOR_KEYS}}


def evaluate_checkpoint(checkpoint: Path, *, num_samples: int, seed: int = 0, device: str = "auto",
                        data_root: str | None = None, cache: str | None = None, use_ema: bool = True,
                        inception: bool = False, console: Console | None = None,
                        inception_mode: str = "legacy-tf") -> EvalResult:
    """Metrics of a checkpoint's generator (its EMA copy when present) against the real test split; with
    ``inception`` also the standard FID/KID (raises :class:`InceptionUnavailable` without the fid extra, before
    any work)."""
    from gantrain.engine.outputs.generate import load_generator

    if inception:
        inc.network_file()  # refuse at once, not after minutes of domain metrics
    generator, cfg = load_generator(checkpoint, device, use_ema)
    cfg = _eval_config(cfg, data_root, cache)
    evaluator = Evaluator.for_config(cfg, device=next(generator.parameters()).device, console=console)
    report = evaluator.evaluate(generator, Latent.of(cfg), num_samples=num_samples, seed=seed)
    result = EvalResult("generator", report, evaluator.reference.extractor.info, str(checkpoint),
                        _checkpoint_step(checkpoint), seed)
    if inception:
        device_ = next(generator.parameters()).device
        fake = generated_batches(generator, Latent.of(cfg), evaluator.reference.spec, num_samples, seed, device_)
        _add_inception(result, evaluator.reference.spec, fake, num_samples, cache, seed, device_, inception_mode)
    return result


def evaluate_real(cfg: Config, *, num_samples: int, seed: int = 0, data_root: str | None = None,
                  cache: str | None = None, device: str = "cpu", console: Console | None = None,
                  inception: bool = False, inception_mode: str = "legacy-tf") -> EvalResult:
    """The floor: two disjoint halves of the real test split compared with each other (with ``inception``
    also in Inception features: the floor of the standard FID at this sample size)."""
    if inception:
        inc.network_file()
    cfg = _eval_config(cfg, data_root, cache)
    evaluator = Evaluator.for_config(cfg, device=device, console=console)
    report = evaluator.real_vs_real(num_samples=num_samples, seed=seed)
    result = EvalResult("real-vs-real", report, evaluator.reference.extractor.info, seed=seed)
    if inception:
        net = inc.load_inception(device, inception_mode)
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


def evaluate_sets(source: Side, reference: Side | None, *, dataset: str | None = None, channels: int = 3,
                  num_samples: int = 10000, seed: int = 0, device: str = "auto", data_root: str | None = None,
                  cache: str | None = None, use_ema: bool = True, inception: bool = False, size: int | None = None,
                  console: Console | None = None, inception_mode: str = "legacy-tf") -> EvalResult:
    """``source`` (a checkpoint's generator, or an image folder) against ``reference`` (a folder, a dataset's test
    split, saved statistics; None: the checkpoint's or --dataset's test split), in the domain extractor of
    ``dataset``, else the checkpoint's, else the reference's (:mod:`gantrain.engine.metrics.sets`). Raises
    :class:`ConfigError` for a combination that names no extractor or no reference."""
    from gantrain.engine.dist.runtime import pick_device
    from gantrain.engine.metrics.reference import spec_from_config
    from gantrain.engine.outputs.generate import load_generator

    if inception:
        inc.network_file()  # refuse at once, not after minutes of domain metrics
    started = time.perf_counter()
    generator, cfg, stats = None, None, None
    if source.kind == "checkpoint":
        generator, cfg = load_generator(source.path, device, use_ema)
        cfg = _eval_config(cfg, data_root, cache)
    elif source.kind != "folder":
        raise ConfigError(f"{source.name}: the first argument is what is evaluated: a checkpoint, an exported "
                          "generator or an image folder")
    if reference is not None and reference.kind == "stats":
        stats = sets.load_stats(reference.path)
    if dataset is not None:
        spec = parse_dataset(dataset, data_root or env_data_root(), channels)
        saved = sets.stats_spec(stats[0]) if stats is not None else None
        if saved is not None and (saved.dataset != spec.dataset or (
                spec.dataset == "folder" and Path(saved.root).resolve() != Path(spec.root).resolve())):
            raise ConfigError(f"{reference.path}: statistics in the {stats[0]['label']} extractor's features, "
                              f"--dataset names {dataset}'s: drop --dataset, or save the statistics with it")
    elif stats is not None:
        spec = sets.stats_spec(stats[0]).extractor_spec()
    elif reference is not None and reference.kind == "dataset":
        spec = reference.spec
    elif cfg is not None:
        spec = spec_from_config(cfg).extractor_spec()
    elif reference is not None and reference.kind == "folder":
        spec = sets.folder_spec(reference.path, channels)
    else:
        raise ConfigError(f"{source.name}: an image folder needs a REFERENCE (a folder, a dataset such as "
                          "fashion-mnist, a .npz from --save-stats) or --dataset")
    if size is not None and generator is not None:
        raise ConfigError("--size: decodes image folders; a generator makes its images at its training size")
    run_device = pick_device(device) if generator is None else next(generator.parameters()).device
    if generator is not None:
        train_px = cfg.data.image_size
        fake_images = None
        fake_batches = lambda: generated_batches(generator, Latent.of(cfg), spec, num_samples, seed,  # noqa: E731
                                                 run_device)
        num_fake = num_samples
    else:
        fake_images, train_px = sets.folder_images(source.path, spec.channels, size, spec.size_px,
                                                   gray_domain=sets.gray_domain_of(spec))
        fake_batches = lambda: iter(fake_images.split(FEATURE_BATCH))  # noqa: E731
        num_fake = len(fake_images)
    ref_side = reference or Side("dataset", spec=spec)
    # the IDX dataset the reference images come from (named as REFERENCE or by --dataset, or saved statistics')
    ref_dataset = (ref_side.spec.dataset if ref_side.kind == "dataset" else
                   stats[0].get("images_from") if stats is not None else None)
    if cfg is not None and cfg.data.dataset in IDX_DATASETS and ref_dataset in IDX_DATASETS \
            and ref_dataset != cfg.data.dataset:
        log.warning("%s trained on %s and is scored against the %s test split%s: an FD across datasets (the same "
                    "format, another domain), no measure of its quality", source.name, cfg.data.dataset,
                    ref_dataset, f" (statistics {reference.path.name})" if stats is not None else "")
    ref_images, inception_real = None, None
    if stats is not None:
        meta, real, inception_real = stats
        extractor = ensure_extractor(spec, cache=cache, device=run_device, console=console)
        if extractor.weights_sha256 != meta["extractor_weights_sha256"]:
            raise ConfigError(f"{reference.path}: computed with another {meta['label']} extractor (weights "
                              f"{meta['extractor_weights_sha256'][:12]}, the cache holds {extractor.weights_sha256[:12]}); "
                              "save the statistics again")
        made_at = meta.get("train_px") or meta["size_px"]
        if made_at != train_px:  # real and compared images must take the same road to the metric size
            raise ConfigError(f"{reference.path}: its images were made at {made_at} px before the metric's "
                              f"{meta['size_px']} px, {source.name}'s at {train_px} px: the FD would carry the "
                              f"resize's bias; save statistics for this size (--save-stats with --size {train_px} "
                              f"for a folder; a dataset's at a run of that size)")
        ref = Reference(replace(spec, train_px=made_at), extractor, real)
    else:
        ref, ref_images = sets.reference_of(ref_side, spec, train_px, cache=cache, device=run_device,
                                            console=console, quiet=False)
    domain_started = time.perf_counter()
    features, probs = extract(ref.extractor, fake_batches(), num_fake, "generated features" if generator is not None
                              else "folder features", console=console)
    values = compare(features, probs, ref, seed=seed, real=ref.real)
    evaluator = Evaluator(ref, console=console)
    report = MetricReport(values, num_fake, len(ref.real.features), seconds=time.perf_counter() - domain_started,
                          warnings=evaluator.size_warnings(num_fake, len(ref.real.features), features.shape[1]))
    mode = "generator" if generator is not None else "folder"
    result = EvalResult(mode, report, ref.extractor.info, str(source.path) if generator is not None else None,
                        _checkpoint_step(source.path) if generator is not None else None, seed,
                        source=source.name, reference=ref_side.name)
    if inception:
        net = inc.load_inception(run_device, inception_mode)
        if stats is not None:
            if inception_real is None:
                raise ConfigError(f"{reference.path} holds no Inception statistics: save it with --inception")
            if stats[0].get("inception_mode") != inception_mode:
                raise ConfigError(f"{reference.path} holds Inception statistics of --inception-mode "
                                  f"{stats[0].get('inception_mode')}, not {inception_mode}")
            if stats[0].get("inception_sha256") != net.sha256:
                raise ConfigError(f"{reference.path} holds Inception statistics of another network file "
                                  f"({str(stats[0].get('inception_sha256'))[:12]}, this one {net.sha256[:12]})")
        fake, fake_seconds = inc.extract_features(net, fake_batches())
        if stats is not None:
            real = inception_real
        elif ref_images is not None:
            real, _ = inc.extract_features(net, ref_images.split(inc.BATCH * 10))
        else:
            real = inc.real_inception_features(net, ref.spec, min(num_fake, _test_size(ref.spec)), cache=cache)
        result.inception = {**inc.inception_scores(fake, real, seed=seed), "num_real": len(real),
                            "seconds_per_1000": round(1000 * fake_seconds / max(len(fake), 1), 1),
                            "network": net.provenance}
        result.inception_note = (f"{len(fake)} vs {len(real)} images, Inception-v3 pool features of the images at the "
                                 f"metric size ({ref.spec.size_px} px)")
    result.total_seconds = time.perf_counter() - started
    return result


def stats_for(side: Side, path: Path, *, dataset: str | None = None, channels: int = 3, data_root: str | None = None,
              cache: str | None = None, device: str = "auto", inception: bool = False, size: int | None = None,
              console: Console | None = None, inception_mode: str = "legacy-tf") -> tuple[Path, int]:
    """``gantrain eval REFERENCE --save-stats PATH``: the reference side's statistics, saved for later
    comparisons; returns the file and the number of images."""
    from gantrain.engine.dist.runtime import pick_device

    if side.kind not in ("folder", "dataset"):
        raise ConfigError("--save-stats: give an image folder or a dataset (fashion-mnist, mnist, folder:PATH)")
    if path.suffix != ".npz":
        raise ConfigError(f"--save-stats: {path} must end in .npz")
    if inception:
        inc.network_file()
    spec = (parse_dataset(dataset, data_root, channels) if dataset is not None else
            side.spec if side.kind == "dataset" else sets.folder_spec(side.path, channels))
    run_device = pick_device(device)
    ref, images = sets.reference_of(side, spec, size, cache=cache, device=run_device, console=console, quiet=False)
    block = None
    if inception:
        net = inc.load_inception(run_device, inception_mode)
        if images is None:
            count = _test_size(ref.spec)
            features = inc.real_inception_features(net, ref.spec, count, cache=cache)
        else:
            features, _ = inc.extract_features(net, images.split(inc.BATCH * 10))
        block = {"features": features, "sha256": net.sha256, "mode": net.mode}
    images_from = side.spec.dataset if side.kind == "dataset" else "folder"
    return sets.save_stats(path, ref, block, images_from), len(ref.real.features)


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
    from gantrain.engine.state.schema import step_of

    return export_step(path) if is_export(path) else step_of(load_checkpoint(path))


def _add_inception(result: EvalResult, spec, fake_batches, num_generated: int, cache: str | None, seed: int,
                   device: torch.device, mode: str = "legacy-tf") -> None:
    """The standard FID/KID of the generated images against as many real test images (at most the split)."""
    net = inc.load_inception(device, mode)
    log.info("computing the Inception FID (Inception-v3 at 299 px: slow on a CPU)")
    started = time.perf_counter()
    fake, _ = inc.extract_features(net, fake_batches)
    seconds = time.perf_counter() - started
    real = inc.real_inception_features(net, spec, min(num_generated, _test_size(spec)), cache=cache)
    result.inception = {**inc.inception_scores(fake, real, seed=seed), "num_real": len(real),
                        "seconds_per_1000": round(1000 * seconds / max(len(fake), 1), 1), "network": net.provenance}
    result.inception_note = f"{len(fake)} generated vs {len(real)} real test images, Inception-v3 pool features"


def _test_size(spec) -> int:
    return split_count(spec, "test")


def render(result: EvalResult) -> list[Table]:
    """The metrics table and the class-histogram table."""
    return [_metrics_table(result), _histogram_table(result)]


def _metrics_table(result: EvalResult) -> Table:
    values, info = result.report.values, result.extractor
    what = {"generator": f"{result.checkpoint} vs {result.reference_name}",
            "folder": f"{result.source} vs {result.reference_name}"}.get(result.mode, "real vs real (two halves of the test split)")
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
    seconds = result.total_seconds if result.total_seconds is not None else result.report.seconds
    what = "folder" if result.mode == "folder" else "generated"
    return (f"{step}{result.report.num_generated} {what} vs {result.report.num_real} reference images, "
            f"seed {result.seed}, {seconds:.1f} s in all")


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


def strict_json(result: EvalResult) -> str:
    """The results as one strict JSON object (a non-finite metric is null)."""
    return json.dumps(_strict(result.to_json()), indent=2, allow_nan=False)


def write_json(result: EvalResult, path: Path) -> Path:
    """:func:`strict_json`, written atomically; raises RunIOError."""
    return atomic_write_text(path, strict_json(result) + "\n")


def _strict(value: Any) -> Any:
    """NaN and infinity (a collapsed generator's FD can be either) as null: RFC 8259 JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
