"""``gantrain bench``: the plain-PyTorch baseline and the engine with each feature added, side by side.

Every configuration runs in its own fresh process (:mod:`gantrain.bench.worker`), one after another, so
none inherits another's threads, caches or compiled graphs. The suite adds the speed-up over the
baseline and MFU (model FLOPs per image x images/s over the device's peak for the config's dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from gantrain.bench.hardware import system_info
from gantrain.bench.report import console_table, markdown_table, publish
from gantrain.bench.timing import PROFILED_STEPS, BenchRow, merge_runs, round_robin, run_row, worker_env
from gantrain.engine import Config, GantrainError, compute_name, resolve_amp


def matrix(amp: str, nproc: int = 1, device_type: str = "cpu") -> list[BenchRow]:
    """Baseline, then the engine with one feature added per row; the last rows are everything together.

    ``amp``: what ``--amp auto`` resolves to on the device (:func:`resolve_amp`). The rows add AMP only where the
    default uses it; on a CPU where bf16 is not faster (``amp`` "off"), one more row shows the default with bf16
    forced, so the table says what it would cost (a GPU without fast bf16 gets no such row).
    """
    steps = [
        ("engine (eager fp32, DataLoader)", {"loader": "torch", "amp": "off", "channels_last": False, "compile": False,
                                             "layer_impl": "aten"}),
        ("+ channels-last", {"channels_last": True}),
        *([(f"+ amp {amp}", {"amp": amp})] if amp != "off" else []),
        ("+ fast layers", {"layer_impl": "fast"}),
        ("+ compile", {"compile": True}),
        ("+ device-resident data (all)", {"loader": "memory"}),
    ]
    rows, acc = [BenchRow("baseline (tutorial loop)", kind="baseline")], {}
    for name, change in steps:
        acc = {**acc, **change}
        rows.append(BenchRow(name, changes=dict(acc)))
    default = {**acc, "compile": False}  # the default configuration, which leaves compile off (see the README)
    rows.append(BenchRow("all, no compile", changes=default))
    if amp == "off" and device_type == "cpu":
        rows.append(BenchRow("+ amp bf16 (not the default here)", changes={**default, "amp": "bf16"}))
    if nproc > 1:
        rows.append(BenchRow(f"all, no compile + DDP x{nproc}", changes=default, nproc=nproc))
    return rows


def run_suite(cfg: Config, *, rows: list[BenchRow], timing: dict, peak_override: float | None,
              console: Console) -> dict:
    from gantrain.engine import BENCH_PROBE, bf16_faster, device_peaks, has_cpu_rewrites, layer_rewrites, \
        override, pick_device, step_flops, strided_layers

    device = pick_device(cfg.run.device)
    flops_per_image = step_flops(cfg.model, cfg.data.image_size, cfg.data.channels)
    # measured anew (the runs after this one read it from the cache, so their MFU divides by the same peak)
    peaks = device_peaks(device, peak_override, probe=BENCH_PROBE, fresh=True).to_dict()
    bf16, why = bf16_faster(device)
    # the default's fast-layer rows compute in --amp auto's dtype, channels-last: their layers' rewrites measured
    # anew here and read from the cache by those rows' workers; each row reports what it ran with (a DDP row's
    # threads, or the forced-bf16 row's dtype, key other entries, which its worker measures itself)
    fast_rows = any(row.kind == "engine" and row.changes.get("layer_impl", cfg.perf.layer_impl) == "fast"
                    for row in rows)
    shapes = strided_layers(cfg.model, cfg.data.image_size, cfg.data.channels, cfg.data.batch_size) \
        if fast_rows and has_cpu_rewrites(override(cfg, {"layer_impl": "fast"}), device) else {}
    rewrites = layer_rewrites(torch.bfloat16 if bf16 else torch.float32, True, shapes, fresh=True) if shapes else None
    env = worker_env()
    runs = round_robin([row.name for row in rows], lambda i: run_row(rows[i], cfg, timing, env),
                       timing.get("repeats", 1), console)
    results = [merge_runs(r) for r in runs]
    _add_ratios(results, flops_per_image, peaks, per_device=device.type == "cuda")
    return {"system": system_info(), "device": str(device), "preset": cfg.preset, "batch_size": cfg.data.batch_size,
            "compile_mode": cfg.perf.compile_mode,
            "flops_per_image": flops_per_image, "peak_tflops": peaks,
            "amp_auto": {"chosen": "bf16" if bf16 else "off", "why": why}, "layer_rewrites": rewrites,
            "timing": timing, "results": results}


def _add_ratios(results: list[dict], flops_per_image: float, peaks: dict, per_device: bool = False) -> None:
    """Speed-up over the baseline, achieved TFLOP/s and MFU per row; ``per_device``: the peak is one GPU's, so a
    DDP row divides by world_size of them."""
    base = next((r["images_per_s"] for r in results if r["name"].startswith("baseline") and "error" not in r), None)
    for r in results:
        if "error" in r:
            continue
        # the worker reports the resolved mode; a GPU DDP row's images/s come from world_size devices (on the CPU
        # its processes share the cores the peak was measured on)
        peak = peaks[compute_name(r["amp"])] * (r.get("world_size", 1) if per_device else 1)
        r["speedup"] = r["images_per_s"] / base if base else None
        r["achieved_tflops"] = r["images_per_s"] * flops_per_image / 1e12
        r["mfu"] = r["achieved_tflops"] / peak if peak else None


def _speedup(row: dict, sign: str = "×") -> str:
    """The speed-up over the baseline, or '-' when the run left the baseline out (--only)."""
    return f"{row['speedup']:.2f}{sign}" if row.get("speedup") else "-"


def _mfu(row: dict) -> str:
    return f"{row['mfu'] * 100:.1f}%" if row.get("mfu") else "-"


HEADERS = ["configuration", "images/s (median)", "p10–p90", "speed-up", "step ms", "data wait ms", "compute ms",
           "warm-up s", "MFU", "peak mem GiB"]


CONSOLE_COLUMNS = (0, 1, 2, 3, 4, 8)
"""What the console shows of :data:`HEADERS`, under :data:`CONSOLE_HEADERS`: the rest does not fit 80 columns."""
CONSOLE_HEADERS = ["configuration", "img/s", "p10–p90", "speed-up", "step ms", "MFU"]


def _rows(report: dict) -> list[list[str]]:
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append([r["name"], "failed", r["error"][:80], *[""] * 7])
            continue
        rows.append([r["name"], f"{r['images_per_s']:.0f}", f"{r['images_per_s_p10']:.0f}–{r['images_per_s_p90']:.0f}",
                     _speedup(r), f"{r['step_ms']:.1f}", f"{r['data_wait_ms']:.1f}", f"{r['compute_ms']:.1f}",
                     f"{r['warmup_s']:.1f}", _mfu(r), f"{r['peak_mem_gib']:.2f}"])
    return rows


def rendered(report: dict):
    """The report's table for the console and as Markdown (one set of rows for both)."""
    s, peaks = report["system"], report["peak_tflops"]
    mode = report.get("compile_mode", "default")  # (reports before the field: the default)
    compiled = f", compile mode {mode}" if mode != "default" else ""
    title = (f"gantrain bench: {report['preset']}, batch {report['batch_size']}, {report['device']}{compiled} "
             f"({report['flops_per_image'] / 1e9:.3f} GFLOP/image; peak fp32 {peaks['fp32']:.3g}, "
             f"bf16 {peaks['bf16']:.3g} TFLOP/s, {peaks['source']})")
    caption = (f"**{report['preset']}**, batch {report['batch_size']}, {report['device']}{compiled} "
               f"({s['gpu'] or s['cpu']}, "
               f"{s['cpu_cores']} cores), torch {s['torch']}, {s['date'][:10]}, commit {str(s['git_commit'])[:12]}. "
               f"Model FLOPs {report['flops_per_image'] / 1e9:.3f} GFLOP/image; peak fp32 {peaks['fp32']:.3g} / "
               f"bf16 {peaks['bf16']:.3g} TFLOP/s ({peaks['source']}).")
    rows = _rows(report)
    markdown = markdown_table(HEADERS, rows, caption)
    failed = [r for r in report["results"] if "error" in r]
    console_rows = [[r[i] for i in CONSOLE_COLUMNS] if r[1] != "failed" else [r[0], "failed", *[""] * 4] for r in rows]
    caption = "\n".join([*(f"{r['name']} failed: {r['error']}" for r in failed),
                         "every column (data wait, warm-up, memory): --markdown or --json"])
    return console_table(title, CONSOLE_HEADERS, console_rows, caption), markdown


