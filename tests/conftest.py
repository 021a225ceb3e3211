import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CDAM_PL_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "test-cache"))

import pytest  # noqa: E402
import torch  # noqa: E402

from cdam_pl.backbone import load_backbone  # noqa: E402

# Tiny ViTs (depth 2, 64-d) that cover every case the engine must handle: patch 8/14/16, 1 or 5 prefix tokens.
TINY = dict(depth=2, embed_dim=64, num_heads=4)
TINY_MODELS = {
    "p16": ("vit_small_patch16_224.dino", (32, 48)),
    "p8": ("vit_small_patch8_224.dino", (24, 16)),
    "p14reg": ("vit_small_patch14_reg4_dinov2.lvd142m", (28, 42)),
}


def tiny_backbone(key: str = "p16", img_size=None, perturb: bool = True, **kwargs):
    """A depth-2 random ViT; `perturb` randomises every parameter (layer scales, biases) so no path is trivial."""
    name, size = TINY_MODELS[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(name, weights=None, img_size=img_size or size, **{**TINY, **kwargs})
    if perturb:
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in bb.model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return bb


@pytest.fixture
def tiny():
    return tiny_backbone


def tiny_config(out_dir, *overrides: str):
    """A config for a depth-2 random ViT at 32 px on scikit-learn digits: trains in seconds on CPU."""
    from cdam_pl.config import load_config

    base = [
        "backbone.name=vit_small_patch16_224.dino", "backbone.weights=null", "backbone.img_size=32",
        "backbone.kwargs.depth=2", "backbone.kwargs.embed_dim=64", "backbone.kwargs.num_heads=4",
        "data.name=digits", "data.batch_size=64", "data.val_split=0.2",
        "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "explain.enabled=false", "cache.enabled=false", f"cache.dir={out_dir}/cache",
        f"out_dir={out_dir}", "run_name=tiny", "optim.lr=3e-3",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a last.ckpt trained by run_training on digits with a tiny random ViT (shared by the session)."""
    from cdam_pl.train.run import run_training

    out = tmp_path_factory.mktemp("tiny_run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_training(tiny_config(out))
    return result["last_checkpoint"]
