"""`ExplanationCallback` in Lightning projects that are not this one's: plain LightningModules fine-tuning a timm or a
Hugging Face ViT end to end, their own data, TensorBoard, CSV and W&B loggers, LightningCLI, DDP, and the README's
example. Maps are checked against the literal definition applied to the user's model itself (T hooked on the last
layer's first norm, full autograd from the pixels); pictures must reach every logger, identical everywhere.
"""
import csv
import io
import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader

from cdam_pl import ExplanationCallback
from cdam_pl.data.splits import stratified_subset
from cdam_pl.errors import CdamError, ConfigError
from cdam_pl.train.explained import find_model
from examples.finetune_timm import Digits, FineTuneViT, main
from tests.test_callback import SCALARS, events, image_event, stripes_folder

ROOT = Path(__file__).resolve().parents[1]
STEPS = [0, 1, 2]  # the untrained model, then after each of 2 epochs
FAST = dict(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def quiet():
    warnings.simplefilter("ignore")
    return warnings.catch_warnings()


def fit(out: Path, module_fn, callbacks, datamodule=None, val_loader=None, train_loader=None):
    """Seeded fit with TensorBoard and CSV loggers; returns (trainer, module)."""
    with quiet():
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(default_root_dir=out, callbacks=callbacks, **FAST,
                            logger=[TensorBoardLogger(out, name="tb"), CSVLogger(out, name="csv")])
        module = module_fn()
        trainer.fit(module, datamodule=datamodule, train_dataloaders=train_loader, val_dataloaders=val_loader)
    return trainer, module


def the_callback(trainer) -> ExplanationCallback:
    return next(c for c in trainer.callbacks if isinstance(c, ExplanationCallback))


def literal_class_maps(model_fn, norm1, images, classes, grid):
    """The definition on the user's own forward: T = norm1's output, S_i = sum_j T_ij dF/dT_ij -> [B, gh, gw]."""
    store = {}
    hook = norm1.register_forward_hook(lambda mod, inp, out: store.__setitem__("t", out))
    try:
        with torch.enable_grad():
            f = model_fn(images.clone().requires_grad_(True)).gather(1, classes[:, None]).sum()
            (g,) = torch.autograd.grad(f, store["t"])
    finally:
        hook.remove()
    return (store["t"] * g).sum(-1)[:, 1:].reshape(-1, *grid).detach()


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def csv_steps(run_dir: Path, tag: str) -> list[int]:
    rows = list(csv.DictReader(open(next(run_dir.rglob("metrics.csv")))))
    return sorted(int(r["step"]) for r in rows if r.get(tag))


def png_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def check_every_logger_got_everything(out: Path, n_images: int, kinds: tuple[str, ...]):
    """TensorBoard: every tag once per step; metrics.csv: every scalar per step; the CSV logger: one PNG per tag and
    step, with TensorBoard's pixels."""
    found, accs = events(out / "tb")
    expected = {f"explain/img{i:02d}/{k}" for i in range(n_images) for k in kinds}
    assert {t for t in found["images"] if t.startswith("explain/")} == expected
    for tag in expected:
        assert sorted(found["images"][tag]) == STEPS, tag
    csv_dir = next((out / "csv").glob("version_*"))
    for tag in SCALARS:
        assert sorted(found["scalars"][tag]) == STEPS, tag
        assert csv_steps(csv_dir, tag) == STEPS, tag
    pngs = sorted((csv_dir / "explanations").rglob("step_*.png"))
    assert len(pngs) == len(expected) * len(STEPS)
    for tag in expected:
        for step in STEPS:
            png = csv_dir / "explanations" / Path(*tag.split("/")[1:]) / f"step_{step:03d}.png"
            tb = np.asarray(Image.open(io.BytesIO(image_event(accs, tag, step).encoded_image_string)).convert("RGB"))
            np.testing.assert_array_equal(png_pixels(png), tb)


# --- a timm ViT fine-tuned end to end, with its own DataModule ------------------------------------------------------
def concept_examples():
    x = torch.full((2, 3, 32, 32), -1.0)
    x[:, :, :, ::4] = 1.0  # vertical stripes, in the data's normalisation
    return x


@pytest.fixture(scope="module")
def timm_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("anywhere_timm")
    cb = ExplanationCallback(num_images=4, concepts={"stripes": concept_examples()})
    explained = fit(base / "explained", FineTuneViT, [cb], datamodule=Digits())
    rng = torch.get_rng_state(), np.random.get_state()[1].copy()
    plain = fit(base / "plain", FineTuneViT, [], datamodule=Digits())
    return {"out": base / "explained", "explained": explained, "plain": plain, "rng": rng,
            "plain_rng": (torch.get_rng_state(), np.random.get_state()[1].copy())}


def test_timm_fine_tuning_logs_to_tensorboard_csv_and_pngs(timm_runs):
    check_every_logger_got_everything(timm_runs["out"], 4, ("classes", "concepts", "attention"))
    strips = sorted((timm_runs["out"] / "tb").rglob("explanations/img0*_*.png"))
    assert strips == sorted(the_callback(timm_runs["explained"][0]).strip_paths) and len(strips) == 4


def test_timm_maps_are_the_definition_on_the_users_model_and_the_backbone_is_recomputed(timm_runs):
    trainer, module = timm_runs["explained"]
    cb = the_callback(trainer)
    assert cb.trains_backbone and cb.classes == [str(d) for d in range(10)]
    vit = module.vit.eval()
    last = cb.last
    for col in (0, 1):  # true class, predicted class
        ref = literal_class_maps(vit, vit.blocks[-1].norm1, cb.images, last.targets[:, col], (4, 4))
        assert rel_err(last.class_maps[:, col], ref) < 1e-4
    with torch.no_grad():  # the concept vector of the final backbone: mean pre-logits feature of the examples
        ref = vit.forward_head(vit.forward_features(concept_examples()), pre_logits=True).mean(0)
    torch.testing.assert_close(cb._vectors[0], ref, rtol=1e-5, atol=1e-5)
    # the backbone trained: attention and concept maps changed, and every strip column keeps its own
    first = cb.history[0]
    assert all(s.attention is not None and s.concept_maps is not None for s in cb.history)
    assert not torch.allclose(first.attention, last.attention)
    assert not torch.allclose(first.concept_maps, last.concept_maps)


def test_tracked_images_are_a_seeded_class_stratified_val_subset(timm_runs):
    cb = the_callback(timm_runs["explained"][0])
    data = Digits()
    data.setup()
    targets = data.val_dataset.tensors[1]
    idx = stratified_subset(targets.tolist(), 4, 0)
    assert torch.equal(cb.labels, targets[idx]) and len(set(cb.labels.tolist())) == 4
    assert torch.equal(cb.images, data.val_dataset.tensors[0][idx])


def test_fine_tuning_is_bitwise_unchanged_by_the_callback(timm_runs):
    a, b = timm_runs["explained"][1].state_dict(), timm_runs["plain"][1].state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].numpy().tobytes() == b[k].numpy().tobytes(), k
    assert torch.equal(timm_runs["rng"][0], timm_runs["plain_rng"][0]), "the global torch RNG was used"
    assert np.array_equal(timm_runs["rng"][1], timm_runs["plain_rng"][1]), "the global numpy RNG was used"


