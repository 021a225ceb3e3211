"""Reading stored explanations back: `load_explanations(out_dir)` maps each image's path, as the manifest names
it, to a `StoredExplanation` whose maps are read from the shards only when asked for.

    ex = load_explanations("explained")
    entry = ex["photos/cat.jpg"]
    entry.maps["cdam"]          # float32 [R, gh, gw]; entry.rows["cdam"] says what each row explains
    entry.targets, entry.target_names, entry.logits, entry.concepts, entry.concept_scores, entry.record

Reads the shards of `maps/` (see `cdam_pl.store.shards`) and the single `maps.npz` of folders written before
explanations were sharded. A few shard files stay open at a time, so iterating over a run of any size holds one
shard's header, not the run.
"""
from __future__ import annotations

import io
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors import safe_open

from cdam_pl.errors import DataError
from cdam_pl.store.shards import INDEX_FILE, MAPS_DIR, RUN_FILE, STORE_FORMAT

__all__ = ["Explanations", "StoredExplanation", "load_explanations", "npz_bytes"]

OLD_MAPS = "maps.npz"  # the single file of folders written before explanations were sharded


def npz_bytes(arrays: Mapping[str, Any]) -> bytes:
    """An `.npz` file (no pickles: object arrays are refused) as bytes: the raw downloads' format."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    bad = [k for k, v in arrays.items() if v.dtype == object]
    if bad:
        raise TypeError(f"npz_bytes: {bad[0]!r} is an object array; raw files hold numbers and strings only")
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


class _Cache:
    """At most `size` values by key, least recently used dropped first; thread-safe."""

    def __init__(self, load: Callable[[Any], Any], size: int):
        self.load, self.size = load, size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, key: Any) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = self.load(key)
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class _Shards:
    """The sharded format: maps/index.json, then each shard's tensors and marker on demand."""

    def __init__(self, folder: Path, index: dict[str, Any]):
        self.folder = folder
        self.shards = index["shards"]
        self.classes, self.concepts = list(index["classes"]), list(index["concepts"])
        self.methods, self.dtype = [m["name"] for m in index["methods"]], index["dtype"]
        self.where = {path: (k, int(i)) for k, sh in enumerate(self.shards) for i, path in sh["images"]}
        self.order = [path for sh in self.shards for _, path in sh["images"]]  # shards hold ascending indices
        self._tensors = _Cache(lambda k: safe_open(str(folder / self.shards[k]["file"]), framework="numpy"), 4)
        self._markers = _Cache(self._read_marker, 2)

    def _read_marker(self, k: int) -> dict[int, dict[str, Any]]:
        path = self.folder / self.shards[k]["marker"]
        try:
            marker = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} ({e}); run the explain command again to redo the shard") from None
        return {int(r["index"]): r for r in marker["images"]}

    def index(self, path: str) -> int:
        return self.where[path][1]

    def array(self, path: str, key: str) -> np.ndarray | None:
        k, i = self.where[path]
        f = self._tensors(k)
        name = f"{i}/{key}"
        return f.get_tensor(name) if name in f.keys() else None

    def record(self, path: str) -> dict[str, Any]:
        k, i = self.where[path]
        return self._markers(k)[i]

    def rows(self, path: str) -> dict[str, list[str]]:
        return {m: list(info["rows"]) for m, info in self.record(path)["maps"].items()}


class _Npz:
    """The single maps.npz of folders written before explanations were sharded (plus their manifest.json)."""

    def __init__(self, folder: Path):
        self.z = np.load(folder / OLD_MAPS, allow_pickle=False)
        self.classes, self.concepts = [str(c) for c in self.z["classes"]], [str(c) for c in self.z["concepts"]]
        self.methods, self.dtype = [str(m) for m in self.z["methods"]], "float32"
        self.where = {str(p): int(i) for p, i in zip(self.z["images"], self.z["index"])}
        self.order = list(self.where)  # maps.npz lists its images in index order
        manifest = folder / "manifest.json"
        self.records = ({r["path"]: r for r in json.loads(manifest.read_text())["images"]} if manifest.is_file()
                        else {})
        self.lock = threading.Lock()  # NpzFile reads through one file handle

    def index(self, path: str) -> int:
        return self.where[path]

    def array(self, path: str, key: str) -> np.ndarray | None:
        name = f"{self.where[path]}/{key}"
        with self.lock:
            return self.z[name] if name in self.z.files else None

    def record(self, path: str) -> dict[str, Any] | None:
        return self.records.get(path)

    def rows(self, path: str) -> dict[str, list[str]]:
        with self.lock:
            return {m: [str(r) for r in self.z[f"{self.where[path]}/{m}/rows"]] for m in self.methods}


