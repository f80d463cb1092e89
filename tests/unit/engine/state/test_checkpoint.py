"""Checkpoints: atomic writes, pruning, corrupt and foreign files, model mismatches, and `gantrain generate`."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from checkpoints import placeholder_state

from gantrain.engine.state import checkpoint as ckpt
from gantrain.engine.state.checkpoint import (CheckpointError, atomic_save, load_checkpoint, load_module_state,
                                              save_checkpoint)
from gantrain.engine.config import ModelConfig
from gantrain.engine.errors import RunIOError
from gantrain.engine.gan.models import Generator
from gantrain.engine.outputs.generate import generate, load_generator
from gantrain.engine.state.rundir import RunDir
from gantrain.engine.state.schema import VERSION


# ----- atomic writes and pruning -----------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_when_save_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    atomic_save({"value": torch.arange(5)}, path)
    old_bytes = path.read_bytes()

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a zip file")
        fh.flush()
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(RunIOError, match="disk full") as info:
        atomic_save({"value": torch.arange(1000)}, path)
    assert str(info.value) == f"cannot write {path}: disk full"
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_atomic_save_survives_keyboard_interrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_save(obj, fh, *args, **kwargs):
        fh.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"x": 1}, tmp_path / "new.pt")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file


def test_atomic_save_replaces_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "c.pt"
    atomic_save({"v": 1}, path)
    atomic_save({"v": 2}, path)
    assert torch.load(path, weights_only=True) == {"v": 2}
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_checkpoints_prunes_older_numbered_files(tmp_path: Path, keep: int) -> None:
    files = RunDir(tmp_path)
    folder = files.checkpoints
    for step in (5, 10, 15, 20, 100):  # 100 sorts before 15 as text: pruning must sort numerically
        save_checkpoint(placeholder_state(step), files, step, keep)
    kept = [5, 10, 15, 20, 100][-keep:]
    assert [p.name for p in files.numbered_checkpoints()] == [f"step_{s:08d}.pt" for s in kept]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["last.pt"] + [f"step_{s:08d}.pt" for s in kept])
    last = load_checkpoint(folder / "last.pt")
    assert last["position"]["step"] == 100 and last["format"] == "gantrain-checkpoint" and last["version"] == VERSION


# ----- broken and foreign files ------------------------------------------------------------------------
def test_truncated_checkpoint(trained_run: Path, tmp_path: Path) -> None:
    data = (trained_run / "checkpoints" / "last.pt").read_bytes()
    for name, content in (("half.pt", data[: len(data) // 2]), ("head.pt", data[:100]), ("empty.pt", b"")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="corrupt or not a checkpoint") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)
        # one sentence of torch's reason, cut at a word, closed: not "...internal miniz error. If yo)"
        reason = str(info.value).split("(", 1)[1]
        assert reason.endswith(")") and "\n" not in reason and ". " not in reason and len(reason) < 220


def test_a_run_folder_given_as_a_checkpoint_names_its_last_pt(trained_run: Path) -> None:
    last = trained_run / "checkpoints" / "last.pt"
    for folder in (trained_run, trained_run / "checkpoints"):
        with pytest.raises(CheckpointError, match=f"{folder} is a folder; its latest checkpoint is {last}"):
            load_checkpoint(folder)


@pytest.mark.parametrize("where", ["start", "end"])
def test_corrupted_bytes_in_checkpoint(trained_run: Path, tmp_path: Path, where: str) -> None:
    # Zeroing the zip's local header (start) or its central directory (end) must be caught by the zip reader.
    data = bytearray((trained_run / "checkpoints" / "last.pt").read_bytes())
    span = slice(0, 64) if where == "start" else slice(len(data) - 64, len(data))
    data[span] = bytes(64)
    path = tmp_path / "zeroed.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)


def test_damaged_weights_fail_the_stored_checksum(trained_run: Path, tmp_path: Path) -> None:
    # torch's zip reader skips CRC checks, so bytes zeroed inside a tensor's data load without error; the
    # digest stored in the checkpoint catches them.
    source = trained_run / "checkpoints" / "last.pt"
    weight = load_checkpoint(source)["gan"]["generator"]
    tensor = next(t for t in weight.values() if t.numel() >= 256 and t.dtype == torch.float32)
    needle = tensor.reshape(-1)[:64].numpy().tobytes()
    data = bytearray(source.read_bytes())
    at = data.find(needle)
    assert at > 0 and data.find(needle, at + 1) == -1
    data[at:at + len(needle)] = bytes(len(needle))
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    assert torch.load(path, map_location="cpu", weights_only=True)["position"]["step"] == 6  # torch does not notice
    with pytest.raises(CheckpointError, match="do not match the checksum"):
        load_checkpoint(path)


def test_checkpoints_without_a_digest_still_load(trained_run: Path, tmp_path: Path) -> None:
    state = torch.load(trained_run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert len(state.pop("digest")) == 64
    torch.save(state, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["position"]["step"] == 6


@pytest.mark.parametrize("obj", [
    {"weights": torch.zeros(3)},                         # a plain state dict
    torch.zeros(4),                                      # a bare tensor
    {"format": "gantrain-checkpoint", "version": 99},    # a future format version
    ["not", "a", "dict"],
], ids=["state-dict", "tensor", "version", "list"])
def test_foreign_torch_files(tmp_path: Path, obj) -> None:
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not a gantrain checkpoint|checkpoint version 99"):
        load_checkpoint(path)


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "module.pt"
    with open(path, "wb") as fh:
        pickle.dump(torch.nn.Linear(2, 2), fh, protocol=2)
    with pytest.raises(CheckpointError, match="corrupt or not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatched_model_weights(trained_run: Path) -> None:
    state = load_checkpoint(trained_run / "checkpoints" / "last.pt")
    narrow = Generator(ModelConfig(ngf=8), 32, 1)
    with pytest.raises(CheckpointError, match="generator weights do not match") as info:
        load_module_state(narrow, state["gan"]["generator"], "generator", "ck.pt")
    assert "ck.pt" in str(info.value) and "size mismatch" in str(info.value)
    same = Generator(ModelConfig(ngf=16), 32, 1)
    load_module_state(same, state["gan"]["generator"], "generator", "ck.pt")
    assert torch.equal(same.net[1].weight, state["gan"]["generator"]["net.1.weight"])


def test_generate_with_a_lying_config(trained_run: Path, tmp_path: Path) -> None:
    state = load_checkpoint(trained_run / "checkpoints" / "last.pt")
    state["run"]["config"]["model"]["ngf"] = 8
    path = tmp_path / "lying.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="weights do not match"):
        generate(path, n=2, out=tmp_path / "g.png", device="cpu")


def test_resume_with_a_different_model_exits_1(trained_copy: Path, train_root: Path, cli, unwrap) -> None:
    result = cli("run", "--data-root", train_root, "--limit", 256, "--batch-size", 32, "--max-steps", 8,
                 "--ngf", 8, "--ndf", 16, "--out", trained_copy, "--resume", "auto")
    assert result.exit_code == 1
    assert "model config differs" in unwrap(result.stderr)
    assert "Traceback" not in result.output
    assert load_checkpoint(trained_copy / "checkpoints" / "last.pt")["position"]["step"] == 6


def test_resume_reads_an_unset_data_root_as_gantrain_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose run took its data from $GANTRAIN_DATA before the variable was resolved into the config
    holds no data root: resumed under the same variable, the data is no change; another root is one."""
    from gantrain.engine.config import preset, resolve

    old = placeholder_state(1, config=preset("fashion32").to_dict())  # data_root None
    monkeypatch.setenv("GANTRAIN_DATA", "/env/data")
    assert ckpt.resumed_config(resolve(None, None, {}), old, "old.pt") == []
    assert ckpt.resumed_config(resolve(None, None, {"data_root": "/x"}), old, "old.pt") == [
        "--data-root '/env/data' -> '/x'"]
    monkeypatch.delenv("GANTRAIN_DATA")
    assert ckpt.resumed_config(resolve(None, None, {}), old, "old.pt") == []


