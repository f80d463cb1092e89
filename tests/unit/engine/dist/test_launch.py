"""The launcher's one line for a failed DDP job (gantrain.engine.dist.launch._failed), from the workers' exit
codes and records, worked out by hand."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

from gantrain.engine.config import override, preset
from gantrain.engine.dist.launch import _failed
from gantrain.engine.dist.worker import WorkerRecord


def _job(codes: dict[int, int]) -> SimpleNamespace:
    return SimpleNamespace(failures={rank: SimpleNamespace(exitcode=code) for rank, code in codes.items()})


def test_the_rank_that_failed_is_named_not_the_one_that_lost_its_peers(tmp_path: Path) -> None:
    """Rank 1 crashed (its DataLoader worker killed: exit 1, no record of its own); rank 0's next collective failed
    (gloo: connection closed), recorded as LostPeers, also exit 1. The line blamed rank 0, the lower rank, and said
    "no checkpoint of this step" twice."""
    cfg = override(preset("fashion32"), {"out": str(tmp_path / "run"), "max_restarts": 0})
    WorkerRecord(0, "failed", "LostPeers", "rank 0: lost the other DDP workers at step 73 (Connection closed by "
                 "peer); no checkpoint of this step", 1, step=73).write(tmp_path)
    message = str(_failed(tmp_path, _job({0: 1, 1: 1}), cfg))
    assert message.startswith("DDP worker rank 1 exited with code 1 (its own message, if any, is above); the "
                              "launcher stopped the others"), message
    assert message.count("no checkpoint of this step") == 1
    # with rank 1's own record (a GantrainError), the line carries its message
    WorkerRecord(1, "failed", "RunIOError", "cannot write x: disk full", 1, step=73).write(tmp_path)
    assert str(_failed(tmp_path, _job({0: 1, 1: 1}), cfg)).startswith(
        "DDP worker rank 1 exited with code 1: cannot write x: disk full; the launcher stopped the others")
    # a rank killed by a signal comes first; the agent's SIGTERM to the survivors is its own doing
    message = str(_failed(tmp_path, _job({0: -signal.SIGTERM, 1: -signal.SIGKILL}), cfg))
    assert message.startswith("DDP worker rank 1 was killed by SIGKILL"), message


def test_torchruns_agent_leaves_sighup_alone_under_nohup(monkeypatch) -> None:
    """The agent catches SIGHUP by default (TORCHELASTIC_SIGNALS_TO_HANDLE) and stops the workers: under nohup a
    `--ddp` run would end at the hang-up nohup was meant to survive."""
    from gantrain.engine.dist.launch import agent_signals

    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    assert agent_signals() == "SIGINT,SIGTERM,SIGHUP,SIGQUIT"
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
    assert agent_signals() == "SIGINT,SIGTERM,SIGQUIT"
