"""examples/fashion_quickstart.ipynb runs end to end (on tiny settings), so it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_quickstart_notebook_runs_and_shows_its_pictures(tmp_path: Path, train_root: Path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat", reason="nbformat (the dev extra) is absent")
    nbclient = pytest.importorskip("nbclient", reason="nbclient (the dev extra) is absent")
    pytest.importorskip("ipykernel", reason="ipykernel (the dev extra) is absent")
    tiny = {"max_steps": 4, "limit": 256, "batch_size": 32, "ngf": 16, "ndf": 16, "eval_every": 0,
            "sample_every": 2, "amp": "off", "device": "cpu", "out": str(tmp_path / "run")}
    monkeypatch.setenv("GANTRAIN_NOTEBOOK", json.dumps(tiny))
    monkeypatch.setenv("GANTRAIN_DATA", str(train_root))
    notebook = nbformat.read(REPO / "examples" / "fashion_quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # final grid, loss curve, the sampled grid
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"4 steps in {tmp_path / 'run'}" in text and "Generator trained at 32 px" in text
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
