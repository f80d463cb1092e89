"""progress.gif: each frame under a caption strip saying its step, the grid's own pixels untouched.

A GIF frame holds at most 256 colours: the grids here (grayscale, as FashionMNIST runs make, and RGB of 64
colours) fit, so their pixels come back exactly; a grid of more colours is quantized, as it was without captions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gantrain.engine.outputs.images import caption_height, save_gif, save_grid, save_images_gif, with_caption
from gantrain.engine.state.rundir import RunDir


def decoded(path: Path) -> list[np.ndarray]:
    frames = []
    with Image.open(path) as gif:
        for k in range(gif.n_frames):
            gif.seek(k)
            frames.append(np.asarray(gif.convert("RGB")).copy())
    return frames


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB")).copy()


def grayscale_grids(run: RunDir, steps: list[int]) -> list[Path]:
    generator = torch.Generator().manual_seed(0)
    return [save_grid(torch.rand(16, 1, 8, 8, generator=generator) * 2 - 1, run.sample_grid(step), nrow=4)
            for step in steps]


def test_each_frame_says_its_step_above_the_untouched_grid(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    frames = grayscale_grids(run, [0, 50, 500, 1000])
    final = save_grid(torch.linspace(-1, 1, 16 * 64).reshape(16, 1, 8, 8), run.final_grid, nrow=4)
    save_gif([*frames, final], run.gif)
    gif = decoded(run.gif)
    strip = caption_height()
    assert len(gif) == 5 and strip >= 8
    texts = ["step 0", "step 50", "step 500", "step 1000", "final"]  # final.png: no step in its name
    for frame, source, text in zip(gif, [*frames, final], texts):
        grid = rgb(source)
        assert frame.shape == (grid.shape[0] + strip, grid.shape[1], 3)
        assert np.array_equal(frame[strip:], grid), text  # pixel-exact: a grayscale grid fits a GIF palette
        expected = np.asarray(with_caption(Image.fromarray(grid), text))[:strip]
        assert np.array_equal(frame[:strip], expected), text
        assert frame[:strip].max() > 128  # the text is drawn (white on black)
    strips = [frame[:strip].tobytes() for frame in gif]
    assert len(set(strips)) == len(strips)  # every step its own caption


def test_an_rgb_grid_of_few_colours_comes_back_exactly(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    rng = np.random.default_rng(1)
    palette = rng.integers(0, 256, (64, 3), dtype=np.uint8)
    paths = []
    for step in (4, 8):
        pixels = palette[rng.integers(0, 64, (40, 60))]
        paths.append(run.sample_grid(step))
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(paths[-1])
    save_gif(paths, run.gif)
    strip = caption_height()
    for frame, source in zip(decoded(run.gif), paths):
        assert np.array_equal(frame[strip:], rgb(source))


def test_captions_off_or_given(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    frames = grayscale_grids(run, [3, 6])
    plain = save_gif(frames, tmp_path / "plain.gif", captions=False)
    assert [f.shape for f in decoded(plain)] == [rgb(frames[0]).shape] * 2
    assert [np.array_equal(f, rgb(p)) for f, p in zip(decoded(plain), frames)] == [True, True]
    named = save_gif(frames, tmp_path / "named.gif", captions=["first", "second"])
    strip = caption_height()
    assert [np.array_equal(f[:strip], np.asarray(with_caption(Image.fromarray(rgb(p)), t))[:strip])
            for f, p, t in zip(decoded(named), frames, ["first", "second"])] == [True, True]
    with pytest.raises(ValueError, match="1 captions for 2 frames"):
        save_gif(frames, tmp_path / "bad.gif", captions=["one"])


def test_generate_gifs_have_no_caption(tmp_path: Path) -> None:
    """gantrain generate --walk/--interpolate (save_images_gif): frames at the images' own size."""
    images = torch.linspace(-1, 1, 3 * 12 * 10).reshape(3, 1, 12, 10)
    path = save_images_gif(images, tmp_path / "walk.gif")
    assert [f.shape for f in decoded(path)] == [(12, 10, 3)] * 3
