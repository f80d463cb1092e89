"""DDP on the CPU: 2 gloo processes launched by `gantrain run --ddp` (torchrun underneath)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port
import torch

from gantrain.engine.config import load_toml
from gantrain.engine.state.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def _run(train_root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "512",
            "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "2", "--sample-every", "0",
            "--device", "cpu", "--out", str(out), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def _errors(proc: subprocess.CompletedProcess) -> str:
    """The workers' own messages (a C++ abort prints its reason early) and torchrun's summary at the end."""
    text = proc.stderr
    return text if len(text) < 6000 else text[:3000] + "\n[...]\n" + text[-3000:]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_ddp_replicas_stay_identical_and_resume_both_ways(train_root, tmp_path):
    out = tmp_path / "ddp"
    ddp = ["--ddp", "--nproc", "2", "--master-port", str(free_port())]
    first = _run(train_root, out, "--max-steps", "6", *ddp)
    assert first.returncode == 0, _errors(first)
    records = _records(out)
    assert records[-1] == {"step": 6, "ddp_replica_max_abs_diff": 0.0}
    # 512 images / (16 per rank x 2 ranks) = 16 steps per epoch, and the effective batch is reported
    assert "batch 16 x 2 processes = 32" in (out / "train.log").read_text()
    assert "# effective batch: 16 per process x 2 process(es) = 32" in (out / "config.toml").read_text()
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["position"]["step"] == 6 and state["run"]["world_size"] == 2
    assert (state["position"]["epoch_images"], state["position"]["global_batch"]) == (6 * 32, 32)

    # One process, batch 16: the 192 images are step 12 of 32 in this layout; 3 more steps reach image 240.
    single = _run(train_root, out, "--max-steps", "9", "--resume", "auto")
    assert single.returncode == 0, _errors(single)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    position = state["position"]
    assert (state["run"]["world_size"], position["step"], position["epoch_images"], position["images_seen"]) == \
        (1, 9, 240, 240)
    assert "global batch 32 -> 16: continuing at epoch 1, step 12 of 32" in (out / "train.log").read_text()

    # Two processes again: image 240 is 7.5 global batches of 32, so step 7 (16 images again), then 3 more.
    again = _run(train_root, out, "--max-steps", "12", "--resume", "auto", *ddp[:-1], str(free_port()))
    assert again.returncode == 0, _errors(again)
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    assert final["position"]["step"] == 12 and final["run"]["world_size"] == 2
    assert (final["position"]["epoch_images"], final["position"]["images_seen"]) == ((7 + 3) * 32, 240 + 3 * 32)
    assert "16 images of that epoch are trained on twice" in (out / "train.log").read_text()
    assert _records(out)[-1] == {"step": 12, "ddp_replica_max_abs_diff": 0.0}
    before, after = state["gan"]["generator"], final["gan"]["generator"]
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, after[k])]
    assert len(changed) > len(before) // 2, "the resumed runs did not train G"


def test_a_finished_ddp_epoch_resumed_in_one_process_is_not_trained_again(train_root, tmp_path):
    """The issue's case: 256 images at batch 16 x 2 processes is 8 steps per epoch; in one process it is 16."""
    out = tmp_path / "ddp"
    first = _run(train_root, out, "--limit", "256", "--epochs", "1", "--max-steps", "0", "--ddp", "--nproc", "2",
                 "--master-port", str(free_port()))
    assert first.returncode == 0, _errors(first)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["step"] == 8
    done = _run(train_root, out, "--limit", "256", "--epochs", "1", "--max-steps", "0", "--resume", "auto")
    assert done.returncode == 2 and "already took 8 steps, --epochs" in done.stderr and "allows 8; raise --epochs" in done.stderr  # stays finished
    assert load_checkpoint(out / "checkpoints" / "last.pt")["position"]["step"] == 8
    more = _run(train_root, out, "--limit", "256", "--epochs", "2", "--max-steps", "0", "--resume", "auto")
    assert more.returncode == 0, _errors(more)
    state = load_checkpoint(out / "checkpoints" / "last.pt")["position"]
    assert (state["step"], state["epoch"], state["images_seen"]) == (8 + 16, 2, 2 * 256)


def test_ranks_that_resolve_amp_auto_differently_are_refused(train_root, tmp_path):
    """Nodes with different CPUs can resolve --amp auto differently (bf16 on one, fp32 on another); replicas in
    two precisions would drift apart silently, so the run stops at start-up with one line on every rank."""
    script = tmp_path / "mixed.py"
    script.write_text("import os\n"
                      "from gantrain.engine.gan import precision\n"
                      "precision.native_bf16 = lambda device: os.environ['RANK'] == '1'  # as on a second CPU type\n"
                      "from gantrain.cli import main\n"
                      "main()\n")
    out = tmp_path / "mixed"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            str(script), "run", "--data-root", str(train_root), "--limit", "256", "--batch-size", "16", "--ngf", "8",
            "--ndf", "8", "--max-steps", "2", "--sample-every", "0", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = ("error: --amp auto: the DDP ranks compute in different precisions (fp32 on some, bf16 on others: nodes "
            "with different CPUs or GPUs); pass --amp off or --amp bf16 so all ranks compute alike")
    said = " ".join((proc.stdout + proc.stderr).split())  # rich wraps at the pipe's 80 columns
    assert said.count(line) == 2, _errors(proc)  # each rank says it (torchrun then reports the failed workers)
    assert not (out / "checkpoints" / "last.pt").exists()


