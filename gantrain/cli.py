"""The ``gantrain`` command line: a thin typer + rich layer over the engine.

``gantrain run`` takes every config field as a kebab-case flag, generated from the config tree so flags,
help text (the field docstrings) and TOML keys never drift apart. Errors print one line and exit non-zero.
"""

from __future__ import annotations

import functools
import inspect
import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.console import Console
from rich.table import Table
from rich.text import Text

from gantrain import __version__
from gantrain.engine.config import (LIST_FIELDS, PRESETS, RECOMMENDED, SECTION_TYPES, field_docs, field_index,
                                    recommended_measured, resolve)
from gantrain.engine.errors import ConfigError, GantrainError, Interrupted


def _flags_as_flags(params: list) -> list:
    """Flags (``--quick``, ``--amp/--no-amp``, ``--help``) get an empty placeholder: typer shows ``<bool>``
    for them otherwise, as if they took a value."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class FlagCommand(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _flags_as_flags(super().get_params(ctx))


class FlagGroup(typer.core.TyperGroup):
    def get_params(self, ctx):
        return _flags_as_flags(super().get_params(ctx))

    def invoke(self, ctx):
        """A Ctrl-C that no command handles itself (training, tune and bench do) is one line and exit 130, not
        click's "Aborted!" with exit 1."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise fail("interrupted by SIGINT (Ctrl-C)", 128 + signal.SIGINT) from None


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich", cls=FlagGroup,
                  help="gantrain: fast DCGAN training. Run [bold]gantrain run[/] to train the fashion32 default.")
console = Console(stderr=True)


def fail(message: str, code: int = 1) -> typer.Exit:
    # plain Text (not markup): paths may hold brackets; soft_wrap keeps the message on one line
    console.print(Text.assemble(("error:", "bold red"), " " + message), highlight=False, soft_wrap=True)
    return typer.Exit(code)


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


