"""Atomic file writes: write to a temporary file in the target directory, fsync, then rename over the target.

A run killed mid-write leaves either the old file or the new one, never a truncated file.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


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


def atomic_write_path(path: str | os.PathLike, write_to: Callable[[str], None]) -> Path:
    """For writers that take a file name: `write_to(temp_name)` beside `path`, fsync, then rename onto `path`."""
    path = Path(path)
    with _temp_beside(path) as tmp:
        write_to(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
