"""Stopping a training run cleanly: on a signal (`GracefulStop`, `stop_now_on_signal`) or on a non-finite loss
(`FiniteLossGuard`).

Graceful stop: SIGTERM or Ctrl-C during training saves `last.ckpt` at the next batch boundary, then stops. Before
training (feature extraction, Lightning's sanity check) there is nothing to save: `stop_now_on_signal` stops at once,
which is safe because every file is written to a temp file and renamed (a killed write leaves no partial file) and
finished feature-cache shards are kept for the next run. (Lightning's own handler would only note a SIGTERM during
`Trainer.predict` and carry on.)

Shared GPUs end jobs with SIGTERM (and SIGKILL after a grace period); people press Ctrl-C. `GracefulStop` turns
either into: finish the batch in flight, save `last.ckpt` through the trainer (atomic: `AtomicCheckpointIO`), raise
`TrainingStopped`. `run_training` turns that into a result whose `stopped` entry says where it stopped and how to
resume, and train.py prints it as one line and exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

Resuming with `resume=last` restores the head, optimizer, scheduler and loop counters, and the feature-cache loader
skips the batches of the interrupted epoch already trained on (`cdam_pl.features.loader.FeatureLoader.state_dict`),
so the resumed run ends with the head weights of an uninterrupted run with the same seed. (Heads with dropout draw from
torch's global generator, which no checkpoint restores: their resumed weights differ from an uninterrupted run's.)

The handlers are installed in `on_train_start`, after Lightning has installed its own (whose SIGTERM handling would
end the run at an epoch or validation boundary without saving), and the previous handlers come back when training
ends or fails. Under DDP the ranks agree at every batch end (one all-reduce of the signal number) so every rank
stops after the same step, whichever rank got the signal. A second Ctrl-C aborts at once.

Non-finite loss: the first NaN/Inf training loss stops the run with a one-line `DataError` (NaN/Inf features from
the backbone, or a learning rate that diverges), instead of training on and saving NaN weights.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from cdam_pl.errors import CheckpointError, DataError

__all__ = ["FiniteLossGuard", "GracefulStop", "RestoreLoaderState", "TrainingStopped", "STOP_SIGNALS",
           "stop_now_on_signal"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving `checkpoint` (None: nothing was saved, e.g. before training)."""

    def __init__(self, signum: int, epoch: int | None = None, step: int | None = None,
                 checkpoint: str | None = None, where: str | None = None):
        self.signum = int(signum)
        self.signal_name = signal.Signals(self.signum).name
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint
        self.exit_code = 128 + self.signum
        if checkpoint is not None:
            message = (f"stopped by {self.signal_name} at epoch {epoch} step {step}; saved {checkpoint}; "
                       "resume with resume=last")
        else:
            message = (f"stopped by {self.signal_name} {where or 'before training started'}; nothing new to save "
                       "(finished feature-cache shards are kept); run the same command again")
        super().__init__(message)

    def as_dict(self) -> dict[str, Any]:
        return {"signal": self.signal_name, "epoch": self.epoch, "step": self.step, "checkpoint": self.checkpoint,
                "exit_code": self.exit_code, "message": str(self)}


@contextmanager
def stop_now_on_signal(where: Callable[[], str]) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT raise `TrainingStopped(where=where())` at once (main thread only).

    `GracefulStop` takes over while training runs and hands back to this when training ends or fails.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame) -> None:
        raise TrainingStopped(signum, where=where())

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, handle)
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


