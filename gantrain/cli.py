"""The ``gantrain`` command line: a thin typer + rich layer over the engine.

``gantrain run`` takes every config field as a kebab-case flag, generated from the config tree so flags,
help text (the field docstrings) and TOML keys never drift apart. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from gantrain import __version__
from gantrain.engine.config import (LIST_FIELDS, PRESETS, RECOMMENDED, SECTION_TYPES, SEED_MAX, field_docs,
                                    field_index, preset, recommended_measured, resolve)
from gantrain.engine.errors import ConfigError, GantrainError, Interrupted


def _flags_as_flags(params: list) -> list:
    """Flags (``--quick``, ``--amp/--no-amp``, ``--help``) get an empty placeholder: typer shows ``<bool>``
    for them otherwise, as if they took a value; a one-sided switch (``--quick``: off unless given) shows its
    default, off, as every other option does."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        if getattr(param, "is_flag", False) and not param.secondary_opts and not param.is_eager \
                and param.default is False and not isinstance(param.show_default, str):
            param.show_default = "off"
    return params


def _one_line_paragraphs(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line: in Rich markup mode typer keeps a docstring's single line breaks
    (in the list of commands and below a command's first paragraph), breaking its sentences mid-line."""
    if not text:
        return text
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def _options_panel(*, name, params, ctx, markup_mode, console, typer_panel) -> None:
    """typer's panel of options with every option name whole: the names in one column Rich never shrinks (an on/off
    pair's --no-x under its --x, short names after the long ones), the type beside them (a range below it), and the
    help column wrapping in what is left. typer's own table gives --x and --no-x a column each and, at 80 columns,
    cuts long names (--no-samples-from-b…). A string ``show_default`` is shown as written (typer wraps it in
    parentheses). Panels of arguments, and a typer without what this reads, get typer's own panel."""
    from typer import rich_utils as ru

    if not params:  # a panel whose options are all hidden (tune's checkpoint options)
        return None
    if any(p.param_type_name != "option" for p in params):
        return typer_panel(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)
    try:
        rows = []
        for param in params:
            long_names = [o for o in param.opts if o.startswith("--")]
            names = ru.highlighter(", ".join(long_names + [o for o in param.opts if o not in long_names]))
            if param.secondary_opts:
                names.append("\n")
                names.append_text(ru.negative_highlighter(", ".join(param.secondary_opts)))
            kind = Text(param.display_type_rich(ctx=ctx) or "", style=ru.STYLE_TYPES)
            value_range = param._get_number_range_help_str()
            if value_range:
                kind.append(f"\n[{value_range}]")
            help_cell = ru._get_parameter_help(param=param, ctx=ctx, markup_mode=markup_mode)
            for i, item in enumerate(help_cell.renderables):
                if isinstance(param.show_default, str) and isinstance(item, Text) and \
                        item.plain == ru.DEFAULT_STRING.format(f"({param.show_default})"):
                    help_cell.renderables[i] = Text(ru.DEFAULT_STRING.format(param.show_default),
                                                    style=ru.STYLE_OPTION_DEFAULT)
            rows.append((Text("*", style=ru.STYLE_REQUIRED_SHORT) if param.required else "", names,
                         ru.types_highlighter(kind), help_cell))
    except (AttributeError, TypeError):  # another typer's internals: its own panel
        return typer_panel(name=name, params=params, ctx=ctx, markup_mode=markup_mode, console=console)
    table = Table(highlight=True, show_header=False, expand=True, box=None, pad_edge=False, padding=(0, 1))
    required = any(param.required for param in params)
    if required:
        table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(no_wrap=True)
    table.add_column(ratio=1)
    for row in rows:
        table.add_row(*(row if required else row[1:]))
    from rich.panel import Panel

    console.print(Panel(table, border_style=ru.STYLE_OPTIONS_PANEL_BORDER, title=name,
                        title_align=ru.ALIGN_OPTIONS_PANEL))


@contextlib.contextmanager
def _whole_option_names():
    """typer's help with :func:`_options_panel` for its options panels, while one help screen is drawn."""
    from typer import rich_utils

    typer_panel = getattr(rich_utils, "_print_options_panel", None)
    if typer_panel is None:
        yield
        return
    rich_utils._print_options_panel = functools.partial(_options_panel, typer_panel=typer_panel)
    try:
        yield
    finally:
        rich_utils._print_options_panel = typer_panel


def _click_exception_modules() -> list:
    """typer 0.29 vendors click (``typer._click``, and no longer depends on the click package); older typers use
    the click package: the exception modules of whichever are present."""
    modules = []
    vendored = getattr(typer.core, "_click", None)
    if vendored is not None:
        modules.append(vendored.exceptions)
    try:
        modules.append(importlib.import_module("click.exceptions"))
    except ImportError:  # not installed: typer does without it
        pass
    return modules


_CLICKS = _click_exception_modules()
_USAGE_ERRORS = tuple(module.UsageError for module in _CLICKS)
_NO_ARGS_IS_HELP = tuple(module.NoArgsIsHelpError for module in _CLICKS if hasattr(module, "NoArgsIsHelpError"))


def _usage_error_in_one_line(make_context):
    """Click's usage errors (an unknown option, a missing or invalid value) as one ``error:`` line naming the
    command's help, exit 2, instead of the usage block and a boxed panel."""

    @functools.wraps(make_context)
    def wrapper(self, info_name, args, parent=None, **extra):
        try:
            return make_context(self, info_name, args, parent=parent, **extra)
        except _USAGE_ERRORS as exc:
            if isinstance(exc, _NO_ARGS_IS_HELP):
                raise  # no_args_is_help: the help itself
            where = f"{parent.command_path} {info_name}" if parent is not None else info_name
            raise fail(f"{exc.format_message()} (see '{where} --help')", 2) from None

    return wrapper


class FlagCommand(typer.core.TyperCommand):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _one_line_paragraphs(self.help)

    def get_params(self, ctx):
        return _flags_as_flags(super().get_params(ctx))

    def format_help(self, ctx, formatter):
        with _whole_option_names():
            return super().format_help(ctx, formatter)

    make_context = _usage_error_in_one_line(typer.core.TyperCommand.make_context)


class FlagGroup(typer.core.TyperGroup):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.help = _one_line_paragraphs(self.help)

    def get_params(self, ctx):
        return _flags_as_flags(super().get_params(ctx))

    def format_help(self, ctx, formatter):
        with _whole_option_names():
            return super().format_help(ctx, formatter)

    make_context = _usage_error_in_one_line(typer.core.TyperGroup.make_context)

    def resolve_command(self, ctx, args):
        """An unknown command as one ``error:`` line, as other usage errors."""
        try:
            return super().resolve_command(ctx, args)
        except _USAGE_ERRORS as exc:
            raise fail(f"{exc.format_message()} (see '{ctx.command_path} --help')", 2) from None

    def invoke(self, ctx):
        """A Ctrl-C that no command handles itself (training, tune and bench do) is one line and exit 130, not
        click's "Aborted!" with exit 1."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise fail("interrupted by SIGINT (Ctrl-C)", 128 + signal.SIGINT) from None


# typer's own --install-completion/--show-completion take no shell name (they detect the shell, and print nothing
# useful where that fails): gantrain's name it (main_callback), so typer's are left off.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich", cls=FlagGroup,
                  help="gantrain: fast DCGAN training. Run [bold]gantrain run[/] to train the fashion32 default.")
console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    # plain Text (not markup): paths may hold brackets; soft_wrap keeps the message on one line
    console.print(Text.assemble(("error:", "bold red"), " " + message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


def write_json(data: Any, path: str) -> None:
    """``data`` as JSON (``--json PATH``): alone on stdout for '-', else into the file PATH, named on stderr."""
    text = json.dumps(data, indent=2)
    if path == "-":
        print(text)
        return
    from gantrain.engine.state.files import atomic_write_text

    written = atomic_write_text(Path(path), text + "\n")
    console.print(f"wrote {written}", markup=False, highlight=False)


@contextlib.contextmanager
def stdout_to_stderr(active: bool):
    """With ``--json -`` stdout holds the JSON alone: while ``active``, whatever else the command prints (tables,
    progress, notes) goes to stderr."""
    if not active:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def user_errors(func):
    """Turns :class:`GantrainError` (and any stray ``OSError``) into one printed line and its exit code, never a
    traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except GantrainError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:  # the last net: every I/O failure is one line naming the path and the reason
            from gantrain.engine.state.files import os_reason

            where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
            raise fail(f"{where + ': ' if where else ''}{os_reason(exc)}", 1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"gantrain {__version__}")
        raise typer.Exit()


SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def _completion(ctx, param, value: str | None) -> None:
    """--install-completion / --show-completion SHELL: typer's actions for SHELL; another shell name is one error
    line."""
    if value is None or ctx.resilient_parsing:
        return
    if value not in SHELLS:
        raise fail(f"{param.opts[0]}: no completion for shell {value!r}; one of {', '.join(SHELLS)}", 2)
    from typer import completion

    action = completion.install_callback if param.name == "install_completion" else completion.show_callback
    action(ctx, param, value)


def _completion_classes() -> None:
    """Registers typer's shell-completion classes (what a script of --show-completion asks, through
    _GANTRAIN_COMPLETE, when the shell completes a word): typer does so itself only with its own options on."""
    try:
        from typer.completion import completion_init
    except ImportError:  # a typer without them: click's own classes answer
        return
    completion_init()


_completion_classes()


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    install_completion: Annotated[Optional[str], typer.Option(
        "--install-completion", metavar="SHELL", callback=_completion, is_eager=True, expose_value=False,
        help=f"Install tab completion of gantrain's commands and options for SHELL ({', '.join(SHELLS)}) and "
             "exit.")] = None,
    show_completion: Annotated[Optional[str], typer.Option(
        "--show-completion", metavar="SHELL", callback=_completion, is_eager=True, expose_value=False,
        help="Print the completion script for SHELL, to install it by hand, and exit.")] = None,
) -> None:
    """gantrain: fast DCGAN training, benchmarking and tuning."""
    from gantrain.engine.outputs.runlog import setup_logging

    setup_logging(console)  # every command's log lines (a folder's summary, a warning) on the console, one format


def _option_flags(target: str, specs: list[tuple[str, type, str, str, str]], hidden: frozenset[str] = frozenset()):
    """A decorator adding one keyword option per ``(name, type, help, panel, default)`` spec to a command's
    signature (default None: not given; booleans as --x/--no-x; ``default``: what its help shows as the default;
    the ``hidden`` ones still parse but are not listed), passed on together as a dict in its ``target``
    parameter."""
    names = [spec[0] for spec in specs]

    def decorate(func):
        sig = inspect.signature(func, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != target]
        for name, typ, doc, panel, default in specs:
            flag = "--" + name.replace("_", "-")
            option = typer.Option(f"{flag}/--no-{flag[2:]}" if typ is bool else flag, help=escape(doc),
                                  rich_help_panel=panel, show_default=default, hidden=name in hidden,
                                  metavar="<names>" if typ == list[str] else None)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[Optional[typ], option]))

        @functools.wraps(func)
        def wrapper(**kwargs):
            chosen = {k: kwargs.pop(k) for k in names if k in kwargs}
            # a repeatable comma-list flag arrives as a list: one comma list, or None when not given
            chosen = {k: (",".join(v) or None) if isinstance(v, list) else v for k, v in chosen.items()}
            return func(**kwargs, **{target: chosen})

        wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


