"""One benchmark configuration, timed in its own fresh process: ``python -m gantrain.bench.worker SPEC_JSON``.

Prints one JSON line (prefixed ``BENCH_RESULT``) with the timings. Warm-up steps (torch.compile included)
are timed separately; the timed part is split into windows of equal steps, each giving one images/s
figure, so the suite can report the median and p10/p90. Data wait (the host waiting for the next batch)
and compute are timed apart.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch

from gantrain.bench.hardware import peak_mem_gib
from gantrain.engine.config import Config, from_dict

RESULT_PREFIX = "BENCH_RESULT "


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


def summarize_windows(rates: list[float]) -> dict:
    """Median and p10/p90 images/s over timed windows."""
    return {"window_images_per_s": rates, "images_per_s": statistics.median(rates),
            "images_per_s_p10": _quantile(rates, 0.1), "images_per_s_p90": _quantile(rates, 0.9)}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _endless(loader, start_epoch: int = 0) -> Iterator[torch.Tensor]:
    epoch = start_epoch
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def run_baseline(cfg: Config, spec: dict) -> dict:
    from gantrain.bench.baseline import BaselineGAN, baseline_batches
    from gantrain.engine.data.sources import load_images
    from gantrain.engine.runtime import pick_device

    device = pick_device(cfg.run.device)
    images = load_images(cfg.data.dataset, cfg.data.data_root, cfg.data.image_size, cfg.data.channels,
                         limit=cfg.data.limit, synthetic_size=cfg.data.synthetic_size, seed=cfg.run.seed)
    model = BaselineGAN(cfg, device)
    batches = baseline_batches(images, cfg, spec.get("num_workers", 2), cfg.run.seed)
    result = time_loop(lambda: next(batches), model.step, device, spec["warmup"], spec["windows"], spec["window"],
                       cfg.data.batch_size)
    return {**result, "amp": "off", "loader": "DataLoader"}


def run_engine(cfg: Config, spec: dict) -> dict:
    from gantrain.engine.loop import Trainer
    from gantrain.engine.runtime import init_distributed, shutdown_distributed

    info = init_distributed(cfg.run.device)
    with tempfile.TemporaryDirectory(prefix="gantrain-bench-") as tmp:
        cfg.run.out, cfg.run.sample_every, cfg.run.log_every = tmp, 0, 10**9
        trainer = Trainer(cfg, dist_info=info)
        batches = _endless(trainer.loader)
        result = time_loop(lambda: next(batches), trainer.train_step, trainer.device, spec["warmup"],
                           spec["windows"], spec["window"], cfg.data.batch_size * info.world_size)
        result["world_size"] = info.world_size
        result["loader"] = type(trainer.loader).__name__
        result["amp"] = trainer.policy.amp
        result = result if info.is_main else {}
    shutdown_distributed()
    return result


def main(argv: list[str] | None = None) -> None:
    spec = json.loads((argv or sys.argv[1:])[0])
    raw = {k: v for k, v in spec["config"].items()}
    cfg = from_dict(raw)
    if spec["kind"] == "loader":  # gantrain bench --loaders: a loader with no model
        from gantrain.bench.loaders import run_loader_only

        result = run_loader_only(cfg, spec)
    else:
        result = run_baseline(cfg, spec) if spec["kind"] == "baseline" else run_engine(cfg, spec)
    if result:
        print(RESULT_PREFIX + json.dumps({"name": spec["name"], **result}), flush=True)


if __name__ == "__main__":
    main()
