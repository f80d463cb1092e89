"""The Python API of ``gantrain`` (re-exported by ``gantrain/__init__.py``): train, generate, load a generator,
as the CLI's ``run`` and ``generate`` do. Each imports the engine on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def train(preset: str | None = None, *, config: str | Path | None = None, resume: str | None = None,
          console: Any = None, **overrides: Any) -> Any:
    """Trains as ``gantrain run --preset PRESET --config CONFIG --FLAG VALUE ...`` does: ``overrides`` are config
    field names (``lr_g=1e-3, max_steps=300, out="runs/x", diffaug=["color", "cutout"]``), applied over the preset
    (default fashion32) and the TOML file; ``resume`` is ``"auto"`` or a checkpoint path (without a preset or a
    file, the run continues with the config stored in that checkpoint, the overrides over it).

    Returns the :class:`~gantrain.engine.train.loop.FitResult` (``steps``, ``run_dir``, ``last_checkpoint``,
    ``stop_reason``), or None when ``ddp=True``/``ray=True`` launched worker processes. Raises
    :class:`~gantrain.engine.errors.GantrainError` (``ConfigError`` for a bad setting, ``Interrupted`` after
    Ctrl-C, ...), whose message is the CLI's one-line error."""
    from gantrain.engine.dist.launch import train as launch
    from gantrain.engine.outputs.runlog import discard_held, setup_logging
    from gantrain.engine.state.checkpoint import resolve_run

    if resume:
        from rich.console import Console

        setup_logging(console or Console(stderr=True), pending=True)  # resume_base's line, held for train.log
    try:
        config_file = str(config) if config is not None else None
        cfg, _ = resolve_run(preset, config_file, resume, overrides)  # over the checkpoint's config, when resumed
        return launch(cfg, resume=resume, console=console)
    finally:
        discard_held()  # what no train.log took (a refusal, a launcher's lines) is not the next run's


def generate(checkpoint: str | Path, **options: Any) -> Any:
    """Images from a checkpoint or an exported generator, as ``gantrain generate`` makes them: ``n``, ``out``,
    ``seed``, ``seeds``, ``truncation``, ``individual``, ``nrow``, ``device``, ``use_ema`` (see
    :func:`gantrain.engine.outputs.generate.generate`); returns its result (``grid``: the PNG written)."""
    from gantrain.engine.outputs.generate import generate as make

    return make(checkpoint, **options)


def load_generator(path: str | Path, device: str = "cpu", use_ema: bool = True) -> tuple[Any, Any]:
    """The generator (a ``torch.nn.Module`` in eval mode on ``device``; the EMA one when the checkpoint holds it
    and ``use_ema``) and the run's config, from a checkpoint or an exported ``.safetensors`` file."""
    from gantrain.engine.outputs.generate import load_generator as load

    return load(path, device, use_ema)
