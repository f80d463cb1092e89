"""Two "nodes" on localhost: two `gantrain run --ddp --nnodes 2 --nproc 1` launchers, one per node, meeting
through the static master address or a c10d rendezvous. They train one run: identical replicas, one run
folder written by rank 0 (one checkpoint series, one log), and both launchers end cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port
import torch

from gantrain.engine.state.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def _node(train_root: Path, out: Path, *where: str) -> list[str]:
    return [sys.executable, "-m", "gantrain", "run", "--data-root", str(train_root), "--limit", "256",
            "--batch-size", "16", "--ngf", "8", "--ndf", "8", "--log-every", "1", "--sample-every", "0",
            "--device", "cpu", "--amp", "off", "--no-channels-last", "--out", str(out), "--max-steps", "6",
            "--ddp", "--nnodes", "2", "--nproc", "1", *where]


def _two_nodes(first: list[str], second: list[str]) -> list[subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "GANTRAIN_DATA"}
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for args in (first, second)]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.communicate()
    return done


def _check_one_run(out: Path, done: list[subprocess.CompletedProcess]) -> None:
    for proc in done:
        assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_d" in r] == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    assert records[-1] == {"step": 6, "ddp_replica_max_abs_diff": 0.0}
    assert "batch 16 x 2 processes = 32" in (out / "train.log").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_00000006.pt"]
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (state["position"]["step"], state["run"]["world_size"], state["position"]["images_seen"]) == (6, 2, 6 * 32)
    ranks = state["gan"]["rng"]["ranks"]
    assert len(ranks) == 2  # each rank's noise stream, for an exact resume
    assert not torch.equal(ranks[0]["noise"], ranks[1]["noise"])
    assert sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")) == \
        ["config.toml", "final.png", "losses.png", "metrics.jsonl", "progress.gif", "train.log"]


def test_two_nodes_through_the_static_master_address(train_root, tmp_path):
    out, port = tmp_path / "run", str(free_port())
    done = _two_nodes(_node(train_root, out, "--node-rank", "0", "--master-port", port),
                      _node(train_root, out, "--node-rank", "1", "--master-port", port))
    _check_one_run(out, done)


def test_two_nodes_through_a_c10d_rendezvous(train_root, tmp_path):
    out, endpoint = tmp_path / "run", f"127.0.0.1:{free_port()}"
    done = _two_nodes(_node(train_root, out, "--rdzv-endpoint", endpoint, "--rdzv-id", "pair"),
                      _node(train_root, out, "--rdzv-endpoint", endpoint, "--rdzv-id", "pair"))
    _check_one_run(out, done)
