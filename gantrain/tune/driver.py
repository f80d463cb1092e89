"""The Ray driver process of ``gantrain tune`` (see :func:`gantrain.tune.experiment.run_driver_process`):
``python -m gantrain.tune.driver FOLDER new|resume STORAGE`` runs the experiment prepared in FOLDER."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console


def main(argv: list[str]) -> int:
    from gantrain.cli import fail, finish_tune
    from gantrain.engine import GantrainError
    from gantrain.tune.experiment import ExperimentFolder, run_prepared

    folder, mode, storage = argv
    console = Console(stderr=True)
    try:
        outcome = run_prepared(ExperimentFolder(Path(folder)), resume=mode == "resume", console=console)
        finish_tune(outcome, storage, Path(folder).name)
    except GantrainError as exc:
        return fail(str(exc), exc.exit_code).exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
