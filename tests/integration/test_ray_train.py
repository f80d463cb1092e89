"""`gantrain run --ray`: the Trainer as 2 DDP workers of a Ray Train TorchTrainer on a local Ray (CPU, gloo).
Its reference is the same run under torchrun: the same ranks, seeds and data shards give the same weights, bit
for bit; its checkpoint then resumes under torchrun and in one process, and `gantrain generate` reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port
import torch

from gantrain.engine.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
pytest.importorskip("ray.train.torch")


def _run(datasets_root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    env["RAY_AUTH_MODE"] = "disabled"
    args = [sys.executable, "-m", "gantrain", "run", "--data-root", str(datasets_root), "--limit", "256",
            "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--amp", "off", "--no-channels-last", "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=400, env=env)


def _weights(path: Path) -> dict:
    state = load_checkpoint(path)
    return {f"{part}.{name}": t for part in ("generator", "discriminator") for name, t in state[part].items()}


def test_ray_train_run_matches_torchrun_and_its_checkpoint_resumes_anywhere(datasets_root, tmp_path):
    out = tmp_path / "ray"
    ray = _run(datasets_root, out, "--ray", "--ray-workers", "2", "--max-steps", "12")
    assert ray.returncode == 0, ray.stderr[-4000:]
    for name in ("config.toml", "metrics.jsonl", "train.log", "final.png", "losses.png", "progress.gif"):
        assert (out / name).is_file(), name
    assert "# effective batch: 16 per process x 2 process(es) = 32" in (out / "config.toml").read_text()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_d" in r] == list(range(1, 13))
    assert records[-1] == {"step": 12, "ddp_replica_max_abs_diff": 0.0}
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (state["step"], state["world_size"]) == (12, 2)
    # the epoch-end checkpoint (step 8) was reported to Ray Train, under the storage path inside the run folder
    reported = sorted((out / "ray" / "train").glob("checkpoint_*/last.pt"))
    assert len(reported) == 1 and load_checkpoint(reported[0])["step"] == 8

    reference = tmp_path / "torchrun"
    torchrun = _run(datasets_root, reference, "--ddp", "--nproc", "2", "--master-port", str(free_port()),
                    "--max-steps", "12")
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    got, want = _weights(out / "checkpoints" / "last.pt"), _weights(reference / "checkpoints" / "last.pt")
    assert [k for k in want if not torch.equal(got[k], want[k])] == []

    again = _run(datasets_root, out, "--ddp", "--nproc", "2", "--master-port", str(free_port()), "--max-steps", "14",
                 "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    alone = _run(datasets_root, out, "--max-steps", "16", "--resume", "auto")
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 16
    grid = subprocess.run([sys.executable, "-m", "gantrain", "generate", str(out / "checkpoints" / "last.pt"), "--out",
                           str(tmp_path / "grid.png"), "-n", "16", "--device", "cpu"], capture_output=True, text=True,
                          timeout=120)
    assert grid.returncode == 0 and (tmp_path / "grid.png").is_file(), grid.stderr[-2000:]


def test_ray_and_ddp_together_are_refused_in_one_line(datasets_root, tmp_path):
    done = _run(datasets_root, tmp_path / "x", "--ray", "--ddp", "--max-steps", "2")
    assert done.returncode == 2 and done.stderr.strip() == "error: --ray: --ray runs DDP workers itself; leave out --ddp"
