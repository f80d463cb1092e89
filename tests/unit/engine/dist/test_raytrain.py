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
        refuse_unplaceable(per_worker, workers, cluster, "--flags")
    assert str(info.value).startswith("--flags: ") and message in str(info.value)


def test_what_fits_passes_and_extra_counts() -> None:
    refuse_unplaceable({"CPU": 1}, 2, {"CPU": 2.0}, "--f")  # exactly full
    refuse_unplaceable({"CPU": 0.1, "GPU": 0}, 20, {"CPU": 2.0}, "--f")  # 20 x 0.1 = 2.0 (float sums allowed)
    with pytest.raises(ConfigError, match=r"2 x 1 CPU \+ 0.01 CPU for the driver = 2.01 CPU, but this Ray cluster "
                                          r"has 2 CPU"):
        refuse_unplaceable({"CPU": 1}, 2, {"CPU": 2.0}, "--f", extra={"CPU": 0.01}, extra_for="the driver")


def test_the_storage_path_is_made_absolute_and_a_uri_kept(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _storage_path("rel") == str(tmp_path / "rel")
    assert _storage_path("s3://bucket/x") == "s3://bucket/x"
    assert _storage_path("") == ""
