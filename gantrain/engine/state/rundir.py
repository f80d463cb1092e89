"""The run folder's layout: every file and folder a run writes, spelled once.

The Trainer, the outputs, checkpoints, trackers, the launchers, Ray Train and tune ask a :class:`RunDir` for a
path; none of them spells a file name. The README's "The run folder" section draws this layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_NUMBERED_CHECKPOINT = re.compile(r"^step_(\d+)\.pt$")
_SAMPLE_GRID = re.compile(r"^step_(\d+)\.png$")


@dataclass(frozen=True)
class RunDir:
    """The files of the run folder ``root`` (``--out``). Paths only: nothing is created or read here."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # ----- written once or rewritten whole by rank 0 -----------------------------------------------------------
    @property
    def lock(self) -> Path:
        """``.gantrain.lock``: pid, host and start time of the process that owns the folder."""
        return self.root / ".gantrain.lock"

    @property
    def config(self) -> Path:
        """``config.toml``: the resolved config (``--config`` loads it again)."""
        return self.root / "config.toml"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def metrics(self) -> Path:
        """``metrics.jsonl``: one strict-JSON record per log step and per evaluation."""
        return self.root / "metrics.jsonl"

    @property
    def final_grid(self) -> Path:
        return self.root / "final.png"

    @property
    def losses_plot(self) -> Path:
        return self.root / "losses.png"

    @property
    def metrics_plot(self) -> Path:
        """``metrics.png``: the quality metrics against the step, one axis per scale (``--eval-every``)."""
        return self.root / "metrics.png"

    @property
    def gif(self) -> Path:
        return self.root / "progress.gif"

    @property
    def final_outputs(self) -> list[Path]:
        """What the end of a run writes (``RunOutputs.write_final``): final.png, losses.png, progress.gif."""
        return [self.final_grid, self.losses_plot, self.gif]

    def missing_final_outputs(self) -> list[str]:
        """The names of :attr:`final_outputs` not in the folder (a run stopped while writing them)."""
        return [path.name for path in self.final_outputs if not path.is_file()]

    # ----- sample grids -------------------------------------------------------------------------------------
    @property
    def samples(self) -> Path:
        return self.root / "samples"

    def sample_grid(self, step: int) -> Path:
        """``samples/step_000500.png``: the fixed-noise grid after ``step`` optimiser updates."""
        return self.samples / f"step_{step:06d}.png"

    def sample_grids(self) -> list[Path]:
        """The sample grids present, by step."""
        found = [p for p in self.samples.glob("step_*.png") if _SAMPLE_GRID.match(p.name)]
        return sorted(found, key=self.grid_step)

    @staticmethod
    def grid_step(path: Path) -> int | None:
        """The step of a sample grid's file (``samples/step_000500.png`` -> 500); None for another file."""
        found = _SAMPLE_GRID.match(Path(path).name)
        return int(found.group(1)) if found else None

    # ----- checkpoints --------------------------------------------------------------------------------------
    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        """``checkpoints/last.pt``: the newest checkpoint (what ``--resume auto`` continues from)."""
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        """``checkpoints/best.pt``: the checkpoint with the lowest FD so far (``--eval-every``)."""
        return self.checkpoints / "best.pt"

    def numbered(self, step: int) -> Path:
        """``checkpoints/step_00000468.pt``."""
        return self.checkpoints / f"step_{step:08d}.pt"

    def numbered_checkpoints(self) -> list[Path]:
        """The numbered checkpoints present, oldest step first."""
        found = [p for p in self.checkpoints.glob("step_*.pt") if _NUMBERED_CHECKPOINT.match(p.name)]
        return sorted(found, key=lambda p: int(_NUMBERED_CHECKPOINT.match(p.name).group(1)))  # type: ignore[union-attr]

    # ----- experiment trackers (--logger) ---------------------------------------------------------------------
    @property
    def trackers(self) -> Path:
        """``trackers.json``: each tracker's run id (and MLflow's URI), so a resume continues the same runs."""
        return self.root / "trackers.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def wandb(self) -> Path:
        return self.root / "wandb"


    # ----- --profile-steps ----------------------------------------------------------------------------------------
    @property
    def profile(self) -> Path:
        """``profile/``: the torch.profiler trace of --profile-steps and its table of the costliest ops (their
        names: :class:`~gantrain.engine.train.profile.StepProfiler`)."""
        return self.root / "profile"


def own_checkpoint(run_dir: Path | str, checkpoint: Path | str | None) -> bool:
    """Whether ``checkpoint`` is one of the run folder's own (in its checkpoints/), not another run's."""
    if checkpoint is None:
        return False
    try:
        return Path(checkpoint).resolve().parent == RunDir(run_dir).checkpoints.resolve()
    except OSError:
        return False
