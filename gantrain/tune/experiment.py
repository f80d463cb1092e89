"""Running a ``gantrain tune`` experiment: Ray start-up, the Tuner (new or restored) and its outputs.

The experiment folder is ``<storage>/<name>``: Ray's own state and one folder per trial, plus what gantrain
writes there, ``base.toml`` (the config every trial starts from), ``space.toml``, ``tune.json`` (the
settings, so ``--resume`` continues with exactly the same experiment), ``tune.log``, and at the end
``results.csv``, ``best.toml`` and ``trials.png`` (:mod:`gantrain.tune.results`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from rich.console import Console

from gantrain.engine import (Config, ConfigError, GantrainError, IDX_DATASETS, PrecisionPolicy, atomic_write_text,
                             build_models, choose_rewrites, data_root, ensure_idx_files, evaluate_generator,
                             has_cpu_rewrites, load_toml, log, override, refuse_unplaceable, refuse_writing_inside,
                             setup_logging, to_toml)
from gantrain.tune.results import Outcome, summarise
from gantrain.tune.settings import TuneSettings, load_settings
from gantrain.tune.space import Space, load_space, parse_space
from gantrain.tune.trainable import report_every, train_trial, trial_epochs, trial_folder_name

# Environment a trial on another node needs from the driver's shell ($GANTRAIN_DATA needs no forwarding: it is
# in the resolved config, which base.toml pins as an absolute path for every trial).
FORWARDED_ENV = ("GANTRAIN_CACHE", "XDG_CACHE_HOME")
LOCAL_OBJECT_STORE_BYTES = 512 * 2**20  # trials pass configs, not data, through Ray's object store
CHECKPOINTS_KEPT = 2
PBT_CHECKPOINTS_KEPT = 4  # donors' recent checkpoints must outlive the exploit steps that copy them


@dataclass(frozen=True)
class ExperimentFolder:
    path: Path

    @property
    def base_file(self) -> Path:
        return self.path / "base.toml"

    @property
    def settings_file(self) -> Path:
        return self.path / "tune.json"

    @property
    def space_file(self) -> Path:
        return self.path / "space.toml"

    def holds_experiment(self) -> bool:
        return any(self.path.glob("experiment_state-*.json"))


def experiment_folder(storage: str | Path, name: str) -> ExperimentFolder:
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name: must be a plain folder name, got {name!r}")
    return ExperimentFolder(Path(storage).expanduser().resolve() / name)


# ----- preparing a new experiment or reading an interrupted one ---------------------------------------------
# Run options a trial sets itself: given to `gantrain tune`, each is refused with the option that does the job.
ONE_PROCESS = ("a trial is one process, or --workers-per-trial DDP workers under Ray Train: spread trials with "
               "--gpus-per-trial, --max-concurrent and --address")
TRIAL_OWNED = {
    "out": "each trial writes into <storage>/<name>/trial_<id>/run: choose the folder with --storage and --name",
    "max_steps": "trials are budgeted in epochs: use --max-epochs, and --limit for shorter epochs",
    "checkpoint_every": "a trial checkpoints at every report (every --eval-every epochs, 1 when 0)",
    "keep_checkpoints": "Tune keeps each trial's newest checkpoints itself",
    **{name: ONE_PROCESS for name in ("ddp", "nproc", "nnodes", "node_rank", "master_addr", "master_port",
                                      "sync_bn", "rdzv_endpoint", "rdzv_id", "max_restarts")},
    **{name: "a trial of several DDP workers is --workers-per-trial N (Ray Train under Tune), on the cluster of "
             "--address" for name in ("ray", "ray_address", "ray_workers", "gpus_per_worker", "cpus_per_worker",
                                      "ray_storage", "ray_wait")},
    "checkpoint_every_steps": "a trial checkpoints at every report (every --eval-every epochs, 1 when 0)",
    "checkpoint_every_minutes": "a trial checkpoints at every report (every --eval-every epochs, 1 when 0)",
    **{name: "a trial evaluates and reports every --eval-every epochs (1 when 0)"
       for name in ("eval_every_steps", "eval_every_images")},
}


def refuse_trial_owned(flags: dict[str, Any], settings: TuneSettings) -> None:
    """Every run flag ``gantrain tune`` accepts acts on the trials; those a trial sets itself are refused."""
    given = {name for name, value in flags.items() if value is not None}
    for name in TRIAL_OWNED:
        if name in given:
            raise ConfigError(f"--{name.replace('_', '-')}: not a tune option: {TRIAL_OWNED[name]}")
    if "epochs" in given and settings.max_epochs:
        raise ConfigError("--epochs: --max-epochs sets the trials' budget; give one of the two")
    device = "cuda" if settings.gpus_per_trial > 0 else "cpu"
    if flags.get("device") not in (None, device):
        raise ConfigError(f"--device: --gpus-per-trial {settings.gpus_per_trial:g} puts the trials on {device}; "
                          "choose the device with --gpus-per-trial")


def check_experiment(settings: TuneSettings, space: Space) -> None:
    """Scheduler, search and space combinations Ray would accept and then fail on mid-experiment."""
    grid = [d.name for d in space.dimensions if d.kind == "grid"]
    if grid and settings.search != "random":
        raise ConfigError(f"--search: grid dimensions need --search random, not {settings.search}")
    if settings.scheduler == "pbt":
        if grid:
            raise ConfigError(f"--scheduler pbt: its exploit step copies a better trial's whole config, so the grid "
                              f"values of {', '.join(grid)} would not be kept; search them with choice = [...] in "
                              "--space, or use --scheduler asha or fifo")
        space.pbt_mutations()  # names the problem when the space searches nothing PBT can perturb


def prepare_base(cfg: Config, settings: TuneSettings) -> Config:
    """Checks the config can run as trials and pins its data and metrics-cache paths for every trial."""
    if cfg.dist.ddp:
        raise ConfigError("--ddp: each trial is one process; spread trials over GPUs and nodes with "
                          "--gpus-per-trial and --address instead")
    if cfg.run.max_steps:  # from a --config file (the flag is refused by refuse_trial_owned)
        raise ConfigError(f"--max-steps: the config sets max_steps = {cfg.run.max_steps}, but {TRIAL_OWNED['max_steps']}"
                          "; set it to 0")
    if cfg.run.device == "cuda" and settings.gpus_per_trial == 0:
        raise ConfigError("--gpus-per-trial: --device cuda needs GPUs reserved per trial (e.g. 1 or 0.5)")
    # Trials run in their own working folders (on other nodes too): relative paths would not resolve there.
    cache = cfg.eval.metrics_cache or os.environ.get("GANTRAIN_CACHE")
    cfg = override(cfg, {"data_root": _absolute(cfg.data.data_root), "metrics_cache": _absolute(cache)})
    if cfg.data.dataset in IDX_DATASETS:
        ensure_idx_files(cfg.data.dataset, data_root(cfg.data.data_root))  # download once, not once per trial
    return cfg


def _absolute(path: str | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path else None


def warm_metrics(cfg: Config) -> float:
    """Fits (or loads) the metrics' feature extractor and real statistics here, once, before trials start
    (concurrent trials would each fit it); returns the untrained generator's FD, the point trials start from."""
    log.info("preparing the quality metrics (the feature extractor is fitted once, then cached)")
    generator, _ = build_models(cfg.model, cfg.data.image_size, cfg.data.channels)
    metrics = evaluate_generator(generator, cfg, num_samples=cfg.eval.eval_samples, device="cpu", seed=cfg.run.seed)
    log.info("untrained generator: fd %.4g (the starting point every trial improves on)", metrics["fd"])
    return float(metrics["fd"])


