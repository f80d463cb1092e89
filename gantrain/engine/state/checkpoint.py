"""Checkpoints: written atomically (temp file, fsync, rename), ``last.pt`` plus numbered ones, the last K kept.

A checkpoint is a plain dict of tensors and builtins (loadable with ``weights_only=True``), one sub-dict per
component (:mod:`~gantrain.engine.state.schema`): G, D, the G EMA when on, both optimisers, the GradScaler and
every RNG state the run draws from ("gan"), step, epoch and the place in the data ("position"), the resolved
config ("run") and the best FD ("quality"). A SHA-256 of every value in it is stored alongside (``digest``) and
checked on load: torch's zip reader does not check CRCs, so without it a checkpoint damaged in the middle of its
weights would load silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gantrain.engine.config import (CheckpointConfig, Config, DistConfig, data_root_of, from_dict, resolve, shown,
                                    with_env_defaults)
from gantrain.engine.config import _flag as flag_name
from gantrain.engine.errors import CheckpointError, TrainingDiverged
from gantrain.engine.state.files import atomic_write, io_error
from gantrain.engine.state.rundir import RunDir
from gantrain.engine.state.schema import FORMAT, VERSION, Parts, assemble, step_of, upgrade

log = logging.getLogger("gantrain")



def state_digest(state: Any) -> str:
    """SHA-256 over a checkpoint's values in order: tensors by dtype, shape and bytes, the rest by ``repr``."""
    digest = hashlib.sha256()

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself, no copy
        elif isinstance(value, dict):
            for key, item in value.items():
                digest.update(f"K{key!r}".encode())
                visit(item)
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(f"V{value!r}".encode())

    visit(state)
    return digest.hexdigest()


def sealed(state: dict[str, Any], version: int = VERSION) -> dict[str, Any]:
    """``state`` with the checkpoint format, ``version`` and ``digest`` that :func:`load_checkpoint` checks."""
    body = {"format": FORMAT, "version": version, **state}
    return {**body, "digest": state_digest(body)}


