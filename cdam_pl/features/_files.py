"""The files of a feature cache's shards: their names, how they are written and how they are checked.

A shard `s` is three files in the cache directory: `shard_<s>.npy` (features [rows, D]), `shard_<s>.labels.npy`
(int64 [rows]) and `shard_<s>.json`, the marker written last that records each file's size and sha256. Every file
is written atomically (temp file beside it, fsync, rename), so a killed build leaves only whole files; the temp
files it leaves behind are named `.<file name>.<random>.tmp`.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cdam_pl.io import atomic_write_bytes, file_sha256

__all__ = [
    "check_file",
    "check_shards",
    "clean_temp",
    "npy_bytes",
    "npy_header",
    "shard_entry",
    "shard_paths",
    "write_shard",
]


def shard_paths(directory: Path, s: int) -> tuple[Path, Path, Path]:
    """Features, labels and marker file of shard `s`."""
    stem = f"shard_{s:05d}"
    return directory / f"{stem}.npy", directory / f"{stem}.labels.npy", directory / f"{stem}.json"


def npy_bytes(arr: np.ndarray) -> bytes:
    """The `.npy` file of `arr` (C order, no pickles) as bytes."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of a `.npy` file, without reading its data."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    if fortran:
        raise ValueError("Fortran order")
    return tuple(shape), np.dtype(dtype)


def check_file(path: Path, entry: dict, shape: tuple[int, ...], dtype: np.dtype, verify: bool) -> str | None:
    """None if `path` matches its recorded size/sha256 and `.npy` header, else what is wrong."""
    what = "labels" if path.name.endswith(".labels.npy") else "features"
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{what} file missing"
    if size != entry.get("size"):
        return f"{what} size mismatch ({size} != {entry.get('size')} bytes)"
    try:
        got_shape, got_dtype = npy_header(path)
    except (OSError, ValueError) as e:
        return f"{what} header unreadable ({e})"
    if got_shape != shape or got_dtype != dtype:
        return f"{what} is {got_dtype}{list(got_shape)}, expected {dtype}{list(shape)}"
    if verify and file_sha256(path) != entry.get("sha256"):
        return f"{what} checksum mismatch"
    return None


def write_shard(directory: Path, s: int, feats: np.ndarray, labels: np.ndarray, config: dict) -> None:
    """Write one shard's two `.npy` files, then its marker; each atomically."""
    feat_path, lab_path, marker = shard_paths(directory, s)
    entry: dict[str, Any] = {"rows": int(len(labels))}
    for name, path, arr in (("features", feat_path, feats), ("labels", lab_path, labels)):
        data = npy_bytes(arr)
        atomic_write_bytes(path, data)
        entry[name] = {"file": path.name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write_bytes(marker, json.dumps({**config, "index": s, **entry}, sort_keys=True).encode())


def check_shards(directory: Path, header: dict, verify: bool) -> str | None:
    """None if every shard listed in a cache's `header` checks out (see `check_file`), else what is wrong."""
    dtype, dim = np.dtype(header["dtype"]), header["dim"]
    bad = []
    for s, sh in enumerate(header["shards"]):
        rows = min(header["shard_size"], header["n"] - s * header["shard_size"])
        feat, lab, _ = shard_paths(directory, s)
        try:
            ok = sh["rows"] == rows and sh["features"]["file"] == feat.name and sh["labels"]["file"] == lab.name
        except (KeyError, TypeError):
            ok = False
        if not ok:
            why = "header entry inconsistent"
        else:
            why = check_file(feat, sh["features"], (rows, dim), dtype, verify) or check_file(
                lab, sh["labels"], (rows,), np.dtype(np.int64), verify
            )
        if why:
            bad.append(f"shard {s}: {why}")
    if not bad:
        return None
    return "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")


def shard_entry(directory: Path, s: int, config: dict, verify: bool) -> dict | None:
    """The finished shard's header entry, or None when it must be (re)built."""
    feat, lab, marker = shard_paths(directory, s)
    try:
        m = json.loads(marker.read_text())
        if {k: m.get(k) for k in config} != config or m.get("index") != s:
            return None
        rows = min(config["shard_size"], config["n"] - s * config["shard_size"])
        entry = {"rows": m["rows"], "features": m["features"], "labels": m["labels"]}
        if entry["rows"] != rows or entry["features"]["file"] != feat.name or entry["labels"]["file"] != lab.name:
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    dtype = np.dtype(config["dtype"])
    if check_file(feat, entry["features"], (rows, config["dim"]), dtype, verify) or check_file(
        lab, entry["labels"], (rows,), np.dtype(np.int64), verify
    ):
        return None
    return entry


def clean_temp(directory: Path, shards: list[int]) -> None:
    """Remove temp files a killed run left for these shards (other ranks' temp files are left alone)."""
    prefixes = tuple(f".shard_{s:05d}." for s in shards)
    for p in directory.glob(".shard_*.tmp"):
        if p.name.startswith(prefixes):
            p.unlink(missing_ok=True)