class GracefulStop(Callback):
    """On SIGTERM/SIGINT: save `last.ckpt` after the current training batch and raise `TrainingStopped`.

    checkpoint_path: where to save; default: the `last.ckpt` of the trainer's `ModelCheckpoint(save_last=True)`
    (so `resume=last` finds it), else `<default_root_dir>/last.ckpt`.
    """

    def __init__(self, checkpoint_path: str | Path | None = None, signals: tuple[int, ...] = STOP_SIGNALS):
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.signals = tuple(signals)
        self.received: int | None = None  # the first signal caught since training started
        self._previous: dict[int, Any] = {}

    # --- handlers -----------------------------------------------------------------------------------------------
    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # second Ctrl-C: give up waiting
            self._restore()
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a run in another thread keeps the defaults
        self.received = None
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            if handler is not None:
                signal.signal(s, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    # --- stopping -----------------------------------------------------------------------------------------------
    def _agreed_signal(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """The signal every rank acts on: the largest signal number caught by any rank (0: none)."""
        return _agree_max(trainer, pl_module, self.received or 0)

    def last_checkpoint_path(self, trainer: L.Trainer) -> Path:
        if self.checkpoint_path is not None:
            return self.checkpoint_path
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
        return Path(trainer.default_root_dir) / "last.ckpt"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        signum = self._agreed_signal(trainer, pl_module)
        if not signum:
            return
        path = self.last_checkpoint_path(trainer)
        try:  # every rank calls it; rank 0 writes (temp file + rename), the others wait
            trainer.save_checkpoint(path, weights_only=False)
        except OSError as e:
            raise CheckpointError(f"stopping on {signal.Signals(signum).name}: could not save {path} "
                                  f"({e.strerror or e}); the previous last.ckpt, if any, is intact; free space or "
                                  "fix permissions in out_dir") from None
        raise TrainingStopped(signum, epoch=trainer.current_epoch, step=trainer.global_step, checkpoint=str(path))


class RestoreLoaderState(Callback):
    """Hand a mid-epoch checkpoint's training-loader state (`state_dict()` of stateful loaders, e.g. the feature
    cache's `FeatureLoader`) back to the loaders when training starts.

    Lightning restores loader states only if it builds the training loader after restoring the checkpoint, but a
    `configure_optimizers` that reads `trainer.estimated_stepping_batches` (ours does, for the LR schedule) builds
    it before: without this callback a resumed epoch would start again from its first batch.
    """

    def __init__(self) -> None:
        self._states: list[dict] = []

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        loops = checkpoint.get("loops", {}) if isinstance(checkpoint, dict) else {}
        self._states = list(loops.get("fit_loop", {}).get("state_dict", {}).get("combined_loader", []) or [])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        states, self._states = self._states, []
        if not states or not trainer.fit_loop.restarting:  # an end-of-epoch checkpoint: nothing to skip
            return
        stateful = [dl for dl in _leaves(trainer.train_dataloader)
                    if callable(getattr(dl, "state_dict", None)) and callable(getattr(dl, "load_state_dict", None))]
        if len(stateful) == len(states):
            for loader, state in zip(stateful, states):
                loader.load_state_dict(state)


def _leaves(obj: Any) -> list:
    if isinstance(obj, (list, tuple)):
        return [leaf for item in obj for leaf in _leaves(item)]
    if isinstance(obj, dict):
        return [leaf for item in obj.values() for leaf in _leaves(item)]
    return [] if obj is None else [obj]


def _agree_max(trainer: L.Trainer, pl_module: L.LightningModule, value: int) -> int:
    """max of `value` over the ranks (one all-reduce under DDP; no communication on one device)."""
    if trainer.world_size <= 1:
        return int(value)
    flag = torch.tensor([int(value)], dtype=torch.int64, device=pl_module.device)
    return int(trainer.strategy.reduce(flag, reduce_op="max").item())


class FiniteLossGuard(Callback):
    """Raise a one-line `DataError` at the first training batch whose loss is NaN or Inf (on any rank)."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        bad = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all())
        if _agree_max(trainer, pl_module, int(bad)):
            raise DataError(
                f"training loss became NaN/Inf at epoch {trainer.current_epoch} batch {batch_idx}: the backbone "
                "gives non-finite features (check backbone.weights) or the head diverges (lower optim.lr); "
                "checkpoints saved before this step are kept"
            )