def _multiple(steps: int, every: int) -> int:
    """``steps`` rounded up to a multiple of ``every``."""
    return -(-steps // every) * every


def bench(cfg: Config, *, quick: bool, nproc: int, peak_override: float | None, json_path: Path | None,
          markdown_path: Path | None, console: Console, only: list[str] | None = None,
          warmup: int | None = None, windows: int | None = None, window: int | None = None,
          repeats: int | None = None, profile: Path | None = None) -> dict:
    """Times the rows of the matrix (``only``: those whose name contains one of these); with ``profile``, each
    row's worker then profiles :data:`~gantrain.bench.timing.PROFILED_STEPS` more steps into ``profile/<row>/``
    (with a lazy R1, that many rounded up to a multiple of its period, so the profile holds its share of R1)."""
    from gantrain.bench.baseline import plain_loop_omits
    from gantrain.engine import pick_device

    device = pick_device(cfg.run.device)
    rows = matrix(resolve_amp("auto", device), nproc, device.type)
    if only:
        rows = [r for r in rows if any(o.lower() in r.name.lower() for o in only)]
        if not rows:
            raise GantrainError("--only matched no benchmark configuration")
    defaults = (3, 3, 2, 1) if quick else (5, 6, 5, 2)
    timing = {"warmup": warmup or defaults[0], "windows": windows or defaults[1], "window": window or defaults[2],
              "repeats": repeats or defaults[3], "num_workers": cfg.data.num_workers}
    every = cfg.loss.r1_every if cfg.loss.r1_gamma > 0 else 1
    if every > 1 and not (warmup or window):  # lazy R1: each window holds the same R1 steps, as training does
        timing["warmup"], timing["window"] = _multiple(timing["warmup"], every), _multiple(timing["window"], every)
        console.print(f"R1 every {every} D steps: warm-up of {timing['warmup']} steps and timing windows of "
                      f"{timing['window']}, multiples of {every}, so every window holds the same share of R1 steps",
                      soft_wrap=True)
    if profile is not None:
        timing["profile"], timing["profile_steps"] = str(profile.resolve()), _multiple(PROFILED_STEPS, every)
        if timing["profile_steps"] != PROFILED_STEPS:
            console.print(f"--profile: {timing['profile_steps']} steps per row (R1 every {every} D steps: whole R1 "
                          f"periods, so R1 has its share of training in the profile)", soft_wrap=True)
    omitted = plain_loop_omits(cfg)
    if omitted and any(r.kind == "baseline" for r in rows):
        console.print(f"baseline: the tutorial loop has no {', '.join(omitted)}; the engine rows have them, so "
                      f"their ratios include what that costs", soft_wrap=True)
    report = run_suite(cfg, rows=rows, timing=timing, peak_override=peak_override, console=console)
    failed = [r for r in report["results"] if "error" in r]
    if failed and len(failed) == len(report["results"]):  # nothing was timed: a failure, not a table of them
        raise GantrainError(f"bench: every row failed ({len(failed)}); the first: "
                            f"{failed[0]['error']}")
    return publish(report, *rendered(report), json_path, markdown_path)