def test_torchrun_by_hand_records_the_launch_it_had(train_root, tmp_path):
    """`torchrun --nproc-per-node 2 -m gantrain run` wrote nproc = 1 (and ddp = false) into config.toml and the
    checkpoints, so a rerun from config.toml trained one process at half the global batch. The launch is recorded
    as torchrun's environment says, with one line."""
    out = tmp_path / "by-hand"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "256", "--batch-size", "16", "--ngf",
            "8", "--ndf", "8", "--max-steps", "2", "--sample-every", "0", "--device", "cpu", "--amp", "off",
            "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _errors(proc)
    cfg = load_toml(out / "config.toml")
    assert (cfg.dist.ddp, cfg.dist.nproc, cfg.dist.nnodes) == (True, 2, 1)
    assert "batch 16 x 2 processes = 32" in (out / "train.log").read_text()
    said = " ".join((proc.stdout + proc.stderr).split())
    assert said.count("torchrun started this run: recorded as ddp = True, nproc = 2, nnodes = 1 (the command gave "
                      "ddp = False, nproc = 1, nnodes = 1)") == 1, said[-3000:]


def test_ddp_evaluates_on_rank_0_at_the_steps_every_rank_knows(fashion_extractor, train_root, tmp_path):
    """--eval-every-steps 3 under 2 processes (512 images, 16 per process: 16 steps an epoch): rank 0 evaluates
    after steps 3 and 6, and at step 7, where the epoch-less run ends between evaluations, once more; every rank
    takes part in the verdict after each evaluation (a collective), and in the end's "is it the best" (a
    checkpoint due at step 7 is saved before that evaluation and again, by every rank, when it is the best), so
    none waits for another: the run ends, exit 0, last.pt holding the best FD."""
    out = tmp_path / "ddp-eval"
    done = _run(train_root, out, "--max-steps", "7", "--eval-every-steps", "3", "--eval-samples", "100",
                "--checkpoint-every-steps", "7", "--ddp", "--nproc", "2", "--master-port", str(free_port()))
    assert done.returncode == 0, _errors(done)
    evals = [r for r in _records(out) if "fd" in r]
    assert [(r["step"], r["epoch"]) for r in evals] == [(3, 0.1875), (6, 0.375), (7, 0.4375)]
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["position"]["step"] == 7
    assert last["quality"]["best_fd"] == pytest.approx(min(r["fd"] for r in evals), abs=1e-6)
    best = min(evals, key=lambda r: r["fd"])
    assert load_checkpoint(out / "checkpoints" / "best.pt")["position"]["step"] == best["step"]


def test_r1_under_ddp_keeps_the_replicas_identical_and_resumes_on_schedule(train_root, tmp_path):
    """R1's double backward under DDP (every 2nd step): D's gradients of the penalty are all-reduced with the rest,
    so the two replicas stay equal; a resume at step 3 continues the lazy schedule from the checkpoint's step."""
    out = tmp_path / "ddp-r1"
    ddp = ["--ddp", "--nproc", "2", "--r1-gamma", "1", "--r1-every", "2", "--log-every", "1"]
    first = _run(train_root, out, "--max-steps", "3", *ddp, "--master-port", str(free_port()))
    assert first.returncode == 0, _errors(first)
    again = _run(train_root, out, "--max-steps", "6", "--resume", "auto", *ddp, "--master-port", str(free_port()))
    assert again.returncode == 0, _errors(again)
    records = _records(out)
    steps = [r for r in records if "r1" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    # iterations 0, 2, 4 (steps 1, 3, 5) take the penalty; the others log 0
    assert [r["r1"] > 0 for r in steps] == [True, False, True, False, True, False]
    assert [r for r in records if "ddp_replica_max_abs_diff" in r][-1] == {"step": 6, "ddp_replica_max_abs_diff": 0.0}


def test_ema_by_images_counts_every_ranks_images(train_root, tmp_path):
    """--ema-halflife under DDP: a step trains batch x processes images, so the EMA's decay per step is
    0.5 ** (32 / H) with 2 ranks of 16 (not 0.5 ** (16 / H)): read from the checkpoints of steps 1 and 2."""
    import math

    out, halflife = tmp_path / "ddp-ema", 64
    proc = _run(train_root, out, "--ddp", "--nproc", "2", "--master-port", str(free_port()), "--max-steps", "2",
                "--ema-halflife", str(halflife), "--checkpoint-every-steps", "1")
    assert proc.returncode == 0, _errors(proc)
    one, two = (load_checkpoint(p)["gan"] for p in sorted((out / "checkpoints").glob("step_*.pt")))
    beta = math.exp(-math.log(2) * 32 / halflife)
    weights = [k for k, v in two["generator"].items() if v.is_floating_point() and "running" not in k]
    assert weights
    for key in weights:
        expected = beta * one["generator_ema"][key] + (1 - beta) * two["generator"][key]
        torch.testing.assert_close(two["generator_ema"][key], expected)
