"""The run folder's layout (RunDir): the names the README draws, numeric order of numbered files."""

from __future__ import annotations

from pathlib import Path

from paths import REPO
from gantrain.engine.state.rundir import RunDir


def test_every_file_is_where_the_readme_draws_it(tmp_path: Path) -> None:
    files = RunDir(tmp_path)
    drawn = {files.lock: ".gantrain.lock", files.config: "config.toml", files.log: "train.log",
             files.metrics: "metrics.jsonl", files.sample_grid(500): "samples/step_000500.png",
             files.last: "checkpoints/last.pt", files.best: "checkpoints/best.pt",
             files.numbered(468): "checkpoints/step_00000468.pt", files.final_grid: "final.png",
             files.losses_plot: "losses.png", files.metrics_plot: "metrics.png", files.gif: "progress.gif",
             files.trackers: "trackers.json", files.tensorboard: "tb", files.mlflow_db: "mlflow.db"}
    assert {str(p.relative_to(tmp_path)): name for p, name in drawn.items()} == {n: n for n in drawn.values()}
    readme = (REPO / "README.md").read_text()
    for name in drawn.values():
        assert Path(name).name in readme, name


def test_numbered_files_are_listed_by_step_not_as_text(tmp_path: Path) -> None:
    """step_1000000.png sorts before step_999999.png as text; the run's GIF and pruning need the step order."""
    files = RunDir(tmp_path)
    files.samples.mkdir(parents=True)
    files.checkpoints.mkdir()
    for step in (999_999, 1_000_000, 5):
        files.sample_grid(step).write_bytes(b"")
    for step in (100_000_000, 99_999_999, 7):
        files.numbered(step).write_bytes(b"")
    (files.samples / "step_x.png").write_bytes(b"")  # not a grid of this run
    (files.checkpoints / "step_12.pt.tmp").write_bytes(b"")
    assert [p.name for p in files.sample_grids()] == ["step_000005.png", "step_999999.png", "step_1000000.png"]
    assert [p.name for p in files.numbered_checkpoints()] == ["step_00000007.pt", "step_99999999.pt",
                                                              "step_100000000.pt"]


def test_an_empty_folder_has_no_grids_or_checkpoints(tmp_path: Path) -> None:
    files = RunDir(tmp_path / "absent")
    assert files.sample_grids() == [] and files.numbered_checkpoints() == []
