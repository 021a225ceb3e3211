"""The training pipeline end to end on a tiny random ViT: learning, checkpoints, frozen backbone, config errors."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from cdam_pl.checkpoint import load_checkpoint, read_checkpoint
from cdam_pl.config import load_config
from cdam_pl.errors import CheckpointError, ConfigError
from cdam_pl.train.run import build_backbone, run_training
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path, *overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_training(tiny_config(tmp_path, *overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = tiny_config(out, "trainer.max_epochs=4")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = {k: v.clone() for k, v in build_backbone(cfg).state_dict().items()}
        result = run_training(cfg)
    return result, before


def test_training_lowers_loss_and_beats_chance(trained):
    result, _ = trained
    module, trainer = result["module"], result["trainer"]
    data = trainer.val_dataloaders
    x, y = next(iter(data))
    with torch.no_grad():
        feats = module.backbone(x)
        fresh = torch.nn.Linear(feats.shape[1], 10)
        loss_fresh = torch.nn.functional.cross_entropy(fresh(feats), y).item()
        loss_trained = torch.nn.functional.cross_entropy(module.head(feats), y).item()
    assert loss_trained < loss_fresh
    assert result["metrics"]["val/acc"] > 0.3  # 10 classes: chance is 0.1


def test_backbone_is_bitwise_unchanged_and_frozen(trained):
    result, before = trained
    after = result["module"].backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in result["module"].backbone.parameters())


def test_checkpoint_is_small_plain_and_round_trips_logits_exactly(trained):
    result, _ = trained
    path = result["last_checkpoint"]
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert not any(k.startswith("backbone.") for k in ckpt["state_dict"])
    meta = ckpt["cdam_pl"]
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["config"]["backbone"]["img_size"] == 32 and meta["backbone"]["sha256"]
    assert Path(path).stat().st_size < 1_000_000
    loaded = load_checkpoint(path)
    module = result["module"].eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.head(loaded.backbone(x)), module(x))
    assert result["best_checkpoint"] and Path(result["best_checkpoint"]).is_file()
    assert (Path(result["run_dir"]) / "config.yaml").is_file()


def test_checkpoint_refuses_other_backbone_weights(trained, tmp_path):
    result, _ = trained
    ckpt = torch.load(result["last_checkpoint"], weights_only=True)
    ckpt["cdam_pl"]["backbone"]["sha256"] = "0" * 64
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match="backbone weights do not match the checkpoint"):
        load_checkpoint(bad)


def test_not_a_checkpoint_errors(tmp_path):
    (tmp_path / "a.ckpt").write_text("hello")
    torch.save({"state_dict": {}}, tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path / "a.ckpt")
    with pytest.raises(CheckpointError, match="not a cdam-pl checkpoint"):
        read_checkpoint(tmp_path / "b.ckpt")
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown config key"),
        ("trainer.max_epochs=2", None),
        ("data.batch_size=abc", "invalid config value"),
        ("head.kind=transformer", "head.kind='transformer' is not one of linear, mlp"),
        ("backbone.img_size=[32]", "backbone.img_size must be"),
        ("data.val_split=1.5", "data.val_split must be in"),
        ("max_epochs", "is not key=value"),
    ],
)
def test_config_errors_name_the_key(override, message):
    if message is None:
        assert load_config(ROOT / "configs" / "demo.yaml", [override]).trainer.max_epochs == 2
        return
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "demo.yaml", [override])


@pytest.mark.parametrize("name", ["demo", "imagefolder", "paper_dino_vits8"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.backbone.name.startswith("vit_")


def test_train_py_user_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "demo.yaml"),
         "backbone.name=vit_smal_patch16_224", f"out_dir={tmp_path}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown backbone 'vit_smal_patch16_224'; did you mean vit_small_patch16_224" in lines[0]


def test_cached_training_reuses_features_and_is_reproducible(tmp_path, monkeypatch):
    from cdam_pl.backbone import FrozenViT

    calls = []
    real_forward = FrozenViT.forward

    def counting_forward(self, images):
        calls.append(len(images))
        return real_forward(self, images)

    monkeypatch.setattr(FrozenViT, "forward", counting_forward)
    r1 = _train(tmp_path, "cache.enabled=true", "trainer.max_epochs=2")
    assert sum(calls) == 1797  # first run: every digits image through the backbone exactly once
    calls.clear()
    r2 = _train(tmp_path, "cache.enabled=true", "trainer.max_epochs=2")
    assert r1["cached"] and r2["cached"] and calls == []  # second run: no backbone pass at all
    for a, b in zip(r1["module"].head.parameters(), r2["module"].head.parameters()):
        assert torch.equal(a, b)


def test_last_checkpoint_is_the_final_epoch_even_when_accuracy_stops_improving(tmp_path):
    # lr 1e-12: the accuracy of epoch 0 is never beaten, so only epoch 0 is "best"; last.ckpt must still be the
    # state after the final epoch (what resume=last restarts from), not a copy of the best one.
    result = _train(tmp_path, "trainer.max_epochs=3", "optim.lr=1e-12")
    last = torch.load(result["last_checkpoint"], map_location="cpu", weights_only=True)
    best = torch.load(result["best_checkpoint"], map_location="cpu", weights_only=True)
    steps_per_epoch = best["global_step"] // (best["epoch"] + 1)
    assert best["epoch"] == 0
    assert last["epoch"] == 2 and last["global_step"] == 3 * steps_per_epoch
    assert sorted(p.name for p in Path(result["last_checkpoint"]).parent.iterdir()) == ["best-00.ckpt", "last.ckpt"]
