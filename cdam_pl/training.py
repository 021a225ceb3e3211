"""`run_training(cfg)`: everything train.py does, callable from Python and tests.

backbone -> data -> (feature cache) -> LightningModule -> Trainer with TensorBoard, checkpoints and the
explanation callback. Returns where the logs and checkpoints went and the final validation metrics.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from cdam_pl.backbone import FrozenViT, load_backbone
from cdam_pl.config import to_container
from cdam_pl.data import ImageDataModule
from cdam_pl.errors import ConfigError
from cdam_pl.io import AtomicCheckpointIO, atomic_write_text
from cdam_pl.module import HeadClassifier


def build_backbone(cfg: DictConfig) -> FrozenViT:
    b = cfg.backbone
    size = b.img_size if isinstance(b.img_size, int) else list(b.img_size)
    return load_backbone(b.name, weights=b.weights, img_size=size, **OmegaConf.to_container(b.kwargs))


def build_datamodule(cfg: DictConfig, backbone: FrozenViT) -> ImageDataModule:
    d, dc = cfg.data, backbone.data_config
    return ImageDataModule(
        name=d.name, root=d.root, train_dir=d.train_dir, val_dir=d.val_dir, val_split=d.val_split,
        train_size=d.train_size, val_size=d.val_size, batch_size=d.batch_size, num_workers=d.num_workers,
        augment=d.augment, img_size=backbone.img_size, mean=dc["mean"], std=dc["std"],
        interpolation=dc["interpolation"], seed=cfg.seed,
    )


def extraction_device(cfg: DictConfig) -> torch.device:
    accel = str(cfg.trainer.get("accelerator", "auto"))
    return torch.device("cuda" if torch.cuda.is_available() and accel in ("auto", "gpu", "cuda") else "cpu")


def feature_loaders(cfg: DictConfig, backbone: FrozenViT, data: ImageDataModule, trainer: L.Trainer):
    """Extract (once) and cache train/val features; return (train_loader, val_loader) over the caches."""
    from cdam_pl.cache import FeatureCache, cache_key, default_cache_root

    root = Path(cfg.cache.dir) if cfg.cache.dir else default_cache_root()
    device = extraction_device(cfg)
    backbone.to(device)

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        return backbone(x.to(device, non_blocking=True)).float().cpu()

    loaders = []
    for split, shuffle in (("train", True), ("val", False)):
        ds = data.eval_dataloader(split).dataset
        key = cache_key(backbone.identity, data.eval_transform_id, ds.ids, {"dtype": cfg.cache.dtype})
        cache = FeatureCache.build(root, key, ds, extract, dim=backbone.embed_dim, batch_size=data.batch_size,
                                   num_workers=data.num_workers, dtype=cfg.cache.dtype)
        # The epoch order follows trainer.current_epoch, so a resumed run replays the same batches.
        loaders.append(cache.loader(batch_size=data.batch_size, shuffle=shuffle, seed=cfg.seed,
                                    epoch_seed_fn=lambda: trainer.current_epoch))
    backbone.cpu()
    return loaders


def run_training(cfg: DictConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train a head as configured; returns paths (run dir, checkpoints) and final validation metrics."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = build_backbone(cfg)
    data = build_datamodule(cfg, backbone)
    data.setup()
    module = HeadClassifier(backbone, data.classes, head=to_container(cfg.head), optim=to_container(cfg.optim),
                            config=to_container(cfg))

    resume = cfg.resume
    version = None
    if resume == "last":
        found = sorted(Path(cfg.out_dir, cfg.run_name).glob("version_*/checkpoints/last.ckpt"),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"resume=last but no last.ckpt under {Path(cfg.out_dir, cfg.run_name)}")
        resume = str(found[-1])
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(f"resume checkpoint {resume!r} not found")
        version = Path(resume).resolve().parent.parent.name  # keep logging into the interrupted run's folder
    logger = TensorBoardLogger(save_dir=cfg.out_dir, name=cfg.run_name, version=version, default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    ckpt_dir = run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:02d}", monitor="val/acc", mode="max",
                           save_top_k=1, save_last=True, auto_insert_metric_name=False)
    callbacks: list = [best]
    if cfg.explain.enabled:
        from cdam_pl.callbacks import ExplanationCallback

        callbacks.append(ExplanationCallback.from_config(cfg.explain, data))
    callbacks += list(extra_callbacks or [])

    trainer_kwargs = dict(to_container(cfg.trainer))
    trainer_kwargs.setdefault("log_every_n_steps", 10)
    try:
        trainer = L.Trainer(logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid trainer option: {str(e).splitlines()[0]}") from None

    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # The frozen backbone is in eval mode on purpose; Lightning's warning about it is noise here.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    t0 = time.perf_counter()
    use_cache = cfg.cache.enabled and not cfg.data.augment
    if use_cache:
        train_loader, val_loader = feature_loaders(cfg, backbone, data, trainer)
    else:
        train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
    t_features = time.perf_counter() - t0
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resume)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "run_dir": str(run_dir),
        "best_checkpoint": best.best_model_path or None,
        "last_checkpoint": str(ckpt_dir / "last.ckpt"),
        "metrics": metrics,
        "seconds": {"features": t_features, "total": time.perf_counter() - t0},
        "cached": use_cache,
        "module": module,
        "trainer": trainer,
    }

