"""Feature cache: exactness, reuse, damage detection, resume, multi-rank builds and the batched loader."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cdam_pl.errors import ConfigError, DataError
from cdam_pl.features import BatchedFeatureDataset, CacheIncomplete, FeatureCache, cache_key, default_cache_root
from tests.conftest import tiny_backbone

N, SHARD, BS = 23, 5, 2  # 5 shards (last one has 3 rows); batches of 2 inside each shard
NUM_SHARDS = 5


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone("p16")


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 32, 48, generator=g)
    labels = torch.randint(0, 7, (N,), generator=g)
    return images, labels


def key_for(tag: str = "a") -> str:
    return cache_key({"name": "tiny", "tag": tag}, "t0", [f"img/{i}" for i in range(N)])


class Extractor:
    """Wraps the backbone; records which samples it saw (by their first pixel) and can fail on a given call."""

    def __init__(self, backbone, images, fail_on_call: int | None = None):
        self.backbone, self.fail_on_call = backbone, fail_on_call
        self.pixel_to_index = {float(v): i for i, v in enumerate(images[:, 0, 0, 0])}
        self.calls, self.seen = 0, []

    def __call__(self, x):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise RuntimeError("interrupted")
        assert not torch.is_grad_enabled()
        self.seen += [self.pixel_to_index[float(v)] for v in x[:, 0, 0, 0]]
        return self.backbone(x)

    def shards(self):
        return sorted({i // SHARD for i in self.seen})


def reference(backbone, images):
    """Backbone outputs computed with the same batches the build uses (shard-aligned, batch size BS)."""
    out = []
    with torch.no_grad():
        for s in range(0, N, SHARD):
            for a in range(s, min(s + SHARD, N), BS):
                out.append(backbone(images[a : min(a + BS, s + SHARD, N)]))
    return torch.cat(out)


def build(root, key, data, extract, **kw):
    kw = {"dim": 64, "batch_size": BS, "shard_size": SHARD, "progress": False, **kw}
    return FeatureCache.build(root, key, TensorDataset(*data), extract, **kw)


# --- exactness and reuse --------------------------------------------------------------------------------------
def test_float32_features_equal_backbone_outputs(tmp_path, backbone, data):
    ex = Extractor(backbone, data[0])
    cache = build(tmp_path, key_for(), data, ex)
    ref = reference(backbone, data[0])
    assert len(cache) == N and cache.dim == 64 and cache.dtype == "float32" and cache.num_shards == NUM_SHARDS
    assert sorted(ex.seen) == list(range(N))
    assert torch.equal(cache.features(slice(None)), ref)
    assert cache.labels.dtype == np.int64 and np.array_equal(cache.labels, data[1].numpy())
    # and close to a single whole-batch forward (batching only changes rounding)
    with torch.no_grad():
        torch.testing.assert_close(cache.features(np.arange(N)), backbone(data[0]), rtol=1e-5, atol=1e-5)
    assert cache.path == tmp_path / key_for()[:16] and (cache.path / "header.json").is_file()


def test_float16_features_are_rounded_backbone_outputs(tmp_path, backbone, data):
    cache = build(tmp_path, key_for(), data, Extractor(backbone, data[0]), dtype="float16")
    ref = reference(backbone, data[0])
    assert cache.dtype == np.float16
    got = cache.features(slice(None))
    assert got.dtype == torch.float32 and torch.equal(got, ref.half().float())
    assert np.load(cache.path / "shard_00000.npy").dtype == np.float16


def test_second_build_reuses_cache_and_new_key_makes_new_cache(tmp_path, backbone, data):
    first = build(tmp_path, key_for(), data, Extractor(backbone, data[0]))
    again = Extractor(backbone, data[0])
    second = build(tmp_path, key_for(), data, again)
    assert again.calls == 0
    assert torch.equal(second.features(slice(None)), first.features(slice(None)))
    assert FeatureCache.load(tmp_path, key_for()) is not None
    assert FeatureCache.load(tmp_path, key_for("other")) is None

    other = Extractor(backbone, data[0])
    third = build(tmp_path, key_for("other"), data, other)
    assert other.calls > 0 and third.path != first.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([key_for()[:16], key_for("other")[:16]])


def test_bad_options_are_config_errors(tmp_path, backbone, data):
    with pytest.raises(ConfigError, match="dtype"):
        build(tmp_path, key_for(), data, Extractor(backbone, data[0]), dtype="bfloat16")
    with pytest.raises(ConfigError, match="rank"):
        build(tmp_path, key_for(), data, Extractor(backbone, data[0]), rank=2, world_size=2)
    with pytest.raises(ConfigError, match="hex"):
        build(tmp_path, "not a key", data, Extractor(backbone, data[0]))
    with pytest.raises(DataError, match=r"expected \(2, 32\)"):
        build(tmp_path, key_for(), data, Extractor(backbone, data[0]), dim=32)
    with pytest.raises(DataError, match="empty"):
        FeatureCache.build(tmp_path, key_for(), TensorDataset(torch.zeros(0, 3)), lambda x: x, dim=3)


# --- damage and resume ----------------------------------------------------------------------------------------
def test_truncated_shard_is_detected_and_only_it_is_rebuilt(tmp_path, backbone, data):
    cache = build(tmp_path, key_for(), data, Extractor(backbone, data[0]))
    ref = cache.features(slice(None)).clone()
    shard = cache.path / "shard_00003.npy"
    del cache
    shard.write_bytes(shard.read_bytes()[:-10])

    with pytest.warns(UserWarning, match=r"is damaged \(shard 3: features size mismatch"):
        assert FeatureCache.load(tmp_path, key_for()) is None
    ex = Extractor(backbone, data[0])
    with pytest.warns(UserWarning, match="shard 3"):
        rebuilt = build(tmp_path, key_for(), data, ex)
    assert ex.shards() == [3]
    assert torch.equal(rebuilt.features(slice(None)), ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FeatureCache.load(tmp_path, key_for()) is not None


def test_corrupted_byte_is_detected_with_verify_and_rebuilt(tmp_path, backbone, data):
    cache = build(tmp_path, key_for(), data, Extractor(backbone, data[0]))
    ref = cache.features(slice(None)).clone()
    shard = cache.path / "shard_00001.npy"
    del cache
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0xFF  # flip one byte of the feature data: same size, same header
    shard.write_bytes(bytes(raw))

    assert FeatureCache.load(tmp_path, key_for(), verify=False) is not None  # sizes + headers only: not seen
    with pytest.warns(UserWarning, match=r"shard 1: features checksum mismatch"):
        assert FeatureCache.load(tmp_path, key_for(), verify=True) is None
    with pytest.warns(UserWarning, match=r"checksum"):
        assert FeatureCache.load(tmp_path, key_for()) is None  # small cache: verify defaults to True
    ex = Extractor(backbone, data[0])
    with pytest.warns(UserWarning):
        rebuilt = build(tmp_path, key_for(), data, ex, verify=True)
    assert ex.shards() == [1]
    assert torch.equal(rebuilt.features(slice(None)), ref)


def test_damaged_header_is_detected(tmp_path, backbone, data):
    cache = build(tmp_path, key_for(), data, Extractor(backbone, data[0]))
    header = cache.path / "header.json"
    h = json.loads(header.read_text())
    h["version"] = 99
    header.write_text(json.dumps(h))
    with pytest.warns(UserWarning, match="format version 99"):
        assert FeatureCache.load(tmp_path, key_for()) is None
    header.write_text(json.dumps({**h, "version": 1, "shards": [{"rows": 5}] * 4 + [{"rows": 3}]}))
    with pytest.warns(UserWarning, match="shard 0: header entry inconsistent"):
        assert FeatureCache.load(tmp_path, key_for()) is None
    header.write_text("{not json")
    with pytest.warns(UserWarning, match="header.json unreadable"):
        assert FeatureCache.load(tmp_path, key_for()) is None
    ex = Extractor(backbone, data[0])
    with pytest.warns(UserWarning):
        build(tmp_path, key_for(), data, ex)
    assert ex.calls == 0  # shards were fine; only the header was rewritten
    assert FeatureCache.load(tmp_path, key_for()) is not None


def test_interrupted_build_resumes_from_finished_shards(tmp_path, backbone, data):
    calls_per_shard = SHARD // BS + 1  # 3 batches per full shard
    ex = Extractor(backbone, data[0], fail_on_call=2 * calls_per_shard + 2)  # dies inside shard 2
    with pytest.raises(RuntimeError, match="interrupted"):
        build(tmp_path, key_for(), data, ex)
    assert ex.shards() == [0, 1, 2]  # shard 2 was started but not written
    directory = tmp_path / key_for()[:16]
    assert sorted(p.name for p in directory.glob("*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert not list(directory.glob("*.tmp"))
    assert FeatureCache.load(tmp_path, key_for()) is None  # incomplete: no header, no warning

    resumed = Extractor(backbone, data[0])
    cache = build(tmp_path, key_for(), data, resumed)
    assert resumed.shards() == [2, 3, 4] and sorted(resumed.seen) == list(range(2 * SHARD, N))
    assert torch.equal(cache.features(slice(None)), reference(backbone, data[0]))


def test_changed_build_config_under_same_key_rebuilds(tmp_path, backbone, data):
    build(tmp_path, key_for(), data, Extractor(backbone, data[0]))
    ex = Extractor(backbone, data[0])
    with pytest.warns(UserWarning, match="rebuilding"):
        cache = build(tmp_path, key_for(), data, ex, dtype="float16")
    assert ex.shards() == list(range(NUM_SHARDS)) and cache.dtype == np.float16


# --- distributed build ----------------------------------------------------------------------------------------
def test_two_ranks_extract_disjoint_shards_and_match_single_rank(tmp_path, backbone, data):
    ex0, ex1 = Extractor(backbone, data[0]), Extractor(backbone, data[0])
    with pytest.raises(CacheIncomplete) as info:
        build(tmp_path / "ddp", key_for(), data, ex0, rank=0, world_size=2, wait=0)
    assert info.value.missing == [1, 3]
    one = build(tmp_path / "ddp", key_for(), data, ex1, rank=1, world_size=2, wait=0)
    assert ex0.shards() == [0, 2, 4] and ex1.shards() == [1, 3]
    assert sorted(ex0.seen + ex1.seen) == list(range(N))

    late = Extractor(backbone, data[0])
    zero = build(tmp_path / "ddp", key_for(), data, late, rank=0, world_size=2, wait=0)
    assert late.calls == 0 and len(zero) == N

    single = build(tmp_path / "single", key_for(), data, Extractor(backbone, data[0]))
    assert torch.equal(one.features(slice(None)), single.features(slice(None)))
    assert np.array_equal(one.labels, single.labels)
    for name in ["header.json"] + [f"shard_{s:05d}.npy" for s in range(NUM_SHARDS)]:
        assert (one.path / name).read_bytes() == (single.path / name).read_bytes()


# --- reading --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_cache(tmp_path_factory):
    """A cache whose feature row i starts with i, so batches reveal their indices (N=103, shards of 10)."""
    n, d = 103, 6
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    y = torch.arange(n) % 4
    root = tmp_path_factory.mktemp("idx")
    key = cache_key({"name": "index"}, "none", [str(i) for i in range(n)])
    cache = FeatureCache.build(root, key, TensorDataset(x, y), lambda b: b, dim=d, shard_size=10, batch_size=7,
                               progress=False)
    return cache, x, y


def epoch_indices(loader):
    return [feats[:, 0].long().tolist() for feats, _ in loader]


def test_features_match_fancy_indexing(index_cache):
    cache, x, _ = index_cache
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(cache), size=300)  # unsorted, with repeats, across all shards
    assert torch.equal(cache.features(idx), x[torch.from_numpy(idx)])
    assert torch.equal(cache.features(np.array([-1, 0, -103])), x[[102, 0, 0]])
    assert torch.equal(cache.features(torch.tensor([5, 15, 25])), x[[5, 15, 25]])
    assert torch.equal(cache.features(slice(8, 31)), x[8:31])
    assert torch.equal(cache.features(slice(100, 3, -7)), torch.from_numpy(x.numpy()[100:3:-7].copy()))
    assert cache.features(np.array([], dtype=np.int64)).shape == (0, 6)
    with pytest.raises(IndexError):
        cache.features(np.array([103]))


def test_loader_covers_each_index_once_per_epoch_with_seeded_orders(index_cache):
    cache, x, y = index_cache
    loader = cache.loader(batch_size=16, shuffle=True, seed=5)
    assert len(loader) == 7
    epochs = [epoch_indices(loader) for _ in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(len(cache)))
        assert all(b == sorted(b) for b in batches)
        assert [len(b) for b in batches] == [16] * 6 + [7]
    flat = [[i for b in batches for i in b] for batches in epochs]
    assert flat[0] != flat[1] != flat[2] != flat[0]

    again = cache.loader(batch_size=16, shuffle=True, seed=5)
    assert [epoch_indices(again) for _ in range(3)] == epochs
    assert epoch_indices(cache.loader(batch_size=16, shuffle=True, seed=6)) != epochs[0]
    assert epoch_indices(cache.loader(16, True, seed=5, epoch_seed_fn=lambda: 2)) == epochs[2]
    again.set_epoch(1)
    assert epoch_indices(again) == epochs[1]

    for feats, labels in cache.loader(batch_size=16, shuffle=True):
        idx = feats[:, 0].long()
        assert feats.dtype == torch.float32 and labels.dtype == torch.int64
        assert torch.equal(feats, x[idx]) and torch.equal(labels, y[idx])


def test_loader_without_shuffle_and_drop_last(index_cache):
    cache, _, _ = index_cache
    assert [i for b in epoch_indices(cache.loader(10, shuffle=False)) for i in b] == list(range(103))
    dropped = cache.loader(10, shuffle=True, drop_last=True)
    batches = epoch_indices(dropped)
    assert len(dropped) == len(batches) == 10 and all(len(b) == 10 for b in batches)
    assert len({i for b in batches for i in b}) == 100


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_ranks_take_disjoint_equal_slices(index_cache, drop_last):
    cache, _, _ = index_cache
    full = epoch_indices(cache.loader(8, shuffle=True, seed=1, drop_last=drop_last))  # 13 batches (12 if dropped)
    per_rank = [epoch_indices(cache.loader(8, True, seed=1, drop_last=drop_last, rank=r, world_size=3))
                for r in range(3)]
    counts = {len(b) for b in per_rank}
    assert counts == {len(full) // 3 if drop_last else -(-len(full) // 3)}
    for r, batches in enumerate(per_rank):
        assert batches[: len(full[r::3])] == full[r::3][: len(batches)]
    seen = [tuple(b) for batches in per_rank for b in batches]
    if drop_last:
        assert len(set(seen)) == len(seen) == 12  # disjoint, all kept batches
    else:
        assert set(seen) == {tuple(b) for b in full} and len(seen) == 15  # 2 padding batches wrap around


def test_loader_reads_rank_from_torch_distributed(index_cache, monkeypatch):
    cache, _, _ = index_cache
    explicit = epoch_indices(cache.loader(8, True, seed=1, rank=1, world_size=2))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    loader = cache.loader(8, True, seed=1)
    assert len(loader) == 7 and epoch_indices(loader) == explicit


def test_loader_with_workers_matches_main_process(index_cache):
    cache, _, _ = index_cache
    main = cache.loader(8, True, seed=2)
    workers = cache.loader(8, True, seed=2, num_workers=2)
    assert [epoch_indices(workers) for _ in range(2)] == [epoch_indices(main) for _ in range(2)]


def test_lightning_trains_on_loader_with_new_order_each_epoch(index_cache):
    import lightning as L

    cache, _, _ = index_cache

    class Head(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 4)
            self.seen: dict[int, list[int]] = {}

        def training_step(self, batch, _):
            x, y = batch
            self.seen.setdefault(self.current_epoch, []).extend(x[:, 0].long().tolist())
            return torch.nn.functional.cross_entropy(self.lin(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    head = Head()
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loader = cache.loader(16, shuffle=True, seed=0, epoch_seed_fn=lambda: trainer.current_epoch)
        trainer.fit(head, loader)
    assert sorted(head.seen) == [0, 1, 2]
    assert all(sorted(v) == list(range(103)) for v in head.seen.values())
    assert head.seen[0] != head.seen[1] != head.seen[2]
    assert head.seen[1] == [i for b in epoch_indices(cache.loader(16, True, epoch_seed_fn=lambda: 1)) for i in b]


def test_pickled_cache_reopens_memmaps(index_cache):
    import pickle

    cache, x, _ = index_cache
    cache.features([0])  # open the memmaps
    blob = pickle.dumps(cache)
    assert len(blob) < 10_000  # paths and labels, not feature data
    assert torch.equal(pickle.loads(blob).features(slice(None)), x)
    ds = BatchedFeatureDataset(cache, 8, False)
    assert len(pickle.dumps(ds)) < 10_000


# --- keys -----------------------------------------------------------------------------------------------------
def test_cache_key_covers_everything_and_is_canonical():
    ident = {"name": "vit", "sha256": "ab", "img_size": [224, 224]}
    ids = ["a.jpg", "b.jpg"]
    k = cache_key(ident, "t", ids, {"dtype": "float16", "x": 1})
    assert len(k) == 64 and all(c in "0123456789abcdef" for c in k)
    assert k == cache_key(dict(reversed(list(ident.items()))), "t", tuple(ids), {"x": 1, "dtype": "float16"})
    variants = [
        cache_key({**ident, "sha256": "cd"}, "t", ids, {"dtype": "float16", "x": 1}),
        cache_key(ident, "t2", ids, {"dtype": "float16", "x": 1}),
        cache_key(ident, "t", ids[::-1], {"dtype": "float16", "x": 1}),
        cache_key(ident, "t", ids + ["c.jpg"], {"dtype": "float16", "x": 1}),
        cache_key(ident, "t", ids, {"dtype": "float32", "x": 1}),
        cache_key(ident, "t", ids),
    ]
    assert len({k, *variants}) == len(variants) + 1
    with pytest.raises(ConfigError):
        cache_key(ident, "t", ids, {"bad": object()})


def test_default_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CDAM_PL_CACHE", str(tmp_path))
    assert default_cache_root() == tmp_path / "features"
    monkeypatch.delenv("CDAM_PL_CACHE")
    assert default_cache_root().parts[-3:] == (".cache", "cdam_pl", "features")
