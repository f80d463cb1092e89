"""--diffaug end to end: short runs on FashionMNIST and the cat folder finish with finite losses, the policy is
stored in config.toml and the checkpoint, and a resume with another policy says so. (The exact resume with
--diffaug is a case of tests/integration/test_training.py::test_exact_resume.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gantrain.engine.config import load_toml
from gantrain.engine.state.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# conftest's tiny CLI run (its trained_run fixture), to compare against: 256 FashionMNIST images, 6 steps
TINY_RUN_ARGS = ["--amp", "off", "--no-channels-last", "--limit", "256", "--batch-size", "32", "--max-steps", "6",
                 "--sample-every", "3", "--log-every", "2", "--ngf", "16", "--ndf", "16", "--device", "cpu"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_fashion_run_with_diffaug_is_finite_and_differs_from_the_plain_run(cli, train_root: Path,
                                                                           trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "aug"
    result = cli("run", "--data-root", train_root, *TINY_RUN_ARGS, "--diffaug", "color,translation,cutout",
                 "--out", out)
    assert result.exit_code == 0, result.output
    records = _metrics(out)
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"])
        assert 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1
    assert load_toml(out / "config.toml").gan.diffaug == ("color", "translation", "cutout")
    saved = load_checkpoint(out / "checkpoints" / "last.pt")["run"]["config"]
    assert saved["gan"]["diffaug"] == ["color", "translation", "cutout"]
    # the same run without --diffaug (conftest's trained_run, same seed and data): D saw other images
    plain = _metrics(trained_run)
    assert [r["loss_d"] for r in records] != [r["loss_d"] for r in plain]
    assert (out / "final.png").is_file()


def test_cats_rgb_run_in_bf16_channels_last(cli, cats_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cats"
    result = cli("run", "--preset", "cats64", "--data-root", cats_dir, "--limit", 64, "--batch-size", 16,
                 "--max-steps", 3, "--log-every", 1, "--sample-every", 0, "--ngf", 8, "--ndf", 8, "--device", "cpu",
                 "--amp", "bf16", "--channels-last", "--loader", "memory", "--diffaug", "translation,color",
                 "--out", out)
    assert result.exit_code == 0, result.output
    records = _metrics(out)
    assert len(records) == 3 and all(math.isfinite(r["loss_d"]) and math.isfinite(r["loss_g"]) for r in records)


def test_resume_with_another_policy_logs_the_change(cli, train_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    common = ["--data-root", train_root, "--limit", 128, "--batch-size", 32, "--ngf", 8, "--ndf", 8,
              "--log-every", 1, "--sample-every", 0, "--device", "cpu"]
    assert cli("run", *common, "--max-steps", 2, "--diffaug", "color", "--out", out).exit_code == 0
    resumed = cli("run", *common, "--max-steps", 3, "--diffaug", "color,translation,cutout", "--out", out,
                  "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output
    log = (out / "train.log").read_text()
    assert "settings changed since the checkpoint, in effect from step 3" in log
    assert "--diffaug 'color' -> 'color,translation,cutout'" in log
    saved = load_checkpoint(out / "checkpoints" / "last.pt")["run"]["config"]
    assert saved["gan"]["diffaug"] == ["color", "translation", "cutout"]
    assert all(math.isfinite(r["loss_d"]) for r in _metrics(out))
