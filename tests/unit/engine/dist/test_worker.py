"""The worker's outcome record and the ranks' agreement on a refusal (two gloo processes on this machine)."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from gantrain.engine.dist.runtime import StopAgreement
from gantrain.engine.dist.worker import WorkerRecord, first_refusal
from gantrain.engine.errors import (CheckpointError, ConfigError, DataNotFound, GantrainError, Interrupted, LostPeers,
                                    RunLocked, rebuild)


def test_rebuild_keeps_the_class_the_message_and_the_exit_code() -> None:
    for cls, code in ((ConfigError, 2), (RunLocked, 2), (DataNotFound, 2), (CheckpointError, 1)):
        error = rebuild(cls.__name__, "the message", code)
        assert type(error) is cls and str(error) == "the message" and error.exit_code == code
    unknown = rebuild("KeyError", "x", 7)  # not gantrain's: a plain GantrainError, never another class
    assert type(unknown) is GantrainError and unknown.exit_code == 7
    stop = rebuild("Interrupted", "x", 143)  # a signal stays a signal, never a refusal
    assert type(stop) is Interrupted and stop.signum == 15 and not stop.final
    assert not rebuild("LostPeers", "x", 1, final=False).final


def test_which_errors_are_final() -> None:
    assert ConfigError("x").final and DataNotFound("x").final and RunLocked("x").final
    assert not LostPeers("x").final and not Interrupted(2).final


def test_records_round_trip_in_rank_order_and_skip_torn_files(tmp_path: Path) -> None:
    WorkerRecord(1, "refused", "ConfigError", "--batch-size: too big", 2).write(tmp_path)
    WorkerRecord(0, "stopped", step=12, checkpoint="/r/last.pt", signal=15).write(tmp_path)
    (tmp_path / "rank_2.json").write_text('{"rank": 2, "outc')  # a kill mid-write (atomic writes never do)
    records = WorkerRecord.read_all(tmp_path)
    assert [r.rank for r in records] == [0, 1]
    assert records[0].step == 12 and records[0].signal == 15
    refused = first_refusal(records)
    assert refused is not None and refused.rank == 1
    error = refused.error()
    assert isinstance(error, ConfigError) and error.exit_code == 2 and str(error) == "--batch-size: too big"


def _agree(rank: int, world: int, port: int, refuse_on: tuple[int, ...], results: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    agreement = StopAgreement(True)
    try:
        with agreement.refusals():
            if rank in refuse_on:
                raise (ConfigError if rank == refuse_on[0] else DataNotFound)(f"refused on rank {rank}")
        outcome = "went on"
    except GantrainError as exc:
        outcome = f"{type(exc).__name__}|{exc}|{exc.exit_code}"
    finally:
        dist.destroy_process_group()
    (results / f"{rank}.txt").write_text(outcome)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="gloo over TCP on Linux")
@pytest.mark.parametrize("refuse_on, expected", [
    ((), ["went on"] * 3),
    ((2,), ["ConfigError|refused on rank 2|2"] * 3),  # one rank alone: every rank raises its error
    ((1, 2), ["ConfigError|refused on rank 1|2", "ConfigError|refused on rank 1|2",  # the lowest refusing rank's
              "DataNotFound|refused on rank 2|2"]),  # a rank that refused itself raises its own
])
def test_every_rank_raises_the_refusal_any_rank_met(tmp_path: Path, refuse_on, expected) -> None:
    from processes import free_port

    mp.start_processes(_agree, args=(3, free_port(), refuse_on, tmp_path), nprocs=3, start_method="spawn")
    assert [(tmp_path / f"{r}.txt").read_text() for r in range(3)] == expected


def test_without_ddp_the_refusal_is_raised_as_it_is() -> None:
    with pytest.raises(ConfigError, match="alone"):
        with StopAgreement(False).refusals():
            raise ConfigError("alone")
    with StopAgreement(False).refusals():
        pass
