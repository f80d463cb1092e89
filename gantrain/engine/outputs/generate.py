"""Images from a saved generator, without the dataset: grids of chosen images (``--seeds``), with the truncation
trick, truncation grids and interpolations (``gantrain generate``)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gantrain.engine.config import SEED_MAX, from_dict
from gantrain.engine.dist.runtime import pick_device
from gantrain.engine.errors import ConfigError
from gantrain.engine.gan.models import Generator
from gantrain.engine.gan.sampling import check_truncation, generate_images, latent_walk, truncated_noise
from gantrain.engine.metrics.progress import task_bar
from gantrain.engine.outputs.images import save_grid, save_images_gif, save_individual
from gantrain.engine.outputs.runlog import log
from gantrain.engine.state.checkpoint import check_finite, load_checkpoint, load_module_state
from gantrain.engine.state.schema import Parts, generator_weights


DEFAULT_IMAGES = 64
"""Images of ``generate`` without ``n`` or ``seeds``."""
DEFAULT_GRID_IMAGES = 8
"""Images per row (per psi) of ``truncation_grid`` without ``n`` or ``seeds``."""
BAR_FROM_IMAGES = 1024
"""From this many images on, generating them and writing them one per file each show a progress bar."""
MAX_INDEX = 2**24 - 1
"""The largest image index ``--seeds`` and ``--walk`` accept (its noise takes seconds to reach: every earlier block
of the seed is drawn, see :func:`~gantrain.engine.gan.sampling.indexed_noise`)."""
GIF_MS_PER_FRAME = 150
"""Milliseconds per frame of an interpolation GIF (the last frame held five times as long)."""


@dataclass
class GenerateResult:
    grid: Path
    individual: list[Path] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    """The image indices of the seed, in grid order (one row's worth for ``truncation_grid``)."""


@dataclass
class InterpolationResult:
    grid: Path
    """A row of ``frames`` images per pair of consecutive points."""
    gif: Path
    """The whole path as one animation: (points - 1) * (frames - 1) + 1 frames (shared ends once)."""
    indices: list[int]
    frames: int


def load_generator(path: str | Path, device: str = "cpu", use_ema: bool = True) -> tuple[Generator, object]:
    """The generator of a checkpoint (its EMA copy when present and asked for) and the run's config.

    Raises :class:`CheckpointError` when the checkpoint is unreadable, does not match its config, or holds
    non-finite weights. ``path`` may also be a file written by `gantrain export` (its one set of weights; an
    export of the EMA generator with ``use_ema=False`` raises :class:`ConfigError`)."""
    from gantrain.engine.outputs.export import export_weights, is_export, load_export

    if is_export(path):
        g, cfg = load_export(path)
        if not use_ema and export_weights(path) == "ema":  # its one set of weights is not what was asked for
            raise ConfigError(f"--no-ema: {path} is an export of the EMA generator alone; export the checkpoint "
                              "with --no-ema for the raw one")
        return g.to(pick_device(device)).eval(), cfg
    state = load_checkpoint(path)
    cfg = from_dict({k: v for k, v in Parts.of(state).config.items()})
    g = Generator(cfg.model, cfg.data.image_size, cfg.data.channels)
    weights, what = generator_weights(Parts.of(state).gan, use_ema)
    check_finite(weights, what, path)
    load_module_state(g, weights, "generator", path)
    return g.to(pick_device(device)).eval(), cfg


def parse_indices(text: str, flag: str = "--seeds", *, ranges: bool = True, repeats: bool = False) -> list[int]:
    """Image indices from ``text``: comma-separated whole numbers 0..:data:`MAX_INDEX` and (``ranges``) inclusive
    ranges ``A-B`` (A <= B), in the order written, e.g. "0-3,100" -> [0, 1, 2, 3, 100]; spaces around items are
    ignored. A repeated index is refused unless ``repeats``. Raises :class:`ConfigError` "``flag``: ..." otherwise."""
    if not str(text).strip():
        raise ConfigError(f"{flag}: no images listed")
    found: list[int] = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            raise ConfigError(f"{flag}: an empty item in {text!r} (write e.g. 0-63,100)")
        match = re.fullmatch(r"([0-9]+)-([0-9]+)", item) if ranges else None
        if match:
            first, last = int(match[1]), int(match[2])
            if first > last:
                raise ConfigError(f"{flag}: the range {item} runs backwards (write {last}-{first})")
        elif re.fullmatch(r"[0-9]+", item):
            first = last = int(item)
        else:
            what = "a whole number >= 0" + (" or a range A-B" if ranges else "")
            where = f" in {text!r}" if item != str(text).strip() else ""
            raise ConfigError(f"{flag}: {item!r}{where} is not {what}")
        if last > MAX_INDEX:
            raise ConfigError(f"{flag}: index {last} is above the largest, {MAX_INDEX}")
        found.extend(range(first, last + 1))
    if not repeats and len(set(found)) < len(found):
        seen: set[int] = set()
        for i in found:
            if i in seen:
                raise ConfigError(f"{flag}: image {i} is listed twice (each image once: files are named by index)")
            seen.add(i)
    return found


def _indices(n: int | None, seeds: str | Sequence[int] | None, default: int) -> list[int]:
    """The image indices asked for: 0..n-1 (n default ``default``) or ``seeds``; refuses both, n < 1, no seeds."""
    if seeds is not None and n is not None:
        raise ConfigError("-n and --seeds: give one (--seeds picks the images, so it sets how many)")
    if seeds is None:
        n = default if n is None else n
        if n < 1:
            raise ConfigError(f"-n: must be at least 1, got {n}")
        return list(range(n))
    text = seeds if isinstance(seeds, str) else ",".join(str(int(i)) for i in seeds)
    return parse_indices(text, "--seeds")


def _truncation(psi: float | None, flag: str = "--truncation") -> float | None:
    try:
        return check_truncation(psi)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def _say_idle_truncation(psis: Sequence[float | None], noise: str, flag: str = "--truncation") -> None:
    """One warning when a psi of ``psis`` changes nothing: uniform noise is truncated only by a psi below 1."""
    idle = [psi for psi in psis if psi is not None and noise == "uniform" and 1 <= psi < math.inf]
    if idle:
        log.warning("%s %s: without effect on this generator's uniform noise U(-1, 1) (a PSI below 1 scales it)",
                    flag, ", ".join(f"{psi:g}" for psi in idle))


def _checked(out: str | Path | None, seed: int, nrow: int = 1) -> tuple[Path, int, int]:
    """The grid path (a PNG: a name ending in .png or without an extension), ``seed`` and ``nrow`` as Python
    ints (numpy's pass), after the checks the command line makes of them; raises :class:`ConfigError` before
    anything is read or written."""
    if out is None or not str(out):
        raise ConfigError("--out: give the grid's path (a .png)")
    out = Path(out)
    if out.suffix.lower() not in ("", ".png"):  # the grid is a PNG: another extension would misname its bytes
        raise ConfigError(f"--out: {out} would hold a PNG grid; name it {out.with_suffix('.png').name}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"--seed: must be an integer between 0 and {SEED_MAX:,}, got {seed!r}")
    if isinstance(nrow, bool) or not isinstance(nrow, numbers.Integral) or nrow < 1:
        raise ConfigError(f"--nrow: must be an integer of at least 1, got {nrow!r}")
    return out, int(seed), int(nrow)


def _images(g: Generator, noise: torch.Tensor) -> torch.Tensor:
    """G's images of ``noise``, 256 at a time; with a bar from :data:`BAR_FROM_IMAGES` images on."""
    chunks = noise.to(next(g.parameters()).device).split(256)
    with task_bar(f"generating {len(noise):,} images", len(noise), quiet=len(noise) < BAR_FROM_IMAGES) as advance:
        made = []
        for chunk in chunks:
            made.append(generate_images(g, chunk))
            advance(len(chunk))
    return torch.cat(made)


def generate(checkpoint: str | Path, *, n: int | None = None, seeds: str | Sequence[int] | None = None,
             truncation: float | None = None, out: Path = Path("grid.png"), seed: int = 0,
             individual: Path | None = None, nrow: int = 8, device: str = "auto", use_ema: bool = True) -> GenerateResult:
    """Writes the grid PNG ``out`` of images of ``seed``: 0..n-1 (n default 64) or those at ``seeds`` (indices, or
    text as :func:`parse_indices`), in that order; image i is the same whichever way it is asked for.

    ``truncation``: psi of :func:`~gantrain.engine.gan.sampling.truncated_noise` (None or inf: off).
    ``individual``: also each image as its own PNG in this folder, named by its index (image 100: 000100.png).
    Raises :class:`ConfigError` for n with seeds, n < 1, bad seeds or psi (before reading the checkpoint),
    :class:`CheckpointError` for a checkpoint :func:`load_generator` refuses, :class:`RunIOError` for files."""
    out, seed, nrow = _checked(out, seed, nrow)
    indices = _indices(n, seeds, DEFAULT_IMAGES)
    psi = _truncation(truncation)
    g, cfg = load_generator(checkpoint, device, use_ema)
    _say_idle_truncation([psi], cfg.loss.noise)
    images = _images(g, truncated_noise(indices, cfg.model.nz, cfg.loss.noise, seed, psi))
    result = GenerateResult(save_grid(images, out, nrow), indices=indices)
    if individual is not None:
        with task_bar(f"writing {len(indices):,} PNGs", len(indices),
                      quiet=len(indices) < BAR_FROM_IMAGES) as advance:
            result.individual = save_individual(images, Path(individual), names=indices, on_saved=advance)
    return result


def parse_truncations(text: str | Sequence[float], flag: str = "--truncation-grid") -> list[float]:
    """Truncations (psi) from comma-separated text ("0.5,0.7,1,inf") or numbers, in order; inf is no truncation.
    Raises :class:`ConfigError` "``flag``: ..." for text that is not a number or a psi that is refused."""
    items = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
    psis = []
    for item in items:
        try:
            psi = float(item)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag}: {item!r} is not a number (psi > 0, inf for none)") from None
        _truncation(psi, flag)
        psis.append(psi)
    if not psis:
        raise ConfigError(f"{flag}: no truncations listed")
    return psis


def truncation_grid(checkpoint: str | Path, truncations: str | Sequence[float], *, n: int | None = None,
                    seeds: str | Sequence[int] | None = None, out: Path = Path("grid.png"), seed: int = 0,
                    device: str = "auto", use_ema: bool = True) -> GenerateResult:
    """Writes one grid PNG ``out`` with a row per truncation (psi, in order; text as :func:`parse_truncations`) of
    the same images of ``seed``: 0..n-1 (n default 8) or ``seeds``, as :func:`generate` draws them with that psi
    (the row of psi = inf is :func:`generate`'s untruncated images). Raises as :func:`generate`."""
    out, seed, _ = _checked(out, seed)
    indices = _indices(n, seeds, DEFAULT_GRID_IMAGES)
    psis = parse_truncations(truncations)
    g, cfg = load_generator(checkpoint, device, use_ema)
    _say_idle_truncation(psis, cfg.loss.noise, "--truncation-grid")
    noise = torch.cat([truncated_noise(indices, cfg.model.nz, cfg.loss.noise, seed, psi) for psi in psis])
    return GenerateResult(save_grid(_images(g, noise), out, len(indices)), indices=indices)


def interpolate(checkpoint: str | Path, points: str | Sequence[int], *, frames: int = 8,
                out: Path = Path("grid.png"), gif: Path | None = None, seed: int = 0, truncation: float | None = None,
                device: str = "auto", use_ema: bool = True) -> InterpolationResult:
    """Interpolates between images of ``seed`` at ``points`` (two or more indices, or text as :func:`parse_indices`;
    repeats allowed, e.g. [3, 17, 42, 3] for a loop): each consecutive pair in ``frames`` steps (both ends included)
    by slerp for normal noise and lerp for uniform (:func:`~gantrain.engine.gan.sampling.latent_walk`).

    Writes the grid PNG ``out`` (a row of ``frames`` images per pair) and the GIF ``gif`` (default: ``out`` with
    .gif) of the whole path. ``truncation`` truncates the points' noise; the path between them is not truncated
    again (lerp stays inside [-psi, psi]; slerp's middle frames may not: orthogonal ends give coordinates up to
    sqrt(2) psi). Frame 0 of a pair is :func:`generate`'s image of its first index. Raises :class:`ConfigError` for fewer than 2 points or 2 frames, a bad psi, a GIF path equal to
    ``out``; otherwise as :func:`generate`."""
    flag = "--walk" if isinstance(points, str) else "--interpolate"
    indices = parse_indices(points, flag, repeats=True) if isinstance(points, str) else [int(i) for i in points]
    if len(indices) < 2:
        raise ConfigError(f"{flag}: at least 2 images to interpolate between, got {len(indices)}")
    if min(indices) < 0 or max(indices) > MAX_INDEX:
        raise ConfigError(f"{flag}: image indices must be in 0..{MAX_INDEX}, got {indices}")
    if not isinstance(frames, int) or frames < 2:
        raise ConfigError(f"--frames: at least 2 (the two ends), got {frames}")
    psi = _truncation(truncation)
    out, seed, _ = _checked(out, seed)
    gif = out.with_suffix(".gif") if gif is None else Path(gif)
    if gif.resolve() == out.resolve():
        raise ConfigError(f"--out: {out} would be both the grid PNG and the GIF; name the grid .png")
    g, cfg = load_generator(checkpoint, device, use_ema)
    _say_idle_truncation([psi], cfg.loss.noise)
    walk = latent_walk(truncated_noise(indices, cfg.model.nz, cfg.loss.noise, seed, psi), frames, cfg.loss.noise)
    images = _images(g, walk.flatten(0, 1))
    grid = save_grid(images, out, frames)
    path = torch.cat([images[:1], *(images[k * frames + 1 : (k + 1) * frames] for k in range(len(walk)))])
    return InterpolationResult(grid, save_images_gif(path, gif, GIF_MS_PER_FRAME), indices, frames)
