"""Timing, the leaf of ``gantrain.bench``: the timed loop, window statistics, one row in a fresh process, and the
round-robin runner that the step matrix (:mod:`gantrain.bench.suite`) and the loader matrix
(:mod:`gantrain.bench.loaders`) both use. It imports no other bench module but :mod:`gantrain.bench.hardware`.

Warm-up steps (torch.compile included) are timed apart; the timed part is split into windows of equal steps,
each giving one images/s figure, so reports give the median and p10/p90 (cf. timm ``benchmark.py``).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gantrain.engine import Config, override, peak_mem_gib

RESULT_PREFIX = "BENCH_RESULT "
#: The environment variable naming the bench process a worker belongs to (:func:`worker_env`, :func:`exit_with_parent`).
PARENT_ENV = "GANTRAIN_BENCH_PARENT"


def worker_env() -> dict[str, str]:
    """The environment of a bench worker: this one, unbuffered output, and this process's pid under
    :data:`PARENT_ENV` so that the worker ends with it."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_ENV: str(os.getpid())}


def _process_state(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of process ``pid`` from ``/proc/<pid>/stat`` (fields 3 and 22), or
    None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    except OSError:
        return None
    return fields[0], fields[19]


def _gone(pid: int, started: str | None) -> bool:
    """Whether process ``pid`` has ended: with /proc, absent, a zombie (ended, not yet reaped) or another process
    under a reused pid (another start time); without it, no process under that pid."""
    if started is not None:
        state = _process_state(pid)
        return state is None or state[0] in "ZX" or state[1] != started
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists
        return False
    return False


def exit_with_parent(poll_s: float = 1.0) -> bool:
    """In a worker: a daemon thread ends this process (exit code 1, one line on stderr) within ``poll_s`` seconds
    of the bench process named by :data:`PARENT_ENV` ending, so a bench killed by a signal that skips its own
    clean-up (SIGTERM, SIGKILL) never leaves a worker computing on its own. It watches the bench itself, not the
    direct parent (torchrun's agent for a DDP row); a bench that ended but was not reaped yet counts as ended.
    Returns whether a watch started (not without the variable, or with a value that is no pid)."""
    try:
        pid = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        return False
    if pid <= 0:
        return False
    state = _process_state(pid) if os.path.isdir("/proc/self") else None
    started = state[1] if state is not None else None

    def watch() -> None:
        while not _gone(pid, started):
            time.sleep(poll_s)
        sys.stderr.write(f"gantrain bench worker: the bench (pid {pid}) has ended; this worker ends too\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="gantrain-bench-parent", daemon=True).start()
    return True


@dataclass
class BenchRow:
    """One configuration of the matrix: a name and the config changes it makes over the engine base."""

    name: str
    kind: str = "engine"
    changes: dict = field(default_factory=dict)
    nproc: int = 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # deliberate: a window's time must include the queued GPU work


def time_loop(next_batch: Callable[[], torch.Tensor], step: Callable[[torch.Tensor], None], device: torch.device,
              warmup: int, windows: int, window: int, images_per_step: int) -> dict:
    """Runs ``warmup`` untimed-for-throughput steps, then ``windows`` x ``window`` timed ones."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(next_batch())
    _sync(device)
    warmup_s = time.perf_counter() - t0
    rates, data_s, total_s = [], 0.0, 0.0
    for _ in range(windows):
        w0 = time.perf_counter()
        for _ in range(window):
            d0 = time.perf_counter()
            batch = next_batch()
            data_s += time.perf_counter() - d0
            step(batch)
        _sync(device)
        elapsed = time.perf_counter() - w0
        total_s += elapsed
        rates.append(window * images_per_step / elapsed)
    steps = windows * window
    return {"warmup_s": warmup_s, "warmup_steps": warmup, "timed_steps": steps, **summarize_windows(rates),
            "step_ms": total_s / steps * 1e3,
            "data_wait_ms": data_s / steps * 1e3, "compute_ms": (total_s - data_s) / steps * 1e3,
            "peak_mem_gib": peak_mem_gib(device)}


#: Steps ``gantrain bench --profile`` traces per row, after its timed windows (so the timing is not disturbed).
PROFILED_STEPS = 5


def row_slug(name: str) -> str:
    """A row's name as a folder name: ``all, no compile + DDP x2`` -> ``all-no-compile-ddp-x2``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def profile_row(next_batch: Callable[[], torch.Tensor], step: Callable[[torch.Tensor], None], device: torch.device,
                folder: Path, steps: int = PROFILED_STEPS) -> Path | None:
    """``steps`` steps under torch.profiler, written as a trace and a top-ops table into ``folder``."""
    from gantrain.engine import StepProfiler

    profiler = StepProfiler(1, steps, folder, device)
    written = None
    for i in range(1, steps + 1):
        profiler.before_step(i)
        step(next_batch())
        written = profiler.after_step(i) or written
    return written


def summarize_windows(rates: list[float]) -> dict:
    """Median and p10/p90 images/s over timed windows."""
    return {"window_images_per_s": rates, "images_per_s": statistics.median(rates),
            "images_per_s_p10": quantile(rates, 0.1), "images_per_s_p90": quantile(rates, 0.9)}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def endless(loader, start_epoch: int = 0) -> Iterator[torch.Tensor]:
    """The loader's batches, epoch after epoch, without end."""
    epoch = start_epoch
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def merge_runs(runs: list[dict]) -> dict:
    """Pools the timed windows of repeated runs of one row: median and p10/p90 over all of them."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    merged = dict(ok[0])
    windows = [w for r in ok for w in r["window_images_per_s"]]
    merged.update(summarize_windows(windows))
    for key in ("step_ms", "data_wait_ms", "compute_ms", "warmup_s"):
        merged[key] = statistics.mean(r[key] for r in ok)
    merged["peak_mem_gib"] = max(r["peak_mem_gib"] for r in ok)
    merged["timed_steps"] = sum(r["timed_steps"] for r in ok)
    merged["passes"] = len(ok)
    # the CPU layer rewrites each pass ran with (a process that measured anew may have chosen otherwise)
    merged["layer_rewrites"] = [r.get("layer_rewrites") for r in ok]
    return merged


def run_row(row: BenchRow, cfg: Config, timing: dict, env: dict) -> dict:
    """Times ``row`` in a fresh process (``python -m gantrain.bench.worker``, under torchrun for DDP rows): its
    result dict, or ``{"name", "error"}``: the worker's message for a user error, else its output's last lines."""
    cfg = override(copy.deepcopy(cfg), row.changes)
    if row.nproc > 1:
        cfg = override(cfg, {"ddp": True})
    spec = {"name": row.name, "kind": row.kind, "config": cfg.to_dict(), **timing}
    module = ["-m", "gantrain.bench.worker", json.dumps(spec)]
    if row.nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={row.nproc}",
                   "--master-port=29533", *module]
        env = {**env, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // row.nproc))}
    else:
        command = [sys.executable, *module]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return {**json.loads(line[len(RESULT_PREFIX):]), "config": cfg.to_dict(), "changes": row.changes}
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    said = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]  # a user error's line
    tail = said[-1:] or lines[-3:]
    return {"name": row.name, "error": " | ".join(tail) or f"exit code {proc.returncode}", "changes": row.changes}


def round_robin(labels: Sequence[str], run_one: Callable[[int], dict], repeats: int, console: Console,
                what: str = "bench") -> list[list[dict]]:
    """Runs ``run_one(i)`` for every row ``i``, ``repeats`` passes round-robin (so slow drifts of a shared machine
    hit every row alike), with a progress line per run; returns each row's runs."""
    runs: list[list[dict]] = [[] for _ in labels]
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        for rep in range(repeats):
            for i, label in enumerate(labels):
                task = bar.add_task(f"{what}: {label} (pass {rep + 1}/{repeats})", total=None)
                runs[i].append(run_one(i))
                bar.update(task, description=f"{what}: {label} (pass {rep + 1}/{repeats}) [green]done", total=1,
                           completed=1)
    return runs
