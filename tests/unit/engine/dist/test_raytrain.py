"""What a Ray launch decides before Ray is asked for anything (no Ray needed): the resources a request needs
against what a cluster has, and the storage path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gantrain.engine.dist.raytrain import _storage_path, refuse_unplaceable
from gantrain.engine.errors import ConfigError


@pytest.mark.parametrize("per_worker, workers, cluster, message", [
    ({"CPU": 1}, 3, {"CPU": 2.0}, "3 x 1 CPU = 3 CPU, but this Ray cluster has 2 CPU"),
    ({"CPU": 4}, 1, {"CPU": 2.0}, "1 x 4 CPU = 4 CPU, but this Ray cluster has 2 CPU"),
    ({"CPU": 1, "GPU": 1}, 1, {"CPU": 2.0}, "1 x 1 GPU = 1 GPU, but this Ray cluster has 0 GPU"),
    ({"CPU": 0.5, "GPU": 0.5}, 4, {"CPU": 8.0, "GPU": 1.0}, "4 x 0.5 GPU = 2 GPU, but this Ray cluster has 1 GPU"),
])
def test_a_request_larger_than_the_cluster_is_refused_naming_both(per_worker, workers, cluster, message) -> None:
    with pytest.raises(ConfigError, match="ask for less") as info:
        refuse_unplaceable(per_worker, workers, lambda: cluster, "--flags")
    assert str(info.value).startswith("--flags: ") and message in str(info.value)


def test_what_fits_passes_and_extra_counts() -> None:
    refuse_unplaceable({"CPU": 1}, 2, lambda: {"CPU": 2.0}, "--f")  # exactly full
    refuse_unplaceable({"CPU": 0.1, "GPU": 0}, 20, lambda: {"CPU": 2.0}, "--f")  # 20 x 0.1 = 2.0 (float sums)
    with pytest.raises(ConfigError, match=r"2 x 1 CPU \+ 0.01 CPU for the driver = 2.01 CPU, but this Ray cluster "
                                          r"has 2 CPU"):
        refuse_unplaceable({"CPU": 1}, 2, lambda: {"CPU": 2.0}, "--f", extra={"CPU": 0.01}, extra_for="the driver")


def test_the_storage_path_is_made_absolute_and_a_uri_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _storage_path("rel") == str(tmp_path / "rel")
    assert _storage_path("s3://bucket/x") == "s3://bucket/x"
    assert _storage_path("") == ""


class _Clock:
    """A fake clock that sleeping advances: the wait is tested without waiting."""

    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_cluster_that_can_grow_is_waited_for_within_the_limit_and_said_once() -> None:
    clock, said = _Clock(), []
    sizes = iter([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 4.0}])  # an autoscaler adds a node on the third look
    refuse_unplaceable({"CPU": 1}, 3, lambda: next(sizes), "--f", wait_s=60, wait_flag="--ray-wait",
                       say=said.append, poll_s=5, clock=clock, sleep=clock.sleep)
    assert said == ["--f: 3 x 1 CPU = 3 CPU, but this Ray cluster has 2 CPU: waiting up to 60 s (--ray-wait) for "
                    "the cluster to grow"]
    assert clock.slept == [5, 5]


def test_a_cluster_that_does_not_grow_in_time_is_refused_after_the_limit() -> None:
    clock, said = _Clock(), []
    with pytest.raises(ConfigError, match=r"has 2 CPU after waiting 12 s \(--ray-wait\); ask for less or grow"):
        refuse_unplaceable({"CPU": 1}, 3, lambda: {"CPU": 2.0}, "--f", wait_s=12, wait_flag="--ray-wait",
                           say=said.append, poll_s=5, clock=clock, sleep=clock.sleep)
    assert clock.slept == [5, 5, 2] and len(said) == 1  # never past the limit
