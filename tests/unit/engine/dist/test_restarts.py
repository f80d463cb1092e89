"""What the launcher learns when torch's elastic agent restarts the worker group, without a DDP run: how a child
ended, from waitid without reaping it (compared with what Popen reads afterwards); which worker ended the group;
the agent's metrics, fed as the agent emits them and, once, from a real agent over two tiny processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import free_port
from torch.distributed.elastic import metrics

from gantrain.engine.dist.launch import RESTART_FILE, _restart_notices
from gantrain.engine.dist.restarts import (AGENT_METRICS_GROUP, ExitWatch, RestartMetrics, WorkerExit, WorkerStart,
                                           cause, hearing_restarts)
from gantrain.engine.dist.worker import WorkerRecord

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waitid on Linux")


def _agent_polls(*procs: subprocess.Popen) -> None:
    """Reaps ``procs`` as torch's agent does: Popen.poll every 0.1 s (--monitor-interval)."""
    deadline = time.monotonic() + 20
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline
        time.sleep(0.1)


@linux
def test_the_watch_reads_how_each_child_ended_and_leaves_it_for_popen_to_reap(tmp_path: Path) -> None:
    killed = subprocess.Popen(["/bin/sh", "-c", "read x"], stdin=subprocess.PIPE)
    exits_3 = subprocess.Popen(["/bin/sh", "-c", "read x; exit 3"], stdin=subprocess.PIPE)
    WorkerStart(0, 0, killed.pid, 0).write(tmp_path)
    WorkerStart(1, 1, exits_3.pid, 0).write(tmp_path)
    with ExitWatch(tmp_path) as watch:
        watch.scan()  # the waiting threads start here (the watch's own thread would, within 0.05 s)
        killed.kill()
        time.sleep(0.2)
        exits_3.stdin.close()
        _agent_polls(killed, exits_3)
        ended = watch.ended()
        assert watch.ended(timeout_s=0) == []  # handed out once
    killed.stdin.close()
    assert (killed.returncode, exits_3.returncode) == (-signal.SIGKILL, 3)  # Popen still reaped them itself
    assert [(e.start.rank, e.code) for e in ended] == [(0, -signal.SIGKILL), (1, 3)]  # in the order they ended
    assert ended[0].at < ended[1].at
    assert cause(ended, []) is ended[0]


@linux
def test_a_child_reaped_before_it_was_watched_ended_without_a_record_unless_its_own_record_says(tmp_path) -> None:
    proc = subprocess.Popen(["/bin/sh", "-c", "exit 4"])
    proc.wait()  # reaped: nothing left to observe
    WorkerStart(1, 1, proc.pid, 2).write(tmp_path)
    with ExitWatch(tmp_path) as watch:
        ended = watch.ended()
    assert [(e.start, e.code, e.at) for e in ended] == [(WorkerStart(1, 1, proc.pid, 2), None, None)]
    assert cause(ended, []).code is None  # the launcher's line: "... ended without a record"
    failed = WorkerRecord(1, "failed", "CheckpointError", "cannot write", 4, attempt=2)
    assert cause(ended, [failed]).code == 4
    assert cause(ended, [WorkerRecord(1, "finished", attempt=2)]) is None
    assert cause(ended, [WorkerRecord(1, "finished", attempt=1)]).code is None  # another attempt's record


def test_the_cause_is_the_first_worker_that_failed_by_itself() -> None:
    def ended(rank: int, code: int | None, at: float | None) -> WorkerExit:
        return WorkerExit(WorkerStart(rank, rank, 100 + rank, 1), code, at)

    lost = WorkerRecord(0, "failed", "LostPeers", "rank 0: lost the other DDP workers", 1, attempt=1)
    agent_term, lost_peers, killed = ended(2, -signal.SIGTERM, 1.0), ended(0, 1, 2.0), ended(1, -signal.SIGKILL, 3.0)
    assert cause([agent_term, lost_peers, killed], [lost]) is killed
    assert cause([agent_term, lost_peers, ended(3, 0, 2.5)], [lost]) is agent_term  # none by itself: the first
    unseen = ended(1, None, None)
    assert cause([lost_peers, unseen], [lost]) is unseen
    assert cause([], []) is None


