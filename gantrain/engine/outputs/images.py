"""Image output without torchvision: sample grids (PNG), the progress GIF and plots."""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from gantrain.engine.data.pixels import to_uint8
from gantrain.engine.state.files import atomic_write, make_folder, read_json_lines
from gantrain.engine.state.rundir import RunDir


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


def save_individual(images: torch.Tensor, folder: Path, names: Sequence[int] | None = None,
                    on_saved: Callable[[], object] | None = None) -> list[Path]:
    """Each image as its own PNG at its own size (no grid padding): 000000.png, 000001.png, ..., or named by
    ``names`` (one number per image: image k is ``f"{names[k]:06d}.png"``); ``on_saved()`` after each (a bar)."""
    make_folder(folder, "--individual")
    paths = []
    for i, img in enumerate(images):
        name = i if names is None else names[i]
        paths.append(save_grid(img[None], folder / f"{name:06d}.png", nrow=1, padding=0))
        if on_saved is not None:
            on_saved()
    return paths


def save_gif(frames: Sequence[Path | io.BytesIO], path: Path, ms_per_frame: int = 300,
             captions: bool | Sequence[str] = True) -> Path | None:
    """The frames (image files) as an animated GIF, the last held five times as long; None for no frames.

    ``captions``: True (a run's progress.gif) puts a caption strip above each frame: ``step N`` for a sample grid
    (a path :meth:`RunDir.sample_grid` gives), the file's stem for another (``final``); a sequence gives one text
    per frame; False leaves the frames as they are. The frame's own pixels are never drawn on. A GIF frame holds
    at most 256 colours: grayscale grids come back exactly, grids of more colours quantized, as without captions.
    """
    if not frames:
        return None
    images = []
    for frame in frames:
        with Image.open(frame) as img:
            images.append(img.convert("RGB"))
    if captions is True:
        captions = [_frame_caption(frame) for frame in frames]
    if captions is not False:
        if len(captions) != len(images):
            raise ValueError(f"save_gif: {len(captions)} captions for {len(images)} frames")
        images = [with_caption(img, text) for img, text in zip(images, captions)]
    durations = [ms_per_frame] * (len(images) - 1) + [ms_per_frame * 5]
    return atomic_write(path, lambda fh: images[0].save(fh, format="GIF", save_all=True, append_images=images[1:],
                                                         duration=durations, loop=0))


def caption_height() -> int:
    """The height in pixels of the strip :func:`with_caption` adds (Pillow's default font, 3 px above and below)."""
    left, top, right, bottom = ImageFont.load_default().getbbox("step 0123456789")
    return bottom - top + 2 * _CAPTION_MARGIN


def with_caption(image: Image.Image, text: str) -> Image.Image:
    """``image`` (RGB) below a black strip of :func:`caption_height` pixels holding ``text`` in white, left-aligned
    (cut at the right edge when the image is narrower than the text); the image's pixels are copied unchanged."""
    font = ImageFont.load_default()
    top = font.getbbox("step 0123456789")[1]
    strip = caption_height()
    out = Image.new("RGB", (image.width, image.height + strip), (0, 0, 0))
    out.paste(image, (0, strip))
    ImageDraw.Draw(out).text((_CAPTION_MARGIN, _CAPTION_MARGIN - top), text, fill=(255, 255, 255), font=font)
    return out


_CAPTION_MARGIN = 3


def _frame_caption(frame: Path | io.BytesIO) -> str:
    """``step N`` for a run's sample grid ``samples/step_N.png``, the file's stem for another file, else ''."""
    if not isinstance(frame, (str, Path)):
        return ""
    frame = Path(frame)
    digits = frame.stem.rpartition("_")[2]
    if digits.isdigit() and RunDir(frame.parent.parent).sample_grid(int(digits)) == frame:
        return f"step {int(digits)}"
    return frame.stem


