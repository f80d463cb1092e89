"""Starting a training run: in this process, or as N worker processes under torch's elastic agent.

``gantrain run --ddp`` runs the agent of ``torchrun`` (``torch.distributed.run``) *in this process* rather than
as a child: the agent's own signal handling then covers the whole job. SIGINT/SIGTERM/SIGHUP to the launcher
reach the agent, which forwards the signal to every worker and waits for them (``--shutdown-timeout``) before
the launcher returns; the workers agree on a common stop step, rank 0 saves a checkpoint, and the launcher
prints one line. Rendezvous errors (a port in use) arrive as exceptions here and become one ``error:`` line
instead of torchrun's traceback. SIGKILL cannot be caught: each worker asks the kernel for SIGTERM when its
parent (the agent) dies (:func:`gantrain.engine.dist.runtime.die_with_parent`), so no worker outlives a killed
launcher, and each still stops at an agreed step with a checkpoint.

A worker that dies (killed, crashed, its node lost) is the agent's to handle too: with ``--max-restarts N`` it
stops the others and starts the worker group again, up to N times; each restarted worker sees
``TORCHELASTIC_RESTART_COUNT`` > 0 and resumes from the ``last.pt`` this launch wrote (resume is exact, so the
run ends with the weights an unbroken run would have). The launcher says in one line which worker failed, how,
and which restart follows, and rank 0 says in train.log which restart it is and the step it resumed from. With
the restarts used up the agent stops every worker and the launcher says why in one ``error:`` line.

None of this reads the agent's log text (its loggers are silenced) or overrides its methods: the restart and
its number come from torch elastic's public metrics API, which worker it was from the workers' own start
records, how it ended from the kernel (``waitid`` without reaping: the workers are this process's children);
:mod:`gantrain.engine.dist.restarts` says why each.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console

from gantrain.engine.config import Config, to_toml
from gantrain.engine.dist.preflight import preflight
from gantrain.engine.dist.restarts import ExitWatch, RestartMetrics, WorkerStart, cause, follower, hearing_restarts
from gantrain.engine.dist.runtime import (caught_stop_signals, die_with_parent, init_distributed,
                                          launched_by_torchrun, pick_device, require_ray_train, shutdown_distributed)
from gantrain.engine.dist.worker import STATUS_ENV, WorkerRecord, first_refusal, inherited_refusal, worker_main
from gantrain.engine.errors import ConfigError, GantrainError, Interrupted, LostPeers
from gantrain.engine.gan.hardware import device_peaks
from gantrain.engine.outputs.runlog import log, setup_logging
from gantrain.engine.state.checkpoint import restart_resume
from gantrain.engine.state.rundir import RunDir
from gantrain.engine.train.loop import FitResult, Trainer

# What the launcher knows of the last worker failure it restarted after, for rank 0's line in train.log.
RESTART_FILE = "restart.json"
# The launch's start (time.time()): a restarted worker resumes from a last.pt written since, not an older one.
STARTED_ENV = "GANTRAIN_LAUNCH_STARTED"
AGENT_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.elastic.agent.server.api")
# Rank 0 may be mid-evaluation when a signal arrives; the stop waits for the next step boundary, then the
# checkpoint. The agent sends SIGKILL only after this long.
SHUTDOWN_TIMEOUT_S = 300


class _EarlyStop(BaseException):
    """A signal to the launcher before the agent handles signals (a BaseException: rendezvous code catches
    Exception)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _early_stop(signum, _frame):
    raise _EarlyStop(signum)


def torchrun_args(cfg: Config, config_file: Path, resume: str | None) -> list[str]:
    """torchrun's arguments whose workers run ``gantrain run`` on the resolved config file."""
    d = cfg.dist
    if d.rdzv_endpoint:  # the rendezvous assigns node ranks; its host runs the store (the first to bind it)
        where = ["--rdzv-backend=c10d", f"--rdzv-endpoint={d.rdzv_endpoint}", f"--rdzv-id={d.rdzv_id}"]
    else:
        where = [f"--node-rank={d.node_rank}", f"--master-addr={d.master_addr}", f"--master-port={d.master_port}"]
    # the agent's own log folders go into the launch's temporary folder (else $TMPDIR/torchelastic_*, left behind)
    args = [f"--nproc-per-node={d.nproc}", f"--nnodes={d.nnodes}", *where, f"--max-restarts={d.max_restarts}",
            f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}", f"--log-dir={config_file.parent / 'elastic'}",
            f"--signals-to-handle={agent_signals()}", "-m", "gantrain", "run", "--config", str(config_file)]
    return args + (["--resume", resume] if resume else [])


