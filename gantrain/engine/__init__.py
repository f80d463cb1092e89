"""The training engine. Its public API, for ``bench``, ``tune``, notebooks and scripts, is the names below,
each imported on first use from the module that defines it (``from gantrain.engine import Trainer, preset``):

- ``config``: the typed config tree and presets (:func:`preset`, :func:`override`, :func:`load_toml`).
- ``train.loop``: :class:`Trainer`, the one training loop; ``gan``: :class:`GANStep`, the models, precision, noise.
- ``data``: loaders and sources; ``metrics``: :class:`Evaluator`, :func:`evaluate_generator`.
- ``state``: checkpoints and atomic writes; ``dist``: device and process group; ``outputs``: the log and figures.

The layers these live in are described in docs/architecture.md and enforced by tests/unit/test_architecture.py.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module (under gantrain.engine) that defines it.
API: dict[str, str] = {
    **dict.fromkeys(("Config", "ModelConfig", "OptimConfig", "PRESETS", "RECOMMENDED", "SECTION_TYPES",
                     "current_layout", "env_data_root", "field_index", "from_dict", "load_toml", "override", "preset",
                     "require_toml_file", "to_toml", "with_env_defaults"), "config"),
    **dict.fromkeys(("Shard", "build_loader"), "data"),
    **dict.fromkeys(("steps_per_epoch",), "data.plan"),
    **dict.fromkeys(("count_images",), "train.dryrun"),
    **dict.fromkeys(("dali_installed",), "data.dali"),
    **dict.fromkeys(("IDX_DATASETS", "ensure_idx_files"), "data.download"),
    **dict.fromkeys(("data_root", "discover_folder", "load_images"), "data.sources"),
    **dict.fromkeys(("refuse_writing_inside",), "data.discovery"),
    **dict.fromkeys(("DistInfo", "PR_SET_PDEATHSIG", "configure_runtime", "init_distributed", "pick_device",
                     "shutdown_distributed"),
                    "dist.runtime"),
    **dict.fromkeys(("refuse_unplaceable",), "dist.raytrain"),
    **dict.fromkeys(("worker_main",), "dist.worker"),
    **dict.fromkeys(("CheckpointError", "ConfigError", "GantrainError", "Interrupted", "rebuild"), "errors"),
    **dict.fromkeys(("LRDecay",), "gan.lr_schedule"),
    **dict.fromkeys(("BENCH_PROBE", "Peaks", "bf16_faster", "cpu_features", "cpu_name", "device_peaks",
                     "describe_rewrites", "layer_rewrites", "layer_shapes", "peak_mem_gib", "step_flops",
                     "strided_layers"),
                    "gan.hardware"),
    **dict.fromkeys(("build_models",), "gan.models"),
    **dict.fromkeys(("PrecisionPolicy", "compute_name", "resolve_amp"), "gan.precision"),
    **dict.fromkeys(("Latent", "check_truncation", "indexed_noise", "latent_walk", "lerp", "sample_noise", "slerp",
                     "truncated_noise"), "gan.sampling"),
    **dict.fromkeys(("GANStep",), "gan.step"),
    **dict.fromkeys(("Evaluator", "METRIC_KEYS", "evaluate_generator", "spec_from_config"), "metrics"),
    **dict.fromkeys(("read_metrics", "save_figure"), "outputs.images"),
    **dict.fromkeys(("GenerateResult", "InterpolationResult", "generate", "interpolate", "load_generator",
                     "parse_indices", "parse_truncations", "truncation_grid"), "outputs.generate"),
    **dict.fromkeys(("log", "setup_logging"), "outputs.runlog"),
    **dict.fromkeys(("atomic_save", "load_checkpoint", "sealed"), "state.checkpoint"),
    **dict.fromkeys(("atomic_write_text", "make_folder", "os_reason"), "state.files"),
    **dict.fromkeys(("RunDir",), "state.rundir"),
    **dict.fromkeys(("Evaluation", "Hook", "Trainer"), "train.loop"),
    **dict.fromkeys(("Cadence",), "train.cadence"),
    **dict.fromkeys(("StepProfiler",), "train.profile"),
    **dict.fromkeys(("choose_rewrites", "data_parts", "gan_part", "has_cpu_rewrites"), "train.parts"),
}

__all__ = sorted(API)


def __getattr__(name: str) -> Any:
    module = API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