# --- a Hugging Face ViT, validation dataloaders without a DataModule -------------------------------------------------
class HFClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification  # the optional extra `hf`

        names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
        cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=10, id2label=dict(enumerate(names)))
        self.model = ViTForImageClassification(cfg)

    def forward(self, x):
        return self.model(pixel_values=x).logits

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def test_hugging_face_vit_fine_tuning_logs_everywhere_with_exact_maps(tmp_path):
    pytest.importorskip("transformers", reason="the optional extra `hf` is not installed")
    data = Digits()
    data.setup()
    loaders = dict(train_loader=DataLoader(data.train_dataset, batch_size=64, shuffle=True),
                   val_loader=DataLoader(data.val_dataset, batch_size=64))  # no DataModule: labels read from samples
    trainer, module = fit(tmp_path, HFClassifier, [ExplanationCallback(num_images=3)], **loaders)
    check_every_logger_got_everything(tmp_path, 3, ("classes", "attention"))
    cb = the_callback(trainer)
    assert cb.trains_backbone and cb.classes[:3] == ["zero", "one", "two"]  # names from the model's config
    hf = module.model.eval()
    norm1 = [m for name, m in hf.named_modules() if name.endswith("layernorm_before")][-1]
    ref = literal_class_maps(module, norm1, cb.images, cb.last.targets[:, 1], (4, 4))
    assert rel_err(cb.last.class_maps[:, 1], ref) < 1e-4


