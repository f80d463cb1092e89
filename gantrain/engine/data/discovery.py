"""Which files of a user's image folder are training images, and why every other file was left out.

One discovery feeds every loader (memory, torch, DALI), the metrics extractor and the loader benchmark, so they
all train on, and count, the same files. The walk follows directory links (a link back into a folder already
walked is a loop and is not followed again), takes every extension Pillow decodes, reads each candidate's
header (format, mode, transparency, EXIF orientation, animation; no pixels), and sorts what it found into:

* images, in a stable order (sorted relative paths);
* left out, by reason: ``not an image`` (an extension that is no image format), ``hidden/system file``
  (dot files such as ``.DS_Store`` and macOS ``._*`` resource forks, ``Thumbs.db``, ``desktop.ini``, hidden and
  system folders), ``unsupported format`` (an image format Pillow cannot decode: HEIC, SVG, camera RAW, ...),
  ``unreadable`` (no header Pillow can parse: empty, damaged, a dangling link, no permission), ``linked twice``
  (a file reached again through a link: used once), ``over Pillow's pixel limit`` (more than twice
  ``PIL.Image.MAX_IMAGE_PIXELS``, ~179 megapixels: Pillow refuses to decode it), ``gantrain run folder`` (a
  folder holding a run's config.toml beside its checkpoints/ or metrics.jsonl, however it is reached: its grids
  are a generator's, not training data).

:meth:`Discovery.summary` is the one log line that ends discovery. With ``strict`` any left-out file that looks
like an image (unsupported or unreadable) is an error that names it.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, features

from gantrain.engine.data.decode import decode_or_skip, has_alpha, holds_colour, orientation, quiet_bomb_warning
from gantrain.engine.errors import ConfigError, DataError, DataNotFound
from gantrain.engine.state.rundir import RunDir

NOT_AN_IMAGE, HIDDEN, UNSUPPORTED, UNREADABLE, TOO_LARGE, LINKED_TWICE, RUN_FOLDER = (
    "not an image", "hidden/system file", "unsupported format", "unreadable", "over Pillow's pixel limit",
    "linked twice", "gantrain run folder")
REASONS = (UNREADABLE, UNSUPPORTED, TOO_LARGE, NOT_AN_IMAGE, HIDDEN, LINKED_TWICE, RUN_FOLDER)  # the summary's order
SYSTEM_NAMES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r", "$recycle.bin", "system volume information",
                "__macosx", "@eadir", "lost+found"}
# Formats Pillow registers but cannot decode here on its own (stubs that need a handler, vector, save-only).
PILLOW_NON_DECODERS = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF", "EPS", "PDF", "IPTC", "PALM"}
# Image extensions Pillow has no decoder for: refused by name rather than called "not an image".
OTHER_IMAGE_SUFFIXES = {".heic", ".heif", ".hif", ".svg", ".svgz", ".jxl", ".exr", ".hdr", ".raw", ".dng", ".cr2",
                        ".cr3", ".nef", ".nrw", ".arw", ".orf", ".rw2", ".raf", ".srw", ".pef", ".xcf", ".kra", ".psb",
                        ".ai", ".eps", ".ps", ".pdf", ".wmf", ".emf", ".avif", ".jp2", ".j2k", ".jpx", ".webp"}
EXAMPLES = 3  # example paths per reason in the summary line
COLOUR_SAMPLE, COLOUR_PX = 32, 32  # images decoded (at this size) to tell colour from gray stored as RGB
GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # Pillow's modes without colour


def decodable_suffixes() -> dict[str, str]:
    """Lower-case file extensions Pillow can decode here, mapped to their format name."""
    Image.init()
    optional = {"AVIF": "avif", "WEBP": "webp", "JPEG2000": "jpg_2000"}  # codecs a Pillow build may lack
    return {suffix: fmt for suffix, fmt in Image.registered_extensions().items()
            if fmt in Image.OPEN and fmt not in PILLOW_NON_DECODERS
            and (fmt not in optional or features.check(optional[fmt]))}


@dataclass(frozen=True)
class ImageFile:
    """One training image as its header describes it (no pixels decoded)."""

    path: Path
    format: str  # Pillow's format name from the content: "JPEG", "PNG", ...
    mode: str  # Pillow's mode: "RGB", "L", "I;16", "RGBA", "P", ...
    alpha: bool  # an alpha channel or transparent colour(s)
    orientation: int  # EXIF orientation, 1 = as stored
    animated: bool
    size: tuple[int, int] = (0, 0)  # width, height as stored (0, 0: not read)

    def conversions(self) -> list[str]:
        """What decoding does to this file beyond reading its 8-bit colours, as short labels for the log."""
        done = []
        if self.alpha:
            done.append("with transparency (composited over white)")
        if self.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            done.append("with 16/32-bit integer samples (scaled to 8 bits)")
        if self.mode == "F":
            done.append("with float samples (taken as [0, 1])")
        if self.mode == "CMYK":
            done.append("CMYK (converted to RGB)")
        if self.orientation != 1:
            done.append("with an EXIF orientation (applied)")
        if self.animated:
            done.append("animated (first frame used)")
        return done


@dataclass
class Discovery:
    """The images of a folder (sorted), and every file left out, by reason."""

    root: Path
    images: list[ImageFile]
    left_out: dict[str, list[Path]] = field(default_factory=dict)
    loops: int = 0  # directory links not followed because they lead back into the walk
    limit: int = 0
    found: int = 0  # images found before --limit

    @property
    def paths(self) -> list[Path]:
        return [image.path for image in self.images]

    def leave_out(self, path: Path, reason: str) -> None:
        self.left_out.setdefault(reason, []).append(path)

    def drop_unreadable(self, bad: set[Path]) -> None:
        """Moves images that failed to decode (past a valid header: a truncated body) to ``unreadable``."""
        if bad:
            self.images = [image for image in self.images if image.path not in bad]
            self.found -= len(bad)
            for path in sorted(bad):
                self.leave_out(path, UNREADABLE)

    def summary(self) -> str:
        """One line: images found (by format), files left out by reason with examples, links, --limit."""
        formats = Counter(image.format for image in self.images)
        by_format = ", ".join(f"{fmt} {n}" for fmt, n in formats.most_common())
        line = f"folder {self.root}: {len(self.images)} images" + (f" ({by_format})" if by_format else "")
        if self.limit and self.found > len(self.images):
            line += f", the first of {self.found} found (--limit {self.limit})"
        left = sum(len(paths) for paths in self.left_out.values())
        line += f"; left out {left} file(s): {self.left_out_text()}" if left else "; no file left out"
        if self.loops:
            line += f"; {self.loops} directory link(s) into folders already walked not followed (loops)"
        return line

    def left_out_text(self) -> str:
        """The left-out files by reason, with a few example paths: 'not an image 2 (a.txt, b.csv); ...'."""
        parts = []
        for reason in REASONS:
            paths = sorted(self.left_out.get(reason, []), key=self._rel)
            if paths:
                shown = ", ".join(self._rel(p) for p in paths[:EXAMPLES]) + (", ..." if len(paths) > EXAMPLES else "")
                parts.append(f"{reason} {len(paths)} ({shown})")
        return "; ".join(parts)

    def conversion_summary(self) -> str | None:
        """One line counting the images decoding converts (transparency, 16-bit, CMYK, ...), or None."""
        counts = Counter(c for image in self.images for c in image.conversions())
        if not counts:
            return None
        return "decoded as a viewer shows them: " + ", ".join(f"{n} {what}" for what, n in counts.items())

    def channel_summary(self, channels: int) -> str | None:
        """With ``channels`` 1, one line counting the images stored in colour (by their mode: RGB, CMYK, a
        palette, ...) that decoding reads as grayscale (their luma), when up to :data:`COLOUR_SAMPLE` of them
        (evenly spaced) show that some hold colour (grayscale saved as RGB says nothing); else None."""
        if channels != 1:
            return None
        stored = [image for image in self.images if image.mode not in GRAY_MODES]
        sample = stored[::max(len(stored) // COLOUR_SAMPLE, 1)][:COLOUR_SAMPLE]
        decoded = [decode_or_skip(image.path, COLOUR_PX, 3)[0] for image in sample]
        coloured = sum(1 for array in decoded if array is not None and holds_colour(array))
        if not coloured:
            return None
        modes = ", ".join(f"{mode} {n}" for mode, n in Counter(image.mode for image in stored).most_common())
        return (f"--channels 1: {len(stored)} image(s) stored in colour ({modes}; {coloured} of the {len(sample)} "
                "looked at hold colour) are read as grayscale (their luma); --channels 3 keeps the colour")

    def geometry_summary(self, size: int) -> str | None:
        """One line counting the images that reach ``size`` x ``size`` px (short side to ``size``, centre square)
        by more than a small change: upscaled (a short side below ``size``) or cropped to under half their area (an
        aspect ratio above 2:1), with a few examples each; None when there are none."""
        upscaled = [i.path for i in self.images if 0 < min(i.size) < size]
        cropped = [i.path for i in self.images if min(i.size) > 0 and max(i.size) > 2 * min(i.size)]
        parts = []
        for paths, what in ((upscaled, f"upscaled (short side below {size} px)"),
                            (cropped, "cropped to their centre square, which keeps under half of them (longer than "
                                      "2:1)")):
            if paths:
                shown = ", ".join(self._rel(p) for p in paths[:EXAMPLES]) + (", ..." if len(paths) > EXAMPLES else "")
                parts.append(f"{len(paths)} {what} ({shown})")
        return f"resized to {size}x{size} px: " + "; ".join(parts) if parts else None

    def _rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def discover_images(folder: Path, *, strict: bool = False, limit: int = 0,
                    progress: Callable[[int, int], None] | None = None) -> Discovery:
    """The training images below ``folder``; see the module docstring.

    Raises :class:`DataError` when the folder does not exist or holds no image, and under ``strict`` when an
    image-looking file is unsupported or unreadable (naming it). ``limit`` keeps the first N images.
    """
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise DataNotFound(f"image folder {folder} {what} (pass --data-root pointing at the folder of the images)")
    found = Discovery(folder, [], limit=limit)
    candidates = _walk(folder, found)
    suffixes = decodable_suffixes()
    for i, path in enumerate(candidates):
        suffix = path.suffix.lower()
        if suffix in suffixes:
            image = _probe(path, found)
            if image is not None:
                found.images.append(image)
        elif suffix in OTHER_IMAGE_SUFFIXES:
            found.leave_out(path, UNSUPPORTED)
        else:
            found.leave_out(path, NOT_AN_IMAGE)
        if progress:
            progress(i + 1, len(candidates))
    if strict:
        refused = [(path, reason) for reason in (UNREADABLE, UNSUPPORTED, TOO_LARGE)
                   for path in found.left_out.get(reason, [])]
        if refused:
            (first, reason), more = refused[0], len(refused) - 1
            raise DataError(f"{reason} image {first}" + (f" and {more} more" if more else "")
                            + " (drop --strict to leave such files out)")
    if not found.images:
        left = found.left_out_text()
        raise DataNotFound(f"no images found below {folder}" + (f"; left out: {left}" if left else " (an empty folder)"))
    found.found = len(found.images)
    if limit:
        found.images = found.images[:limit]
    return found


def _walk(folder: Path, found: Discovery) -> list[Path]:
    """Every non-hidden file below ``folder``, following directory links once, in sorted order."""
    files: list[Path] = []
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        here = Path(top)
        stat = here.stat()
        if (stat.st_dev, stat.st_ino) in seen_dirs:  # reached again through a link: a loop or a second path
            found.loops += 1
            dirs[:] = []
            continue
        seen_dirs.add((stat.st_dev, stat.st_ino))
        kept = []
        for name in sorted(dirs):
            if _hidden(name):
                found.leave_out(here / name, HIDDEN)
            elif _run_folder(here / name):
                found.leave_out(here / name, RUN_FOLDER)
            else:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(names):
            path = here / name
            if _hidden(name):
                found.leave_out(path, HIDDEN)
                continue
            try:
                stat = path.stat()
            except OSError:  # a dangling link, or no permission to look
                found.leave_out(path, UNREADABLE)
                continue
            if (stat.st_dev, stat.st_ino) in seen_files:
                found.leave_out(path, LINKED_TWICE)
                continue
            seen_files.add((stat.st_dev, stat.st_ino))
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def refuse_writing_inside(data_root: str, folder: str | Path, flag: str) -> None:
    """Refuses ``folder`` (where a command will write, named by ``flag``) when it is the image folder
    ``data_root`` or inside it: the folder is read with its subfolders, so what is written there (grids, plots,
    logs) would become the next run's training data. Links are resolved on both sides; an empty ``data_root``
    passes. Raises :class:`~gantrain.engine.errors.ConfigError` before anything is written."""
    if not data_root:
        return
    out, images = Path(os.path.realpath(folder)), Path(os.path.realpath(data_root))
    if out == images or images in out.parents:
        raise ConfigError(f"{flag} {folder} is inside the image folder --data-root {data_root}, which is read with "
                          "its subfolders: what is written there would become training data; choose a folder "
                          "outside it")


def _run_folder(folder: Path) -> bool:
    """Whether ``folder`` is a gantrain run folder (its config.toml beside checkpoints/ or metrics.jsonl)."""
    files = RunDir(folder)
    return files.config.is_file() and (files.checkpoints.is_dir() or files.metrics.is_file())


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def _probe(path: Path, found: Discovery) -> ImageFile | None:
    """The header of one candidate, or None after recording why it is left out."""
    try:
        with quiet_bomb_warning(), Image.open(path) as img:
            if img.format in PILLOW_NON_DECODERS:
                found.leave_out(path, UNSUPPORTED)
                return None
            return ImageFile(path, img.format or "?", img.mode, has_alpha(img), orientation(img),
                             bool(getattr(img, "is_animated", False)), tuple(img.size))
    except Image.DecompressionBombError:  # over twice Image.MAX_IMAGE_PIXELS: Pillow will not decode it
        found.leave_out(path, TOO_LARGE)
        return None
    except Exception:  # Pillow raises many types for files it cannot parse
        found.leave_out(path, UNREADABLE)
        return None
