"""One worker of a multi-process run, whoever starts it: torchrun's elastic agent (``gantrain run --ddp``) or Ray
Train (``--ray``). :func:`worker_main` builds the Trainer, runs it and says how this worker ended, as a
:class:`WorkerRecord` the launcher reads; the worker prints nothing of its own ending.

How a worker ends, and what its launcher does with it:

========== ================================================================ ==========================================
outcome    when                                                             the launcher
========== ================================================================ ==========================================
finished   the run reached its last step (or a hook ended it)               returns
stopped    a stop signal; every rank stopped at one step, rank 0 saved      one line, exit 128 + N, no restart
refused    a :class:`GantrainError` whose ``final`` is true (config, data,  one ``error:`` line, the error's exit
           checkpoint, run folder) met while building the run: every rank   code (2 for config errors), no restart
           refuses alike (:meth:`StopAgreement.refusals`), as a restart
           would
failed     anything else (a crash, a lost peer, a refusal mid-run)          restarts the group (--max-restarts)
========== ================================================================ ==========================================

The elastic agent restarts a group whenever a worker exits non-zero, and Ray Train whenever one raises; so a
worker that refused or stopped exits 0 (torchrun) or returns after one report naming its outcome (Ray Train), and
the record carries the rest.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from rich.console import Console

from gantrain.engine.config import Config
from gantrain.engine.dist.runtime import DistInfo
from gantrain.engine.errors import GantrainError, Interrupted, LostPeers, rebuild
from gantrain.engine.outputs.runlog import log_to_file
from gantrain.engine.state.files import atomic_write_text
from gantrain.engine.train.loop import FitResult, Hook, Trainer

#: The environment variable the torchrun launcher sets for its workers: the folder of their records.
STATUS_ENV = "GANTRAIN_LAUNCH_STATUS"


@dataclass
class WorkerRecord:
    """How one worker ended (see the module's table). ``kind``, ``message``, ``exit_code``: the error of a refused
    or failed worker (its class name); ``step``, ``checkpoint``, ``signal``: where a stopped run stopped."""

    rank: int
    outcome: str
    kind: str = ""
    message: str = ""
    exit_code: int = 0
    step: int | None = None
    checkpoint: str | None = None
    signal: int | None = None
    final: bool = False  # the error is one no restart cures (GantrainError.final)
    attempt: int = 0  # torchrun's restart of the worker group that wrote it (TORCHELASTIC_RESTART_COUNT)

    def write(self, folder: Path) -> None:
        atomic_write_text(folder / f"rank_{self.rank}.json", json.dumps(asdict(self)))

    @classmethod
    def read_all(cls, folder: Path) -> list[WorkerRecord]:
        """The records in ``folder``, by rank; a torn or foreign file is skipped."""
        records = []
        for path in sorted(folder.glob("rank_*.json")):
            try:
                data = json.loads(path.read_text())
                records.append(cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data}))
            except (OSError, ValueError, TypeError):
                continue
        return sorted(records, key=lambda r: r.rank)

    def error(self) -> GantrainError:
        """A refused worker's error, as the worker raised it."""
        return rebuild(self.kind, self.message, self.exit_code)


def first_refusal(records: Sequence[WorkerRecord]) -> WorkerRecord | None:
    return next((r for r in records if r.outcome == "refused"), None)


def inherited_refusal(records: Sequence[WorkerRecord]) -> WorkerRecord | None:
    """For a restarted worker: the error no restart cures that ended the last attempt mid-run (a full disk on
    rank 0 when it saved; the other ranks then lost it and failed too), or None. The restart meets it again, so
    the worker refuses at once instead of training up to it."""
    return next((r for r in records if r.final and r.outcome in ("failed", "refused")), None)


def worker_main(cfg: Config, info: DistInfo, *, resume: str | None, console: Console | None = None,
                hooks: Sequence[Hook] = (), on_start: Callable[[Trainer], None] | None = None,
                finished_ok: bool = False, record: Callable[[WorkerRecord], None] = lambda _record: None,
                evaluation: bool = True, divergence_watch: bool = True) -> FitResult:
    """Runs this rank's part of the run (the whole run in one process) and hands ``record`` how it ended;
    returns the fit's result. The one body of a torchrun worker, a Ray Train worker and a tune trial's worker.

    Raises what ended it otherwise, after the record: :class:`Interrupted` (a stop signal; its message says
    where it saved and how to continue, for the caller's one line; rank 0 also writes it to train.log), a refusal (``final``), :class:`LostPeers` (a collective failed because another worker is
    gone), anything else as it came (a crash). ``on_start(trainer)``: on every rank, once the run is built and
    before its first step (rank 0's line about a restart; a tune trial's restored hyperparameters).
    ``finished_ok``, ``evaluation``, ``divergence_watch``: see :class:`Trainer`."""
    trainer = None
    try:
        trainer = Trainer(cfg, console=console, dist_info=info, resume=resume, hooks=hooks, finished_ok=finished_ok,
                          evaluation=evaluation, divergence_watch=divergence_watch)
        if on_start is not None:
            started = False
            try:
                on_start(trainer)
                started = True
            finally:
                if not started:  # fit() will not release them: the run folder's lock, the stall watch, trackers
                    trainer.close()
        result = trainer.fit()
    except Interrupted as exc:  # the caller says its message on the console; the run's log keeps it too
        if exc.step is not None and info.is_main:
            log_to_file(logging.WARNING, str(exc))
        record(WorkerRecord(info.rank, "stopped", step=exc.step, signal=exc.signum,
                            checkpoint=str(exc.checkpoint) if exc.checkpoint else None))
        raise
    except GantrainError as exc:
        # Refused: final, and met while building the run, where every rank meets it alike (the ranks agree on what
        # only some of them check). One met mid-run (a full disk on rank 0) stays a failure: the other ranks are in
        # a collective that only the group's stop ends.
        refused = exc.final and trainer is None
        record(WorkerRecord(info.rank, "refused" if refused else "failed", type(exc).__name__, str(exc),
                            exc.exit_code, step=_step(trainer), final=exc.final))
        raise
    except (torch.distributed.DistError, RuntimeError) as exc:
        if not (info.world_size > 1 and lost_peer(exc)):
            raise
        error = LostPeers(f"rank {info.rank}: lost the other DDP workers at step {_step(trainer)} "
                          f"({str(exc).splitlines()[0][:160]}); no checkpoint of this step")
        record(WorkerRecord(info.rank, "failed", "LostPeers", str(error), error.exit_code, step=_step(trainer)))
        raise error from None
    record(WorkerRecord(info.rank, "finished", step=result.steps,
                        checkpoint=str(result.last_checkpoint) if result.last_checkpoint else None))
    return result


def _step(trainer: Trainer | None) -> int | None:
    return trainer.step if trainer is not None and hasattr(trainer, "pos") else None


def lost_peer(exc: BaseException) -> bool:
    """A collective failed because another worker died (gloo/NCCL transport errors), not a bug here."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistError) or any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "gloo/transport",
                                  "NCCL communicator was aborted"))