def atomic_save(obj: Any, path: Path) -> None:
    """Writes ``obj`` so that ``path`` holds either the old file or the complete new one, never a torn write.

    Raises :class:`~gantrain.engine.errors.RunIOError` naming ``path`` when the write fails (a full disk, a
    read-only folder); torch reports those as a bare 'unexpected pos' RuntimeError, which says neither.
    """
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _atomic_link(source: Path, path: Path) -> None:
    """Points ``path`` at ``source``'s bytes atomically (hard link, or a copy where links are not allowed)."""
    tmp = path.with_name(f".{path.name}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise io_error("write", path, exc) from None


def save_checkpoint(state: dict[str, Any], files: RunDir, step: int, keep: int) -> Path:
    """Saves ``state`` as ``step_NNNNNNNN.pt`` and ``last.pt``; removes numbered ones beyond the last ``keep``."""
    numbered = files.numbered(step)
    atomic_save(sealed(state), numbered)
    _atomic_link(numbered, files.last)
    for old in files.numbered_checkpoints()[:-keep]:
        try:
            old.unlink(missing_ok=True)
        except OSError as exc:
            raise io_error("remove the old checkpoint", old, exc) from None
    return numbered


def save_best(files: RunDir, step: int, state: Callable[[], dict[str, Any]]) -> Path:
    """``best.pt``: the step's numbered checkpoint (hard-linked, or copied, atomically) when there is one, else
    ``state()`` written anew. Numbered files are only ever replaced, never rewritten, so the link stays intact."""
    numbered, best = files.numbered(step), files.best
    if numbered.is_file():
        _atomic_link(numbered, best)
    else:
        atomic_save(sealed(state()), best)
    return best


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads and checks a checkpoint on the CPU, upgraded to the current schema version
    (:func:`~gantrain.engine.state.schema.upgrade`); any problem is a :class:`CheckpointError` naming the file."""
    path = Path(path)
    for last in (path / "last.pt", path / "checkpoints" / "last.pt"):  # a run's checkpoints/ or the run folder
        if path.is_dir() and last.is_file():
            raise CheckpointError(f"{path} is a folder; its latest checkpoint is {last}")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({_first_sentence(exc)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gantrain checkpoint")
    stored = state.pop("digest", None)  # absent in checkpoints written before digests were added
    if stored is not None and stored != state_digest(state):
        raise CheckpointError(f"{path} is corrupt: its contents do not match the checksum stored in it")
    return upgrade(state, path)


def open_resume(cfg: Config, resume: str | None) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """What ``--resume`` continues from: the checkpoint's path, its state, and the settings ``cfg`` changes against
    it (see :func:`resumed_config`); (None, None, []) for a new run. Raises :class:`CheckpointError`."""
    path = find_resume(resume, cfg.run_dir) if resume else None
    state = load_checkpoint(path) if path else None
    return path, state, resumed_config(cfg, state, path)


def _first_sentence(exc: BaseException) -> str:
    """The reason of a failed load, for one error line: the exception's type and its first sentence (torch's own
    text runs on over several lines of advice), whole words only."""
    text = " ".join(str(exc).split())
    first = text.split(". ")[0].rstrip(".")
    if len(first) > 160:
        first = first[:160].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def resume_base(preset_name: str | None, config_file: str | None, resume: str | None,
                flags: dict[str, Any]) -> tuple[Config, Path] | None:
    """What ``--resume`` without ``--preset`` or ``--config`` continues with: the config stored in the checkpoint
    (the run's resolved config as it trained; fields added since take their defaults, as a written config.toml
    is read) but for its ``[dist]`` section (the launch: processes, nodes, ports, Ray, which the command's flags
    give, as for a new run; the resume line lists what differs), its ``out`` set to the run folder the checkpoint
    lies in when that folder moved; and the checkpoint's path. The caller lays the flags over it
    (``config.resolve(base=...)``). None when a preset or a
    file is given, or no resume (those resolve as for a new run), and for a missing or damaged checkpoint (the
    run refuses it, after its own checks). ``flags``: the command's (``--resume auto`` looks in --out, else in the
    default preset's folder). A stored data root that does not exist here (a run folder brought from another
    machine) gives way to $GANTRAIN_DATA, when set, with a warning. Raises :class:`ConfigError` for a stored config
    that today's checks refuse."""
    if not resume or preset_name or config_file:
        return None
    out = flags.get("out")
    try:
        path = find_resume(resume, Path(out) if out else Config().run_dir)
        state = load_checkpoint(path)
    except CheckpointError:  # missing or damaged: the run refuses it itself, after its checks of the folder (a lock)
        return None
    saved = from_dict(Parts.of(state).config, source=str(path))
    saved.dist = DistConfig()  # how this command launches (--ddp, --nproc, --ray, ports) is its own, as for a new run
    folder = path.parent.parent if path.parent.name == "checkpoints" else None  # <run>/checkpoints/x.pt
    if not out and folder is not None and os.path.abspath(folder) != os.path.abspath(saved.run_dir):
        saved.run.out = str(folder)  # a run folder moved or copied since: continue it where it lies now
    root = saved.data.data_root
    if root and not os.path.exists(root) and data_root_of(None) and not flags.get("data_root"):
        log.warning("--resume: the checkpoint's data root %s does not exist here; this run reads $GANTRAIN_DATA "
                    "(%s) instead", root, data_root_of(None))
        saved.data.data_root = None  # another machine's folder: resolve() fills this one's from the environment
    log.info("--resume without --preset or --config: the run continues with the config stored in %s (preset %s, "
             "run folder %s)", path, saved.preset, out or saved.run_dir)
    return saved, path


def resolve_run(preset_name: str | None, config_file: str | None, resume: str | None,
                flags: dict[str, Any]) -> tuple[Config, tuple[Config, Path] | None]:
    """The config a ``gantrain run`` (or ``gantrain.train``) trains: :func:`resume_base` as the base when it gives
    one, else the preset and file, the flags over it (:func:`~gantrain.engine.config.resolve`); and what
    :func:`resume_base` gave (the dry run names the checkpoint as a source). Raises :class:`ConfigError` as those
    two do."""
    resumed = resume_base(preset_name, config_file, resume, flags)
    return resolve(preset_name, config_file, flags, base=resumed[0] if resumed else None), resumed


def find_resume(resume: str, run_dir: Path) -> Path:
    """``--resume auto`` means the run folder's ``last.pt``; anything else is a path."""
    if resume != "auto":
        return Path(resume)
    last = RunDir(run_dir).last
    if not last.is_file():
        others = _resumable_beside(Path(run_dir))
        hint = f"; run folders beside it that have one: {', '.join(others)}" if others else ""
        raise CheckpointError(f"--resume auto: no checkpoint in {last.parent} (is --out the run folder?){hint}")
    return last


