"""Feature extraction as Lightning prediction: same bytes as FeatureCache.build, per-rank shards, resume, DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from cdam_pl.errors import ConfigError, DataError
from cdam_pl.features import (
    CacheIncomplete,
    CacheShardWriter,
    FeatureCache,
    ShardedExtractionData,
    cache_key,
    extract_features,
)
from tests.conftest import tiny_backbone

ROOT = Path(__file__).resolve().parents[1]
N, SHARD, BS = 23, 5, 2  # 5 shards (the last has 3 rows), batches of 2 inside each shard
CPU1 = {"accelerator": "cpu", "devices": 1}


@pytest.fixture(scope="module")
def backbone():
    return tiny_backbone("p16")


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 3, 32, 48, generator=g), torch.randint(0, 7, (N,), generator=g))


KEY = cache_key({"name": "tiny-extract"}, "t0", [f"img/{i}" for i in range(N)])


def extract(root, dataset, backbone, **kw):
    kw = {"batch_size": BS, "shard_size": SHARD, "progress": False, "trainer_kwargs": CPU1, **kw}
    return extract_features(root, KEY, dataset, backbone, **kw)


def build(root, dataset, backbone, **kw):
    kw = {"dim": 64, "batch_size": BS, "shard_size": SHARD, "progress": False, **kw}
    return FeatureCache.build(root, KEY, dataset, backbone, **kw)


class Recording(torch.nn.Module):
    """Wraps the backbone; records which samples it saw (by their first pixel) and can fail on a given call."""

    def __init__(self, backbone, images, fail_on_call: int | None = None):
        super().__init__()
        self.backbone, self.feature_dim, self.fail_on_call = backbone, backbone.feature_dim, fail_on_call
        self.pixel_to_index = {float(v): i for i, v in enumerate(images[:, 0, 0, 0])}
        self.calls, self.seen = 0, []

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("interrupted")
        self.seen += [self.pixel_to_index[float(v)] for v in x[:, 0, 0, 0]]
        return self.backbone(x)

    def shards(self):
        return sorted({i // SHARD for i in self.seen})


def files(cache_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cache_dir.iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_one_cpu_device_writes_the_same_bytes_as_build(tmp_path, backbone, dataset, dtype):
    ref = build(tmp_path / "build", dataset, backbone, dtype=dtype)
    got = extract(tmp_path / "predict", dataset, backbone, dtype=dtype)
    names = ["header.json"] + [f"shard_{s:05d}{ext}" for s in range(5) for ext in (".npy", ".labels.npy", ".json")]
    assert sorted(files(got.path)) == sorted(names)
    assert files(got.path) == files(ref.path)
    with torch.no_grad():
        direct = backbone(dataset.tensors[0][:BS])  # the first batch, straight through the backbone
    assert torch.equal(got.features(slice(0, BS)), direct.to(getattr(torch, dtype)).float())


def test_each_rank_predicts_only_its_unfinished_shards_in_shard_aligned_batches(tmp_path, backbone, dataset):
    with pytest.raises(CacheIncomplete):  # rank 1 of 2 finishes shards 1 and 3, then finds 0, 2, 4 missing
        build(tmp_path, dataset, backbone, rank=1, world_size=2, wait=0)
    plans = {}
    for rank in (0, 1):
        data = ShardedExtractionData(tmp_path, KEY, dataset, dim=64, shard_size=SHARD, batch_size=BS)
        data.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        data.setup("predict")
        plans[rank] = (data.plan.todo, [list(b) for b in data.predict_dataloader().batch_sampler])
    todo0, batches0 = plans[0]
    assert todo0 == [0, 2, 4] and plans[1] == ([], [])  # rank 1's shards are on disk: nothing left for it
    assert [i for b in batches0 for i in b] == [*range(0, 5), *range(10, 15), *range(20, 23)]
    assert all(len(b) <= BS and len({i // SHARD for i in b}) == 1 for b in batches0)
    assert batches0[:3] == [[0, 1], [2, 3], [4]]  # a shard's last batch is cut short rather than cross into the next


def test_interrupted_extraction_resumes_from_finished_shards(tmp_path, backbone, dataset):
    images = dataset.tensors[0]
    flaky = Recording(backbone, images, fail_on_call=8)  # shards 0-1 take 3 batches each; dies inside shard 2
    with pytest.raises(RuntimeError, match="interrupted"):
        extract(tmp_path, dataset, flaky)
    directory = tmp_path / KEY[:16]
    assert sorted(p.name for p in directory.glob("*.json")) == ["shard_00000.json", "shard_00001.json"]
    assert not list(directory.glob("*.tmp")) and FeatureCache.load(tmp_path, KEY) is None
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("shard_0000[01]*")}

    resumed = Recording(backbone, images)
    cache = extract(tmp_path, dataset, resumed)
    assert resumed.shards() == [2, 3, 4] and sorted(resumed.seen) == list(range(2 * SHARD, N))
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("shard_0000[01]*")} == before  # not rewritten
    assert files(cache.path) == files(build(tmp_path / "ref", dataset, backbone).path)

    again = Recording(backbone, images)
    extract(tmp_path, dataset, again)
    assert again.calls == 0  # a finished cache is opened without starting a Trainer


def test_writer_refuses_batches_out_of_plan_order(tmp_path, backbone, dataset):
    data = ShardedExtractionData(tmp_path, KEY, dataset, dim=64, shard_size=SHARD, batch_size=BS)
    data.setup("predict")
    trainer = SimpleNamespace(datamodule=data, global_rank=0)
    writer = CacheShardWriter()
    writer.on_predict_start(trainer, None)
    feats, labels = torch.zeros(2, 64), torch.tensor([1, 2])
    writer.write_on_batch_end(trainer, None, feats, None, (torch.tensor([0, 1]), None, labels), 0)
    with pytest.raises(DataError, match=r"shard 0 expected samples from 2 in order, got batch \[3, 4\]"):
        writer.write_on_batch_end(trainer, None, feats, None, (torch.tensor([3, 4]), None, labels), 1)
    with pytest.raises(DataError, match=r"prediction ended with shards \[0, 1, 2, 3, 4\] of rank 0 unfinished"):
        writer.on_predict_end(trainer, None)


def test_bad_options_are_one_line_errors_before_any_trainer_starts(tmp_path, backbone, dataset):
    with pytest.raises(ConfigError, match="dtype must be one of float32, float16, got 'bfloat16'"):
        extract(tmp_path, dataset, backbone, dtype="bfloat16")
    with pytest.raises(DataError, match="empty dataset"):
        extract(tmp_path, TensorDataset(torch.zeros(0, 3, 32, 48), torch.zeros(0)), backbone)


def test_fit_options_are_refused_as_extraction_options(tmp_path, backbone, dataset):
    with pytest.raises(ConfigError, match="max_epochs do not apply to extraction"):
        extract(tmp_path, dataset, backbone, trainer_kwargs={**CPU1, "max_epochs": 3})
    with pytest.raises(ConfigError, match="invalid trainer option for extraction"):
        extract(tmp_path, dataset, backbone, trainer_kwargs={"accelerator": "cpu", "devices": 1, "precision": "7"})


def test_two_processes_split_the_shards_and_resume(tmp_path, backbone, dataset):
    """ddp_spawn, 2 CPU processes (gloo): rank 1 owns shards 1 and 3; shard 3 is already done, shard 1 is not."""
    with pytest.raises(CacheIncomplete):
        build(tmp_path, dataset, backbone, rank=1, world_size=2, wait=0)
    directory = tmp_path / KEY[:16]
    for p in directory.glob("shard_00001*"):
        p.unlink()
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("shard_00003*")}

    cache = extract(tmp_path, dataset, backbone, trainer_kwargs={"accelerator": "cpu", "devices": 2,
                                                                 "strategy": "ddp_spawn"})
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in directory.glob("shard_00003*")} == kept
    ref = build(tmp_path / "ref", dataset, backbone)
    assert np.array_equal(cache.labels, ref.labels)
    # Lightning gives each of the 2 processes its share of the CPU threads, so sums may round differently.
    torch.testing.assert_close(cache.features(slice(None)), ref.features(slice(None)), rtol=1e-5, atol=1e-5)


DDP_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
from tests.conftest import tiny_config
from cdam_pl.train.run import run_training

if __name__ == "__main__":
    result = run_training(tiny_config({out!r}, "cache.enabled=true", "trainer.strategy=ddp", "trainer.devices=2",
                                      "trainer.accelerator=cpu", "trainer.max_epochs=1"))
    trainer = result["trainer"]
    # one file per rank: both ranks share stdout, where lines can interleave
    with open({out!r} + f"/result_{{trainer.global_rank}}.json", "w") as f:
        json.dump({{"rank": trainer.global_rank, "world": trainer.world_size, "metrics": result["metrics"]}}, f)
"""


