"""Scripting gantrain: ``--json PATH`` in every mode that writes a report, ``--json -`` as the JSON alone on stdout
(tables and progress on stderr), ``presets --json``, ``run --dry-run --json``, and shell completion.

Expectations come from the engine (``preset(...)``, ``resolve(...)``), the arguments given, or the files the same
command writes, never from the command's own printing."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gantrain.engine.config import PRESETS, RECOMMENDED, preset, resolve


@pytest.fixture
def invoke(monkeypatch: pytest.MonkeyPatch):
    """``gantrain ARGS`` in-process at 80 columns; the result keeps stdout and stderr apart."""
    from gantrain.cli import app

    monkeypatch.setenv("COLUMNS", "80")

    def run(*args, **kwargs):
        return CliRunner().invoke(app, [str(a) for a in args], prog_name="gantrain", **kwargs)

    return run


def _one_error_line(result, code: int, *words: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


# ----- gantrain presets --json ------------------------------------------------------------------------------
def test_presets_json_to_stdout_is_every_preset_and_nothing_else(invoke) -> None:
    result = invoke("presets", "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # stdout holds the JSON alone
    assert data["default"] == resolve(None, None, {}).preset == "fashion32"
    assert list(data["presets"]) == list(PRESETS)
    for name, entry in data["presets"].items():
        assert entry["config"] == json.loads(json.dumps(preset(name).to_dict()))
        assert entry["description"] == PRESETS[name][1]
        assert entry["recommended"] == RECOMMENDED.get(name)
    assert {plain: r["preset"] for plain, r in data["recommended"].items()} == RECOMMENDED
    assert all(r["measured"] for r in data["recommended"].values())
    assert "gantrain presets" in result.stderr and "fashion32-tuned" in result.stderr  # the table, on stderr


def test_presets_json_to_a_file_keeps_the_table_on_stdout(invoke, tmp_path: Path) -> None:
    path = tmp_path / "new" / "presets.json"
    result = invoke("presets", "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["presets"]["cats128"]["config"]["data"]["image_size"] == preset("cats128").data.image_size == 128
    assert "gantrain presets" in result.stdout and str(path) in result.stderr


# ----- gantrain run --dry-run --json -----------------------------------------------------------------------
DRY = ["run", "--dry-run", "--dataset", "synthetic", "--synthetic-size", "1000", "--batch-size", "100", "--epochs", "3",
       "--lr-g", "0.001", "--no-channels-last", "--device", "cpu"]


def test_dry_run_json_to_stdout_is_the_config_and_the_plan(invoke, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke(*DRY, "--out", out, "--json", "-")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    flags = {"dataset": "synthetic", "synthetic_size": 1000, "batch_size": 100, "epochs": 3, "lr_g": 0.001,
             "channels_last": False, "device": "cpu", "out": str(out)}
    assert data["config"] == json.loads(json.dumps(resolve(None, None, flags).to_dict()))
    assert data["preset"] == "fashion32" and data["run_dir"] == str(out) and data["resume"] is None
    assert data["sources"]["optim.lr_g"] == "flag --lr-g" and data["sources"]["perf.channels_last"] == \
        "flag --channels-last"
    assert data["sources"]["model.nz"] == "default"
    # 1000 images in batches of 100 on one process: 10 steps an epoch, 30 over 3 epochs, 3000 images
    assert data["schedule"] == {"images": 1000, "images_note": "synthetic", "batch_size": 100, "world_size": 1,
                                "effective_batch": 100, "steps_per_epoch": 10, "epochs": 3, "max_steps": 0,
                                "total_steps": 30, "images_trained": 3000}
    assert data["precision"].endswith("on cpu")
    assert "gantrain run --dry-run" in result.stderr and "total steps: 30" in result.stderr  # the table, on stderr
    assert not out.exists()  # still a dry run


def test_dry_run_json_to_a_file_and_the_table_on_stdout(invoke, tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    result = invoke(*DRY, "--max-steps", "25", "--json", path)
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["schedule"]["total_steps"] == 25 and data["config"]["run"]["max_steps"] == 25
    assert data["resume"] is None and data["resume_changes"] == []
    assert "total steps: 25" in result.stdout and f"wrote {path}" in result.stderr
    # --resume auto where no run is: refused as the run itself would, nothing written
    path.unlink()
    _one_error_line(invoke(*DRY, "--resume", "auto", "--json", path), 1, "--resume auto: no checkpoint in")
    assert not path.exists()


def test_json_without_dry_run_is_one_error_line(invoke, tmp_path: Path) -> None:
    _one_error_line(invoke("run", "--json", tmp_path / "x.json"), 2, "--json", "--dry-run")
    assert not (tmp_path / "x.json").exists()


# ----- gantrain bench --json: each mode -------------------------------------------------------------------
def test_bench_json_to_stdout(invoke) -> None:
    result = invoke("bench", "--quick", "--dataset", "synthetic", "--only", "baseline", "--batch-size", "8",
                    "--device", "cpu", "--warmup", "1", "--windows", "1", "--window", "1", "--repeats", "1",
                    "--peak-tflops", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["name"] for r in report["results"]] == ["baseline (tutorial loop)"]
    assert report["batch_size"] == 8 and report["peak_tflops"]["source"] == "--peak-tflops"
    assert "baseline (tutorial loop)" in result.stderr  # the table
    assert not Path("-").exists()
    assert report["results"][0]["config"]["perf"]["compile_mode"] == "default"
    assert "compile mode" not in result.stderr  # the default mode goes unsaid


def test_bench_compile_mode_is_the_rows_mode_and_nothing_else(invoke) -> None:
    """--compile-mode reaches every row's config (the JSON records it); a mode torch.compile does not have, and the
    modes where it sets nothing (--to-quality, whose contenders take compile_mode=MODE, and --loaders), are one
    error line."""
    result = invoke("bench", "--quick", "--dataset", "synthetic", "--only", "baseline", "--batch-size", "8",
                    "--device", "cpu", "--warmup", "1", "--windows", "1", "--window", "1", "--repeats", "1",
                    "--peak-tflops", "1", "--compile-mode", "max-autotune", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["results"][0]["config"]["perf"]["compile_mode"] == report["compile_mode"] == "max-autotune"
    assert "compile mode max-autotune" in " ".join(result.stderr.split())  # the table's title says so
    _one_error_line(invoke("bench", "--compile-mode", "fastest"), 2, "--compile-mode", "max-autotune")
    _one_error_line(invoke("bench", "--to-quality", "--compile-mode", "max-autotune"), 2, "--compile-mode",
                    "compile=true compile_mode=MODE")
    _one_error_line(invoke("bench", "--loaders", "--compile-mode", "max-autotune"), 2, "--compile-mode", "--loaders")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_bench_loaders_json_to_stdout(invoke, image_folder: Path) -> None:
    result = invoke("bench", "--loaders", "--quick", "--data-root", image_folder, "--limit", "16", "--batch-size", "8",
                    "--device", "cpu", "--only", "memory 64px loader only", "--num-workers", "0", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_images"] == 16 and [r["name"] for r in report["results"]] == ["memory 64px loader only"]
    assert "memory" in result.stderr  # the table


@pytest.fixture
def stub_to_quality(monkeypatch: pytest.MonkeyPatch):
    """`--to-quality` without training or a fitted extractor: each run a made-up FD curve (the unit tests of
    gantrain/bench/to_quality.py do the same); the command's own path to the report files is what is tested."""
    from types import SimpleNamespace

    from gantrain.bench import to_quality as tq
    from gantrain.engine.metrics import evaluate

    info = {"label": "fashion-mnist", "task": "class", "test_accuracy": 0.9, "weights_sha256": "a" * 64, "epochs": 3}
    evaluator = SimpleNamespace(reference=SimpleNamespace(extractor=SimpleNamespace(info=info)))
    monkeypatch.setattr(evaluate.Evaluator, "for_config", classmethod(lambda cls, *a, **k: evaluator))

    def run_one(contender, seed, spec, env):
        return {"seed": seed, "images_per_s": 500.0,
                "points": [{"images": 1000 * (i + 1), "epochs": 0.25 * (i + 1), "train_s": 10.0 * (i + 1),
                            "eval_s": 1.0, "fd": fd} for i, fd in enumerate((30.0, 12.0, 4.0))]}

    monkeypatch.setattr(tq, "bench_to_quality", functools.partial(tq.bench_to_quality, run_one=run_one))


