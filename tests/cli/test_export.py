"""gantrain export: the (EMA) generator and its config as one safetensors file, read back with safetensors'
own reader, and gantrain generate making the same images from it as from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gantrain.engine.state.checkpoint import load_checkpoint

st = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}


def test_export_holds_the_generator_and_its_config(trained_run: Path, cli, tmp_path: Path) -> None:
    checkpoint = trained_run / "checkpoints" / "last.pt"
    out = tmp_path / "g.safetensors"
    result = cli("export", checkpoint, "--out", out)
    assert result.exit_code == 0, result.output
    metadata, tensors = _read(out)
    state = load_checkpoint(checkpoint)
    assert metadata["format"] == "gantrain-generator" and metadata["weights"] == "raw"
    assert metadata["step"] == str(state["position"]["step"]) == "6"
    assert json.loads(metadata["config"]) == state["run"]["config"]
    assert tensors.keys() == state["gan"]["generator"].keys()
    for key, value in state["gan"]["generator"].items():
        assert torch.equal(tensors[key], value), key
    assert not any(k.startswith(("discriminator", "opt")) for k in tensors)  # the generator only

    # the same images from the export as from the checkpoint
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert cli("generate", out, "--out", a, "-n", "16", "--device", "cpu").exit_code == 0
    assert cli("generate", checkpoint, "--out", b, "-n", "16", "--device", "cpu").exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_export_prefers_the_ema_generator(tiny_cfg, quiet_console, cli, tmp_path: Path) -> None:
    from gantrain.engine.train.loop import Trainer

    cfg = tiny_cfg("ema", max_steps=3, ema_decay=0.9)
    Trainer(cfg, console=quiet_console).fit()
    checkpoint = cfg.run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(checkpoint)["gan"]
    ema, raw = tmp_path / "ema.safetensors", tmp_path / "raw.safetensors"
    assert cli("export", checkpoint, "--out", ema).exit_code == 0
    assert cli("export", checkpoint, "--out", raw, "--no-ema").exit_code == 0
    (ema_meta, ema_tensors), (raw_meta, raw_tensors) = _read(ema), _read(raw)
    assert (ema_meta["weights"], raw_meta["weights"]) == ("ema", "raw")
    name = next(k for k, v in state["generator"].items() if v.is_floating_point() and "weight" in k)
    assert torch.equal(ema_tensors[name], state["generator_ema"][name])
    assert torch.equal(raw_tensors[name], state["generator"][name])
    assert not torch.equal(ema_tensors[name], raw_tensors[name])
    # --no-ema on the EMA export asked for weights it does not hold: before, it used the EMA ones without a word
    for command in (["generate", ema, "-n", "4", "--out", tmp_path / "x.png"], ["eval", ema, "-n", "100"]):
        result = cli(*command, "--no-ema", "--device", "cpu")
        assert result.exit_code == 2 and result.output.startswith("error: --no-ema: "), result.output
        assert "export of the EMA generator alone" in " ".join(result.output.split())
    assert not (tmp_path / "x.png").exists()
    # the raw export with --no-ema, and either export without it, give what they hold
    same, held = tmp_path / "same.png", tmp_path / "held.png"
    assert cli("generate", raw, "-n", "4", "--out", same, "--no-ema", "--device", "cpu").exit_code == 0
    assert cli("generate", raw, "-n", "4", "--out", held, "--device", "cpu").exit_code == 0
    assert same.read_bytes() == held.read_bytes()


def test_generate_refuses_a_foreign_safetensors_file(cli, unwrap, tmp_path: Path) -> None:
    foreign = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    result = cli("generate", foreign, "--out", tmp_path / "x.png")
    assert result.exit_code == 1 and result.output.startswith("error:")
    assert "not a gantrain generator export" in unwrap(result.output) and "Traceback" not in result.output


def test_export_of_a_non_checkpoint_is_one_line(cli, unwrap, tmp_path: Path) -> None:
    bogus = tmp_path / "x.pt"
    bogus.write_bytes(b"nothing")
    result = cli("export", bogus, "--out", tmp_path / "g.safetensors")
    assert result.exit_code == 1 and "not a checkpoint" in unwrap(result.output)
    assert not (tmp_path / "g.safetensors").exists()
