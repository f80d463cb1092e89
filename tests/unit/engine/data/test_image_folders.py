"""Users' image folders: every loader gives the pixels a viewer shows, discovery says what it left out and why,
and runs that cannot take one step are refused before anything is written.

The pixel references come from ``image_zoo`` (numpy, from the pixels each file was made of), never from a loader.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from image_zoo import SIZE, make_oddities, make_zoo
from PIL import Image

from gantrain.engine.config import override, preset
from gantrain.engine.data import build_loader, epoch_plan, load_images
from gantrain.engine.data.decode import decode_image
from gantrain.engine.data.discovery import discover_images
from gantrain.engine.errors import ConfigError, DataError
from gantrain.engine.metrics.reference import folder_split_paths

CPU = torch.device("cpu")
LOADERS = ["memory", "torch", "dali"]
BT601 = np.array([0.299, 0.587, 0.114])


def _needs(kind: str) -> None:
    if kind == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda120) is not installed")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("zoo")
    return folder, {image.name: image for image in make_zoo(folder)}


def _reference(expected_rgb: np.ndarray, channels: int, size: int) -> np.ndarray:
    """The expected (C, size, size) uint8: BT.601 luma for one channel, and the model's resize when it differs."""
    if channels == 1:
        picture = Image.fromarray(np.rint(expected_rgb @ BT601).clip(0, 255).astype(np.uint8), "L")
    else:
        picture = Image.fromarray(expected_rgb, "RGB")
    if size != SIZE:
        picture = picture.resize((size, size), Image.BICUBIC)
    array = np.asarray(picture).astype(np.int16)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _loader_pixels(folder: Path, kind: str, channels: int, size: int = SIZE) -> dict[str, np.ndarray]:
    """Every file of ``folder`` as ``kind`` delivers it, by file name: (C, size, size) int16 in 0..255."""
    paths = discover_images(folder).paths
    n = len(paths)
    cfg = override(preset("dcgan64"), dict(data_root=str(folder), image_size=size, channels=channels, batch_size=n,
                                           num_workers=0, device="cpu", loader=kind))
    batch = next(iter(build_loader(cfg.data, seed=3, device=CPU).epoch(0)))
    if batch.dtype != torch.uint8:  # DALI gives [-1, 1] floats
        batch = (batch.float() * 127.5 + 127.5).round().clamp(0, 255)
    order = epoch_plan(n, n, 0, 3).indices[0].tolist()  # the slot of every image, the same plan in every loader
    return {paths[i].name: batch[slot].numpy().astype(np.int16) for slot, i in enumerate(order)}


# ----- the zoo: every mode, every loader, against numpy ----------------------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("kind", LOADERS)
def test_every_loader_gives_the_viewers_pixels_for_every_mode(zoo, kind: str, channels: int) -> None:
    _needs(kind)
    folder, images = zoo
    got = _loader_pixels(folder, kind, channels)
    assert sorted(got) == sorted(images)  # every zoo file is a training image, none left out
    worst = {name: int(np.abs(got[name] - _reference(image.expected_rgb, channels, SIZE)).max())
             for name, image in images.items()}
    assert max(worst.values()) <= 1, {name: d for name, d in worst.items() if d > 1}


@pytest.mark.parametrize("channels", [3, 1])
def test_loaders_agree_within_one_grey_level_on_every_file(zoo, channels: int) -> None:
    _needs("dali")
    kinds = LOADERS
    folder, _ = zoo
    by_loader = {kind: _loader_pixels(folder, kind, channels) for kind in kinds}
    for name in by_loader["memory"]:
        for kind in kinds[1:]:
            assert np.abs(by_loader[kind][name] - by_loader["memory"][name]).max() <= 1, (kind, name)


@pytest.mark.parametrize("kind", LOADERS)
def test_after_a_resize_loaders_match_the_reference(zoo, kind: str) -> None:
    """At 32 px the decoded picture is resized. The memory and torch loaders resize with Pillow's bicubic filter,
    as the reference does; DALI's cubic resampling differs at sharp synthetic edges (palette blocks, a bilevel
    checkerboard) by a few levels at single pixels, under one grey level on average."""
    _needs(kind)
    folder, images = zoo
    got = _loader_pixels(folder, kind, 3, size=32)
    for name, image in images.items():
        diff = np.abs(got[name] - _reference(image.expected_rgb, 3, 32))
        if kind == "dali":
            assert diff.mean() < 1.0 and diff.max() <= 8, (name, diff.mean(), diff.max())
        else:
            assert diff.max() <= 1, (name, diff.max())