# ----- generate ----------------------------------------------------------------------------------------
def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img).copy()


def test_generate_grid_and_individual_files(trained_run: Path, tmp_path: Path, cli) -> None:
    checkpoint = trained_run / "checkpoints" / "last.pt"
    out = tmp_path / "grid.png"
    result = cli("generate", checkpoint, "-n", 10, "--out", out, "--individual", tmp_path / "each", "--seed", 4,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    # 10 images of 32x32, 8 columns, 2 px padding: 8*34+2 = 274 wide, 2 rows: 2*34+2 = 70 high.
    with Image.open(out) as grid:
        assert grid.size == (274, 70) and grid.mode == "L"
    files = sorted((tmp_path / "each").iterdir())
    assert [p.name for p in files] == [f"{i:06d}.png" for i in range(10)]
    for f in files:
        with Image.open(f) as img:
            assert img.size == (32, 32) and img.mode == "L"  # the image itself, without grid padding
    grid = _pixels(out)
    for i in (0, 7, 9):  # cell (row, col) of image i starts at 2 + 34 * (row, col)
        top, left = 2 + 34 * (i // 8), 2 + 34 * (i % 8)
        assert np.array_equal(grid[top : top + 32, left : left + 32], _pixels(files[i])), i
    assert grid[:, :2].max() == 0 and grid[:2, :].max() == 0  # black padding
    assert grid[36:, 2 * 34 :].max() == 0  # the unused cells of the last row stay black
    assert _pixels(files[0]).std() > 0


def test_generate_shows_bars_for_many_images_and_none_for_a_few(trained_run: Path, tmp_path: Path, cli,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`generate -n 30000 --individual DIR` worked 39 s without a word: from BAR_FROM_IMAGES images on, making them
    and writing the files each show a bar (their last state is what a captured console keeps), counting all."""
    from gantrain.engine.outputs import generate as gen

    monkeypatch.setattr(gen, "BAR_FROM_IMAGES", 12)
    checkpoint = trained_run / "checkpoints" / "last.pt"
    many = cli("generate", checkpoint, "-n", 12, "--out", tmp_path / "g.png", "--individual", tmp_path / "each",
               "--device", "cpu")
    assert many.exit_code == 0, many.output
    text = " ".join(many.output.split())
    assert "generating 12 images" in text and "writing 12 PNGs" in text and text.count("12/12") == 2, text
    few = cli("generate", checkpoint, "-n", 11, "--out", tmp_path / "h.png", "--individual", tmp_path / "few",
              "--device", "cpu")
    assert few.exit_code == 0 and "generating" not in few.output and "/11" not in few.output, few.output


def test_generate_nrow_and_determinism(trained_run: Path, tmp_path: Path, cli) -> None:
    checkpoint = trained_run / "checkpoints" / "last.pt"
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = cli("generate", checkpoint, "-n", 6, "--nrow", 3, "--seed", seed, "--out", tmp_path / f"{name}.png",
                     "--device", "cpu")
        assert result.exit_code == 0, result.output
        runs[name] = _pixels(tmp_path / f"{name}.png")
    assert runs["a"].shape == (2 * 34 + 2, 3 * 34 + 2)
    assert np.array_equal(runs["a"], runs["b"])
    assert not np.array_equal(runs["a"], runs["c"])


def test_generate_matches_the_run_samples(trained_run: Path, tmp_path: Path) -> None:
    """generate() rebuilds G from the checkpoint alone: with the run's fixed noise it redraws final.png."""
    from gantrain.engine.gan.sampling import NUM_FIXED_SAMPLES, generate_images
    from gantrain.engine.gan.sampling import sample_noise
    from gantrain.engine.outputs.images import save_grid

    g, cfg = load_generator(trained_run / "checkpoints" / "last.pt", device="cpu")
    assert not g.training and cfg.model.ngf == 16
    noise = sample_noise(NUM_FIXED_SAMPLES, cfg.model.nz, cfg.loss.noise, "cpu", torch.Generator().manual_seed(cfg.run.seed))
    save_grid(generate_images(g, noise), tmp_path / "again.png")
    assert np.array_equal(_pixels(tmp_path / "again.png"), _pixels(trained_run / "final.png"))


def test_make_grid_layout_and_values() -> None:
    from gantrain.engine.outputs.images import make_grid

    images = torch.full((3, 3, 4, 4), -1.0)
    images[1] = 1.0
    images[2, 0] = 0.0  # red channel mid-grey, others black
    grid = make_grid(images, nrow=8, padding=1)  # fewer images than nrow: one row of 3
    assert grid.shape == (1 * 5 + 1, 3 * 5 + 1, 3) and grid.dtype == np.uint8
    assert grid[1:5, 1:5].max() == 0
    assert (grid[1:5, 6:10] == 255).all()
    assert (grid[1:5, 11:15, 0] == 128).all() and grid[1:5, 11:15, 1:].max() == 0
    assert grid[0].max() == 0 and grid[:, 5].max() == 0  # padding
    gray = make_grid(torch.zeros(5, 1, 2, 2).clamp(-5, 5) * 10, nrow=2, padding=0)
    assert gray.shape == (3 * 2, 2 * 2)  # 5 images in 2 columns: 3 rows, 2-D for one channel


def test_a_restarted_worker_resumes_from_this_launchs_last_checkpoint_only(tmp_path: Path) -> None:
    """The one restart rule (torchrun's agent and Ray Train alike): last.pt written at or after the launch's start
    is where the workers stood; an older one is a previous launch's, so the launch's own --resume stands."""
    import os

    from gantrain.engine.state.checkpoint import restart_resume

    files = RunDir(tmp_path)
    assert restart_resume(files, None, 1000.0) is None and restart_resume(files, "x.pt", 1000.0) == "x.pt"
    files.checkpoints.mkdir()
    files.last.write_bytes(b"")
    os.utime(files.last, (999.0, 999.0))  # before this launch
    assert restart_resume(files, "asked.pt", 1000.0) == "asked.pt"
    os.utime(files.last, (1000.0, 1000.0))  # written by this launch
    assert restart_resume(files, "asked.pt", 1000.0) == str(files.last)
    assert restart_resume(files, None, 1000.0) == str(files.last)


@pytest.mark.parametrize("every, expected", [(0, [12]), (2, [8, 12]), (1, [4, 8, 12])])
def test_checkpoint_every_epochs_and_0_for_the_final_one_only(tmp_path: Path, every: int, expected: list) -> None:
    """--checkpoint-every N saves at every Nth epoch end and at the end; 0 saves the final checkpoint alone (what
    tune's trials and the to-quality bench use: their checkpoints are kept elsewhere or not at all). 128 synthetic
    images, batch 32: 4 steps per epoch, 3 epochs."""
    import io

    from rich.console import Console

    from gantrain.engine.config import override, preset
    from gantrain.engine.train.loop import Trainer

    cfg = override(preset("fashion32"), dict(dataset="synthetic", synthetic_size=128, batch_size=32, ngf=4, ndf=4,
                                             nz=8, epochs=3, sample_every=0, log_every=4, device="cpu", amp="off",
                                             channels_last=False, checkpoint_every=every, keep_checkpoints=10,
                                             out=str(tmp_path / "run")))
    result = Trainer(cfg, console=Console(file=io.StringIO())).fit()
    assert [int(p.stem.split("_")[1]) for p in RunDir(result.run_dir).numbered_checkpoints()] == expected
    assert load_checkpoint(RunDir(result.run_dir).last)["position"]["step"] == 12


def test_generate_image_i_does_not_depend_on_n(trained_run: Path, tmp_path: Path, cli) -> None:
    """Before: -n 1 and -n 64 with --seed 0 gave different image 0 (max difference 255)."""
    checkpoint = trained_run / "checkpoints" / "last.pt"
    for n in (1, 3, 70):
        result = cli("generate", checkpoint, "-n", n, "--seed", 0, "--out", tmp_path / f"{n}.png", "--individual",
                     tmp_path / f"each{n}", "--device", "cpu")
        assert result.exit_code == 0, result.output
    for i, n in ((0, 1), (0, 3), (2, 3)):
        name = f"{i:06d}.png"
        assert np.array_equal(_pixels(tmp_path / f"each{n}" / name), _pixels(tmp_path / "each70" / name)), (i, n)


# ----- --resume without --preset or --config: the checkpoint's own config ----------------------------------------
GOLDEN = Path(__file__).parents[3] / "golden"


def _with_config(path: Path, target: Path, change) -> Path:
    """A copy of checkpoint ``path`` at ``target`` whose stored config ``change`` edits (digest resealed)."""
    state = load_checkpoint(path)
    change(state["run"]["config"])
    state["digest"] = ckpt.state_digest(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def test_resume_base_takes_the_checkpoints_config_but_not_its_launch(trained_run: Path, tmp_path: Path) -> None:
    """The stored config, read as a resolved config.toml is; its [dist] section (how the run was launched) is the
    command's, as for a new run; with a preset or a file, or no resume, there is no base."""
    from gantrain.engine.config import DistConfig, from_dict

    def launched_by_ddp(config: dict) -> None:
        config["dist"].update(ddp=True, nproc=2, master_port=29577)

    path = _with_config(trained_run / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt",
                        launched_by_ddp)
    cfg, found = ckpt.resume_base(None, None, "auto", {"out": str(tmp_path / "run")})
    assert found == path
    stored = from_dict(load_checkpoint(path)["run"]["config"])
    assert cfg.dist == DistConfig() and stored.dist.ddp and stored.dist.nproc == 2
    assert (cfg.model, cfg.optim, cfg.data, cfg.loss, cfg.gan) == (stored.model, stored.optim, stored.data, stored.loss,
                                                                    stored.gan)
    assert cfg.model.ngf == 16 and cfg.data.batch_size == 32  # the tiny run's, not fashion32's 64 and 128
    assert ckpt.resume_base("fashion32", None, "auto", {"out": str(tmp_path / "run")}) is None
    assert ckpt.resume_base(None, "c.toml", "auto", {"out": str(tmp_path / "run")}) is None
    assert ckpt.resume_base(None, None, None, {"out": str(tmp_path / "run")}) is None
    assert ckpt.resume_base(None, None, "auto", {"out": str(tmp_path / "none")}) is None  # the run refuses it


def test_resume_base_reads_this_machines_data_when_the_stored_root_is_gone(trained_run: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    """A run folder brought from another machine: its stored data root does not exist here, so $GANTRAIN_DATA
    takes its place, with a warning; a --data-root flag or an existing stored root are used as they are."""
    from gantrain.engine.config import resolve

    def elsewhere(config: dict) -> None:
        config["data"]["data_root"] = str(tmp_path / "other-machine" / "datasets")

    path = _with_config(trained_run / "checkpoints" / "last.pt", tmp_path / "run" / "checkpoints" / "last.pt",
                        elsewhere)
    monkeypatch.setenv("GANTRAIN_DATA", str(tmp_path / "here"))
    flags = {"out": str(tmp_path / "run")}
    with caplog.at_level("WARNING", logger="gantrain"):
        base, _ = ckpt.resume_base(None, None, str(path), dict(flags))
    assert base.data.data_root is None and resolve(None, None, flags, base=base).data.data_root == str(tmp_path / "here")
    assert "does not exist here; this run reads $GANTRAIN_DATA" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gantrain"):
        base, _ = ckpt.resume_base(None, None, str(path), {**flags, "data_root": "/given"})
    assert base.data.data_root == str(tmp_path / "other-machine" / "datasets") and caplog.text == ""
    base, _ = ckpt.resume_base(None, None, str(trained_run / "checkpoints" / "last.pt"), dict(flags))
    assert base.data.data_root == load_checkpoint(trained_run / "checkpoints" / "last.pt")["run"]["config"]["data"][
        "data_root"]


@pytest.mark.parametrize("name", ["fashion32-tiny-v0.1.0-step3.pt", "fashion32-tiny-v2-step3.pt",
                                  "fashion32-tiny-v3-step3.pt"])
def test_resume_base_reads_golden_checkpoints_of_every_schema(name: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints written by older gantrain (older config layouts, fewer fields): their config is the base, and
    against it the resume changes only what the command names (here --out)."""
    monkeypatch.delenv("GANTRAIN_DATA", raising=False)
    from gantrain.engine.config import from_dict, resolve

    path = GOLDEN / name
    base, found = ckpt.resume_base(None, None, str(path), {"out": str(tmp_path / "run")})
    state = load_checkpoint(path)
    stored = from_dict({k: v for k, v in state["run"]["config"].items()})
    assert found == path and (base.model, base.optim, base.loss) == (stored.model, stored.optim, stored.loss)
    cfg = resolve(None, None, {"out": str(tmp_path / "run")}, base=base)
    changes = ckpt.resumed_config(cfg, state, path)
    assert [c.split(" ")[0] for c in changes] in (["--out"], [])


def test_resume_auto_without_a_checkpoint_names_the_run_folders_beside_that_have_one(tmp_path: Path) -> None:
    """`--resume auto` without --out looks in the default preset's folder; a run of another preset lies beside
    it: the error names those folders (newest first, at most three), so the next command is one copy away."""
    import os

    runs = tmp_path / "runs"
    for name, mtime in (("old", 1_000), ("new", 3_000), ("middle", 2_000), ("oldest", 500)):
        last = runs / name / "checkpoints" / "last.pt"
        last.parent.mkdir(parents=True)
        last.write_bytes(b"x")
        os.utime(last, (mtime, mtime))
    (runs / "empty" / "checkpoints").mkdir(parents=True)  # a folder without last.pt, and a file, are not named
    (runs / "notes.txt").write_text("x")
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.find_resume("auto", runs / "fashion32")
    assert str(err.value) == (f"--resume auto: no checkpoint in {runs / 'fashion32' / 'checkpoints'} (is --out the "
                              f"run folder?); run folders beside it that have one: --out {runs / 'new'}, "
                              f"--out {runs / 'middle'}, --out {runs / 'old'}")
    with pytest.raises(ckpt.CheckpointError) as err:  # nothing beside it: the plain message
        ckpt.find_resume("auto", tmp_path / "elsewhere" / "fashion32")
    assert str(err.value).endswith("(is --out the run folder?)")
