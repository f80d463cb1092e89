"""``gantrain run --dry-run``: the resolved config, where each value came from, and the schedule, without
training and without touching the run folder (nothing is created, locked or downloaded)."""

from __future__ import annotations

import gzip
import struct
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gantrain.engine.config import (DATA_ROOT_ENV, SECTION_TYPES, Config, _flag, current_layout, env_data_root,
                                    preset, shown, toml_base)
from gantrain.engine.data.download import IDX_DATASETS, check_identity, raw_folder
from gantrain.engine.errors import ConfigError


def value_sources(preset_name: str | None, config_file: str | None, flags: dict[str, Any],
                  resumed: tuple[Config, Path] | None = None) -> dict[str, str]:
    """``{'optim.lr_g': 'flag --lr-g', 'run.epochs': 'preset fashion32', 'data.hflip': 'default', ...}``: which
    of the layers `gantrain run` stacks (preset, or a resumed checkpoint's config; then --config TOML, then flags)
    set each field last, or the environment ($GANTRAIN_DATA for a data root none of them set). ``resumed``: the
    config and path of the checkpoint a --resume without preset or file continues with
    (``checkpoint.resume_base``), the base layer."""
    name = preset_name or "fashion32"
    text = _read_text(config_file) if config_file else ""
    raw = current_layout(_parse_toml(text))  # a file of an older layout: its fields where they live now
    base_cfg, label = preset(name), f"preset {name}"
    if config_file and not preset_name and isinstance(raw.get("preset"), str):
        name = raw["preset"]
        base_cfg, label = toml_base(name, text), f"preset {name}"  # the base config.load_toml lays the file over
    if resumed is not None:
        base_cfg, label = resumed[0], f"checkpoint {resumed[1]}"
    base, defaults = base_cfg.to_dict(), Config().to_dict()
    sources: dict[str, str] = {}
    for section, cls in SECTION_TYPES.items():
        for f in fields(cls):
            key = f"{section}.{f.name}"
            if flags.get(f.name) is not None:
                sources[key] = f"flag {_flag(f.name)}"
            elif isinstance(raw.get(section), dict) and f.name in raw[section]:
                sources[key] = f"file {config_file}"
            elif base[section][f.name] != defaults[section][f.name]:
                sources[key] = label
            else:
                sources[key] = "default"
    file_root = raw["data"].get("data_root") if isinstance(raw.get("data"), dict) else None
    if not (flags.get("data_root") or file_root or base["data"]["data_root"]) and env_data_root():
        sources["data.data_root"] = f"env ${DATA_ROOT_ENV}"  # what with_env_defaults fills in
    return sources


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):  # resolve() already refused a bad file
        return ""