def warm_rewrites(cfg: Config, settings: TuneSettings) -> None:
    """For CPU trials, the fast layers' rewrite probe (:func:`~gantrain.engine.choose_rewrites`) measured here once
    with a trial's threads at the base config's shapes, before trials start: trials starting together would each
    time them on shared cores. A trial whose searched values change a layer's shape, its dtype or layout (a width,
    the batch size, --amp) still times its own at its start."""
    if settings.gpus_per_trial > 0:  # the trials' device, as trial_config sets it
        return
    device = torch.device("cpu")
    if not has_cpu_rewrites(cfg, device):
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(settings.cpus_per_trial)))
    try:
        choose_rewrites(cfg, PrecisionPolicy(device, cfg.perf.amp, cfg.perf.channels_last))
    finally:
        torch.set_num_threads(saved)


def create(folder: ExperimentFolder, cfg: Config, settings: TuneSettings, space: Space) -> None:
    if folder.holds_experiment():
        raise ConfigError(f"--name: {folder.path} already holds an experiment; continue it with --resume "
                          "or choose another --name")
    folder.path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder.base_file, to_toml(cfg))
    atomic_write_text(folder.settings_file, settings.to_json())
    atomic_write_text(folder.space_file, space.text)


def reopen(folder: ExperimentFolder) -> tuple[Config, TuneSettings, Space]:
    """The base config, settings and space an interrupted experiment started with."""
    if not (folder.holds_experiment() and folder.settings_file.is_file()):
        raise ConfigError(f"--resume: no gantrain tune experiment in {folder.path} (check --storage and --name)")
    cfg = load_toml(folder.base_file)
    return cfg, load_settings(folder.settings_file), parse_space(folder.space_file.read_text(), cfg,
                                                                 str(folder.space_file))


