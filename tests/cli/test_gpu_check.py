"""scripts/gpu-check.sh cannot run without a GPU; its plan can be checked: --dry-run writes the report with
every step planned, and every gantrain command in it must parse (an unknown flag would only show on a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from gantrain.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_plans_every_gpu_step_with_flags_that_exist(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--dry-run", "--gpus", "2", "--data-root",
                           "/data", "--out", str(tmp_path / "check")], capture_output=True, text=True, timeout=120,
                          env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "check" / "report.json").read_text())
    assert report["dry_run"] is True and report["failed"] == []
    names = [s["name"] for s in report["steps"]]
    assert names[0] == "gpu tests" and {"bench fashion32", "bench cats64", "run fashion32 DDP x2 (NCCL)"} <= set(names)
    for wanted in ("amp fp16", "amp bf16", "channels-last", "compile", "cuda graphs"):
        assert {f"run {p} " for p in ("fashion32", "cats64")} <= {n[:len(f"run {p} ")] for n in names
                                                                   for p in ("fashion32", "cats64") if wanted in n}
    assert "run cats64 amp bf16 + dali mixed decode" in names
    assert all(s["status"] == "planned" for s in report["steps"])
    runner = CliRunner()
    for step in report["steps"]:
        command = step["command"]
        if command[1:3] == ["-m", "gantrain"]:
            parsed = runner.invoke(app, [*command[3:], "--help"])
            assert parsed.exit_code == 0, (step["name"], parsed.output)


def test_one_gpu_plans_no_ddp_and_no_gpu_refuses_in_one_line(tmp_path):
    plan = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--gpus", "1", "--out",
                           str(tmp_path / "one")], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert not any("DDP" in s["name"] for s in json.loads((tmp_path / "one" / "report.json").read_text())["steps"])
    real = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--gpus", "0", "--out",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert real.returncode == 2 and real.stderr.startswith("error: no CUDA GPU here")
    assert len(real.stderr.strip().splitlines()) == 1
