"""Lightning plumbing whose files are written atomically: checkpoints and TensorBoard's hparams.yaml.

The writers are looked up on their modules at call time (`io.atomic_torch_save`, `saving.save_hparams_to_yaml`), so
a test can make them fail in place."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.core import saving
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from cdam_pl import io
from cdam_pl.checkpoint import read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        io.atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming reads tensors and plain containers only, never arbitrary pickles. Lightning also loads its own
        temporary weights file through here (ddp_spawn), so a plain state dict is accepted too."""
        return read_checkpoint(path, require_cdam=False)


class AtomicTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger with hparams.yaml written atomically (a run killed while it is written leaves
    none, never a truncated one). The event files need no such care: they are append-only records, and TensorBoard
    reads them up to the last complete one, so a kill loses at most the record in flight."""

    @rank_zero_only
    def save(self) -> None:
        self.experiment.flush()
        run_dir = Path(self.log_dir)
        target = run_dir / self.NAME_HPARAMS_FILE
        if not isinstance(self._fs, LocalFileSystem):  # remote storage: Lightning's own writer
            return super().save()
        if run_dir.is_dir() and not target.is_file():
            io.atomic_write_path(target, lambda tmp: saving.save_hparams_to_yaml(tmp, self.hparams))
