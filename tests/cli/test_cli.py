"""The command line: version, help, presets, and one-line errors with the right exit codes.

The ``cli`` fixture runs the typer app in-process with COLUMNS=80, a common terminal width (Rich wraps
and truncates its output to the console width, so the width is pinned to keep these tests stable).
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import gantrain

from gantrain.engine.config import PRESETS, SECTION_TYPES
from gantrain.engine.gan.precision import resolve_amp


def test_version(cli) -> None:
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"gantrain {gantrain.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", gantrain.__version__)


def test_help_lists_commands(cli) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("run", "presets", "generate"):
        assert re.search(rf"│ {command}\s", result.stdout), command
    assert "--version" in result.stdout


def test_no_arguments_shows_help(cli) -> None:
    result = cli()
    assert "Usage" in result.output and "run" in result.output
    assert "Traceback" not in result.output


def test_run_help_lists_the_config_flags(cli) -> None:
    result = cli("run", "--help")
    assert result.exit_code == 0
    for flag in ("--lr-g", "--lr-d", "--label-smoothing", "--resume", "--config", "--preset", "--max-steps",
                 "--batch-size", "--limit", "--data-root", "--sample-every", "--log-every", "--no-strict"):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.stdout), flag
    assert "Adam learning rate of the generator" in result.stdout  # help text from the field docstring


def test_run_help_panels_name_the_sections(cli) -> None:
    out = cli("run", "--help").stdout
    titles = re.findall(r"╭─ (.*?) ─", out)
    sections = ("data", "model", "optim", "loss", "gan", "run", "checkpoint", "logging", "eval", "perf", "dist")
    assert len(titles) == 1 + len(sections)  # the command's own options, then one panel per config section
    for section, title in zip(sections, titles[1:]):
        assert re.fullmatch(rf"\[?{section}\]?( options)?", title), title


def _preset_rows(stdout: str) -> list[str]:
    return [line.split("│")[1].strip() for line in stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip()]


def test_presets_lists_them_all_on_a_wide_terminal(cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "260")
    result = cli("presets")
    assert result.exit_code == 0
    assert _preset_rows(result.stdout) == list(PRESETS)
    cats128 = next(line for line in result.stdout.splitlines() if line.startswith("│ cats128"))
    values = cats128.split("│")[2].strip()
    assert values == "folder 128x128x3, dense, batch 64, lr_g 0.0002, lr_d 5e-05, smoothing 0.1, uniform noise, 215 epochs"
    diffaug = next(line for line in result.stdout.splitlines() if line.startswith("│ cats64-diffaug "))
    assert diffaug.split("│")[2].strip() == ("folder 64x64x3, dcgan, batch 128, lr_g 0.0002, lr_d 0.0002, smoothing 0, "
                                             "normal noise, 50 epochs, DiffAugment color,translation,cutout")
    tuned = next(line for line in result.stdout.splitlines() if line.startswith("│ fashion32-tuned "))
    assert tuned.split("│")[2].strip().startswith("fashion-mnist 32x32x1, dcgan (ngf 64, ndf 32), batch 32, lr_g 0.0015")


def test_presets_lists_them_all_at_80_columns(cli) -> None:
    result = cli("presets")
    assert result.exit_code == 0
    assert _preset_rows(result.stdout)[:len(PRESETS)] == list(PRESETS)
    said = " ".join(result.stdout.split())
    assert ("recommended for fashion32's data: fashion32-tuned: ended its 5-epoch budget at FD 0.59, 0.57 and 0.73 "
            "(3 seeds, each within 10% of its best)") in said and "fashion32 stays as published" in said
    assert ("recommended for cats64's data: cats64-diffaug: ended 6 epochs (~10 min of training) at FD 2.31 and "
            "10.29 against cats64's 25.65 and 22.32") in said


INVALID = [
    (["--lr-g", "0"], "--lr-g"),
    (["--lr-d", "-1"], "--lr-d"),
    (["--label-smoothing", "0.5"], "--label-smoothing"),
    (["--label-smoothing", "-0.1"], "--label-smoothing"),
    (["--image-size", "48"], "--image-size"),
    (["--preset", "nope"], "--preset"),
    (["--batch-size", "abc"], "--batch-size"),  # typer's own type check
]


@pytest.mark.parametrize("args, flag", INVALID, ids=[" ".join(a) for a, _ in INVALID])
def test_invalid_values_exit_2_naming_the_flag(cli, unwrap, tmp_path: Path, args: list[str], flag: str) -> None:
    result = cli("run", *args, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert flag in unwrap(result.output)
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # nothing was started


ONE_LINE = [
    (["--lr-g", "0"], "error: --lr-g: learning rate must be > 0, got 0.0"),
    (["--label-smoothing", "0.5"], "error: --label-smoothing: must be in [0, 0.5), got 0.5"),
    (["--image-size", "48"], "error: --image-size: must be 32, 64 or 128, got 48"),
    (["--preset", "nope"],
     "error: --preset: unknown preset 'nope' (known: fashion32, fashion32-tuned, mnist32, cats64, cats64-diffaug, cats128, dcgan64)"),
]


@pytest.mark.parametrize("args, line", ONE_LINE, ids=["lr-g", "smoothing", "image-size", "preset"])
def test_errors_are_one_line(cli, args: list[str], line: str) -> None:
    result = cli("run", *args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line]


def test_missing_config_file_exits_2(cli, unwrap, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    result = cli("run", "--config", missing, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert f"--config: no such file {missing}" in unwrap(result.stderr)
    assert "Traceback" not in result.output


def test_bad_toml_field_exits_2(cli, unwrap, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[data]\nbatchsize = 3\n")
    result = cli("run", "--config", config, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "unknown field data.batchsize" in unwrap(result.stderr)


def test_generate_on_a_non_checkpoint_exits_1(cli, unwrap, tmp_path: Path) -> None:
    fake = tmp_path / "model.pt"
    fake.write_text("hello, I am not a checkpoint\n")
    result = cli("generate", fake, "--out", tmp_path / "grid.png")
    assert result.exit_code == 1
    message = unwrap(result.stderr)
    assert message.startswith("error:")
    assert f"{fake} is corrupt or not a checkpoint" in message
    assert "Traceback" not in result.output
    assert not (tmp_path / "grid.png").exists()
    missing = cli("generate", tmp_path / "absent.pt", "--out", tmp_path / "grid.png")
    assert missing.exit_code == 1
    assert f"no checkpoint at {tmp_path / 'absent.pt'}" in unwrap(missing.stderr)


def test_generate_refuses_an_out_named_for_another_format(cli, unwrap, tmp_path: Path) -> None:
    """The grid is a PNG: --out x.jpg would have held PNG bytes under a JPEG name; refused before the checkpoint
    is read (which does not exist here), naming the .png to use."""
    for name in ("grid.jpg", "grid.JPEG", "grid.gif"):
        result = cli("generate", tmp_path / "absent.pt", "--out", tmp_path / name)
        assert result.exit_code == 2 and "Traceback" not in result.output
        stem = name.split(".")[0]
        assert f"--out: {tmp_path / name} would hold a PNG grid; name it {stem}.png" in unwrap(result.stderr)
        assert not (tmp_path / name).exists()


def test_error_messages_keep_square_brackets(cli, unwrap, tmp_path: Path) -> None:
    folder = tmp_path / "[cats]"
    result = cli("run", "--dataset", "folder", "--channels", "3", "--data-root", folder, "--out", tmp_path / "run")
    assert result.exit_code == 2  # a wrong --data-root is a wrong setting (before: 1, though the README said 2)
    assert f"image folder {folder} does not exist" in unwrap(result.stderr)


def test_error_with_markup_like_text_is_no_traceback(cli, tmp_path: Path) -> None:
    folder = tmp_path / "a[/]b"
    result = cli("run", "--dataset", "folder", "--channels", "3", "--data-root", folder, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "[/]" in result.stderr


def _all_command_paths() -> list[list[str]]:
    """Every help screen of the app: the top level, each command and each sub-group's commands."""
    import typer.main

    from gantrain.cli import app

    paths, todo = [], [([], typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        paths.append(path)
        for name, sub in getattr(command, "commands", {}).items():
            todo.append(([*path, name], sub))
    return paths


@pytest.mark.parametrize("path", _all_command_paths(), ids=lambda p: " ".join(p) or "gantrain")
def test_flags_show_no_value_placeholder(cli, path: list[str]) -> None:
    """A flag takes no value, so its help row must not show one (typer's default shows `<bool>`)."""
    out = cli(*path, "--help").stdout
    assert "--help" in out
    assert "<bool>" not in out
    help_row = next(line for line in out.splitlines() if "--help" in line)
    assert re.search(r"--help\s+Show this message", help_row), help_row


def test_flags_still_parse_after_the_placeholder_change(cli, unwrap) -> None:
    # --no-strict and --hflip are parsed as flags: an unknown --preset fails after them, not on them
    result = cli("run", "--no-strict", "--hflip", "--preset", "nope")
    assert result.exit_code == 2 and "--preset" in unwrap(result.output)


# ----- gantrain run --dry-run ------------------------------------------------------------------------------
def _dry_rows(stdout: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 3 and "." in cells[0]:
            rows[cells[0]] = (cells[1], cells[2])
    return rows


def test_dry_run_prints_sources_and_schedule_and_touches_nothing(cli, datasets_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    toml = tmp_path / "c.toml"
    toml.write_text("[optim]\nlr_d = 0.0005\n")
    out = tmp_path / "never"
    result = cli("run", "--dry-run", "--preset", "mnist32", "--config", toml, "--data-root", datasets_root,
                 "--lr-g", "1e-3", "--limit", "1000", "--batch-size", "100", "--epochs", "3", "--out", out,
                 "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = _dry_rows(result.stdout)
    assert rows["optim.lr_g"] == ("0.001", "flag --lr-g")
    assert rows["optim.lr_d"][0] == "0.0005" and rows["optim.lr_d"][1].startswith("file ")
    assert rows["data.dataset"] == ("'mnist'", "preset mnist32")
    assert rows["model.nz"] == ("100", "default")
    assert len(rows) == sum(len(fields(cls)) for cls in SECTION_TYPES.values())  # every config field
    # 1000 images // 100 per step = 10 steps per epoch, 3 epochs = 30 steps, worked out by hand
    text = result.stdout
    assert "images: 1000 (mnist train split" in text and "steps per epoch: 10" in text
    assert "total steps: 30 over 3 epoch(s)" in text and "effective batch: 100 per process x 1 process(es) = 100" in text
    amp = resolve_amp("auto", torch.device("cpu"))
    want = "bf16 autocast (auto)" if amp == "bf16" else "fp32 (auto: bf16 is not faster on this CPU)"
    assert f"precision: {want}, channels-last on cpu" in text
    assert not out.exists()


def test_dry_run_refuses_an_impossible_precision_before_printing(cli, unwrap, train_root: Path,
                                                                   tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("fp16 is possible here")
    result = cli("run", "--dry-run", "--data-root", train_root, "--amp", "fp16", "--device", "auto",
                 "--out", tmp_path / "never")
    assert result.exit_code == 2, result.output
    assert "fp16 needs CUDA" in unwrap(result.output) and "│" not in result.output and "Traceback" not in result.output


def test_dry_run_schedule_under_ddp_and_max_steps(cli, train_root: Path, tmp_path: Path) -> None:
    result = cli("run", "--dry-run", "--data-root", train_root, "--limit", "1000", "--batch-size", "100",
                 "--ddp", "--nproc", "2", "--max-steps", "7", "--out", tmp_path / "never")
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.stdout)
    # 1000 // (100 x 2) = 5 steps per epoch; 20 epochs = 100 steps, capped at 7: into the second epoch, as the
    # run's progress counts them (epoch 2/2)
    assert "effective batch: 100 per process x 2 process(es) = 200" in text and "steps per epoch: 5" in text
    assert "total steps: 7 over 2 epoch(s) (capped by --max-steps 7; 20 epoch(s) would be 100)" in text
    assert not (tmp_path / "never").exists()


def test_dry_run_refuses_a_schedule_without_a_step(cli, unwrap, train_root: Path, tmp_path: Path) -> None:
    result = cli("run", "--dry-run", "--data-root", train_root, "--limit", "50", "--batch-size", "64",
                 "--out", tmp_path / "never")
    assert result.exit_code == 2 and "--limit" in unwrap(result.output) and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--bogus"], "error: No such option: --bogus"),
    (["generate"], "error: Missing argument 'checkpoint'."),
    (["bench", "--repeats", "x"], "error: Invalid value for '--repeats'"),
    (["nosuch"], "error: No such command 'nosuch'."),
    (["metrics", "fit-extractor", "--bogus"], "error: No such option: --bogus"),
])
def test_usage_errors_are_one_error_line_with_exit_2(cli, args, message) -> None:
    """Click's own usage errors too: one line naming the command's --help, no usage block, no boxed panel."""
    result = cli(*args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(message) and lines[0].endswith("--help')") and "╭" not in result.output