def test_worker_start_records_round_trip_and_skip_torn_files(tmp_path: Path, monkeypatch) -> None:
    for key, value in {"RANK": "5", "LOCAL_RANK": "1", "TORCHELASTIC_RESTART_COUNT": "2"}.items():
        monkeypatch.setenv(key, value)
    mine = WorkerStart.of_this_process()
    mine.write(tmp_path)
    (tmp_path / "started_7.json").write_text('{"rank": 7, "lo')
    WorkerRecord(5, "failed").write(tmp_path)  # the outcome records live beside them
    assert WorkerStart.read_all(tmp_path) == [mine] and mine.rank == 5 and mine.local_rank == 1 and mine.attempt == 2
    WorkerStart(0, 0, 1, 0).write(tmp_path / "gone")  # best effort: no folder, no error


@linux
def test_the_watch_reads_a_ranks_record_again_when_a_restarted_worker_replaces_it(tmp_path: Path) -> None:
    first, second = (subprocess.Popen(["/bin/sh", "-c", "exit 0"]) for _ in range(2))
    watch = ExitWatch(tmp_path)
    WorkerStart(0, 0, first.pid, 0).write(tmp_path)
    watch.scan()
    watch.scan()  # unchanged: not read again
    WorkerStart(0, 0, second.pid, 1).write(tmp_path)
    watch.scan()
    ended = watch.ended()
    _agent_polls(first, second)
    assert sorted((e.start.attempt, e.start.pid, e.code) for e in ended) == [(0, first.pid, 0), (1, second.pid, 0)]


def _agent_tick(role: str, remaining: int, state: str) -> list[metrics.MetricData]:
    """What SimpleElasticAgent._invoke_run puts after each poll of its workers."""
    return [metrics.MetricData(0.0, AGENT_METRICS_GROUP, f"workers.{role}.remaining_restarts", remaining),
            metrics.MetricData(0.0, AGENT_METRICS_GROUP, f"workers.{role}.{state}", 1)]


def test_the_restart_metrics_say_each_restart_and_pass_every_metric_on() -> None:
    heard, passed = [], []

    class Previous(metrics.MetricHandler):
        def emit(self, metric_data):
            passed.append(metric_data)

    handler = RestartMetrics("default", 3, lambda restart, most: heard.append((restart, most)), Previous())
    stream = [*_agent_tick("default", 3, "healthy"), *_agent_tick("default", 3, "failed"),  # restart 1 of 3
              *_agent_tick("default", 2, "healthy"), *_agent_tick("default", 2, "unhealthy"),  # restart 2 of 3
              metrics.MetricData(0.0, "torchelastic", "agent.rendezvous.duration.ms", 12),
              *_agent_tick("other", 1, "failed"),  # another role's group
              *_agent_tick("default", 1, "succeeded")]
    for metric in stream:
        handler.emit(metric)
    handler.emit(metrics.MetricData(0.0, AGENT_METRICS_GROUP, "workers.default.remaining_restarts", 0))
    handler.emit(metrics.MetricData(0.0, AGENT_METRICS_GROUP, "workers.default.failed", 1))  # no restart left
    assert heard == [(1, 3), (2, 3)]
    assert len(passed) == len(stream) + 2


def test_a_failing_notice_never_breaks_the_agents_loop(caplog) -> None:
    def broken(_restart, _most):
        raise OSError("disk full")

    handler = RestartMetrics("default", 1, broken)
    with caplog.at_level(logging.WARNING, logger="gantrain"):
        logging.getLogger("gantrain").addHandler(caplog.handler)
        try:
            for metric in _agent_tick("default", 1, "failed"):
                handler.emit(metric)
        finally:
            logging.getLogger("gantrain").removeHandler(caplog.handler)
    assert "disk full" in caplog.text


def test_hearing_restarts_replaces_the_agents_metrics_handler_and_puts_the_old_one_back() -> None:
    before = metrics.getStream(AGENT_METRICS_GROUP).handler
    heard = []
    with hearing_restarts(lambda previous: RestartMetrics("default", 2, lambda *rm: heard.append(rm), previous)):
        stream = metrics.getStream(AGENT_METRICS_GROUP)
        assert isinstance(stream.handler, RestartMetrics) and stream.handler.previous is before
        metrics.put_metric("workers.default.remaining_restarts", 2)  # as the agent puts them (its default group)
        metrics.put_metric("workers.default.failed", 1)
    assert heard == [(1, 2)]
    assert metrics.getStream(AGENT_METRICS_GROUP).handler is before
    assert AGENT_METRICS_GROUP not in metrics.api._metrics_map  # unconfigured before: the default again