def test_the_issues_ramp_is_a_ramp(zoo) -> None:
    folder, _ = zoo
    row = decode_image(folder / "gray16_ramp.png", SIZE, 1)[0, 0]
    assert row[:4].tolist() == [0, 4, 8, 12] and row[-1] == 255  # was 0, 255, 255, ...: 98 % white
    assert np.all(np.diff(row.astype(int)) >= 0)


def test_transparency_is_white_and_counted_in_the_log(zoo, caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = zoo
    with caplog.at_level(logging.INFO, logger="gantrain"):
        load_images("folder", str(folder), SIZE, 3)
    lines = [r.getMessage() for r in caplog.records]
    alpha_files = {"gray_alpha16.png", "gray_alpha.png", "rgba.png", "palette_transparent.png", "palette_alpha4.png",
                   "alpha.webp", "rgb_transparent_colour.png"}
    conversions = next(line for line in lines if line.startswith("decoded as a viewer shows them"))
    assert f"{len(alpha_files)} with transparency (composited over white)" in conversions
    assert "2 CMYK (converted to RGB)" in conversions and "2 with an EXIF orientation (applied)" in conversions
    assert "4 with 16/32-bit integer samples (scaled to 8 bits)" in conversions
    assert "1 with float samples (taken as [0, 1])" in conversions and "1 animated (first frame used)" in conversions
    rgba = decode_image(folder / "rgba.png", SIZE, 3)
    assert rgba[:, :16, :16].min() == 255  # fully transparent pixels show the white page, not their hidden colour


# ----- discovery ------------------------------------------------------------------------------------------
def _jpegs(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.fromarray(np.full((SIZE, SIZE, 3), i * 7 % 256, np.uint8)).save(folder / f"{i:03d}.jpg")


def test_directory_links_are_followed_and_loops_are_not(tmp_path: Path) -> None:
    root, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    _jpegs(root, 8)
    _jpegs(elsewhere, 16, start=100)
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "back").symlink_to(root, target_is_directory=True)  # a loop through both folders
    (root / "again").symlink_to(elsewhere, target_is_directory=True)  # the same folder by a second link
    (root / "same.jpg").symlink_to(root / "000.jpg")  # the same file twice
    (root / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    found = discover_images(root)
    assert len(found.images) == 24  # 8 + 16 through the link, each once
    assert [p.name for p in found.left_out["linked twice"]] == ["same.jpg"]
    assert [p.name for p in found.left_out["unreadable"]] == ["dangling.jpg"]
    assert found.loops == 2  # "again" (a folder already walked) and "linked/back" (the root)
    summary = found.summary()
    assert summary.startswith(f"folder {root}: 24 images (JPEG 24)") and "2 directory link(s)" in summary

    only_link = tmp_path / "only-link"
    only_link.mkdir()
    _jpegs(tmp_path / "plain", 5)
    (only_link / "photos").symlink_to(tmp_path / "plain", target_is_directory=True)
    assert len(discover_images(only_link).images) == 5  # was "no JPEG/PNG images found"


def test_every_pillow_format_is_taken_and_the_rest_is_named(tmp_path: Path, zoo) -> None:
    zoo_folder, images = zoo
    folder = tmp_path / "mixed"
    shutil.copytree(zoo_folder, folder)
    reasons = make_oddities(folder)
    hidden_dir = folder / ".git"
    hidden_dir.mkdir()
    Image.new("RGB", (8, 8)).save(hidden_dir / "inside.png")
    found = discover_images(folder)
    assert sorted(p.name for p in found.paths) == sorted(images)
    assert {Path(p).suffix.lower() for p in found.paths} >= {".webp", ".bmp", ".tif", ".tiff", ".gif", ".png", ".jpg"}
    for reason, names in reasons.items():
        expected = set(names) | ({".git"} if reason == "hidden/system file" else set())
        assert {p.name for p in found.left_out[reason]} == expected, reason
    summary = found.summary()
    assert f": {len(images)} images (" in summary
    assert "left out 10 file(s): unreadable 2 (empty.png, garbage.jpg); unsupported format 2 (IMG_0001.HEIC, " \
           "drawing.svg); not an image 2 (labels.csv, notes.txt); hidden/system file 4 (.DS_Store, ._rgb.png, .git, " \
           "...)" in summary


def test_strict_refuses_a_left_out_image_by_name(tmp_path: Path) -> None:
    _jpegs(tmp_path / "a", 4)
    (tmp_path / "a" / "notes.txt").write_text("fine: not an image")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"fine: a system file")
    assert len(discover_images(tmp_path / "a", strict=True).images) == 4
    (tmp_path / "a" / "IMG_7.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(DataError, match=r"unsupported format image .*IMG_7.heic \(drop --strict"):
        discover_images(tmp_path / "a", strict=True)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"unreadable image .*broken.png and 1 more"):
        discover_images(tmp_path / "a", strict=True)


def test_images_over_pillows_pixel_limit_are_named_and_the_large_ones_decode_quietly(tmp_path: Path,
                                                                                       monkeypatch) -> None:
    """A valid image over twice Pillow's MAX_IMAGE_PIXELS (its decompression-bomb error) was called "unreadable",
    and one between once and twice the limit printed Pillow's raw DecompressionBombWarning. Now the first is left
    out as over the limit (refused by name under --strict), the second decodes without a word from Pillow.
    Pillow's limit is lowered here (40x40 = 1,600 px lies between 1,000 and 2,000; 64x64 is over twice it)."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "big"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 90, np.uint8)).save(folder / "large.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(folder / "huge.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning Pillow raises fails the test
        found = discover_images(folder)
        assert [p.name for p in found.paths] == ["large.png"]
        assert found.left_out == {"over Pillow's pixel limit": [folder / "huge.png"]}
        assert "left out 1 file(s): over Pillow's pixel limit 1 (huge.png)" in found.summary()
        assert decode_image(folder / "large.png", 32, 3).shape == (3, 32, 32)
    with pytest.raises(DataError, match=r"over Pillow's pixel limit image .*huge.png \(drop --strict"):
        discover_images(folder, strict=True)


def test_colour_images_read_in_grayscale_are_said(tmp_path: Path) -> None:
    """A colour folder trained with a preset's --channels 1 became luma without a word (it even said "CMYK
    converted to RGB"). One line counts the colour images by mode when some of them hold colour; grayscale images,
    grayscale stored as RGB and --channels 3 say nothing."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)
    for i in range(3):
        Image.fromarray(rgb).save(folder / f"rgb{i}.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(rgb[..., 0]).convert("RGB").save(folder / "gray-as-rgb.png")  # gray stored as RGB
    found = discover_images(folder)
    assert found.channel_summary(1) == ("--channels 1: 6 image(s) stored in colour (RGB 4, CMYK 1, P 1; 5 of the 6 "
                                        "looked at hold colour) are read as grayscale (their luma); --channels 3 "
                                        "keeps the colour")
    assert found.channel_summary(3) is None
    for name in ("rgb0.png", "rgb1.png", "rgb2.png", "cmyk.jpg", "palette.png"):
        (folder / name).unlink()
    assert discover_images(folder).channel_summary(1) is None  # gray, and gray stored as RGB: nothing is lost


def test_a_folder_of_non_images_says_what_it_holds(tmp_path: Path) -> None:
    reasons = make_oddities(tmp_path / "odd")
    with pytest.raises(DataError, match=r"no images found below .*odd; left out: unreadable 2 .*unsupported format 2"):
        discover_images(tmp_path / "odd")
    assert reasons


def test_metrics_split_the_same_discovered_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _jpegs(root / "a", 6)
    _jpegs(tmp_path / "b", 6, start=50)
    (root / "b").symlink_to(tmp_path / "b", target_is_directory=True)
    Image.new("RGB", (SIZE, SIZE), (9, 9, 9)).save(root / "extra.webp")
    (root / "._extra.webp").write_bytes(b"resource fork")
    train, test = folder_split_paths(root, "train"), folder_split_paths(root, "test")
    assert len(train) + len(test) == 13 and set(train) | set(test) == set(discover_images(root).paths)


# ----- impossible schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LOADERS)
def test_too_few_images_for_one_batch_is_one_error_for_every_loader(tmp_path: Path, kind: str) -> None:
    _needs(kind)
    _jpegs(tmp_path / "d", 21)
    cfg = override(preset("dcgan64"), dict(data_root=str(tmp_path / "d"), batch_size=32, loader=kind, device="cpu",
                                           num_workers=0))
    with pytest.raises(ConfigError) as info:
        build_loader(cfg.data, seed=0, device=CPU)
    assert str(info.value) == ("--batch-size: the dataset has 21 images, fewer than one global batch of 32 "
                               "(--batch-size); lower --batch-size")


def test_limit_is_said_in_the_summary(tmp_path: Path) -> None:
    _jpegs(tmp_path / "d", 10)
    found = discover_images(tmp_path / "d", limit=4)
    assert [p.name for p in found.paths] == ["000.jpg", "001.jpg", "002.jpg", "003.jpg"]  # the same first N always
    assert found.summary() == f"folder {tmp_path / 'd'}: 4 images (JPEG 4), the first of 10 found (--limit 4); no file left out"
    assert "--limit" not in discover_images(tmp_path / "d", limit=40).summary()


def test_hidden_root_folder_is_still_read(tmp_path: Path) -> None:
    _jpegs(tmp_path / ".cache" / "photos", 3)
    assert len(discover_images(tmp_path / ".cache" / "photos").images) == 3
    assert os.path.basename(tmp_path / ".cache").startswith(".")


def test_decode_or_skip_is_the_one_guard_for_broken_images(tmp_path) -> None:
    """A readable file decodes as decode_image does; a truncated body, random bytes and an empty file each give
    (None, Pillow's reason) instead of one of Pillow's many exception types."""
    import io

    import numpy as np
    from PIL import Image

    from gantrain.engine.data.decode import decode_image, decode_or_skip

    good = tmp_path / "good.png"
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(48, 64)).save(good)
    array, why = decode_or_skip(good, 16, 1)
    assert why == "" and np.array_equal(array, decode_image(good, 16, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 7, np.uint8)).save(buffer, "JPEG")
    broken = {"truncated.jpg": buffer.getvalue()[: len(buffer.getvalue()) // 2], "noise.png": bytes(range(256)) * 4,
              "empty.png": b""}
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
        array, why = decode_or_skip(tmp_path / name, 16, 3)
        assert array is None and why, name


def test_upscaled_and_heavily_cropped_images_are_counted_in_one_line(tmp_path: Path, monkeypatch) -> None:
    """Every image reaches the model's size by its short side and its centre square, said nowhere: a 17x300 PNG
    became its middle 17x17 stretched to 64 px without a word. Now one line counts (with examples) the images
    upscaled (short side below the size) and those cropped to under half of them (longer than 2:1); images that
    only shrink, or keep more than half, are not in it; a folder with none gets no line."""
    from gantrain.engine.data import sources

    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {"ok.png": (64, 64), "big.png": (300, 200), "strip.png": (17, 300), "small.png": (40, 40),
             "wide.png": (200, 90), "ratio2.png": (128, 64), "over2.png": (130, 64)}
    for name, (w, h) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(folder / name)
    said: list[str] = []
    monkeypatch.setattr(sources.log, "info", lambda fmt, *args: said.append(fmt % args))
    images = load_images("folder", str(folder), 64, 3)
    assert images.shape == (7, 3, 64, 64)
    lines = [line for line in said if line.startswith("resized to 64x64 px: ")]
    assert lines == ["resized to 64x64 px: 2 upscaled (short side below 64 px) (small.png, strip.png); 3 cropped to "
                     "their centre square, which keeps under half of them (longer than 2:1) (over2.png, strip.png, "
                     "wide.png)"]
    said.clear()
    load_images("folder", str(folder), 16, 3)  # at 16 px nothing is upscaled; the long ones are still cropped
    assert [line for line in said if line.startswith("resized to")] == [
        "resized to 16x16 px: 3 cropped to their centre square, which keeps under half of them (longer than 2:1) "
        "(over2.png, strip.png, wide.png)"]
    for name in ("strip.png", "small.png", "wide.png", "over2.png"):
        (folder / name).unlink()
    said.clear()
    load_images("folder", str(folder), 64, 3)
    assert not [line for line in said if line.startswith("resized to")]


def test_a_gantrain_run_folder_below_the_images_is_left_out_however_it_is_reached(tmp_path: Path) -> None:
    """An --out inside the image folder is refused, but the walk follows links: a run folder elsewhere, linked
    into the images (or one copied in), would still put a generator's grids among the training images. A folder
    holding a run's config.toml beside checkpoints/ or metrics.jsonl is left out by name; a folder that only
    holds a config.toml (someone's own) is not."""
    images, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere" / "run"
    for folder in (images / "cats", elsewhere / "samples", images / "copied-run", images / "notes"):
        folder.mkdir(parents=True)
    for path in (images / "cats" / "a.png", elsewhere / "final.png", elsewhere / "samples" / "step_000001.png",
                 images / "copied-run" / "final.png", images / "notes" / "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(path)
    for run in (elsewhere, images / "copied-run"):
        (run / "config.toml").write_text("")
    (elsewhere / "checkpoints").mkdir()
    (images / "copied-run" / "metrics.jsonl").write_text("")
    (images / "notes" / "config.toml").write_text("")  # no run beside it: an ordinary folder
    (images / "linked").symlink_to(elsewhere)
    found = discover_images(images)
    assert [p.relative_to(images).as_posix() for p in found.paths] == ["cats/a.png", "notes/b.png"]
    assert "gantrain run folder 2 (copied-run, linked)" in found.summary()