# ----- the driver process ----------------------------------------------------------------------------------
DRIVER_ENV = "GANTRAIN_TUNE_DRIVER"


def needs_driver_process(address: str | None) -> bool:
    """True in a `gantrain tune` that would start Ray on this machine and is not yet the driver process."""
    return address is None and DRIVER_ENV not in os.environ and not ray.is_initialized() \
        and sys.platform.startswith("linux")


def run_driver_process(folder: ExperimentFolder, resume: bool, storage: str | Path) -> int:
    """Runs the experiment :func:`prepare` wrote into ``folder`` in a child process, the Ray driver
    (:mod:`gantrain.tune.driver`), and returns its exit code.

    Ray's local processes share fate with the driver only through SIGKILL (prctl), and its two agent processes
    then spend up to 60 s failing to report the raylet's death to the dead GCS: a killed driver left them
    behind for a minute, and its experiment state as of its last periodic save. Here the command the user
    started (and may kill) is this thin parent; the driver gets SIGINT from the kernel when the parent dies
    (PR_SET_PDEATHSIG) and stops the experiment as on Ctrl-C: Tune saves its state and Ray shuts down. The
    driver runs in a process group of its own, so a Ctrl-C in the terminal reaches it once, through here;
    SIGINT, SIGTERM and SIGHUP to the parent are all passed on as SIGINT (Tune's graceful stop).
    """
    from gantrain.engine import PR_SET_PDEATHSIG
    import ctypes

    def in_child() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)

    command = [sys.executable, "-m", "gantrain.tune.driver", str(folder.path), "resume" if resume else "new",
               str(storage)]
    child = subprocess.Popen(command, env={**os.environ, DRIVER_ENV: "1"}, process_group=0, preexec_fn=in_child)

    def forward(signum, frame) -> None:
        child.send_signal(signal.SIGINT)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, forward) for sig in handled}
    try:
        while True:
            try:
                code = child.wait()
                break
            except InterruptedError:
                continue
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code if code >= 0 else 128 - code


# ----- Ray ------------------------------------------------------------------------------------------------
def start_ray(address: str | None) -> bool:
    """Joins ``address`` (``auto`` or ``ray://host:port``) or starts Ray on this machine; True if started here."""
    if ray.is_initialized():
        return False
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address:
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            ray.init(address=address, runtime_env={"env_vars": env}, **common)
        else:
            ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise GantrainError(f"--address: cannot start or join Ray at {address or 'this machine'} ({exc})") from None
    return True


# A multi-worker trial only drives its TorchTrainer (Tune refuses a trial of no resources at all).
TRIAL_DRIVER_CPUS = 0.01


