"""GPU readiness in one command: everything gantrain does only on CUDA, run once, into one JSON report.

    scripts/gpu-check.sh --data-root ../shared/datasets [--out gpu-check] [--dry-run]

On a CUDA machine it runs, in order (each step bounded, so the whole stays under 10 minutes on one GPU):
the GPU tests (pytest -m gpu); `gantrain bench --quick` for fashion32 and cats64; short `gantrain run`s of
fashion32 and cats64 with AMP fp16, AMP bf16, channels-last, torch.compile, CUDA graphs and (cats64, an image
folder) DALI mixed decode on the GPU, each reporting its images/s and exit; a 2-GPU DDP run when there are two
GPUs (its replicas must agree). It writes ``<out>/report.json``: the machine, each step's command, exit code,
seconds, figures and the last lines of its output; the script exits 1 when any step failed.

``--dry-run`` runs nothing: it writes the same report with every step planned (status "planned"), so the plan
is checked (tests/cli/test_gpu_check.py: every command's flags exist) on machines without a GPU. Nothing here has
been run on a GPU by its author; the first real run is the check of the check.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GANTRAIN = [sys.executable, "-m", "gantrain"]
STEP_TIMEOUT_S = {"tests": 180, "bench": 90, "run": 45, "ddp": 90}
# Short runs: enough steps past compile/graph capture for a steady images/s in the last log record.
RUN_STEPS = 60


def plan(data_root: str, out: Path, gpus: int) -> list[dict]:
    steps = [{"name": "gpu tests", "kind": "tests",
              "command": [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]}]
    for preset in ("fashion32", "cats64"):
        steps.append({"name": f"bench {preset}", "kind": "bench",
                      "command": [*GANTRAIN, "bench", "--preset", preset, "--data-root", data_root, "--limit", "2048",
                                  "--device", "cuda", "--quick", "--json", str(out / f"bench-{preset}.json")]})
    variants = {
        "amp fp16": ["--amp", "fp16"],
        "amp bf16": ["--amp", "bf16"],
        "amp bf16 + channels-last": ["--amp", "bf16", "--channels-last"],
        "amp bf16 + channels-last + compile": ["--amp", "bf16", "--channels-last", "--compile"],
        "amp bf16 + channels-last + cuda graphs": ["--amp", "bf16", "--channels-last", "--cuda-graphs"],
    }
    for preset in ("fashion32", "cats64"):
        runs = dict(variants)
        if preset == "cats64":
            runs["amp bf16 + dali mixed decode"] = ["--amp", "bf16", "--loader", "dali", "--dali-device", "gpu"]
        for label, flags in runs.items():
            folder = out / "runs" / f"{preset}-{label.replace(' + ', '-').replace(' ', '-')}"
            steps.append({"name": f"run {preset} {label}", "kind": "run", "out": str(folder),
                          "command": [*GANTRAIN, "run", "--preset", preset, "--data-root", data_root, "--limit", "4096",
                                      "--device", "cuda", "--max-steps", str(RUN_STEPS), "--log-every", "20",
                                      "--sample-every", "0", "--out", str(folder), *flags]})
    if gpus >= 2:
        folder = out / "runs" / "fashion32-ddp2"
        steps.append({"name": "run fashion32 DDP x2 (NCCL)", "kind": "ddp", "out": str(folder),
                      "command": [*GANTRAIN, "run", "--preset", "fashion32", "--data-root", data_root, "--limit",
                                  "4096", "--device", "cuda", "--max-steps", str(RUN_STEPS), "--log-every", "20",
                                  "--sample-every", "0", "--out", str(folder), "--ddp", "--nproc", "2",
                                  "--master-port", "29561"]})
    return steps


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                    gpu_names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    except Exception as exc:  # noqa: BLE001 - the report says what could not be read
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    return info


def figures(step: dict) -> dict:
    """What a finished step measured: the last logged images/s of a run, the replica check of a DDP run."""
    if "out" not in step:
        return {}
    try:
        lines = (Path(step["out"]) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return {}
    records = [json.loads(line) for line in lines]
    found = {}
    speeds = [r["images_per_s"] for r in records if "images_per_s" in r]
    if speeds:
        found["images_per_s"] = speeds[-1]
    for r in records:
        if "ddp_replica_max_abs_diff" in r:
            found["ddp_replica_max_abs_diff"] = r["ddp_replica_max_abs_diff"]
    return found


def run_step(step: dict) -> dict:
    start = time.monotonic()
    try:
        done = subprocess.run(step["command"], capture_output=True, text=True, timeout=STEP_TIMEOUT_S[step["kind"]])
        code, output = done.returncode, (done.stdout + done.stderr)
    except subprocess.TimeoutExpired as exc:
        code, output = None, f"timed out after {exc.timeout} s"
    result = {**step, "status": "passed" if code == 0 else "failed", "exit_code": code,
              "seconds": round(time.monotonic() - start, 1), "output_tail": output[-2000:], **figures(step)}
    if step["kind"] == "ddp" and result.get("ddp_replica_max_abs_diff", 0.0) != 0.0:
        result["status"] = "failed"  # the replicas drifted apart: a silent wrong result, reported as a failure
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("GANTRAIN_DATA", "../shared/datasets"))
    parser.add_argument("--out", type=Path, default=Path("gpu-check"))
    parser.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs (default: those present)")
    parser.add_argument("--dry-run", action="store_true", help="write the plan as the report; run nothing")
    args = parser.parse_args(argv)
    info = machine()
    gpus = args.gpus if args.gpus is not None else int(info.get("gpus") or 0)
    if not args.dry_run and gpus == 0:
        print("error: no CUDA GPU here (torch.cuda.device_count() is 0); --dry-run shows the plan", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    steps, results, started = plan(args.data_root, args.out, gpus), [], time.monotonic()
    for step in steps:
        if args.dry_run:
            results.append({**step, "status": "planned"})
            continue
        print(f"gpu-check: {step['name']} ...", file=sys.stderr, flush=True)
        results.append(run_step(step))
        print(f"gpu-check: {step['name']}: {results[-1]['status']} ({results[-1]['seconds']} s)", file=sys.stderr)
    failed = [r["name"] for r in results if r["status"] == "failed"]
    report = {"machine": info, "dry_run": args.dry_run, "seconds": round(time.monotonic() - started, 1),
              "failed": failed, "steps": results}
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"gpu-check: {len(results)} steps, {len(failed)} failed; report: {args.out / 'report.json'}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
