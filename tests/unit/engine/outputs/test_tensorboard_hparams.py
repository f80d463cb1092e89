"""--logger tensorboard's hparams: the preset's name and the fields that differ from that preset, read back from
the event file with TensorBoard's own reader (W&B and MLflow keep the whole config: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gantrain.engine.config import Config, override, preset
from gantrain.engine.outputs.trackers import Trackers, changed_config, flat_config


def logged_hparams(run_dir: Path) -> dict[str, object]:
    """The hparams of the session start the event files of ``run_dir``/tb hold, as Python values."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is absent")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {name: getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}


def run_with_tensorboard(cfg: Config) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is absent")
    Trackers(cfg, cfg.run_dir).finish({}, ok=True)


def test_only_the_preset_and_what_differs_from_it(tmp_path: Path) -> None:
    out = str(tmp_path / "run")
    cfg = override(preset("fashion32"), {"out": out, "logger": "tensorboard", "lr_g": 0.001, "ngf": 16,
                                         "lr_d": preset("fashion32").optim.lr_d})  # lr_d set, but as the preset's
    run_with_tensorboard(cfg)
    assert logged_hparams(cfg.run_dir) == {"preset": "fashion32", "run.out": out, "logging.logger": "tensorboard",
                                           "optim.lr_g": pytest.approx(0.001), "model.ngf": 16.0}


def test_compared_with_the_runs_own_preset(tmp_path: Path) -> None:
    """cats64 differs from the field defaults in many fields; none of them is logged, only what this run changed."""
    defaults, cats = flat_config(Config()), flat_config(preset("cats64"))
    assert sum(defaults[key] != cats[key] for key in defaults if key != "preset") > 3  # the premise
    out = str(tmp_path / "cats")
    cfg = override(preset("cats64"), {"out": out, "logger": "tensorboard", "epochs": 3})
    run_with_tensorboard(cfg)
    assert logged_hparams(cfg.run_dir) == {"preset": "cats64", "run.out": out, "logging.logger": "tensorboard",
                                           "run.epochs": 3.0}


def test_changed_config_names_and_shows_values_as_flat_config() -> None:
    cfg = override(preset("cats64-diffaug"), {"diffaug": "color", "data_root": "/data"})
    changed = changed_config(cfg)
    assert changed == {"preset": "cats64-diffaug", "gan.diffaug": "color", "data.data_root": "/data"}
    assert all(flat_config(cfg)[key] == value for key, value in changed.items())
    assert changed_config(preset("mnist32")) == {"preset": "mnist32"}
    # a preset gantrain no longer knows: compared with the field defaults
    gone = override(Config(preset="retired"), {"lr_g": 0.003})
    assert changed_config(gone) == {"preset": "retired", "optim.lr_g": 0.003}
