"""Data layer: IDX files, image folders, the epoch order, the two loaders and the MD5-checked download."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gantrain.engine.data import download as dl
from gantrain.engine.data import Shard, build_loader, epoch_batches, load_idx_split, load_images, read_idx
from gantrain.engine.data.decode import decode_image
from gantrain.engine.data.discovery import discover_images
from gantrain.engine.data.sources import decode_folder
from gantrain.engine.errors import ConfigError, DataError

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# Per-class counts of the official MNIST splits (digits 0..9).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ----- IDX ---------------------------------------------------------------------------------------------
def test_fashion_train_idx(fashion_raw: Path) -> None:
    images = read_idx(fashion_raw / "train-images-idx3-ubyte.gz")
    labels = read_idx(fashion_raw / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and labels.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels, minlength=10).tolist() == [6000] * 10
    assert images.min() == 0 and images.max() == 255


def test_fashion_test_idx(fashion_raw: Path) -> None:
    images = read_idx(fashion_raw / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(fashion_raw / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28)
    assert labels.shape == (10000,)
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10


def test_mnist_idx_counts(mnist_raw: Path) -> None:
    train_images, train_labels = load_idx_split("mnist", mnist_raw.parent.parent, "train")
    test_images, test_labels = load_idx_split("mnist", mnist_raw.parent.parent, "test")
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert np.bincount(train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_uncompressed_idx_matches_gz(fashion_raw: Path, tmp_path: Path) -> None:
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    raw.write_bytes(gzip.decompress((fashion_raw / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    np.testing.assert_array_equal(read_idx(raw), read_idx(fashion_raw / "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.parametrize("content, match", [
    (struct.pack(">II", 1234, 3) + b"\x00\x01\x02", "magic"),
    (struct.pack(">IIII", 2051, 10, 28, 28) + bytes(100), "header says"),           # truncated image data
    (struct.pack(">II", 2049, 5) + bytes(3), "header says"),                        # truncated labels
    (struct.pack(">II", 2049, 5) + bytes(9), "header says"),                        # trailing garbage
    (b"\x00\x00\x08", "too short"),
    (struct.pack(">III", 2051, 10, 28), "too short"),                               # cut inside the header
], ids=["bad-magic", "truncated-images", "truncated-labels", "too-long", "tiny", "cut-header"])
def test_bad_idx_files_raise_data_error(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "broken-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as info:
        read_idx(path)
    assert str(path) in str(info.value)
    gz = tmp_path / "broken-idx.gz"
    gz.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=match):
        read_idx(gz)


def test_truncated_and_fake_gzip_raise_data_error(fashion_raw: Path, tmp_path: Path) -> None:
    data = (fashion_raw / "t10k-labels-idx1-ubyte.gz").read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot read IDX file"):
        read_idx(cut)
    fake = tmp_path / "fake.gz"
    fake.write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="fake.gz"):
        read_idx(fake)


def test_load_images_resizes_fashion_to_32(train_root: Path) -> None:
    images = load_images("fashion-mnist", str(train_root), 32, 1, limit=512)
    assert images.shape == (512, 1, 32, 32) and images.dtype == torch.uint8
    assert int(images.min()) == 0 and int(images.max()) == 255
    original = read_idx(train_root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz")[:512]
    # Resizing keeps each image's brightness: means agree within a couple of grey levels.
    diff = images.float().mean(dim=(1, 2, 3)) - torch.from_numpy(original.astype(np.float32)).mean(dim=(1, 2))
    assert diff.abs().max() < 3.0


def test_load_images_accepts_the_raw_folder_and_rejects_rgb(fashion_raw: Path) -> None:
    images = load_images("fashion-mnist", str(fashion_raw), 64, 1, limit=8)
    assert images.shape == (8, 1, 64, 64)
    with pytest.raises(DataError, match="--channels 1"):
        load_images("fashion-mnist", str(fashion_raw), 32, 3, limit=8)


def test_data_root_falls_back_to_gantrain_data(train_root: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from gantrain.engine.config import resolve

    monkeypatch.setenv("GANTRAIN_DATA", str(train_root))
    cfg = resolve(None, None, {})  # the variable is read here, into the config, and nowhere else
    images = load_images(cfg.data.dataset, cfg.data.data_root, 32, 1, limit=4)
    assert images.shape == (4, 1, 32, 32)
    monkeypatch.delenv("GANTRAIN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    from gantrain.engine.data import data_root
    assert data_root(None) == tmp_path / "cache" / "gantrain" / "datasets"
    assert data_root("~/x") == Path.home() / "x"


# ----- epoch order -------------------------------------------------------------------------------------
def test_epoch_batches_deterministic_per_seed_and_epoch() -> None:
    a = epoch_batches(1000, 32, epoch=3, seed=7)
    assert a.shape == (31, 32) and a.dtype == torch.int64
    assert torch.equal(a, epoch_batches(1000, 32, epoch=3, seed=7))
    assert not torch.equal(a, epoch_batches(1000, 32, epoch=4, seed=7))
    assert not torch.equal(a, epoch_batches(1000, 32, epoch=3, seed=8))
    assert a.unique().numel() == a.numel()
    assert int(a.min()) >= 0 and int(a.max()) < 1000


@pytest.mark.parametrize("world_size", [2, 3])
def test_epoch_shards_are_disjoint_and_cover_the_global_batches(world_size: int) -> None:
    n, batch, seed, epoch = 1000, 16, 5, 2
    shards = [epoch_batches(n, batch, epoch, seed, Shard(rank, world_size)) for rank in range(world_size)]
    steps = n // (batch * world_size)
    for shard in shards:
        assert shard.shape == (steps, batch)
    everything = torch.cat([s.flatten() for s in shards])
    assert everything.numel() == steps * batch * world_size
    assert everything.unique().numel() == everything.numel(), "shards overlap"
    # Together the ranks see, step by step, exactly the global batches of an unsharded run with the global batch.
    global_batches = epoch_batches(n, batch * world_size, epoch, seed)
    for step in range(steps):
        union = torch.cat([s[step] for s in shards]).sort().values
        assert torch.equal(union, global_batches[step].sort().values)


def test_epoch_batches_needs_one_global_batch() -> None:
    with pytest.raises(ConfigError, match=r"--batch-size: the dataset has 40 images, fewer than one global batch "
                                          r"of 48 \(16 per process x 3 processes\)"):
        epoch_batches(40, 16, 0, 0, Shard(0, 3))


# ----- loaders -----------------------------------------------------------------------------------------
def _loader(tiny_cfg, kind: str):
    cfg = tiny_cfg(loader=kind, num_workers=0, limit=256)
    return build_loader(cfg.data, seed=11, device=torch.device("cpu"))


def test_memory_and_torch_loaders_yield_identical_batches(tiny_cfg) -> None:
    memory, torch_loader = _loader(tiny_cfg, "memory"), _loader(tiny_cfg, "torch")
    assert type(memory).__name__ == "MemoryLoader" and type(torch_loader).__name__ == "TorchLoader"
    assert memory.steps_per_epoch == torch_loader.steps_per_epoch == 8
    for epoch in (0, 1):
        a, b = list(memory.epoch(epoch)), list(torch_loader.epoch(epoch))
        assert len(a) == len(b) == 8
        for x, y in zip(a, b):
            assert x.shape == (32, 1, 32, 32) and x.dtype == torch.uint8
            assert torch.equal(x, y)
    assert not torch.equal(list(memory.epoch(0))[0], list(memory.epoch(1))[0])


@pytest.mark.parametrize("kind", ["memory", "torch"])
def test_start_step_skips_like_slicing(tiny_cfg, kind: str) -> None:
    loader = _loader(tiny_cfg, kind)
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start_step=5))
    assert len(tail) == 3
    for x, y in zip(tail, full[5:]):
        assert torch.equal(x, y)
    assert list(loader.epoch(2, start_step=8)) == []


def test_torch_loader_leaves_the_global_rng_alone(tiny_cfg) -> None:
    loader = _loader(tiny_cfg, "torch")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for epoch in (0, 1):
        list(loader.epoch(epoch, start_step=6))
    assert torch.equal(torch.get_rng_state(), before)


# ----- image folders -----------------------------------------------------------------------------------
@pytest.fixture
def cat_folder(cats_dir: Path, tmp_path: Path) -> Path:
    """20 real cat JPEGs, one corrupt .jpg, a nested PNG, an upper-case .JPG and a non-image file."""
    folder = tmp_path / "cats"
    folder.mkdir()
    sources = sorted(cats_dir.glob("*.jpg"))[:22]
    for src in sources[:20]:
        shutil.copy(src, folder / src.name)
    (folder / "0000_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG body")
    nested = folder / "more" / "deeper"
    nested.mkdir(parents=True)
    Image.open(sources[20]).save(nested / "cat.png")
    shutil.copy(sources[21], folder / "more" / "UPPER.JPG")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_decode_folder_skips_and_counts_corrupt_files(cat_folder: Path) -> None:
    found = discover_images(cat_folder)
    assert found.left_out == {"unreadable": [cat_folder / "0000_corrupt.jpg"], "not an image": [cat_folder / "notes.txt"]}
    images = decode_folder(found, 32, 3, strict=False)
    assert images.shape == (22, 3, 32, 32) and images.dtype == np.uint8
    names = {p.name for p in found.paths}
    assert len(names) == 22 and {"cat.png", "UPPER.JPG"} <= names


def test_decode_folder_strict_names_the_bad_file(cat_folder: Path) -> None:
    with pytest.raises(DataError, match="unreadable image .*0000_corrupt.jpg"):
        discover_images(cat_folder, strict=True)
    truncated = cat_folder / "more" / "truncated.jpg"  # a valid header, a body cut short: found only by decoding
    truncated.write_bytes((cat_folder / "more" / "UPPER.JPG").read_bytes()[:1500])
    (cat_folder / "0000_corrupt.jpg").unlink()
    found = discover_images(cat_folder, strict=True)
    assert truncated in found.paths
    with pytest.raises(DataError, match="unreadable image .*truncated.jpg"):
        decode_folder(found, 32, 3, strict=True)
    images = decode_folder(found, 32, 3, strict=False)
    assert len(images) == 22 and found.left_out["unreadable"] == [truncated] and truncated not in found.paths


def test_load_images_from_folder_with_limit(cat_folder: Path) -> None:
    images = load_images("folder", str(cat_folder), 64, 3, limit=5)
    # --limit counts images: the corrupt file sorting first is not one of them.
    assert images.shape == (5, 3, 64, 64)
    gray = load_images("folder", str(cat_folder), 32, 1)
    assert gray.shape == (22, 1, 32, 32)


def test_decode_image_center_crops_non_square(tmp_path: Path) -> None:
    # 60x20: the short side scales to 32 (x1.6, so 96x32) and the middle 32 columns (original 20..40) stay.
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, 25:35] = 255  # a white band in the middle: 16 px wide after scaling, centred in the crop
    array[:, :20] = 128    # grey on the left: a left-aligned crop would show it
    Image.fromarray(array).save(tmp_path / "wide.png")
    out = decode_image(tmp_path / "wide.png", 32, 3)
    assert out.shape == (3, 32, 32) and out.flags.writeable
    assert out[:, :, 10:22].min() > 200
    assert out[:, :, 2:5].max() < 40 and out[:, :, -5:-2].max() < 40


def test_folder_torch_loader_replaces_unreadable_images(cat_folder: Path, tiny_cfg, monkeypatch) -> None:
    from gantrain.engine.data import loaders

    cfg = tiny_cfg(dataset="folder", data_root=str(cat_folder), channels=3, loader="torch", num_workers=0,
                   batch_size=4, limit=0)
    truncated = cat_folder / "0001_truncated.jpg"  # passes discovery (its header is fine), fails to decode
    truncated.write_bytes((cat_folder / "more" / "UPPER.JPG").read_bytes()[:1500])
    loader = build_loader(cfg.data, seed=0, device=torch.device("cpu"))
    assert loader.num_images == 23 and loader.steps_per_epoch == 5  # 22 good + the truncated one
    log_file = cat_folder.parent / "warnings.txt"  # the loader's worker processes (forked) write here too

    def warn(msg, *args):
        with log_file.open("a") as fh:
            fh.write(msg % args + "\n")

    monkeypatch.setattr(loaders.log, "warning", warn)
    batches = list(loader.epoch(0))
    assert len(batches) == 5 and all(b.shape == (4, 3, 32, 32) for b in batches)
    list(loader.epoch(1)) and list(loader.epoch(2))  # the file is met again in each epoch: said once
    workers = tiny_cfg(dataset="folder", data_root=str(cat_folder), channels=3, loader="torch", num_workers=2,
                       batch_size=4, limit=0, out=str(cat_folder.parent / "w"))
    with_workers = build_loader(workers.data, seed=0, device=torch.device("cpu"))
    for epoch in range(3):  # new worker processes each epoch
        assert len(list(with_workers.epoch(epoch))) == 5
    said = log_file.read_text().splitlines()
    assert len(said) == 2 and said[0] == said[1], said  # once by each loader, whatever its processes
    assert said[0].startswith(f"unreadable image {truncated} (") and said[0].endswith(
        "the next readable image takes its place (the memory loader leaves it out; --strict stops instead)"), said
    strict = tiny_cfg(dataset="folder", data_root=str(cat_folder), channels=3, loader="torch", num_workers=0,
                      batch_size=23, limit=0, strict=True)
    with pytest.raises(DataError, match="0000_corrupt.jpg"):
        build_loader(strict.data, seed=0, device=torch.device("cpu"))
    (cat_folder / "0000_corrupt.jpg").unlink()
    with pytest.raises(DataError, match="0001_truncated.jpg"):
        list(build_loader(strict.data, seed=0, device=torch.device("cpu")).epoch(0))


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_images("folder", str(tmp_path / "nope"), 32, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found below .*empty folder"):
        load_images("folder", str(tmp_path / "empty"), 32, 3)
    with pytest.raises(DataError, match="--data-root"):
        load_images("folder", None, 32, 3)
    (tmp_path / "notes.txt").write_text("x")  # it exists: the message says what it is instead
    with pytest.raises(DataError, match="notes.txt is a file, not a folder"):
        load_images("folder", str(tmp_path / "notes.txt"), 32, 3)


# ----- download ----------------------------------------------------------------------------------------
def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_from_a_file_mirror(mnist_raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem in IDX_STEMS:
        shutil.copy(mnist_raw / f"{stem}.gz", mirror / f"{stem}.gz")
    dead = (tmp_path / "dead-mirror").as_uri() + "/"
    monkeypatch.setitem(dl.IDX_DATASETS["mnist"], "mirrors", [dead, mirror.as_uri() + "/"])
    root = tmp_path / "cache"
    paths = dl.ensure_idx_files("mnist", root)
    target = root / "MNIST" / "raw"
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in IDX_STEMS)  # no temp files left
    for stem, md5 in dl.IDX_DATASETS["mnist"]["md5"].items():
        assert paths[stem] == target / f"{stem}.gz"
        assert _md5(paths[stem]) == md5
    images, labels = load_idx_split("mnist", root, "test")
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS


def test_download_with_wrong_file_names_the_folder(mnist_raw: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem in IDX_STEMS:  # MNIST files where FashionMNIST ones are expected: valid gz, wrong MD5
        shutil.copy(mnist_raw / f"{stem}.gz", mirror / f"{stem}.gz")
    monkeypatch.setitem(dl.IDX_DATASETS["fashion-mnist"], "mirrors", [mirror.as_uri() + "/"])
    root = tmp_path / "cache"
    with pytest.raises(DataError) as info:
        load_images("fashion-mnist", str(root), 32, 1)
    message = str(info.value)
    target = root / "FashionMNIST" / "raw"
    assert str(target) in message
    assert "MD5 mismatch" in message and "train-images-idx3-ubyte.gz" in message
    assert not root.exists()  # nothing half-downloaded left behind, not even the folders


def test_a_failed_download_creates_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --data-root that does not exist (a typo) and no mirror that answers: the error names the folder, and
    neither it nor any parent was created; a folder that exists keeps its contents as they were."""
    monkeypatch.setitem(dl.IDX_DATASETS["fashion-mnist"], "mirrors", [(tmp_path / "dead").as_uri() + "/"])
    typo = tmp_path / "no-such" / "datasets"
    with pytest.raises(DataError, match="could not be downloaded"):
        load_images("fashion-mnist", str(typo), 32, 1)
    assert not (tmp_path / "no-such").exists()
    cats = tmp_path / "cats"
    cats.mkdir()
    (cats / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match=str(cats / "FashionMNIST" / "raw")):
        load_images("fashion-mnist", str(cats), 32, 1)
    assert [p.name for p in cats.iterdir()] == ["a.png"]


