"""What the launcher of ``gantrain run --ddp`` learns when torch's elastic agent restarts the worker group (which
restart, which worker ended the group and how), from structured sources only: never the agent's log text, never
its private methods.

- **The restart and its number**: torch elastic's metrics API. After every poll of its workers the agent's
  ``SimpleElasticAgent._invoke_run`` puts ``workers.<role>.remaining_restarts`` (n), then ``workers.<role>.<state>``
  (1), on the ``torchelastic`` metrics group; a ``failed`` or ``unhealthy`` state with n > 0 is followed at once by
  restart ``max - n + 1`` (with n == 0 the run ends in a ``ChildFailedError``, which the launcher reads). By then
  the agent has stopped and reaped every worker of the group. :class:`RestartMetrics` is that handler; it passes
  every metric on to the handler it replaced, and :func:`hearing_restarts` puts that one back afterwards.
- **Who**: each worker writes a :class:`WorkerStart` (rank, local rank, pid, attempt) into the launch's status
  folder as soon as it starts; a worker that raises also writes its :class:`WorkerRecord` (a ``LostPeers`` one
  only lost the worker that ended the group).
- **How**: the agent runs in the launcher's process and starts the workers with ``subprocess``, so they are the
  launcher's own children. :class:`ExitWatch` waits for each in a thread with ``os.waitid(P_PID, pid, WEXITED |
  WNOWAIT)``: the kernel says how it ended (an exit code, or the signal that killed it) and leaves it unreaped, so
  the agent's ``Popen.poll`` still reaps it and reads the same status. The thread wakes when the child exits; the
  agent looks every 0.1 s (``--monitor-interval``), so the thread sees the status first (measured on 2 busy cores:
  60 of 60 children polled at that interval; 56 of 60 even when polled without pause; a status read was never
  wrong, and Popen's never changed). Should the agent reap a child first (``ECHILD``), or the platform lack
  ``waitid``, that worker "ended without a record" (or with the exit code its own failed record names).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from torch.distributed.elastic.metrics import MetricData, MetricHandler

from gantrain.engine.dist.worker import WorkerRecord
from gantrain.engine.errors import GantrainError
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.files import atomic_write_text

#: The metrics group torch's elastic agent puts its metrics on (``put_metric``'s default).
AGENT_METRICS_GROUP = "torchelastic"
_START_GLOB = "started_*.json"


@dataclass(frozen=True)
class WorkerStart:
    """A worker of torchrun's agent, as it says so on starting: its global and local rank, its pid, and the
    attempt (``TORCHELASTIC_RESTART_COUNT``) of the worker group it belongs to."""

    rank: int
    local_rank: int
    pid: int
    attempt: int

    @classmethod
    def of_this_process(cls) -> WorkerStart:
        env = os.environ
        return cls(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), os.getpid(),
                   int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))

    def write(self, folder: Path) -> None:
        """Best effort: a worker that cannot say it started still trains (the launcher then names no worker)."""
        try:
            atomic_write_text(folder / f"started_{self.rank}.json", json.dumps(asdict(self)))
        except (OSError, GantrainError) as exc:
            log.debug("could not write the start record in %s: %s", folder, exc)

    @classmethod
    def read_all(cls, folder: Path) -> list[WorkerStart]:
        """The latest start record of each rank in ``folder``; a torn or foreign file is skipped."""
        return [start for path in sorted(folder.glob(_START_GLOB)) if (start := cls.read(path)) is not None]

    @classmethod
    def read(cls, path: Path) -> WorkerStart | None:
        try:
            data = json.loads(path.read_text())
            return cls(**{f.name: int(data[f.name]) for f in fields(cls)})
        except (OSError, ValueError, TypeError, KeyError):
            return None


@dataclass
class WorkerExit:
    """How one started worker ended: ``code`` as ``Popen.returncode`` has it (-N: killed by signal N), None when
    it could not be observed; ``at``: when (``time.monotonic()``), for the order in which workers ended."""

    start: WorkerStart
    code: int | None = None
    at: float | None = None
    done: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


class ExitWatch:
    """Learns how each worker that wrote a :class:`WorkerStart` into ``folder`` ended, without reaping it (see the
    module's docstring). A context manager: a thread reads the folder every ``every_s`` seconds while it is open."""

    def __init__(self, folder: Path, every_s: float = 0.05) -> None:
        self.folder, self.every_s = folder, every_s
        self._lock = threading.Lock()
        self._seen: set[WorkerStart] = set()
        self._versions: dict[str, tuple[int, int]] = {}  # the start records read, by name
        self._pending: list[WorkerExit] = []  # started, not yet handed out by ended()
        self._stop = threading.Event()
        self._scanner: threading.Thread | None = None

    def __enter__(self) -> ExitWatch:
        self._scanner = threading.Thread(target=self._scan_until_closed, name="gantrain-exit-watch", daemon=True)
        self._scanner.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        if self._scanner is not None:
            self._scanner.join(timeout=5)

    def _scan_until_closed(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.scan()
            except (OSError, RuntimeError) as exc:  # a folder gone, no thread left: the line names no worker
                log.debug("the DDP workers' start records could not be read: %s", exc)

    def scan(self) -> None:
        """Starts a waiting thread for each worker that wrote its start record since the last scan."""
        for path in self.folder.glob(_START_GLOB):
            try:
                stat = path.stat()
            except OSError:
                continue
            version = (stat.st_ino, stat.st_mtime_ns)  # an atomic write makes a new file
            if self._versions.get(path.name) == version:
                continue  # read already: the scan of a long run reads only what changed
            start = WorkerStart.read(path)
            if start is None:
                continue
            self._versions[path.name] = version
            with self._lock:
                if start in self._seen:
                    continue
                self._seen.add(start)
                ended = WorkerExit(start)
                self._pending.append(ended)
            threading.Thread(target=_wait_for, args=(ended,), name=f"gantrain-wait-{start.pid}", daemon=True).start()

    def ended(self, timeout_s: float = 2.0) -> list[WorkerExit]:
        """The workers that ended since the last call, in the order they ended (those not observed last). Called
        once the agent has stopped the group, when every waiting thread returns at once; ``timeout_s`` bounds
        the wait for them all."""
        self.scan()
        with self._lock:
            pending = list(self._pending)
        deadline = time.monotonic() + timeout_s
        for watched in pending:
            watched.done.wait(max(0.0, deadline - time.monotonic()))
        ended = [watched for watched in pending if watched.done.is_set()]
        handed = {id(watched) for watched in ended}
        with self._lock:
            self._pending = [watched for watched in self._pending if id(watched) not in handed]
        return sorted(ended, key=lambda w: (w.at is None, w.at or 0.0, w.start.rank))


def _wait_for(watched: WorkerExit) -> None:
    """Blocks until the child ``watched`` ended and notes how, leaving it for its ``Popen`` to reap."""
    try:
        if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
            info = os.waitid(os.P_PID, watched.start.pid, os.WEXITED | os.WNOWAIT)
            if info is not None:
                watched.at = time.monotonic()
                watched.code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
    except OSError:  # ECHILD: reaped already, or not this process's child
        pass
    finally:
        watched.done.set()


def cause(ended: Sequence[WorkerExit], records: Sequence[WorkerRecord]) -> WorkerExit | None:
    """Which of the workers that ended (:meth:`ExitWatch.ended`) ended the group: the first to fail by itself;
    else one whose end was not observed; else the first to end. Not by itself: a SIGTERM (the agent stops the
    others with it), a worker that only lost the others (its ``LostPeers`` record). Exit code 0 (finished, refused,
    stopped) is no failure. A worker whose end was not observed takes the exit code its own failed record names."""
    said = {(r.rank, r.attempt): r for r in records}
    ranked = []
    for watched in ended:
        record = said.get((watched.start.rank, watched.start.attempt))
        if watched.code is None and record is not None:
            if record.outcome != "failed":
                continue  # it ended as it said: no failure
            watched = replace(watched, code=record.exit_code)
        if watched.code == 0:
            continue
        ranked.append((2 if follower(watched, record) else 0 if watched.at is not None else 1, watched))
    return min(ranked, key=lambda rw: rw[0])[1] if ranked else None  # min keeps ended()'s order within a class


def follower(watched: WorkerExit, record: WorkerRecord | None) -> bool:
    """Whether a worker ended only because another did: stopped by the agent's SIGTERM, or its own record says
    it lost its peers (``LostPeers``)."""
    return watched.code in (-signal.SIGTERM, 128 + signal.SIGTERM) or (
        record is not None and record.kind == "LostPeers")


class RestartMetrics(MetricHandler):
    """A torch elastic metrics handler that calls ``on_restart(restart, max_restarts)`` when the agent is about
    to restart the worker group of ``role`` (see the module's docstring), and passes every metric on to
    ``previous``."""

    def __init__(self, role: str, max_restarts: int, on_restart: Callable[[int, int], None],
                 previous: MetricHandler | None = None) -> None:
        self.prefix, self.max_restarts, self.on_restart, self.previous = f"workers.{role}.", max_restarts, \
            on_restart, previous
        self.remaining: int | None = None

    def emit(self, metric_data: MetricData) -> None:
        try:
            self._hear(metric_data)
        except Exception as exc:  # noqa: BLE001 - nothing here may break the agent's loop
            log.warning("could not say the DDP worker group's restart: %s", exc)
        if self.previous is not None:
            self.previous.emit(metric_data)

    def _hear(self, metric: MetricData) -> None:
        if metric.group_name != AGENT_METRICS_GROUP or not metric.name.startswith(self.prefix):
            return
        what = metric.name[len(self.prefix):]
        if what == "remaining_restarts":
            self.remaining = int(metric.value)
        elif what in ("failed", "unhealthy") and self.remaining:  # the agent restarts the group next
            self.on_restart(self.max_restarts - self.remaining + 1, self.max_restarts)


@contextmanager
def hearing_restarts(handler: Callable[[MetricHandler], MetricHandler]) -> Iterator[None]:
    """Within: the agent's metrics go to ``handler(previous handler)``; afterwards, as before."""
    from torch.distributed.elastic.metrics import api, configure, getStream

    previous = getStream(AGENT_METRICS_GROUP).handler
    # whether the group had a handler of its own, or took the default (which configure() cannot undo)
    groups = getattr(api, "_metrics_map", None)
    own = not isinstance(groups, dict) or AGENT_METRICS_GROUP in groups
    configure(handler(previous), group=AGENT_METRICS_GROUP)
    try:
        yield
    finally:
        if own:
            configure(previous, group=AGENT_METRICS_GROUP)
        else:
            groups.pop(AGENT_METRICS_GROUP, None)
