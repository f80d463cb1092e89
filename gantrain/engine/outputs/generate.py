"""Images from a saved generator, without the dataset."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from gantrain.engine.config import from_dict
from gantrain.engine.dist.runtime import pick_device
from gantrain.engine.gan.models import Generator
from gantrain.engine.gan.sampling import generate_images, indexed_noise
from gantrain.engine.outputs.images import save_grid, save_individual
from gantrain.engine.state.checkpoint import check_finite, load_checkpoint, load_module_state
from gantrain.engine.state.schema import generator_weights


@dataclass
class GenerateResult:
    grid: Path
    individual: list[Path] = field(default_factory=list)


def load_generator(path: str | Path, device: str = "cpu", use_ema: bool = True) -> tuple[Generator, object]:
    """The generator of a checkpoint (its EMA copy when present and asked for) and the run's config.

    Raises :class:`CheckpointError` when the checkpoint is unreadable, does not match its config, or holds
    non-finite weights. ``path`` may also be a file written by `gantrain export` (its one set of weights)."""
    from gantrain.engine.outputs.export import is_export, load_export

    if is_export(path):
        g, cfg = load_export(path)
        return g.to(pick_device(device)).eval(), cfg
    state = load_checkpoint(path)
    cfg = from_dict({k: v for k, v in state["config"].items()})
    g = Generator(cfg.model, cfg.data.image_size, cfg.data.channels)
    weights, what = generator_weights(state, use_ema)
    check_finite(weights, what, path)
    load_module_state(g, weights, "generator", path)
    return g.to(pick_device(device)).eval(), cfg


def generate(checkpoint: str | Path, *, n: int = 64, out: Path = Path("grid.png"), seed: int = 0,
             individual: Path | None = None, nrow: int = 8, device: str = "auto", use_ema: bool = True) -> GenerateResult:
    g, cfg = load_generator(checkpoint, device, use_ema)
    noise = indexed_noise(n, cfg.model.nz, cfg.loss.noise, seed, next(g.parameters()).device)
    images = torch.cat([generate_images(g, chunk) for chunk in noise.split(256)])
    result = GenerateResult(save_grid(images, Path(out), nrow))
    if individual is not None:
        result.individual = save_individual(images, Path(individual))
    return result