# --- Weights & Biases (offline) ----------------------------------------------------------------------------------
def test_wandb_logger_gets_images_through_log_image(tmp_path, monkeypatch):
    try:
        import wandb  # noqa: F401  (the optional extra `wandb`)
        from lightning.pytorch.loggers import WandbLogger
    except ImportError as e:
        pytest.skip(f"wandb is not installed (the optional extra `wandb`): {e}")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logged = []

    class Recording(WandbLogger):
        def log_image(self, key, images, step=None, **kwargs):
            logged.append((key, step, images[0].shape))
            super().log_image(key, images, step=step, **kwargs)

    with quiet():
        L.seed_everything(0, verbose=False)
        logger = Recording(save_dir=str(tmp_path), offline=True, project="cdam-test")
        trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ExplanationCallback(num_images=2)], **FAST,
                            logger=logger)
        trainer.fit(FineTuneViT(), datamodule=Digits())
        wandb.finish()
    expected = {(f"explain/img{i:02d}/{k}", s) for i in range(2) for k in ("classes", "attention") for s in STEPS}
    assert Counter((key, step) for key, step, _ in logged) == Counter(expected)
    assert all(len(shape) == 3 and shape[2] == 3 for _, _, shape in logged)
    media = list(tmp_path.rglob("media/images/explain/img00/*.png"))
    assert len(media) == 2 * len(STEPS)  # written by wandb itself, offline


# --- LightningCLI and the README's example --------------------------------------------------------------------------
def test_lightning_cli_config_adds_the_callback_with_a_concept_folder(tmp_path):
    text = (ROOT / "configs" / "lightning_cli_example.yaml").read_text()
    folder = stripes_folder(tmp_path / "stripes")
    text = text.replace("        # concepts:            # name -> folder of example images\n"
                        "        #   stripes: data/concepts/stripes",
                        f"        concepts:\n          stripes: {folder}")
    assert f"stripes: {folder}" in text
    config = tmp_path / "cli.yaml"
    config.write_text(text)
    with quiet():
        cli = LightningCLI(FineTuneViT, Digits, args=[
            "fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"])
    cb = the_callback(cli.trainer)
    assert (cb.num_images, cb.top_k, cb.concept_names) == (4, 3, ["stripes"])
    found, _ = events(tmp_path)
    for kind in ("classes", "concepts", "attention"):
        assert sorted(found["images"][f"explain/img03/{kind}"]) == STEPS


def test_the_readme_quotes_the_example_and_it_runs(tmp_path):
    code = (ROOT / "examples" / "finetune_timm.py").read_text()
    body = code[code.index("import sys"):]
    assert body in (ROOT / "README.md").read_text(), "the README's example must be examples/finetune_timm.py"
    with quiet():
        trainer = main(str(tmp_path), limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                       enable_model_summary=False, accelerator="cpu")
    assert len(list((tmp_path / "tb").rglob("explanations/img0*_*.png"))) == 4
    assert len(list((tmp_path / "csv").rglob("explanations/img03/classes/step_*.png"))) == 3
    assert the_callback(trainer).last.step == 2


# --- DDP: two CPU processes (gloo) -----------------------------------------------------------------------------------
DDP_SCRIPT = """
import json, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {root!r})
from examples.finetune_timm import main

if __name__ == "__main__":
    trainer = main({out!r}, strategy="ddp", devices=2, accelerator="cpu", limit_train_batches=2, limit_val_batches=1,
                   enable_progress_bar=False, enable_model_summary=False)
    print("RESULT " + json.dumps({{"rank": trainer.global_rank, "world": trainer.world_size}}), flush=True)
"""


