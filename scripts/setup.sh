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
# With the fid extra: clean-fid's resize code, which the tests of --inception-mode clean compare against. Without
# its dependencies: they include torchvision (a CUDA build from the registry); cleanfid.resize needs only torch,
# numpy and Pillow.
if [[ ",${EXTRAS:-}," == *",fid,"* ]]; then
  "$VENV/bin/python" -m pip install -q --no-deps "clean-fid==0.1.35"
fi
echo "gantrain installed in $VENV ($("$VENV/bin/gantrain" --version))"
