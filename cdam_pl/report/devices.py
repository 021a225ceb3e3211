"""explain.py --devices N: the shards still to explain, as Lightning prediction across N devices.

`Trainer.predict` runs one process per device (`ddp_spawn`: CPU processes talking over gloo, or one per GPU;
one device runs in this process). Each process loads the checkpoint onto its device and explains a fixed share of
the remaining shards, `todo[rank::world_size]`: no DistributedSampler, no padding, no image twice. A predicted
"batch" is one shard number; the process explains the shard's images in batches and writes the shard itself
(`ShardJob.worker`, the same code as a one-device run), so the shards of every rank land in one folder and the
calling process merges them into one index afterwards. Nothing is gathered: predict_step returns nothing.
"""
from __future__ import annotations

import logging
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cdam_pl.checkpoint import load_checkpoint
from cdam_pl.errors import CdamError, ConfigError
from cdam_pl.report.outputs import PanelWriter

__all__ = ["ShardPrediction", "predict_shards", "prediction_trainer"]

# Notes that do not apply here: a rank with no shard left has an empty loader on purpose, the loader yields shard
# numbers (the images are read in threads inside the step), the step returns nothing, and torch's own deprecation
# note, raised inside its distributed set-up in each spawned process.
_IGNORED = (r"Total length of .* across ranks is zero", r".*does not have many workers",
            r"Found \d+ module\(s\) in eval mode", r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            r"predict returned None", r"`torch.jit.script` is deprecated")
_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def _quiet() -> None:
    for pattern in _IGNORED:
        warnings.filterwarnings("ignore", message=pattern)


@contextmanager
def _lightning_info_off() -> Iterator[None]:
    """Lightning's start-up notes (accelerator found, devices used) are not the command's output."""
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class ShardPrediction(L.LightningModule):
    """predict_step(shard number): explain and write that shard. The model is loaded in `setup`, in each process,
    and is not a registered submodule: Lightning neither broadcasts nor gathers its weights."""

    def __init__(self, job, todo: list[int], progress: bool, warn: Callable[[str], None] | None = None):
        super().__init__()
        self.job, self.todo, self.progress = job, list(todo), progress
        self.warn = warn
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.loaded = None
        self.worker = None
        self.bar = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickled first thing in a spawned process: its Lightning start-up notes (one 'Initializing distributed'
        line per process, a banner) are not the command's output either."""
        super().__setstate__(state)
        _quiet()
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)

    def mine(self) -> list[int]:
        """This process's share of the shards still to do: a fixed slice, the same on every run."""
        return self.todo[self.global_rank::self.trainer.world_size]

    def setup(self, stage: str) -> None:
        _quiet()
        self.loaded = load_checkpoint(self.job.checkpoint, weights=self.job.weights, device="cpu")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.mine(), batch_size=None, shuffle=False)

    def on_predict_start(self) -> None:
        self.loaded.to(self.device)
        world, mine = self.trainer.world_size, self.mine()
        show = self.progress and self.global_rank == 0 and sys.stderr.isatty()
        self.bar = tqdm(total=self.job.images_in(mine), unit="img", file=sys.stderr, dynamic_ncols=True,
                        desc=f"explaining (rank 0 of {world})" if world > 1 else "explaining", disable=not show)
        warn = self.warn or (lambda msg: tqdm.write(f"warning: {msg}", file=sys.stderr))
        self.worker = self.job.worker(self.loaded, self.device, PanelWriter(0) if self.job.panels else None, warn,
                                      self.bar)

    def predict_step(self, shard: Any, batch_idx: int) -> None:
        self.worker(int(shard))

    def on_predict_end(self) -> None:
        self.worker.close()
        self.bar.close()


def _child_error(e: BaseException) -> CdamError | None:
    """A user error raised in a spawned process comes back as its traceback text: its last line, as one line."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    m = re.match(r"cdam_pl\.errors\.\w+: (.*)", lines[-1]) if lines else None
    return CdamError(m.group(1)) if m else None


def prediction_trainer(accelerator: str, devices: int) -> L.Trainer:
    """The Trainer that explains on `devices` devices of `accelerator` (made before anything is loaded, so a
    machine without them is a one-line error at once)."""
    with _lightning_info_off(), warnings.catch_warnings():
        _quiet()
        try:
            return L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                             num_nodes=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                             enable_progress_bar=False, use_distributed_sampler=False, inference_mode=False)
        except (MisconfigurationException, ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"--accelerator {accelerator} --devices {devices}: {' '.join(str(e).split())}; "
                              "check the devices this machine has (--accelerator cpu runs CPU processes)") from None


def predict_shards(trainer: L.Trainer, job, todo: list[int], progress: bool,
                   warn: Callable[[str], None] | None = None) -> str:
    """Explain the shards `todo` of `job` with `trainer.predict`. -> where it ran, for the manifest."""
    spawned = trainer.world_size > 1
    with _lightning_info_off(), warnings.catch_warnings():
        _quiet()
        try:
            trainer.predict(ShardPrediction(job, todo, progress, None if spawned else warn), return_predictions=False)
        except torch.multiprocessing.ProcessRaisedException as e:
            raise (_child_error(e) or e) from None
    kind = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
    return f"{kind} x {trainer.world_size} (Lightning {'ddp_spawn' if spawned else 'one process'})"