def test_to_quality_json_path_gets_the_report_and_out_the_rest(invoke, stub_to_quality, tmp_path: Path) -> None:
    out, path = tmp_path / "tq", tmp_path / "elsewhere" / "report.json"
    result = invoke("bench", "--to-quality", "--contender", "fashion32", "--targets", "20,5", "--out", out,
                    "--json", path)
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert [c["name"] for c in report["contenders"]] == ["fashion32"] and report["targets"] == [20.0, 5.0]
    assert report["contenders"][0]["summary"]  # the finished report, not a running record
    assert (out / "to_quality.md").is_file() and (out / "to_quality.png").is_file()
    assert not (out / "to_quality.json").exists()


def test_to_quality_json_to_stdout(invoke, stub_to_quality, tmp_path: Path) -> None:
    out = tmp_path / "tq"
    result = invoke("bench", "--to-quality", "--contender", "fashion32", "--targets", "20,5", "--out", out,
                    "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((out / "to_quality.json").read_text())  # the running record stays in --out
    assert (out / "to_quality.md").is_file() and "fashion32" in result.stderr


# ----- shell completion ---------------------------------------------------------------------------------
def test_show_completion_prints_a_bash_script(invoke) -> None:
    result = invoke("--show-completion", "bash", env={"SHELL": "/bin/bash"})
    assert result.exit_code == 0, result.output
    assert "_GANTRAIN_COMPLETE" in result.stdout and "complete -o default -F _gantrain_completion gantrain" in \
        result.stdout


def test_the_script_s_completions_come_from_the_app(invoke) -> None:
    """What the bash script asks (COMP_WORDS, _GANTRAIN_COMPLETE=complete_bash) is answered with the app's names."""
    result = invoke(env={"_GANTRAIN_COMPLETE": "complete_bash", "COMP_WORDS": "gantrain run --checkpoint-every",
                         "COMP_CWORD": "2"})
    assert result.exit_code == 0, result.output
    assert set(result.stdout.split()) == {"--checkpoint-every", "--checkpoint-every-steps",
                                          "--checkpoint-every-minutes"}


def test_completion_for_an_unknown_shell_is_one_error_line(invoke) -> None:
    _one_error_line(invoke("--show-completion", "cmd.exe"), 2, "--show-completion", "cmd.exe", "bash")


def test_help_still_renders_with_the_completion_options(invoke) -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout
    assert "│ run " in result.stdout


def test_ray_without_ray_train_is_one_error_line(invoke, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Before: `gantrain run --ray` without Ray printed a traceback ending in ModuleNotFoundError. Now one line naming
    the extra, for the run and its dry run alike, before anything is written."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] == "ray" else real(name, *a))
    out = tmp_path / "run"
    for args in (["run", "--ray", "--dataset", "synthetic", "--max-steps", "2", "--device", "cpu", "--out", out],
                 [*DRY, "--ray"]):
        _one_error_line(invoke(*args), 1, "--ray needs Ray Train, which is not installed", "pip install 'gantrain[tune]'")
    assert not out.exists()


def test_an_out_inside_the_image_folder_is_refused(invoke, tmp_path: Path) -> None:
    """Before: `--data-root imgs --out imgs` trained, and the next run on imgs counted 12 images, not 8: the run's
    own final.png, losses.png, progress.gif and grids (the folder is read with its subfolders). Refused in one line,
    for the folder itself, a subfolder of it and the same folder through a symlink; a folder beside it trains."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(8):
        Image.fromarray(np.full((16, 16, 3), 30 * i, np.uint8)).save(images / f"{i}.png")
    (tmp_path / "link").symlink_to(images)
    common = ["run", "--dataset", "folder", "--data-root", images, "--image-size", "32", "--channels", "3",
              "--batch-size", "4", "--max-steps", "1", "--ngf", "8", "--ndf", "8", "--amp", "off", "--device", "cpu"]
    for out in (images, images / "runs" / "a", tmp_path / "link" / "b"):
        _one_error_line(invoke(*common, "--out", out), 2, f"--out {out} is inside the image folder", "choose a folder outside it")
        _one_error_line(invoke(*common, "--out", out, "--dry-run"), 2, "is inside the image folder")
    assert sorted(p.name for p in images.iterdir()) == [f"{i}.png" for i in range(8)]  # nothing written into it
    result = invoke(*common, "--out", tmp_path / "beside")
    assert result.exit_code == 0, result.output


def test_a_run_refused_at_start_leaves_none_of_the_folders_it_made(invoke, tmp_path: Path) -> None:
    """A refused start removed only the run folder itself: `--out new/a/b` left new/ and new/a/ behind. Now every
    folder the run made goes while empty; a parent that held something before (or got something) stays."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "mine.txt").write_text("x")
    refused = ["run", "--dataset", "folder", "--data-root", tmp_path / "no-images", "--max-steps", "1", "--device",
               "cpu"]
    for out in (tmp_path / "new" / "a" / "b", tmp_path / "kept" / "c" / "d"):
        result = invoke(*refused, "--out", out)
        assert result.exit_code != 0 and result.stderr.startswith("error: "), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["mine.txt"]


def test_the_dry_run_refuses_the_other_idx_dataset_as_the_run_does(invoke, datasets_root: Path,
                                                                    tmp_path: Path) -> None:
    """`--preset mnist32 --data-root .../FashionMNIST --dry-run` counted FashionMNIST's 60,000 images as "mnist
    train split" and exited 0, while the run refuses the files."""
    wrong = datasets_root / "FashionMNIST"
    for extra in (["--dry-run"], []):
        _one_error_line(invoke("run", "--preset", "mnist32", "--data-root", wrong, "--max-steps", "1", "--device",
                               "cpu", "--out", tmp_path / "r", *extra), 2,
                        "is fashion-mnist's train-images-idx3-ubyte, not mnist's")
    assert not (tmp_path / "r").exists()


# ----- refusals found by a new user's try (2026-12-07) ----------------------------------------------------
def test_a_device_other_than_auto_cpu_or_cuda_is_refused_everywhere(invoke) -> None:
    """`generate --device tpu` (and eval, fit-extractor, the API's load_generator) ran on the CPU without a word:
    pick_device sent every unknown name there. Now it refuses it, as `run` did."""
    from gantrain.engine.dist.runtime import pick_device
    from gantrain.engine.errors import ConfigError

    for name in ("tpu", "gpu", "CPU", ""):
        with pytest.raises(ConfigError, match=f"^--device: must be auto, cpu or cuda, got {name!r}$"):
            pick_device(name)
    assert pick_device("cpu").type == "cpu"


def test_seeds_beyond_the_range_are_one_line(invoke) -> None:
    """A seed of 10**20 passed --dry-run and a config file, then ended `run`, `generate` and `eval` in a
    traceback (an overflow inside torch's seeding)."""
    big = str(10**20)
    _one_error_line(invoke("run", "--seed", big, "--dry-run", "--dataset", "synthetic"), 2,
                    "--seed: must be between 0 and 17,592,186,044,415")
    _one_error_line(invoke("generate", "x.pt", "--seed", big), 2, "--seed", "17592186044415")
    _one_error_line(invoke("eval", "x.pt", "--seed", "-1"), 2, "--seed")


def test_config_that_is_a_folder_is_named_as_one(invoke, tmp_path: Path) -> None:
    _one_error_line(invoke("run", "--config", tmp_path, "--dry-run"), 2,
                    f"--config: {tmp_path} is a folder, not a TOML file")
    _one_error_line(invoke("run", "--config", tmp_path / "none.toml", "--dry-run"), 2, "--config: no such file")


def test_the_dry_run_refuses_what_the_run_refuses_at_start(invoke) -> None:
    """`--channels 3` on FashionMNIST and quality metrics on synthetic data passed --dry-run (exit 0); the run
    then refused them (the first with exit 1). Both now exit 2 in both."""
    for extra in ([], ["--dry-run"]):
        _one_error_line(invoke("run", "--channels", "3", "--max-steps", "1", "--device", "cpu", *extra), 2,
                        "--channels: fashion-mnist is grayscale: use --channels 1")
        _one_error_line(invoke("run", "--dataset", "synthetic", "--eval-every", "1", "--max-steps", "1",
                               "--device", "cpu", "--out", "/nonexistent/never", *extra), 2,
                        "--dataset: quality metrics need fashion-mnist, mnist or folder data, not synthetic")


def test_bench_loaders_on_a_folder_without_images_fails_before_any_row(invoke, tmp_path: Path) -> None:
    """It ran all twelve rows (26 s, each failing) before saying the folder held no image."""
    (tmp_path / "empty").mkdir()
    _one_error_line(invoke("bench", "--loaders", "--quick", "--data-root", tmp_path / "empty"), 2,
                    f"no images found below {tmp_path / 'empty'}")


def test_eval_size_bound_is_the_folders_decode_bound() -> None:
    """`eval --size 100000` was killed for memory; a folder of large photographs read at its first image's size
    likewise. Both stop at one bound, the flag's and the default's."""
    import typer.main

    from gantrain.cli import app
    from gantrain.engine.metrics.sets import MAX_DECODE_PX

    command = typer.main.get_command(app).commands["eval"]
    size = next(p for p in command.params if p.name == "size")
    assert size.max == MAX_DECODE_PX == 1024
