"""Where the run executes: device choice, CUDA settings, and the distributed (DDP) process group."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from gantrain.engine.config import PerfConfig
from gantrain.engine.errors import CheckpointError, ConfigError, GantrainError, rebuild

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when present, else CPU. Under DDP each process takes the GPU of its local rank. Raises
    :class:`ConfigError` for another name (``gpu``, ``tpu``: before, any of them ran on the CPU) and for cuda on a
    machine without it."""
    if name not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but CUDA is not available on this machine")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def configure_runtime(perf: PerfConfig, device: torch.device) -> None:
    """Every process-wide setting a run makes, in one place: on CUDA the fast paths that change results by no more
    than TF32 rounding (cuDNN autotuning, TF32 matmuls and convolutions); with --compile and --compile-cache-dir,
    Inductor's cache folder ($TORCHINDUCTOR_CACHE_DIR)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if (perf.compile or perf.cuda_graphs) and perf.compile_cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(perf.compile_cache_dir).expanduser())


@dataclass(frozen=True)
class DistInfo:
    """This process's rank in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True inside a process started by torchrun (or ``gantrain run --ddp``, which uses it)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"))


def init_distributed(device_name: str, timeout_minutes: float = 30.0) -> DistInfo:
    """Joins the process group torchrun set up: NCCL on CUDA, gloo on the CPU; a collective fails after
    ``timeout_minutes`` (--dist-timeout) of waiting for another worker."""
    if dist.is_initialized():  # Ray Train's workers: it set up the process group
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if not launched_by_torchrun():
        return DistInfo()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        backend, timeout = "nccl" if use_cuda else "gloo", datetime.timedelta(minutes=timeout_minutes)
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torch's static rendezvous gives every restart of the worker group the same agent store, unprefixed:
            # a new rank could read the failed attempt's keys (a dead rank's gloo address: "Connection refused"
            # until the restarts are used up). A prefix per attempt keeps each attempt's keys its own.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                                  timeout=timeout)
            dist.init_process_group(backend, store=dist.PrefixStore(f"gantrain/attempt_{attempt}", store), rank=rank,
                                    world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return DistInfo(rank, world, local)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


#: The signals a run stops on at an agreed step with a checkpoint (exit 128 + N).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def caught_stop_signals() -> tuple[signal.Signals, ...]:
    """:data:`STOP_SIGNALS` but SIGHUP when this process ignores it (``nohup``: the run is meant to outlive the
    terminal)."""
    return tuple(sig for sig in STOP_SIGNALS if not (sig == signal.SIGHUP and signal.getsignal(sig) is signal.SIG_IGN))


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None]):
    """SIGINT, SIGTERM and SIGHUP (a closed terminal or ssh session; torchrun's agent passes it on) call
    ``on_signal(signum)`` inside the block (off the main thread: left alone; SIGHUP under ``nohup`` too)."""
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for sig in caught_stop_signals():
            previous[sig] = signal.signal(sig, lambda signum, _frame: on_signal(signum))
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Asks the kernel to send ``signum`` to this process when its parent (torchrun's agent) dies.

    The agent starts each worker in a session of its own, so a SIGKILL to the agent (which it cannot forward)
    would leave the workers training as orphans; with this they stop as on a SIGTERM: at an agreed step, with
    a checkpoint. Linux only (prctl); elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        return  # an unusual kernel: training still works, only without this guarantee
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signum)


