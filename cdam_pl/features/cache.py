"""On-disk cache of frozen-backbone features, so head training costs one backbone pass.

Layout of a cache directory `<root>/<key[:16]>/`::

    shard_00000.npy          features [rows, D] (float32 or float16), memory-mapped when read
    shard_00000.labels.npy   labels [rows] int64
    shard_00000.json         marker written last: key, config, rows, size and sha256 of both files
    ...
    header.json              written once every shard exists: format version, key, N, D, dtype, shards

Shard `s` covers samples `[s * shard_size, (s + 1) * shard_size)`. Every file is written atomically (temp file in
the same directory, then `os.replace`), so a killed build leaves only whole shards and resumes from them. Ranks of
a distributed build each extract the shards with `s % world_size == rank` and meet through the file system (no
collective calls, so no NCCL timeout however long extraction takes). `build` is three steps that other drivers
reuse (`cdam_pl.features.extract` runs the middle one as Lightning prediction): `prepare_build` (this rank's unfinished
shards), one `ShardBuffer` per shard (filled batch by batch, then written), `finish_build` (wait for all shards,
write the header, open the cache).

Reading never loads the features into memory: each shard is opened with `np.load(mmap_mode="r")` and batches are
gathered from the page cache, so an ImageNet-sized cache (1.28M x 768 float16, ~2 GB) trains in constant RAM.

Validation: `load` always checks the header, each file's size and its `.npy` header (shape, dtype), which catches
missing and truncated shards. Full sha256 checksums of every byte are checked only with `verify=True`; the default
is `verify=True` for caches below `VERIFY_LIMIT` (50M) feature elements and `False` above, where hashing every
byte on every load would cost more than it saves.

The shard files themselves (names, atomic writes, checks) are handled in `cdam_pl.features._files`; the batched,
resumable loader over a cache is `cdam_pl.features.loader`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cdam_pl.errors import ConfigError, DataError
from cdam_pl.features._files import check_shards, clean_temp, shard_entry, write_shard
from cdam_pl.features.loader import BatchedFeatureDataset, FeatureLoader
from cdam_pl.io import atomic_write_bytes

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "VERIFY_LIMIT",
    "BuildPlan",
    "CacheIncomplete",
    "FeatureCache",
    "ShardBuffer",
    "cache_key",
    "check_dtype",
    "default_cache_root",
]

FORMAT_VERSION = 1
VERIFY_LIMIT = 50_000_000  # feature elements (N * D) below which `load` verifies checksums by default
# float16 is the half-size option. bfloat16 is not offered: numpy has no such dtype, and it keeps 3 fewer mantissa
# bits than float16 for a range that normalised ViT features (|x| far below float16's 65504) never need.
DTYPES = ("float32", "float16")
HEADER = "header.json"

log = logging.getLogger(__name__)


class CacheIncomplete(DataError):
    """A distributed build finished its own shards but other ranks' shards did not appear within `wait` seconds."""

    def __init__(self, message: str, missing: list[int]):
        super().__init__(message)
        self.missing = missing


# --------------------------------------------------------------------------------------------------------------
# keys and paths
# --------------------------------------------------------------------------------------------------------------
def default_cache_root() -> Path:
    """`$CDAM_PL_CACHE/features`, or `~/.cache/cdam_pl/features`."""
    base = os.environ.get("CDAM_PL_CACHE") or "~/.cache/cdam_pl"
    return Path(base).expanduser() / "features"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (torch.dtype, np.dtype)):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise ConfigError(f"cache key: cannot encode {type(obj).__name__} {obj!r} as JSON; pass str/int/float/list/dict")


def _canonical(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    ).encode()


def cache_key(identity: dict, transform_id: str, sample_ids: Sequence[str], extra: dict | None = None) -> str:
    """sha256 hex of everything that determines the cached features.

    Hashes the canonical JSON (sorted keys, no whitespace) of `{"version", "identity", "transform", "extra", "n"}`
    followed by the JSON of each sample id in order (streamed, so millions of ids cost no big string). Put the
    storage dtype and anything else that changes the features (e.g. `{"dtype": "float16"}`) in `extra`.
    """
    ids = sample_ids if isinstance(sample_ids, Sequence) and not isinstance(sample_ids, str) else None
    if ids is None:
        raise ConfigError(f"cache key: sample_ids must be a sequence of ids, got {type(sample_ids).__name__}")
    h = hashlib.sha256()
    meta = {
        "version": FORMAT_VERSION,
        "identity": identity,
        "transform": str(transform_id),
        "extra": extra or {},
        "n": len(ids),
    }
    h.update(_canonical(meta))
    chunk: list[bytes] = []
    for sid in ids:
        chunk.append(_canonical(os.fspath(sid) if isinstance(sid, os.PathLike) else sid))
        if len(chunk) >= 8192:
            h.update(b"\n" + b"\n".join(chunk))
            chunk.clear()
    if chunk:
        h.update(b"\n" + b"\n".join(chunk))
    return h.hexdigest()


