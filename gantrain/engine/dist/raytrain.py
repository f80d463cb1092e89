"""``gantrain run --ray``: the same Trainer as N DDP workers of a Ray Train ``TorchTrainer``.

Ray Train starts the workers (on the cluster at ``--ray-address``, or a local Ray), sets up their process group
(gloo on CPU, NCCL with ``--gpus-per-worker``) and restarts them after a failure (``FailureConfig``,
``--max-restarts`` times) from the newest checkpoint this launch reported to it (one of an earlier launch, or of
another run sharing ``--ray-storage``, is never taken for it), else from the ``last.pt`` this launch wrote
(Ray Train takes in a report only when it next polls the workers, every 2 s, so a failure just after an epoch
end can leave it none); rank 0 then says in train.log that Ray Train restarted the workers and the step it
resumes from. Rank 0 writes the run folder (``--out``, the same files as a torchrun run) and, at each epoch end,
reports ``last.pt`` to Ray Train, which keeps it under ``--ray-storage``; every worker reads ``--data-root`` on
its own node (the same path everywhere, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from gantrain.engine.config import Config, from_dict
from gantrain.engine.dist.runtime import DistInfo, caught_stop_signals, require_ray_train
from gantrain.engine.dist.worker import WorkerRecord, first_refusal, worker_main
from gantrain.engine.errors import ConfigError, GantrainError, Interrupted
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.checkpoint import load_checkpoint, restart_resume
from gantrain.engine.state.rundir import RunDir
from gantrain.engine.state.schema import step_of
from gantrain.engine.train.loop import Trainer


#: The file a Ray Train checkpoint folder holds: the run's last.pt, under the same name.
RAY_CHECKPOINT_FILE = RunDir(Path(".")).last.name
#: Beside it: the id of the launch that reported it.
RAY_LAUNCH_FILE = "gantrain-launch"


def ray_worker(config: dict) -> None:
    """One DDP worker: builds the Trainer on Ray's process group and reports each epoch (rank 0: with last.pt)."""
    import ray.train

    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    info = DistInfo(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank())
    restored, resume = ray.train.get_checkpoint(), config["resume"]
    # A checkpoint that an earlier attempt of this launch saved: Ray Train restarted the workers after a failure.
    on_disk = restart_resume(RunDir(cfg.run_dir), None, config["started"])
    restart = on_disk is not None
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(restored.as_directory())) if restored is not None else None
        # Ray Train hands over the newest checkpoint its storage holds for this run name, also one an earlier
        # launch (or another run sharing --ray-storage) reported: only this launch's own is a restart's.
        if folder is not None and _launch_of(folder) == config["launch"]:
            resume = str(folder / RAY_CHECKPOINT_FILE)
            restart = True
        elif restart:  # a failure before Ray Train took in any report of this launch
            resume = on_disk
        note = (lambda trainer: trainer.dist.is_main and log.warning(
            "Ray Train restarted the workers after a failure (--max-restarts %d); resuming from step %d (checkpoint "
            "%s)", cfg.dist.max_restarts, trainer.step, trainer.resume_path)) if restart else None
        ended: list[WorkerRecord] = []
        try:
            worker_main(cfg, info, resume=resume, console=Console(stderr=True),
                        hooks=[_EpochReport(config["launch"])], on_start=note, record=ended.append)
            if info.is_main:  # the driver tells a finished run from one Ray Train aborted (Ctrl-C) by this
                config["outcomes"].put(json.dumps(asdict(ended[-1])))
        except GantrainError:
            if not (ended and ended[-1].outcome == "refused"):  # a failure: Ray Train restarts the group
                raise
            # Ray Train restarts a group whose worker raised; every rank refused alike, so each hands its record
            # to the driver (a queue: other nodes share no folder with it) and returns: the driver refuses once.
            config["outcomes"].put(json.dumps(asdict(ended[-1])))


class _EpochReport:
    """The Trainer's after-epoch hook under Ray Train (``launch``: this launch's id, kept with each checkpoint)."""

    def __init__(self, launch: str) -> None:
        self.launch = launch

    def after_epoch(self, trainer: Trainer, epochs_done: int) -> None:
        _report(trainer, epochs_done, self.launch)


def _launch_of(folder: Path) -> str | None:
    """The id of the launch that reported the Ray Train checkpoint ``folder`` (None: an older gantrain's)."""
    try:
        return (folder / RAY_LAUNCH_FILE).read_text().strip()
    except OSError:
        return None


