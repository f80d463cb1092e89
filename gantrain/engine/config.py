"""One typed config tree per run.

Every field has a docstring (the string literal under it) that doubles as CLI help text. Validation
lives in ``__post_init__`` and raises :class:`ConfigError` naming the CLI flag, so the CLI can print one
line and exit with code 2. Presets are code (:data:`PRESETS`); a TOML file and CLI flags override them,
and the resolved tree is written back as TOML that ``--config`` loads again.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import shlex
import textwrap
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gantrain.engine.errors import ConfigError
from gantrain.engine.state.rundir import RunDir
from gantrain.kernels.conv import IMPLS as LAYER_IMPLS

DATASETS = ("fashion-mnist", "mnist", "folder", "synthetic")
ARCHS = ("dcgan", "dense")
LR_DECAYS = ("none", "linear", "cosine")  # gantrain/engine/gan/lr_schedule.py implements them
LOADERS = ("auto", "memory", "torch", "dali")
DALI_DEVICES = ("auto", "cpu", "gpu")
AMP_MODES = ("auto", "off", "bf16", "fp16")  # what --amp accepts; precision.resolve_amp says what each means
FP16_NEEDS_CUDA = "fp16 needs CUDA; use --amp bf16 on CPU"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
EMA_BN_MODES = ("copy", "standing")  # gantrain/engine/gan/step.py: GANStep.generator
EVAL_METRICS = ("inception",)
LOGGERS = ("tensorboard", "wandb", "mlflow")
DIFFAUG_OPS = ("color", "translation", "cutout")  # gantrain/engine/gan/diffaug.py implements them
# Comma-list fields: on the command line their flag may also be repeated (--logger tensorboard --logger wandb).
LIST_FIELDS = ("logger", "eval_metrics", "diffaug")
DATA_ROOT_ENV = "GANTRAIN_DATA"  # the default of --data-root, read by env_data_root() alone


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


#: The largest --seed: the seeds derived from it (seed x 1,000,003 + epoch for the data order, seed x 7919 + step
#: for the noise) stay within torch's 64-bit seeds; a larger one ended the run in an overflow at its first epoch,
#: so no checkpoint holds one.
SEED_MAX = 2**44 - 1


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{_flag(name)}: {message}")


def _names(value: Any, name: str) -> tuple[str, ...]:
    """A list field's value as a tuple of names, from a comma list (``"color, cutout"``: a flag or an older file),
    a list of names (a TOML array, a repeated flag), or ``"none"``/empty for none. Raises :class:`ConfigError`."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{_flag(name)}: must be a list of names (or a comma list), got {value!r}")
    names = tuple(part.strip() for item in items for part in item.split(",") if part.strip())
    return () if names == ("none",) else names


def shown(value: Any) -> Any:
    """A config value as a person reads it: a list field as its comma list ('color,cutout'), others as they are."""
    return ",".join(value) if isinstance(value, (tuple, list)) else value


def _check_finite(section: Any) -> None:
    """Every float field of a section is a finite number: range checks written as ``x > 0`` let inf through,
    and comparisons with NaN are all false."""
    for f in fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{_flag(f.name)}: must be a finite number, got {value}")


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    """Dataset: fashion-mnist, mnist, folder (a tree of images in any format Pillow decodes: JPEG, PNG, WebP, BMP,
    TIFF, GIF, ...) or synthetic (random, for benchmarks)."""
    data_root: str | None = None
    """For fashion-mnist/mnist the folder holding FashionMNIST/raw or MNIST/raw; for folder the image folder itself.
    Falls back to $GANTRAIN_DATA (taken into the resolved config), then to the download cache."""
    image_size: int = 32
    """Side of the square training images in pixels (32, 64 or 128)."""
    channels: int = 1
    """Image channels: 1 (grayscale) or 3 (RGB)."""
    batch_size: int = 128
    """Images per step on each process (the effective batch is this times the number of processes)."""
    strict: bool = False
    """Fail on an image-folder file that looks like an image but cannot be used (unreadable, or a format Pillow
    cannot decode) instead of leaving it out."""
    loader: str = "auto"
    """Data loader: memory (decode once, keep uint8 on the device), torch (DataLoader), dali (NVIDIA DALI pipeline;
    the dali extra) or auto (DALI for image folders when installed and training on CUDA, else memory when it fits)."""
    num_workers: int = 2
    """DataLoader worker processes for --loader torch; CPU threads (and Python workers for IDX data) of --loader dali."""
    hflip: bool = False
    """Random horizontal flip of training images (a seeded coin per image and epoch, the same in every loader)."""
    dali_device: str = "auto"
    """Where --loader dali decodes and resizes: auto (the GPU when training on CUDA), gpu or cpu."""
    synthetic_size: int = 8192
    """Number of images in the synthetic dataset."""
    limit: int = 0
    """Use only the first N images of the dataset (0 = all); for quick experiments and tests."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.dataset in DATASETS, "dataset", f"must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        _check(self.image_size in (32, 64, 128), "image_size", f"must be 32, 64 or 128, got {self.image_size}")
        _check(self.channels in (1, 3), "channels", f"must be 1 or 3, got {self.channels}")
        _check(self.channels == 1 or self.dataset not in ("fashion-mnist", "mnist"), "channels",
               f"{self.dataset} is grayscale: use --channels 1")
        _check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        _check(self.loader in LOADERS, "loader", f"must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        _check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        _check(self.dali_device in DALI_DEVICES, "dali_device", f"must be one of {', '.join(DALI_DEVICES)}, "
               f"got {self.dali_device!r}")
        _check(self.synthetic_size >= 1, "synthetic_size", f"must be at least 1, got {self.synthetic_size}")
        _check(self.limit >= 0, "limit", f"must be >= 0, got {self.limit}")


@dataclass
class ModelConfig:
    arch: str = "dcgan"
    """dcgan: all-convolutional (PyTorch DCGAN layout, 4x4 kernels); dense: dense layer first, 5x5 kernels
    and a dense D head (the 128-pixel cat-face tutorial)."""
    nz: int = 100
    """Length of the latent noise vector z."""
    ngf: int = 64
    """Generator width: channels of its last hidden layer (doubling towards the input)."""
    ndf: int = 64
    """Discriminator width: channels of its first layer (doubling towards the output)."""
    kernel_size: int = 4
    """Kernel of the stride-2 (transposed) convolutions: 4 or 5."""
    g_activation: str = "relu"
    """Generator hidden activation: relu or leaky."""
    leaky_slope: float = 0.2
    """Negative slope (alpha) of LeakyReLU."""
    init_std: float = 0.02
    """Standard deviation of the N(0, std) weight initialisation."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.arch in ARCHS, "arch", f"must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        _check(self.nz >= 1, "nz", f"must be at least 1, got {self.nz}")
        _check(self.ngf >= 1 and self.ndf >= 1, "ngf", "--ngf and --ndf must be at least 1")
        _check(self.kernel_size in (4, 5), "kernel_size", f"must be 4 or 5, got {self.kernel_size}")
        _check(self.g_activation in ("relu", "leaky"), "g_activation", f"must be relu or leaky, got {self.g_activation!r}")
        _check(0 <= self.leaky_slope < 1, "leaky_slope", f"must be in [0, 1), got {self.leaky_slope}")
        _check(self.init_std > 0, "init_std", f"must be > 0, got {self.init_std}")


