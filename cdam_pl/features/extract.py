"""Feature extraction as Lightning prediction: every device of every node extracts its own shards of a cache.

    cache = extract_features(root, key, dataset, backbone, batch_size=256, dtype="float16",
                             trainer_kwargs={"accelerator": "gpu", "devices": 8, "num_nodes": 4, "strategy": "ddp"})

Three small pieces, one concern each:
  `ShardedExtractionData`  which samples this rank predicts: its shards `s % world_size == rank` that are not
                           finished yet (so an interrupted run resumes), unshuffled, in batches that never cross a
                           shard boundary;
  `FeatureExtraction`      what is predicted: the frozen backbone's features [b, D];
  `CacheShardWriter`       where they go: each shard is written with `cdam_pl.features.cache`'s own code
                           (`ShardBuffer`) as soon as its last batch arrives.
The ranks then meet through the file system, as `FeatureCache.build` does: each polls until every shard exists
(`FeatureCache.finish_build`; whichever rank sees them all first writes the header) and opens the cache. No
collective call waits at the end, so however uneven the shares (a resumed run where one rank has nothing left)
no process-group timeout can fire. On one CPU device the shard files are byte-identical to `FeatureCache.build`
with the same batch size. Lightning is the distributed engine: `ddp` (re-launched script, multi-node) and
`ddp_spawn` both work.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from cdam_pl.errors import ConfigError, DataError
from cdam_pl.features.cache import BuildPlan, CacheIncomplete, FeatureCache, ShardBuffer, check_dtype

__all__ = ["CacheShardWriter", "FeatureExtraction", "ShardedExtractionData", "extract_features", "TRAINER_KEYS"]

# The Trainer options that decide where and how prediction runs; everything else in cfg.trainer is about fitting.
TRAINER_KEYS = ("accelerator", "devices", "strategy", "num_nodes", "precision")


class _Indexed(Dataset):
    """Items `(index, image, label)`, so every predicted batch names the samples it holds."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if not isinstance(item, (list, tuple)) or len(item) < 2:
            raise DataError("feature cache: dataset items must be (image, label, ...) tuples")
        return i, item[0], item[1]


def _quiet() -> None:
    """Silence Lightning's generic warnings that do not apply here (also called inside spawned ranks).

    Our batch sampler returns every index of this rank's shards by construction, and a rank with nothing left to
    do legitimately has an empty loader.
    """
    for pattern in (r"You are using a custom batch sampler", r"Total length of .* across ranks is zero",
                    r"Found \d+ module\(s\) in eval mode", r".*does not have many workers",
                    r"`isinstance\(treespec, LeafSpec\)` is deprecated"):
        warnings.filterwarnings("ignore", message=pattern)


class _Batches(Sampler):
    """A fixed list of index batches as a batch sampler (Lightning wraps it to track indices; a list it cannot)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class ShardedExtractionData(L.LightningDataModule):
    """Predict loader over this rank's unfinished shards; `plan` (a `BuildPlan`) is made in `setup`, per rank."""

    def __init__(self, root: str | os.PathLike, key: str, dataset, *, dim: int, dtype: str = "float32",
                 shard_size: int = 4096, batch_size: int = 64, num_workers: int = 0, verify: bool | None = None):
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a rank whose shards are done predicts nothing
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.root, self.key, self.dataset = Path(root).expanduser(), key, dataset
        self.dim, self.dtype, self.shard_size, self.verify = dim, dtype, shard_size, verify
        self.batch_size, self.num_workers = batch_size, num_workers
        self.plan: BuildPlan | None = None

    def setup(self, stage: str) -> None:
        _quiet()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        self.plan = FeatureCache.prepare_build(self.root, self.key, len(self.dataset), dim=self.dim, dtype=self.dtype,
                                               shard_size=self.shard_size, rank=rank, world_size=world,
                                               verify=self.verify)

    def predict_dataloader(self) -> DataLoader:
        assert self.plan is not None, "setup() makes the plan"
        return DataLoader(_Indexed(self.dataset), batch_sampler=_Batches(self.plan.batches(self.batch_size)),
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available())