class _RestartNotice:
    """Called as the agent restarts the worker group (:class:`RestartMetrics`): one gantrain line naming the
    worker that ended the group and how (:class:`ExitWatch`, :func:`cause`), and the restart file rank 0 reads.
    ``by_host``: name the worker by its local rank and this host (a c10d rendezvous assigns the global ranks)."""

    def __init__(self, status_dir: Path, watch: ExitWatch, by_host: bool) -> None:
        self.status_dir, self.watch, self.by_host = status_dir, watch, by_host

    def __call__(self, restart: int, most: int) -> None:
        records = WorkerRecord.read_all(self.status_dir)
        first = cause(self.watch.ended(), records)
        what = "a worker failed"
        if first is not None:
            start = first.start
            who = f"local rank {start.local_rank} on {socket.gethostname()}" if self.by_host else f"rank {start.rank}"
            how = _how(first.code) if first.code is not None else "ended without a record"
            own = next((r for r in records if (r.rank, r.attempt) == (start.rank, start.attempt)), None)
            if follower(first, own):  # none here failed by itself: the failure was on another node
                how = f"{how} after losing its peers (a worker on another node failed?)"
            what = f"DDP worker {who} (pid {start.pid}) {how}"
        (self.status_dir / RESTART_FILE).write_text(json.dumps({"restart": restart, "of": most, "what": what}))
        log.warning("%s; restarting the worker group (restart %d of %d, --max-restarts); every rank resumes "
                    "from the run's last.pt", what, restart, most)


@contextmanager
def _restart_notices(status_dir: Path, role: str, max_restarts: int, by_host: bool) -> Iterator[None]:
    """Within: each restart of the agent's worker group of ``role`` is said in one line (:class:`_RestartNotice`)."""
    with ExitWatch(status_dir) as watch, hearing_restarts(
            lambda previous: RestartMetrics(role, max_restarts, _RestartNotice(status_dir, watch, by_host), previous)):
        yield


def _how(code: int) -> str:
    return (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
            else f"exited with code {code}")


def launch_workers(cfg: Config, resume: str | None, console: Console | None = None) -> None:
    """Runs torchrun's elastic agent here and waits for the workers; each reads the whole resolved config, so
    no flag is parsed twice."""
    from torch.distributed import DistNetworkError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    with tempfile.TemporaryDirectory(prefix="gantrain-launch-") as tmp:
        config_file = RunDir(Path(tmp)).config
        config_file.write_text(to_toml(cfg))
        threads = max(1, (os.cpu_count() or 1) // cfg.dist.nproc)
        saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", STATUS_ENV, STARTED_ENV)}
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # the agent passes its environment on
        os.environ[STATUS_ENV] = tmp
        os.environ[STARTED_ENV] = repr(time.time())
        if not log.handlers:
            setup_logging(console or Console(stderr=True))
        _measure_peaks_once(cfg, os.environ["OMP_NUM_THREADS"])
        # The agent logs each step of its shutdown as warnings; the outcome is said here, in one line. Its
        # module loggers carry levels of their own, so each one is quietened.
        elastic_logs = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                        if name.startswith("torch.distributed")]
        levels = [logger.level for logger in elastic_logs]
        for logger in elastic_logs:
            logger.setLevel(logging.CRITICAL)
        # The agent's own loggers are dropped whole: what it does is learnt from its metrics (_restart_notices).
        dropped, agent_logs = logging.NullHandler(), [logging.getLogger(name) for name in AGENT_LOGGERS]
        agent_saved = [(logger.propagate, logger.level) for logger in agent_logs]
        for logger in agent_logs:
            logger.setLevel(logging.CRITICAL)
            logger.propagate = False
            logger.addHandler(dropped)
        # the agent installs its own handlers when it starts the workers; until then, stop here
        handlers = {sig: signal.signal(sig, _early_stop) for sig in caught_stop_signals()}
        try:
            launch_config, entrypoint, args = config_from_args(parse_args(torchrun_args(cfg, config_file, resume)))
            with _restart_notices(Path(tmp), launch_config.role, launch_config.max_restarts,
                                  by_host=bool(cfg.dist.rdzv_endpoint)):
                elastic_launch(launch_config, entrypoint)(*args)
            # A worker that refused (what no restart cures) or stopped on a signal (to it, not to the launcher)
            # exits 0, or the agent would restart the group; its record says the rest.
            records = WorkerRecord.read_all(Path(tmp))
            refused = first_refusal(records)
            if refused is not None:
                raise refused.error()
            stopped = [r for r in records if r.outcome == "stopped" and r.step is not None]
            if stopped:
                raise _interrupted(Path(tmp), int(stopped[0].signal), cfg, "the workers")
        except _EarlyStop as exc:
            raise _interrupted(Path(tmp), exc.signum, cfg, "the launcher") from None
        except DistNetworkError as exc:
            raise _network_error(cfg, exc) from None
        except SignalException as exc:
            if _complete(Path(tmp), cfg):  # the signal came while the workers wrote the run's end, which they did
                log.warning("%s to the launcher at the end of the run: the workers finished it first; the run is "
                            "complete", signal.Signals(int(exc.sigval)).name)
                return
            raise _interrupted(Path(tmp), int(exc.sigval), cfg, "the launcher") from None
        except ChildFailedError as exc:
            raise _failed(Path(tmp), exc, cfg) from None
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            for logger, (flag, level) in zip(agent_logs, agent_saved):
                logger.removeHandler(dropped)
                logger.propagate = flag
                logger.setLevel(level)
            for logger, level in zip(elastic_logs, levels):
                logger.setLevel(level)
            for key, value in saved_env.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


