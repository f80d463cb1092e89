"""The checkpoint schema: every key present after an upgrade from version 1, refusals of unknown versions and
incomplete files in one line, and what the Trainer writes is exactly the schema's keys."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from paths import GOLDEN
import torch
from rich.console import Console

from checkpoints import placeholder_state
from gantrain.engine.config import override, preset
from gantrain.engine.errors import CheckpointError
from gantrain.engine.state.checkpoint import atomic_save, load_checkpoint, sealed
from gantrain.engine.state.schema import ENVELOPE, KEYS, OPTIONAL, REQUIRED, VERSION, assemble, upgrade
from gantrain.engine.train.loop import Trainer



def test_the_gantrain_0_1_0_checkpoint_upgrades_to_every_key() -> None:
    """Version 1 from gantrain 0.1.0 (no place in the data in images): the values its absence meant, worked out
    by hand from its run (batch 32 in one process, step 3 of an unfinished first epoch)."""
    raw = torch.load(GOLDEN / "fashion32-tiny-v0.1.0-step3.pt", weights_only=True)
    assert raw["version"] == 1 and "global_batch" not in raw and "epoch_images" not in raw
    state = load_checkpoint(GOLDEN / "fashion32-tiny-v0.1.0-step3.pt")
    assert state["version"] == VERSION and set(REQUIRED) <= set(state)
    assert (state["step"], state["epoch"], state["global_batch"], state["images_seen"], state["world_size"]) == \
        (3, 0, 32, 96, 1)
    assert state["epoch_images"] is None and state["num_images"] is None  # unknown: placed from the data on resume
    assert state["best_fd"] is None and state["planned_steps"] is None and state["scaler"] == {}


def test_the_version_2_golden_checkpoint_has_the_schemas_keys_and_no_others() -> None:
    state = load_checkpoint(GOLDEN / "fashion32-tiny-v2-step3.pt")
    assert set(state) == set(REQUIRED) | {"format", "version"}
    assert (state["global_batch"], state["images_seen"], state["epoch_images"], state["num_images"]) == (32, 96, 96, 256)
    assert state["planned_steps"] == 3


def test_a_version_1_file_of_a_ddp_run_counts_every_process_in_its_batch() -> None:
    state = placeholder_state(10, config={"data": {"batch_size": 16}}, world_size=4)
    for key in ("global_batch", "images_seen", "epoch_images", "num_images", "planned_steps", "best_fd",
                "best_fd_measured_by"):
        del state[key]
    upgraded = upgrade({"format": "gantrain-checkpoint", "version": 1, **state}, "old.pt")
    assert upgraded["global_batch"] == 64 and upgraded["images_seen"] == 640


@pytest.mark.parametrize("version, words", [(VERSION + 1, "written by a newer gantrain"), (0, "unknown checkpoint version"),
                                            ("2", "unknown checkpoint version")])
def test_a_version_this_gantrain_cannot_read_is_one_line(tmp_path: Path, version, words: str) -> None:
    path = tmp_path / "c.pt"
    atomic_save(sealed(placeholder_state(1), version=version), path)
    with pytest.raises(CheckpointError, match=words) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("version", [1, VERSION])
def test_a_checkpoint_without_its_weights_is_refused_naming_them(tmp_path: Path, version: int) -> None:
    state = placeholder_state(1)
    del state["generator"], state["opt_d"]
    atomic_save(sealed(state, version=version), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="lacks generator"):
        load_checkpoint(tmp_path / "c.pt")


def test_assemble_refuses_a_part_that_lacks_a_key_or_holds_anothers() -> None:
    parts = {name: {key: placeholder_state(1)[key] for key in keys} for name, keys in KEYS.items()}
    assert set(assemble(**parts)) == set(REQUIRED)
    assert set(assemble(**{**parts, "gan": {**parts["gan"], "generator_ema": {}}})) == set(REQUIRED) | set(OPTIONAL)
    with pytest.raises(ValueError, match="missing \\['planned_steps'\\]"):
        assemble(**{**parts, "run": {k: v for k, v in parts["run"].items() if k != "planned_steps"}})
    with pytest.raises(ValueError, match="not its own \\['step'\\]"):
        assemble(**{**parts, "quality": {**parts["quality"], "step": 1}})
    with pytest.raises(ValueError, match="checkpoint parts"):
        assemble(gan=parts["gan"])


@pytest.mark.parametrize("ema", [0.0, 0.99])
def test_what_the_trainer_writes_is_the_schema(tmp_path: Path, ema: float) -> None:
    cfg = override(preset("fashion32"), dict(dataset="synthetic", synthetic_size=64, batch_size=32, ngf=4, ndf=4,
                                             nz=8, max_steps=2, sample_every=0, log_every=1, device="cpu", amp="off",
                                             channels_last=False, ema_decay=ema, out=str(tmp_path / "run")))
    result = Trainer(cfg, console=Console(file=io.StringIO())).fit()
    raw = torch.load(result.last_checkpoint, weights_only=True)
    expected = set(REQUIRED) | set(ENVELOPE) | ({"generator_ema"} if ema else set())
    assert set(raw) == expected and raw["version"] == VERSION
