"""Data: sources (IDX, image folders, synthetic), download, and loaders with one interface."""

from gantrain.engine.data.loaders import BatchLoader, MemoryLoader, TorchLoader, build_loader
from gantrain.engine.data.plan import EpochPlan, Shard, epoch_batches, epoch_plan
from gantrain.engine.data.sources import data_root, load_idx_split, load_images, read_idx

__all__ = ["BatchLoader", "EpochPlan", "MemoryLoader", "Shard", "TorchLoader", "build_loader", "data_root",
           "epoch_batches", "epoch_plan", "load_idx_split", "load_images", "read_idx"]
