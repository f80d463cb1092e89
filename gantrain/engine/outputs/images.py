"""Image output without torchvision: sample grids (PNG), the progress GIF and plots."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gantrain.engine.data.pixels import to_uint8
from gantrain.engine.state.files import atomic_write, make_folder, read_json_lines


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """Tiles images in [-1, 1] of shape (N, C, H, W) into one uint8 HxWxC (or HxW) array."""
    images = to_uint8(images.detach().cpu())
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = math.ceil(n / ncol)
    grid = torch.zeros(c, nrows * (h + padding) + padding, ncol * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        top, left = padding + (i // ncol) * (h + padding), padding + (i % ncol) * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    array = grid.permute(1, 2, 0).numpy()
    return array[..., 0] if c == 1 else array


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, padding: int = 2) -> Path:
    """Writes the grid of ``images`` (N, C, H, W) in [-1, 1] as a PNG, atomically; raises :class:`RunIOError`
    naming ``path`` when it cannot be written."""
    grid = Image.fromarray(make_grid(images, nrow, padding))
    return atomic_write(path, lambda fh: grid.save(fh, format="PNG"))


def save_individual(images: torch.Tensor, folder: Path, names: Sequence[int] | None = None) -> list[Path]:
    """Each image as its own PNG at its own size (no grid padding): 000000.png, 000001.png, ..., or named by
    ``names`` (one number per image: image k is ``f"{names[k]:06d}.png"``)."""
    make_folder(folder, "--individual")
    paths = []
    for i, img in enumerate(images):
        name = i if names is None else names[i]
        paths.append(save_grid(img[None], folder / f"{name:06d}.png", nrow=1, padding=0))
    return paths


def save_gif(frames: Sequence[Path], path: Path, ms_per_frame: int = 300) -> Path | None:
    """The sample grids over time as an animated GIF (the last frame held longer)."""
    if not frames:
        return None
    images = []
    for frame in frames:
        with Image.open(frame) as img:
            images.append(img.convert("RGB"))
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 5]
    return atomic_write(path, lambda fh: images[0].save(fh, format="GIF", save_all=True, append_images=images[1:],
                                                         duration=durations, loop=0))


def save_images_gif(images: torch.Tensor, path: Path, ms_per_frame: int = 300) -> Path | None:
    """Each image of ``images`` (N, C, H, W) in [-1, 1] as one frame of an animated GIF at its own size (no
    padding), written by :func:`save_gif` (same timing: the last frame held five times as long); None for N = 0."""
    frames = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(make_grid(img[None], nrow=1, padding=0)).save(buffer, format="PNG")
        buffer.seek(0)
        frames.append(buffer)
    return save_gif(frames, path, ms_per_frame)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, read tolerantly: damaged lines are skipped and counted in one warning."""
    found = read_json_lines(path)
    if found.skipped:
        from gantrain.engine.outputs.runlog import log

        log.warning("%s", found.describe_skipped(path))
    return found.records


def plot_curves(records: Sequence[dict], keys: Sequence[str], path: Path, title: str, ylabel: str, *,
                secondary: Sequence[str] = (), secondary_ylabel: str = "") -> Path | None:
    """One line per key against the step, from metrics.jsonl records; ``secondary`` keys (values on another
    scale, e.g. precision next to FD) are drawn dashed against a right-hand axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if any(k in r for k in [*keys, *secondary])]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _plot_keys(ax, rows, keys)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if secondary:
        right = ax.twinx()
        _plot_keys(right, rows, secondary, linestyle="--", color_offset=len(keys))
        right.set_ylabel(secondary_ylabel)
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Writes a matplotlib figure as a PNG atomically (tight layout, 100 dpi) and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _plot_keys(ax, rows: Sequence[dict], keys: Sequence[str], linestyle: str = "-", color_offset: int = 0) -> None:
    for i, key in enumerate(keys):
        # null is how metrics.jsonl writes a non-finite value: a gap in the line
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:  # colours continue across the two axes so no two lines share one
            ax.plot(*zip(*points), label=key, linestyle=linestyle, color=f"C{i + color_offset}")
