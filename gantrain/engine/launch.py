"""Starting a training run: in this process, or as N processes under torch's elastic launcher (torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from gantrain.engine.config import Config, to_toml
from gantrain.engine.errors import GantrainError
from gantrain.engine.runlog import log
from gantrain.engine.loop import FitResult, Interrupted, Trainer
from gantrain.engine.runtime import init_distributed, launched_by_torchrun, shutdown_distributed


class RunInterrupted(GantrainError):
    """Raised to the CLI after a signal: the message says where the checkpoint is."""


def torchrun_command(cfg: Config, config_file: Path, resume: str | None) -> list[str]:
    """The torchrun invocation whose workers run ``gantrain run`` on the resolved config file."""
    d = cfg.dist
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={d.nproc}", f"--nnodes={d.nnodes}",
               f"--node-rank={d.node_rank}", f"--master-addr={d.master_addr}", f"--master-port={d.master_port}",
               "-m", "gantrain", "run", "--config", str(config_file)]
    return command + (["--resume", resume] if resume else [])


def launch_workers(cfg: Config, resume: str | None) -> None:
    """Runs torchrun and waits; each worker reads the whole resolved config, so no flag is parsed twice."""
    with tempfile.TemporaryDirectory(prefix="gantrain-launch-") as tmp:
        config_file = Path(tmp) / "config.toml"
        config_file.write_text(to_toml(cfg))
        threads = max(1, (os.cpu_count() or 1) // cfg.dist.nproc)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        code = subprocess.call(torchrun_command(cfg, config_file, resume), env=env)
    if code != 0:
        raise GantrainError(f"distributed run failed (torchrun exit code {code}); the workers' errors are above")


def train(cfg: Config, *, resume: str | None = None, console: Console | None = None) -> FitResult | None:
    """Trains ``cfg``. With --ddp outside torchrun, launches the workers and waits for them."""
    if cfg.dist.ddp and not launched_by_torchrun():
        launch_workers(cfg, resume)
        return None
    info = init_distributed(cfg.run.device)
    try:
        trainer = Trainer(cfg, console=console, dist_info=info, resume=resume)
        try:
            return trainer.fit()
        except Interrupted as exc:
            where = f"checkpoint saved to {exc.checkpoint}" if exc.checkpoint else "no checkpoint (no step done)"
            log.warning("interrupted at step %d: %s; continue with --resume auto", trainer.step, where)
            error = RunInterrupted(f"interrupted at step {trainer.step}; {where}")
            error.exit_code = exc.exit_code
            raise error from None
    finally:
        shutdown_distributed()
