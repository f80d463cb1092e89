"""Where the run executes: device choice, CUDA settings, and the distributed (DDP) process group."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gantrain.engine.errors import ConfigError


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """auto: CUDA when present, else CPU. Under DDP each process takes the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda was asked for but CUDA is not available on this machine")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def configure_cuda() -> None:
    """Fast paths that do not change results beyond TF32 rounding: cuDNN autotuning and TF32 matmul/conv."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


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


def init_distributed(device_name: str) -> DistInfo:
    """Joins the process group torchrun set up: NCCL on CUDA, gloo on the CPU."""
    if not launched_by_torchrun():
        return DistInfo()
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return DistInfo(rank, world, local)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None]):
    """SIGINT and SIGTERM call ``on_signal(signum)`` inside the block (off the main thread: left alone)."""
    previous = {}
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: on_signal(signum))
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