@dataclass
class OptimConfig:
    lr_g: float = 2e-4
    """Adam learning rate of the generator."""
    lr_d: float = 2e-4
    """Adam learning rate of the discriminator."""
    beta1: float = 0.5
    """Adam beta1 for both optimisers."""
    beta2: float = 0.999
    """Adam beta2 for both optimisers."""
    lr_decay: str = "none"
    """Learning-rate schedule of both optimisers over the run's steps: none (constant), linear (to 0 at the end,
    as pix2pix) or cosine (half a cosine to 0, SGDR without restarts)."""
    lr_decay_start: float = 0.0
    """Fraction of the run's steps trained at the full rate before --lr-decay begins (pix2pix: 0.5)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value > 0, name, f"learning rate must be > 0, got {value}")
        _check(0 <= self.beta1 < 1, "beta1", f"must be in [0, 1), got {self.beta1}")
        _check(0 <= self.beta2 < 1, "beta2", f"must be in [0, 1), got {self.beta2}")
        _check(self.lr_decay in LR_DECAYS, "lr_decay", f"must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        _check(0 <= self.lr_decay_start < 1, "lr_decay_start", f"must be in [0, 1), got {self.lr_decay_start}")
        _check(self.lr_decay != "none" or self.lr_decay_start == 0, "lr_decay_start",
               f"{self.lr_decay_start} has no effect without --lr-decay linear or cosine")


@dataclass
class LossConfig:
    label_smoothing: float = 0.0
    """One-sided label smoothing: real labels of the D loss become 1 - s (0.1 gives 0.9)."""
    noise: str = "normal"
    """Latent noise distribution: normal (N(0, 1)) or uniform (U(-1, 1))."""
    r1_gamma: float = 0.0
    """R1, a zero-centred gradient penalty on D's real inputs: gamma/2 x the batch mean of ||grad_x D(x)||^2 is
    added to D's loss (Mescheder et al. 2018, arXiv:1801.04406; StyleGAN2's regulariser of D); 0 = off."""
    r1_every: int = 4
    """Lazy R1 (StyleGAN2): the penalty is computed on every N-th D step only, weighted by N (1 = every step)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        _check(self.noise in ("normal", "uniform"), "noise", f"must be normal or uniform, got {self.noise!r}")
        _check(self.r1_gamma >= 0, "r1_gamma", f"must be >= 0 (0 = off), got {self.r1_gamma}")
        _check(self.r1_every >= 1, "r1_every", f"must be at least 1, got {self.r1_every}")

    def r1_words(self) -> str:
        """R1 in words ('R1 gamma 0.1 every 4 D steps'), or '' when off."""
        if not self.r1_gamma:
            return ""
        return f"R1 gamma {self.r1_gamma:g}" + (f" every {self.r1_every} D steps" if self.r1_every > 1 else "")


