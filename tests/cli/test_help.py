"""Every help screen of the app, rendered by Rich at 80 and 120 columns, checked against the help texts it is
made from: no text swallowed as markup or cut off, every option name whole, every option's default shown.

The expectations come from the click parameters (their ``help`` source text, their option names), not from
the rendering, so a help text Rich eats (``[field=value ...]`` is a tag to Rich) or a column it truncates
(``--no-samples-from-b…``) fails here.
"""

from __future__ import annotations

import re

import pytest
from rich.markup import RE_TAGS
from rich.style import Style
from typer.testing import CliRunner

WIDTHS = (80, 120)
BOX = re.compile(r"[│╭╮╰╯─]")


def _commands() -> list[tuple[list[str], object]]:
    """(path, command) for the top level, every command and every sub-group's commands."""
    import typer.main

    from gantrain.cli import app

    found, todo = [], [([], typer.main.get_command(app))]
    while todo:
        path, command = todo.pop()
        found.append((path, command))
        for name, sub in getattr(command, "commands", {}).items():
            todo.append(([*path, name], sub))
    return sorted(found, key=lambda item: item[0])


COMMANDS = _commands()


def _render(path: list[str], width: int, monkeypatch: pytest.MonkeyPatch) -> str:
    from gantrain.cli import app

    monkeypatch.setenv("COLUMNS", str(width))  # typer's Rich console reads it when each help screen is drawn
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    return result.stdout


def _visible_options(command) -> list:
    """The options its help lists (typer's own copy of click's classes: told apart by their kind, not class)."""
    ctx = command.context_class(command, info_name=command.name)
    return [p for p in command.get_params(ctx) if p.param_type_name == "option" and not p.hidden]


def _is_style(tag: str) -> bool:
    if tag.startswith("/"):
        return True
    try:
        Style.parse(tag)
    except Exception:  # noqa: BLE001 - rich raises StyleSyntaxError (and others) for what is no style
        return False
    return True


def shown_text(source: str) -> str:
    """What a help text written for Rich must show: its style tags ([bold], [/]) taken out, escaped brackets
    (``\\[``) as brackets, and any other bracketed text as written (Rich would take it for a tag and drop it)."""
    parts, position = [], 0
    for match in RE_TAGS.finditer(source):
        full, escapes, tag = match.groups()
        parts.append(source[position:match.start()])
        backslashes, escaped = divmod(len(escapes), 2)
        if escaped:
            parts.append("\\" * backslashes + full[len(escapes):])
        elif _is_style(tag):
            parts.append("\\" * backslashes)
        else:
            parts.append(full)
        position = match.end()
    parts.append(source[position:])
    return "".join(parts)


def _words(text: str) -> list[str]:
    return BOX.sub(" ", text).split()


def _missing_words(expected: str, rendered_words: list[str]) -> list[str]:
    """The words of ``expected`` that do not appear, in order, among ``rendered_words`` (a subsequence check:
    wrapping and the other columns may come between them, but no word may be lost or cut)."""
    position, missing = 0, []
    for word in _words(expected):
        try:
            position = rendered_words.index(word, position) + 1
        except ValueError:
            missing.append(word)
    return missing


def _help_sources(command) -> list[tuple[str, str]]:
    """(what, help source) for the command's own help text and each visible option's."""
    import inspect

    sources = []
    if command.help:
        sources.append(("command help", inspect.cleandoc(command.help).partition("\f")[0]))
    for option in _visible_options(command):
        if option.help:
            sources.append((option.opts[0], option.help))
    return sources


def _rows(out: str, options: list) -> dict[str, str]:
    """Each option's row of the rendering (its name lines and the help lines beside and below them), by its first
    name: a row starts at a line that begins with one of the option's names."""
    owner = {name: o.opts[0] for o in options for name in (*o.opts, *o.secondary_opts)}
    rows: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith(("╭", "╰")) or not line.startswith("│"):
            current = None
            continue
        start = re.match(r"│ (?:\* +)?([^\s,]+)", line)  # a name begins the line; wrapped help is indented
        first = start.group(1) if start else None
        if first in owner and owner[first] != current:
            current = owner[first]
        if current is not None:
            rows.setdefault(current, []).append(BOX.sub(" ", line))
    return {name: " ".join(" ".join(lines).split()) for name, lines in rows.items()}


def _takes_no_default(option) -> bool:
    """--help and the eager actions (--version, the completion options) have no default to show; every option
    taking a value, every --x/--no-x pair and every one-sided switch (--quick, --dry-run: off) has."""
    return option.is_eager


CASES = [pytest.param(path, command, width, id=f"{' '.join(path) or 'gantrain'}@{width}")
         for path, command in COMMANDS for width in WIDTHS]