def _report(trainer: Trainer, epochs_done: int, launch: str) -> None:
    """Every rank reports (Ray Train wants the same number of reports from each); rank 0 adds the checkpoint
    saved at this epoch end, as a folder holding a hard link to it (no copy until Ray persists it) and the id of
    this launch (a later launch does not take it for a restart's)."""
    import ray.train

    metrics = {"epoch": epochs_done, "step": trainer.step, **trainer.epoch_means}
    saved = trainer.checkpoints.saved_step == trainer.step and trainer.last_checkpoint is not None
    if not (trainer.dist.is_main and saved):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="gantrain-ray-") as folder:
        try:
            os.link(trainer.last_checkpoint, Path(folder) / RAY_CHECKPOINT_FILE)
        except OSError:
            import shutil

            shutil.copy2(trainer.last_checkpoint, Path(folder) / RAY_CHECKPOINT_FILE)
        (Path(folder) / RAY_LAUNCH_FILE).write_text(launch)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_on_ray(cfg: Config, resume: str | None, console: Console | None = None) -> None:
    require_ray_train()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    d = cfg.dist
    # Workers run in other folders (and on other nodes): every path they read or write is made absolute here.
    cfg.run.out = str(cfg.run_dir.resolve())
    if cfg.data.data_root:
        cfg.data.data_root = str(Path(cfg.data.data_root).resolve())
    resume = str(Path(resume).resolve()) if resume and resume != "auto" else resume
    storage = _storage_path(d.ray_storage) or str(Path(cfg.run.out) / "ray")
    started = False
    if not ray.is_initialized():
        try:
            if d.ray_address:
                ray.init(address=d.ray_address, log_to_driver=True)
            else:
                ray.init(address="local", include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise GantrainError(f"--ray-address: cannot start or join Ray at {d.ray_address or 'this machine'} "
                                f"({str(exc).splitlines()[0]})") from None
        started = True
    try:
        resources = {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker else {})}
        # a local Ray never grows: a request larger than it is refused at once; a cluster may (--ray-wait)
        refuse_unplaceable(resources, d.ray_workers, ray.cluster_resources, "--ray-workers x --cpus-per-worker"
                           + (" / --gpus-per-worker" if d.gpus_per_worker else ""),
                           wait_s=d.ray_wait if d.ray_address else 0.0, wait_flag="--ray-wait",
                           say=lambda text: log.warning("%s", text))
        from ray.util.queue import Queue

        outcomes = Queue(actor_options={"num_cpus": 0})  # the workers' refusals (WorkerRecord as JSON)
        trainer = TorchTrainer(
            ray_worker, train_loop_config={"cfg": cfg.to_dict(), "resume": resume, "started": time.time(),
                                           "outcomes": outcomes, "launch": uuid.uuid4().hex},
            scaling_config=ScalingConfig(num_workers=d.ray_workers, use_gpu=d.gpus_per_worker > 0,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(timeout_s=max(1, round(60 * d.dist_timeout))),  # --dist-timeout
            run_config=RunConfig(name="train", storage_path=storage,
                                 failure_config=_failure_config(FailureConfig, d.max_restarts)))
        received: list[int] = []

        def as_sigint(signum, _frame):  # Ray's own SIGTERM handler dumps a crash report and aborts (exit 134)
            received.append(signum)
            os.kill(os.getpid(), signal.SIGINT)  # Ray Train's SIGINT handler stops the workers

        previous = {}
        with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
            previous = {sig: signal.signal(sig, as_sigint) for sig in caught_stop_signals() if sig != signal.SIGINT}
        try:
            result = trainer.fit()
        except SystemExit:  # Ray Train's SIGINT handler exits when its controller is already gone
            _refuse_an_aborted_run(cfg, received)
        except Exception as exc:  # TrainingFailedError (Ray Train 2): the workers' own error is above
            workers = bool(getattr(exc, "worker_failures", None))
            after = f" after {d.max_restarts} restart(s) allowed (--max-restarts)" if workers else ""
            raise GantrainError(f"--ray: the Ray Train run failed{after}: {_failures(exc)}") from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        records = [WorkerRecord(**json.loads(outcomes.get_nowait())) for _ in range(outcomes.qsize())]
        refused = first_refusal(sorted(records, key=lambda r: r.rank))
        if refused is not None:  # a worker's refusal (what no restart cures): as one process would say it
            raise refused.error()
        if getattr(result, "error", None) is not None:
            raise GantrainError(f"--ray: the Ray Train run failed: {str(result.error).strip().splitlines()[0][:300]}")
        if not any(r.rank == 0 and r.outcome == "finished" for r in records):
            _refuse_an_aborted_run(cfg, received)
    finally:
        if "outcomes" in locals():
            outcomes.shutdown()
        if started:
            ray.shutdown()


def _refuse_an_aborted_run(cfg: Config, received: list[int]) -> None:
    """Raises :class:`Interrupted` (the signal of ``received``, else SIGINT: exit 128 + N) for a Ray Train run
    whose rank 0 did not finish: Ray Train's own SIGINT handler aborts the workers (Ctrl-C; SIGTERM and SIGHUP are
    passed to it as SIGINT) and returns as if the run had ended (or exits when its controller is gone), which would
    end the command with nothing said. The run's last.pt, when this node sees it, says where it stands."""
    last = RunDir(cfg.run_dir).last
    try:
        step = step_of(load_checkpoint(last)) if last.is_file() else None
    except GantrainError:
        step = None
    where = (f"the newest checkpoint is {last} (step {step})" if step is not None
             else "no checkpoint of it is on this machine")
    signum = received[0] if received else signal.SIGINT
    raise Interrupted(signum, f"{signal.Signals(signum).name}: Ray Train aborted the workers before the run's end; "
                              f"{where}; continue with {cfg.resume_flags}")


def _storage_path(storage: str) -> str:
    """--ray-storage as Ray Train takes it: a URI (``s3://...``) as it is, a local path made absolute (Ray refuses
    a relative one with "URI has empty scheme"; --out and --data-root are made absolute alike)."""
    if not storage or "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def _failure_config(failure_config: type, max_restarts: int):
    """Ray Train's FailureConfig: --max-restarts worker-group failures, and a bounded number of failed starts of
    the worker group (Ray Train 2 retries those without limit by default: "max allowed: inf")."""
    try:
        return failure_config(max_failures=max_restarts, controller_failure_limit=max_restarts)
    except TypeError:  # a Ray Train without that field
        return failure_config(max_failures=max_restarts)


def _shortfall(per_worker: dict[str, float], workers: int, cluster: dict[str, float], flags: str,
               extra: dict[str, float], extra_for: str) -> str | None:
    """What of the request the cluster's totals cannot hold, as a sentence naming asked and present, or None."""
    for name, amount in per_worker.items():
        asked, there = amount * workers + extra.get(name, 0.0), cluster.get(name, 0.0)
        if amount > 0 and asked > there + 1e-9:
            parts = f"{workers} x {amount:g} {name}" + (f" + {extra[name]:g} {name} for {extra_for}"
                                                          if extra.get(name) else "")
            return f"{flags}: {parts} = {asked:g} {name}, but this Ray cluster has {there:g} {name}"
    return None


def refuse_unplaceable(per_worker: dict[str, float], workers: int, cluster: Callable[[], dict[str, float]],
                       flags: str, extra: dict[str, float] | None = None, extra_for: str = "", *,
                       wait_s: float = 0.0, wait_flag: str = "", say: Callable[[str], None] = lambda _text: None,
                       poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> None:
    """Returns once ``workers`` x ``per_worker`` resources (plus ``extra``, what ``extra_for`` takes besides) fit the
    totals ``cluster()`` reports (``ray.cluster_resources``); else raises :class:`ConfigError` naming what was asked
    and what exists, for Ray would wait forever. A cluster that cannot grow (a local Ray: ``wait_s`` 0) is refused
    at once; one that can (an autoscaler) is given ``wait_s`` seconds (``wait_flag``), said once through ``say``,
    and polled every ``poll_s``."""
    extra = extra or {}
    short = _shortfall(per_worker, workers, cluster(), flags, extra, extra_for)
    if short is None:
        return
    if wait_s > 0:
        say(f"{short}: waiting up to {wait_s:g} s ({wait_flag}) for the cluster to grow")
        deadline = clock() + wait_s
        while short is not None and clock() < deadline:
            sleep(min(poll_s, max(0.0, deadline - clock())))
            short = _shortfall(per_worker, workers, cluster(), flags, extra, extra_for)
        if short is None:
            return
        raise ConfigError(f"{short} after waiting {wait_s:g} s ({wait_flag}); ask for less or grow the cluster")
    raise ConfigError(f"{short}; ask for less")


def _failures(exc: BaseException) -> str:
    """The failed workers' ranks and first lines (a WorkerGroupError's own first line only says that workers
    failed; a worker whose process died is a failed health check whose cause is the actor's death)."""
    def first(error: BaseException) -> str:
        lines = str(error).strip().splitlines()
        return (lines[0] if lines else type(error).__name__)[:160]

    failures = getattr(exc, "worker_failures", None) or {}
    return "; ".join(f"worker rank {rank}: {first(getattr(error, 'health_check_failure', None) or error)}"
                     for rank, error in sorted(failures.items())) or first(exc)
