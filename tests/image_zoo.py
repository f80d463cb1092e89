"""A zoo of image files of every mode and oddity users' folders hold, generated in the test (no binary fixtures).

Each :class:`ZooImage` carries the pixels it was made from and the 8-bit RGB picture an image viewer shows for
it, worked out here with numpy from those source pixels (not by Pillow's conversions, which are what is under
test): 16-bit samples scaled by 255/65535, floats in [0, 1] scaled by 255, CMYK by (255 - C)(255 - K)/255,
transparency composited over white, the EXIF orientation applied, the first frame of an animation.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64  # the zoo's files are at the dcgan64 model size, so every loader compares pixels without a resize


@dataclass
class ZooImage:
    name: str
    what: str  # the mode or oddity, for the test id and the note
    expected_rgb: np.ndarray  # (SIZE, SIZE, 3) uint8 after the viewer's conversion (before any model resize)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _smooth(rng: np.random.Generator, channels: int, size: int = SIZE) -> np.ndarray:
    """Smooth random content in [0, 1] (so JPEG round trips stay close to the source): (size, size, channels)."""
    low = rng.random((4, 4, channels))
    ys = np.linspace(0, 3, size)
    y0 = np.floor(ys).astype(int).clip(0, 2)
    t = (ys - y0)[:, None, None]
    rows = low[y0] * (1 - t) + low[y0 + 1] * t  # (size, 4, C)
    t2 = (ys - y0)[None, :, None]
    return rows[:, y0] * (1 - t2) + rows[:, y0 + 1] * t2


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _gray_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return _u8(rgb.astype(np.float64) * a + 255.0 * (1 - a))


def write_png(path: Path, pixels: np.ndarray, color_type: int, bit_depth: int) -> None:
    """A minimal PNG encoder (filter 0 on every row), for the 16-bit forms Pillow cannot write (48-bit RGB, LA 16)."""
    height, width = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[y].astype(dtype).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _jpeg_decoded(path: Path) -> np.ndarray:
    """What a JPEG decodes to: lossy files are compared with their decoded pixels (libjpeg's), not the source."""
    with Image.open(path) as img:
        img.load()
        return np.asarray(img.convert("RGB") if img.mode in ("L", "RGB") else img)


def make_zoo(folder: Path) -> list[ZooImage]:
    """Writes one file per image mode and oddity into ``folder``; returns them with their expected pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    zoo: list[ZooImage] = []

    def add(name: str, what: str, expected: np.ndarray) -> None:
        assert expected.shape == (SIZE, SIZE, 3) and expected.dtype == np.uint8, name
        zoo.append(ZooImage(name, what, expected))

    # 16-bit grayscale: the ramp, 0..65535 left to right.
    ramp16 = np.linspace(0, 65535, SIZE)[None].repeat(SIZE, 0).astype(np.uint16)
    Image.fromarray(ramp16).save(folder / "gray16_ramp.png")
    add("gray16_ramp.png", "I;16 PNG (16-bit grayscale)", _gray_rgb(_u8(ramp16 / 257.0)))

    # 16-bit big-endian samples in a TIFF (Pillow's I;16B).
    noise16 = (_smooth(_rng(1), 1)[..., 0] * 65535).astype(np.uint16)
    Image.frombytes("I;16B", (SIZE, SIZE), noise16.astype(">u2").tobytes()).save(folder / "gray16_big_endian.tif")
    add("gray16_big_endian.tif", "I;16B TIFF (16-bit big-endian)", _gray_rgb(_u8(noise16 / 257.0)))

    # 16-bit little-endian samples in a TIFF (Pillow's I;16).
    Image.fromarray(noise16[::-1].copy()).save(folder / "gray16_little_endian.tif")
    add("gray16_little_endian.tif", "I;16 TIFF (16-bit little-endian)", _gray_rgb(_u8(noise16[::-1] / 257.0)))

    # 32-bit integer TIFF holding 16-bit values (how older Pillow opened 16-bit PNGs): the 16-bit scale.
    Image.fromarray(noise16.astype(np.int32), "I").save(folder / "int32.tif")
    add("int32.tif", "I TIFF (32-bit integer)", _gray_rgb(_u8(noise16 / 257.0)))

    # 32-bit float TIFF in [0, 1].
    floats = _smooth(_rng(2), 1)[..., 0].astype(np.float32)
    Image.fromarray(floats, "F").save(folder / "float32.tif")
    add("float32.tif", "F TIFF (32-bit float in [0, 1])", _gray_rgb(_u8(floats.astype(np.float64) * 255)))

    # 48-bit RGB PNG (16 bits per channel). Pillow reads 16-bit colour PNGs (RGB, RGBA, gray + alpha) by the high
    # byte of each sample, v >> 8, within 1 of v * 255 / 65535; gantrain documents that rule, and DALI's exact
    # scaling is within one level of it.
    rgb16 = (_smooth(_rng(3), 3) * 65535).astype(np.uint16)
    write_png(folder / "rgb48.png", rgb16, color_type=2, bit_depth=16)
    add("rgb48.png", "48-bit RGB PNG", (rgb16 >> 8).astype(np.uint8))

    # 16-bit gray + alpha PNG (the high-byte rule, as for 48-bit RGB).
    la16 = np.stack([(_smooth(_rng(4), 1)[..., 0] * 65535), np.linspace(0, 65535, SIZE)[:, None].repeat(SIZE, 1)],
                    axis=-1).astype(np.uint16)
    write_png(folder / "gray_alpha16.png", la16, color_type=4, bit_depth=16)
    high = (la16 >> 8).astype(np.uint8)
    add("gray_alpha16.png", "16-bit gray + alpha PNG", _over_white(_gray_rgb(high[..., 0]), high[..., 1]))

    # Bilevel (mode 1): a checkerboard of 8-pixel squares.
    check = ((np.indices((SIZE, SIZE)) // 8).sum(0) % 2).astype(bool)
    Image.fromarray(check).save(folder / "bilevel.png")
    add("bilevel.png", "1 PNG (bilevel)", _gray_rgb(np.where(check, 255, 0).astype(np.uint8)))

    # 8-bit grayscale PNG.
    gray = _u8(_smooth(_rng(5), 1)[..., 0] * 255)
    Image.fromarray(gray, "L").save(folder / "gray.png")
    add("gray.png", "L PNG (8-bit grayscale)", _gray_rgb(gray))

    # Gray + alpha, alpha rising top to bottom.
    alpha = np.linspace(0, 255, SIZE)[:, None].repeat(SIZE, 1).astype(np.uint8)
    Image.fromarray(np.stack([gray, alpha], -1), "LA").save(folder / "gray_alpha.png")
    add("gray_alpha.png", "LA PNG (gray + alpha)", _over_white(_gray_rgb(gray), alpha))

    # RGB PNG, and RGBA with random alpha (fully transparent pixels hold colour that must not show).
    rgb = _u8(_smooth(_rng(6), 3) * 255)
    Image.fromarray(rgb, "RGB").save(folder / "rgb.png")
    add("rgb.png", "RGB PNG", rgb)
    rgba_alpha = _u8(_smooth(_rng(7), 1)[..., 0] * 255)
    rgba_alpha[:16, :16] = 0
    Image.fromarray(np.dstack([rgb, rgba_alpha]), "RGBA").save(folder / "rgba.png")
    add("rgba.png", "RGBA PNG", _over_white(rgb, rgba_alpha))

    # Palette images: plain, with one transparent index (tRNS), and 4-bit with per-entry alpha.
    palette = _u8(_rng(8).random((16, 3)) * 255)
    index = (np.indices((SIZE, SIZE)).sum(0) // 8 % 16).astype(np.uint8)
    pal_img = Image.fromarray(index, "P")
    pal_img.putpalette(palette.reshape(-1).tolist())
    pal_img.save(folder / "palette.png")
    add("palette.png", "P PNG (palette)", palette[index])
    pal_img.save(folder / "palette_transparent.png", transparency=3)
    add("palette_transparent.png", "P PNG with a transparent colour (tRNS)",
        np.where((index == 3)[..., None], 255, palette[index]).astype(np.uint8))
    entry_alpha = _u8(np.linspace(0, 255, 16))
    pal_img.save(folder / "palette_alpha4.png", transparency=bytes(entry_alpha.tolist()), bits=4)
    add("palette_alpha4.png", "P PNG, 4-bit, alpha per palette entry", _over_white(palette[index], entry_alpha[index]))

    # CMYK: a TIFF and an (Adobe) JPEG.
    cmyk = _u8(_smooth(_rng(9), 4) * 255)
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.tif")
    cmyk_f = cmyk.astype(np.float64)
    add("cmyk.tif", "CMYK TIFF", _u8((255 - cmyk_f[..., :3]) * (255 - cmyk_f[..., 3:]) / 255))
    Image.fromarray(cmyk, "CMYK").save(folder / "cmyk.jpg", quality=95)
    decoded = _jpeg_decoded(folder / "cmyk.jpg").astype(np.float64)  # CMYK as libjpeg decodes it
    add("cmyk.jpg", "CMYK JPEG (Adobe)", _u8((255 - decoded[..., :3]) * (255 - decoded[..., 3:]) / 255))

    # JPEGs: baseline YCbCr 4:2:0, 4:4:4, progressive, grayscale; compared with libjpeg's own decode.
    for name, what, kwargs in (("ycbcr420.jpg", "YCbCr JPEG 4:2:0", {}),
                               ("ycbcr444.jpg", "YCbCr JPEG 4:4:4", {"subsampling": 0}),
                               ("progressive.jpg", "progressive JPEG", {"progressive": True})):
        Image.fromarray(rgb, "RGB").save(folder / name, quality=92, **kwargs)
        add(name, what, _jpeg_decoded(folder / name))
    Image.fromarray(gray, "L").save(folder / "gray.jpg", quality=92)
    add("gray.jpg", "L JPEG (grayscale)", _jpeg_decoded(folder / "gray.jpg"))

    # A phone photo: stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view).
    stored = _u8(_smooth(_rng(10), 3) * 255)
    stored[:8, :24] = (255, 0, 0)  # a marker in the stored top-left corner: the viewed top-right
    Image.fromarray(stored, "RGB").save(folder / "phone_rotated.jpg", quality=95, exif=_exif(6))
    add("phone_rotated.jpg", "JPEG with EXIF orientation 6", np.rot90(_jpeg_decoded(folder / "phone_rotated.jpg"), k=-1).copy())

    # A mirrored photo (EXIF orientation 2: flip left-right to view) in a PNG, whose orientation DALI is not trusted
    # with.
    Image.fromarray(stored, "RGB").save(folder / "mirrored_exif.png", exif=_exif(2))
    add("mirrored_exif.png", "PNG with EXIF orientation 2 (mirrored)", stored[:, ::-1].copy())

    # An RGB PNG with one transparent colour (tRNS on a truecolour image).
    key = tuple(int(v) for v in rgb[0, 0])
    Image.fromarray(rgb, "RGB").save(folder / "rgb_transparent_colour.png", transparency=key)
    add("rgb_transparent_colour.png", "RGB PNG with a transparent colour (tRNS)",
        np.where(np.all(rgb == key, axis=-1)[..., None], 255, rgb).astype(np.uint8))

    # Rarer formats and modes Pillow reads: grayscale and palette BMP, binary PPM/PGM, TGA.
    Image.fromarray(gray, "L").save(folder / "gray.bmp")
    add("gray.bmp", "L BMP", _gray_rgb(gray))
    pal_img.save(folder / "palette.bmp")
    add("palette.bmp", "P BMP (palette)", palette[index])
    Image.fromarray(rgb, "RGB").save(folder / "image.ppm")
    add("image.ppm", "PPM", rgb)
    Image.fromarray(gray, "L").save(folder / "gray.pgm")
    add("gray.pgm", "PGM", _gray_rgb(gray))
    Image.fromarray(rgb, "RGB").save(folder / "image.tga")
    add("image.tga", "TGA", rgb)

    # Other formats: lossless WebP (RGB and RGBA), BMP, RGB TIFF, an animated GIF (first frame).
    Image.fromarray(rgb, "RGB").save(folder / "lossless.webp", lossless=True)
    add("lossless.webp", "WebP (lossless)", rgb)
    Image.fromarray(np.dstack([rgb, rgba_alpha]), "RGBA").save(folder / "alpha.webp", lossless=True, exact=True)
    add("alpha.webp", "WebP with alpha", _over_white(rgb, rgba_alpha))
    Image.fromarray(rgb, "RGB").save(folder / "image.bmp")
    add("image.bmp", "BMP", rgb)
    Image.fromarray(rgb, "RGB").save(folder / "image.tiff")
    add("image.tiff", "RGB TIFF", rgb)
    frames = [pal_img.copy(), Image.fromarray(255 - index * 8, "L").convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    add("animated.gif", "animated GIF (first frame)", palette[index])

    # An upper-case extension, and a PNG named .jpg (the content decides, as in a viewer).
    Image.fromarray(rgb, "RGB").save(folder / "UPPER.PNG")
    add("UPPER.PNG", "upper-case extension", rgb)
    Image.fromarray(gray, "L").save(folder / "png_named.jpg", format="PNG")
    add("png_named.jpg", "PNG content with a .jpg name", _gray_rgb(gray))
    return zoo


def make_oddities(folder: Path) -> dict[str, list[str]]:
    """Files that are not training images, by the reason discovery must give; returns {reason: [names]}."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("not an image")
    (folder / "labels.csv").write_text("file,label\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._rgb.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork beside a real file
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "drawing.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (folder / "empty.png").write_bytes(b"")
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG body")
    return {"not an image": ["notes.txt", "labels.csv"],
            "hidden/system file": [".DS_Store", "._rgb.png", "Thumbs.db"],
            "unsupported format": ["IMG_0001.HEIC", "drawing.svg"],
            "unreadable": ["empty.png", "garbage.jpg"]}


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()
