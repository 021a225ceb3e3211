"""Frozen-backbone features cached on disk: keys, the memory-mapped cache, its loader, and extraction as
Lightning prediction."""
from cdam_pl.features.cache import (
    DTYPES,
    FORMAT_VERSION,
    VERIFY_LIMIT,
    BuildPlan,
    CacheIncomplete,
    FeatureCache,
    ShardBuffer,
    cache_key,
    check_dtype,
    default_cache_root,
)
from cdam_pl.features.extract import (
    TRAINER_KEYS,
    CacheShardWriter,
    FeatureExtraction,
    ShardedExtractionData,
    extract_features,
)
from cdam_pl.features.loader import BatchedFeatureDataset, FeatureLoader

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "TRAINER_KEYS",
    "VERIFY_LIMIT",
    "BatchedFeatureDataset",
    "BuildPlan",
    "CacheIncomplete",
    "CacheShardWriter",
    "FeatureCache",
    "FeatureExtraction",
    "FeatureLoader",
    "ShardBuffer",
    "ShardedExtractionData",
    "cache_key",
    "check_dtype",
    "default_cache_root",
    "extract_features",
]
