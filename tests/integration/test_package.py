"""The built wheel: package data (the shipped extractors, measured.json), the LICENSE, one version."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import gantrain

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_carries_the_package_data_the_license_and_the_version(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", reason="building the wheel without isolation needs setuptools in this venv")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "--no-deps", "--no-build-isolation",
                           "-w", str(tmp_path)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("pip is not installed in this environment")
    assert done.returncode == 0, done.stderr[-2000:]
    wheel = next(tmp_path.glob("gantrain-*.whl"))
    assert wheel.name.startswith(f"gantrain-{gantrain.__version__}-")  # the version defined once, in __init__
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(p.name for p in (REPO / "gantrain" / "resources" / "extractors").iterdir())
    for name in ["measured.json", *(f"extractors/{s}" for s in shipped)]:
        assert f"gantrain/resources/{name}" in names, name
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert f"Version: {gantrain.__version__}" in metadata and "License-Expression: MIT" in metadata