def refuse_unplaceable_trials(settings: TuneSettings, cluster, wait_s: float = 0.0) -> None:
    """Raises :class:`ConfigError` when one trial's resources exceed the cluster's (``cluster()``:
    ``ray.cluster_resources``), after ``wait_s`` seconds of waiting for it to grow (0: at once)."""
    per_worker = {"CPU": settings.cpus_per_trial, "GPU": settings.gpus_per_trial}
    wait = {"wait_s": wait_s, "wait_flag": "--resource-wait", "say": lambda text: log.warning("%s", text)}
    if settings.workers_per_trial > 1:
        refuse_unplaceable(per_worker, settings.workers_per_trial, cluster, "--workers-per-trial x --cpus-per-trial"
                           + (" / --gpus-per-trial" if settings.gpus_per_trial else ""),
                           extra={"CPU": TRIAL_DRIVER_CPUS}, extra_for="the trial's driver", **wait)
    else:
        refuse_unplaceable(per_worker, 1, cluster, "--cpus-per-trial / --gpus-per-trial" if settings.gpus_per_trial
                           else "--cpus-per-trial", **wait)


def make_trainable(folder: ExperimentFolder, cfg: Config, settings: TuneSettings):
    bound = tune.with_parameters(train_trial, base=cfg.to_dict(), settings=settings, experiment=str(folder.path))
    if settings.workers_per_trial > 1:  # the trial only drives its TorchTrainer, whose workers reserve their own
        return tune.with_resources(bound, {"cpu": TRIAL_DRIVER_CPUS})
    return tune.with_resources(bound, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})


def make_scheduler(settings: TuneSettings, space: Space, reports: int):
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

    if settings.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=reports, reduction_factor=settings.reduction_factor,
                             grace_period=min(settings.grace_period, reports))
    if settings.scheduler == "pbt":
        bounds = {d.name: d.bounds for d in space.dimensions if d.bounds is not None}
        return PopulationBasedTraining(time_attr="training_iteration", hyperparam_mutations=space.pbt_mutations(),
                                       perturbation_interval=settings.perturbation_interval,
                                       custom_explore_fn=ClipToSpace(bounds))
    return None  # FIFO: every trial runs its full budget


class ClipToSpace:
    """PBT multiplies values by 0.8 or 1.2 with no regard for bounds; keep them inside the searched range."""

    def __init__(self, bounds: dict[str, tuple[float, float]]) -> None:
        self.bounds = bounds

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, (low, high) in self.bounds.items():
            if name in config:
                config[name] = min(max(config[name], low), high)
        return config


