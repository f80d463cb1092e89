"""--loader dali: the same batches as the other loaders, sharding, resume, formats, errors, and bench --loaders.

DALI runs here as a CPU pipeline (``device_id=None``); the GPU path (``mixed`` decoding) needs a GPU. Tests that
need DALI skip cleanly where the ``dali`` extra is not installed.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from gantrain.bench.loaders import loader_rows, row_config
from gantrain.engine.config import override, preset
from gantrain.engine.data import Shard, build_loader, epoch_plan
from gantrain.engine.data.dali import DALIArrayLoader, DALIFolderLoader, dali_installed, pipeline_device, rank_major
from gantrain.engine.data.loaders import choose_loader
from gantrain.engine.errors import ConfigError, DataError
from gantrain.engine.gan.precision import PrecisionPolicy

CPU = torch.device("cpu")
GREY_LEVEL = 1 / 127.5  # one uint8 step in [-1, 1]


@pytest.fixture(scope="module")
def dali():
    return pytest.importorskip("nvidia.dali", reason="the dali extra (nvidia-dali-cuda120) is not installed")


def folder_cfg(root: Path, size: int = 64, **overrides):
    flat = dict(data_root=str(root), image_size=size, batch_size=8, num_workers=1, limit=48, device="cpu")
    return override(preset("cats64"), {**flat, **overrides})


def loader_for(cfg, kind: str, shard: Shard = Shard(), policy=None):
    return build_loader(override(cfg, {"loader": kind}).data, seed=5, device=CPU, shard=shard, policy=policy)


def as_unit(batch: torch.Tensor) -> torch.Tensor:
    """A batch in [-1, 1] as fp32, whether it came as uint8 (memory/torch loaders) or floats (DALI)."""
    return batch.float() * (2 / 255) - 1 if batch.dtype == torch.uint8 else batch.float()


# ----- no DALI, choices, config -------------------------------------------------------------------------
def test_missing_dali_names_the_extra(monkeypatch: pytest.MonkeyPatch, tiny_cfg, cli, unwrap) -> None:
    for name in ("nvidia.dali", "nvidia.dali.fn", "nvidia.dali.types", "nvidia.dali.plugin.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    assert not dali_installed()
    with pytest.raises(ConfigError, match=r"--loader: dali needs NVIDIA DALI.*gantrain\[dali\]"):
        build_loader(tiny_cfg(loader="dali").data, seed=0, device=CPU)
    result = cli("run", "--data-root", tiny_cfg().data.data_root, "--loader", "dali", "--limit", "64", "--device", "cpu",
                 "--out", tiny_cfg().run.out)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: --loader: dali needs NVIDIA DALI" in unwrap(result.output)


def test_auto_picks_dali_for_folders_on_cuda_only(monkeypatch: pytest.MonkeyPatch, tiny_cfg) -> None:
    folder = tiny_cfg(dataset="folder", channels=3).data
    fashion = tiny_cfg().data
    monkeypatch.setattr("gantrain.engine.data.dali.dali_installed", lambda: True)
    assert choose_loader(folder, torch.device("cuda", 0)) == "dali"
    assert choose_loader(folder, CPU) == "auto"  # the memory loader: faster on the CPU (README loader table)
    assert choose_loader(fashion, torch.device("cuda", 0)) == "auto"  # IDX fits in memory: device-resident
    assert choose_loader(tiny_cfg(dataset="folder", channels=3, loader="torch").data, torch.device("cuda", 0)) == "torch"
    monkeypatch.setattr("gantrain.engine.data.dali.dali_installed", lambda: False)
    assert choose_loader(folder, torch.device("cuda", 0)) == "auto"


def test_gpu_pipeline_without_gpu_is_a_config_error(tiny_cfg) -> None:
    with pytest.raises(ConfigError, match="--dali-device: a GPU pipeline needs CUDA, but --device is cpu"):
        tiny_cfg(loader="dali", dali_device="gpu", device="cpu")
    with pytest.raises(ConfigError, match="--dali-device: a GPU pipeline needs a CUDA GPU to train on"):
        pipeline_device("gpu", CPU)  # --device auto on a machine without CUDA ends here
    assert pipeline_device("auto", CPU) == "cpu" and pipeline_device("auto", torch.device("cuda", 1)) == "gpu"
    with pytest.raises(ConfigError, match="--dali-device: must be one of auto, cpu, gpu"):
        tiny_cfg(dali_device="tpu")


def test_rank_major_lays_shards_out_as_dali_reads_them() -> None:
    order = torch.arange(24).view(3, 8)  # 3 steps of a global batch of 8 = 2 ranks x batch 4
    flat = rank_major(order, world_size=2, batch_size=4, start_step=1)
    assert flat.tolist() == [8, 10, 12, 14, 16, 18, 20, 22, 9, 11, 13, 15, 17, 19, 21, 23]


# ----- image folders ------------------------------------------------------------------------------------
def test_folder_batches_match_the_torch_loader(dali, cats_dir: Path) -> None:
    cfg = folder_cfg(cats_dir)
    ours, theirs = loader_for(cfg, "dali"), loader_for(cfg, "torch")
    assert isinstance(ours, DALIFolderLoader)
    assert ours.num_images == theirs.num_images == 48 and ours.steps_per_epoch == theirs.steps_per_epoch == 6
    batches = list(ours.labelled(0))
    assert torch.equal(torch.stack([b.indices for b in batches]), epoch_plan(48, 8, 0, 5).indices)
    for batch, reference in zip(batches, theirs.epoch(0), strict=True):
        x = batch.images
        assert x.shape == (8, 3, 64, 64) and x.dtype == torch.float32 and x.device == CPU
        assert -1 <= x.min() and x.max() <= 1
        # 64x64 JPEGs at 64 px: no resize, so only the JPEG decoders could differ (here they agree).
        assert (x - as_unit(reference)).abs().max() <= 2 * GREY_LEVEL


@pytest.mark.parametrize("size", [64, 128])
def test_resize_and_center_crop_match_the_torch_loader(dali, cats_dir: Path, tmp_path: Path, size: int) -> None:
    # Non-square images of four shapes, among them an odd crop margin (96x80 -> 77x64 at 64 px).
    for i, src in enumerate(sorted(cats_dir.glob("*.jpg"))[:16]):
        shape = [(96, 80), (80, 120), (150, 100), (64, 200)][i % 4]
        Image.open(src).convert("RGB").resize(shape, Image.BICUBIC).save(tmp_path / f"{i:02d}.png")
    cfg = folder_cfg(tmp_path, size, limit=0)
    ours = torch.cat(list(loader_for(cfg, "dali").epoch(0)))
    theirs = torch.cat([as_unit(b) for b in loader_for(cfg, "torch").epoch(0)])
    assert ours.shape == theirs.shape == (16, 3, size, size)
    diff = (ours - theirs).abs() / GREY_LEVEL  # in grey levels; DALI's and PIL's cubic kernels differ slightly
    assert diff.mean() < 1.0 and diff.flatten().quantile(0.99) < 8


def test_hflip_mirrors_the_same_images_in_every_loader(dali, cats_dir: Path) -> None:
    cfg = folder_cfg(cats_dir, hflip=True)
    plan = epoch_plan(48, 8, 1, 5, hflip=True)
    assert 0 < plan.flips.float().mean() < 1 and torch.equal(plan.indices, epoch_plan(48, 8, 1, 5).indices)
    ours = list(loader_for(cfg, "dali").labelled(1))
    assert torch.equal(torch.stack([b.flips for b in ours]), plan.flips)
    for batch, reference in zip(ours, loader_for(cfg, "memory").epoch(1), strict=True):
        assert (batch.images - as_unit(reference)).abs().max() <= 2 * GREY_LEVEL
    unflipped = list(loader_for(folder_cfg(cats_dir), "memory").epoch(1))
    assert not torch.equal(torch.stack(unflipped), torch.stack(list(loader_for(cfg, "memory").epoch(1))))


def test_same_seed_same_epochs_and_resume_skips_batches(dali, cats_dir: Path) -> None:
    loader = loader_for(folder_cfg(cats_dir), "dali")
    first, again = list(loader.labelled(2)), list(loader.labelled(2))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    other = torch.cat([b.indices for b in loader.labelled(3)])
    assert not torch.equal(torch.cat([b.indices for b in first]), other)
    assert sorted(other.tolist()) != other.tolist()  # shuffled, not the folder's order
    tail = list(loader.labelled(2, start_step=4))
    assert len(tail) == 2
    for a, b in zip(tail, first[4:], strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert list(loader.epoch(2, start_step=6)) == []


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_disjoint_cover_the_epoch_and_match_epoch_plan(dali, cats_dir: Path, world_size: int) -> None:
    cfg = folder_cfg(cats_dir, limit=50)  # 50 images: not a multiple of any global batch here
    steps = 50 // (8 * world_size)
    seen = []
    for rank in range(world_size):
        loader = loader_for(cfg, "dali", Shard(rank, world_size))
        assert loader.steps_per_epoch == steps
        batches = list(loader.labelled(1))
        assert len(batches) == steps and all(b.images.shape[0] == 8 for b in batches)
        indices = torch.stack([b.indices for b in batches])
        assert torch.equal(indices, epoch_plan(50, 8, 1, 5, Shard(rank, world_size)).indices)
        seen.append(set(indices.flatten().tolist()))
    union = set().union(*seen)
    assert sum(len(s) for s in seen) == len(union) == steps * 8 * world_size  # disjoint, and the whole epoch


def test_channels_last_and_amp_dtype_come_out_of_the_pipeline(dali, cats_dir: Path) -> None:
    cfg = folder_cfg(cats_dir, limit=16)
    fp16 = SimpleNamespace(autocast_dtype=torch.float16, channels_last=True)  # fp16 AMP is CUDA-only in training
    x = next(loader_for(cfg, "dali", policy=fp16).epoch(0))
    assert x.dtype == torch.float16 and x.shape == (8, 3, 64, 64) and x.is_contiguous(memory_format=torch.channels_last)
    bf16 = PrecisionPolicy(CPU, "bf16", channels_last=True)
    y = next(loader_for(cfg, "dali", policy=bf16).epoch(0))  # DALI has no bfloat16: fp32, cast by prepare_batch
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    prepared = bf16.prepare_batch(y)
    assert prepared.dtype == torch.bfloat16 and torch.allclose(prepared.float(), y, atol=4e-3)
    assert (x.float() - y).abs().max() < 1e-3


def test_empty_folder_and_too_few_images(dali, cats_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found below"):
        loader_for(folder_cfg(tmp_path / "empty"), "dali")
    with pytest.raises(ConfigError, match="--limit: 12 leaves 12 images, fewer than one global batch of 16 "
                                          r"\(8 per process x 2 processes\); raise --limit or lower --batch-size"):
        loader_for(folder_cfg(cats_dir, limit=12), "dali", Shard(0, 2))


@pytest.fixture
def broken_folder(cats_dir: Path, tmp_path: Path) -> Path:
    """21 readable cat JPEGs and three bad .jpg files: garbage bytes, a truncated JPEG, an empty file."""
    folder = tmp_path / "broken"
    folder.mkdir()
    sources = sorted(cats_dir.glob("*.jpg"))[:21]
    for src in sources:
        shutil.copy(src, folder / src.name)
    (folder / "00_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG body at all")
    (folder / "01_truncated.jpg").write_bytes(sources[0].read_bytes()[:2000])
    (folder / "02_empty.jpg").write_bytes(b"")
    return folder


def test_corrupt_images_are_replaced_like_the_torch_loader_does(dali, broken_folder: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg = folder_cfg(broken_folder, limit=0)
    with caplog.at_level(logging.INFO, logger="gantrain"):
        ours = loader_for(cfg, "dali")
    # Garbage and empty files have no header: discovery leaves them out and says so. The truncated JPEG's header
    # is fine, so DALI meets it and fails on it mid-epoch.
    assert ours.num_images == 22 and ours.steps_per_epoch == 2
    assert "left out 2 file(s): unreadable 2 (00_garbage.jpg, 02_empty.jpg)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gantrain"):
        batches = list(ours.epoch(0))
    assert len(batches) == 2  # the epoch keeps its length: the bad file's slot holds the next readable image
    skipped = {r.getMessage().split()[2] for r in caplog.records
               if r.getMessage().startswith("unreadable image") and "takes its place" in r.getMessage()}
    assert {Path(p).name for p in skipped} == {"01_truncated.jpg"}
    theirs = list(loader_for(cfg, "torch").epoch(0))
    for x, y in zip(batches, theirs, strict=True):
        assert (x - as_unit(y)).abs().max() <= 2 * GREY_LEVEL
    assert len(list(ours.epoch(1))) == 2  # later epochs read the replacements from the start


@pytest.mark.parametrize("name", ["00_garbage.jpg", "01_truncated.jpg", "02_empty.jpg"])
def test_corrupt_image_under_strict_names_the_file(dali, broken_folder: Path, name: str) -> None:
    for other in {"00_garbage.jpg", "01_truncated.jpg", "02_empty.jpg"} - {name}:
        (broken_folder / other).unlink()
    cfg = folder_cfg(broken_folder, limit=0, strict=True, batch_size=21)
    if name == "01_truncated.jpg":  # a valid header: found by DALI while decoding
        with pytest.raises(DataError, match=f"unreadable image .*{name}: DALI says .*drop --strict"):
            list(loader_for(cfg, "dali").epoch(0))
    else:  # no header: refused by discovery, before any pipeline is built
        with pytest.raises(DataError, match=f"unreadable image .*{name} .drop --strict"):
            loader_for(cfg, "dali")


# ----- in-memory datasets -------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_idx_through_external_source_matches_the_memory_loader(dali, tiny_cfg, workers: int) -> None:
    cfg = tiny_cfg(limit=256, num_workers=workers, hflip=True)
    ours, theirs = loader_for(cfg, "dali"), loader_for(cfg, "memory")
    assert isinstance(ours, DALIArrayLoader) and ours.steps_per_epoch == theirs.steps_per_epoch == 8
    for epoch in (0, 1, 3):  # 0 -> 1 reuses the pipeline; 3 is a jump, which builds a new one
        for x, y in zip(ours.epoch(epoch), theirs.epoch(epoch), strict=True):
            assert x.shape == (32, 1, 32, 32) and x.dtype == torch.float32
            assert (x - as_unit(y)).abs().max() < 1e-6
    tail = list(ours.epoch(1, start_step=6))
    assert len(tail) == 2 and torch.allclose(tail[0], as_unit(list(theirs.epoch(1))[6]), atol=1e-6)


def test_synthetic_data_with_dali(dali, tiny_cfg) -> None:
    cfg = tiny_cfg(dataset="synthetic", limit=64, channels=3, num_workers=0)
    batches = list(loader_for(cfg, "dali").epoch(0))
    assert len(batches) == 2 and batches[0].shape == (32, 3, 32, 32) and -1 <= batches[0].min() <= batches[0].max() <= 1


# ----- CUDA (skipped without a GPU, as in CI) --------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_gpu_pipeline_decodes_on_the_gpu_in_the_model_format(dali, cats_dir: Path) -> None:
    cuda = torch.device("cuda", 0)
    cfg = folder_cfg(cats_dir, device="cuda", hflip=True)
    gpu = build_loader(override(cfg, {"loader": "dali"}).data, seed=5, device=cuda,
                       policy=PrecisionPolicy(cuda, "fp16", channels_last=True))
    assert gpu.options.decode_device == "gpu"
    for x, y in zip(gpu.epoch(0), loader_for(cfg, "dali").epoch(0), strict=True):  # the second: a CPU pipeline
        assert x.is_cuda and x.dtype == torch.float16 and x.is_contiguous(memory_format=torch.channels_last)
        assert (x.float().cpu() - y).abs().mean() < 2 * GREY_LEVEL  # nvJPEG and libjpeg-turbo round differently


@pytest.mark.gpu
@needs_cuda
def test_idx_external_source_on_cuda_with_spawned_workers(dali, tiny_cfg) -> None:
    cuda = torch.device("cuda", 0)
    cfg = tiny_cfg(limit=256, num_workers=1, device="cuda")
    ours = build_loader(override(cfg, {"loader": "dali"}).data, seed=5, device=cuda)
    for x, y in zip(ours.epoch(0), loader_for(cfg, "memory").epoch(0), strict=True):
        assert x.is_cuda and torch.allclose(x.cpu(), as_unit(y), atol=1e-6)


# ----- end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cats64_trains_with_dali_from_the_cli(dali, cli, cats_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = cli("run", "--preset", "cats64", "--data-root", cats_dir, "--loader", "dali", "--limit", "64",
                 "--batch-size", "16", "--max-steps", "5", "--ngf", "8", "--ndf", "8", "--sample-every", "0",
                 "--log-every", "1", "--hflip", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, result.output
    log_text = (out / "train.log").read_text()
    assert "DALIFolderLoader" in log_text and "4 steps/epoch" in log_text
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_d" in r] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss_d"]) and np.isfinite(r["loss_g"]) for r in records if "loss_d" in r)
    assert (out / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
def test_bench_loaders_writes_reports(dali, cli, cats_dir: Path, tmp_path: Path) -> None:
    """One loader-only row in its own process (training rows run the engine worker that test_bench covers)."""
    json_path, md_path = tmp_path / "loaders.json", tmp_path / "loaders.md"
    result = cli("bench", "--loaders", "--quick", "--data-root", cats_dir, "--limit", "128", "--batch-size", "8",
                 "--device", "cpu", "--only", "dali 64px loader", "--num-workers", "1", "--json", json_path,
                 "--markdown", md_path)
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["dali"] and report["num_images"] == 128 and report["batch_sizes"] == {"64": 8, "128": 8}
    [row] = report["results"]
    assert "error" not in row, row
    assert row["name"] == "dali 64px loader only" and row["loader"] == "DALIFolderLoader"
    assert row["images_per_s"] > 0 and row["setup_s"] > 0 and row["timed_steps"] == 4
    assert "| 64px | dali |" in md_path.read_text()


def test_loader_bench_rows() -> None:
    rows = loader_rows()
    assert len(rows) == 12 and len({r.name for r in rows}) == 12
    assert [r.name for r in rows[:4]] == ["memory 64px loader only", "torch 64px loader only", "dali 64px loader only",
                                          "memory 64px train"]
    cfg = row_config(rows[-1], {"data_root": "/cats", "device": "cpu"})
    assert cfg.preset == "cats128" and cfg.data.loader == "dali" and cfg.data.batch_size == 64