def check_dtype(dtype: Any) -> np.dtype:
    """The storage dtype named by `dtype` (a name or numpy dtype in DTYPES); ConfigError for anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise ConfigError(f"feature cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return dt


def _cache_dir(root: str | os.PathLike, key: str) -> Path:
    if not isinstance(key, str) or len(key) < 16 or not all(c in "0123456789abcdef" for c in key):
        raise ConfigError(f"feature cache key must be a lowercase hex digest (see cache_key), got {key!r}")
    return Path(root).expanduser() / key[:16]


# --------------------------------------------------------------------------------------------------------------
# the cache
# --------------------------------------------------------------------------------------------------------------
class FeatureCache:
    """Memory-mapped features [N, D] + int64 labels [N] in a directory `<root>/<key[:16]>/`.

    Build with `FeatureCache.build`, reopen with `FeatureCache.load`; read with `features(indices)` or `loader()`.
    """

    def __init__(self, directory: Path, header: dict, labels: np.ndarray):
        self.path = Path(directory)
        self.key: str = header["key"]
        self.shard_size: int = int(header["shard_size"])
        self._n = int(header["n"])
        self._dim = int(header["dim"])
        self._dtype = np.dtype(header["dtype"])
        self._files = [self.path / sh["features"]["file"] for sh in header["shards"]]
        self._labels = labels
        self._labels.flags.writeable = False
        self._arrays: list[np.ndarray] | None = None

    # --- opening ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, root: str | os.PathLike, key: str, verify: bool | None = None) -> "FeatureCache | None":
        """The complete cache for `key`, or None when missing, incomplete or damaged (damage is warned about).

        Always checks the header and each shard's file sizes and `.npy` headers; `verify=True` also checks every
        byte against the recorded sha256 (default: True when N * D < VERIFY_LIMIT, else False).
        """
        directory = _cache_dir(root, key)
        header, problem = cls._read_header(directory, key)
        if problem is None and header is not None:
            if verify is None:
                verify = header["n"] * header["dim"] < VERIFY_LIMIT
            problem = check_shards(directory, header, verify)
        if problem is not None:
            warnings.warn(f"feature cache {directory} is damaged ({problem}); build() rebuilds it", stacklevel=2)
            return None
        if header is None:
            return None
        labels = np.concatenate(
            [np.load(directory / sh["labels"]["file"], allow_pickle=False) for sh in header["shards"]]
        )
        return cls(directory, header, labels)

    @staticmethod
    def _read_header(directory: Path, key: str) -> tuple[dict | None, str | None]:
        path = directory / HEADER
        if not path.is_file():
            return None, None
        try:
            header = json.loads(path.read_text())
            version = header.get("version")
            if version != FORMAT_VERSION:
                return None, f"format version {version!r}, expected {FORMAT_VERSION}"
            if header.get("key") != key:
                return None, f"header is for key {str(header.get('key'))[:16]}..., not {key[:16]}..."
            n, dim, shard_size, shards = header["n"], header["dim"], header["shard_size"], header["shards"]
            check_dtype(header["dtype"])
            if len(shards) != math.ceil(n / shard_size) or sum(sh["rows"] for sh in shards) != n or dim <= 0:
                return None, "header: shard list does not add up to N"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
            return None, f"header.json unreadable: {type(e).__name__}: {e}"
        return header, None

    # --- building ---------------------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        root: str | os.PathLike,
        key: str,
        dataset,
        extract: Callable[[torch.Tensor], torch.Tensor],
        *,
        dim: int,
        batch_size: int = 64,
        num_workers: int = 0,
        dtype: str = "float32",
        shard_size: int = 4096,
        rank: int = 0,
        world_size: int = 1,
        progress: bool = True,
        verify: bool | None = None,
        wait: float = 24 * 3600.0,
        poll: float = 2.0,
    ) -> "FeatureCache":
        """Load the cache for `key`, or extract it from `dataset` (items `(image, label, ...)`) with `extract`.

        `extract(images) -> [b, dim]` runs under `torch.no_grad()` on unshuffled batches that never cross a shard
        boundary. Shards already finished (marker present, sizes/headers valid, checksums too with `verify`) are
        kept, so an interrupted or damaged build resumes. With `world_size > 1` this rank extracts shards
        `s % world_size == rank`, then polls every `poll` s, up to `wait` s, for the others' shards; the rank that
        sees all shards writes `header.json`. `wait=0` raises `CacheIncomplete` at once when shards are missing.
        (`cdam_pl.features.extract.extract_features` does the same with Lightning prediction on every device.)
        """
        if batch_size <= 0:
            raise ConfigError(f"shard_size and batch_size must be positive, got {shard_size}, {batch_size}")
        plan = cls.prepare_build(root, key, len(dataset), dim=dim, dtype=dtype, shard_size=shard_size, rank=rank,
                                 world_size=world_size, verify=verify)
        if plan.cache is not None:
            return plan.cache
        if plan.todo:
            cls._extract(plan, dataset, extract, batch_size, num_workers, progress and rank == 0)
        return cls.finish_build(plan, wait=wait, poll=poll)

    @classmethod
    def prepare_build(
        cls,
        root: str | os.PathLike,
        key: str,
        n: int,
        *,
        dim: int,
        dtype: str = "float32",
        shard_size: int = 4096,
        rank: int = 0,
        world_size: int = 1,
        verify: bool | None = None,
    ) -> "BuildPlan":
        """What rank `rank` must extract for a cache of `n` samples: first step of `build`.

        Returns a plan whose `cache` is the finished cache when it already exists with this N, D, dtype and shard
        size; otherwise `todo` lists this rank's shards (`s % world_size == rank`) that are missing or damaged,
        after removing the header (the cache is being changed) and temp files a killed run left for them.
        Fill each with `plan.buffer(s)`, then call `finish_build(plan)`.
        """
        dt = check_dtype(dtype)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ConfigError(f"feature cache dim must be a positive int, got {dim!r}")
        if shard_size <= 0:
            raise ConfigError(f"shard_size and batch_size must be positive, got {shard_size}")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if n == 0:
            raise DataError("cannot build a feature cache from an empty dataset")
        directory = _cache_dir(root, key)
        if verify is None:
            verify = n * dim < VERIFY_LIMIT
        config = {"version": FORMAT_VERSION, "key": key, "n": n, "dim": dim, "dtype": dt.name, "shard_size": shard_size}
        plan = BuildPlan(Path(root).expanduser(), directory, config, rank, world_size, todo=[])

        cache = cls.load(root, key, verify=verify)
        if cache is not None:
            if (len(cache), cache.dim, cache.dtype, cache.shard_size) == (n, dim, dt, shard_size):
                plan.cache = cache
                return plan
            warnings.warn(
                f"feature cache {directory} holds N={len(cache)}, D={cache.dim}, {cache.dtype}, "
                f"shard_size={cache.shard_size} but N={n}, D={dim}, {dt}, shard_size={shard_size} was asked for; "
                "rebuilding (put everything that changes the features in the key)",
                stacklevel=3,
            )
        directory.mkdir(parents=True, exist_ok=True)
        mine = [s for s in range(rank, plan.num_shards, world_size)]
        plan.todo = [s for s in mine if shard_entry(directory, s, config, verify) is None]
        if plan.todo:
            done = len(mine) - len(plan.todo)
            if done:
                log.info("feature cache %s: resuming, %d of %d shards of rank %d done", directory, done, len(mine),
                         rank)
            try:
                (directory / HEADER).unlink()
            except FileNotFoundError:
                pass
            clean_temp(directory, plan.todo)
        return plan

    @classmethod
    def finish_build(cls, plan: "BuildPlan", wait: float = 24 * 3600.0, poll: float = 2.0) -> "FeatureCache":
        """Last step of `build`: wait up to `wait` s (polling every `poll` s) until every shard of the plan's cache
        exists, write `header.json` if it is not already there, and open the cache."""
        if plan.cache is not None:
            return plan.cache
        directory, config, key = plan.directory, plan.config, plan.config["key"]
        deadline = time.monotonic() + max(0.0, wait)
        while True:
            entries = [shard_entry(directory, s, config, verify=False) for s in range(plan.num_shards)]
            missing = [s for s, e in enumerate(entries) if e is None]
            if not missing:
                break
            if time.monotonic() >= deadline:
                raise CacheIncomplete(
                    f"feature cache {directory} is incomplete: shards {missing[:8]}{'...' if len(missing) > 8 else ''} "
                    f"of other ranks are missing after {wait:g} s; run the remaining ranks",
                    missing,
                )
            time.sleep(poll)

        header = {**config, "shards": entries}
        if cls._read_header(directory, key)[0] != header:
            atomic_write_bytes(directory / HEADER, json.dumps(header, sort_keys=True, indent=1).encode())
        cache = cls.load(plan.root, key, verify=False)
        if cache is None:  # a concurrent writer damaged it between our checks and now
            raise DataError(f"feature cache {directory} changed while it was being finalised; run again")
        plan.cache = cache
        return cache

    @staticmethod
    def _extract(plan: "BuildPlan", dataset, extract, batch_size, num_workers, progress) -> None:
        loader = DataLoader(dataset, batch_sampler=plan.batches(batch_size), num_workers=num_workers)
        total = sum(b - a for a, b in map(plan.shard_range, plan.todo))
        bar = tqdm(total=total, desc=f"extracting features -> {plan.directory.name}", unit="img", disable=not progress)
        it = iter(loader)
        try:
            for s in plan.todo:
                buf = plan.buffer(s)
                while not buf.full:
                    batch = next(it)
                    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                        raise DataError("feature cache: dataset items must be (image, label, ...) tuples")
                    with torch.no_grad():
                        out = extract(batch[0])
                    buf.add(out, batch[1])
                    bar.update(len(out))
                buf.write()
        finally:
            bar.close()
            del it

    # --- reading ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def dtype(self) -> np.dtype:
        """Storage dtype (float32 or float16); `features()` always returns float32."""
        return self._dtype

    @property
    def labels(self) -> np.ndarray:
        """int64 [N], read-only."""
        return self._labels

    @property
    def num_shards(self) -> int:
        return len(self._files)

    def __repr__(self) -> str:
        return (f"FeatureCache({str(self.path)!r}, N={self._n}, D={self._dim}, {self._dtype.name}, "
                f"{self.num_shards} shards)")

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmaps instead of pickling their contents
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    @property
    def arrays(self) -> list[np.ndarray]:
        """The read-only memmap of each shard, opened on first use."""
        if self._arrays is None:
            # plain ndarray views of the memmaps (np.memmap's Python-level __getitem__ costs more than the read)
            self._arrays = [np.load(f, mmap_mode="r", allow_pickle=False).view(np.ndarray) for f in self._files]
        return self._arrays

    def _indices(self, indices) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise IndexError("feature cache: boolean masks are not supported; pass integer indices")
        if idx.size and not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"feature cache: indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < -self._n or idx.max() >= self._n):
            raise IndexError(f"feature cache index out of range for {self._n} samples")
        return np.where(idx < 0, idx + self._n, idx)

    def features(self, indices: np.ndarray | slice) -> torch.Tensor:
        """float32 tensor [n, D] of the given rows (any order, repeats allowed), gathered shard by shard."""
        if isinstance(indices, slice):
            start, stop, step = indices.indices(self._n)
            if step == 1:
                return self._range(start, max(start, stop))
            indices = np.arange(start, stop, step, dtype=np.int64)
        idx = self._indices(indices)
        out = np.empty((idx.size, self._dim), np.float32)
        if idx.size == 0:
            return torch.from_numpy(out)
        presorted = bool((idx[1:] >= idx[:-1]).all())
        order = None if presorted else np.argsort(idx, kind="stable")
        sidx = idx if presorted else idx[order]
        shard, rows = np.divmod(sidx, self.shard_size)
        cuts = (np.flatnonzero(shard[1:] != shard[:-1]) + 1).tolist()
        dst = out if presorted else np.empty_like(out)
        arrays = self.arrays
        for a, b in zip([0, *cuts], [*cuts, sidx.size]):  # one fancy-index read per shard touched
            dst[a:b] = arrays[shard[a]][rows[a:b]]
        if not presorted:
            out[order] = dst
        return torch.from_numpy(out)

    def _range(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as contiguous reads, shard by shard."""
        out = np.empty((stop - start, self._dim), np.float32)
        arrays, size = self.arrays, self.shard_size
        i = start
        while i < stop:
            s, r = divmod(i, size)
            k = min(stop - i, size - r)
            out[i - start : i - start + k] = arrays[s][r : r + k]
            i += k
        return torch.from_numpy(out)

    def loader(
        self,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        epoch_seed_fn: Callable[[], int] | None = None,
        *,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> "FeatureLoader":
        """A DataLoader yielding `(features float32 [b, D], labels int64 [b])` batches.

        Each iteration is one epoch: a permutation seeded by `(seed, epoch)` (or index order when not shuffling) cut
        into batches, indices sorted within a batch. The epoch is `epoch_seed_fn()` when given (pass
        `lambda: trainer.current_epoch` for exact resumes) else a counter that starts at 0 and advances on each
        `iter()`. Under torch.distributed (or explicit `rank`/`world_size`) each rank gets every world_size-th
        batch, the same count on every rank (padded by wrapping around unless drop_last).
        """
        ds = BatchedFeatureDataset(self, batch_size, shuffle, seed, drop_last, rank=rank, world_size=world_size)
        return FeatureLoader(ds, epoch_seed_fn=epoch_seed_fn, num_workers=num_workers)


class ShardBuffer:
    """One shard's rows, filled batch by batch in sample order, then written with `write()` (see `write_shard`)."""

    def __init__(self, directory: Path, s: int, config: dict):
        self.directory, self.index, self.config = directory, s, config
        rows = min(config["shard_size"], config["n"] - s * config["shard_size"])
        self.features = np.empty((rows, config["dim"]), np.dtype(config["dtype"]))  # [rows, D]
        self.labels = np.empty(rows, np.int64)  # [rows]
        self.filled = 0

    @property
    def full(self) -> bool:
        return self.filled == len(self.labels)

    def add(self, out: torch.Tensor, labels) -> None:
        """Append the next batch: features `out` [k, D] (any float dtype/device) and integer labels [k]."""
        y = torch.as_tensor(labels)
        k, dim, dtype = len(y), self.config["dim"], self.features.dtype
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (k, dim):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"feature cache: extract returned {got} for {k} images, expected ({k}, {dim})")
        if y.is_floating_point() or y.is_complex() or y.ndim != 1:
            raise DataError(f"feature cache: labels must be integer scalars, got {y.dtype} {tuple(y.shape)}")
        if self.filled + k > len(self.labels):
            raise DataError(f"feature cache: batch of {k} overflows shard {self.index} "
                            f"({self.filled} of {len(self.labels)} rows filled)")
        x = out.detach().float().cpu().numpy().astype(dtype, copy=False)
        if not np.isfinite(x).all():
            row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            first = self.index * self.config["shard_size"] + self.filled + row  # dataset index of the first bad row
            overflow = bool(torch.isfinite(out[row]).all())  # finite before the cast: float16 storage overflowed
            fix = "use cache.dtype=float32" if overflow else "check backbone.weights (the backbone gives NaN/Inf)"
            raise DataError(f"feature cache: non-finite (NaN/Inf) features for sample {first} (shard {self.index}); "
                            f"{fix}")
        self.features[self.filled : self.filled + k] = x
        self.labels[self.filled : self.filled + k] = y.cpu().numpy()
        self.filled += k

    def write(self) -> None:
        if not self.full:
            raise DataError(f"feature cache: shard {self.index} has {self.filled} of {len(self.labels)} rows")
        write_shard(self.directory, self.index, self.features, self.labels, self.config)


@dataclass
class BuildPlan:
    """One rank's share of a cache build (from `FeatureCache.prepare_build`; finished by `finish_build`)."""

    root: Path
    directory: Path
    config: dict  # version, key, n, dim, dtype, shard_size: what every shard marker and the header record
    rank: int
    world_size: int
    todo: list[int]  # this rank's shards still to extract, ascending
    cache: FeatureCache | None = None  # the finished cache, once there is one

    @property
    def num_shards(self) -> int:
        return math.ceil(self.config["n"] / self.config["shard_size"])

    def shard_range(self, s: int) -> tuple[int, int]:
        """Sample indices `[a, b)` of shard `s`."""
        size = self.config["shard_size"]
        return s * size, min(self.config["n"], (s + 1) * size)

    def batches(self, batch_size: int) -> list[list[int]]:
        """Dataset indices of the `todo` shards in order, cut into batches that never cross a shard boundary."""
        return [list(range(i, min(i + batch_size, b))) for a, b in map(self.shard_range, self.todo)
                for i in range(a, b, batch_size)]

    def buffer(self, s: int) -> ShardBuffer:
        return ShardBuffer(self.directory, s, self.config)