@dataclass
class GanConfig:
    ema_decay: float = 0.0
    """Keep an exponential moving average of G with this decay per step (0 = off); used for samples and generate."""
    ema_halflife: int = 0
    """EMA of G by images instead (0 = off; replaces --ema-decay): a half-life of this many images, i.e. a decay
    of 0.5 ** (images per step / half-life) per step, the same average at any batch size or process count
    (StyleGAN2-ADA's ema_kimg x 1000)."""
    ema_rampup: float = 0.0
    """With --ema-halflife: the half-life is at most this fraction of the images trained so far (0 = off;
    StyleGAN2-ADA uses 0.05), so the EMA follows G closely early and averages over more images later."""
    ema_bn: str = "copy"
    """BatchNorm statistics of the EMA generator (with --ema-decay or --ema-halflife): copy (G's running
    statistics, copied every step) or standing (recomputed for the EMA weights from 2,048 noise vectors of their
    own when the EMA generator is next used after a step: evaluation, samples, checkpoints; BigGAN's standing
    statistics)."""
    diffaug: tuple[str, ...] = ()
    """Differentiable augmentation (DiffAugment, Zhao et al. 2020) of every image D sees, real and generated, in
    the D and the G step: a comma list (or repeated flag) of color (brightness, saturation, contrast), translation
    (up to 1/8 of the size) and cutout (a square of half the size), applied in the order given; empty (or none) =
    off. For small datasets (a few thousand images), where D tends to overfit; G's samples are never augmented."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(0 <= self.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        _check(self.ema_halflife >= 0, "ema_halflife", f"must be >= 0 images (0 = off), got {self.ema_halflife}")
        _check(self.ema_rampup >= 0, "ema_rampup", f"must be >= 0 (0 = off), got {self.ema_rampup}")
        _check(self.ema_bn in EMA_BN_MODES, "ema_bn", f"must be one of {', '.join(EMA_BN_MODES)}, got {self.ema_bn!r}")
        ops = list(_names(self.diffaug, "diffaug"))
        unknown = [op for op in ops if op not in DIFFAUG_OPS]
        _check(not unknown, "diffaug", f"unknown op {unknown[0]!r}: must be empty (off) or a comma list of "
               f"{', '.join(DIFFAUG_OPS)}" if unknown else "")
        twice = [op for i, op in enumerate(ops) if op in ops[:i]]
        _check(not twice, "diffaug", f"{twice[0]!r} is listed twice" if twice else "")
        self.diffaug = tuple(ops)  # one spelling per policy: config.toml, checkpoints and resume compare it

    @property
    def ema_on(self) -> bool:
        """Whether G has an EMA copy (--ema-decay or --ema-halflife)."""
        return self.ema_decay > 0 or self.ema_halflife > 0

    def ema_beta(self, images_per_step: int, images_seen: int) -> float:
        """The EMA's decay for the step that brings the images trained to ``images_seen`` (after it), in
        ``images_per_step`` (the global batch): --ema-decay, or ``0.5 ** (images_per_step / h)`` with h the
        half-life, capped at ``ema_rampup * images_seen`` when on (StyleGAN2-ADA, training/training_loop.py, which
        counts the images before the step: its first step copies G, ours keeps 0.5 ** (1 / rampup) of the EMA)."""
        if not self.ema_halflife:
            return self.ema_decay
        half = min(self.ema_halflife, self.ema_rampup * images_seen) if self.ema_rampup else self.ema_halflife
        return 0.5 ** (images_per_step / max(half, 1e-8))

    def ema_words(self) -> str:
        """The generator EMA in words ('EMA 0.99 (standing BN statistics)', 'EMA half-life 10,000 images, ramp-up
        0.05'), or '' when off."""
        if not self.ema_on:
            return ""
        words = (f"EMA half-life {self.ema_halflife:,} images" + (f", ramp-up {self.ema_rampup:g}" if
                 self.ema_rampup else "")) if self.ema_halflife else f"EMA {self.ema_decay:g}"
        return words + (" (standing BN statistics)" if self.ema_bn == "standing" else "")


@dataclass
class RunConfig:
    epochs: int = 20
    """Number of passes over the training set."""
    max_steps: int = 0
    """Stop after this many steps (optimiser updates, whatever the batch) in total (0 = no limit; epochs decide)."""
    seed: int = 0
    """Seed of weights, data order, noise and the fixed sample noise."""
    out: str = ""
    """Run folder."""
    device: str = "auto"
    """auto (CUDA when present), cpu or cuda."""
    nonfinite_patience: int = 1
    """Stop the run (exit 1) when the logged losses are NaN or infinite at this many log intervals (of --log-every
    steps) in a row; 0 = do not stop on losses. Non-finite weights are never checkpointed."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.epochs >= 1, "epochs", f"must be at least 1, got {self.epochs}")
        _check(self.max_steps >= 0, "max_steps", f"must be >= 0, got {self.max_steps}")
        _check(0 <= self.seed <= SEED_MAX, "seed", f"must be between 0 and {SEED_MAX:,}, got {self.seed}")
        _check(self.device in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {self.device!r}")
        _check(self.nonfinite_patience >= 0, "nonfinite_patience", f"must be >= 0, got {self.nonfinite_patience}")


@dataclass
class CheckpointConfig:
    checkpoint_every: int = 1
    """Write a checkpoint every N epochs (0 = only the final one; a checkpoint is always written at the end)."""
    checkpoint_every_steps: int = 0
    """Also write a checkpoint every N steps (0 = off): what a restarted DDP worker group resumes from."""
    checkpoint_every_minutes: float = 0.0
    """Also write a checkpoint when this many minutes passed since the last one (0 = off)."""
    keep_checkpoints: int = 3
    """Numbered checkpoints to keep besides last.pt."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps",
               f"must be >= 0, got {self.checkpoint_every_steps}")
        _check(self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes",
               f"must be >= 0, got {self.checkpoint_every_minutes}")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints", f"must be at least 1, got {self.keep_checkpoints}")