def test_a_download_into_an_unwritable_folder_says_so(mnist_raw: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for stem in IDX_STEMS:
        shutil.copy(mnist_raw / f"{stem}.gz", mirror / f"{stem}.gz")
    monkeypatch.setitem(dl.IDX_DATASETS["mnist"], "mirrors", [mirror.as_uri() + "/"])
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DataError, match="was downloaded but cannot be written into .*point --data-root"):
        dl.ensure_idx_files("mnist", blocker)
    assert blocker.read_text() == "not a folder"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(DataError, match=f"cannot be written into {locked / 'MNIST' / 'raw'}"):
            dl.ensure_idx_files("mnist", locked)
        assert list(locked.iterdir()) == []


def test_no_usable_temporary_folder_is_said_naming_the_dataset(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl.tempfile, "tempdir", str(tmp_path / "gone"))  # $TMPDIR that does not exist
    with pytest.raises(DataError, match="mnist is not on this machine and could not be downloaded \\(no temporary "
                                        "folder to download into"):
        dl.ensure_idx_files("mnist", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_the_md5s_of_the_unpacked_files_are_those_of_the_official_files_gunzipped(fashion_raw: Path,
                                                                                  mnist_raw: Path) -> None:
    """The table's unpacked MD5s against the official .gz files (whose own MD5s are the published ones)."""
    for dataset, raw in (("fashion-mnist", fashion_raw), ("mnist", mnist_raw)):
        for stem, md5 in dl.IDX_DATASETS[dataset]["md5"].items():
            packed = (raw / f"{stem}.gz").read_bytes()
            assert hashlib.md5(packed).hexdigest() == md5
            assert hashlib.md5(gzip.decompress(packed)).hexdigest() == dl.IDX_DATASETS[dataset]["md5_unpacked"][stem]


@pytest.mark.parametrize("unpacked", [False, True], ids=["gz", "unpacked"])
def test_a_data_root_in_the_other_datasets_folder_is_refused_naming_it(fashion_raw: Path, mnist_raw: Path,
                                                                      tmp_path: Path, unpacked: bool) -> None:
    """FashionMNIST and MNIST name their files alike and raw_folder() takes `<root>/raw`: --preset mnist32 with
    --data-root .../FashionMNIST trained on garments without a word (and `eval --data-root .../MNIST` measured a
    FashionMNIST generator against digits). Each file is MD5-checked where it lies: the other dataset's is one
    DataError naming the file and the dataset it is, whichever way round, gzipped or not."""
    for dataset, other, raw in (("mnist", "fashion-mnist", fashion_raw), ("fashion-mnist", "mnist", mnist_raw)):
        folder = tmp_path / other / "raw"
        folder.mkdir(parents=True)
        for stem in IDX_STEMS:
            packed = (raw / f"{stem}.gz").read_bytes()
            if unpacked:
                (folder / stem).write_bytes(gzip.decompress(packed))
            else:
                (folder / f"{stem}.gz").write_bytes(packed)
        with pytest.raises(DataError) as info:
            dl.ensure_idx_files(dataset, folder.parent)
        assert f"is {other}'s train-images-idx3-ubyte, not {dataset}'s" in str(info.value)
        assert info.value.exit_code == 2  # a wrong data root, as a missing dataset is
        assert str(folder) in str(info.value) and f"{dl.IDX_DATASETS[dataset]['folder']}/raw/" in str(info.value)
        with pytest.raises(DataError, match=f"is {other}'s"):
            load_images(dataset, str(folder.parent), 32, 1)


def test_the_official_files_pass_and_a_subset_is_used_with_one_warning(fashion_raw: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert dl.ensure_idx_files("fashion-mnist", fashion_raw.parent.parent)["t10k-images-idx3-ubyte"] == \
        fashion_raw / "t10k-images-idx3-ubyte.gz"
    subset = tmp_path / "FashionMNIST" / "raw"
    subset.mkdir(parents=True)
    for stem in IDX_STEMS:  # the first 100 images and labels of the test split as a whole dataset
        images, labels = read_idx(fashion_raw / "t10k-images-idx3-ubyte.gz"), read_idx(fashion_raw / "t10k-labels-idx1-ubyte.gz")
        data = images[:100] if "images" in stem else labels[:100]
        header = struct.pack(">IIII", 2051, 100, 28, 28) if "images" in stem else struct.pack(">II", 2049, 100)
        (subset / stem).write_bytes(header + data.astype(np.uint8).tobytes())
    said: list[str] = []
    monkeypatch.setattr(dl.log, "warning", lambda fmt, *args: said.append(fmt % args))
    for _ in range(2):  # said once per file, not on every read
        paths = dl.ensure_idx_files("fashion-mnist", tmp_path)
    assert paths["train-images-idx3-ubyte"] == subset / "train-images-idx3-ubyte"
    assert said == [f"{subset}: 4 of the fashion-mnist files are not the official ones (another MD5: "
                    "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte); "
                    "used as they are"]
    assert read_idx(paths["train-images-idx3-ubyte"]).shape == (100, 28, 28)
    # under DDP each node's first process says it (each rank said it before)
    dl._unofficial_said.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    dl.ensure_idx_files("fashion-mnist", tmp_path)
    assert len(said) == 1
