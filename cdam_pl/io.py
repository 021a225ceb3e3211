"""Atomic file writes: write to a temporary file in the target directory, fsync, then rename over the target.

A run killed mid-write leaves either the old file or the new one, never a truncated file.
"""
from __future__ import annotations

import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


@contextmanager
def _temp_beside(path: Path) -> Iterator[str]:
    """A temp file name in `path`'s folder; when the block succeeds the file is renamed onto `path`, when it fails
    (or is interrupted) the temp file is removed and the old `path` stays as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call `write(file_object)` on a temp file beside `path`, fsync, then `os.replace` it onto `path`."""
    path = Path(path)
    with _temp_beside(path) as tmp, open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO whose saves are atomic (temp file + rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resuming reads tensors and plain containers only, never arbitrary pickles. Lightning also loads its own
        temporary weights file through here (ddp_spawn), so a plain state dict is accepted too."""
        from cdam_pl.checkpoint import read_checkpoint

        return read_checkpoint(path, require_cdam=False)


def atomic_write_path(path: str | os.PathLike, write_to: Callable[[str], None]) -> Path:
    """For writers that take a file name: `write_to(temp_name)` beside `path`, fsync, then rename onto `path`."""
    path = Path(path)
    with _temp_beside(path) as tmp:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path


class AtomicTensorBoardLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger with hparams.yaml written atomically (a run killed while it is written leaves
    none, never a truncated one). The event files need no such care: they are append-only records, and TensorBoard
    reads them up to the last complete one, so a kill loses at most the record in flight."""

    @rank_zero_only
    def save(self) -> None:
        from lightning.pytorch.core.saving import save_hparams_to_yaml

        self.experiment.flush()
        run_dir = Path(self.log_dir)
        target = run_dir / self.NAME_HPARAMS_FILE
        if not isinstance(self._fs, LocalFileSystem):  # remote storage: Lightning's own writer
            return super().save()
        if run_dir.is_dir() and not target.is_file():
            atomic_write_path(target, lambda tmp: save_hparams_to_yaml(tmp, self.hparams))