class StopAgreement:
    """Makes every DDP rank stop, and save a time-based checkpoint, at the same step boundary, whichever rank
    a signal (or its clock) reached and when.

    Ranks that stop at different steps leave the others blocked in a collective with a closed peer (gloo:
    "Connection closed by peer", no checkpoint). Each step, every rank starts a non-blocking MAX all-reduce
    of its local flags (the signal number or 0; 1 when its clock says a checkpoint is due) and waits for it
    only at the *next* step boundary; by then it has long completed, so the agreement costs no wait and,
    since the flags live on the CPU in a gloo group of its own, no device synchronisation (under NCCL a
    device flag would need a host sync to be read). All ranks read the same reduced values after the same
    step, so all act one step after the first signal (or due checkpoint) anywhere. Without DDP the local
    flags are the decision, at once.
    """

    def __init__(self, enabled: bool, timeout_minutes: float = 30.0) -> None:
        """``timeout_minutes``: how long its collectives wait for the other ranks (--dist-timeout; a new group
        does not take the default group's timeout from torch, but its own default of 30 minutes)."""
        self.enabled = enabled
        self.group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
                      if enabled else None)
        self.flag = torch.zeros(2, dtype=torch.int32)
        self.pending = None
        self.local_signal: int | None = None  # the stop signal this process got (:meth:`on_signal`)

    def on_signal(self, signum: int) -> None:
        """A stop signal to this process (the callback of :func:`stop_signals`): acted on at an agreed step."""
        self.local_signal = signum

    def after_step(self, save_due: bool = False) -> tuple[int | None, bool]:
        """The agreed (stop signal or None, whether to checkpoint now) after this step."""
        if not self.enabled:
            return self.local_signal, save_due
        agreed = self._collect()
        self.flag[0], self.flag[1] = self.local_signal or 0, int(save_due)
        self.pending = dist.all_reduce(self.flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return agreed

    @contextlib.contextmanager
    def refusals(self):
        """Runs the block, then raises on every rank the refusal (a :class:`GantrainError`) that any rank met in
        it (the lowest rank's; its class, message and exit code), else goes on. For checks that some ranks make
        and others do not (rank 0 owns the run folder): a rank that refused alone would leave the others waiting
        in their next collective until gloo's timeout, and a worker cannot tell the launcher that its refusal is
        final unless every rank agrees. The block must hold no collective. Other exceptions pass (a crash)."""
        error = None
        try:
            yield
        except GantrainError as exc:
            if not self.enabled:
                raise
            error = exc
        if not self.enabled:
            return
        every: list = [None] * dist.get_world_size(self.group)
        mine = None if error is None else (type(error).__name__, str(error), error.exit_code, error.final)
        try:
            dist.all_gather_object(every, mine, group=self.group)
        finally:
            if error is not None:
                raise error
        first = next((refusal for refusal in every if refusal is not None), None)
        if first is not None:
            raise rebuild(*first)

    def close(self) -> None:
        """Completes the reduction in flight (before the process group goes away)."""
        if self.enabled:
            self._collect()

    def broadcast_from_main(self, value):
        """Rank 0's ``value`` (any picklable object, e.g. a stop reason) on every rank; ``value`` itself in one
        process. A collective: every rank calls it at the same point."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def steps_agree(self, step: int) -> tuple[int, int]:
        """(lowest, highest) ``step`` over the ranks: where each resumed from must be one place (any integer that
        every rank must hold alike, e.g. the index of its resolved precision)."""
        if not self.enabled:
            return step, step
        both = torch.tensor([step, -step], dtype=torch.int64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        return -int(both[1]), int(both[0])

    def require_same_precision(self, amp: str, requested: str) -> None:
        """Raises :class:`ConfigError` when the ranks resolved ``--amp`` to different precisions (``auto`` on nodes
        with different CPUs or GPUs): replicas computing in bf16 and fp32 would drift apart silently."""
        modes = ("off", "bf16", "fp16")
        low, high = self.steps_agree(modes.index(amp))
        if low != high:
            names = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}
            raise ConfigError(f"--amp {requested}: the DDP ranks compute in different precisions ({names[modes[low]]} on "
                              f"some, {names[modes[high]]} on others: nodes with different CPUs or GPUs); pass --amp off "
                              "or --amp bf16 so all ranks compute alike")

    def require_same_step(self, step: int, checkpoints: Path) -> None:
        """Raises :class:`CheckpointError` when the ranks resumed from different steps: ranks with other weights
        and optimiser states would train on, silently apart."""
        low, high = self.steps_agree(step)
        if low != high:
            raise CheckpointError(f"the DDP ranks resumed from different steps ({low} to {high}): every node must "
                                  f"see the same {checkpoints} (a shared filesystem) to resume")

    def _collect(self) -> tuple[int | None, bool]:
        if self.pending is None:
            return None, False
        self.pending.wait()
        self.pending = None
        return int(self.flag[0]) or None, bool(self.flag[1])


class StallWatch:
    """Says which DDP rank the others wait for, and since which step, when one gives no sign of life for
    ``warn_after_s`` seconds (a worker stopped with SIGSTOP, a swapping node); otherwise the others would wait
    silently in their next collective for the whole --dist-timeout.

    A daemon thread per rank writes a heartbeat (a counter, the rank's step and phase) into the process group's
    store every ``period_s`` and reads the others'; a rank whose counter has not moved for ``warn_after_s`` (on this
    rank's clock: no clock skew between nodes) is named, once per stall, by the lowest rank that is itself alive,
    through ``say``. The training loop only assigns :attr:`step` and :attr:`phase` (no sync, no store call). Off
    without DDP, with ``warn_after_s`` 0, or when the process group has no store it can reach."""

    def __init__(self, info: DistInfo, warn_after_s: float, say: Callable[[str], None],
                 period_s: float | None = None) -> None:
        self.info, self.warn_after_s, self.say = info, warn_after_s, say
        self.step, self.phase = 0, "starting"
        self.period_s = period_s or min(5.0, max(warn_after_s / 4, 0.05))
        self._stop = threading.Event()
        self._thread = None
        store = _default_store() if info.enabled and warn_after_s > 0 else None
        if store is not None:
            self._store = store
            self._thread = threading.Thread(target=self._run, name="gantrain-stall-watch", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2 * self.period_s + 1)
            self._thread = None

    def _key(self, rank: int) -> str:
        return f"gantrain/heartbeat/{rank}"

    def _run(self) -> None:
        beat, seen, said = 0, {}, set()
        try:
            while not self._stop.wait(self.period_s):
                beat += 1
                self._store.set(self._key(self.info.rank), f"{beat} {self.step} {self.phase}")
                now = time.monotonic()
                for rank in range(self.info.world_size):
                    if rank == self.info.rank or not self._store.check([self._key(rank)]):
                        continue
                    count, step, phase = self._store.get(self._key(rank)).decode().split(" ", 2)
                    if phase == DONE:  # it left the training loop: nobody waits for it
                        seen.pop(rank, None)
                        continue
                    if seen.get(rank, (None,))[0] != count:
                        seen[rank] = (count, now, int(step), phase)
                        said.discard(rank)
                silent = sorted(r for r, (_, since, _, _) in seen.items() if now - since >= self.warn_after_s)
                alive = [r for r in range(self.info.world_size) if r not in silent]
                if not silent or alive[0] != self.info.rank:
                    continue
                for rank in silent:
                    if rank in said:
                        continue
                    said.add(rank)
                    _, since, step, phase = seen[rank]
                    self.say(f"DDP rank {rank} has given no sign of life for {now - since:.0f} s (its last: step "
                             f"{step}, {phase}); rank {self.info.rank} waits for it at step {self.step + 1}: a "
                             f"stopped process (SIGSTOP) or an overloaded node? The run fails after --dist-timeout")
            self._store.set(self._key(self.info.rank), f"{beat + 1} {self.step} {DONE}")  # closed: no one waits
        except (RuntimeError, OSError, ValueError):  # the store went away (the run ends): the watch ends with it
            return


DONE = "done"  # the phase of a rank whose watch was closed (it left the loop; its last beat)


def _default_store():
    """The store of the default process group (torchrun's agent store, or the one Ray Train's TCPStore serves),
    or None. torch has no public accessor for it."""
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def require_ray_train() -> None:
    """Raises :class:`GantrainError` (one line naming the extra) when Ray Train cannot be imported (``--ray``)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.train") is not None
    except (ImportError, ValueError):  # a broken or half-installed ray package
        found = False
    if not found:
        raise GantrainError("--ray needs Ray Train, which is not installed: pip install 'gantrain[tune]'")