class StoredExplanation:
    """One explained image (`index`: its position in the run's sorted input list).

    `maps`: method -> float32 [R, gh, gw] (rows: `rows[method]`, e.g. 'class:cat', 'concept:stripes', 'image');
    `targets` int64 [K] (class indices, `target_names` their names); `logits` float32 [C] over `classes`;
    `concept_scores` float32 [M] over `concepts` (None without concepts); `record`: the image's manifest entry
    (None for an old folder without manifest.json). Each is read on first use."""

    def __init__(self, source, path: str):
        self._source, self.path, self.index = source, path, source.index(path)
        self.classes: list[str] = source.classes
        self.concepts: list[str] = source.concepts
        self.methods: list[str] = source.methods

    def __repr__(self) -> str:
        return f"StoredExplanation({self.path!r}, methods={self.methods})"

    @cached_property
    def maps(self) -> dict[str, np.ndarray]:
        return {m: self._source.array(self.path, m).astype(np.float32) for m in self.methods}

    @cached_property
    def rows(self) -> dict[str, list[str]]:
        return self._source.rows(self.path)

    @cached_property
    def logits(self) -> np.ndarray:
        return self._source.array(self.path, "logits").astype(np.float32)

    @cached_property
    def targets(self) -> np.ndarray:
        return self._source.array(self.path, "targets").astype(np.int64)

    @property
    def target_names(self) -> list[str]:
        return [self.classes[int(t)] for t in self.targets]

    @cached_property
    def concept_scores(self) -> np.ndarray | None:
        scores = self._source.array(self.path, "concept_scores")
        return None if scores is None else scores.astype(np.float32)

    @cached_property
    def record(self) -> dict[str, Any] | None:
        return self._source.record(self.path)


class Explanations(Mapping):
    """Image path (as the manifest names it) -> `StoredExplanation`, in the order the images were listed.

    `classes`, `concepts` and `methods` are the run's; `dtype` is how the maps are stored (they are always
    returned as float32); `format` is STORE_FORMAT, or "maps.npz" for a folder written before sharding."""

    def __init__(self, source, format: str):
        self._source, self.format = source, format
        self.classes, self.concepts, self.methods, self.dtype = (source.classes, source.concepts, source.methods,
                                                                 source.dtype)
        self._paths = source.order

    def __getitem__(self, path: str) -> StoredExplanation:
        if path not in self._source.where:
            raise KeyError(path)
        return StoredExplanation(self._source, path)

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        return f"Explanations({len(self)} images, methods={self.methods}, format={self.format!r})"


def load_explanations(out_dir: str | os.PathLike) -> Explanations:
    """The explanations explain.py wrote into `out_dir`, read lazily: see the module docstring."""
    folder = Path(out_dir).expanduser()
    index_path = folder / MAPS_DIR / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {index_path} ({e}); run the explain command again to rewrite it") from None
        if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
            raise DataError(f"{index_path} is not a {STORE_FORMAT} index; read it with the cdam-pl version that "
                            "wrote it")
        return Explanations(_Shards(folder / MAPS_DIR, index), STORE_FORMAT)
    if (folder / OLD_MAPS).is_file():
        return Explanations(_Npz(folder), OLD_MAPS)
    if (folder / MAPS_DIR / RUN_FILE).is_file():
        raise DataError(f"{folder} holds an unfinished explain run (no {MAPS_DIR}/{INDEX_FILE} yet); run the same "
                        "command again to finish it")
    raise DataError(f"{folder} holds no explanations (neither {MAPS_DIR}/{INDEX_FILE} nor {OLD_MAPS}); point to a "
                    "folder written by explain.py")
