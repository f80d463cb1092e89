"""Named training statistics, summed on the device and reduced at log time; per-phase wall times.

cf. stylegan2-ada ``torch_utils/training_stats.py``: the step reports named values (``stats.add(loss_d=...)``)
without a host sync; :meth:`Stats.read` averages them (over DDP ranks too) only when the log asks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any

import torch


class Stats:
    """Sums named 0-d statistics on the device; only :meth:`read` and :meth:`read_epoch` synchronise.

    The names are fixed by the first :meth:`add` (one stacked tensor per step, one all-reduce per read);
    a later add with other names raises ValueError.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: tuple[str, ...] = ()
        self.sums = self.epoch_sums = torch.zeros(0, device=device)
        self.count = self.epoch_count = 0

    def add(self, **values: torch.Tensor) -> None:
        if not self.names:
            self.names = tuple(values)
            self.sums = torch.zeros(len(values), device=self.device)
            # what the log reads took since the last read_epoch (may start negative: see read_epoch)
            self.epoch_sums = torch.zeros(len(values), device=self.device)
        elif tuple(values) != self.names:
            raise ValueError(f"statistics {tuple(values)} differ from the first step's {self.names}")
        self.sums += torch.stack([v.detach().float() for v in values.values()])
        self.count += 1

    def read(self) -> dict[str, float]:
        """Means since the last read, then reset. Deliberate host sync: called only at the log interval."""
        if self.count == 0:
            return {}
        sums = self.sums
        if torch.distributed.is_initialized():  # every rank reads at the same step: average over ranks
            sums = sums.clone()
            torch.distributed.all_reduce(sums)
            sums /= torch.distributed.get_world_size()
        means = (sums / self.count).tolist()
        self.epoch_sums += self.sums
        self.epoch_count += self.count
        self.sums.zero_()
        self.count = 0
        return dict(zip(self.names, means))

    def read_epoch(self) -> dict[str, float]:
        """This process's means over the steps since the last call (an epoch), whatever the log interval; one
        host sync. The open log window is left as it is, so the next :meth:`read` still covers all its steps."""
        count = self.epoch_count + self.count
        if count == 0:
            return {}
        means = ((self.epoch_sums + self.sums) / count).tolist()
        # the open window's steps belong to this epoch: the next epoch starts without them
        self.epoch_sums = -self.sums.clone()
        self.epoch_count = -self.count
        return dict(zip(self.names, means))


class PhaseTimer:
    """Wall time per named phase (data, d_step, g_step), also marked for torch.profiler.

    On CUDA the phases are bracketed by events and resolved only in :meth:`read_ms`, so timing adds no
    host sync to the hot loop; on the CPU the ops are synchronous and host time is exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host_ms: dict[str, float] = defaultdict(float)
        self.events: dict[str, list[tuple[Any, Any]]] = defaultdict(list)

    @contextlib.contextmanager
    def phase(self, name: str):
        with torch.profiler.record_function(name):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self.events[name].append((start, end))
            else:
                t0 = time.perf_counter()
                yield
                self.host_ms[name] += (time.perf_counter() - t0) * 1e3

    def read_ms(self) -> dict[str, float]:
        """Total milliseconds per phase since the last read, then reset."""
        totals = dict(self.host_ms)
        if self.events:
            torch.cuda.synchronize()  # deliberate: resolve the events at the log interval only
            for name, pairs in self.events.items():
                totals[name] = totals.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs)
        self.host_ms.clear()
        self.events.clear()
        return totals


class NonFiniteWatch:
    """Counts log intervals in a row whose statistics are not finite; says when ``patience`` is reached.

    Fed the statistics :meth:`Stats.read` already reduced for the log (all-reduced under DDP), so it costs no
    extra host sync and every rank reaches the same verdict at the same step. ``patience`` 0 never stops.
    """

    def __init__(self, patience: int) -> None:
        self.patience, self.intervals, self.since = patience, 0, 0

    def check(self, stats: dict[str, float], first_step: int, step: int) -> str | None:
        """None while training may go on, else what went non-finite where (for the divergence error)."""
        bad = [k for k, v in stats.items() if not math.isfinite(v)]
        if bad and not self.intervals:
            self.since = first_step
        self.intervals = self.intervals + 1 if bad else 0
        if not bad or not self.patience or self.intervals < self.patience:
            return None
        values = ", ".join(f"{k} {stats[k]}" for k in bad)
        return (f"non-finite training statistics ({values}) in {self.intervals} log interval(s) in a row, steps "
                f"{self.since}-{step} (--nonfinite-patience {self.patience})")
