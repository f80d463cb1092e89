#!/usr/bin/env bash
# Creates .venv with gantrain and its test tools. Torch goes in first and pinned: an unpinned torch
# (or one pulled in by another package) would fetch the CUDA build, several GB. EXTRAS adds optional
# extras, comma-separated: EXTRAS=dali installs NVIDIA DALI (nvidia-dali-cuda120, about 420 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VENV/bin/python" -m pip install -q -e ".[dev${EXTRAS:+,$EXTRAS}]"
echo "gantrain installed in $VENV ($("$VENV/bin/gantrain" --version))"