def _resumable_beside(run_dir: Path, most: int = 3) -> list[str]:
    """Up to ``most`` folders beside ``run_dir`` whose last.pt exists, the most recently written first: where a
    ``--resume auto`` without --out (the default preset's folder) may have meant to look."""
    try:
        found = [(RunDir(folder).last.stat().st_mtime, str(folder)) for folder in run_dir.parent.iterdir()
                 if folder != run_dir and RunDir(folder).last.is_file()]
    except OSError:
        return []
    return [f"--out {folder}" for _, folder in sorted(found, reverse=True)[:most]]


def restart_resume(files: RunDir, asked: str | None, started: float) -> str | None:
    """The one rule for what a restarted worker (torchrun's elastic agent, Ray Train) resumes from: the run's
    last.pt when this launch wrote it (modified at or after ``started``, the launch's ``time.time()``), else what
    the launch was asked to start from (``asked``: a restart before the first checkpoint starts that again, which
    is exact all the same). An older last.pt is a previous launch's: resuming from it would repeat steps."""
    last = files.last
    if last.is_file() and last.stat().st_mtime >= started:
        return str(last)
    return asked


def check_finite(weights: dict[str, torch.Tensor], what: str, path: Path | str) -> None:
    """Raises :class:`CheckpointError` when any floating-point tensor of ``weights`` (a module state dict)
    holds NaN or infinity: images or training from such weights would be garbage that looks like a result."""
    bad = sum(int(torch.count_nonzero(~torch.isfinite(t))) for t in weights.values()
              if isinstance(t, torch.Tensor) and t.is_floating_point())
    if bad:
        total = sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor) and t.is_floating_point())
        raise CheckpointError(f"{path}: the {what} holds {bad:,} non-finite values of {total:,} (training had "
                              "diverged when it was saved); use an earlier checkpoint")


def load_module_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, path: Path | str) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{path}: the {what} weights do not match this model config ({first})") from None


# ----- what a run stores and restores besides the model (capture and restore of the place in the data) ---------
# Settings the weights' shapes depend on (besides every model.* field): refused when they change on resume.
FIXED_MID_RUN = ("data.image_size", "data.channels")
# Settings that decide which images an epoch holds (a pre-position checkpoint can be placed only without change).
DATASET_KEYS = ("dataset", "data_root", "limit", "synthetic_size", "image_size", "channels")


@dataclass
class Position:
    """Where a run stands: optimiser updates (``step``), completed epochs, steps into the current epoch at this
    run's global batch, and images trained on over the whole run (all processes together)."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    images_seen: int = 0

    def advance(self, global_batch: int) -> None:
        self.step, self.epoch_step, self.images_seen = self.step + 1, self.epoch_step + 1, self.images_seen + global_batch

    def state(self, global_batch: int, num_images: int) -> dict[str, int]:
        """The place in the data in images, which any later process layout or batch size can continue from
        (epochs draw one permutation of the images whatever the layout; each step takes the next batch of it)."""
        return {"step": self.step, "epoch": self.epoch, "epoch_images": self.epoch_step * global_batch,
                "images_seen": self.images_seen, "global_batch": global_batch, "num_images": num_images}


def resumed_config(cfg: Config, state: dict | None, path: Path | str | None) -> list[str]:
    """The settings ``cfg`` changes against the checkpoint's config ('--lr-g 0.0002 -> 0.001'): on resume what the
    user set is what runs. Raises :class:`CheckpointError` naming each change of what the weights are built from
    (any model field, the image size or channels), which cannot change mid-run."""
    if state is None:
        return []
    # A checkpoint written before $GANTRAIN_DATA was resolved into the config holds no data root for it: read
    # such a root as the variable, as this run's config does, so the same data is no change.
    saved = with_env_defaults(from_dict({k: v for k, v in Parts.of(state).config.items() if k != "preset"}))
    old, new = flat_config(saved.to_dict()), flat_config(cfg.to_dict())
    changed = [key for key in new if old.get(key) != new[key]]
    fixed = [key for key in changed if key.startswith("model.") or key in FIXED_MID_RUN]
    if fixed:
        what = ", ".join(f"{flag_name(k.split('.')[1])} {shown(old[k])!r} -> {shown(new[k])!r}" for k in fixed)
        raise CheckpointError(f"{path}: the checkpoint's model config differs from this run's ({what}): these "
                              "cannot change mid-run; pass the same --preset/--config or start a new --out")
    return [f"{flag_name(k.split('.')[1])} {shown(old[k])!r} -> {shown(new[k])!r}" for k in changed]


def flat_config(tree: dict, prefix: str = "") -> dict:
    """{'optim': {'lr_g': 1e-3}} -> {'optim.lr_g': 1e-3}, without the preset name."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        elif prefix:
            flat[prefix + key] = value
    return flat


