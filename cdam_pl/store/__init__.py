"""Stored explanations: the raw maps explain.py streams to disk (shards of safetensors with JSON markers and an
index, written so that a killed run resumes) and `load_explanations`, the one way to read them back, used by the
explain command's manifest and gallery and by users' own code.

    from cdam_pl import load_explanations
    ex = load_explanations("explained")          # path -> StoredExplanation, read lazily
    maps = ex["photos/cat.jpg"].maps["cdam"]     # float32 [R, gh, gw]

`shards` is the file format and its writer (`RunFolder`), `reader` the reading side. Inside `cdam_pl`, import
from those modules; this face re-exports their public names for users.
"""
from cdam_pl.store.reader import Explanations, StoredExplanation, load_explanations, npz_bytes
from cdam_pl.store.shards import DEFAULT_SHARD_SIZE, MAP_DTYPES, MAPS_LAYOUT, MAX_SHARD_SIZE, STORE_FORMAT, RunFolder

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "MAPS_LAYOUT",
    "MAP_DTYPES",
    "MAX_SHARD_SIZE",
    "STORE_FORMAT",
    "Explanations",
    "RunFolder",
    "StoredExplanation",
    "load_explanations",
    "npz_bytes",
]
