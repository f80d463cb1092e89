#!/usr/bin/env bash
# GPU readiness in one command (see scripts/gpu_check.py): GPU tests, a bench and run matrix, 2-GPU DDP when
# there are two GPUs, one JSON report. Run from the repository root: scripts/gpu-check.sh --data-root DIR
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" scripts/gpu_check.py "$@"