def restore_position(state: dict, cfg: Config, per_epoch: int, global_batch: int, num_images: int,
                     path: Path | str) -> tuple[Position, str]:
    """The checkpoint's place in this run's layout, and a note when the layout changed (another process count,
    batch size or dataset size), else ''. Raises :class:`CheckpointError` when an old checkpoint's place
    cannot be found in this run's data."""
    saved = Parts.of(state).position
    pos = Position(step=int(saved["step"]), epoch=int(saved["epoch"]))
    saved_batch = int(saved["global_batch"] or cfg.data.batch_size * int(Parts.of(state).run["world_size"]))
    if saved["epoch_images"] is not None:
        images = int(saved["epoch_images"])
    else:  # written before the place was stored: step and epoch count steps of the saved layout
        images = _legacy_epoch_images(state, cfg, pos, saved_batch, num_images, path)
    pos.images_seen = int(saved["images_seen"] if saved["images_seen"] is not None else pos.step * saved_batch)
    start, extra = divmod(images, global_batch)
    notes = []
    if images > per_epoch * global_batch:  # a smaller --limit than when saved, say
        notes.append(f"the checkpoint stood {images} images into epoch {pos.epoch + 1}, past this run's "
                     f"epoch of {per_epoch * global_batch} images: that epoch counts as done")
        start, extra = per_epoch, 0
    if extra:
        notes.append(f"the checkpoint stood {images} images into epoch {pos.epoch + 1}, not a multiple of this "
                     f"run's global batch {global_batch}: continuing from image {start * global_batch}, so {extra} "
                     "images of that epoch are trained on twice")
    pos.epoch_step = start
    saved_num = saved["num_images"]
    if saved_batch != global_batch or (saved_num is not None and saved_num != num_images):
        notes.insert(0, f"global batch {saved_batch} -> {global_batch}"
                        + (f", images per epoch {saved_num} -> {num_images}"
                           if saved_num is not None and saved_num != num_images else "")
                        + f": continuing at epoch {pos.epoch + 1}, step {start} of {per_epoch} "
                          f"(image {start * global_batch}), the step count goes on from {pos.step}")
    return pos, "; ".join(notes)


def _legacy_epoch_images(state: dict, cfg: Config, pos: Position, saved_batch: int, num_images: int,
                         path: Path | str) -> int:
    """Images into the current epoch of a checkpoint without ``epoch_images``: its steps in that epoch times
    its global batch. Past the first epoch that needs its steps per epoch, known only when the images
    are the same as now."""
    if pos.epoch == 0:
        return pos.step * saved_batch
    saved_data, data = dict(Parts.of(state).config.get("data", {})), cfg.to_dict()["data"]
    if "data_root" in saved_data:  # as this run's config holds it (see resumed_config): absolute, or $GANTRAIN_DATA
        saved_data["data_root"] = data_root_of(saved_data["data_root"])
    same_images = all(saved_data.get(k, data[k]) == data[k] for k in DATASET_KEYS)
    saved_per_epoch = num_images // saved_batch
    in_epoch = pos.step - pos.epoch * saved_per_epoch
    if not same_images or not 0 <= in_epoch <= saved_per_epoch:
        raise CheckpointError(f"{path}: this checkpoint predates stored data positions and its dataset settings "
                              f"differ from this run's ({', '.join(DATASET_KEYS)}), so its place in epoch "
                              f"{pos.epoch + 1} is unknown; resume with the data settings it was saved with")
    return in_epoch * saved_batch


