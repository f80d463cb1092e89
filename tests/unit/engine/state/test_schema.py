"""The checkpoint schema: every key present, in its component's part, after an upgrade from versions 1 and 2,
refusals of unknown versions and incomplete files in one line, and what the Trainer writes is exactly the schema's
parts and keys."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from paths import GOLDEN
import torch
from rich.console import Console

from checkpoints import flattened, placeholder_state
from gantrain.engine.config import override, preset
from gantrain.engine.errors import CheckpointError
from gantrain.engine.state.checkpoint import atomic_save, load_checkpoint, sealed, state_digest
from gantrain.engine.state.schema import ENVELOPE, KEYS, OPTIONAL, VERSION, assemble, step_of, upgrade
from gantrain.engine.train.loop import Trainer



def test_the_gantrain_0_1_0_checkpoint_upgrades_to_every_key() -> None:
    """Version 1 from gantrain 0.1.0 (no place in the data in images): the values its absence meant, worked out
    by hand from its run (batch 32 in one process, step 3 of an unfinished first epoch)."""
    raw = torch.load(GOLDEN / "fashion32-tiny-v0.1.0-step3.pt", weights_only=True)
    assert raw["version"] == 1 and "global_batch" not in raw and "epoch_images" not in raw
    state = load_checkpoint(GOLDEN / "fashion32-tiny-v0.1.0-step3.pt")
    assert state["version"] == VERSION and set(state) == set(KEYS) | {"format", "version"}
    assert all(set(keys) <= set(state[name]) for name, keys in KEYS.items())
    position, run, quality = state["position"], state["run"], state["quality"]
    assert (position["step"], position["epoch"], position["global_batch"], position["images_seen"],
            run["world_size"]) == (3, 0, 32, 96, 1)
    assert position["epoch_images"] is None and position["num_images"] is None  # unknown: placed from the data
    assert quality["best_fd"] is None and run["planned_steps"] is None and state["gan"]["scaler"] == {}


def test_the_version_2_golden_checkpoint_upgrades_to_each_key_in_its_part() -> None:
    """Version 2 (flat) -> 3 moves every key, value unchanged, into its component's part, and nothing else."""
    raw = torch.load(GOLDEN / "fashion32-tiny-v2-step3.pt", weights_only=True)
    assert raw["version"] == 2 and "step" in raw and "position" not in raw
    state = load_checkpoint(GOLDEN / "fashion32-tiny-v2-step3.pt")
    assert state["version"] == VERSION and set(state) == set(KEYS) | {"format", "version"}
    for name, keys in KEYS.items():
        assert list(state[name]) == list(keys), name
        for key in keys:
            assert state_digest(state[name][key]) == state_digest(raw[key]), key
    position = state["position"]
    assert (position["global_batch"], position["images_seen"], position["epoch_images"], position["num_images"]) == \
        (32, 96, 96, 256)
    assert state["run"]["planned_steps"] == 3 and step_of(state) == 3


def test_the_version_3_golden_checkpoint_has_the_schemas_parts_and_no_others() -> None:
    """Written as the version-2 one was: the Trainer's last.pt of the golden run (fashion32-tiny-v0.1.0.json) with
    --max-steps 3; it holds the same training state as that one, only its config in the newer sections."""
    raw = torch.load(GOLDEN / "fashion32-tiny-v3-step3.pt", weights_only=True)
    assert raw["version"] == 3 and set(raw) == set(KEYS) | set(ENVELOPE)
    assert all(set(raw[name]) == set(keys) for name, keys in KEYS.items())
    state = load_checkpoint(GOLDEN / "fashion32-tiny-v3-step3.pt")
    assert state_digest(state) == state_digest({k: v for k, v in raw.items() if k != "digest"})  # as written
    position = state["position"]
    assert (position["global_batch"], position["images_seen"], position["epoch_images"], position["num_images"]) == \
        (32, 96, 96, 256)
    assert state["run"]["planned_steps"] == 3 and step_of(state) == 3
    v2 = load_checkpoint(GOLDEN / "fashion32-tiny-v2-step3.pt")
    for name, keys in KEYS.items():
        for key in keys:
            if key != "config":
                assert state_digest(state[name][key]) == state_digest(v2[name][key]), key


def test_a_version_1_file_of_a_ddp_run_counts_every_process_in_its_batch() -> None:
    state = flattened(placeholder_state(10, config={"data": {"batch_size": 16}}, world_size=4))
    for key in ("global_batch", "images_seen", "epoch_images", "num_images", "planned_steps", "best_fd",
                "best_fd_measured_by"):
        del state[key]
    upgraded = upgrade({"format": "gantrain-checkpoint", "version": 1, **state}, "old.pt")
    assert upgraded["position"]["global_batch"] == 64 and upgraded["position"]["images_seen"] == 640


@pytest.mark.parametrize("version, words", [(VERSION + 1, "written by a newer gantrain"), (0, "unknown checkpoint version"),
                                            ("2", "unknown checkpoint version")])
def test_a_version_this_gantrain_cannot_read_is_one_line(tmp_path: Path, version, words: str) -> None:
    path = tmp_path / "c.pt"
    atomic_save(sealed(placeholder_state(1), version=version), path)
    with pytest.raises(CheckpointError, match=words) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("version", [1, 2, VERSION])
def test_a_checkpoint_without_its_weights_is_refused_naming_them(tmp_path: Path, version: int) -> None:
    state = placeholder_state(1)
    del state["gan"]["generator"], state["gan"]["opt_d"]
    atomic_save(sealed(state if version == VERSION else flattened(state), version=version), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="lacks generator"):
        load_checkpoint(tmp_path / "c.pt")


def test_a_checkpoint_without_a_part_is_refused_naming_it(tmp_path: Path) -> None:
    state = placeholder_state(1)
    del state["quality"]
    state["run"] = [0]  # not a dict of the run's keys
    atomic_save(sealed(state), tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="lacks run, quality: not a complete") as info:
        load_checkpoint(tmp_path / "c.pt")
    assert "\n" not in str(info.value)


def test_assemble_refuses_a_part_that_lacks_a_key_or_holds_anothers() -> None:
    parts = placeholder_state(1)
    body = assemble(**dict(reversed(parts.items())))  # in the schema's order of parts whatever the order given
    assert list(body) == list(KEYS) and all(set(body[name]) == set(keys) for name, keys in KEYS.items())
    with_ema = assemble(**{**parts, "gan": {**parts["gan"], "generator_ema": {}}})
    assert set(with_ema["gan"]) == set(KEYS["gan"]) | set(OPTIONAL["gan"])
    assert all(set(with_ema[name]) == set(keys) for name, keys in KEYS.items() if name != "gan")
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
    assert set(raw) == set(KEYS) | set(ENVELOPE) and raw["version"] == VERSION
    for name, keys in KEYS.items():
        assert set(raw[name]) == set(keys) | ({"generator_ema"} if ema and name == "gan" else set()), name
