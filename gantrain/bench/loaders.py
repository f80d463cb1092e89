"""``gantrain bench --loaders``: the memory, torch DataLoader and DALI loaders on an image folder, side by side.

For each image size (64 px with the cats64 model, 128 px with cats128) and each loader, two rows, each in its
own fresh process (:mod:`gantrain.bench.worker`), one after another:

* **loader only**: batches drawn and put into the model's input format (``prepare_batch``: [-1, 1], the AMP
  dtype, channels-last) with no model, in images/s; plus the setup time (the memory loader decodes the whole
  folder up front, the others decode as they go);
* **train**: the engine's full training step fed by that loader, in images/s, with its data wait.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from gantrain.bench.hardware import system_info
from gantrain.bench.report import publish, render
from gantrain.bench.timing import BenchRow, merge_runs, round_robin, run_row, worker_env
from gantrain.engine import (Config, ConfigError, GantrainError, discover_folder, env_data_root, override,
                             preset)

LOADERS = ("memory", "torch", "dali")
PRESET_BY_SIZE = {64: "cats64", 128: "cats128"}
# (warmup, windows, window) steps: loader-only rows are cheap, so they get more of them than training rows.
LOADER_STEPS, TRAIN_STEPS = (3, 5, 10), (2, 3, 3)
QUICK_LOADER_STEPS, QUICK_TRAIN_STEPS = (1, 2, 2), (1, 2, 1)


@dataclass(frozen=True)
class LoaderRow:
    """One timed configuration: a loader at one image size, alone or feeding training."""

    loader: str
    size: int
    kind: str  # "loader" (no model) or "engine" (training)

    @property
    def name(self) -> str:
        return f"{self.loader} {self.size}px {'loader only' if self.kind == 'loader' else 'train'}"


def loader_rows(sizes: tuple[int, ...] = (64, 128)) -> list[LoaderRow]:
    """Per size, every loader alone, then every loader feeding training."""
    return [LoaderRow(loader, size, kind) for size in sizes for kind in ("loader", "engine") for loader in LOADERS]


def row_config(row: LoaderRow, overrides: dict) -> Config:
    """The row's preset (cats64 or cats128) on the folder, with its loader and the command's overrides."""
    return override(preset(PRESET_BY_SIZE[row.size]), {**overrides, "loader": row.loader})


def run_loader_only(cfg: Config, spec: dict) -> dict:
    """Worker side of a loader-only row: build the loader (timed as setup), then time batches into model format."""
    from gantrain.bench.timing import endless, time_loop
    from gantrain.engine import build_loader
    from gantrain.engine import PrecisionPolicy
    from gantrain.engine import pick_device

    device = pick_device(cfg.run.device)
    policy = PrecisionPolicy(device, cfg.perf.amp, cfg.perf.channels_last)
    t0 = time.perf_counter()
    loader = build_loader(cfg.data, cfg.run.seed, device, policy=policy)
    setup_s = time.perf_counter() - t0
    batches = endless(loader)
    result = time_loop(lambda: next(batches), policy.prepare_batch, device, spec["warmup"], spec["windows"],
                       spec["window"], cfg.data.batch_size)
    return {**result, "setup_s": setup_s, "loader": type(loader).__name__, "amp": policy.amp}


def timing_for(kind: str, quick: bool, given: dict) -> dict:
    """The row kind's default steps, with any of warmup/windows/window/repeats the command gave."""
    steps = (QUICK_LOADER_STEPS if quick else LOADER_STEPS) if kind == "loader" else \
        (QUICK_TRAIN_STEPS if quick else TRAIN_STEPS)
    defaults = dict(zip(("warmup", "windows", "window"), steps), repeats=1)
    return {key: given.get(key) or value for key, value in defaults.items()}


def run_loader_bench(rows: list[LoaderRow], overrides: dict, timings: dict[str, dict], console: Console) -> list[dict]:
    """Runs every row in a fresh process, round-robin over repeats; windows of repeats are pooled."""
    env = worker_env()

    def run_one(i: int) -> dict:
        row = rows[i]
        bench_row = BenchRow(row.name, kind=row.kind, changes={"loader": row.loader})
        return run_row(bench_row, row_config(row, overrides), timings[row.kind], env)

    runs = round_robin([row.name for row in rows], run_one, max(t["repeats"] for t in timings.values()), console,
                       "bench --loaders")
    return [_merged(row, r) for row, r in zip(rows, runs)]


