"""One benchmark configuration, timed in its own fresh process: ``python -m gantrain.bench.worker SPEC_JSON``.

Prints one JSON line (prefixed ``BENCH_RESULT``) with the timings. Warm-up steps (torch.compile included)
are timed separately; the timed part is split into windows of equal steps, each giving one images/s
figure, so the suite can report the median and p10/p90. Data wait (the host waiting for the next batch)
and compute are timed apart.
"""

from __future__ import annotations

import json
import sys


from pathlib import Path

from gantrain.bench.timing import (PROFILED_STEPS, RESULT_PREFIX, endless, exit_with_parent, profile_row, row_slug,
                                   time_loop)
from gantrain.engine import Config, from_dict


def run_baseline(cfg: Config, spec: dict) -> dict:
    """The tutorial's plain loop (:mod:`gantrain.bench.baseline`) fed by its DataLoader."""
    from gantrain.bench.baseline import build_baseline
    from gantrain.engine import pick_device

    device = pick_device(cfg.run.device)
    model, batches, _ = build_baseline(cfg, device, spec.get("num_workers", 2))
    result = time_loop(lambda: next(batches), model.step, device, spec["warmup"], spec["windows"], spec["window"],
                       cfg.data.batch_size)
    _profile(spec, lambda: next(batches), model.step, device, result)
    return {**result, "amp": "off", "loader": "DataLoader"}


def _profile(spec: dict, next_batch, step, device, result: dict, is_main: bool = True) -> None:
    """With ``bench --profile``: the row's extra profiled steps (rank 0's under DDP; the others step alongside)."""
    if not spec.get("profile"):
        return
    steps = spec.get("profile_steps", PROFILED_STEPS)
    if not is_main:
        for _ in range(steps):
            step(next_batch())
        return
    trace = profile_row(next_batch, step, device, Path(spec["profile"]) / row_slug(spec["name"]), steps)
    result["profile_trace"] = str(trace) if trace else None


def run_engine(cfg: Config, spec: dict) -> dict:
    """The engine's step (:class:`GANStep`) fed by its loader: nothing else of a run (no folder, log or grids)."""
    from gantrain.engine import data_parts, gan_part, init_distributed, shutdown_distributed

    info = init_distributed(cfg.run.device)
    device, policy, loader = data_parts(cfg, info)  # as the Trainer builds them
    step = gan_part(cfg, device, policy, info)
    batches = endless(loader)
    result = time_loop(lambda: next(batches), step, device, spec["warmup"], spec["windows"], spec["window"],
                       cfg.data.batch_size * info.world_size)
    _profile(spec, lambda: next(batches), step, device, result, info.is_main)
    result.update(world_size=info.world_size, loader=type(loader).__name__, amp=policy.amp,
                  layer_rewrites=step.layer_rewrites)
    shutdown_distributed()
    return result if info.is_main else {}


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()
    spec = json.loads((argv or sys.argv[1:])[0])
    raw = {k: v for k, v in spec["config"].items()}
    cfg = from_dict(raw)
    if spec["kind"] == "loader":  # gantrain bench --loaders: a loader with no model
        from gantrain.bench.loaders import run_loader_only

        result = run_loader_only(cfg, spec)
    elif spec["kind"] == "to_quality":  # gantrain bench --to-quality: one contender and seed
        from gantrain.bench.to_quality import train_to_quality

        result = train_to_quality(cfg, spec)
    else:
        result = run_baseline(cfg, spec) if spec["kind"] == "baseline" else run_engine(cfg, spec)
    if result:
        print(RESULT_PREFIX + json.dumps({"name": spec["name"], **result}), flush=True)


if __name__ == "__main__":
    from gantrain.engine import GantrainError

    try:
        main()
    except GantrainError as exc:  # what the user can act on (data missing, a refused setting): one line
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
