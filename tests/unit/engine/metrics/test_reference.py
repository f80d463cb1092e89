"""Real and generated images take the same road to the extractor at every training size (issue 31, item 1):
a perfect generator's output (the training images as the loader makes them) equals the real reference images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gantrain.engine.data.pixels import to_unit
from gantrain.engine.data.sources import load_images
from gantrain.engine.metrics.generated import prepare_generated
from gantrain.engine.metrics.reference import DatasetSpec, load_split, spec_from_config, to_metric_size
from gantrain.engine.config import override, preset


def _folder(tmp_path: Path, count: int = 20) -> Path:
    """RGB images of several native sizes (not square, not the metric's), with fine detail a resize changes."""
    folder = tmp_path / "faces"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (50, 70) if i % 2 else (90, 90)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


# The repository's first 1024 FashionMNIST training images (and 512 test): the whole "train split" here is small.
FIRST_1024 = Path(__file__).resolve().parents[3] / "data" / "fashion-mnist-first-1024"


@pytest.mark.parametrize("train_px", [32, 64, 128])
def test_a_perfect_idx_generator_reaches_the_extractor_as_the_real_images_do(train_px: int) -> None:
    spec = DatasetSpec("fashion-mnist", FIRST_1024, 1, train_px=train_px)
    trained_on = load_images("fashion-mnist", str(FIRST_1024), train_px, 1)  # what the loader trains on
    generated = prepare_generated(to_unit(trained_on), spec)  # those images in a generator's role
    real = load_split(spec, "train")
    assert real.images.shape == (len(trained_on), 1, 32, 32) and real.labels is not None
    torch.testing.assert_close(generated, to_unit(real.images), rtol=0, atol=0)
    assert spec.round_trip == (train_px != 32) and spec.via == ("" if train_px == 32 else f"-via{train_px}px")


@pytest.mark.parametrize("train_px", [32, 64, 128])
def test_a_perfect_folder_generator_reaches_the_extractor_as_the_real_images_do(tmp_path: Path, train_px: int) -> None:
    folder = _folder(tmp_path)
    spec = DatasetSpec("folder", folder, 3, train_px=train_px)
    trained_on = load_images("folder", str(folder), train_px, 3)  # every image, in discovery order
    test = [i % 5 == 4 for i in range(len(trained_on))]  # the folder split: every 5th image is test
    generated = prepare_generated(to_unit(trained_on[torch.tensor(test)]), spec)
    torch.testing.assert_close(generated, to_unit(load_split(spec, "test").images), rtol=0, atol=0)


def test_the_metric_resize_is_pils_antialiased_bilinear_on_8_bit_levels() -> None:
    """Against Pillow's own resize (BILINEAR widens its filter when shrinking, as torch's antialias does), on float
    pixels so that only the final rounding to 8 bits differs: at most half a level."""
    rng = np.random.default_rng(1)
    for size, out_px in ((64, 32), (128, 32), (128, 64), (48, 32)):
        pixels = rng.integers(0, 256, (size, size)).astype(np.float32)
        expected = np.asarray(Image.fromarray(pixels, mode="F").resize((out_px, out_px), Image.BILINEAR))
        out = to_metric_size(torch.from_numpy(pixels / 127.5 - 1)[None, None], out_px)[0, 0]
        np.testing.assert_allclose((out.numpy() + 1) * 127.5, expected, atol=0.5 + 1e-3)
        assert torch.equal(out, to_unit(torch.round((out + 1) * 127.5).to(torch.uint8)))  # on the 256 levels
        assert torch.equal(to_metric_size(out[None, None], out_px)[0, 0], out)  # at the metric's size: unchanged


def test_a_runs_spec_names_its_training_size_and_the_extractor_ignores_it(train_root: Path) -> None:
    cfg = override(preset("fashion32"), {"image_size": 64, "data_root": str(train_root)})
    spec = spec_from_config(cfg)
    assert (spec.size_px, spec.train_px, spec.round_trip) == (32, 64, True)
    assert spec.extractor_spec() == DatasetSpec("fashion-mnist", train_root, 1)
    assert spec.label == spec.extractor_spec().label  # one extractor for every training size
    direct = load_split(spec.extractor_spec(), "test").images
    assert not torch.equal(load_split(spec, "test").images, direct)  # the round trip changes real images...
    assert (load_split(spec, "test").images.float() - direct.float()).abs().mean() < 6  # ...by a few levels


def test_the_eval_table_and_json_name_the_same_reference() -> None:
    """With no reference given (a checkpoint against its dataset's test split) the table's title names the split,
    as the JSON does, not "None"; a given reference is named as given in both."""
    from gantrain.engine.metrics import report
    from gantrain.engine.metrics.evaluate import MetricReport
    from gantrain.engine.metrics.report import EvalResult

    info = {"label": "fashion-mnist", "task": "classes", "test_accuracy": 0.9, "train_sha256": "0" * 64,
            "epochs": 1, "weights_sha256": "1" * 64}
    for reference, named in ((None, "fashion-mnist test split"), ("/data/cats", "/data/cats")):
        values = {key: 1.0 for key, *_ in report._ROWS} | {"kid_mean": 0.1, "kid_std": 0.01}
        result = EvalResult("generator", MetricReport(values, 100, 100), info, "runs/a/last.pt", reference=reference)
        assert report._metrics_table(result).title == f"gantrain eval: runs/a/last.pt vs {named}"
        assert result.to_json()["reference"] == named


def _images(folder: Path, pixels: list[np.ndarray]) -> Path:
    from PIL import Image

    folder.mkdir()
    for i, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    return folder


def test_colour_photos_are_refused_for_a_grayscale_metric_domain(tmp_path: Path) -> None:
    """Scored in a built-in grayscale domain (a FashionMNIST generator's), a folder of colour images would give
    an FD across domains: refused, naming an example and the domain; grayscale images stored as RGB, or a few
    colour images among grayscale ones, are read; a folder's own grayscale domain (a grayscale model trained on
    colour photos, scored in their luma as it trained) and an RGB domain read colour as it is."""
    from gantrain.engine.errors import DataError
    from gantrain.engine.metrics import sets

    fashion = sets.gray_domain_of(DatasetSpec("fashion-mnist", None, 1))
    assert fashion == "fashion-mnist" and sets.gray_domain_of(DatasetSpec("folder", tmp_path, 1)) is None
    rng = np.random.default_rng(0)
    gray = [np.repeat(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), 3, axis=2) for _ in range(8)]
    colour = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    with pytest.raises(DataError, match=r"holds colour images \(8 of 8 looked at, e.g. 00.png\), but they would be "
                                        r"scored in the grayscale fashion-mnist domain"):
        sets.folder_images(_images(tmp_path / "colour", colour), 1, None, 16, gray_domain=fashion)
    images, size = sets.folder_images(_images(tmp_path / "gray", gray), 1, None, 16, gray_domain=fashion)
    assert images.shape == (8, 1, 16, 16) and size == 16
    # gray stored as RGB: the grayscale read is the same value in every channel
    assert torch.equal(images[0, 0], torch.from_numpy(gray[0][..., 0]))
    mixed = _images(tmp_path / "mixed", gray[:5] + colour[:3])
    assert sets.folder_images(mixed, 1, None, 16, gray_domain=fashion)[0].shape[0] == 8
    assert sets.folder_images(tmp_path / "colour", 1, None, 16)[0].shape == (8, 1, 16, 16)  # a folder's own domain
    assert sets.folder_images(tmp_path / "colour", 3, None, 16)[0].shape == (8, 3, 16, 16)
