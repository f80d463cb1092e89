"""Finding FashionMNIST/MNIST IDX files, and downloading them (MD5-checked) when they are absent.

The layout is torchvision's: ``<root>/FashionMNIST/raw/<name>.gz``; the files are the official ones. Files found
on disk are MD5-checked too (:func:`check_identity`): the two datasets name their files alike, so a data root that
points into the other one's folder would otherwise train or measure on the wrong images without a word.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from gantrain.engine.errors import DataNotFound

log = logging.getLogger("gantrain")

IDX_DATASETS: dict[str, dict] = {
    "fashion-mnist": {
        "folder": "FashionMNIST",
        "mirrors": [
            "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ],
        "md5": {
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        "md5_unpacked": {  # of the same files gunzipped (a folder may hold them so)
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
    },
    "mnist": {
        "folder": "MNIST",
        "mirrors": [
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ],
        "md5": {
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        "md5_unpacked": {
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
    },
}


def raw_folder(dataset: str, root: Path) -> Path:
    """``root`` may be the folder holding FashionMNIST/, FashionMNIST/ itself, or its raw/ folder."""
    name = IDX_DATASETS[dataset]["folder"]
    for candidate in (root / name / "raw", root / "raw", root):
        if any((candidate / f"{stem}.gz").exists() or (candidate / stem).exists() for stem in IDX_DATASETS[dataset]["md5"]):
            return candidate
    return root / name / "raw"


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_idx_files(dataset: str, root: Path) -> dict[str, Path]:
    """Paths of the four IDX files, downloading the missing ones into ``root``; each file found on disk checked
    by :func:`check_identity` (raises :class:`DataNotFound` for another dataset's file; files of neither are used,
    said in one warning)."""
    folder = raw_folder(dataset, root)
    paths: dict[str, Path] = {}
    unofficial: list[Path] = []
    for stem, md5 in IDX_DATASETS[dataset]["md5"].items():
        path = folder / stem if (folder / stem).exists() else folder / f"{stem}.gz"
        if path.exists():
            if not check_identity(dataset, stem, path):
                unofficial.append(path)
        else:
            download(dataset, path.name, md5, folder)
        paths[stem] = path
    said = (str(folder.resolve()), tuple(p.name for p in unofficial))
    # once a process (each of a run's readers calls this), and under DDP by each node's first process only
    if unofficial and said not in _unofficial_said and os.environ.get("LOCAL_RANK", "0") == "0":
        _unofficial_said.add(said)
        log.warning("%s: %d of the %s files are not the official ones (another MD5: %s); used as they are", folder,
                    len(unofficial), dataset, ", ".join(p.name for p in unofficial))
    return paths


_checked: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> MD5: each file hashed once a process
_unofficial_said: set[tuple[str, tuple[str, ...]]] = set()


def check_identity(dataset: str, stem: str, path: Path) -> bool:
    """Whether ``path`` is ``dataset``'s official file ``stem`` (its MD5, gzipped or not). Another dataset's file
    (FashionMNIST and MNIST name theirs alike) raises :class:`DataNotFound` (exit 2: the data root is wrong)
    naming it; a file of neither (a subset, a re-compression) is False: the caller uses it and says so."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    digest = _checked.get(key) or _checked.setdefault(key, md5sum(path))
    kind = "md5" if path.name.endswith(".gz") else "md5_unpacked"
    if digest == IDX_DATASETS[dataset][kind][stem]:
        return True
    for other, spec in IDX_DATASETS.items():
        if other != dataset and digest in (spec["md5"].get(stem), spec["md5_unpacked"].get(stem)):
            raise DataNotFound(f"{path} is {other}'s {stem}, not {dataset}'s (the two datasets name their files "
                               f"alike): point --data-root / $GANTRAIN_DATA at the folder holding "
                               f"{IDX_DATASETS[dataset]['folder']}/raw/")
    return False
    for other, spec in IDX_DATASETS.items():
        if other != dataset and digest in (spec["md5"].get(stem), spec["md5_unpacked"].get(stem)):
            raise DataNotFound(f"{path} is {other}'s {stem}, not {dataset}'s (the two datasets name their files "
                            f"alike): point --data-root / $GANTRAIN_DATA at the folder holding "
                            f"{IDX_DATASETS[dataset]['folder']}/raw/")
    if key[0] not in _unofficial_said:
        _unofficial_said.add(key[0])
        log.warning("%s: not the official %s file (MD5 %s); used as it is", path, dataset, digest)
    return path


def download(dataset: str, filename: str, md5: str, folder: Path) -> Path:
    """Fetches one file from the first mirror that answers into a temporary folder, verifies its MD5, then
    creates ``folder`` and moves the file into place atomically: a file that fails to download leaves nothing of
    itself, and no folder is created before a file arrived (no empty folders under a mistyped --data-root; the
    files of the dataset that did arrive stay). Raises :class:`DataNotFound`."""
    errors = []
    try:
        tmp = tempfile.TemporaryDirectory(prefix="gantrain-download-")
    except OSError as exc:  # no usable temporary folder ($TMPDIR missing, full or read-only)
        raise DataNotFound(_missing_message(dataset, folder, f"no temporary folder to download into: {exc}")) from None
    with tmp as scratch:
        for mirror in IDX_DATASETS[dataset]["mirrors"]:
            try:
                fetched = _fetch(mirror + filename, md5, Path(scratch) / filename)
                break
            except (OSError, ValueError) as exc:
                errors.append(f"{mirror}: {exc}")
        else:
            raise DataNotFound(_missing_message(dataset, folder, "; ".join(errors)))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return _move_into(fetched, folder / filename)
        except OSError as exc:
            raise DataNotFound(f"{dataset}: {filename} was downloaded but cannot be written into {folder} ({exc}); "
                               "point --data-root / $GANTRAIN_DATA at a writable folder") from None


def _move_into(source: Path, target: Path) -> Path:
    """``source`` moved to ``target`` so that ``target`` never holds a part of the file (a copy beside it, then
    a rename, when the two are on different file systems)."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".download-", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        shutil.move(source, partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def _missing_message(dataset: str, folder: Path, why: str) -> str:
    stems = ", ".join(f"{s}.gz" for s in IDX_DATASETS[dataset]["md5"])
    return (f"{dataset} is not on this machine and could not be downloaded ({why}). "
            f"Put the files {stems} in {folder}, or point --data-root / $GANTRAIN_DATA at a folder holding "
            f"{IDX_DATASETS[dataset]['folder']}/raw/")


def _fetch(url: str, md5: str, target: Path) -> Path:
    """``url`` downloaded to ``target`` (a progress bar), its MD5 checked; nothing left at ``target`` on failure."""
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".download-", delete=False) as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=30) as response, _progress() as bar:
                total = int(response.headers.get("Content-Length") or 0) or None
                task = bar.add_task(target.name, total=total)
                while block := response.read(1 << 16):
                    tmp.write(block)
                    bar.advance(task, len(block))
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
    got = md5sum(tmp_path)
    if got != md5:
        tmp_path.unlink(missing_ok=True)
        raise ValueError(f"MD5 mismatch for {url}: got {got}, expected {md5}")
    shutil.move(tmp_path, target)
    return target


def _progress() -> Progress:
    return Progress(TextColumn("downloading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    transient=True)