#: The preset `gantrain run` trains without --preset (config.resolve), whose values the run flags show as defaults.
DEFAULT_PRESET = "fashion32"
#: What an empty value of these fields means, shown as their default (their help says more).
EMPTY_MEANS = {"out": "runs/<preset>", "data_root": "auto", "metrics_cache": "auto", "compile_cache_dir": "auto",
               "ray_storage": "<out>/ray", "ray_address": "a local Ray", "profile_steps": "off"}


def shown_default(value: Any, name: str = "") -> str:
    """A default as a person reads it: on/off, a comma list, ``none`` (or what :data:`EMPTY_MEANS` says) for
    nothing, numbers as written (2e-4 as 0.0002, 30.0 as 30)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == "" or value == ():
        return EMPTY_MEANS.get(name, "none")
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return str(value)


@functools.cache
def _config_specs() -> tuple[tuple[str, type, str, str, str], ...]:
    """One flag spec per config field: its help (the field docstring) and its default, the default preset's value
    and, where the presets differ, that it depends on --preset. Made once (`run` and `tune` share them): reading
    the docstrings parses each section's source."""
    presets = {name: preset(name) for name in PRESETS}
    docs = {section: field_docs(cls) for section, cls in SECTION_TYPES.items()}
    specs = []
    for name, (section, typ) in field_index().items():
        values = [getattr(getattr(cfg, section), name) for cfg in presets.values()]
        default = shown_default(getattr(getattr(presets[DEFAULT_PRESET], section), name), name)
        if any(value != values[0] for value in values):
            default = f"{default} with {DEFAULT_PRESET}; depends on --preset"
        specs.append((name, list[str] if name in LIST_FIELDS else typ, docs[section].get(name, ""),
                      f"{section} options", default))
    return tuple(specs)


