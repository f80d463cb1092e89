"""``gantrain bench``: the plain-PyTorch baseline and the engine with each feature added, side by side.

Every configuration runs in its own fresh process (:mod:`gantrain.bench.worker`), one after another, so
none inherits another's threads, caches or compiled graphs. The suite adds the speed-up over the
baseline and MFU (model FLOPs per image x images/s over the device's peak for the config's dtype).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from gantrain.bench.hardware import peak_tflops, system_info
from gantrain.bench.worker import RESULT_PREFIX
from gantrain.engine.config import Config
from gantrain.engine.errors import GantrainError


@dataclass
class BenchRow:
    """One configuration of the matrix: a name and the config changes it makes over the engine base."""

    name: str
    kind: str = "engine"
    changes: dict = field(default_factory=dict)
    nproc: int = 1


def matrix(device_type: str, nproc: int = 1) -> list[BenchRow]:
    """Baseline, then the engine with one feature added per row; the last row is everything together."""
    amp = "bf16"
    steps = [
        ("engine (eager fp32, DataLoader)", {"loader": "torch", "amp": "off", "channels_last": False, "compile": False,
                                             "layer_impl": "aten"}),
        ("+ channels-last", {"channels_last": True}),
        (f"+ amp {amp}", {"amp": amp}),
        ("+ fast layers", {"layer_impl": "fast"}),
        ("+ compile", {"compile": True}),
        ("+ device-resident data (all)", {"loader": "memory"}),
    ]
    rows, acc = [BenchRow("baseline (tutorial loop)", kind="baseline")], {}
    for name, change in steps:
        acc = {**acc, **change}
        rows.append(BenchRow(name, changes=dict(acc)))
    rows.append(BenchRow("all, no compile", changes={**acc, "compile": False}))
    if nproc > 1:  # the default configuration, which leaves compile off (it does not pay here, see the README)
        rows.append(BenchRow(f"all, no compile + DDP x{nproc}", changes={**acc, "compile": False}, nproc=nproc))
    return rows


def _apply(cfg: Config, changes: dict) -> Config:
    from gantrain.engine.config import override

    return override(copy.deepcopy(cfg), changes)


def run_row(row: BenchRow, cfg: Config, timing: dict, env: dict) -> dict:
    cfg = _apply(cfg, row.changes)
    if row.nproc > 1:
        cfg = _apply(cfg, {"ddp": True})
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
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"name": row.name, "error": " | ".join(tail) or f"exit code {proc.returncode}", "changes": row.changes}


def run_suite(cfg: Config, *, rows: list[BenchRow], timing: dict, peak_override: float | None,
              console: Console) -> dict:
    from gantrain.bench.baseline import step_flops
    from gantrain.engine.runtime import pick_device

    device = pick_device(cfg.run.device)
    flops_per_image = step_flops(cfg)
    peaks = peak_tflops(device, peak_override)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs: list[list[dict]] = [[] for _ in rows]
    repeats = timing.get("repeats", 1)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console) as bar:
        for rep in range(repeats):  # round-robin, so slow drifts of a shared machine hit every row alike
            for i, row in enumerate(rows):
                task = bar.add_task(f"bench: {row.name} (pass {rep + 1}/{repeats})", total=None)
                runs[i].append(run_row(row, cfg, timing, env))
                bar.update(task, description=f"bench: {row.name} (pass {rep + 1}/{repeats}) [green]done", total=1,
                           completed=1)
    results = [merge_runs(r) for r in runs]
    _add_ratios(results, flops_per_image, peaks)
    return {"system": system_info(), "device": str(device), "preset": cfg.preset, "batch_size": cfg.data.batch_size,
            "flops_per_image": flops_per_image, "peak_tflops": peaks, "timing": timing, "results": results}


def merge_runs(runs: list[dict]) -> dict:
    """Pools the timed windows of repeated runs of one row: median and p10/p90 over all of them."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    from gantrain.bench.worker import summarize_windows

    merged = dict(ok[0])
    windows = [w for r in ok for w in r["window_images_per_s"]]
    merged.update(summarize_windows(windows))
    for key in ("step_ms", "data_wait_ms", "compute_ms", "warmup_s"):
        merged[key] = statistics.mean(r[key] for r in ok)
    merged["peak_mem_gib"] = max(r["peak_mem_gib"] for r in ok)
    merged["timed_steps"] = sum(r["timed_steps"] for r in ok)
    merged["passes"] = len(ok)
    return merged


