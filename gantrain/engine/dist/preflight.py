"""The refusals of a multi-process run (``--ddp``, a local ``--ray``) made in the launcher, before any worker starts.

A refusal that is a property of the config, the data or the checkpoint would meet every worker again after every
restart: the elastic agent would restart the group ``--max-restarts`` times and the user would read the same error
once per worker per attempt. :func:`preflight` asks the same questions a single process asks (the same functions,
so the same ``error:`` line and exit code) in the launcher itself, in a second or two.
"""

from __future__ import annotations

import errno
import socket

from gantrain.engine.config import Config
from gantrain.engine.data.plan import plan_schedule, steps_per_epoch
from gantrain.engine.dist.runtime import pick_device
from gantrain.engine.errors import ConfigError
from gantrain.engine.outputs.writer import RunOutputs
from gantrain.engine.state.checkpoint import Position, open_resume, restore_position
from gantrain.engine.state.files import RunLock
from gantrain.engine.state.rundir import RunDir, own_checkpoint
from gantrain.engine.train.dryrun import count_images


def world_size(cfg: Config) -> int:
    """The processes a launch starts: --nproc x --nnodes under --ddp, --ray-workers under --ray, else 1."""
    if cfg.dist.ray:
        return cfg.dist.ray_workers
    return cfg.dist.nproc * cfg.dist.nnodes if cfg.dist.ddp else 1


def preflight(cfg: Config, resume: str | None) -> None:
    """Raises what the run's first worker would raise for a reason no restart cures, else returns: SyncBatchNorm
    off CUDA (:class:`ConfigError`); a checkpoint to resume that is missing, damaged or built for another model
    (:class:`CheckpointError`); on a one-node launch, a new run into a folder that holds one (not under --ray,
    which continues from Ray Train's checkpoint), a --logger whose extra is missing, the folder in use by another
    run (:class:`RunLocked`); on the node that hosts a --ddp launch's store, a --master-port in use
    (:class:`ConfigError`); fewer images than one global batch, or a resumed run with no step left
    (:class:`ConfigError`). Data the launcher cannot see (an IDX dataset not downloaded yet) is left to the
    workers; so is everything about the run folder on a multi-node launch (rank 0's node may be another)."""
    if cfg.dist.sync_bn and pick_device(cfg.run.device).type != "cuda":
        raise ConfigError("--sync-bn: SyncBatchNorm needs CUDA (it is not implemented for the CPU)")
    require_free_port(cfg)
    resume_path, state, _ = open_resume(cfg, resume)
    if cfg.dist.nnodes == 1:  # the run folder's owner (rank 0) is on this node
        lock = RunLock(cfg.run_dir)  # first, as the Trainer does: a folder in use is that, whatever it holds
        lock.take(lambda _note: None)  # RunLocked when a live run owns the folder; the worker takes it again
        lock.abandon()
        # under --ray a relaunch continues from the checkpoint Ray Train kept, as if resumed
        RunOutputs.check(cfg, resuming=state is not None or cfg.dist.ray)
    images, _ = count_images(cfg)
    if images is None:
        return
    world = world_size(cfg)
    per_epoch = steps_per_epoch(images, cfg.data.batch_size, world, cfg.data.limit)
    global_batch = cfg.data.batch_size * world
    pos = Position() if state is None else restore_position(state, cfg, per_epoch, global_batch, images,
                                                             resume_path)[0]
    # a finished run whose final outputs are missing is resumed to write them (the Trainer's rule)
    cut_short = (state is not None and own_checkpoint(cfg.run_dir, resume_path)
                 and bool(RunDir(cfg.run_dir).missing_final_outputs()))
    plan_schedule(pos, cfg, per_epoch, cfg.run_dir, cut_short)


def require_free_port(cfg: Config) -> None:
    """On the node that hosts a ``--ddp`` launch's store (static rendezvous, --node-rank 0: this machine), refuses a
    --master-port another process listens on here (the store binds it on every interface), before anything is
    measured or started."""
    d = cfg.dist
    if not d.ddp or d.ray or d.rdzv_endpoint or d.node_rank != 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is no refusal
        try:
            probe.bind(("", d.master_port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"--master-port: port {d.master_port} on {d.master_addr} is already in use "
                                  "(another DDP run?); choose a free one with --master-port") from None