@dataclass
class LoggingConfig:
    log_every: int = 50
    """Log losses and images/s every N steps."""
    sample_every: int = 500
    """Write the fixed-noise sample grid every N steps, and at step 0 and step N/10 (0 = only at the end)."""
    logger: tuple[str, ...] = ()
    """Experiment trackers fed from metrics.jsonl's records: none, or a comma list (or repeated flag) of tensorboard
    (events in <run>/tb), wandb (offline unless WANDB_MODE says otherwise) and mlflow (<run>/mlflow.db with
    artifacts in <run>/mlartifacts, unless MLFLOW_TRACKING_URI is set); each needs the extra of its name
    installed."""

    profile_steps: str = ""
    """Profile steps A:B (e.g. 20:25, counted from 1) with torch.profiler: a Chrome/Perfetto trace naming the
    phases (data, d_step, g_step) and a table of the costliest ops, in <run>/profile/ (empty = off)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.log_every >= 1, "log_every", f"must be at least 1, got {self.log_every}")
        self.profile_steps = str(self.profile_steps).strip()
        if self.profile_steps:
            self.profile_range  # noqa: B018 - validates
        _check(self.sample_every >= 0, "sample_every", f"must be >= 0, got {self.sample_every}")
        self.logger = _names(self.logger, "logger")
        bad = [n for n in self.logger if n not in LOGGERS]
        _check(not bad, "logger", f"must be none or a comma list of {', '.join(LOGGERS)}, got {bad[0]!r}" if bad else "")

    @property
    def profile_range(self) -> tuple[int, int] | None:
        """--profile-steps as (first, last) step, both included; None when off. Raises :class:`ConfigError`."""
        if not self.profile_steps:
            return None
        first, sep, last = self.profile_steps.partition(":")
        ok = sep == ":" and first.strip().isdigit() and last.strip().isdigit()
        _check(ok, "profile_steps", f"must be A:B, the first and last step to profile (e.g. 20:25), got "
                                    f"{self.profile_steps!r}")
        a, b = int(first), int(last)
        _check(1 <= a <= b, "profile_steps", f"must be A:B with 1 <= A <= B, got {self.profile_steps!r}")
        return a, b


@dataclass
class EvalConfig:
    eval_every: int = 0
    """Evaluate quality metrics every N epochs (0 = off)."""
    eval_every_steps: int = 0
    """Also evaluate every N optimiser steps (0 = off)."""
    eval_every_images: int = 0
    """Also evaluate each time the images seen pass a multiple of N (0 = off; e.g. 60000 = every FashionMNIST
    epoch's worth, whatever the batch)."""
    eval_samples: int = 2000
    """Generated images per evaluation during training (2000 keeps the cost to a few % of an epoch)."""
    samples_from_best: bool = False
    """With an evaluation cadence (--eval-every, --eval-every-steps or --eval-every-images): the end-of-run sample
    grid comes from checkpoints/best.pt (the evaluation with the lowest
    FD) rather than from the last step, which is often not the best one; the log says which step it shows."""
    metrics_cache: str = ""
    """Folder of fitted feature extractors and real-data features (default: $GANTRAIN_CACHE, else
    $XDG_CACHE_HOME/gantrain/metrics, else ~/.cache/gantrain/metrics)."""
    eval_metrics: tuple[str, ...] = ()
    """Extra metrics at each --eval-every evaluation and in tune trials, a comma list: inception (the standard
    FID and KID in Inception-v3 features; the fid extra; about 0.3 s per image on a CPU, so off by default).
    Empty: the domain-extractor metrics only."""
    inception_mode: str = "legacy-tf"
    """How the Inception metrics resize to 299 px: legacy-tf (TF1 bilinear, as TTUR/pytorch-fid and most published
    FID tables) or clean (Pillow bicubic, as clean-fid's "clean" tables)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        for name in ("eval_every", "eval_every_steps", "eval_every_images"):
            _check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        _check(self.eval_samples >= 100, "eval_samples", f"must be at least 100, got {self.eval_samples}")
        self.eval_metrics = _names(self.eval_metrics, "eval_metrics")
        unknown = [m for m in self.eval_metrics if m not in EVAL_METRICS]
        _check(not unknown, "eval_metrics", f"must be a comma list of {', '.join(EVAL_METRICS)}, got {unknown[0]!r}"
               if unknown else "")
        _check(self.inception_mode in ("legacy-tf", "clean"), "inception_mode",
               f"must be legacy-tf or clean, got {self.inception_mode!r}")

    @property
    def evaluates(self) -> bool:
        """Whether a run evaluates during training (by epochs, steps or images)."""
        return bool(self.eval_every or self.eval_every_steps or self.eval_every_images)


@dataclass
class PerfConfig:
    amp: str = "auto"
    """Mixed precision: auto (bf16 where it computes faster than fp32: Ampere+ GPUs, CPUs with AMX, AMD CPUs with
    AVX512-BF16; else fp32), off (fp32), bf16, or fp16 (CUDA, with a GradScaler)."""
    channels_last: bool = True
    """Keep models and every input batch in channels-last memory format."""
    compile: bool = False
    """torch.compile G and D (separately)."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead or max-autotune."""
    fused_adam: bool = True
    """Use the fused Adam kernel where the device has one, else the multi-tensor (foreach) one."""
    cuda_graphs: bool = False
    """Capture the steps as CUDA graphs (CUDA only; implies --compile-mode reduce-overhead)."""
    compile_cache_dir: str = ""
    """Inductor cache folder for --compile (default: $TORCHINDUCTOR_CACHE_DIR or torch's own)."""
    layer_impl: str = "fast"
    """How the DCGAN layers compute: fast (exact rewrites measured faster: the dense ends as matrix products and,
    on CPU, some gradients of the 4x4 stride-2 convolutions in other forms, each layer's timed against torch's
    once per machine when training starts; see gantrain/kernels/conv.py) or aten (torch's convolutions as they
    are, the reference)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.amp in AMP_MODES, "amp", f"must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        _check(self.compile_mode in COMPILE_MODES, "compile_mode", f"must be one of {', '.join(COMPILE_MODES)}")
        _check(self.layer_impl in LAYER_IMPLS, "layer_impl", f"must be one of {', '.join(LAYER_IMPLS)}, "
               f"got {self.layer_impl!r}")


@dataclass
class DistConfig:
    ddp: bool = False
    """Train with DistributedDataParallel (torchrun-style launch; gloo on CPU, NCCL on CUDA)."""
    nproc: int = 1
    """Processes per node to launch with --ddp."""
    nnodes: int = 1
    """Number of nodes taking part."""
    node_rank: int = 0
    """Rank of this node."""
    master_addr: str = "127.0.0.1"
    """Address of the rank-0 node."""
    master_port: int = 29500
    """Port of the rank-0 node."""
    rdzv_endpoint: str = ""
    """HOST:PORT of a c10d rendezvous (torchrun's --rdzv-backend c10d) instead of --master-addr/--master-port;
    the same on every node, node ranks are then assigned by the rendezvous."""
    rdzv_id: str = "gantrain"
    """Job id of the c10d rendezvous: the same on every node of one job, another for a concurrent job."""
    ray: bool = False
    """Train as --ray-workers DDP workers of a Ray Train TorchTrainer, on the Ray cluster at --ray-address (or a
    local one)."""
    ray_address: str = ""
    """With --ray: auto (the cluster this machine belongs to), ray://HOST:10001, or empty for a local Ray."""
    ray_workers: int = 2
    """With --ray: DDP workers (Ray Train's ScalingConfig num_workers)."""
    gpus_per_worker: float = 0.0
    """With --ray: GPUs per worker (0: CPU workers with gloo)."""
    cpus_per_worker: float = 1.0
    """With --ray: CPUs per worker."""
    ray_wait: float = 600.0
    """With --ray-address: seconds to wait for a cluster smaller than the request to grow (an autoscaler) before
    refusing; a local Ray, which cannot grow, is refused at once."""
    ray_storage: str = ""
    """With --ray: Ray Train's storage path for its checkpoints (default: <out>/ray); shared by all nodes."""
    max_restarts: int = 3
    """With --ddp: times torchrun's elastic agent restarts the worker group after a worker fails; every rank
    resumes from the run's last.pt (0 = a failure ends the run)."""
    sync_bn: bool = False
    """Use SyncBatchNorm (CUDA only)."""
    dist_timeout: float = 30.0
    """Minutes a DDP collective waits for the other workers before it fails (gloo's and NCCL's timeout, as Ray
    Train's default): how long a stopped or unreachable worker holds up the others before the run fails (or
    restarts, --max-restarts); longer than rank 0's longest pause (fitting a metrics extractor at the start)."""
    stall_warning: float = 60.0
    """Seconds a DDP worker may give no sign of life before the others say which rank they wait for, at which step
    (0 = never say)."""

    def __post_init__(self) -> None:
        _check_finite(self)
        _check(self.nproc >= 1, "nproc", f"must be at least 1, got {self.nproc}")
        _check(self.dist_timeout > 0, "dist_timeout", f"must be > 0 minutes, got {self.dist_timeout}")
        _check(self.stall_warning >= 0, "stall_warning", f"must be >= 0 seconds, got {self.stall_warning}")
        _check(self.ray_wait >= 0, "ray_wait", f"must be >= 0 seconds, got {self.ray_wait}")
        _check(self.nnodes >= 1, "nnodes", f"must be at least 1, got {self.nnodes}")
        _check(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in [0, nnodes), got {self.node_rank}")
        _check(0 < self.master_port < 65536, "master_port", f"must be a TCP port, got {self.master_port}")
        _check(self.max_restarts >= 0, "max_restarts", f"must be >= 0, got {self.max_restarts}")
        _check(not (self.ray and self.ddp), "ray", "--ray runs DDP workers itself; leave out --ddp")
        _check(self.ray_workers >= 1, "ray_workers", f"must be at least 1, got {self.ray_workers}")
        _check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            _check(bool(host) and port.isdigit() and 0 < int(port) < 65536, "rdzv_endpoint",
                   f"must be HOST:PORT, got {self.rdzv_endpoint!r}")
        _check(bool(self.rdzv_id) and all(c.isalnum() or c in "-_." for c in self.rdzv_id), "rdzv_id",
               f"must be letters, digits, '-', '_' or '.', got {self.rdzv_id!r}")


@dataclass
class Config:
    preset: str = "fashion32"
    """Preset the run started from."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self) -> None:
        if self.model.arch == "dense":
            _check(self.model.kernel_size == 5, "kernel_size", "the dense architecture uses 5x5 kernels (add "
                   "--kernel-size 5, or start from --preset cats128)")
        if self.perf.amp == "fp16":
            _check(self.run.device != "cpu", "amp", FP16_NEEDS_CUDA)  # at once; --device auto: resolve_amp
        if self.perf.cuda_graphs:
            _check(self.run.device != "cpu", "cuda_graphs", "CUDA graphs need --device cuda")
        if self.dist.sync_bn:
            _check(self.run.device != "cpu", "sync_bn", "SyncBatchNorm needs CUDA (it is not implemented for the CPU)")
        if self.data.dali_device == "gpu":
            _check(self.run.device != "cpu", "dali_device", "a GPU pipeline needs CUDA, but --device is cpu; "
                   "use --dali-device cpu (or auto)")

    def without_effect(self, distributed: bool | None = None) -> list[str]:
        """The settings this config holds that do nothing in its run, each with why ('--sync-bn (not
        distributed)'): the run says them in one log line rather than ignoring them silently. ``distributed``:
        whether the run has several processes (a run under an outside torchrun has, without --ddp); default: as
        the config says (--ddp or --ray)."""
        idle = []
        if self.gan.ema_bn == "standing" and not self.gan.ema_on:
            idle.append("--ema-bn standing (no EMA: --ema-decay and --ema-halflife 0)")
        if self.gan.ema_decay and self.gan.ema_halflife:
            idle.append(f"--ema-decay {self.gan.ema_decay:g} (--ema-halflife {self.gan.ema_halflife} sets the "
                        "decay)")
        if self.gan.ema_rampup and not self.gan.ema_halflife:
            idle.append(f"--ema-rampup {self.gan.ema_rampup:g} (no --ema-halflife)")
        if self.loss.r1_every != LossConfig.r1_every and not self.loss.r1_gamma:
            idle.append(f"--r1-every {self.loss.r1_every} (no R1: --r1-gamma 0)")
        if distributed is None:
            distributed = self.dist.ddp or self.dist.ray
        if self.dist.sync_bn and not distributed:
            idle.append("--sync-bn (not distributed: no --ddp, --ray or torchrun)")
        return idle

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON/TOML-native data (a list field as a list), as checkpoints and reports store it."""
        return {key: {name: list(v) if isinstance(v, tuple) else v for name, v in value.items()}
                if isinstance(value, dict) else value for key, value in dataclasses.asdict(self).items()}

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out or f"runs/{self.preset}")

    @property
    def resume_flags(self) -> str:
        """The flags that continue this run, for messages: ``--resume auto --out <run folder>`` and the launch
        (``--ddp --nproc N``, ``--ray --ray-workers N``), which a resume takes from the command, not the
        checkpoint: without it a DDP run would continue as one process at another global batch."""
        d, flags = self.dist, f"--resume auto --out {shlex.quote(str(self.run_dir))}"
        if d.ray:
            return f"{flags} --ray --ray-workers {d.ray_workers}"
        if d.ddp:
            return f"{flags} --ddp --nproc {d.nproc}" + (f" --nnodes {d.nnodes}" if d.nnodes > 1 else "")
        return flags


SECTION_TYPES: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "loss": LossConfig, "gan": GanConfig,
    "run": RunConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig, "eval": EvalConfig,
    "perf": PerfConfig, "dist": DistConfig,
}
#: Fields that moved to another section (config.toml files and checkpoints written before still load):
#: (old section, field) -> section.
MOVED_FIELDS: dict[tuple[str, str], str] = {
    **{("run", name): "checkpoint" for name in ("checkpoint_every", "checkpoint_every_steps",
                                                "checkpoint_every_minutes", "keep_checkpoints")},
    **{("run", name): "logging" for name in ("log_every", "sample_every", "logger")},
    **{("run", name): "eval" for name in ("eval_every", "eval_samples", "samples_from_best", "metrics_cache",
                                          "eval_metrics")},
    ("perf", "ema_decay"): "gan", ("perf", "ema_bn"): "gan", ("loss", "diffaug"): "gan",
}


def current_layout(raw: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict (a TOML file, a checkpoint's or a report's config) with every field of
    :data:`MOVED_FIELDS` in the section it lives in now; anything else is left as it is."""
    moved: dict[str, Any] = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for (old, name), new in MOVED_FIELDS.items():
        section = moved.get(old)
        if isinstance(section, dict) and name in section:
            target = moved.setdefault(new, {})
            if isinstance(target, dict):
                target.setdefault(name, section.pop(name))
    return moved


def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each dataclass field, for help text and the TOML comments."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def field_index() -> dict[str, tuple[str, type]]:
    """Maps every leaf field name (unique across sections) to its section and Python type."""
    index: dict[str, tuple[str, type]] = {}
    for section, cls in SECTION_TYPES.items():
        hints = {f.name: f.type for f in fields(cls)}
        for name, hint in hints.items():
            assert name not in index, f"duplicate config field {name}"
            index[name] = (section, _python_type(hint))
    return index


def _python_type(hint: Any) -> type:
    text = hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("tuple", tuple)):
        if text.startswith(name):
            return typ
    return str


def from_dict(raw: dict[str, Any], *, base: Config | None = None, source: str = "config") -> Config:
    """Builds a validated config: ``base`` (or the defaults) overlaid with the nested dict ``raw``."""
    merged = (base or Config()).to_dict()
    for key, value in current_layout(raw).items():
        if key == "preset":
            merged["preset"] = value
            continue
        if key not in SECTION_TYPES:
            raise ConfigError(f"{source}: unknown section [{key}] (known: {', '.join(SECTION_TYPES)})")
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: [{key}] must be a table")
        known = {f.name for f in fields(SECTION_TYPES[key])}
        for name, item in value.items():
            if name not in known:
                raise ConfigError(f"{source}: unknown field {key}.{name}")
            merged[key][name] = _coerce(item, _python_type(_hint(key, name)), name)
    return _build(merged)


def _hint(section: str, name: str) -> Any:
    return {f.name: f.type for f in fields(SECTION_TYPES[section])}[name]


def _coerce(value: Any, typ: type, name: str) -> Any:
    if value is None:
        return None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is tuple:
        return _names(value, name)
    if typ is str and not isinstance(value, str):
        raise ConfigError(f"{_flag(name)}: must be a string, got {value!r}")
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"{_flag(name)}: must be true or false, got {value!r}")
    if typ in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ConfigError(f"{_flag(name)}: must be a number, got {value!r}")
    if typ is int and isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(f"{_flag(name)}: must be an integer, got {value!r}")
        return int(value)
    return value


def _build(merged: dict[str, Any]) -> Config:
    sections = {name: cls(**merged[name]) for name, cls in SECTION_TYPES.items()}
    return Config(preset=merged["preset"], **sections)


def override(cfg: Config, flat: dict[str, Any]) -> Config:
    """Applies flat ``{field: value}`` overrides (CLI flags) to a config; ``None`` values are ignored."""
    index = field_index()
    nested: dict[str, dict[str, Any]] = {}
    for name, value in flat.items():
        if value is None:
            continue
        if name not in index:
            raise ConfigError(f"unknown config field {name!r}")
        nested.setdefault(index[name][0], {})[name] = value
    return from_dict(nested, base=cfg)


RESOLVED_HEADER = "# gantrain resolved config"  # the first line of every config.toml gantrain writes


def require_toml_file(path: str | Path, flag: str) -> Path:
    """``path`` as a Path when it is a file; else :class:`ConfigError` "``flag``: ..." naming a folder as one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag}: {path} is a folder, not a TOML file" if path.is_dir() else
                          f"{flag}: no such file {path}")
    return path