def _add_ratios(results: list[dict], flops_per_image: float, peaks: dict) -> None:
    base = next((r["images_per_s"] for r in results if r["name"].startswith("baseline") and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        peak = peaks["fp32" if r["amp"] == "off" else r["amp"]]
        r["speedup"] = r["images_per_s"] / base if base else None
        r["achieved_tflops"] = r["images_per_s"] * flops_per_image / 1e12
        r["mfu"] = r["achieved_tflops"] / peak if peak else None


def _speedup(row: dict, sign: str = "×") -> str:
    """The speed-up over the baseline, or '-' when the run left the baseline out (--only)."""
    return f"{row['speedup']:.2f}{sign}" if row.get("speedup") else "-"


def _mfu(row: dict) -> str:
    return f"{row['mfu'] * 100:.1f}%" if row.get("mfu") else "-"


def results_table(report: dict) -> Table:
    peaks = report["peak_tflops"]
    table = Table(title=f"gantrain bench: {report['preset']}, batch {report['batch_size']}, {report['device']} "
                        f"({report['flops_per_image'] / 1e9:.3f} GFLOP/image; peak fp32 {peaks['fp32']:.3g}, "
                        f"bf16 {peaks['bf16']:.3g} TFLOP/s, {peaks['source']})")
    for column in ("configuration", "images/s", "p10-p90", "speed-up", "step ms", "data wait ms", "compute ms",
                   "warm-up s", "MFU", "peak mem GiB"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for r in report["results"]:
        if "error" in r:
            table.add_row(r["name"], "[red]failed", r["error"][:60], *[""] * 7)
            continue
        table.add_row(r["name"], f"{r['images_per_s']:.0f}", f"{r['images_per_s_p10']:.0f}-{r['images_per_s_p90']:.0f}",
                      _speedup(r, "x"), f"{r['step_ms']:.1f}",
                      f"{r['data_wait_ms']:.1f}", f"{r['compute_ms']:.1f}", f"{r['warmup_s']:.1f}",
                      _mfu(r), f"{r['peak_mem_gib']:.2f}")
    return table


def results_markdown(report: dict) -> str:
    s, peaks = report["system"], report["peak_tflops"]
    lines = [f"**{report['preset']}**, batch {report['batch_size']}, {report['device']} ({s['gpu'] or s['cpu']}, "
             f"{s['cpu_cores']} cores), torch {s['torch']}, {s['date'][:10]}, commit {str(s['git_commit'])[:12]}. "
             f"Model FLOPs {report['flops_per_image'] / 1e9:.3f} GFLOP/image; peak fp32 {peaks['fp32']:.3g} / "
             f"bf16 {peaks['bf16']:.3g} TFLOP/s ({peaks['source']}).", "",
             "| configuration | images/s (median) | p10–p90 | speed-up | step ms | data wait ms | warm-up s | MFU | peak mem GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['images_per_s']:.0f} | {r['images_per_s_p10']:.0f}–{r['images_per_s_p90']:.0f} | "
                     f"{_speedup(r)} | {r['step_ms']:.1f} | {r['data_wait_ms']:.1f} | {r['warmup_s']:.1f} | "
                     f"{_mfu(r)} | {r['peak_mem_gib']:.2f} |")
    return "\n".join(lines) + "\n"


def bench(cfg: Config, *, quick: bool, nproc: int, peak_override: float | None, json_path: Path | None,
          markdown_path: Path | None, console: Console, only: list[str] | None = None,
          warmup: int | None = None, windows: int | None = None, window: int | None = None,
          repeats: int | None = None) -> dict:
    device_type = "cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu"
    rows = matrix(device_type, nproc)
    if only:
        rows = [r for r in rows if any(o.lower() in r.name.lower() for o in only)]
        if not rows:
            raise GantrainError("--only matched no benchmark configuration")
    defaults = (3, 3, 2, 1) if quick else (5, 6, 5, 2)
    timing = {"warmup": warmup or defaults[0], "windows": windows or defaults[1], "window": window or defaults[2],
              "repeats": repeats or defaults[3], "num_workers": cfg.data.num_workers}
    report = run_suite(cfg, rows=rows, timing=timing, peak_override=peak_override, console=console)
    return publish(report, results_table(report), results_markdown(report), json_path, markdown_path)


def publish(report: dict, table: Table, markdown: str, json_path: Path | None, markdown_path: Path | None) -> dict:
    """Prints the table and writes the JSON report and Markdown table where asked."""
    Console().print(table)
    for path, text in ((json_path, json.dumps(report, indent=2)), (markdown_path, markdown)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return report
