"""``gantrain bench --to-quality``: minutes of training until the samples are good, contender by contender.

Each contender (the tutorial loop, a preset, a preset with changes) trains from scratch in its own fresh process
(:mod:`gantrain.bench.worker`) for a budget of epochs, and every ``eval_every_epochs`` of images seen the clock
stops while the domain Fréchet distance (FD, Heusel et al. 2017, in the dataset's own feature extractor, the
metric of ``gantrain eval``) of ``eval_samples`` images from a fixed noise is measured. The report gives, per
contender, the training wall-clock time and images until the FD first reaches each target, the best and the
final FD, with the median and spread over seeds, the time to reach the tutorial loop's final FD (the headline
"x sooner"), JSON and Markdown, and ``to_quality.png`` (FD against training seconds for every run).

Training time counts everything but evaluation: building the models and the loader (data decoding included),
every step, torch.compile when on. Evaluation time is reported apart.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from gantrain.bench.hardware import system_info
from gantrain.bench.report import console_table, markdown_table
from gantrain.bench.timing import RESULT_PREFIX, worker_env
from gantrain.engine import (Config, ConfigError, Latent, PRESETS, RECOMMENDED, atomic_write_text, current_layout,
                             from_dict, make_folder, override, preset, save_figure, with_env_defaults)

TUTORIAL = "tutorial"
DEFAULT_TARGETS = (20.0, 10.0, 5.0, 3.0)
QUICK_CHANGES = {"ngf": 8, "ndf": 8, "limit": 256, "batch_size": 32}


@dataclass
class Contender:
    """One line of the comparison: ``kind`` "baseline" (the tutorial loop) or "engine" (gantrain's step)."""

    name: str
    kind: str
    cfg: Config


# ----- in the worker process ------------------------------------------------------------------------------
def train_to_quality(cfg: Config, spec: dict) -> dict:
    """Trains one contender for ``spec["budget_epochs"]`` and evaluates FD every ``spec["eval_every_epochs"]``:
    gantrain's contenders through the :class:`~gantrain.engine.train.loop.Trainer` (a :class:`QualityClock` as its
    after-step hook), the tutorial loop through its own plain loop.

    Returns ``{"points": [{"images", "epochs", "train_s", "eval_s", "fd"}, ...], "setup_s", "num_images",
    "images_per_s", "diverged", "stopped"}``; ``train_s`` is cumulative training wall-clock seconds (setup
    included, evaluation not). A non-finite FD (a diverged run) ends the run early with ``"diverged": true``; an
    FD at or below ``spec["stop_fd"]`` (when given) with ``"stopped": true``.
    """
    from gantrain.engine import Evaluator, pick_device

    device = pick_device(cfg.run.device)
    evaluator = Evaluator.for_config(cfg, device=device, quiet=True)  # fitted and cached by the parent
    expected, here = spec.get("extractor_weights_sha256"), evaluator.reference.extractor.info["weights_sha256"]
    if expected and here != expected:  # the report names the parent's extractor: every FD must be its
        raise ConfigError(f"this worker's feature extractor (weights {here[:12]}) is not the one the report names "
                          f"({expected[:12]}): the metrics cache changed during the measurement")
    train = _train_baseline if spec["contender"] == "baseline" else _train_engine
    return train(cfg, device, spec, QualityClock(evaluator, cfg, spec, device)).result()


class QualityClock:
    """The measurement of one contender: training seconds (setup included, evaluation not) and an FD every
    ``eval_every_epochs`` of images and at the end of the budget; its clock stops while it evaluates. gantrain's
    contenders give it to the Trainer as its evaluation (:class:`_ClockEvaluation`: the Trainer's image cadence
    says when); the tutorial loop calls :meth:`after_images` after each step."""

    def __init__(self, evaluator, cfg: Config, spec: dict, device) -> None:
        self.evaluator, self.cfg, self.spec, self.device = evaluator, cfg, spec, device
        self.started = time.perf_counter()
        self.points: list[dict] = []
        self.images = 0
        self.diverged = self.stopped = False

    def start(self, num_images: int) -> None:
        """Setup is done (models, loader, the data decoded): the training clock runs from here."""
        self.num_images = num_images
        self.budget = self.spec["budget_epochs"] * num_images
        self.every = self.spec["eval_every_epochs"] * num_images
        self.next_eval = self.every
        self.setup_s = self.train_s = time.perf_counter() - self.started
        self.clock = time.perf_counter()

    @property
    def steps(self) -> int:
        """Optimiser steps in the budget: it ends at the first step whose images reach it."""
        return math.ceil(self.spec["budget_epochs"] * self.num_images / self.cfg.data.batch_size)

    def after_images(self, images: int, generator: Callable[[], Any]) -> str | None:
        """After a step that brought the images seen to ``images``: evaluates ``generator()`` when due (called only
        then: an EMA generator with standing statistics recomputes them when asked for); returns why the contender
        stops (the budget spent, a diverged run, ``stop_fd`` reached), else None."""
        self.images = images
        if images < self.next_eval and images < self.budget:
            return None
        return self.measure(images, generator())

    def measure(self, images: int, generator) -> str | None:
        """The FD of ``generator`` now, with ``images`` seen, the training clock stopped meanwhile; returns why the
        contender stops (see :meth:`after_images`), else None."""
        self.images = images
        _sync(self.device)
        self.train_s += time.perf_counter() - self.clock
        e0 = time.perf_counter()
        fd = self.evaluator.evaluate(generator, Latent.of(self.cfg), num_samples=self.spec["eval_samples"],
                                     seed=self.spec["eval_seed"]).values["fd"]
        self.diverged = not math.isfinite(fd)
        stop_fd = self.spec.get("stop_fd")
        self.stopped = not self.diverged and stop_fd is not None and fd <= stop_fd and images < self.budget
        self.points.append({"images": images, "epochs": round(images / self.num_images, 4),
                            "train_s": round(self.train_s, 3), "eval_s": round(time.perf_counter() - e0, 3),
                            "fd": fd if not self.diverged else None})
        while self.next_eval <= images:
            self.next_eval += self.every
        self.clock = time.perf_counter()
        if self.diverged or self.stopped or images >= self.budget:
            return "diverged" if self.diverged else "reached --stop-fd" if self.stopped else "budget spent"
        return None

    def result(self) -> dict:
        return {"points": self.points, "setup_s": round(self.setup_s, 3), "num_images": self.num_images,
                "diverged": self.diverged, "stopped": self.stopped,
                "images_per_s": self.images / self.train_s if self.train_s else None}


class _ClockEvaluation:
    """The clock as the Trainer's :class:`~gantrain.engine.train.loop.Evaluation` (every ``eval_every_epochs`` of
    images, and the budget's last step) and its after-eval hook (ends a diverged run, or one at ``stop_fd``)."""

    def __init__(self, clock: QualityClock) -> None:
        self.clock, self.reason = clock, None

    @functools.cached_property
    def cadence(self):
        """Every ``eval_every_epochs`` of images and the budget's end; made once, at the first step (the clock has
        started by then), not on every step the Trainer asks."""
        from gantrain.engine import Cadence

        return Cadence(images=self.clock.every, at_end=True)

    def evaluate(self, trainer) -> dict:
        self.reason = self.clock.measure(trainer.pos.images_seen, trainer.gan.generator)
        return self.clock.points[-1]

    def after_eval(self, trainer, record: dict) -> str | None:
        return self.reason if self.reason in ("diverged", "reached --stop-fd") else None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the training time must include the queued GPU work


def engine_run_config(cfg: Config, spec: dict, out: Path) -> Config:
    """A gantrain contender as a run of the Trainer in ``out``, over whole epochs enough for the budget (the
    Trainer's ``last_step`` cuts it to the budget's steps, so --lr-decay decays over the budget as a run of
    --epochs budget would); its log as the recipe has it; one checkpoint, at the end; no sample grids, no
    --logger. (The clock is its evaluation and sees divergence: see :func:`_train_engine`.)"""
    return override(cfg, {"out": str(out), "epochs": math.ceil(spec["budget_epochs"]), "max_steps": 0,
                          "sample_every": 0, "logger": "none",
                          "checkpoint_every": 0, "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0,
                          "keep_checkpoints": 1, "samples_from_best": False})


def budget_steps(spec: dict, steps_per_epoch: int) -> int:
    """The optimiser steps of a budget of ``spec["budget_epochs"]`` (a fraction of an epoch rounds up)."""
    return math.ceil(spec["budget_epochs"] * steps_per_epoch)


def _train_engine(cfg: Config, device, spec: dict, clock: QualityClock) -> QualityClock:
    """gantrain's step through the Trainer, in a run folder of its own that the measurement discards."""
    import io
    import tempfile

    from rich.console import Console

    from gantrain.engine import Trainer

    with tempfile.TemporaryDirectory(prefix="gantrain-to-quality-") as folder:
        evaluation = _ClockEvaluation(clock)
        trainer = Trainer(engine_run_config(cfg, spec, Path(folder) / "run"), console=Console(file=io.StringIO()),
                          hooks=[evaluation], last_step=lambda per_epoch: budget_steps(spec, per_epoch),
                          evaluation=evaluation, divergence_watch=False)
        clock.start(trainer.loader.steps_per_epoch * cfg.data.batch_size)
        trainer.fit()
    return clock


def _train_baseline(cfg: Config, device, spec: dict, clock: QualityClock) -> QualityClock:
    """The tutorial's plain loop (:mod:`gantrain.bench.baseline`), with --lr-decay over the budget when the recipe
    has one, as a plain loop with a torch scheduler would."""
    from gantrain.bench.baseline import build_baseline
    from gantrain.engine import LRDecay

    model, batches, num_images = build_baseline(cfg, device, spec.get("num_workers", 2))
    clock.start(num_images)
    decay = LRDecay.of_gan(cfg.optim, model.opt_g, model.opt_d, clock.steps)
    images, step, reason = 0, 0, None
    while reason is None:
        decay.apply(step)
        model.step(next(batches))
        images, step = images + cfg.data.batch_size, step + 1
        reason = clock.after_images(images, lambda: model.g)
    return clock


# ----- summaries (pure functions of the points) ------------------------------------------------------------
def first_reach(points: Sequence[dict], target: float) -> dict | None:
    """The first evaluation whose FD is at or below ``target`` (``{"train_s", "images", "fd"}``), else None."""
    for p in points:
        if p["fd"] is not None and p["fd"] <= target:
            return {"train_s": p["train_s"], "images": p["images"], "fd": p["fd"]}
    return None


def run_summary(run: dict, targets: Sequence[float]) -> dict:
    """One seed's figures: time and images to each target, best and final FD, evaluation seconds."""
    points = run["points"]
    finite = [p["fd"] for p in points if p["fd"] is not None]
    return {"seed": run["seed"], "reach": {str(t): first_reach(points, t) for t in targets},
            "best_fd": min(finite) if finite else None, "final_fd": points[-1]["fd"] if points else None,
            "train_s": points[-1]["train_s"] if points else None, "eval_s": sum(p["eval_s"] for p in points),
            "images_per_s": run.get("images_per_s"), "diverged": run.get("diverged", False),
            "stopped": run.get("stopped", False)}


def spread(values: Sequence[float | None]) -> dict:
    """Median, min and max; a missing value (target not reached, run failed) counts as +inf, so the median is
    finite only when more than half of the seeds got there."""
    numbers = [math.inf if v is None else v for v in values]
    if not numbers:
        return {"median": None, "min": None, "max": None, "n": 0, "of": 0}
    median = statistics.median(numbers)
    finite = [v for v in numbers if math.isfinite(v)]
    return {"median": median if math.isfinite(median) else None, "min": min(finite) if finite else None,
            "max": max(numbers) if math.isfinite(max(numbers)) else None, "n": len(finite), "of": len(numbers)}


def contender_summary(runs: Sequence[dict], targets: Sequence[float]) -> dict:
    per_seed = [run_summary(r, targets) for r in runs if "error" not in r]
    return {"seeds": [s["seed"] for s in per_seed], "per_seed": per_seed,
            "reach_s": {str(t): spread([(s["reach"][str(t)] or {}).get("train_s") for s in per_seed]) for t in targets},
            "reach_images": {str(t): spread([(s["reach"][str(t)] or {}).get("images") for s in per_seed])
                             for t in targets},
            "best_fd": spread([s["best_fd"] for s in per_seed]), "final_fd": spread([s["final_fd"] for s in per_seed]),
            "images_per_s": spread([s["images_per_s"] for s in per_seed]),
            "eval_s": sum(s["eval_s"] for s in per_seed), "failed": sum(1 for r in runs if "error" in r)}


def headline(contenders: list[dict]) -> dict | None:
    """The tutorial loop's final FD (median over its seeds) and, per contender, the median training time to
    first reach it and the ratio to the tutorial loop's own time to it ("x sooner")."""
    tutorial = next((c for c in contenders if c["kind"] == "baseline" and c["summary"]["final_fd"]["median"]), None)
    if tutorial is None:
        return None
    target = tutorial["summary"]["final_fd"]["median"]
    times = {c["name"]: spread([(first_reach(r["points"], target) or {}).get("train_s")
                                for r in c["runs"] if "error" not in r]) for c in contenders}
    base = times[tutorial["name"]]["median"]
    return {"target_fd": target, "tutorial": tutorial["name"],
            "contenders": {name: {**t, "sooner": base / t["median"] if base and t["median"] else None}
                           for name, t in times.items()}}


# ----- the parent: contenders, runs, report ------------------------------------------------------------------
def parse_contender(text: str, base: Config, common: dict) -> Contender:
    """``tutorial`` (the plain loop on ``base``'s recipe) or ``PRESET [field=value ...]`` (gantrain's step)."""
    words = text.split()
    if not words:
        raise ConfigError("--contender: empty")
    head, pairs = words[0], words[1:]
    if head == TUTORIAL:
        cfg, kind = copy.deepcopy(base), "baseline"
    elif head in PRESETS:
        cfg, kind = preset(head), "engine"
    else:
        raise ConfigError(f"--contender: {head!r} is neither '{TUTORIAL}' nor a preset ({', '.join(PRESETS)})")
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--contender {text!r}: {pair!r} is not FIELD=VALUE")
        changes[key.replace("-", "_")] = _value(value)
    try:
        # one override: the contender's fields checked together with the common ones (a preset's channels = 3 under
        # a common --dataset fashion-mnist is refused alone, fine with the contender's channels=1)
        cfg = with_env_defaults(override(cfg, {**common, **{k: v for k, v in changes.items() if v is not None}}))
    except ConfigError as exc:
        raise ConfigError(f"--contender {text!r}: {exc}") from None
    return Contender(text, kind, cfg)


def _value(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def default_contenders(preset_name: str) -> list[str]:
    """The tutorial loop, the preset as it is, and its recommended recipe when there is one."""
    names = [TUTORIAL, preset_name]
    if preset_name in RECOMMENDED and RECOMMENDED[preset_name] in PRESETS:
        names.append(RECOMMENDED[preset_name])
    return names


def run_contender(contender: Contender, seed: int, spec: dict, env: dict) -> dict:
    """One contender and seed in a fresh process: its points, or ``{"seed", "error"}`` with the last lines."""
    cfg = override(copy.deepcopy(contender.cfg), {"seed": seed})
    full = {**spec, "kind": "to_quality", "name": contender.name, "contender": contender.kind,
            "config": cfg.to_dict()}
    proc = subprocess.run([sys.executable, "-m", "gantrain.bench.worker", json.dumps(full)], capture_output=True,
                          text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            result.pop("name", None)
            return {"seed": seed, **result}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"seed": seed, "error": " | ".join(tail) or f"exit code {proc.returncode}"}


def bench_to_quality(base: Config, contenders: Sequence[Contender], *, seeds: int, baseline_seeds: int | None,
                     targets: Sequence[float], budget_epochs: float | None, eval_every_epochs: float, eval_samples: int,
                     out: Path, console: Console, num_workers: int = 2, stop_when_reached: bool = False,
                     baseline_from: Path | None = None, json_path: Path | None = None,
                     run_one: Callable[[Contender, int, dict, dict], dict] = run_contender) -> dict:
    """Runs every contender for every seed (round-robin by seed, so a drift of a shared machine hits all alike),
    writes ``to_quality.json`` (into ``out``, or at ``json_path``) after each run (a long measurement keeps what it
    has), then the Markdown table and ``to_quality.png`` into ``out``.

    ``budget_epochs``: the training epochs of every contender; None gives each its own recipe's epochs
    (``run.epochs``: the tutorial loop's from ``base``, a preset's, or ``epochs=N`` in its ``--contender``), so a
    recipe decays its learning rates over the budget it was made for.

    ``stop_when_reached``: the tutorial loop's runs go first, and every other run stops at its first FD at or
    below their final FD (median over the tutorial's seeds): the headline's time without the rest of the budget.

    ``baseline_from``: an earlier ``to_quality.json`` whose tutorial-loop runs are taken instead of training the
    loop again (see :func:`reused_baseline_runs`); ``baseline_seeds`` then picks its first N runs (default all).

    Raises :class:`ConfigError` when the contenders train on different data (their FDs would not compare), for
    ``stop_when_reached`` or ``baseline_from`` without a tutorial contender, or when ``baseline_from`` cannot
    stand in for this run's tutorial loop."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from gantrain.bench.baseline import plain_loop_omits
    from gantrain.engine import Evaluator
    from gantrain.engine import spec_from_config
    from gantrain.engine import pick_device

    if len({spec_from_config(c.cfg) for c in contenders}) > 1:
        raise ConfigError("--contender: every contender must train on the same dataset, image size and channels "
                          "(their FDs are measured against one reference)")
    if stop_when_reached and not any(c.kind == "baseline" for c in contenders):
        raise ConfigError(f"--stop-when-reached: stops at the tutorial loop's final FD, so it needs the "
                          f"'{TUTORIAL}' contender")
    budgets = [budget_epochs or float(c.cfg.run.epochs) for c in contenders]
    spec = {"eval_every_epochs": eval_every_epochs, "eval_samples": eval_samples, "eval_seed": 0,
            "num_workers": num_workers}
    system = system_info()
    reused = {}  # contender index -> (runs, where they came from)
    if baseline_from is not None:
        tutorials = [i for i, c in enumerate(contenders) if c.kind == "baseline"]
        if not tutorials:
            raise ConfigError(f"--baseline-from: gives the tutorial loop's runs, so it needs the '{TUTORIAL}' "
                              "contender")
        reused[tutorials[0]] = reused_baseline_runs(baseline_from, contenders[tutorials[0]].cfg,
                                                    {**spec, "budget_epochs": budgets[tutorials[0]]}, system,
                                                    baseline_seeds)
    device = pick_device(base.run.device)
    # fitted (or found in the cache) once, before any clock; every worker loads this very file
    extractor = extractor_record(Evaluator.for_config(contenders[0].cfg, device=device, console=console))
    if baseline_from is not None:
        same_extractor(baseline_from, extractor, console)
    make_folder(out, "--out")
    rewrites = prepare_rewrites(contenders, device, console)
    for c in contenders:
        omitted = plain_loop_omits(c.cfg) if c.kind == "baseline" else []
        if omitted:
            console.print(f"{c.name}: the plain loop has no {', '.join(omitted)}; it trains the rest of "
                          f"{base.preset}'s recipe", soft_wrap=True)
        idle = c.cfg.without_effect() if c.kind == "engine" else []
        if idle:  # e.g. "fashion32-tuned ema_decay=0", whose EMA by images stays on
            console.print(f"{c.name}: without effect in this contender: {'; '.join(idle)}", soft_wrap=True)
    report = {"system": system, "device": str(device), "preset": base.preset, "targets": list(targets),
              "seeds": seeds, "baseline_seeds": baseline_seeds or seeds, "stop_when_reached": stop_when_reached,
              "budget_epochs": budget_epochs, **spec, "extractor": extractor, "layer_rewrites": rewrites,
              "contenders": [{"name": c.name, "kind": c.kind, "budget_epochs": budget, "config": c.cfg.to_dict(),
                              "runs": []} for c, budget in zip(contenders, budgets)]}
    for i, (runs, source) in reused.items():
        report["contenders"][i].update(runs=runs, reused_from=source)
        report["baseline_seeds"] = len(runs)
        console.print(f"{contenders[i].name}: {len(runs)} run(s) taken from {_described(source)}, not trained "
                      "again", soft_wrap=True)
    env = worker_env()
    worker_spec = {**spec, "extractor_weights_sha256": extractor["weights_sha256"]}  # checked by every worker
    jobs = [(s, i) for s in range(seeds) for i, c in enumerate(contenders)
            if i not in reused and (c.kind != "baseline" or s < (baseline_seeds or seeds))]
    if stop_when_reached:  # the stop FD must be known before the others start
        jobs.sort(key=lambda job: contenders[job[1]].kind != "baseline")
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} runs"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("to quality", total=len(jobs))
        for seed_index, i in jobs:
            seed = base.run.seed + seed_index
            bar.update(task, description=f"to quality: {contenders[i].name}, seed {seed}")
            run_spec = {**worker_spec, "budget_epochs": budgets[i]}
            if stop_when_reached and contenders[i].kind != "baseline":
                run_spec = {**run_spec, "stop_fd": _tutorial_final_fd(report)}
                report["stop_fd"] = run_spec["stop_fd"]
            report["contenders"][i]["runs"].append(run_one(contenders[i], seed, run_spec, env))
            report["wall_s"] = round(time.perf_counter() - started, 1)
            atomic_write_text(json_path or out / "to_quality.json", json.dumps(report, indent=2))
            bar.advance(task)
    return finish_report(report, out, console, json_path)


def prepare_rewrites(contenders: Sequence[Contender], device, console: Console) -> dict:
    """Measures (or reads from the cache) the CPU layer rewrites of every gantrain contender before any clock, so
    no run counts the probe as training time; one console line each. Returns ``{contender name: record}``."""
    from gantrain.engine import PrecisionPolicy, choose_rewrites, describe_rewrites, has_cpu_rewrites

    records = {}
    for c in contenders:
        if c.kind == "engine" and has_cpu_rewrites(c.cfg, device):
            records[c.name] = choose_rewrites(c.cfg, PrecisionPolicy(device, c.cfg.perf.amp, c.cfg.perf.channels_last))
            console.print(f"{c.name}: {describe_rewrites(records[c.name])}", soft_wrap=True)
    return records


#: The parts of the tutorial contender's config that decide what it trains (data_root may be spelt differently).
_RECIPE_SECTIONS = ("data", "model", "optim", "loss", "gan")
#: What an earlier measurement must share with this one (besides every key of the run spec) for its training
#: times to compare.
_HARDWARE_KEYS = ("cpu", "cpu_cores", "torch_threads", "gpu", "gpu_count", "torch")


def reused_baseline_runs(path: Path, tutorial: Config, spec: dict, system: dict,
                         baseline_seeds: int | None = None) -> tuple[list[dict], dict]:
    """The tutorial loop's runs of an earlier ``to_quality.json`` (``--baseline-from``), for a measurement that
    would train the same loop again: ``(runs, {"path", "date", "git_commit"})``.

    The earlier runs stand in only when they are what this run would measure: the same recipe (``tutorial``'s
    data, model, optimiser and loss settings and seed; the data folder's spelling may differ), the same budget
    and evaluation settings (``spec``) and the same hardware and torch (``system``, as :func:`system_info`
    gives it), since the headline divides their wall-clock times by this run's. ``baseline_seeds`` takes the
    first N of its runs (default: all).

    Raises :class:`ConfigError` naming what differs, or when the file cannot be read, is not a to-quality report
    or holds no finished tutorial-loop run (or fewer than ``baseline_seeds``)."""
    try:
        earlier = json.loads(Path(path).read_text())
        contender = next(c for c in earlier["contenders"] if c["kind"] == "baseline")
        runs = [r for r in contender["runs"] if "error" not in r]
        their_spec = {k: contender.get(k, earlier[k]) if k == "budget_epochs" else earlier[k] for k in spec}
        config, their_system = contender["config"], earlier["system"]
        if not all(isinstance(part, dict) for part in (config, their_system, *(config[k] for k in _RECIPE_SECTIONS
                                                                               if k in config), config["run"])):
            raise TypeError("a section is not a table")
        config = current_layout(config)  # a report of an older layout: its fields where they live now
        if not all(isinstance(config[k], dict) for k in _RECIPE_SECTIONS if k in config):
            raise TypeError("a section is not a table")
    except OSError as exc:
        raise ConfigError(f"--baseline-from: cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, StopIteration):
        raise ConfigError(f"--baseline-from: {path} is not a to_quality.json with a tutorial-loop run") from None
    if not runs:
        raise ConfigError(f"--baseline-from: {path} holds no finished tutorial-loop run")
    if baseline_seeds is not None:
        if len(runs) < baseline_seeds:
            raise ConfigError(f"--baseline-from: {path} holds {len(runs)} tutorial-loop run(s), --baseline-seeds "
                              f"asks for {baseline_seeds}")
        runs = runs[:baseline_seeds]
    ours = tutorial.to_dict()
    # a field the earlier report lacks came later: the code that wrote it behaved as the field's default does; and
    # a value an older report spelt otherwise (a comma list for a list field) reads as it would today
    try:
        theirs = from_dict({section: config.get(section, {}) for section in _RECIPE_SECTIONS}).to_dict()
    except ConfigError as exc:
        raise ConfigError(f"--baseline-from: {path}: its tutorial loop's config does not load ({exc})") from None
    differences = [f"{section}.{key} {theirs[section].get(key)!r} (here {value!r})"
                   for section in _RECIPE_SECTIONS for key, value in ours[section].items()
                   if key != "data_root" and theirs[section].get(key) != value]
    if config.get("run", {}).get("seed") != ours["run"]["seed"]:
        differences.append(f"run.seed {config.get('run', {}).get('seed')!r} (here {ours['run']['seed']!r})")
    differences += [f"{key} {their_spec[key]!r} (here {spec[key]!r})" for key in spec
                    if their_spec[key] != spec[key]]
    differences += [f"{key} {their_system.get(key)!r} (here {system.get(key)!r})" for key in _HARDWARE_KEYS
                    if their_system.get(key) != system.get(key)]
    if differences:
        raise ConfigError(f"--baseline-from: {path} measured another tutorial loop than this run would: "
                          + "; ".join(differences))
    source = {"path": str(path), "date": str(their_system.get("date")), "git_commit": their_system.get("git_commit")}
    return runs, source


def extractor_record(evaluator) -> dict:
    """What identifies the FD's feature extractor in a report: its label, task, held-out accuracy and the SHA-256
    of its weights (:attr:`~gantrain.engine.metrics.extractor.Extractor.weights_sha256`)."""
    info = evaluator.reference.extractor.info
    return {key: info[key] for key in ("label", "task", "test_accuracy", "weights_sha256")}


def same_extractor(path: Path, extractor: dict, console: Console) -> None:
    """Checks that ``--baseline-from``'s FDs were measured by this run's extractor: FDs of two extractors (a
    refit, another machine's fit) are distances in two feature spaces and do not compare.

    Raises :class:`ConfigError` when the earlier report names other weights; a report written before gantrain
    recorded them is taken as it is, and one console line says so."""
    earlier = json.loads(Path(path).read_text()).get("extractor")
    if not isinstance(earlier, dict) or not earlier.get("weights_sha256"):
        console.print(f"--baseline-from: {path} does not record its feature extractor (written before gantrain "
                      f"recorded it); its FDs are taken as measured by this one ({extractor['label']}, weights "
                      f"{extractor['weights_sha256'][:12]})", soft_wrap=True)
        return
    if earlier["weights_sha256"] != extractor["weights_sha256"]:
        raise ConfigError(f"--baseline-from: {path} was scored by another feature extractor (weights "
                          f"{str(earlier['weights_sha256'])[:12]}, here {extractor['weights_sha256'][:12]}: refitted "
                          f"or fitted elsewhere), so its FDs do not compare with this run's; run the tutorial loop "
                          f"again, or set $GANTRAIN_CACHE to the metrics cache holding that extractor")


def _described(source: dict) -> str:
    """Where reused runs came from, in words: ``PATH (measured DATE, commit SHA)``."""
    return f"{source['path']} (measured {source['date'][:10]}, commit {str(source['git_commit'])[:12]})"


def _tutorial_final_fd(report: dict) -> float | None:
    """The tutorial loop's final FD as the headline takes it: the median over its runs so far (a diverged run counts
    as +inf, a failed one not at all); None when that median is not finite."""
    finals = [r["points"][-1]["fd"] if r["points"] else None for c in report["contenders"] if c["kind"] == "baseline"
              for r in c["runs"] if "error" not in r]
    return spread(finals)["median"]


def finish_report(report: dict, out: Path, console: Console, json_path: Path | None = None) -> dict:
    """Adds the summaries and the headline, writes JSON (into ``out``, or at ``json_path``), Markdown and the plot,
    prints the table."""
    for c in report["contenders"]:
        c["summary"] = contender_summary(c["runs"], report["targets"])
    report["headline"] = headline(report["contenders"])
    table, markdown = rendered(report)
    json_path = json_path or out / "to_quality.json"
    atomic_write_text(json_path, json.dumps(report, indent=2))
    atomic_write_text(out / "to_quality.md", markdown)
    plot(report, out / "to_quality.png")
    console.print(table)
    for c in report["contenders"]:
        for run in c["runs"]:
            if "error" in run:
                console.print(f"[red]{c['name']}, seed {run['seed']} failed:[/red] {run['error']}", soft_wrap=True)
    console.print(f"report: {json_path}, {out / 'to_quality.md'}, {out / 'to_quality.png'}", soft_wrap=True)
    return report


def _scored_by(report: dict) -> str:
    extractor = report.get("extractor")  # absent in reports written before it was recorded
    if not extractor:
        return ""
    return (f" (extractor {extractor['label']} {extractor['task']}, {100 * extractor['test_accuracy']:.2f}% held-out "
            f"accuracy, weights {extractor['weights_sha256'][:12]})")


def _seconds(s: dict) -> str:
    if s["median"] is None:
        return f"not reached ({s['n']}/{s['of']})" if s["of"] else "-"
    text = f"{s['median']:.0f} s"
    if s["of"] > 1:
        high = f"{s['max']:.0f}" if s["max"] is not None else "∞"
        text += f" ({s['min']:.0f}–{high}, {s['n']}/{s['of']})"
    return text


def _fd(s: dict) -> str:
    if s["median"] is None:
        return "-"
    text = f"{s['median']:.2f}"
    return text + (f" ({s['min']:.2f}–{s['max']:.2f})" if s["of"] > 1 and s["max"] is not None else "")


def rendered(report: dict):
    """The console table (medians, narrow enough for 80 columns) and the Markdown table (with spreads)."""
    targets, head = report["targets"], report.get("headline")
    headers = ["contender", "seeds", "images/s", *[f"to FD ≤ {t:g}" for t in targets]]
    if head:
        headers += [f"to tutorial's final FD {head['target_fd']:.2f}", "× sooner"]
    headers += ["best FD", "final FD", "final FD per seed", "eval s"]
    rows = []
    for c in report["contenders"]:
        s = c["summary"]
        row = [c["name"], str(len(s["seeds"])), f"{s['images_per_s']['median']:.0f}" if s["images_per_s"]["median"] else "-",
               *[_seconds(s["reach_s"][str(t)]) for t in targets]]
        if head:
            h = head["contenders"][c["name"]]
            row += [_seconds(h), f"{h['sooner']:.1f}×" if h["sooner"] else "-"]
        row += [_fd(s["best_fd"]), _fd(s["final_fd"]),
                ", ".join("-" if p["final_fd"] is None else f"{p['final_fd']:.2f}" + ("†" if p["stopped"] else "")
                          for p in s["per_seed"]),
                f"{s['eval_s']:.0f}"]
        rows.append(row)
    sysinfo = report["system"]
    caption = (f"**Time to quality, {report['preset']}** on {report['device']} ({sysinfo['gpu'] or sysinfo['cpu']}, "
               f"{sysinfo['cpu_cores']} cores), torch {sysinfo['torch']}, {sysinfo['date'][:10]}, commit "
               f"{str(sysinfo['git_commit'])[:12]}: {_budgets(report)}, domain FD of "
               f"{report['eval_samples']} samples every {report['eval_every_epochs']:g} epochs{_scored_by(report)}; "
               f"times are training "
               f"wall-clock seconds (setup included, evaluation excluded), median (min–max, seeds that got there/"
               f"seeds) over seeds; measurement wall time {report.get('wall_s', 0) / 60:.1f} min.")
    if report.get("stop_when_reached"):
        stop = report.get("stop_fd")
        caption += (f" --stop-when-reached: runs marked † stopped at their first FD ≤ the tutorial loop's final FD "
                    f"{stop:.2f}, so their best and final FD, and the targets below it, cover only that time."
                    if stop is not None else
                    " --stop-when-reached: no tutorial run finished, so every run used the whole budget.")
    for c in report["contenders"]:
        if c.get("reused_from"):
            caption += f" The {c['name']} runs were taken from {_described(c['reused_from'])} by --baseline-from."
    title = f"gantrain bench --to-quality: {report['preset']}"
    legend = ("training seconds until the FD first reaches each value, median over seeds; "
              + ("* the tutorial loop's final FD; " if head else "") + "final: the last FD")
    return console_table(title, *_compact(report), legend), markdown_table(headers, rows, caption)


def _budgets(report: dict) -> str:
    """The training budget in words: ``20 epochs each``, or each contender's (a report of per-recipe budgets)."""
    budgets = [c.get("budget_epochs", report["budget_epochs"]) for c in report["contenders"]]
    if len(set(budgets)) == 1:
        return f"{budgets[0]:g} epochs each"
    return "epochs: " + ", ".join(f"{c['name']} {b:g}" for c, b in zip(report["contenders"], budgets))


def _compact(report: dict) -> tuple[list[str], list[list[str]]]:
    """The console's narrower table (medians only; the Markdown file has the spreads and every seed)."""
    targets, head = report["targets"], report.get("headline")
    headers = ["contender (seeds)", *[f"≤{t:g}" for t in targets]]
    headers += [f"≤{head['target_fd']:.2f}*", "×"] if head else []
    headers += ["final"]
    rows = []
    for c in report["contenders"]:
        s = c["summary"]
        row = [f"{c['name']} ({len(s['seeds'])})", *[_median_seconds(s["reach_s"][str(t)]) for t in targets]]
        if head:
            h = head["contenders"][c["name"]]
            row += [_median_seconds(h), f"{h['sooner']:.1f}" if h["sooner"] else "-"]
        rows.append(row + [f"{s['final_fd']['median']:.2f}" if s["final_fd"]["median"] is not None else "-"])
    return headers, rows


def _median_seconds(s: dict) -> str:
    return f"{s['median']:.0f} s" if s["median"] is not None else "-"


def plot(report: dict, path: Path) -> Path:
    """FD against training seconds, one colour per contender, one line per seed, targets dashed, the tutorial loop's
    final FD dotted, log FD axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, c in enumerate(report["contenders"]):
        for j, run in enumerate(r for r in c["runs"] if "error" not in r):
            points = [(p["train_s"], p["fd"]) for p in run["points"] if p["fd"] is not None and p["fd"] > 0]
            if points:
                ax.plot(*zip(*points), color=f"C{i}", alpha=0.85, linewidth=1.4,
                        label=c["name"] if j == 0 else None)
    for t in report["targets"]:
        if t > 0:
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
    head = report.get("headline")
    if head and head["target_fd"] > 0:  # the FD the "x sooner" column times
        ax.axhline(head["target_fd"], color="black", linestyle=":", linewidth=1.2,
                   label=f"tutorial loop's final FD {head['target_fd']:.2f}")
    ax.set_yscale("log")
    ax.set(xlabel="training wall-clock seconds (evaluation excluded)", ylabel=f"FD ({report['eval_samples']} samples)",
           title=f"Time to quality: {report['preset']}, {report['device']}")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return save_figure(fig, path)