def load_toml(path: str | Path, base: Config | None = None) -> Config:
    """The config of a TOML file: its fields over ``base``, else over its ``preset``'s (a partial file), else over
    the field defaults for a resolved config gantrain wrote (:func:`to_toml`), whose missing fields came later.
    Raises :class:`ConfigError` for a missing, unreadable or invalid file."""
    path = require_toml_file(path, "--config")
    try:
        text = path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config: {path} is not valid TOML ({exc})") from None
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    if base is None and "preset" in raw:
        base = toml_base(raw["preset"], text)
    return from_dict(raw, base=base, source=str(path))


def toml_base(preset_name: str, text: str) -> Config:
    """What a TOML file with ``preset = preset_name`` (and no --preset) lays its fields over: that preset for a
    partial file; the field defaults for a resolved config gantrain wrote (``text`` begins with
    :data:`RESOLVED_HEADER`), since every field of its day is in it and one it lacks was added since: the run it
    records trained with that field's default, not with what the preset holds today. Raises :class:`ConfigError`
    for an unknown preset."""
    base = preset(preset_name)
    return Config(preset=base.preset) if text.startswith(RESOLVED_HEADER) else base


def to_toml(cfg: Config) -> str:
    """Writes the resolved config as commented TOML (readable by :func:`load_toml`)."""
    lines = [f"{RESOLVED_HEADER}: load it again with `gantrain run --config <this file>`",
             f"preset = {_toml_value(cfg.preset)}", ""]
    for section, cls in SECTION_TYPES.items():
        docs = field_docs(cls)
        lines.append(f"[{section}]")
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            if value is None:
                lines.append(f"# {name} is unset: {docs.get(name, '')}")
                continue
            lines.append(f"{name} = {_toml_value(value)}  # {docs.get(name, '')}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + "".join(_toml_escape(ch) for ch in str(value)) + '"'


_TOML_ESCAPES = {"\\": "\\\\", '"': '\\"', "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_escape(ch: str) -> str:
    """One character of a TOML basic string: backslash, quote and control characters escaped."""
    if ch in _TOML_ESCAPES:
        return _TOML_ESCAPES[ch]
    return f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch


def _fashion32() -> Config:
    return Config(preset="fashion32")


def _fashion32_tuned() -> Config:
    """fashion32 with the recipe chosen by ``gantrain bench --to-quality`` (docs/results/to-quality-fashion32.md,
    to-quality-fashion32-r1.md): the ASHA search's learning rates and one-sided smoothing, D half as wide (ndf 32)
    at batch 32 with R1 (gamma 0.3, every 16th D step), a G EMA by images (a half-life of 5% of the images seen, at
    most 20,000) with standing BatchNorm statistics, Adam betas (0, 0.99) with a linear learning-rate decay to 0
    over a budget of 5 epochs (the run ends at its best), an evaluation every epoch (best.pt) and the end-of-run
    samples from the best evaluation."""
    return Config(preset="fashion32-tuned", data=DataConfig(batch_size=32), model=ModelConfig(ndf=32),
                  optim=OptimConfig(lr_g=1.5e-3, lr_d=4e-4, beta1=0.0, beta2=0.99, lr_decay="linear"),
                  loss=LossConfig(label_smoothing=0.25, r1_gamma=0.3, r1_every=16),
                  gan=GanConfig(ema_halflife=20_000, ema_rampup=0.05, ema_bn="standing"),
                  run=RunConfig(epochs=5), eval=EvalConfig(eval_every=1, samples_from_best=True))


def _mnist32() -> Config:
    return Config(preset="mnist32", data=DataConfig(dataset="mnist"))


def _dcgan64() -> Config:
    """The classic 64x64 DCGAN of the PyTorch examples, for any square image folder."""
    return Config(
        preset="dcgan64",
        data=DataConfig(dataset="folder", image_size=64, channels=3, batch_size=128),
        run=RunConfig(epochs=25),
    )


def _cats64() -> Config:
    cfg = _dcgan64()
    cfg.preset = "cats64"
    cfg.run = RunConfig(epochs=50)
    cfg.checkpoint = CheckpointConfig(checkpoint_every=5)
    return cfg


def _cats64_diffaug() -> Config:
    """cats64 with DiffAugment (colour, translation, cutout; Zhao et al. 2020, arXiv:2006.10738) on D's inputs:
    the one change to cats64 measured by ``gantrain bench --to-quality`` (README, "DiffAugment on cats64")."""
    cfg = _cats64()
    cfg.preset = "cats64-diffaug"
    cfg.gan = GanConfig(diffaug="color,translation,cutout")
    return cfg


def _cats128() -> Config:
    """The 128x128 cat-face tutorial: dense-first G, 5x5 kernels, separate lrs, smoothed real labels."""
    return Config(
        preset="cats128",
        data=DataConfig(dataset="folder", image_size=128, channels=3, batch_size=64),
        model=ModelConfig(arch="dense", kernel_size=5, g_activation="leaky", leaky_slope=0.2),
        optim=OptimConfig(lr_g=2e-4, lr_d=5e-5, beta1=0.5),
        loss=LossConfig(label_smoothing=0.1, noise="uniform"),
        run=RunConfig(epochs=215),
        checkpoint=CheckpointConfig(checkpoint_every=5),
        logging=LoggingConfig(sample_every=10),
    )


PRESETS = {
    "fashion32": (_fashion32, "DCGAN on FashionMNIST at 32x32 (the PyTorch tutorial)"),
    "fashion32-tuned": (_fashion32_tuned, "Recommended: fashion32 with the recipe fastest to good samples"),
    "mnist32": (_mnist32, "The same DCGAN on MNIST digits"),
    "cats64": (_cats64, "Classic 64x64 DCGAN on a cat-face folder"),
    "cats64-diffaug": (_cats64_diffaug, "Recommended: cats64 with DiffAugment, lower FD at equal time"),
    "cats128": (_cats128, "Dense-first 128x128 DCGAN on cat faces (the cat tutorial)"),
    "dcgan64": (_dcgan64, "Classic 64x64 DCGAN (PyTorch examples) for any square image folder"),
}


# The recipe each preset's users are pointed to where one was measured better (`gantrain presets`, `gantrain bench
# --to-quality`); the plain preset stays as published (the tutorial's or the classic DCGAN's recipe), the reference
# users compare with.
RECOMMENDED = {"fashion32": "fashion32-tuned", "cats64": "cats64-diffaug"}


def recommended_measured() -> dict[str, str]:
    """What each recommended recipe measured in ``gantrain bench --to-quality``, in words, by preset: read from the
    package's ``resources/measured.json`` (figures live in data, not in code; their JSON: docs/results/)."""
    import json
    from importlib import resources

    data = json.loads(resources.files("gantrain.resources").joinpath("measured.json").read_text(encoding="utf-8"))
    return {name: entry["text"] for name, entry in data["recommended"].items()}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name][0]()


def resolve(preset_name: str | None, config_file: str | None, flags: dict[str, Any],
            base: Config | None = None) -> Config:
    """Preset, then the TOML file, then CLI flags: the order in which later sources win; then the environment
    fills what none of them set (:func:`with_env_defaults`). ``base``: the config to lay the flags over when
    neither a preset nor a file is given (a resumed checkpoint's), instead of the default preset."""
    cfg = preset(preset_name) if preset_name else None
    if config_file:
        cfg = load_toml(config_file, base=cfg)
        if preset_name and cfg.preset != preset_name:  # the file's label over --preset's values: neither run
            raise ConfigError(f"--config {config_file} names preset {cfg.preset!r}, --preset {preset_name!r}: drop "
                              f"--preset to train the file's {cfg.preset}, or the file's preset line to lay it "
                              f"over {preset_name}")
        if flags.get("out") is None:
            _refuse_a_moved_run_folder(Path(config_file), cfg)
    return with_env_defaults(override(cfg or base or preset("fashion32"), flags))


def _refuse_a_moved_run_folder(config_file: Path, cfg: Config) -> None:
    """Raises :class:`ConfigError` for a run folder's config.toml whose recorded ``out`` is another folder (a
    copied or moved run folder): loaded as it is, the run would write into the recorded folder, not the one the
    user pointed at. Other config files (tune's best.toml, a file of one's own) name their ``out`` freely."""
    files = RunDir(config_file.parent)
    if os.environ.get("GANTRAIN_LAUNCH_STATUS"):  # a DDP worker reads its launcher's copy, out as resolved there
        return
    if config_file.name != files.config.name or not (files.checkpoints.is_dir() or files.metrics.is_file()):
        return
    recorded, here = cfg.run_dir.expanduser(), config_file.parent  # (out unset: the preset's runs/<preset>)
    try:
        same = recorded.resolve() == here.resolve()
    except OSError:
        same = False
    if not same:
        raise ConfigError(f"--config {config_file}: this run folder's config records out = {recorded}, not the "
                          f"folder it sits in ({here}: copied or moved?); pass --out {here} to use this folder, or "
                          f"--out {recorded} for the recorded one")


def env_data_root() -> str | None:
    """$GANTRAIN_DATA, or None: the one place gantrain reads it."""
    return os.environ.get(DATA_ROOT_ENV) or None


def with_env_defaults(cfg: Config) -> Config:
    """``cfg`` with its --data-root as :func:`data_root_of` makes it: $GANTRAIN_DATA when unset, absolute. Resolved
    once, here, the folder travels in the config: to the loaders and the metrics, into config.toml and every
    checkpoint, to DDP workers (the config file) and to tune's trials on other nodes (base.toml), whatever their
    environment or working directory."""
    root = data_root_of(cfg.data.data_root)
    return cfg if root == cfg.data.data_root else override(cfg, {"data_root": root})


def data_root_of(root: str | None) -> str | None:
    """A --data-root as a resolved config keeps it: $GANTRAIN_DATA when unset (``root`` itself when that is unset
    too: the download cache), ``~`` expanded, absolute and normalised (``os.path.abspath``: a relative folder
    joined to the working directory, ``..`` taken lexically), so one folder is one string wherever it is compared."""
    chosen = root or env_data_root()
    return os.path.abspath(os.path.expanduser(chosen)) if chosen else root