def _parse_toml(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:  # resolve() already refused a bad file
        return {}


@dataclass
class Schedule:
    """What a run of this config would do, from a count of the images (nothing decoded)."""

    images: int | None
    """Training images after --limit; None when they cannot be counted without a download."""
    images_note: str
    world_size: int
    batch_size: int
    steps_per_epoch: int | None
    total_steps: int | None

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.world_size


def count_images(cfg: Config) -> tuple[int | None, str]:
    """The training images (after --limit) and how they were counted; (None, why) when unknown."""
    data = cfg.data
    if data.dataset == "synthetic":
        count, how = data.synthetic_size, "synthetic"
    elif data.dataset in IDX_DATASETS:
        from gantrain.engine.data.sources import data_root

        folder = raw_folder(data.dataset, data_root(data.data_root))
        path = next((p for p in (folder / "train-images-idx3-ubyte", folder / "train-images-idx3-ubyte.gz")
                     if p.exists()), None)
        if path is None:
            return None, f"{data.dataset} is not in {folder} yet (a real run downloads it)"
        check_identity(data.dataset, "train-images-idx3-ubyte", path)  # another dataset's file: refused, as the run
        count, how = _idx_count(path), f"{data.dataset} train split ({path})"
    else:
        from gantrain.engine.data.sources import discover_folder

        found = discover_folder(data.data_root, strict=data.strict)
        count, how = len(found.paths), f"image files found in {found.root} (unreadable ones are left out when decoded)"
    if data.limit and data.limit < count:
        return data.limit, f"{how}, first {data.limit} (--limit)"
    return count, how


def _idx_count(path: Path) -> int:
    """The item count in an IDX header (bytes 4-8, big-endian), without reading the images."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        header = fh.read(8)
    if len(header) < 8:
        raise ConfigError(f"{path}: not an IDX file (too short)")
    return struct.unpack(">I", header[4:8])[0]


def plan(cfg: Config) -> Schedule:
    """The schedule of a fresh run of ``cfg`` (a resumed one continues from its checkpoint's step)."""
    world = cfg.dist.nproc * cfg.dist.nnodes if cfg.dist.ddp else 1
    images, note = count_images(cfg)
    if images is None:
        return Schedule(None, note, world, cfg.data.batch_size, None, None)
    from gantrain.engine.data.plan import steps_per_epoch

    per_epoch = steps_per_epoch(images, cfg.data.batch_size, world, cfg.data.limit)  # refuses 0 steps, naming the flag
    total = cfg.run.epochs * per_epoch
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps)
    return Schedule(images, note, world, cfg.data.batch_size, per_epoch, total)


def _precision(cfg: Config) -> str:
    """What --amp and --channels-last come to on the device this run would use (``auto`` resolved)."""
    from gantrain.engine.dist.runtime import pick_device
    from gantrain.engine.gan.precision import PrecisionPolicy

    device = pick_device(cfg.run.device)
    return f"{PrecisionPolicy(device, cfg.perf.amp, cfg.perf.channels_last).describe()} on {device.type}"


def refusals(cfg: Config, resume: str | None) -> list[str]:
    """What the run itself would refuse before training, refused here too (:class:`ConfigError` or
    :class:`~gantrain.engine.errors.CheckpointError`): a new run into a folder that holds one, a missing --logger
    extra or Ray Train for --ray, quality metrics of synthetic data, a --resume checkpoint that is missing, corrupt
    or of another model. Returns the settings a resume changes against its checkpoint ('--lr-g 0.0002 -> 0.001');
    reads the checkpoint, writes nothing."""
    from gantrain.engine.metrics.reference import refuse_metrics_without_data
    from gantrain.engine.outputs.writer import RunOutputs
    from gantrain.engine.state.checkpoint import open_resume

    if cfg.dist.ray:
        from gantrain.engine.dist.runtime import require_ray_train

        require_ray_train()
    RunOutputs.check(cfg, resuming=resume is not None)
    refuse_metrics_without_data(cfg)
    return open_resume(cfg, resume)[2] if resume else []


def as_dict(cfg: Config, sources: dict[str, str], schedule: Schedule, resume: str | None,
            changes: list[str] | None = None) -> dict[str, Any]:
    """What :func:`show` prints, as one JSON-native object (``--dry-run --json``): the resolved config (nested by
    section, as config.toml holds it), where each value came from (by ``section.field``), the schedule (None where
    the images cannot be counted) and the precision. Raises :class:`ConfigError` as :func:`show` does."""
    total = schedule.total_steps
    return {"preset": cfg.preset, "run_dir": str(cfg.run_dir), "resume": resume,
            "resume_changes": list(changes or []), "without_effect": cfg.without_effect(), "config": cfg.to_dict(),
            "sources": dict(sources),
            "schedule": {"images": schedule.images, "images_note": schedule.images_note,
                         "batch_size": schedule.batch_size, "world_size": schedule.world_size,
                         "effective_batch": schedule.effective_batch, "steps_per_epoch": schedule.steps_per_epoch,
                         "epochs": cfg.run.epochs, "max_steps": cfg.run.max_steps, "total_steps": total,
                         "images_trained": None if total is None else total * schedule.effective_batch},
            "precision": _precision(cfg)}


def show(cfg: Config, sources: dict[str, str], schedule: Schedule, console: Console, resume: str | None,
         changes: list[str] | None = None) -> None:
    """The config table (field, value, source) and the schedule, to ``console``. Raises :class:`ConfigError`, before
    printing anything, when the device or precision cannot be had here (``--device cuda`` without CUDA, fp16 on CPU)."""
    precision = _precision(cfg)
    table = Table(title=f"gantrain run --dry-run: preset {cfg.preset}, run folder {cfg.run_dir} (not touched)")
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", min_width=12, overflow="fold")  # long paths fold rather than vanish
    table.add_column("from", overflow="fold")
    values = cfg.to_dict()
    for key, source in sources.items():
        section, name = key.split(".")
        value = values[section][name]
        text = "" if value is None else repr(shown(value)) if isinstance(value, (str, list)) else str(value)
        table.add_row(key, text, source, style=None if source == "default" else "cyan")
    console.print(table)
    lines = [f"images: {schedule.images if schedule.images is not None else 'unknown'} ({schedule.images_note})",
             f"effective batch: {schedule.batch_size} per process x {schedule.world_size} process(es) = "
             f"{schedule.effective_batch}"]
    if schedule.steps_per_epoch is not None:
        planned, epochs = cfg.run.epochs * schedule.steps_per_epoch, cfg.run.epochs
        capped = ""
        if cfg.run.max_steps and schedule.total_steps < planned:  # the epochs the capped run reaches, as it counts
            epochs = -(-schedule.total_steps // max(schedule.steps_per_epoch, 1))
            capped = f" (capped by --max-steps {cfg.run.max_steps}; {cfg.run.epochs} epoch(s) would be {planned})"
        lines += [f"steps per epoch: {schedule.steps_per_epoch}",
                  f"total steps: {schedule.total_steps} over {epochs} epoch(s){capped}",
                  f"images trained on: {schedule.total_steps * schedule.effective_batch}"]
    lines.append(f"precision: {precision}")
    if cfg.without_effect():
        lines.append(f"without effect in this run: {'; '.join(cfg.without_effect())}")
    if resume:
        lines.append(f"--resume {resume}: a resumed run goes on from its checkpoint's step towards these totals")
        lines.append("changed against the checkpoint: " + (", ".join(changes) if changes else "nothing"))
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