def test_ddp_training_script_extracts_in_both_ranks_and_trains(tmp_path):
    """train.py's path under `strategy=ddp`: Lightning re-launches the script, the prediction Trainer and the fit
    Trainer share the process group, and a rank with no shard to extract (digits fit one shard) does not hang."""
    out = tmp_path / "out"
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), out=str(out))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)  # a deadlock would hit the timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(out.glob("result_*.json"))]
    assert sorted((r["rank"], r["world"]) for r in results) == [(0, 2), (1, 2)]
    assert results[0]["metrics"] == results[1]["metrics"] and results[0]["metrics"]["val/acc"] > 0

    from cdam_pl.data import ImageDataModule

    data = ImageDataModule("digits", val_split=0.2, seed=0, img_size=32)
    data.setup()
    targets = sorted((np.asarray(ds.targets) for ds in (data.train_dataset, data.val_dataset)), key=len)
    headers = sorted((json.loads(p.read_text()) for p in (out / "cache").glob("*/header.json")), key=lambda h: h["n"])
    assert [h["n"] for h in headers] == [len(t) for t in targets]  # val and train split, both complete
    for h, t in zip(headers, targets):
        cache = FeatureCache.load(out / "cache", h["key"])
        assert cache is not None and cache.dim == 64 and np.array_equal(cache.labels, t)
        assert np.isfinite(cache.features(slice(None)).numpy()).all()