def restore(state: dict, path: Path | str, gan: Any, cfg: Config, loader: Any, global_batch: int, changes: list[str],
            is_main: bool) -> tuple[Position, float | None]:
    """Continues from ``state``: ``gan``'s weights, optimisers (with this run's settings) and RNG streams
    (:meth:`GANStep.load_state_dict`), and the place in ``loader``'s data; logs what changed. Returns the place and
    the best FD so far."""
    changed = gan.load_state_dict(Parts.of(state).gan, path, step_of(state))
    pos, moved = restore_position(state, cfg, loader.steps_per_epoch, global_batch, loader.num_images, path)
    gan.images_seen = pos.images_seen  # the EMA's ramp-up goes on from the images trained, whatever the batch
    if is_main:
        log.info("resumed from %s at step %d (epoch %d, image %d of this epoch)", path, pos.step, pos.epoch + 1,
                 pos.epoch_step * global_batch)
        # The config's changes explain the optimiser's; the optimiser's alone show a checkpoint whose
        # optimiser disagreed with its own config (e.g. one written by a tool that changed the groups).
        if Parts.of(state).config.get("optim", {}).get("lr_decay", "none") != "none":
            changed = [c for c in changed if not c.startswith("lr(")]  # decayed rates, not another setting
        changes = changes or [f"optimiser {c}" for c in changed]
        if changes:
            log.info("resume: settings changed since the checkpoint, in effect from step %d: %s", pos.step + 1,
                     ", ".join(changes))
        if moved:
            log.warning("resume: %s", moved)
    return pos, Parts.of(state).quality["best_fd"]


@dataclass
class Start:
    """What a run starts from: its place, and from a checkpoint the best FD so far, how that FD was measured
    (:attr:`QualityTracker.measured_by`) and the step the run was planned to end at (None: not known)."""

    pos: Position
    best_fd: float | None = None
    best_measured_by: dict | None = None
    planned_steps: int | None = None


