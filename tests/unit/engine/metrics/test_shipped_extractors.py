"""The FashionMNIST and MNIST extractors that ship with gantrain: what the manifest says is what the files hold,
and a fresh machine uses them instead of fitting one before step 1."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from gantrain.engine.metrics import ensure_extractor, parse_dataset
from gantrain.engine.metrics.extractor import SHIPPED
from gantrain.engine.state.checkpoint import state_digest

MANIFEST = json.loads((SHIPPED / "extractors.json").read_text())["extractors"]


@pytest.mark.parametrize("entry", MANIFEST, ids=[e["dataset"] for e in MANIFEST])
def test_the_manifest_describes_each_shipped_file(entry: dict) -> None:
    path = SHIPPED / entry["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    state = torch.load(path, weights_only=True)
    assert (state["dataset"], state["train_sha256"], state["train_images"]) == (
        entry["dataset"], entry["train_sha256"], 60000)
    assert state_digest(state["weights"]) == entry["weights_sha256"]
    assert state["test_accuracy"] == pytest.approx(entry["test_accuracy"], abs=1e-4)
    assert entry["test_accuracy"] >= {"fashion-mnist": 0.90, "mnist": 0.99}[entry["dataset"]]
    assert entry["refit"] == f"gantrain metrics fit-extractor --dataset {entry['dataset']} --force"
    assert sorted(p.name for p in SHIPPED.glob("*.pt")) == sorted(e["file"] for e in MANIFEST)


@pytest.mark.parametrize("dataset", ["fashion-mnist", "mnist"])
def test_a_fresh_cache_uses_the_shipped_extractor_and_a_refit_takes_precedence(datasets_root: Path, tmp_path: Path,
                                                                                dataset: str) -> None:
    spec = parse_dataset(dataset, str(datasets_root))
    extractor = ensure_extractor(spec, cache=tmp_path / "empty", quiet=True)
    assert not extractor.fitted_now and extractor.path.parent == SHIPPED  # no fit before step 1
    assert not (tmp_path / "empty").exists()  # nothing written: the package file is read in place
    entry = next(e for e in MANIFEST if e["dataset"] == dataset)
    assert extractor.weights_sha256 == entry["weights_sha256"]
    refit = tmp_path / "cache" / "extractors" / extractor.path.name  # a refit in the cache (here: edited weights)
    refit.parent.mkdir(parents=True)
    shutil.copy(extractor.path, refit)
    state = torch.load(refit, weights_only=True)
    name = next(k for k, v in state["weights"].items() if v.is_floating_point())
    state["weights"][name] = state["weights"][name] + 0.25
    torch.save(state, refit)
    cached = ensure_extractor(spec, cache=tmp_path / "cache", quiet=True)
    assert cached.path == refit and cached.weights_sha256 != entry["weights_sha256"]