def _merged(row: LoaderRow, runs: list[dict]) -> dict:
    merged = merge_runs(runs)
    ok = [r for r in runs if "error" not in r]
    if ok and row.kind == "loader":
        merged["setup_s"] = sum(r["setup_s"] for r in ok) / len(ok)
    return {**merged, "name": row.name, "loader_kind": row.loader, "size": row.size, "row_kind": row.kind}


def _cell(results: list[dict], loader: str, size: int, kind: str) -> dict | None:
    return next((r for r in results if r["loader_kind"] == loader and r["size"] == size and r["row_kind"] == kind), None)


def _rate(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return f"failed: {r['error'][:70]}"
    return f"{r['images_per_s']:.0f} ({r['images_per_s_p10']:.0f}–{r['images_per_s_p90']:.0f})"


def table_rows(report: dict) -> list[list[str]]:
    """One line per (size, loader): loader-only rate and setup, training rate and its data wait."""
    lines = []
    for size in report["sizes"]:
        for loader in LOADERS:
            alone, train = (_cell(report["results"], loader, size, k) for k in ("loader", "engine"))
            if alone is None and train is None:
                continue
            setup = f"{alone['setup_s']:.1f}" if alone and "setup_s" in alone else "-"
            wait = f"{train['data_wait_ms']:.1f}" if train and "error" not in train else "-"
            step = f"{train['step_ms']:.0f}" if train and "error" not in train else "-"
            lines.append([f"{size}px", loader, _rate(alone), setup, _rate(train), wait, step])
    return lines


HEADERS = ["size", "loader", "loader only: images/s (p10–p90)", "setup s", "train: images/s (p10–p90)",
           "train data wait ms", "train step ms"]


def rendered(report: dict):
    """The report's table for the console and as Markdown (one set of rows for both)."""
    s = report["system"]
    caption = (f"Image folder {report['data_root']} ({report['num_images']}), {report['device']} ({s['gpu'] or s['cpu']}, "
               f"{s['cpu_cores']} cores), torch {s['torch']}, DALI {report['dali']}, {s['date'][:10]}, commit "
               f"{str(s['git_commit'])[:12]}. 64 px: cats64 model, batch {report['batch_sizes']['64']}; 128 px: "
               f"cats128 model, batch {report['batch_sizes']['128']}.")
    return render(f"gantrain bench --loaders: {report['data_root']}, {report['device']}", HEADERS, table_rows(report),
                  caption, left=2)


def _dali_version() -> str | None:
    from gantrain.engine import dali_installed

    if not dali_installed():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-dali-cuda120")
    except PackageNotFoundError:
        return "installed"


def bench_loaders(*, data_root: str | None, limit: int | None, batch_size: int | None, device: str, num_workers: int,
                  quick: bool, json_path: Path | None, markdown_path: Path | None, console: Console,
                  only: list[str] | None = None, sizes: tuple[int, ...] = (64, 128), **given: int | None) -> dict:
    """``gantrain bench --loaders``: every row in its own process, then the table, JSON and Markdown."""
    data_root = data_root or env_data_root()
    if not data_root:
        raise ConfigError("--data-root: bench --loaders needs an image folder (e.g. ../shared/datasets/cats)")
    rows = [r for r in loader_rows(sizes) if not only or any(o.lower() in r.name.lower() for o in only)]
    if not rows:
        raise GantrainError("--only matched no loader benchmark row")
    overrides = {"data_root": data_root, "limit": limit, "batch_size": batch_size, "device": device,
                 "num_workers": num_workers}
    timings = {kind: timing_for(kind, quick, given) for kind in ("loader", "engine")}
    cfg = row_config(LoaderRow("memory", sizes[0], "loader"), overrides)
    # the folder's images, found before any row starts: a folder without one is one line, not 12 failed rows
    num_images = len(discover_folder(cfg.data.data_root, limit=cfg.data.limit).images)
    results = run_loader_bench(rows, overrides, timings, console)
    report = _report(results, overrides, timings, sizes, num_images)
    return publish(report, *rendered(report), json_path, markdown_path)


def _report(results: list[dict], overrides: dict, timings: dict, sizes: tuple[int, ...], num_images: int) -> dict:
    from gantrain.engine import pick_device

    cfg = row_config(LoaderRow("memory", sizes[0], "loader"), overrides)
    return {"system": system_info(), "device": str(pick_device(overrides["device"])), "dali": _dali_version(),
            "data_root": cfg.data.data_root, "num_images": num_images,
            "sizes": list(sizes), "timing": timings, "results": results,
            "batch_sizes": {str(s): row_config(LoaderRow("memory", s, "loader"), overrides).data.batch_size
                            for s in (64, 128)}}