WORKER = """
import json, os, signal, sys
start = {"rank": int(os.environ["RANK"]), "local_rank": int(os.environ["LOCAL_RANK"]), "pid": os.getpid(),
         "attempt": int(os.environ["TORCHELASTIC_RESTART_COUNT"])}
with open(os.path.join(sys.argv[1], "started_%d.json" % start["rank"]), "w") as f:
    json.dump(start, f)
if start["attempt"] == 0 and start["rank"] == 1:
    os.kill(os.getpid(), signal.SIGKILL)
if start["attempt"] == 0:
    signal.pause()  # until the agent stops the group
"""


@linux
def test_torchs_agent_says_its_restart_through_the_metrics_and_the_killed_worker_is_named(tmp_path, monkeypatch):
    """A real elastic agent in this process over two tiny workers (no torch in them): rank 1 kills itself with
    SIGKILL in the first attempt, the agent restarts the group once, and the launcher's line names rank 1."""
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    monkeypatch.delenv("TORCHELASTIC_SIGNALS_TO_HANDLE", raising=False)  # the agent sets these two
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    status = tmp_path / "status"
    status.mkdir()
    config, entrypoint, args = config_from_args(parse_args([
        "--nproc-per-node=2", "--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "--max-restarts=1", "--monitor-interval=0.1", f"--log-dir={tmp_path / 'elastic'}", str(script), str(status)]))
    lines, before = [], metrics.getStream(AGENT_METRICS_GROUP).handler

    class Lines(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    gantrain_log = logging.getLogger("gantrain")
    gantrain_log.addHandler(catch := Lines(logging.WARNING))
    try:
        with _restart_notices(status, config.role, config.max_restarts, by_host=False):
            elastic_launch(config, entrypoint)(*args)
    finally:
        gantrain_log.removeHandler(catch)
    restart = json.loads((status / RESTART_FILE).read_text())
    pids = {s.rank: s.pid for s in WorkerStart.read_all(status)}
    assert restart["restart"] == 1 and restart["of"] == 1
    assert restart["what"].startswith("DDP worker rank 1 (pid ") and restart["what"].endswith(
        ") was killed by SIGKILL"), restart
    assert pids[1] != int(restart["what"].split("(pid ")[1].split(")")[0])  # the killed one, not the restarted
    assert lines == [f"{restart['what']}; restarting the worker group (restart 1 of 1, --max-restarts); every rank "
                     "resumes from the run's last.pt"]
    assert metrics.getStream(AGENT_METRICS_GROUP).handler is before


def test_a_restart_whose_cause_was_on_another_node_says_so(tmp_path: Path) -> None:
    """Only followers ended here (the agent's SIGTERM; a worker that lost its peers): the line names the local one
    and says it lost its peers, rather than that it failed by itself; a worker killed here is named plainly."""
    from gantrain.engine.dist.launch import _RestartNotice

    class Watch:
        def __init__(self, *ended: WorkerExit) -> None:
            self.gone = list(ended)

        def ended(self) -> list[WorkerExit]:
            return self.gone

    _RestartNotice(tmp_path, Watch(WorkerExit(WorkerStart(2, 0, 4242, 1), -signal.SIGTERM, 1.0)), by_host=False)(2, 3)
    assert json.loads((tmp_path / RESTART_FILE).read_text()) == {
        "restart": 2, "of": 3,
        "what": "DDP worker rank 2 (pid 4242) was killed by SIGTERM after losing its peers (a worker on another node "
                "failed?)"}
    _RestartNotice(tmp_path, Watch(WorkerExit(WorkerStart(1, 1, 77, 0), -signal.SIGKILL, 1.0)), by_host=False)(1, 3)
    assert json.loads((tmp_path / RESTART_FILE).read_text())["what"] == "DDP worker rank 1 (pid 77) was killed by SIGKILL"