@pytest.mark.parametrize(("path", "command", "width"), CASES)
def test_help_shows_every_help_text_whole(path, command, width, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _render(path, width, monkeypatch)
    assert "…" not in out, f"text cut off with an ellipsis:\n{out}"
    rendered = _words(out)
    for what, source in _help_sources(command):
        missing = _missing_words(shown_text(source), rendered)
        assert not missing, f"{what}: {missing} of {source!r} not shown (taken as markup or cut off):\n{out}"


@pytest.mark.parametrize(("path", "command", "width"), CASES)
def test_help_shows_every_option_name_whole(path, command, width, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _render(path, width, monkeypatch)
    for option in _visible_options(command):
        for name in (*option.opts, *option.secondary_opts):
            assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out), f"{name} not shown whole:\n{out}"


@pytest.mark.parametrize(("path", "command", "width"), CASES)
def test_help_shows_every_default(path, command, width, monkeypatch: pytest.MonkeyPatch) -> None:
    out = _render(path, width, monkeypatch)
    options = _visible_options(command)
    rows = _rows(out, options)
    for option in options:
        if _takes_no_default(option):
            continue
        row = rows.get(option.opts[0])
        assert row is not None, f"no row for {option.opts[0]}:\n{out}"
        assert "[default: " in row or "default" in (option.help or "").lower(), \
            f"{option.opts[0]}: no default shown: {row!r}"


def test_the_checks_catch_what_they_are_for() -> None:
    """The checks above, on made-up renderings: a swallowed tag, a cut word, an ellipsis."""
    source = "'PRESET [field=value ...]' (repeatable; [bold]bold[/] and \\[escaped])"
    assert shown_text(source) == "'PRESET [field=value ...]' (repeatable; bold and [escaped])"
    assert _missing_words(shown_text(source), _words("│ 'PRESET ' (repeatable; bold and [escaped]) │")) == \
        ["[field=value", "...]'"]
    assert not _missing_words(shown_text(source), _words("│ --x   'PRESET [field=value │\n│ --no-x ...]' "
                                                         "(repeatable; bold and [escaped]) │"))
    assert _missing_words("see gantrain/kernels/conv.py", _words("see gantrain/kernels/conv.p…")) == \
        ["gantrain/kernels/conv.py"]


# ----- what the defaults say -------------------------------------------------------------------------------
def _row_of(out: str, command_path: list[str], flag: str) -> str:
    command = dict((tuple(p), c) for p, c in COMMANDS)[tuple(command_path)]
    options = _visible_options(command)
    return _rows(out, options)[next(o.opts[0] for o in options if flag in (*o.opts, *o.secondary_opts))]


def _default_of(row: str) -> str:
    shown = re.findall(r"\[default: (.*?)\]", row)
    assert len(shown) == 1, row
    return shown[0]


def _as_written(value) -> str:
    """A preset's value as the help is expected to write it (bools on/off, lists as comma lists)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def test_run_flags_show_the_default_presets_value_and_whether_presets_differ(monkeypatch) -> None:
    """Each config flag of `run --help` shows the value of the preset `gantrain run` trains without --preset
    (config.resolve's), and "depends on --preset" exactly where some preset holds another value."""
    from dataclasses import fields

    from gantrain.engine.config import PRESETS, SECTION_TYPES, preset, resolve

    default = resolve(None, None, {}).preset
    presets = {name: preset(name) for name in PRESETS}
    out = _render(["run"], 250, monkeypatch)
    empty = {"out": "runs/<preset>", "profile_steps": "off", "data_root": "auto", "metrics_cache": "auto",
             "compile_cache_dir": "auto", "ray_storage": "<out>/ray", "ray_address": "a local Ray"}
    for section, cls in SECTION_TYPES.items():
        for f in fields(cls):
            values = [getattr(getattr(cfg, section), f.name) for cfg in presets.values()]
            value = getattr(getattr(presets[default], section), f.name)
            expected = empty.get(f.name, "none") if value in ("", None) else _as_written(value)
            if len({repr(v) for v in values}) > 1:
                expected += f" with {default}; depends on --preset"
            flag = "--" + f.name.replace("_", "-")
            assert _default_of(_row_of(out, ["run"], flag)) == expected, flag


def test_preset_dependent_defaults_at_80_columns(monkeypatch) -> None:
    from gantrain.engine.config import preset

    out = _render(["run"], 80, monkeypatch)
    assert _default_of(_row_of(out, ["run"], "--batch-size")) == \
        f"{preset('fashion32').data.batch_size} with fashion32; depends on --preset"
    assert preset("fashion32").data.batch_size != preset("fashion32-tuned").data.batch_size
    assert _default_of(_row_of(out, ["run"], "--samples-from-best")) == "off with fashion32; depends on --preset"
    assert _default_of(_row_of(out, ["run"], "--diffaug")) == "none with fashion32; depends on --preset"
    assert _default_of(_row_of(out, ["run"], "--lr-g")) == "0.0002 with fashion32; depends on --preset"
    assert _default_of(_row_of(out, ["run"], "--seed")) == "0"


@pytest.mark.parametrize(("path", "command", "width"), CASES)
def test_on_off_pairs_say_on_or_off(path, command, width, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every --x/--no-x pair of every command shows its default one way: on or off (then, where presets differ,
    which preset's it is)."""
    out = _render(path, width, monkeypatch)
    options = _visible_options(command)
    rows = _rows(out, options)
    for option in options:
        if option.is_flag and option.secondary_opts:
            assert re.fullmatch(r"(on|off)( with \S+; depends on --preset)?", _default_of(rows[option.opts[0]])), \
                option.opts[0]


def test_pairs_name_the_side_that_is_the_default(monkeypatch) -> None:
    from gantrain.engine.config import preset
    from gantrain.tune.settings import TuneSettings

    run = _render(["run"], 80, monkeypatch)
    assert preset("fashion32").perf.channels_last and not preset("fashion32").perf.compile
    assert _default_of(_row_of(run, ["run"], "--channels-last")) == "on"
    assert _default_of(_row_of(run, ["run"], "--compile")) == "off"
    tune = _render(["tune"], 80, monkeypatch)
    assert TuneSettings().baseline and _default_of(_row_of(tune, ["tune"], "--baseline")) == "on"


# ----- tune lists only what it accepts ------------------------------------------------------------------
def test_tune_help_lists_no_option_a_trial_sets_itself(monkeypatch) -> None:
    pytest.importorskip("ray")
    from gantrain.cli import TRIAL_OWNED
    from gantrain.tune.experiment import TRIAL_OWNED as refused

    assert TRIAL_OWNED == set(refused)  # the listing hides exactly what tune refuses
    tune = dict((tuple(p), c) for p, c in COMMANDS)[("tune",)]
    listed = {name for o in _visible_options(tune) for name in (*o.opts, *o.secondary_opts)}
    out = _render(["tune"], 120, monkeypatch)
    for name in refused:
        flag = "--" + name.replace("_", "-")
        assert flag not in listed, flag
        assert not re.search(rf"^│ {re.escape(flag)}(?![\w-])", out, re.MULTILINE), flag  # no row of its own
    assert "╭─ checkpoint options" not in out  # a panel left with nothing is not drawn
    for flag in ("--lr-g", "--epochs", "--eval-every", "--num-samples", "--dist-timeout"):  # what trials take
        assert re.search(rf"^│ {re.escape(flag)}(?![\w-])", out, re.MULTILINE), flag
    run = _render(["run"], 120, monkeypatch)
    assert "--checkpoint-every-minutes" in run and "--ray-workers" in run  # run still lists them


@pytest.mark.parametrize(("args", "flag"), [(["--out", "x"], "--out"), (["--max-steps", "5"], "--max-steps"),
                                            (["--ddp"], "--ddp"), (["--checkpoint-every-minutes", "5"],
                                                                   "--checkpoint-every-minutes")])
def test_tune_still_refuses_a_trial_owned_flag_in_one_line(args, flag, tmp_path, monkeypatch) -> None:
    pytest.importorskip("ray")
    from gantrain.cli import app

    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, ["tune", *args, "--storage", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: not a tune option"), result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("toml", "flag"), [("[run]\nmax_steps = 5\n", "--max-steps"),
                                            ("[dist]\nddp = true\n", "--ddp")])
def test_tune_still_refuses_them_from_a_config_file(toml, flag, tmp_path, monkeypatch) -> None:
    pytest.importorskip("ray")
    from gantrain.cli import app

    config = tmp_path / "base.toml"
    config.write_text(toml)
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, ["tune", "--config", str(config), "--storage", str(tmp_path / "tune")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: "), result.stderr


# ----- texts that were wrong -----------------------------------------------------------------------------
def test_contender_help_shows_its_brackets(monkeypatch) -> None:
    for width in WIDTHS:
        row = _row_of(_render(["bench"], width, monkeypatch), ["bench"], "--contender")
        assert "'PRESET [field=value ...]'" in row, row


def test_logger_help_names_the_files_mlflow_writes(monkeypatch) -> None:
    row = _row_of(_render(["run"], 120, monkeypatch), ["run"], "--logger")
    assert "<run>/mlflow.db" in row and "<run>/mlartifacts" in row and "mlruns" not in row


def test_checkpoint_flags_are_whole_at_80_columns(monkeypatch) -> None:
    out = _render(["run"], 80, monkeypatch)
    names = re.findall(r"--checkpoint-every[\w-]*", out)
    assert {"--checkpoint-every", "--checkpoint-every-steps", "--checkpoint-every-minutes"} <= set(names)
    assert not re.search(r"--checkpoint-every-\W", out)


def test_command_list_keeps_sentences_on_one_line(monkeypatch) -> None:
    """A docstring's line breaks are not the screen's: `export`'s description wraps at the width, not mid-line."""
    out = _render([], 250, monkeypatch)  # wide enough for each description on one line
    assert re.search(r"│ export\s+Export a checkpoint's generator .* for sharing; `gantrain generate` and `gantrain "
                     r"eval` read it like a checkpoint\.", out), out
