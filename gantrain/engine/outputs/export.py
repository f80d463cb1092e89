"""``gantrain export``: a generator for sharing, as one safetensors file (weights plus the config it is built
from, in the file's string metadata), which ``gantrain generate`` reads like a checkpoint.

safetensors (Hugging Face's format) holds tensors only, so loading it runs no code, unlike a pickled
checkpoint; the metadata keys are ``format`` ("gantrain-generator"), ``format_version``, ``config`` (the run's
whole config as JSON: ``model`` builds the network, ``data`` gives image size and channels, ``loss.noise`` the
latent distribution), ``weights`` ("ema" or "raw"), ``step`` and ``gantrain_version``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gantrain import __version__
from gantrain.engine.config import from_dict
from gantrain.engine.errors import CheckpointError, GantrainError
from gantrain.engine.state.checkpoint import check_finite, load_checkpoint, load_module_state
from gantrain.engine.state.files import atomic_write
from gantrain.engine.state.schema import Parts, generator_weights, step_of

FORMAT = "gantrain-generator"
FORMAT_VERSION = "1"


def _safetensors():
    try:
        import safetensors.torch as st
    except Exception:  # any broken install is as good as absent
        raise GantrainError("safetensors is not installed (pip install safetensors); it is a dependency of "
                            "gantrain, so reinstall gantrain") from None
    return st


def export_generator(checkpoint: str | Path, out: str | Path, use_ema: bool = True) -> tuple[Path, str]:
    """Writes the checkpoint's generator (its EMA copy when present and ``use_ema``) to ``out`` (atomically).

    Returns the path and which weights were written ("ema" or "raw"). Raises :class:`CheckpointError` for an
    unreadable checkpoint or non-finite weights, :class:`RunIOError` when ``out`` cannot be written."""
    st = _safetensors()
    state = load_checkpoint(checkpoint)
    weights, what = generator_weights(Parts.of(state).gan, use_ema)
    ema = what == "EMA generator"
    check_finite(weights, what, checkpoint)
    # safetensors stores dense row-major tensors: channels-last weights are made contiguous (same values)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": json.dumps(Parts.of(state).config),
                "weights": "ema" if ema else "raw", "step": str(step_of(state)), "gantrain_version": __version__}
    data = st.save(tensors, metadata=metadata)
    path = atomic_write(out, lambda fh: fh.write(data))
    return path, metadata["weights"]


def is_export(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file (its 8-byte header length, then a JSON header)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0


def load_export(path: str | Path):
    """The generator (eval mode, CPU) and its config from an exported file. Raises :class:`CheckpointError`
    for a file that is not a gantrain generator export or whose weights do not fit its config."""
    from safetensors import safe_open

    from gantrain.engine.gan.models import Generator

    _safetensors()
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # a torn or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a safetensors file but not a gantrain generator export (no "
                              f"format={FORMAT} metadata)")
    try:
        cfg = from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config metadata is unreadable ({exc})") from None
    check_finite(tensors, "generator", path)
    generator = Generator(cfg.model, cfg.data.image_size, cfg.data.channels)
    load_module_state(generator, tensors, "generator", path)
    return generator.eval(), cfg


def export_step(path: str | Path) -> int | None:
    """The training step an exported generator was saved at (None when its metadata lacks it)."""
    step = _metadata(path).get("step")
    return int(step) if step and step.isdigit() else None


def export_weights(path: str | Path) -> str | None:
    """Which generator an export holds: "ema" (the EMA copy), "raw" (G's own), None when its metadata lacks it."""
    return _metadata(path).get("weights")


def _metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata() or {}
