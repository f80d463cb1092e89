"""The options of one ``gantrain tune`` experiment: a typed dataclass validated like the training config.

Each field's docstring is its CLI help text; validation raises :class:`ConfigError` naming the flag, so the
CLI prints one line and exits with code 2. The settings are saved in the experiment folder (``tune.json``)
so ``--resume`` continues with exactly the options the experiment started with.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gantrain.engine import ConfigError

SCHEDULERS = ("asha", "pbt", "fifo")
SEARCHES = ("random", "optuna", "hyperopt")
# The objective's direction: distances shrink as samples improve, the others grow.
METRIC_MODES = {"fd": "min", "kid_mean": "min", "precision": "max", "recall": "max", "coverage": "max",
                "classifier_score": "max"}


def _check(ok: bool, flag: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{flag}: {message}")


@dataclass
class TuneSettings:
    num_samples: int = 16
    """Trials to sample from the search space (each grid point is repeated this many times)."""
    scheduler: str = "asha"
    """Trial scheduler: asha (stop weak trials early), pbt (population-based training) or fifo (run all to the end)."""
    search: str = "random"
    """Search algorithm: random, optuna (TPE) or hyperopt (TPE); pbt explores by itself and needs random."""
    metric: str = "fd"
    """Objective: fd (Frechet distance, minimised), kid_mean, precision, recall, coverage or classifier_score."""
    max_epochs: int = 0
    """Epochs per trial, the budget the schedulers work within (0 = the config's --epochs)."""
    gpus_per_trial: float = 0.0
    """GPUs reserved per trial; fractions share one GPU (0.5 = two trials per GPU); 0 trains on the CPU."""
    cpus_per_trial: float = 1.0
    """CPU cores reserved per trial (also its torch thread count)."""
    workers_per_trial: int = 1
    """DDP workers per trial: above 1 each trial is a Ray Train TorchTrainer job of this many workers, each with
    --gpus-per-trial GPUs and --cpus-per-trial CPUs (asha and fifo; pbt needs one-process trials)."""
    max_concurrent: int = 0
    """Trials running at once at most (0 = as many as the cluster's resources allow)."""
    resource_wait: float = 600.0
    """With --address: seconds to wait for a cluster too small for one trial to grow (an autoscaler) before
    refusing; a local Ray, which cannot grow, is refused at once."""
    max_failures: int = 2
    """Retries of a trial that raises an error, each from its last checkpoint (diverged trials are not retried)."""
    baseline: bool = True
    """Run the config's own values of the searched fields as the first trial, the un-tuned reference."""
    grace_period: int = 1
    """ASHA: reports every trial gets before it may be stopped."""
    reduction_factor: float = 3.0
    """ASHA: keep the best 1/N of the trials at each rung."""
    perturbation_interval: int = 2
    """PBT: reports between exploit/explore steps."""
    collapse_loss: float = 0.01
    """A D loss below this counts as collapsed (D wins outright, G learns nothing)."""
    collapse_patience: int = 3
    """Stop a trial as diverged after this many consecutive epochs of collapsed D loss."""
    search_seed: int = 0
    """Seed of the search algorithm (every trial trains with the config's --seed)."""
    top: int = 10
    """Trials shown in the results table."""

    def __post_init__(self) -> None:
        self.gpus_per_trial, self.cpus_per_trial = float(self.gpus_per_trial), float(self.cpus_per_trial)
        _check(self.num_samples >= 1, "num-samples", f"must be at least 1, got {self.num_samples}")
        _check(self.scheduler in SCHEDULERS, "scheduler",
               f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        _check(self.search in SEARCHES, "search", f"must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        _check(self.metric in METRIC_MODES, "metric", f"must be one of {', '.join(METRIC_MODES)}, got {self.metric!r}")
        _check(self.scheduler != "pbt" or self.search == "random", "search",
               "pbt explores the space by itself: use --search random with --scheduler pbt")
        self._check_counts()
        self._check_resources()
        _check(math.isfinite(self.resource_wait) and self.resource_wait >= 0, "resource-wait",
               f"must be >= 0 seconds, got {self.resource_wait}")
        _check(self.workers_per_trial >= 1, "workers-per-trial", f"must be at least 1, got {self.workers_per_trial}")
        _check(self.workers_per_trial == 1 or self.scheduler != "pbt", "workers-per-trial",
               "pbt copies one-process trials' checkpoints between trials: use --scheduler asha or fifo")

    def _check_counts(self) -> None:
        for flag, value, low in (("max-epochs", self.max_epochs, 0), ("max-concurrent", self.max_concurrent, 0),
                                 ("max-failures", self.max_failures, 0), ("grace-period", self.grace_period, 1),
                                 ("perturbation-interval", self.perturbation_interval, 1),
                                 ("collapse-patience", self.collapse_patience, 1), ("top", self.top, 1)):
            _check(value >= low, flag, f"must be at least {low}, got {value}")
        _check(self.reduction_factor > 1, "reduction-factor", f"must be > 1, got {self.reduction_factor}")
        _check(math.isfinite(self.collapse_loss) and self.collapse_loss >= 0, "collapse-loss",
               f"must be >= 0, got {self.collapse_loss}")

    def _check_resources(self) -> None:
        _check(math.isfinite(self.gpus_per_trial) and self.gpus_per_trial >= 0, "gpus-per-trial",
               f"must be >= 0, got {self.gpus_per_trial}")
        # Ray places fractional GPUs only below one; whole GPUs above it
        _check(self.gpus_per_trial <= 1 or self.gpus_per_trial.is_integer(), "gpus-per-trial",
               f"a trial uses one process: a fraction or a whole number of GPUs, got {self.gpus_per_trial}")
        _check(math.isfinite(self.cpus_per_trial) and self.cpus_per_trial > 0, "cpus-per-trial",
               f"must be > 0, got {self.cpus_per_trial}")

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def settings_from(values: dict[str, Any]) -> TuneSettings:
    """Settings from a dict (CLI options or a saved ``tune.json``); ``None`` keeps the default."""
    known = {f.name for f in dataclasses.fields(TuneSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown tune settings: {', '.join(unknown)}")
    return TuneSettings(**{k: v for k, v in values.items() if v is not None})


def load_settings(path: Path) -> TuneSettings:
    try:
        return settings_from(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--resume: cannot read the experiment's settings {path} ({exc})") from None