def agent_signals() -> str:
    """torchrun's ``--signals-to-handle`` (the signals its agent catches and passes to the workers): its default
    (SIGTERM, SIGINT, SIGHUP, SIGQUIT) but SIGHUP when this process ignores it (``nohup``): the agent would
    otherwise stop the workers on the hang-up nohup is there to survive."""
    return ",".join(sig.name for sig in (*caught_stop_signals(), signal.SIGQUIT))


def _measure_peaks_once(cfg: Config, threads: str) -> None:
    """On a CPU, the workers' peak probe (``--amp auto`` and MFU read it) measured here once, with a worker's
    threads, before they start: N workers probing at once would share the cores and could disagree."""
    if pick_device(cfg.run.device).type != "cpu" or not threads.isdigit() or int(threads) < 1:
        return
    cores = os.cpu_count() or 1
    if cfg.dist.nproc * int(threads) > cores:
        log.warning("--nproc %d at %s thread(s) each on %d CPU cores: the processes share cores, each step waits "
                    "for the slowest (--nproc %d fills them)", cfg.dist.nproc, threads, cores,
                    max(1, cores // int(threads)))
    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        device_peaks(torch.device("cpu"))
    finally:
        torch.set_num_threads(saved)


def _network_error(cfg: Config, exc: Exception) -> GantrainError:
    d = cfg.dist
    if d.rdzv_endpoint:
        return GantrainError(f"--rdzv-endpoint: the c10d rendezvous at {d.rdzv_endpoint} failed: "
                             f"{str(exc).splitlines()[0]}")
    if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
        return ConfigError(f"--master-port: port {d.master_port} on {d.master_addr} is already in use (another "
                           "DDP run?); choose a free one with --master-port")
    return GantrainError(f"--master-addr/--master-port: the workers' rendezvous at {d.master_addr}:{d.master_port} "
                         f"failed: {str(exc).splitlines()[0]}")


def _interrupted(status_dir: Path, signum: int, cfg: Config, who: str) -> Interrupted:
    """One line for a run the workers stopped together; their records hold the step and rank 0's checkpoint."""
    name = signal.Signals(signum).name
    records = WorkerRecord.read_all(status_dir)
    stopped = [r for r in records if r.outcome == "stopped" and r.step is not None]
    if not stopped and any(r.outcome == "finished" for r in records):  # rank 0 did not finish writing the end
        return Interrupted(signum, f"{name} to {who} while the run's end was written; "
                                   f"{cfg.resume_flags} writes what is missing")
    if not stopped:  # no worker got as far as its training loop
        return Interrupted(signum, f"{name} to {who} before training started; no checkpoint")
    first = stopped[0]  # the lowest rank of this node
    if first.rank != 0:  # another node: rank 0 saved on the master node
        where = "rank 0 saved the checkpoint on the master node"
    elif first.checkpoint:
        where = f"checkpoint saved to {first.checkpoint}"
    else:
        where = "no checkpoint (no step done)"
    return Interrupted(signum, f"{name} to {who}: all {cfg.dist.nproc * cfg.dist.nnodes} workers stopped at step "
                               f"{first.step}; {where}; continue with {cfg.resume_flags}",
                       checkpoint=Path(first.checkpoint) if first.checkpoint else None, step=first.step)


def _complete(status_dir: Path, cfg: Config) -> bool:
    """Whether rank 0 (on this node) finished the run and its final outputs are all written."""
    finished = any(r.rank == 0 and r.outcome == "finished" for r in WorkerRecord.read_all(status_dir))
    return finished and not RunDir(cfg.run_dir).missing_final_outputs()


def _failed(status_dir: Path, exc, cfg: Config) -> GantrainError:
    """Workers that stopped on a signal (exit code 128 + N) are an interruption; anything else a failure."""
    codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
    stop_codes = {128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGHUP}
    stopped = [code for code in codes.values() if code in stop_codes]
    # once one worker has exited, the agent sends SIGTERM to the others: -SIGTERM is its doing, not a fault
    if stopped and all(code in stop_codes or code == -signal.SIGTERM for code in codes.values()):
        return _interrupted(status_dir, max(stopped) - 128, cfg, "the workers")
    records = WorkerRecord.read_all(status_dir)
    latest = [r for r in records if r.attempt == max(r.attempt for r in records)] if records else []
    # A rank that only lost its peers (a collective failed because another worker was gone) is a consequence.
    lost = {r.rank for r in latest if r.kind == LostPeers.__name__}
    # The cause: a worker killed by a signal (other than the agent's SIGTERM), else the first that failed of its
    # own accord, else the first that failed.
    ranked = sorted(codes.items(), key=lambda rc: (not (rc[1] < 0 and rc[1] != -signal.SIGTERM), rc[0] in lost,
                                                   rc[0]))
    cause = [(r, c) for r, c in ranked if c not in stop_codes and c != -signal.SIGTERM]
    rank, code = (cause or ranked)[0]
    final = inherited_refusal(latest)
    if final is not None:  # with no restart left: the error no restart cures, as one process says it
        return final.error()
    said = next((r for r in latest if r.rank == rank and r.outcome == "failed" and r.message), None)
    own = f": {said.message}" if said is not None else " (its own message, if any, is above)"
    last = RunDir(cfg.run_dir).last
    newest = f"continue from the newest periodic checkpoint with {cfg.resume_flags} ({last})" if last.is_file() \
        else "no checkpoint was saved yet"
    used = f" after {cfg.dist.max_restarts} restart(s), all that --max-restarts allows" if cfg.dist.max_restarts else ""
    own = own.removesuffix("; no checkpoint of this step")  # said once, below
    return GantrainError(f"DDP worker rank {rank} {_how(code)}{used}{own}; the launcher stopped the others; no "
                         f"checkpoint of this step: {newest}")


def train(cfg: Config, *, resume: str | None = None, console: Console | None = None) -> FitResult | None:
    """Trains ``cfg``. With --ddp outside torchrun, launches the workers and waits for them."""
    if cfg.dist.ray and not launched_by_torchrun():
        from gantrain.engine.dist.raytrain import train_on_ray

        require_ray_train()  # before the preflight's probes
        if not cfg.dist.ray_address:  # a local Ray: its workers see what this process sees
            preflight(cfg, resume)
        train_on_ray(cfg, resume, console)
        return None
    if cfg.dist.ddp and not launched_by_torchrun():
        preflight(cfg, resume)  # what no restart cures is refused here, once, before any worker starts
        launch_workers(cfg, resume, console)
        return None
    return _run_here(cfg, resume, console)


def _record_the_launch(cfg: Config) -> None:
    """A run torchrun started by hand: --ddp, --nproc and --nnodes as torchrun's environment says (LOCAL_WORLD_SIZE,
    WORLD_SIZE), so config.toml and the checkpoints name the launch that trained (a resume, a rerun from
    config.toml, the effective batch); one line when they differ from the command's."""
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launch = {"ddp": world > 1, "nproc": local, "nnodes": max(1, world // max(local, 1))}
    given = {name: getattr(cfg.dist, name) for name in launch}
    if given != launch:
        if os.environ.get("RANK") == "0":
            log.info("torchrun started this run: recorded as %s (the command gave %s)",
                     ", ".join(f"{k} = {v}" for k, v in launch.items()),
                     ", ".join(f"{k} = {v}" for k, v in given.items()))
        for name, value in launch.items():
            setattr(cfg.dist, name, value)


def _run_here(cfg: Config, resume: str | None, console: Console | None) -> FitResult | None:
    """The whole run in this process, or one worker of torchrun (``gantrain run --ddp``'s agent, or torchrun by
    hand): :func:`worker_main` on its process group. Under gantrain's launcher a worker says nothing of how it
    ended (the launcher reads its record and says one line for all) and exits 0 for what a restart cannot change
    (a refusal; a stop every rank agreed on), so the agent does not restart the group; by hand, each worker says
    its own line."""
    status, restart = None, 0
    if launched_by_torchrun():
        die_with_parent()
        _stop_before_training()
        status = os.environ.get(STATUS_ENV)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if status:  # who this worker is, for the launcher's line should it end the group (ExitWatch)
            WorkerStart.of_this_process().write(Path(status))
        inherited = inherited_refusal(WorkerRecord.read_all(Path(status))) if status and restart else None
        if inherited is not None:  # before the process group: every local rank reads the same records
            WorkerRecord(int(os.environ["RANK"]), "refused", inherited.kind, inherited.message, inherited.exit_code,
                         final=True, attempt=restart).write(Path(status))
            raise SystemExit(0)  # the launcher says it once; the agent restarts no more
        resume = _restart_resume(cfg, resume, restart)
        if not status:  # torchrun by hand: the run records the launch it had (config.toml said 1 process)
            _record_the_launch(cfg)
    info = init_distributed(cfg.run.device, cfg.dist.dist_timeout)
    ended: list[WorkerRecord] = []

    def record(rec: WorkerRecord) -> None:
        rec.attempt = restart
        ended.append(rec)
        if status:  # for the launcher (torchrun by hand keeps none)
            rec.write(Path(status))

    try:
        return worker_main(cfg, info, resume=resume, console=console, record=record,
                           on_start=(lambda trainer: _log_restart(trainer, restart)) if restart else None)
    except Interrupted as exc:
        if not status:  # one process, or torchrun by hand: this process says its line (the exception's)
            raise
        _ignore_stop_signals()  # on its way out: the agent's SIGTERM to the others must not cut this short
        raise SystemExit(0 if exc.step is not None else exc.exit_code) from None
    except GantrainError as exc:
        if not status:
            raise
        _ignore_stop_signals()
        refused = bool(ended) and ended[-1].outcome == "refused"
        raise SystemExit(0 if refused else exc.exit_code) from None
    finally:
        shutdown_distributed()


def _restart_resume(cfg: Config, resume: str | None, restart: int) -> str | None:
    """What a worker of restart ``restart`` resumes from: the last.pt this launch wrote, else what the launch
    was asked to start from (a restart before the first checkpoint starts that again; exact all the same)."""
    if not restart:
        return resume
    return restart_resume(RunDir(cfg.run_dir), resume, float(os.environ.get(STARTED_ENV, "inf")))


def _log_restart(trainer: Trainer, restart: int) -> None:
    if not trainer.dist.is_main:
        return
    status = os.environ.get(STATUS_ENV)
    try:
        what = json.loads((Path(status) / RESTART_FILE).read_text())["what"] if status else None
    except (OSError, ValueError, KeyError):
        what = None
    where = (f"resumed from {trainer.resume_path} at step {trainer.step}" if trainer.resume_path
             else "no checkpoint of this launch yet: started again from step 0")
    log.warning("restart %d of %d (--max-restarts) after %s: %s", restart, trainer.cfg.dist.max_restarts,
                what or "a worker failed (on another node)", where)


def _ignore_stop_signals() -> None:
    """A worker on its way out ignores further stop signals: Python resets its handlers to the default
    (terminate) while it shuts down, and the agent sends SIGTERM to the survivors once one has exited."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


def _stop_before_training() -> None:
    """Until the training loop takes over signals (Trainer.fit), a worker told to stop just stops: one line
    (or none under the launcher, which says it), exit code 128 + N, no KeyboardInterrupt traceback."""
    def handler(signum, _frame):
        raise Interrupted(signum, f"{signal.Signals(signum).name} before training started; no checkpoint")

    for sig in caught_stop_signals():
        signal.signal(sig, handler)