@app.callback()
def main_callback(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """gantrain: fast DCGAN training, benchmarking and tuning."""


def _option_flags(target: str, specs: list[tuple[str, type, str, str]]):
    """A decorator adding one keyword option per ``(name, type, help, panel)`` spec to a command's signature
    (default None: not given; booleans as --x/--no-x), passed on together as a dict in its ``target`` parameter."""
    names = [spec[0] for spec in specs]

    def decorate(func):
        sig = inspect.signature(func, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != target]
        for name, typ, doc, panel in specs:
            flag = "--" + name.replace("_", "-")
            option = typer.Option(f"{flag}/--no-{flag[2:]}" if typ is bool else flag, help=doc, rich_help_panel=panel,
                                  show_default=False, metavar="<names>" if typ == list[str] else None)
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


def config_flags(func):
    """Adds one option per config field (default None = 'keep the preset/TOML value'), passed on as ``overrides``."""
    specs = [(name, list[str] if name in LIST_FIELDS else typ, field_docs(SECTION_TYPES[section]).get(name, ""),
              f"{section} options") for name, (section, typ) in field_index().items()]
    return _option_flags("overrides", specs)(func)


@app.command("run", no_args_is_help=False, cls=FlagCommand)
@config_flags
@user_errors
def run_command(
    preset: Annotated[Optional[str], typer.Option(help="Preset to start from (see `gantrain presets`).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML config (e.g. a run's config.toml) applied over the preset.")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run: 'auto' (the --out folder's last.pt) or a checkpoint path.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config (and where each value came from: preset, file, flag) and the schedule, then exit without training or touching the run folder.")] = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Train a DCGAN. Bare `gantrain run` trains the fashion32 preset."""
    cfg = resolve(preset, str(config) if config else None, overrides or {})
    if dry_run:
        from gantrain.engine.train import dryrun

        sources = dryrun.value_sources(preset, str(config) if config else None, overrides or {})
        dryrun.show(cfg, sources, dryrun.plan(cfg), Console(), resume)
        return
    from gantrain.engine.dist.launch import train

    train(cfg, resume=resume, console=console)


@app.command("presets", cls=FlagCommand)
def presets_command() -> None:
    """List the presets and their key values."""
    from gantrain.engine.config import ModelConfig, OptimConfig, preset as build_preset

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
        values += f", G {c.gan.ema_words()}" if c.gan.ema_decay else ""
        values += f", FD every {c.eval.eval_every} epoch(s)" if c.eval.eval_every else ""
        values += ", final samples from best.pt" if c.eval.samples_from_best else ""
        values += f", DiffAugment {','.join(c.gan.diffaug)}" if c.gan.diffaug else ""
        betas = (c.optim.beta1, c.optim.beta2)
        values += f", Adam betas ({betas[0]:g}, {betas[1]:g})" if betas != (OptimConfig.beta1, OptimConfig.beta2) else ""
        if c.optim.lr_decay != "none":
            values += f", {c.optim.lr_decay} lr decay"
            values += f" after {c.optim.lr_decay_start:.0%} of the run" if c.optim.lr_decay_start else ""
        table.add_row(name, values, description)
    Console().print(table)
    for plain, better in RECOMMENDED.items():
        measured = recommended_measured().get(better, "its recipe reached good samples soonest")
        Console().print(f"recommended for {plain}'s data: {better}: {measured} (`gantrain bench --to-quality`; README, "
                        f"\"Time to quality\"); {plain} stays as published, the reference to compare with",
                        soft_wrap=True)


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
    out: Annotated[Path, typer.Option(help="Output grid PNG.")] = Path("grid.png"),
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
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


_CACHE_HELP = "Extractor and real-feature cache (default: $GANTRAIN_CACHE, else $XDG_CACHE_HOME/gantrain/metrics)."


@app.command("eval", cls=FlagCommand)
@user_errors
def eval_command(
    source: Annotated[Optional[str], typer.Argument(metavar="SOURCE", show_default=False, help="What to evaluate: a checkpoint written by `gantrain run`, an exported generator, or an image folder (optional with --real-vs-real --dataset). With --save-stats: the reference to save (a folder, or fashion-mnist, mnist, folder:PATH).")] = None,
    reference: Annotated[Optional[str], typer.Argument(metavar="REFERENCE", show_default=False, help="What to compare with: an image folder, a .npz from --save-stats, or a dataset's test split (fashion-mnist, mnist, folder:PATH). Default: the checkpoint's (or --dataset's) test split.")] = None,
    n: Annotated[int, typer.Option("-n", "--num", min=100, help="Generated images (with --real-vs-real: images per real half, at most half the test split); an image folder gives its own.")] = 10000,
    json_path: Annotated[Optional[str], typer.Option("--json", help="Also write the results as JSON to this file; '-' writes only the JSON to stdout (tables and progress go to stderr).")] = None,
    real_vs_real: Annotated[bool, typer.Option("--real-vs-real", help="Sanity mode: compare two disjoint halves of the real test split (each metric's floor).")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="The domain extractor (and, without REFERENCE, the test split) to use: fashion-mnist, mnist or folder:PATH. Default: the checkpoint's, else REFERENCE's.")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Data folder (default: the checkpoint's, then $GANTRAIN_DATA).")] = None,
    channels: Annotated[int, typer.Option(min=1, max=3, help="Channels of image folders: 1 or 3.")] = 3,
    size: Annotated[Optional[int], typer.Option(min=8, help="Decode image folders at this size (default: the first image's shorter side).")] = None,
    save_stats: Annotated[Optional[Path], typer.Option("--save-stats", help="Save SOURCE's reference statistics (domain features; with --inception also Inception mu/sigma) to this .npz for later `gantrain eval X FILE.npz`.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the generator noise and the KID subsets.")] = 0,
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
    dataset: Annotated[Optional[str], typer.Option(help="Dataset override, e.g. synthetic.")] = None,
    data_root: Annotated[Optional[str], typer.Option(help="Data folder (as for `gantrain run`).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="Few, short windows: a smoke test fit for CI.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Also time DDP with this many local processes (when > 1).")] = 1,
    num_workers: Annotated[int, typer.Option(min=0, help="DataLoader workers of the baseline and torch-loader rows.")] = 2,
    peak_tflops: Annotated[Optional[float], typer.Option(help="Device peak TFLOP/s for MFU (default: GPU table or a measured matmul probe).")] = None,
    only: Annotated[Optional[list[str]], typer.Option(help="Run only the rows whose name contains this (repeatable).")] = None,
    warmup: Annotated[Optional[int], typer.Option(min=1, help="Warm-up steps per configuration (excluded from timing).")] = None,
    windows: Annotated[Optional[int], typer.Option(min=1, help="Timed windows per configuration.")] = None,
    window: Annotated[Optional[int], typer.Option(min=1, help="Steps per timed window.")] = None,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="Passes over the whole matrix, round-robin; windows are pooled (default 2, 1 with --quick).")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the full report (hardware, versions, configs, figures) here.")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="Write the results table as Markdown here.")] = None,
    profile: Annotated[Optional[Path], typer.Option(help="After each row's timing, profile 5 more steps with torch.profiler into PROFILE/<row>/ (a Perfetto trace and a top-ops table).")] = None,
    loaders: Annotated[bool, typer.Option("--loaders", help="Time the data loaders instead (memory, torch, DALI) on the image folder --data-root at 64 and 128 px, alone and feeding training; --preset is not used.")] = False,
    to_quality: Annotated[bool, typer.Option("--to-quality", help="Time to quality instead: train each --contender from scratch and report the training time until its FD first reaches each --targets value (see the README).")] = False,
    contender: Annotated[Optional[list[str]], typer.Option(help="--to-quality: 'tutorial' (the plain loop on --preset's recipe) or 'PRESET [field=value ...]' (repeatable; default: tutorial, --preset and its recommended recipe).")] = None,
    targets: Annotated[str, typer.Option(help="--to-quality: FD targets, comma-separated.")] = "20,10,5,3",
    seeds: Annotated[int, typer.Option(min=1, help="--to-quality: seeds per contender (median and spread over them).")] = 1,
    baseline_seeds: Annotated[Optional[int], typer.Option(min=1, help="--to-quality: seeds of the tutorial loop (default: --seeds), when its run time forbids as many.")] = None,
    budget_epochs: Annotated[Optional[float], typer.Option(min=0.01, help="--to-quality: training epochs of every contender (default: the preset's epochs; 1 with --quick).")] = None,
    eval_every_epochs: Annotated[Optional[float], typer.Option(min=0.01, help="--to-quality: evaluate FD every this many epochs of images seen (default 0.25; 0.5 with --quick).")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(min=100, help="--to-quality: generated images per FD (default 2000; 100 with --quick).")] = None,
    out: Annotated[Path, typer.Option(help="--to-quality: folder for to_quality.json, .md and .png.")] = Path("runs/to-quality"),
    stop_when_reached: Annotated[bool, typer.Option("--stop-when-reached", help="--to-quality: the tutorial loop runs first; every other run stops at its first FD at or below the tutorial's final FD (its best and final FD then cover only that time).")] = False,
    baseline_from: Annotated[Optional[Path], typer.Option("--baseline-from", help="--to-quality: take the tutorial loop's runs from this earlier to_quality.json instead of training the loop again (refused unless it measured the same recipe, budget, evaluation and hardware).")] = None,
) -> None:
    """Time the training step: a plain PyTorch loop vs the engine with each feature added (or, with --loaders, the data loaders; with --to-quality, the time until samples reach an FD)."""
    from gantrain.bench.suite import bench
    from gantrain.engine.config import override, preset as build_preset, with_env_defaults

    if profile is not None and (to_quality or loaders):
        raise ConfigError(f"--profile: profiles the speed rows only, not {'--to-quality' if to_quality else '--loaders'}")
    if to_quality:
        from gantrain.bench import to_quality as tq

        common = {"batch_size": batch_size, "dataset": dataset, "data_root": data_root, "limit": limit,
                  "device": device, **(tq.QUICK_CHANGES if quick else {})}
        common = {k: v for k, v in common.items() if v is not None}
        base = with_env_defaults(override(build_preset(preset), common))
        contenders = [tq.parse_contender(c, base, common) for c in contender or tq.default_contenders(preset)]
        tq.bench_to_quality(base, contenders, seeds=seeds, baseline_seeds=baseline_seeds,
                            targets=parse_targets(targets), out=out, console=console, num_workers=num_workers,
                            budget_epochs=budget_epochs or (1.0 if quick else float(base.run.epochs)),
                            eval_every_epochs=eval_every_epochs or (0.5 if quick else 0.25),
                            eval_samples=eval_samples or (100 if quick else 2000), stop_when_reached=stop_when_reached,
                            baseline_from=baseline_from)
        return
    if loaders:
        from gantrain.bench.loaders import bench_loaders

        bench_loaders(data_root=data_root, limit=limit, batch_size=batch_size, device=device, num_workers=num_workers,
                      quick=quick, json_path=json_path, markdown_path=markdown, console=console, only=only,
                      warmup=warmup, windows=windows, window=window, repeats=repeats)
        return
    cfg = with_env_defaults(override(build_preset(preset), {"batch_size": batch_size, "dataset": dataset,
                                                            "data_root": data_root, "limit": limit, "device": device,
                                                            "num_workers": num_workers}))
    bench(cfg, quick=quick, nproc=nproc, peak_override=peak_tflops, json_path=json_path, markdown_path=markdown,
          console=console, only=only, warmup=warmup, windows=windows, window=window, repeats=repeats, profile=profile)


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
    specs = [(f.name, type(f.default), f"{docs[f.name]} (default: {f.default})", "tune options")
             for f in fields(TuneSettings)]
    return _option_flags("tune_options", specs)(func)


@app.command("tune", no_args_is_help=False, cls=FlagCommand)
@config_flags
@tune_flags
@user_errors
def tune_command(
    preset: Annotated[Optional[str], typer.Option(help="Preset every trial starts from (default fashion32).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML config applied over the preset (any `gantrain run` flag also applies).")] = None,
    space: Annotated[Optional[Path], typer.Option(help="TOML search space replacing the default (lr_g, lr_d, label_smoothing, beta1); see the README.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Join a Ray cluster: 'auto' (this node's) or 'ray://head:10001'; default: start Ray on this machine.")] = None,
    storage: Annotated[Path, typer.Option(help="Folder holding experiments (shared by every node of a cluster).")] = Path("runs/tune"),
    name: Annotated[Optional[str], typer.Option(help="Experiment folder name under --storage (default: the preset).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted experiment --storage/--name with its saved config, space and settings.")] = False,
    overrides: dict[str, Any] | None = None,
    tune_options: dict[str, Any] | None = None,
) -> None:
    """Search lr_G, lr_D, label smoothing and beta1 (or any config field) with Ray Tune, minimising FD.

    Each trial is a normal run (every `gantrain run` flag applies) that reports every --eval-every epochs
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
    folder = experiment_folder(storage, name or (cfg.preset if cfg else preset or "fashion32"))
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