#: Run options a tune trial sets itself (gantrain/tune/experiment.py: TRIAL_OWNED, which refuses them with the
#: option that does the job): `gantrain tune` parses them, to refuse them in one line, but does not list them.
TRIAL_OWNED = frozenset({
    "out", "max_steps", "checkpoint_every", "checkpoint_every_steps", "checkpoint_every_minutes", "keep_checkpoints",
    "ddp", "nproc", "nnodes", "node_rank", "master_addr", "master_port", "sync_bn", "rdzv_endpoint", "rdzv_id",
    "max_restarts", "ray", "ray_address", "ray_workers", "gpus_per_worker", "cpus_per_worker", "ray_storage",
    "ray_wait", "eval_every_steps", "eval_every_images"})


def config_flags(func=None, *, hidden: frozenset[str] = frozenset()):
    """Adds one option per config field (default None = 'keep the preset/TOML value'), passed on as ``overrides``;
    ``hidden``: fields the command parses but does not list."""
    if func is None:
        return functools.partial(config_flags, hidden=hidden)
    return _option_flags("overrides", list(_config_specs()), hidden)(func)


@app.command("run", no_args_is_help=False, cls=FlagCommand)
@config_flags
@user_errors
def run_command(
    preset: Annotated[Optional[str], typer.Option(show_default=DEFAULT_PRESET, help="Preset to start from (see `gantrain presets`).")] = None,
    config: Annotated[Optional[Path], typer.Option(show_default="none", help="TOML config (e.g. a run's config.toml) applied over the preset.")] = None,
    resume: Annotated[Optional[str], typer.Option(show_default="a new run", help="Continue a run: 'auto' (the --out folder's last.pt) or a checkpoint path; without --preset or --config, with the config stored in the checkpoint, the flags over it.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config (and where each value came from: preset, file, flag) and the schedule, then exit without training or touching the run folder.")] = False,
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="<path>", show_default="off", help="With --dry-run: also write the resolved config, where each value came from and the schedule as one JSON object to this file; '-' writes only the JSON to stdout (the table goes to stderr).")] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Train a DCGAN. Bare `gantrain run` trains the fashion32 preset."""
    if json_path is not None and not dry_run:
        raise ConfigError("--json: writes what --dry-run prints; give --dry-run too (a training run records itself "
                          "in its run folder: config.toml, metrics.jsonl)")
    from gantrain.engine.outputs.runlog import discard_held, setup_logging
    from gantrain.engine.state.checkpoint import resolve_run

    setup_logging(console, pending=True)  # resume_base's line, held for the run's train.log
    try:
        config_file, flags = str(config) if config else None, overrides or {}
        cfg, resumed = resolve_run(preset, config_file, resume, flags)  # resumed: the checkpoint's config, or None
        if dry_run:
            from gantrain.engine.train import dryrun

            sources = dryrun.value_sources(preset, config_file, flags, resumed)
            changes = dryrun.refusals(cfg, resume)  # what the run would refuse, refused here too
            schedule = dryrun.plan(cfg)
            plan = dryrun.as_dict(cfg, sources, schedule, resume, changes) if json_path is not None else None
            dryrun.show(cfg, sources, schedule, Console(stderr=json_path == "-"), resume, changes)
            if plan is not None:
                write_json(plan, json_path)
            return
        from gantrain.engine.dist.launch import train

        train(cfg, resume=resume, console=console)
    finally:
        discard_held()  # what no train.log took (a dry run, a refusal, a launcher's) is not the next run's


@app.command("presets", cls=FlagCommand)
@user_errors
def presets_command(
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="<path>", show_default="off", help="Also write every preset's description, full config and recommended recipe as JSON to this file; '-' writes only the JSON to stdout (the table goes to stderr).")] = None,
) -> None:
    """List the presets and their key values."""
    from gantrain.engine.config import ModelConfig, OptimConfig, preset as build_preset

    shown = Console(stderr=json_path == "-")
    table = Table(title="gantrain presets", show_lines=True)
    table.add_column("preset", no_wrap=True, style="bold")
    table.add_column("key values")
    table.add_column("description")
    for name, (_, description) in PRESETS.items():
        c = build_preset(name)
        widths = (c.model.ngf, c.model.ndf)
        width = f" (ngf {widths[0]}, ndf {widths[1]})" if widths != (ModelConfig.ngf, ModelConfig.ndf) else ""
        values = (f"{c.data.dataset} {c.data.image_size}x{c.data.image_size}x{c.data.channels}, {c.model.arch}{width}, "
                  f"batch {c.data.batch_size}, lr_g {c.optim.lr_g:g}, lr_d {c.optim.lr_d:g}, "
                  f"smoothing {c.loss.label_smoothing:g}, {c.loss.noise} noise, {c.run.epochs} epochs")
        values += f", G {c.gan.ema_words()}" if c.gan.ema_on else ""
        values += f", FD every {c.eval.eval_every} epoch(s)" if c.eval.eval_every else ""
        values += ", final samples from best.pt" if c.eval.samples_from_best else ""
        values += f", DiffAugment {','.join(c.gan.diffaug)}" if c.gan.diffaug else ""
        values += f", {c.loss.r1_words()}" if c.loss.r1_gamma else ""
        betas = (c.optim.beta1, c.optim.beta2)
        values += f", Adam betas ({betas[0]:g}, {betas[1]:g})" if betas != (OptimConfig.beta1, OptimConfig.beta2) else ""
        if c.optim.lr_decay != "none":
            values += f", {c.optim.lr_decay} lr decay"
            values += f" after {c.optim.lr_decay_start:.0%} of the run" if c.optim.lr_decay_start else ""
        table.add_row(name, values, description)
    shown.print(table)
    measured = {better: recommended_measured().get(better, "its recipe reached good samples soonest")
                for better in RECOMMENDED.values()}
    for plain, better in RECOMMENDED.items():
        shown.print(f"recommended for {plain}'s data: {better}: {measured[better]} (`gantrain bench --to-quality`; "
                    f"README, \"Time to quality\"); {plain} stays as published, the reference to compare with",
                    soft_wrap=True)
    if json_path is not None:
        write_json({"default": DEFAULT_PRESET,
                    "presets": {name: {"description": description, "recommended": RECOMMENDED.get(name),
                                       "config": build_preset(name).to_dict()}
                                for name, (_, description) in PRESETS.items()},
                    "recommended": {plain: {"preset": better, "measured": measured[better]}
                                    for plain, better in RECOMMENDED.items()}}, json_path)


@app.command("generate", cls=FlagCommand)
@user_errors
def generate_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `gantrain run` (e.g. runs/fashion32/checkpoints/last.pt), or a generator written by `gantrain export`.")],
    n: Annotated[Optional[int], typer.Option("-n", "--num", min=1, help="Number of images: 0..N-1 of the seed (default 64; 8 per row with --truncation-grid).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Pick images by index instead of -n: numbers and ranges, comma-separated, e.g. 0-63,100, in this order, each once; image i is the same as in a plain -n run (default: -n's 0..N-1).")] = None,
    truncation: Annotated[Optional[str], typer.Option(metavar="PSI", help="Truncation trick, PSI > 0: normal noise redrawn until |z| <= PSI (a truncated normal; PSI 1 truncates to [-1, 1]); uniform noise scaled to U(-PSI, PSI) when PSI < 1 (default: off; inf is off).")] = None,
    truncation_grid: Annotated[Optional[str], typer.Option(metavar="PSIS", help="One grid with a row per PSI (comma-separated, e.g. 0.5,0.7,1,inf; inf: untruncated) of the same images (default: off).")] = None,
    interpolate: Annotated[Optional[tuple[str, str]], typer.Option(metavar="A B", help="Interpolate from image A to image B of the seed (slerp for normal noise, lerp for uniform): a row of --frames images at --out and a GIF at --out with .gif (default: off).")] = None,
    walk: Annotated[Optional[str], typer.Option(metavar="I,J,...", help="A latent walk through images, e.g. 3,17,42,3: each consecutive pair interpolated as --interpolate, a grid row per pair and one GIF (default: off).")] = None,
    frames: Annotated[Optional[int], typer.Option(help="With --interpolate or --walk: images per pair, both ends included (default 8).")] = None,
    out: Annotated[Path, typer.Option(help="Output grid, a PNG (a name ending in .png, or without an extension).")] = Path("grid.png"),
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the noise.")] = 0,
    individual: Annotated[Optional[Path], typer.Option(help="Also write each image as its own PNG into this folder, named by its index (image 100: 000100.png) (default: off).")] = None,
    nrow: Annotated[Optional[int], typer.Option(min=1, help="Images per grid row (default 8).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw generator even if the checkpoint has an EMA one (default: the EMA one).")] = False,
) -> None:
    """Generate images from a saved generator, without the dataset: a grid, a truncation grid or an interpolation."""
    from gantrain.engine.outputs import generate as gen

    modes = {"--interpolate": interpolate, "--walk": walk, "--truncation-grid": truncation_grid}
    chosen = [flag for flag, value in modes.items() if value is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{chosen[0]} and {chosen[1]}: give one of them")
    mode = chosen[0] if chosen else None
    options = {"-n": n, "--seeds": seeds, "--truncation": truncation, "--individual": individual, "--nrow": nrow,
               "--frames": frames}
    usable = {None: {"-n", "--seeds", "--truncation", "--individual", "--nrow"}, "--truncation-grid": {"-n", "--seeds"},
              "--interpolate": {"--truncation", "--frames"}, "--walk": {"--truncation", "--frames"}}[mode]
    wrong = [flag for flag, value in options.items() if value is not None and flag not in usable]
    if wrong:
        raise ConfigError(f"{wrong[0]}: " + (f"not used with {mode}" if mode else "only with --interpolate or --walk"))
    psi = None if truncation is None else gen.parse_truncations(truncation, "--truncation")
    if psi is not None and len(psi) > 1:
        raise ConfigError(f"--truncation: one PSI, got {truncation!r} (--truncation-grid takes several)")
    psi = psi[0] if psi else None
    common = dict(out=out, seed=seed, device=device, use_ema=not no_ema)
    if mode == "--truncation-grid":
        result = gen.truncation_grid(checkpoint, truncation_grid, n=n, seeds=seeds, **common)
        rows = len(gen.parse_truncations(truncation_grid))
        console.print(f"wrote {result.grid} ({rows} rows of {len(result.indices)} images, one per psi)")
    elif mode is not None:
        points = walk if mode == "--walk" else [gen.parse_indices(i, mode, ranges=False)[0] for i in interpolate]
        found = gen.interpolate(checkpoint, points, frames=8 if frames is None else frames, truncation=psi,
                                **common)
        pairs = len(found.indices) - 1
        console.print(f"wrote {found.grid} ({pairs} row{'s' if pairs > 1 else ''} of {found.frames} frames) and "
                      f"{found.gif} ({pairs * (found.frames - 1) + 1} frames)")
    else:
        result = gen.generate(checkpoint, n=n, seeds=seeds, truncation=psi, individual=individual,
                              nrow=8 if nrow is None else nrow, **common)
        each = f", {len(result.individual)} files in {individual}" if individual else ""
        console.print(f"wrote {result.grid} ({len(result.indices)} images{each})")


@app.command("export", cls=FlagCommand)
@user_errors
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint written by `gantrain run`.")],
    out: Annotated[Path, typer.Option(help="Output file (safetensors): the generator's weights and its config as metadata.")] = Path("generator.safetensors"),
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Export the raw generator even if the checkpoint has an EMA one.")] = False,
) -> None:
    """Export a checkpoint's generator (its EMA copy when present) as one safetensors file for sharing;
    `gantrain generate` and `gantrain eval` read it like a checkpoint."""
    from gantrain.engine.outputs.export import export_generator

    path, which = export_generator(checkpoint, out, use_ema=not no_ema)
    console.print(f"wrote {path} ({'EMA' if which == 'ema' else 'raw'} generator, {path.stat().st_size / 1e6:.1f} MB)")


_CACHE_HELP = ("Extractor and real-feature cache (default: $GANTRAIN_CACHE, else $XDG_CACHE_HOME/gantrain/metrics, else "
               "~/.cache/gantrain/metrics).")


@app.command("eval", cls=FlagCommand)
@user_errors
def eval_command(
    source: Annotated[Optional[str], typer.Argument(metavar="SOURCE", show_default=False, help="What to evaluate: a checkpoint written by `gantrain run`, an exported generator, or an image folder (optional with --real-vs-real --dataset). With --save-stats: the reference to save (a folder, or fashion-mnist, mnist, folder:PATH).")] = None,
    reference: Annotated[Optional[str], typer.Argument(metavar="REFERENCE", show_default=False, help="What to compare with: an image folder, a .npz from --save-stats, or a dataset's test split (fashion-mnist, mnist, folder:PATH). Default: the checkpoint's (or --dataset's) test split.")] = None,
    n: Annotated[int, typer.Option("-n", "--num", min=100, help="Generated images (with --real-vs-real: images per real half, at most half the test split); an image folder gives its own.")] = 10000,
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="<path>", show_default="off", help="Also write the results as JSON to this file; '-' writes only the JSON to stdout (tables and progress go to stderr).")] = None,
    real_vs_real: Annotated[bool, typer.Option("--real-vs-real", help="Sanity mode: compare two disjoint halves of the real test split (each metric's floor).")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="The domain extractor (and, without REFERENCE, the test split) to use: fashion-mnist, mnist or folder:PATH. Default: the checkpoint's, else REFERENCE's.")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Data folder (default: the checkpoint's, then $GANTRAIN_DATA).")] = None,
    channels: Annotated[Optional[int], typer.Option(min=1, max=3, show_default="3", help="Channels of image folders: 1 or 3.")] = None,
    size: Annotated[Optional[int], typer.Option(min=8, max=1024, help="Decode image folders at this size, in px (default: the first image's shorter side, at most 1024).")] = None,
    save_stats: Annotated[Optional[Path], typer.Option("--save-stats", show_default="off", help="Save SOURCE's reference statistics (domain features; with --inception also Inception mu/sigma) to this .npz for later `gantrain eval X FILE.npz`.")] = None,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the generator noise and the KID subsets.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    inception: Annotated[bool, typer.Option("--inception", help="Also the standard FID and KID in Inception-v3 features (the fid extra; no download; about 0.3 s per image on a CPU).")] = False,
    inception_mode: Annotated[str, typer.Option(help="With --inception: legacy-tf (TF1 bilinear resize, as TTUR/pytorch-fid and most published FID tables) or clean (Pillow bicubic, as clean-fid's clean tables).")] = "legacy-tf",
    metrics_cache: Annotated[Optional[str], typer.Option(help=_CACHE_HELP)] = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw generator even if the checkpoint has an EMA one.")] = False,
) -> None:
    """Quality metrics (FD, KID, precision/recall/density/coverage, classifier score; Inception FID with --inception)
    of a checkpoint, an exported generator or an image folder against a dataset's test split, a folder or saved
    statistics."""
    import time

    from gantrain.engine.config import env_data_root
    from gantrain.engine.metrics.report import (evaluate_checkpoint, evaluate_real, evaluate_sets, real_config,
                                                render, stats_for, strict_json, write_json)
    from gantrain.engine.metrics.sets import parse_side

    started = time.perf_counter()
    to_stdout = json_path == "-"
    shown = console if to_stdout else Console()  # with --json -, stdout holds the JSON alone
    root = data_root or env_data_root()
    folder_flags = [flag for flag, value in (("--size", size), ("--channels", channels)) if value is not None]
    channels = 3 if channels is None else channels
    if save_stats is not None:
        if source is None or reference is not None or real_vs_real:
            raise fail("--save-stats: give one SOURCE, the reference to save (a folder or a dataset)", 2)
        path, count = stats_for(parse_side(source, channels, root), save_stats, dataset=dataset, channels=channels,
                                data_root=root, cache=metrics_cache, device=device, inception=inception, size=size,
                                console=console, inception_mode=inception_mode)
        console.print(f"wrote {path} (statistics of {count} images{', with Inception' if inception else ''}; "
                      f"{time.perf_counter() - started:.1f} s)")
        return
    if real_vs_real:
        if folder_flags:  # the halves are a dataset's test split, read at the run's (or the preset's) size
            raise fail(f"{folder_flags[0]}: not used with --real-vs-real: its halves are read as the dataset's "
                       "run reads them", 2)
        checkpoint = Path(source) if source else None
        result = evaluate_real(real_config(checkpoint, dataset, data_root), num_samples=n, seed=seed,
                               data_root=data_root, cache=metrics_cache, console=console, inception=inception,
                               inception_mode=inception_mode)
    elif source is None:
        raise fail("give a SOURCE to evaluate (a CHECKPOINT, an exported generator or an image folder), or "
                   "--real-vs-real", 2)
    else:
        side = parse_side(source, channels, root)
        if side.kind == "checkpoint" and reference is None and dataset is None:
            if folder_flags:  # before: ignored without a word
                raise fail(f"{folder_flags[0]}: reads image folders; {source} makes its images at its training "
                           "size and channels", 2)
            result = evaluate_checkpoint(side.path, num_samples=n, seed=seed, device=device, data_root=data_root,
                                         cache=metrics_cache, use_ema=not no_ema, inception=inception,
                                         console=console, inception_mode=inception_mode)
        else:
            result = evaluate_sets(side, parse_side(reference, channels, root) if reference else None,
                                   dataset=dataset, channels=channels, num_samples=n, seed=seed, device=device,
                                   data_root=data_root, cache=metrics_cache, use_ema=not no_ema,
                                   inception=inception, size=size, console=console, inception_mode=inception_mode)
    result.total_seconds = time.perf_counter() - started
    for table in render(result):
        shown.print(table)
    if to_stdout:
        print(strict_json(result))
    elif json_path:
        console.print(f"wrote {write_json(result, Path(json_path))}")


metrics_app = typer.Typer(no_args_is_help=True, cls=FlagGroup, help="Quality-metric tools: the domain feature extractors.")
app.add_typer(metrics_app, name="metrics")


@metrics_app.command("fit-extractor", cls=FlagCommand)
@user_errors
def fit_extractor_command(
    dataset: Annotated[str, typer.Option(help="fashion-mnist, mnist, or folder:PATH (unlabelled images: a self-supervised rotation classifier).")] = "fashion-mnist",
    data_root: Annotated[Optional[str], typer.Option(help="Folder holding FashionMNIST/raw or MNIST/raw (default: $GANTRAIN_DATA, then the download cache).")] = None,
    channels: Annotated[int, typer.Option(min=1, max=3, help="Channels of a folder dataset: 1 or 3.")] = 3,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Training epochs of the fit (default 3).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Fit again even when the cache holds one for this data.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    metrics_cache: Annotated[Optional[str], typer.Option(help=_CACHE_HELP)] = None,
) -> None:
    """Fit a dataset's feature extractor (or find it in the cache) and print its test accuracy."""
    from gantrain.engine.config import env_data_root
    from gantrain.engine.dist.runtime import pick_device
    from gantrain.engine.metrics import ensure_extractor, parse_dataset

    spec = parse_dataset(dataset, data_root or env_data_root(), channels)
    extra = {"epochs": epochs} if epochs else {}
    extractor = ensure_extractor(spec, cache=metrics_cache, device=pick_device(device), console=console, force=force,
                                 **extra)
    info = extractor.info
    how = f"fitted in {info['fit_seconds']:.0f} s" if extractor.fitted_now else "cached"
    console.print(f"{info['label']} extractor ({how}, {info['epochs']} epochs on {info['train_images']} images): "
                  f"test {info['task']} accuracy {100 * info['test_accuracy']:.2f}%; {extractor.path}")
    from gantrain.engine.metrics.extractor import ExtractorNearChance, check_usable

    try:
        check_usable(extractor)
    except ExtractorNearChance as exc:
        raise fail(str(exc), exc.exit_code) from None