def make_searcher(settings: TuneSettings, space: Space, baseline: dict[str, Any] | None):
    points = [baseline] if baseline else None
    check_experiment(settings, space)
    if settings.search == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Ray's max_concurrent_trials applies to Searchers only; the random generator takes its own limit.
        return BasicVariantGenerator(points_to_evaluate=points, random_state=settings.search_seed,
                                     max_concurrent=settings.max_concurrent)
    try:
        if settings.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(points_to_evaluate=points, seed=settings.search_seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(points_to_evaluate=points, random_state_seed=settings.search_seed)
    except (AssertionError, ImportError) as exc:
        raise GantrainError(f"--search {settings.search}: its package is missing ({exc}); "
                            "pip install 'gantrain[tune]'") from None


def trial_dirname(trial) -> str:
    return trial_folder_name(trial.trial_id)


class ProgressLog(tune.Callback):
    """One log line per report and per trial end, in place of Ray's own progress tables."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        note = f"  diverged: {result['diverged']}" if result.get("diverged") else ""
        log.info("%s epoch %s: %s %s, loss D %s, G %s%s", trial.trial_id, result.get("epoch"), self.metric,
                 _fmt(result.get(self.metric)), _fmt(result.get("loss_d")), _fmt(result.get("loss_g")), note)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        log.warning("%s failed (%d retries so far); its error is in %s", trial.trial_id, trial.num_failures,
                    trial.path or "the trial folder")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        log.info("%s finished", trial.trial_id)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"


def make_tuner(folder: ExperimentFolder, cfg: Config, settings: TuneSettings, space: Space, callbacks: Sequence):
    reports = math.ceil(trial_epochs(cfg, settings) / report_every(cfg))
    config = tune.TuneConfig(
        metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
        scheduler=make_scheduler(settings, space, reports),
        search_alg=make_searcher(settings, space, space.baseline_point(cfg) if settings.baseline else None),
        max_concurrent_trials=(settings.max_concurrent or None) if settings.search != "random" else None,
        trial_dirname_creator=trial_dirname,
        reuse_actors=True)  # a new trial in a warm worker skips the process start and the torch import
    pbt = settings.scheduler == "pbt"
    run = tune.RunConfig(
        name=folder.path.name, storage_path=str(folder.path.parent), verbose=0,
        # PBT would otherwise exploit a trial's final report and restart it with no budget left
        stop={"training_iteration": reports} if pbt else None,
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=PBT_CHECKPOINTS_KEPT if pbt else CHECKPOINTS_KEPT),
        # the trials write their run folders into the experiment folder themselves (train_trial)
        sync_config=tune.SyncConfig(sync_artifacts=False), callbacks=[ProgressLog(settings.metric), *callbacks])
    return tune.Tuner(make_trainable(folder, cfg, settings), param_space=space.param_space(), tune_config=config,
                      run_config=run)


# ----- the whole experiment -------------------------------------------------------------------------------
def prepare(folder: ExperimentFolder, *, cfg: Config | None = None, settings: TuneSettings | None = None,
            space_file: str | Path | None = None, resume: bool = False) -> None:
    """Checks a new experiment (``cfg``, ``settings``, ``space_file``) and writes its folder, or checks that
    ``folder`` holds one to continue (``resume``): every refusal comes before Ray or any trial starts."""
    if resume:
        reopen(folder)
        return
    assert cfg is not None and settings is not None
    cfg = prepare_base(cfg, settings)
    if cfg.data.dataset == "folder":  # its trials' grids, plots and logs would become training data
        refuse_writing_inside(cfg.data.data_root, folder.path, "--storage/--name")
    space = load_space(space_file, cfg)
    check_experiment(settings, space)
    create(folder, cfg, settings, space)


def run_experiment(folder: ExperimentFolder, *, cfg: Config | None = None, settings: TuneSettings | None = None,
                   space_file: str | Path | None = None, resume: bool = False, address: str | None = None,
                   console: Console | None = None, callbacks: Sequence = ()) -> Outcome:
    """Runs a new experiment (``cfg``, ``settings``, ``space_file``) or continues one (``resume``)."""
    prepare(folder, cfg=cfg, settings=settings, space_file=space_file, resume=resume)
    return run_prepared(folder, resume=resume, address=address, console=console, callbacks=callbacks)


def run_prepared(folder: ExperimentFolder, *, resume: bool, address: str | None = None,
                 console: Console | None = None, callbacks: Sequence = ()) -> Outcome:
    """Runs the experiment :func:`prepare` wrote into ``folder`` (its base config, settings and space)."""
    console = console or Console(stderr=True)
    cfg = load_toml(folder.base_file)
    settings = load_settings(folder.settings_file)
    space = parse_space(folder.space_file.read_text(), cfg, str(folder.space_file))
    setup_logging(console, folder.path / "tune.log")
    warm_metrics(cfg)
    warm_rewrites(cfg, settings)
    started = start_ray(address)
    try:
        # a local Ray never grows: a trial larger than it is refused at once; a cluster may (--resource-wait)
        refuse_unplaceable_trials(settings, ray.cluster_resources, settings.resource_wait if address else 0.0)
        grid = _fit(folder, cfg, settings, space, resume, callbacks)
    finally:
        if started:
            ray.shutdown()
    return summarise(grid, cfg, settings, space, folder.path)


def _fit(folder: ExperimentFolder, cfg: Config, settings: TuneSettings, space: Space, resume: bool, callbacks):
    _quiet_ray_warnings()
    log.info("experiment %s: %d trials, %s scheduler, %s search over %s", folder.path,
             space.num_trials(settings.num_samples),
             settings.scheduler, settings.search, ", ".join(d.describe() for d in space.dimensions))
    if resume:
        tuner = tune.Tuner.restore(str(folder.path), make_trainable(folder, cfg, settings), resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = make_tuner(folder, cfg, settings, space, callbacks)
    return tuner.fit()


def _quiet_ray_warnings() -> None:
    # Every report carries a checkpoint, so Ray's "snapshotting often" advice is noise here; and the progress
    # lines come from ProgressLog, so Ray's own reporter (which prints even at verbose=0) stays off.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    logging.getLogger("ray").setLevel(logging.WARNING)
