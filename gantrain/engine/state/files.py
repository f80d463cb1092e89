"""Files of a run folder: atomic writes, the folder's lock, tolerant reading of JSON lines, I/O errors as one line.

Every file gantrain rewrites goes through :func:`atomic_write`, so a kill, a crash or a full disk leaves
either the old file or the complete new one. Every ``OSError`` met while writing becomes a
:class:`RunIOError` naming the path and the operating system's reason, which the CLI prints as one line.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gantrain.engine.errors import RunIOError, RunLocked
from gantrain.engine.state.rundir import RunDir

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock degrades to a warning
    fcntl = None  # type: ignore[assignment]

# ----- I/O errors ---------------------------------------------------------------------------------------
CACHE_ENV = "GANTRAIN_CACHE"


def cache_dir(explicit: str | Path | None = None) -> Path:
    """gantrain's cache folder (not created here): ``explicit`` (--metrics-cache), else ``$GANTRAIN_CACHE``, else
    ``$XDG_CACHE_HOME/gantrain/metrics``, else ``~/.cache/gantrain/metrics``. It holds the metrics' fitted
    extractors and real features, and the device's measured peaks (``device/``)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gantrain" / "metrics"


def os_reason(exc: OSError) -> str:
    """The operating system's words for ``exc`` with the errno name: 'No space left on device (ENOSPC)'."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = errno.errorcode.get(exc.errno or -1)
    return f"{reason} ({name})" if name else reason


def io_error(action: str, path: Path | str, exc: OSError) -> RunIOError:
    """``cannot <action> <path>: <reason>`` as a :class:`RunIOError`."""
    return RunIOError(f"cannot {action} {path}: {os_reason(exc)}")


def os_error_in(exc: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or one it was raised from or while handling. torch.save, for one,
    turns a failed write of its file object into a ``RuntimeError`` ('unexpected pos') chained to the OSError."""
    for _ in range(8):
        if exc is None:
            return None
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def make_folder(path: Path, flag: str = "") -> Path:
    """Creates the folder ``path`` (and its parents); a file in the way or a refusal is a :class:`RunIOError`."""
    prefix = f"{flag}: " if flag else ""
    if path.exists() and not path.is_dir():
        raise RunIOError(f"{prefix}{path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunIOError(f"{prefix}cannot create the folder {path}: {_mkdir_reason(path, exc)}") from None
    return path


def _mkdir_reason(path: Path, exc: OSError) -> str:
    """Why a folder cannot be made; a file where a folder should be is named (mkdir says only 'File exists')."""
    for folder in (path, *path.parents):
        if folder.exists():
            return os_reason(exc) if folder.is_dir() else f"{folder} is a file, not a folder"
    return os_reason(exc)


# ----- atomic writes ------------------------------------------------------------------------------------
def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """Writes a file by calling ``write(binary file)`` on a temporary file beside ``path``, then fsync and rename.

    ``path`` holds either its old content or the complete new one, whatever happens meanwhile (kill, crash,
    full disk); no temporary file is left behind. The file gets the mode a plain ``open`` would give it (0666 less
    the umask: 0644 under umask 022), or the mode of the file it replaces. Raises :class:`RunIOError` naming
    ``path`` when the writing fails for an operating-system reason (the cause may come wrapped, as torch.save
    wraps it).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunIOError(f"cannot write {path}: {_mkdir_reason(path.parent, exc)}") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise io_error("write", path, exc) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600: colleagues could not read a run's files
                with _suppress_os_error():  # a filesystem without modes (vfat, some CIFS/FUSE mounts)
                    os.fchmod(fh.fileno(), _mode_for(path))
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with _suppress_os_error():
            Path(tmp).unlink(missing_ok=True)
        cause = os_error_in(exc)
        if cause is not None and isinstance(exc, Exception):
            raise io_error("write", path, cause) from None
        raise
    _fsync_folder(path.parent)
    return path


def _mode_for(path: Path) -> int:
    """The permission bits a new ``path`` gets from ``open``: those of the file it replaces, else 0666 & ~umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read from /proc (Linux) without changing it; elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".tmp"
# What atomic_write's temporary files are called: "." + the file's name + "." + mkstemp's 8 characters + ".tmp".
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def remove_leftovers(folders: Iterable[Path]) -> list[Path]:
    """Removes the temporary files :func:`atomic_write` left in ``folders`` (not below them) when its process was
    killed mid-write (a rename never happened, so nothing refers to them); returns what it removed. Only names of
    that exact pattern are touched. The caller must own the folders (hold the run's lock): another live writer's
    temporary file has the same name."""
    removed = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if _TEMP_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                with _suppress_os_error():
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def atomic_write_text(path: Path | str, text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def _fsync_folder(folder: Path) -> None:
    """Makes the rename itself durable; some filesystems refuse fsync on folders, which costs only durability."""
    with _suppress_os_error():
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _suppress_os_error:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, OSError)


# ----- tolerant JSON lines -------------------------------------------------------------------------------
@dataclass
class JsonLines:
    """What :func:`read_json_lines` found: the good records and the skipped lines (1-based number, why)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def describe_skipped(self, path: Path | str, verb: str = "skipped") -> str:
        """One line: '<path>: skipped 2 damaged lines (line 3: not JSON; line 9: not UTF-8)'."""
        shown = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:3])
        more = f"; {len(self.skipped) - 3} more" if len(self.skipped) > 3 else ""
        s = "" if len(self.skipped) == 1 else "s"
        return f"{path}: {verb} {len(self.skipped)} damaged line{s} ({shown}{more})"


def read_json_lines(path: Path | str, key: str = "step") -> JsonLines:
    """Records of a JSON-lines file, one object per line with a non-negative integer ``key``.

    A torn last line, garbage, invalid UTF-8, a non-object or a missing/non-integer ``key`` is skipped and
    listed in ``skipped`` (the caller says so in one log line); a missing file reads as empty. Bare NaN and
    Infinity (written by gantrain before metrics.jsonl became strict JSON) are read as floats. Raises
    :class:`RunIOError` when the file exists but cannot be read.
    """
    path = Path(path)
    result = JsonLines()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return result
    except OSError as exc:
        raise io_error("read", path, exc) from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            result.skipped.append((number, "not UTF-8"))
            continue
        except ValueError:
            result.skipped.append((number, "not JSON (torn or garbage)"))
            continue
        if not isinstance(record, dict):
            result.skipped.append((number, "not a JSON object"))
        elif type(record.get(key)) is not int or record[key] < 0:
            result.skipped.append((number, f"no integer {key!r}"))
        else:
            result.records.append(record)
    return result


# ----- the run folder's owner ---------------------------------------------------------------------------
class RunLock:
    """One owner per run folder: an exclusive ``flock`` on ``<folder>/.gantrain.lock``, which holds the owner's
    pid, host and start time as JSON.

    The kernel drops the lock when the owner's process ends however it ends (SIGKILL included), so a lock file
    left behind is stale exactly when no process holds its lock; the next run takes it over and says so. On a
    filesystem without locks (or Windows) the folder is used unlocked, with a warning.
    """

    def __init__(self, folder: Path) -> None:
        self.folder, self.path = folder, RunDir(folder).lock
        self._fh: IO[bytes] | None = None
        self.created: list[Path] = []  # the folders :meth:`take` made: the run folder, then its new parents

    def take(self, warn: Callable[[str], None]) -> None:
        """Creates the folder (``--out``) when missing and takes its lock (see :meth:`acquire`)."""
        self.created = list(itertools.takewhile(lambda p: not p.exists(), (self.folder, *self.folder.parents)))
        make_folder(self.folder, "--out")
        self.acquire(warn)

    def remove_leftovers(self, note: Callable[[str], None]) -> None:
        """With the lock held: removes the temporary files of atomic writes that a killed run left in the run
        folder, its checkpoints/ and samples/ (:func:`remove_leftovers`), and says so in one ``note``."""
        if not self.held:
            return
        files = RunDir(self.folder)
        removed = remove_leftovers([files.root, files.checkpoints, files.samples])
        if removed:
            names = ", ".join(str(p.relative_to(self.folder)) for p in removed[:3])
            note(f"removed {len(removed)} temporary file(s) that an interrupted write left behind ({names}"
                 f"{', ...' if len(removed) > 3 else ''})")

    def abandon(self) -> None:
        """Releases the lock of a run that failed to start, and removes the folders :meth:`take` made (the run
        folder and the parents it needed) while they are still empty (the lock file goes with the lock): a run
        that took no step leaves nothing behind."""
        self.release()
        for folder in self.created:  # innermost first; a folder something else wrote into stays, with its parents
            try:
                folder.rmdir()
            except FileNotFoundError:  # never made (make_folder failed below it): its parents may have been
                continue
            except OSError:
                break

    @property
    def held(self) -> bool:
        return self._fh is not None

    def acquire(self, warn: Callable[[str], None]) -> None:
        """Takes the lock or raises :class:`RunLocked` (exit 2) naming the owner; ``warn`` gets one line for a
        stale lock taken over or a filesystem that cannot lock."""
        if fcntl is None:
            warn(f"{self.folder}: run-folder locking needs POSIX flock; two runs into this --out would not be noticed")
            return
        while True:
            try:
                fh = open(self.path, "a+b")  # created when missing, never truncated before it is ours
            except OSError as exc:
                raise io_error("create the lock file", self.path, exc) from None
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _describe_owner(_read_owner(fh))
                fh.close()
                raise RunLocked(f"--out: {self.folder} is in use by another gantrain run ({owner}); wait for it to "
                                "end or choose another --out") from None
            except OSError as exc:
                fh.close()
                warn(f"{self.folder}: cannot lock the run folder ({os_reason(exc)}); two runs into this --out "
                     "would not be noticed")
                return
            # The previous owner unlinks the file on release: a lock taken on its old inode is no lock.
            try:
                current = os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            fh.close()
        stale = _read_owner(fh)
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n")
            fh.flush()
        except OSError as exc:
            fh.close()
            raise io_error("write the lock file", self.path, exc) from None
        self._fh = fh
        if stale:
            warn(f"{self.folder}: took over a stale lock ({_describe_owner(stale)}): {_why_stale(stale)}")

    def release(self) -> None:
        """Removes the lock file and drops the lock (the order matters: see :meth:`acquire`)."""
        if self._fh is None:
            return
        with _suppress_os_error():
            self.path.unlink(missing_ok=True)
        self._fh.close()
        self._fh = None


def _read_owner(fh: IO[bytes]) -> dict[str, Any]:
    """The owner record in a lock file, or {} when it is empty or unreadable (a torn write by a killed run)."""
    try:
        fh.seek(0)
        owner = json.loads(fh.read(4096).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {"damaged": True}
    return owner if isinstance(owner, dict) else {"damaged": True}


def _why_stale(owner: dict[str, Any]) -> str:
    """Why a lock file nobody holds names an owner: its run was killed, unless that process still runs here (then
    the file came with a copy of a live run's folder, or the pid was reused)."""
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except OSError:  # it exists but is another user's
            alive = True
        if alive:
            return (f"pid {pid} still runs but holds no lock on this folder: the folder was copied from a live run "
                    "(or the pid was reused)")
    return "that run ended without releasing it (killed?)"


def _describe_owner(owner: dict[str, Any]) -> str:
    if not owner:
        return "owner unknown"
    if owner.get("damaged"):
        return "unreadable owner record"
    return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, since {owner.get('started', '?')}"