@app.command("bench", cls=FlagCommand)
@user_errors
def bench_command(
    preset: Annotated[str, typer.Option(help="Model preset (see `gantrain presets`).")] = "fashion32",
    batch_size: Annotated[Optional[int], typer.Option(help="Images per step (default: the preset's).")] = None,
    dataset: Annotated[Optional[str], typer.Option(show_default="the preset's", help="Dataset override, e.g. synthetic.")] = None,
    data_root: Annotated[Optional[str], typer.Option(show_default="auto", help="Data folder (as for `gantrain run`).")] = None,
    limit: Annotated[Optional[int], typer.Option(show_default="all", help="Use only the first N images.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="Few, short windows: a smoke test fit for CI.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Also time DDP with this many local processes (when > 1).")] = 1,
    num_workers: Annotated[int, typer.Option(min=0, help="DataLoader workers of the baseline and torch-loader rows.")] = 2,
    peak_tflops: Annotated[Optional[float], typer.Option(help="Device peak TFLOP/s for MFU (default: GPU table or a measured matmul probe).")] = None,
    compile_mode: Annotated[Optional[str], typer.Option(metavar="<mode>", show_default="the preset's: default", help="torch.compile mode of the rows that compile: default, reduce-overhead or max-autotune.")] = None,
    only: Annotated[Optional[list[str]], typer.Option(metavar="<str>", show_default="every row", help="Run only the rows whose name contains this (repeatable).")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=1, show_default="by row kind and --quick", help="Warm-up steps per configuration (excluded from timing).")] = None,
    windows: Annotated[Optional[int], typer.Option(min=1, show_default="by row kind and --quick", help="Timed windows per configuration.")] = None,
    window: Annotated[Optional[int], typer.Option(min=1, show_default="by row kind and --quick", help="Steps per timed window.")] = None,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="Passes over the whole matrix, round-robin; windows are pooled (default 2, 1 with --quick or --loaders).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", metavar="<path>", show_default="off", help="Write the full report (hardware, versions, configs, figures) here (with --to-quality: to_quality.json, instead of into --out); '-' writes only the JSON to stdout (tables and progress go to stderr).")] = None,
    markdown: Annotated[Optional[Path], typer.Option(show_default="off", help="Write the results table as Markdown here.")] = None,
    profile: Annotated[Optional[Path], typer.Option(show_default="off", help="After each row's timing, profile 5 more steps (a multiple of a lazy R1's period) with torch.profiler into PROFILE/<row>/ (a Perfetto trace and a top-ops table).")] = None,
    loaders: Annotated[bool, typer.Option("--loaders", help="Time the data loaders instead (memory, torch, DALI) on the image folder --data-root at 64 and 128 px, alone and feeding training; --preset is not used.")] = False,
    to_quality: Annotated[bool, typer.Option("--to-quality", help="Time to quality instead: train each --contender from scratch and report the training time until its FD first reaches each --targets value (see the README).")] = False,
    contender: Annotated[Optional[list[str]], typer.Option(metavar="<recipe>", help="--to-quality: 'tutorial' (the plain loop on --preset's recipe) or 'PRESET \\[field=value ...]' (repeatable; default: tutorial, --preset and its recommended recipe).")] = None,
    targets: Annotated[str, typer.Option(help="--to-quality: FD targets, comma-separated.")] = "20,10,5,3",
    seeds: Annotated[int, typer.Option(min=1, help="--to-quality: seeds per contender (median and spread over them).")] = 1,
    baseline_seeds: Annotated[Optional[int], typer.Option(min=1, help="--to-quality: seeds of the tutorial loop (default: --seeds), when its run time forbids as many.")] = None,
    budget_epochs: Annotated[Optional[float], typer.Option(min=0.01, show_default="each contender's own", help="--to-quality: training epochs of every contender (default: each its recipe's epochs, --preset's for the tutorial loop, or epochs=N in --contender; 1 with --quick); its learning-rate decay spans them.")] = None,
    eval_every_epochs: Annotated[Optional[float], typer.Option(min=0.01, help="--to-quality: evaluate FD every this many epochs of images seen (default 0.25; 0.5 with --quick).")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(min=100, help="--to-quality: generated images per FD (default 2000; 100 with --quick).")] = None,
    out: Annotated[Path, typer.Option(help="--to-quality: folder for to_quality.json (unless --json names another file), .md and .png.")] = Path("runs/to-quality"),
    stop_when_reached: Annotated[bool, typer.Option("--stop-when-reached", help="--to-quality: the tutorial loop runs first; every other run stops at its first FD at or below the tutorial's final FD (its best and final FD then cover only that time).")] = False,
    baseline_from: Annotated[Optional[Path], typer.Option("--baseline-from", show_default="off", help="--to-quality: take the tutorial loop's runs from this earlier to_quality.json instead of training the loop again (refused unless it measured the same recipe, budget, evaluation and hardware).")] = None,
) -> None:
    """Time the training step: a plain PyTorch loop vs the engine with each feature added (or, with --loaders, the data loaders; with --to-quality, the time until samples reach an FD)."""
    from gantrain.bench.suite import bench
    from gantrain.engine.config import override, preset as build_preset, with_env_defaults

    if profile is not None and (to_quality or loaders):
        raise ConfigError(f"--profile: profiles the speed rows only, not {'--to-quality' if to_quality else '--loaders'}")
    if compile_mode is not None and (to_quality or loaders):
        raise ConfigError("--compile-mode: sets the speed rows' mode only"
                          + (" (a contender takes compile=true compile_mode=MODE)" if to_quality else ", not --loaders"))
    to_stdout = json_path is not None and str(json_path) == "-"
    report_path = None if to_stdout else json_path  # with '-', --to-quality keeps its running record in --out
    if to_quality:
        from gantrain.bench import to_quality as tq

        common = {"batch_size": batch_size, "dataset": dataset, "data_root": data_root, "limit": limit,
                  "device": device, **(tq.QUICK_CHANGES if quick else {})}
        common = {k: v for k, v in common.items() if v is not None}
        base = with_env_defaults(override(build_preset(preset), common))
        contenders = [tq.parse_contender(c, base, common) for c in contender or tq.default_contenders(preset)]
        with stdout_to_stderr(to_stdout):
            report = tq.bench_to_quality(
                base, contenders, seeds=seeds, baseline_seeds=baseline_seeds, targets=parse_targets(targets), out=out,
                console=console, num_workers=num_workers,
                budget_epochs=budget_epochs or (1.0 if quick else None),
                eval_every_epochs=eval_every_epochs or (0.5 if quick else 0.25),
                eval_samples=eval_samples or (100 if quick else 2000), stop_when_reached=stop_when_reached,
                baseline_from=baseline_from, json_path=report_path)
    elif loaders:
        from gantrain.bench.loaders import bench_loaders

        with stdout_to_stderr(to_stdout):
            report = bench_loaders(data_root=data_root, limit=limit, batch_size=batch_size, device=device,
                                   num_workers=num_workers, quick=quick, json_path=report_path, markdown_path=markdown,
                                   console=console, only=only, warmup=warmup, windows=windows, window=window,
                                   repeats=repeats)
    else:
        cfg = with_env_defaults(override(build_preset(preset), {"batch_size": batch_size, "dataset": dataset,
                                                                "data_root": data_root, "limit": limit,
                                                                "device": device, "num_workers": num_workers,
                                                                "compile_mode": compile_mode}))
        with stdout_to_stderr(to_stdout):
            report = bench(cfg, quick=quick, nproc=nproc, peak_override=peak_tflops, json_path=report_path,
                           markdown_path=markdown, console=console, only=only, warmup=warmup, windows=windows,
                           window=window, repeats=repeats, profile=profile)
    if to_stdout:
        print(json.dumps(report, indent=2))  # as the report's file holds it