def test_ddp_two_cpu_processes_log_each_image_once(tmp_path):
    script = tmp_path / "ddp_run.py"
    out = tmp_path / "out"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), out=str(out))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)  # a deadlock would hit the timeout
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert {(r["rank"], r["world"]) for r in results} == {(0, 2), (1, 2)}
    found, _ = events(out)  # every version folder: a second rank must not log anywhere
    expected = {f"explain/img{i:02d}/{k}" for i in range(4) for k in ("classes", "attention")}
    assert {t for t in found["images"] if t.startswith("explain/")} == expected
    for tag in expected:
        assert Counter(found["images"][tag]) == Counter({0: 1, 1: 1, 2: 1}), tag
    for tag in SCALARS:
        assert Counter(found["scalars"][tag]) == Counter({0: 1, 1: 1, 2: 1}), tag
    assert len(list(out.rglob("csv/*/explanations/img00/classes/step_*.png"))) == 3


# --- one-line errors -----------------------------------------------------------------------------------------------
class NoViT(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(3 * 32 * 32, 10)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TwoViTs(L.LightningModule):
    def __init__(self):
        super().__init__()
        kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
        self.student, self.teacher = VisionTransformer(**kw), VisionTransformer(**kw)


class BadCdamModel(NoViT):
    def cdam_model(self):
        return "my model"


@pytest.mark.parametrize("module, words", [
    (NoViT, "found no timm or Hugging Face ViT in NoViT; define cdam_model()"),
    (TwoViTs, "found 2 ViTs (student, teacher) in TwoViTs; define cdam_model()"),
    (BadCdamModel, "cdam_model() returned a str; define cdam_model()"),
])
def test_no_or_several_models_is_a_one_line_error_saying_what_to_define(module, words):
    with pytest.raises(CdamError) as err:
        find_model(module())
    assert words in str(err.value) and "\n" not in str(err.value)


class PickOne(TwoViTs):
    def cdam_model(self):
        return self.student


def test_cdam_model_picks_among_several():
    m = PickOne()
    assert find_model(m).backbone.model is m.student


def test_errors_inside_fit_reach_the_user_as_one_line(tmp_path):
    with pytest.raises(CdamError) as err:
        fit(tmp_path, NoViT, [ExplanationCallback(num_images=2)], datamodule=Digits())
    assert "define cdam_model()" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CdamError) as err:  # no validation data at all
        with quiet():
            trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ExplanationCallback()], logger=False, **FAST)
            data = Digits()
            data.setup()
            trainer.fit(FineTuneViT(), train_dataloaders=DataLoader(data.train_dataset, batch_size=64))
    assert "found no validation data" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CdamError, match="the data names 3 classes but the model outputs 10 logits"):
        fit(tmp_path, FineTuneViT, [ExplanationCallback(num_images=2, classes=["a", "b", "c"])], datamodule=Digits())


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_images=0), "explain.num_images must be > 0"),
    (dict(images=torch.zeros(1, 3, 32, 32)), "pass images and labels together"),
    (dict(concepts={"beak": "/no/such/folder"}), "explain.concepts.beak"),
    (dict(similarity="euclid"), "explain.similarity must be one of dot, cosine"),
])
def test_bad_arguments_fail_at_construction(kwargs, words):
    with pytest.raises(ConfigError) as err:
        ExplanationCallback(**kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)


class Pair(NoViT):
    def __init__(self, frozen: bool):
        super().__init__()
        self.vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                                     global_pool="avg").requires_grad_(not frozen)
        self.probe = nn.Linear(32, 3)

    def cdam_model(self):
        return self.vit, self.probe


@pytest.mark.parametrize("frozen", [False, True])
def test_cdam_model_may_return_a_backbone_and_head_pair(frozen):
    m = Pair(frozen)
    found = find_model(m)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert found.backbone.model is m.vit and found.head is m.probe
    assert found.trains_backbone  # not a FrozenViT: recomputed at every step either way
    with torch.no_grad():
        torch.testing.assert_close(found.head(found.backbone(x)), m.probe(m.vit(x)))
