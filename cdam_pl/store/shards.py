"""The files of a folder of stored explanations, and how they are written so that a killed run can resume.

An explain run over M input images writes, under `OUT/maps/`:

  run.json                      the run's identity (written first): the settings that decide its maps
  shard-NNNNN.safetensors       tensors of the input images [s * shard_size, (s + 1) * shard_size), keys as in
                                `MAPS_LAYOUT` (no pickles; method maps float32, or float16 when asked)
  shard-NNNNN.json              the shard's marker, written after its tensors: their size and sha256, the
                                manifest entries of its images and the inputs it skipped
  index.json                    written when every shard is complete: each shard and the images it holds

Every file is written atomically (temp file beside it, fsync, rename). A shard counts as done only when its
marker names this run and its tensor file has the recorded size and sha256, so a run killed at any point leaves
shards that are either done or redone; temp files it left (`.NAME.RANDOM.tmp`) are removed when it resumes.
Shards are fixed ranges of the input list, so which process writes which shard does not change the result.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from safetensors.numpy import save_file

from cdam_pl.errors import ConfigError, DataError
from cdam_pl.io import atomic_write_path, atomic_write_text, file_sha256

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "INDEX_FILE",
    "MAPS_DIR",
    "MAPS_LAYOUT",
    "MAP_DTYPES",
    "MAX_SHARD_SIZE",
    "RUN_FILE",
    "STORE_FORMAT",
    "RunFolder",
    "check_map_dtype",
    "check_shard_size",
]

STORE_FORMAT = "cdam-pl-maps/1"
MAPS_DIR = "maps"
RUN_FILE = "run.json"
INDEX_FILE = "index.json"
DEFAULT_SHARD_SIZE = 256
MAX_SHARD_SIZE = 1024
MAP_DTYPES = ("float32", "float16")

MAPS_LAYOUT = {
    "maps/shard-NNNNN.safetensors": "the tensors of up to --shard-size input images (safetensors, no pickles):",
    "{i}/{method}": "float32 (float16 with --dtype float16) [R, gh, gw]: signed token scores of image i (unclipped)",
    "{i}/logits": "float32 [C]: raw head outputs of image i",
    "{i}/targets": "int64 [K]: class indices explained for image i",
    "{i}/concept_scores": "float32 [M]: similarity of image i to each concept (when concepts are given)",
    "maps/shard-NNNNN.json": "the shard's manifest entries (per image its path, targets, rows of each map: "
                             "'class:NAME', 'concept:NAME' or 'image'), skipped inputs, size and sha256",
    "maps/index.json": "every shard and the (index, path) of its images; classes, concepts, methods, dtype",
}


def check_shard_size(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_SHARD_SIZE:
        raise ConfigError(f"--shard-size must be between 1 and {MAX_SHARD_SIZE}, got {n}")
    return n


def check_map_dtype(name: str) -> str:
    if name not in MAP_DTYPES:
        raise ConfigError(f"--dtype {name!r}: choose one of {', '.join(MAP_DTYPES)}")
    return name


def run_id(identity: dict[str, Any]) -> str:
    """A short fingerprint of a run's identity: shards and markers carry it."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _shown(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a file cut short counts as missing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class RunFolder:
    """The `maps/` folder of one run over `n_inputs` images in shards of `shard_size`.

    The process that starts the run calls `open` (checks or records the identity, keeps the finished shards);
    every process that explains calls `write_shard` for its shards; the starting process calls `finish` at the end.
    """

    def __init__(self, out: str | os.PathLike, shard_size: int, n_inputs: int, run: str | None = None):
        self.out = Path(out)
        self.dir = self.out / MAPS_DIR
        self.shard_size, self.n_inputs = check_shard_size(shard_size), int(n_inputs)
        self.run = run  # the run's fingerprint; set by `open`
        self.resumed = False  # whether `open` found an earlier run's state

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_inputs / self.shard_size)

    def shard_range(self, s: int) -> tuple[int, int]:
        """Input indices [a, b) of shard s."""
        return s * self.shard_size, min(self.n_inputs, (s + 1) * self.shard_size)

    def paths(self, s: int) -> tuple[Path, Path]:
        """Tensor file and marker of shard s."""
        return self.dir / f"shard-{s:05d}.safetensors", self.dir / f"shard-{s:05d}.json"

    # --- the starting process --------------------------------------------------------------------------------
    def open(self, identity: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Check `identity` (user-facing setting name -> value) against an earlier run in this folder, or record it.
        -> the markers of the shards already done; anything else an earlier run left is removed.

        A folder that holds a run with other settings is a one-line ConfigError naming the first that differs."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot create {self.dir} ({e.strerror}); choose another output "
                              "folder") from None
        identity = {"format": STORE_FORMAT, **identity}
        run_file = self.dir / RUN_FILE
        previous = _read_json(run_file) if run_file.exists() else None
        if run_file.exists() and not (isinstance(previous, dict) and isinstance(previous.get("identity"), dict)):
            raise DataError(f"{run_file} is unreadable; delete {self.dir} to start the run afresh")
        if previous is not None:
            old = previous["identity"]
            for key in dict.fromkeys([*identity, *old]):
                if old.get(key) != identity.get(key):
                    raise ConfigError(
                        f"{self.out} holds an earlier run with other {key} ({_shown(old.get(key))} then, "
                        f"{_shown(identity.get(key))} now); run the same command to resume it, or choose another "
                        "output folder")
        else:
            atomic_write_text(run_file, json.dumps({"run": run_id(identity), "identity": identity}, indent=1) + "\n")
        self.run, self.resumed = run_id(identity), previous is not None
        (self.dir / INDEX_FILE).unlink(missing_ok=True)  # rewritten by `finish`
        for p in self.dir.glob(".*.tmp"):  # what a killed write left
            p.unlink(missing_ok=True)
        done: dict[int, dict[str, Any]] = {}
        for s in range(self.n_shards):
            marker = self.check(s)
            if marker is not None:
                done[s] = marker
                continue
            for p in self.paths(s):
                p.unlink(missing_ok=True)
        return done

    def check(self, s: int, verify: bool = True) -> dict[str, Any] | None:
        """Shard s's marker if the shard is done (its marker names this run and range, its tensor file has the
        recorded size and, with verify, sha256), else None."""
        tensors, marker_path = self.paths(s)
        m = _read_json(marker_path)
        first, stop = self.shard_range(s)
        expected = {"format": STORE_FORMAT, "run": self.run, "shard": s, "file": tensors.name, "first": first,
                    "count": stop - first}
        if not isinstance(m, dict) or any(m.get(k) != v for k, v in expected.items()):
            return None
        try:
            if tensors.stat().st_size != m.get("size"):
                return None
        except OSError:
            return None
        return m if not verify or file_sha256(tensors) == m.get("sha256") else None

    def finish(self, info: dict[str, Any]) -> tuple[Path, list[dict[str, Any]]]:
        """Every shard is done: write index.json (`info` holds classes, concepts, methods, dtype) ->
        (its path, the skipped inputs of every shard)."""
        shards, skipped, explained = [], [], 0
        for s in range(self.n_shards):
            m = self.check(s, verify=False)
            if m is None:
                raise DataError(f"{self.paths(s)[0]} is missing or incomplete after the run; run the same command "
                                "again to redo it")
            shards.append({"shard": s, "file": m["file"], "marker": self.paths(s)[1].name, "size": m["size"],
                           "sha256": m["sha256"], "images": [[r["index"], r["path"]] for r in m["images"]]})
            skipped += m["skipped"]
            explained += len(m["images"])
        index = {"format": STORE_FORMAT, "run": self.run, **info, "shard_size": self.shard_size,
                 "inputs": self.n_inputs, "explained": explained, "shards": shards}
        return atomic_write_text(self.dir / INDEX_FILE, json.dumps(index) + "\n"), skipped

    # --- every explaining process ----------------------------------------------------------------------------
    def write_shard(self, s: int, arrays: dict[str, np.ndarray], records: list[dict[str, Any]],
                    skipped: Iterable[dict[str, Any]], dtype: str) -> dict[str, Any]:
        """Write shard s: its tensors (`arrays`, keys as in MAPS_LAYOUT), then its marker. -> the marker."""
        if self.run is None:
            raise RuntimeError("RunFolder.write_shard needs the run's fingerprint (open() or run=...)")
        tensors, marker_path = self.paths(s)
        meta = {"format": STORE_FORMAT, "run": self.run, "shard": str(s), "dtype": dtype}
        atomic_write_path(tensors, lambda tmp: save_file(arrays, tmp, metadata=meta))
        first, stop = self.shard_range(s)
        marker = {"format": STORE_FORMAT, "run": self.run, "shard": s, "file": tensors.name, "first": first,
                  "count": stop - first, "size": tensors.stat().st_size, "sha256": file_sha256(tensors),
                  "dtype": dtype, "images": records, "skipped": list(skipped)}
        atomic_write_text(marker_path, json.dumps(marker) + "\n")
        return marker