# --- the benchmark runner (bench/run_all.py) -------------------------------------------------------------------
def test_runner_finds_every_bench_module_with_run_and_nothing_else():
    from bench import run_all

    found = run_all.discover()
    assert {"cdam_speed", "cache_speedup", "cached_training"} <= set(found)
    assert not {"common", "run_all", "__init__"} & set(found)
    for name in found:  # each has a top-level run(quick, device), the contract the runner relies on
        text = (ROOT / "bench" / f"{name}.py").read_text()
        assert "\ndef run(quick: bool = False, device: str = \"cpu\")" in text, name


@pytest.mark.parametrize("ratio, goal, met", [
    (1.5, "<= 2x (>= 50% of its throughput)", "yes"), (2.5, "<= 2x", "**no**"), (0.004, "<= 0.05x (20x faster)", "yes"),
    (3.0, ">= 5x", "**no**"), (1.0, "~1x (pays off from epoch 2)", ""), (1.0, "", ""),
])
def test_runner_checks_ratios_against_goals(ratio, goal, met):
    from bench.run_all import goal_met

    assert goal_met(ratio, goal) == met


def test_runner_rewrites_only_its_own_device_section(tmp_path):
    from bench.run_all import PREAMBLE, merge

    out = tmp_path / "BENCHMARKS.md"
    out.write_text(merge(out, "cpu", "## CPU\n\n| cpu table v1 |\n"))
    out.write_text(merge(out, "cuda", "## GPU: NVIDIA H100\n\n| gpu table |\n"))
    text = out.read_text()
    assert text.startswith(PREAMBLE) and text.count(PREAMBLE) == 1
    assert text.index("cpu table v1") < text.index("GPU: NVIDIA H100")  # CPU first, GPU kept beside it
    out.write_text(merge(out, "cpu", "## CPU\n\n| cpu table v2 |\n"))
    text = out.read_text()
    assert "cpu table v2" in text and "cpu table v1" not in text and "| gpu table |" in text
    assert text.count("<!-- bench:cpu start -->") == 1 and text.count("<!-- bench:cuda start -->") == 1


def test_runner_only_replaces_its_modules_rows():
    from bench.run_all import HEADER, partial_update

    old = "\n".join(["## CPU", "", "- Machine: m", "- Date: d1", "", HEADER,
                     "| cdam_speed | CDAM, 1 target | 1 s | fwd | 1 s | 1.00x | | |",
                     "| tam_speed | TAM old | 2 s | loop | 4 s | 0.50x | | |"]) + "\n"
    new = partial_update(old, ["tam_speed", "explain_throughput"], "- Rerun of tam_speed: d2",
                         ["| tam_speed | TAM new | 1 s | loop | 4 s | 0.25x | | |",
                          "| explain_throughput | explain.py | 2 s | maps | 1 s | 2.00x | | |"])
    lines = new.split("\n")
    assert lines[:5] == ["## CPU", "", "- Machine: m", "- Date: d1", "- Rerun of tam_speed: d2"]
    assert "TAM old" not in new and new.count(HEADER) == 1
    rows = [ln.split("|")[2].strip() for ln in lines if ln.startswith("| ") and "---" not in ln][1:]
    assert rows == ["CDAM, 1 target", "TAM new", "explain.py"]  # kept rows first, then the rerun's