def save_images_gif(images: torch.Tensor, path: Path, ms_per_frame: int = 300) -> Path | None:
    """Each image of ``images`` (N, C, H, W) in [-1, 1] as one frame of an animated GIF at its own size (no
    padding), written by :func:`save_gif` (same timing: the last frame held five times as long); None for N = 0."""
    frames = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(make_grid(img[None], nrow=1, padding=0)).save(buffer, format="PNG")
        buffer.seek(0)
        frames.append(buffer)
    return save_gif(frames, path, ms_per_frame, captions=False)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, read tolerantly: damaged lines are skipped and counted in one warning."""
    found = read_json_lines(path)
    if found.skipped:
        from gantrain.engine.outputs.runlog import log

        log.warning("%s", found.describe_skipped(path))
    return found.records


FEW_POINTS = 30
"""Curves of at most this many points are drawn with a marker at each (a short run's few log records)."""


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


@dataclass(frozen=True)
class Panel:
    """One axis of :func:`panel_figure`: a line with point markers per metrics.jsonl key in ``keys`` (a key without
    a finite value is left out), titled ``title``."""

    title: str
    keys: tuple[str, ...]
    ylabel: str = ""
    spreads: Mapping[str, str] = field(default_factory=dict)
    """key -> the key of its spread (a standard deviation), drawn as error bars where finite."""
    unit_range: bool = False
    """The y axis spans 0 to 1 (3 % margin each side), and grows to hold a value above 1."""


def panel_figure(records: Sequence[dict], panels: Sequence[Panel], title: str):
    """A matplotlib Figure (not registered with pyplot: nothing to close) of one axis per panel that has a finite
    value in ``records`` (metrics.jsonl records), two columns, in ``panels``' order, against the step; an epoch
    axis on top where the records hold ``epoch``. None when no panel has a value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = [r for r in records if _number(r.get("step"))]
    shown = [p for p in panels if any(_number(r.get(k)) for r in rows for k in p.keys)]
    if not shown:
        return None
    ncols = min(2, len(shown))
    nrows = math.ceil(len(shown) / ncols)
    fig = Figure(figsize=(5.5 * ncols, 3.8 * nrows))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for extra in axes[len(shown):]:
        fig.delaxes(extra)
    to_epoch = _epoch_of_step(rows)
    colour = 0
    for ax, panel in zip(axes, shown):
        peak = 1.0
        for key in panel.keys:
            points = [(r["step"], r[key], r.get(panel.spreads.get(key, ""))) for r in rows if _number(r.get(key))]
            if not points:
                continue
            xs, ys, spreads = zip(*points)
            ax.plot(xs, ys, label=key, color=f"C{colour}", marker="o", markersize=4, linewidth=1.4)
            bars = [(x, y, e) for x, y, e in points if _number(e) and e >= 0]
            if bars:
                ax.errorbar(*zip(*bars), fmt="none", ecolor=f"C{colour}", elinewidth=1, capsize=3)
            peak = max(peak, *ys)
            colour += 1
        if panel.unit_range:
            ax.set_ylim(-0.03 * peak, 1.03 * peak)
        ax.set(title=panel.title, xlabel="step", ylabel=panel.ylabel)
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # no "1e-6+1" over the epochs
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        if to_epoch is not None:
            top = ax.secondary_xaxis("top", functions=to_epoch)
            top.xaxis.set_major_locator(MaxNLocator(integer=True))
            top.set_xlabel("epoch", fontsize="small")
    fig.suptitle(title)
    return fig


def plot_panels(records: Sequence[dict], panels: Sequence[Panel], path: Path, title: str) -> Path | None:
    """Writes :func:`panel_figure` as a PNG at ``path`` (atomically); None, and nothing written, when it is None."""
    fig = panel_figure(records, panels, title)
    return None if fig is None else save_figure(fig, path)


def _number(value) -> bool:
    """A finite int or float (metrics.jsonl writes a non-finite value as null)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _epoch_of_step(rows: Sequence[dict]):
    """(step -> epoch, epoch -> step) through the records' (step, epoch) pairs and (0, 0), linear between them and
    beyond the last; None with fewer than one pair."""
    pairs = sorted({(r["step"], r["epoch"]) for r in rows if _number(r.get("epoch"))})
    known = [(0.0, 0.0)]
    for step, epoch in pairs:
        if step > known[-1][0] and epoch > known[-1][1]:
            known.append((float(step), float(epoch)))
    if len(known) < 2:
        return None
    steps, epochs = np.array([s for s, _ in known]), np.array([e for _, e in known])

    def along(x, xp, fp):
        x = np.asarray(x, dtype=float)
        slope_low, slope_high = (fp[1] - fp[0]) / (xp[1] - xp[0]), (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        inside = np.interp(x, xp, fp)
        return np.where(x < xp[0], fp[0] + (x - xp[0]) * slope_low,
                        np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * slope_high, inside))

    return (lambda x: along(x, steps, epochs)), (lambda x: along(x, epochs, steps))


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
            marker = "o" if len(points) <= FEW_POINTS else None  # a line of one point draws nothing
            ax.plot(*zip(*points), label=key, linestyle=linestyle, color=f"C{i + color_offset}", marker=marker)