class Checkpointer:
    """What a run's checkpoints hold and when one is due; writes them (rank 0) unless their weights are non-finite,
    so a non-finite checkpoint never replaces, nor rotates away, the last finite one; remembers the last one
    written and the last finite one.

    Due every --checkpoint-every epochs, every --checkpoint-every-steps steps and every --checkpoint-every-minutes
    of this rank's clock (the DDP ranks agree on the step through :class:`~gantrain.engine.dist.runtime.StopAgreement`).
    """

    def __init__(self, checkpoint: CheckpointConfig, run_dir: Path, config: dict[str, Any], *,
                 samples_from_best: bool = False, is_main: bool = True, world_size: int = 1, group: Any = None,
                 raise_non_finite: bool = True) -> None:
        """``checkpoint``: its own config section; ``config``: the run's resolved config as a dict, stored in
        every checkpoint; ``samples_from_best``: the end-of-run samples come from best.pt (:meth:`final_samples`).
        ``raise_non_finite``: non-finite weights at a save raise :class:`TrainingDiverged` (False: the caller
        watches divergence itself; the save is skipped with a warning)."""
        self.settings, self.config, self.samples_from_best = checkpoint, config, samples_from_best
        self.files, self.is_main, self.world_size = RunDir(run_dir), is_main, world_size
        self.raise_non_finite = raise_non_finite
        self.group = group  # the DDP process group that gathers every rank's RNG streams; None in one process
        self.last: Path | None = None
        self.last_finite: tuple[Path, int] | None = None  # the newest checkpoint known finite, and its step
        self.saved_step: int | None = None  # the step of the last checkpoint written (or refused)
        self.pending = False  # a save that came due at an epoch's last step, made at the epoch's end
        self.last_save_time = time.monotonic()
        self.ranks_rng: tuple[int, list] | None = None  # (step, every rank's RNG streams) for that step's checkpoint

    def start_from(self, state: dict | None, path: Path | None, gan: Any, cfg: Config, loader: Any,
                   global_batch: int, changes: list[str]) -> Start:
        """Where the run of ``cfg`` starts: step 0 and nothing known for a new run, else the checkpoint ``state``
        restored (:func:`restore`: it compares the saved config with ``cfg``), which is then the last finite
        checkpoint."""
        if state is None:
            return Start(Position())
        pos, best_fd = restore(state, path, gan, cfg, loader, global_batch, changes, self.is_main)
        self.last_finite = (Path(path), pos.step)
        parts = Parts.of(state)
        return Start(pos, best_fd, parts.quality["best_fd_measured_by"], parts.run["planned_steps"])

    def final_samples(self, gan: Any, noise: torch.Tensor, step: int, best_fd: float | None = None) -> torch.Tensor:
        """The run's end-of-run samples: the last step's, or with --samples-from-best those of best.pt's generator
        (the lowest FD; ``gan.sample_from``), said in the log with ``best_fd`` (the run's best FD as it measures
        now; best.pt's own stored one when None)."""
        best = self.files.best
        if not self.samples_from_best:
            return gan.sample(noise)
        if not best.is_file():
            log.info("--samples-from-best: no best.pt (no evaluation ran), final samples from the last step")
            return gan.sample(noise)
        state = load_checkpoint(best)
        fd = best_fd if best_fd is not None else Parts.of(state).quality["best_fd"] or float("nan")
        if step_of(state) == step:
            log.info("final samples from the last step (%d), which is also best.pt's (FD %.4g)", step, fd)
        else:
            log.info("final samples from checkpoints/best.pt (step %d, FD %.4g) rather than the last step (%d)",
                     step_of(state), fd, step)
        return gan.sample_from(Parts.of(state).gan, noise, best)

    def minutes_due(self) -> bool:
        """This rank's clock; the ranks agree on the step to save at (StopAgreement)."""
        minutes = self.settings.checkpoint_every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes

    def due_after_step(self, step: int, agreed: bool, epoch_ended: bool) -> bool:
        """Whether to save right after ``step``: the ranks ``agreed`` on a save (the minute cadence), or
        --checkpoint-every-steps is due. At an epoch's last step the save waits for the epoch's end instead
        (:meth:`due_at_epoch_end`), to come after the epoch's metrics as an epoch checkpoint."""
        every = self.settings.checkpoint_every_steps
        if not (agreed or (every and step % every == 0)):
            return False
        if epoch_ended:
            self.pending = True
        return not epoch_ended

    def due_at_epoch_end(self, epochs_done: int) -> bool:
        every = self.settings.checkpoint_every
        return bool(every) and epochs_done % every == 0 or self.pending

    def state(self, gan_state: dict[str, Any], position: dict[str, int], best_fd: float | None,
              best_measured_by: dict | None, planned_steps: int) -> dict[str, Any]:
        """The checkpoint (:mod:`~gantrain.engine.state.schema`): the GAN step's state with every rank's RNG
        streams when they were gathered at this step, the place in the data (:meth:`Position.state`), the config,
        the process count and the planned last step, the best FD and how it was measured
        (:attr:`QualityTracker.measured_by`)."""
        if self.ranks_rng is not None and self.ranks_rng[0] == position["step"]:
            gan_state = {**gan_state, "rng": {**gan_state["rng"], "ranks": self.ranks_rng[1]}}
        return assemble(gan=gan_state, position=position,
                        run={"config": self.config, "world_size": self.world_size, "planned_steps": planned_steps},
                        quality={"best_fd": best_fd, "best_fd_measured_by": best_measured_by if best_fd is not None else None})

    def gather_rng(self, step: int, rng_state: Callable[[], dict]) -> None:
        """Under DDP each rank draws its own noise: rank 0's checkpoint holds every rank's streams, so that a
        resume (a restarted worker group's, say) continues exactly where each rank stood. A collective: every
        rank calls it at the same step."""
        if self.group is None:
            return
        states: list = [None] * self.world_size
        torch.distributed.all_gather_object(states, rng_state(), group=self.group)
        self.ranks_rng = (step, states)

    def save(self, step: int, state: Callable[[], dict[str, Any]], gan: Any, collective: bool = True) -> Path | None:
        """Saves ``state()`` at ``step`` unless ``gan``'s weights are non-finite: then raises
        :class:`TrainingDiverged`, or without ``raise_non_finite`` warns and writes no file. ``collective``: all ranks are
        here at the same step, so they agree on the check and rank 0's checkpoint holds every rank's noise
        streams (:meth:`gather_rng`)."""
        non_finite = gan.non_finite_weights(collective) if step else ""
        if collective and step:
            self.gather_rng(step, gan.rng_state)
        self.pending, self.last_save_time = False, time.monotonic()
        if step == 0:
            return self.last
        self.saved_step = step  # on every rank: whether the run's end saves must not depend on the rank
        if non_finite:
            if self.raise_non_finite:
                raise self.diverged(f"non-finite weights at step {step} ({non_finite})")
            if self.is_main:
                log.warning("not saving a checkpoint at step %d: non-finite weights (%s); %s", step, non_finite,
                            self.last_finite_text())
            return self.last
        if self.is_main:
            self.last = save_checkpoint(state(), self.files, step, self.settings.keep_checkpoints)
            self.last_finite = (self.last, step)
        return self.last

    def last_finite_text(self) -> str:
        if self.last_finite is None:
            return "no finite checkpoint was written in this run"
        path, step = self.last_finite
        return f"the last finite checkpoint is {path} (step {step})"

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that ends a diverged run: what went non-finite where, and what to resume from."""
        advice = ("; lower the learning rates and continue with --resume" if self.last_finite is not None
                  else "; lower the learning rates and start again")
        return TrainingDiverged(f"training diverged: {what}; {self.last_finite_text()}{advice}")
