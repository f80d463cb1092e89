"""One decode path for users' image files: every mode Pillow opens becomes the 8-bit picture a viewer shows.

Every loader's pixels come from here, directly (the memory and torch loaders, the metrics extractor) or as the
reference the DALI pipeline is held to (files DALI would decode differently are routed through
:func:`decode_to_viewer`, see :mod:`gantrain.engine.data.dali`). The rules, per Pillow mode:

============================  ===========================================================================
mode                          becomes
============================  ===========================================================================
``1``, ``L``, ``P``, ``RGB``  their colours (a palette is looked up; bilevel is 0 / 255)
``I;16``, ``I;16B`` (16-bit)  ``round(v * 255 / 65535)``: the full 16-bit range onto 0..255 (Pillow's own
                              ``convert("L")`` clips at 255, turning a 16-bit ramp 98 % white). 16-bit colour
                              PNGs (RGB, RGBA, gray + alpha) Pillow reads by each sample's high byte,
                              ``v >> 8``, within 1 of that
``I`` (32-bit integer)        as 16-bit, values clipped to [0, 65535] (Pillow opened 16-bit PNGs as ``I``)
``F`` (32-bit float)          ``round(v * 255)`` with v clipped to [0, 1] (NaN as 0): floats as linear [0, 1]
``CMYK``                      ``(255 - C)(255 - K) / 255`` per channel (no ICC colour management)
``LA``, ``RGBA``, ``PA``,     composited over **white**, as a viewer shows transparency on a white page:
``P`` with ``transparency``   ``round(c * a / 255 + 255 * (1 - a / 255))``
``YCbCr``, ``LAB``, ``HSV``   converted to RGB by Pillow
============================  ===========================================================================

Before that, the EXIF orientation tag (phone photos stored sideways) is applied, and an animation
contributes its first frame. The picture then goes to the model's channels: grayscale to RGB by repeating it,
RGB to grayscale by ITU-R BT.601 luma (``0.299 R + 0.587 G + 0.114 B``, Pillow's ``convert("L")``).
Embedded ICC profiles are not applied: pixel values are taken as sRGB, as DALI does.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ALPHA_BACKGROUND = 255  # transparency is composited over white
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")


def has_alpha(img: Image.Image) -> bool:
    """Whether ``img`` carries transparency: an alpha channel, or a transparent colour/palette entries (tRNS)."""
    return img.mode in ALPHA_MODES or (img.mode in ("P", "L", "RGB", "1") and "transparency" in img.info)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1, the default, when absent or invalid)."""
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: show the image as stored, as viewers do
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def decode_to_viewer(img: Image.Image) -> Image.Image:
    """``img`` as an image viewer shows it: an 8-bit ``L`` or ``RGB`` image (see the module's table).

    The first frame of an animation; EXIF orientation applied; 16-bit, integer and float samples scaled to
    8 bits; transparency composited over white. Raises whatever Pillow raises for a file it cannot decode.
    """
    if orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        samples = np.asarray(img).astype(np.float64)
        return Image.fromarray(_round_u8(np.clip(samples, 0, 65535) * (255 / 65535)), "L")
    if mode == "F":
        samples = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        return Image.fromarray(_round_u8(np.clip(samples, 0, 1) * 255), "L")
    if has_alpha(img):
        rgba = img.convert("LA" if mode in ("L", "LA", "La", "1") else "RGBA")
        return _over_background(rgba)
    if mode in ("L", "RGB"):
        return img
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """An ``L``/``RGB`` image as the model's channels: 1 (BT.601 luma) or 3 (gray repeated)."""
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


COLOUR_CHROMA = 6.0
"""Mean over pixels of (max - min) over R, G, B, in 0..255, above which an image counts as colour: grayscale saved
as RGB (JPEG chroma noise included) stays within a few levels; of 32 of the repository's cat-face photographs,
28 are above it (their median 22)."""


def holds_colour(array: np.ndarray) -> bool:
    """Whether a decoded uint8 (3, H, W) image holds colour (:data:`COLOUR_CHROMA`), not gray stored as RGB."""
    pixels = array.astype(np.int16)
    return float((pixels.max(axis=0) - pixels.min(axis=0)).mean()) > COLOUR_CHROMA


@contextlib.contextmanager
def quiet_bomb_warning():
    """Pillow's DecompressionBombWarning silenced (an image between MAX_IMAGE_PIXELS and twice it: a large
    photograph of the user's own folder, decoded all the same; discovery names the larger ones it leaves out).
    Decoding runs in the main thread of each process, so the filter touches no other thread's warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decodes one image file as a viewer shows it, resizes the short side to ``size`` (bicubic, antialiased)
    and center-crops: uint8 (C, size, size), writable. Raises what Pillow raises for an unreadable file."""
    with quiet_bomb_warning(), Image.open(path) as img:
        img = to_channels(decode_to_viewer(img), channels)
        img = resize_and_crop(img, size)
        array = np.asarray(img, dtype=np.uint8)
    # A writable, contiguous copy: PIL's buffer is read-only, which torch.from_numpy warns about.
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)).copy()  # C order


def decode_or_skip(path: Path, size: int, channels: int) -> tuple[np.ndarray | None, str]:
    """``(decode_image(path, size, channels), "")``, or ``(None, why)`` for a file Pillow cannot decode (a
    truncated body, a corrupt stream). The one place that catches Pillow's many exception types for a broken
    image: each caller skips such a file, or under --strict refuses it naming ``why``."""
    try:
        return decode_image(path, size, channels), ""
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None, str(exc) or type(exc).__name__


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """The short side to ``size`` (bicubic), then the centre ``size`` x ``size`` (odd margins round down)."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _round_u8(values: np.ndarray) -> np.ndarray:
    return np.rint(values).clip(0, 255).astype(np.uint8)


def _over_background(img: Image.Image) -> Image.Image:
    """An ``LA``/``RGBA`` image composited over :data:`ALPHA_BACKGROUND`, without its alpha channel."""
    pixels = np.asarray(img, dtype=np.float64)
    colour, alpha = pixels[..., :-1], pixels[..., -1:] / 255.0
    out = _round_u8(colour * alpha + ALPHA_BACKGROUND * (1.0 - alpha))
    return Image.fromarray(out[..., 0], "L") if img.mode == "LA" else Image.fromarray(out, "RGB")