def parse_targets(text: str) -> list[float]:
    """``20,10,5,3`` -> [20.0, 10.0, 5.0, 3.0]; a one-line error for anything else."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--targets: expected numbers separated by commas, got {text!r}") from None
    if not values or any(not v >= 0 for v in values):
        raise ConfigError(f"--targets: expected non-negative numbers, got {text!r}")
    return sorted(values, reverse=True)


def tune_flags(func):
    """Adds one option per :class:`TuneSettings` field (help: its docstring), passed on as ``tune_options``."""
    from dataclasses import fields

    from gantrain.tune.settings import TuneSettings

    docs = field_docs(TuneSettings)
    specs = [(f.name, type(f.default), docs[f.name], "tune options", shown_default(f.default))
             for f in fields(TuneSettings)]
    return _option_flags("tune_options", specs)(func)


@app.command("tune", no_args_is_help=False, cls=FlagCommand)
@config_flags(hidden=TRIAL_OWNED)
@tune_flags
@user_errors
def tune_command(
    preset: Annotated[Optional[str], typer.Option(show_default=DEFAULT_PRESET, help="Preset every trial starts from.")] = None,
    config: Annotated[Optional[Path], typer.Option(show_default="none", help="TOML config applied over the preset (any `gantrain run` flag a trial does not set itself also applies).")] = None,
    space: Annotated[Optional[Path], typer.Option(show_default="lr_g, lr_d, label_smoothing, beta1", help="TOML search space replacing the default one; see the README.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Join a Ray cluster: 'auto' (this node's) or 'ray://head:10001'; default: start Ray on this machine.")] = None,
    storage: Annotated[Path, typer.Option(help="Folder holding experiments (shared by every node of a cluster).")] = Path("runs/tune"),
    name: Annotated[Optional[str], typer.Option(help="Experiment folder name under --storage (default: the preset).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted experiment --storage/--name with its saved config, space and settings.")] = False,
    overrides: dict[str, Any] | None = None,
    tune_options: dict[str, Any] | None = None,
) -> None:
    """Search lr_G, lr_D, label smoothing and beta1 (or any config field) with Ray Tune, minimising FD.

    Each trial is a normal run (the `gantrain run` flags listed here apply) that reports every --eval-every epochs
    (every epoch when 0)."""
    from gantrain.tune import require_ray

    require_ray()
    from gantrain.tune.experiment import (experiment_folder, needs_driver_process, prepare, refuse_trial_owned,
                                          run_driver_process, run_prepared)
    from gantrain.tune.settings import settings_from

    given = [k for k, v in {**(overrides or {}), **(tune_options or {}), "config": config, "space": space}.items()
             if v is not None]
    if resume and given:  # the experiment continues exactly as it started
        raise ConfigError(f"--resume continues the experiment with the config, space and settings it started with; "
                          f"drop {', '.join('--' + k.replace('_', '-') for k in given)}")
    settings = None if resume else settings_from(tune_options or {})
    if settings is not None:
        refuse_trial_owned(overrides or {}, settings)
    cfg = None if resume else resolve(preset, str(config) if config else None, overrides or {})
    folder = experiment_folder(storage, name or (cfg.preset if cfg else preset or DEFAULT_PRESET))
    prepare(folder, cfg=cfg, settings=settings, space_file=space, resume=resume)
    if needs_driver_process(address):  # so that killing this command leaves no Ray process behind
        raise typer.Exit(run_driver_process(folder, resume, storage))
    finish_tune(run_prepared(folder, resume=resume, address=address, console=console), storage, folder.path.name)


def finish_tune(outcome, storage, name: str) -> None:
    """The results table, then an interruption or a search without result as one error line."""
    from gantrain.tune.results import print_outcome

    print_outcome(outcome, Console())
    if outcome.interrupted:  # Ray stops on SIGINT (the driver process forwards any stop signal as one)
        raise Interrupted(signal.SIGINT, f"experiment interrupted; continue it with: gantrain tune --resume "
                                         f"--storage {storage} --name {name}")
    if outcome.best is None:
        raise GantrainError(f"no trial reached a finite {outcome.settings.metric}; see {outcome.results_csv}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