class FeatureExtraction(L.LightningModule):
    """`predict_step`: a batch `(indices, images [b, 3, H, W], labels)` -> backbone features [b, D]."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(images)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        return self(batch[1])


class CacheShardWriter(BasePredictionWriter):
    """Fills this rank's shards from the predicted batches (in plan order) and writes each one when it is full."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._pending: list[int] = []
        self._buffer: ShardBuffer | None = None

    @staticmethod
    def _plan(trainer: L.Trainer) -> BuildPlan:
        plan = getattr(trainer.datamodule, "plan", None)
        if plan is None:
            raise ConfigError("CacheShardWriter needs Trainer.predict(datamodule=ShardedExtractionData(...))")
        return plan

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending, self._buffer = list(self._plan(trainer).todo), None

    def write_on_batch_end(self, trainer, pl_module, prediction: Tensor, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        plan = self._plan(trainer)
        index = torch.as_tensor(batch[0]).cpu()  # [b] dataset indices of this batch
        if self._buffer is None:
            if not self._pending:
                raise DataError(f"feature cache: rank {plan.rank} got a batch after its last shard was written")
            self._buffer = plan.buffer(self._pending.pop(0))
        buf = self._buffer
        start = plan.shard_range(buf.index)[0] + buf.filled
        if not torch.equal(index, torch.arange(start, start + len(index))):
            raise DataError(f"feature cache: shard {buf.index} expected samples from {start} in order, got batch "
                            f"{index[:4].tolist()}...; the predict loader must be ShardedExtractionData's")
        buf.add(prediction, batch[2])
        if buf.full:
            buf.write()
            self._buffer = None

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._buffer is not None or self._pending:
            left = ([self._buffer.index] if self._buffer is not None else []) + self._pending
            raise DataError(f"feature cache: prediction ended with shards {left} of rank {trainer.global_rank} "
                            "unfinished")


def extract_features(
    root: str | os.PathLike,
    key: str,
    dataset,
    backbone: torch.nn.Module,
    *,
    dim: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    dtype: str = "float32",
    shard_size: int = 4096,
    trainer_kwargs: dict[str, Any] | None = None,
    verify: bool | None = None,
    progress: bool = True,
    wait: float = 24 * 3600.0,
    poll: float = 2.0,
) -> FeatureCache:
    """Load the cache for `key`, or extract it from `dataset` (items `(image, label, ...)`) with one
    `Trainer.predict` over the devices in `trainer_kwargs` (accelerator, devices, strategy, num_nodes, precision;
    default: one device of the best accelerator).

    Call it on every rank, as the fit does (a re-launched `ddp` script runs it on each). After prediction each
    rank waits up to `wait` s (polling every `poll` s) for the other ranks' shards, which must appear in the same
    directory: `root` must be on a file system that every node shares.
    """
    dim = int(dim if dim is not None else backbone.feature_dim)
    dtype = check_dtype(dtype).name
    if len(dataset) == 0:
        raise DataError("cannot build a feature cache from an empty dataset")
    cache = FeatureCache.load(root, key, verify=verify)
    if cache is not None and (len(cache), cache.dim, cache.dtype.name, cache.shard_size) == (
            len(dataset), dim, dtype, shard_size):
        return cache
    opts = {"devices": 1, **(trainer_kwargs or {})}
    unknown = sorted(set(opts) - set(TRAINER_KEYS))
    if unknown:
        raise ConfigError(f"extract_features: trainer option(s) {', '.join(unknown)} do not apply to extraction; "
                          f"pass only {', '.join(TRAINER_KEYS)}")
    data = ShardedExtractionData(root, key, dataset, dim=dim, dtype=dtype, shard_size=shard_size,
                                 batch_size=batch_size, num_workers=num_workers, verify=verify)
    try:
        trainer = L.Trainer(**opts, logger=False, enable_checkpointing=False, enable_model_summary=False,
                            enable_progress_bar=progress, use_distributed_sampler=False,
                            callbacks=[CacheShardWriter()])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid trainer option for extraction: {str(e).splitlines()[0]}") from None
    rank_zero_info(f"feature cache {Path(root).expanduser() / key[:16]}: extracting {len(dataset)} samples "
                   f"({dtype}, shards of {shard_size}) with Trainer.predict")
    with warnings.catch_warnings():
        _quiet()
        trainer.predict(FeatureExtraction(backbone), datamodule=data, return_predictions=False)
    plan = FeatureCache.prepare_build(root, key, len(dataset), dim=dim, dtype=dtype, shard_size=shard_size,
                                      rank=trainer.global_rank, world_size=trainer.world_size, verify=False)
    try:
        return FeatureCache.finish_build(plan, wait=wait, poll=poll)
    except CacheIncomplete as e:
        raise CacheIncomplete(f"{e}; is the cache directory {plan.directory} on a file system every node shares?",
                              e.missing) from None
