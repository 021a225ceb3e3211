"""`run_training(cfg)`: everything train.py does, callable from Python and tests.

backbone -> data -> (feature cache) -> LightningModule -> Trainer with TensorBoard, checkpoints and the
explanation callback. Returns where the logs and checkpoints went and the final validation metrics.
"""
from __future__ import annotations

import functools
import re
import signal
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf

from cdam_pl.backbone import FrozenViT, load_backbone
from cdam_pl.checkpoint import CHECKPOINT_KEY, check_backbone_matches, read_checkpoint
from cdam_pl.config import to_container
from cdam_pl.data.datamodule import ImageDataModule
from cdam_pl.errors import CdamError, ConfigError
from cdam_pl.features import extract  # extract.extract_features is looked up at call time (tests replace it)
from cdam_pl.features.cache import cache_key, default_cache_root
from cdam_pl.io import atomic_write_text
from cdam_pl.train.atomic import AtomicCheckpointIO, AtomicTensorBoardLogger
from cdam_pl.train.callbacks import ExplanationCallback
from cdam_pl.train.module import HeadClassifier
from cdam_pl.train.signals import FiniteLossGuard, GracefulStop, RestoreLoaderState, TrainingStopped, stop_now_on_signal

LAST_NAME = ModelCheckpoint.CHECKPOINT_NAME_LAST  # "last": <run>/checkpoints/last.ckpt, what resume=last finds


def build_backbone(cfg: DictConfig) -> FrozenViT:
    b = cfg.backbone
    return load_backbone(b.name, weights=b.weights, img_size=b.img_size, pool=b.pool,
                         **OmegaConf.to_container(b.kwargs))


def build_datamodule(cfg: DictConfig, backbone: FrozenViT) -> ImageDataModule:
    return ImageDataModule.from_config(cfg.data, backbone.data_config, backbone.img_size, seed=cfg.seed)


def feature_loaders(cfg: DictConfig, backbone: FrozenViT, data: ImageDataModule, trainer: L.Trainer):
    """Extract (once) and cache train/val features; return (train_loader, val_loader) over the caches.

    Extraction is a Lightning prediction run on the devices of `cfg.trainer` (accelerator, devices, strategy,
    num_nodes, precision), each rank writing its own shards (`cdam_pl.features.extract`); every rank then reads the
    whole cache and the loaders give each rank its share of the batches.
    """
    root = Path(cfg.cache.dir) if cfg.cache.dir else default_cache_root()
    opts = to_container(cfg.trainer)
    predict_opts = {k: opts[k] for k in extract.TRAINER_KEYS if k in opts}
    extra = {"dtype": cfg.cache.dtype}  # the storage dtype is part of the key; extraction writes the same one
    precision = str(opts.get("precision", "32-true"))
    if precision not in ("32", "32-true"):  # reduced-precision inference changes the features: a different cache
        extra["precision"] = precision

    loaders = []
    for split, shuffle in (("train", True), ("val", False)):
        ds = data.eval_dataloader(split).dataset
        key = cache_key(backbone.identity, data.eval_transform_id, ds.ids, extra)
        cache = extract.extract_features(root, key, ds, backbone, batch_size=data.batch_size,
                                         num_workers=data.num_workers, dtype=extra["dtype"],
                                         trainer_kwargs=predict_opts,
                                         progress=bool(opts.get("enable_progress_bar", True)))
        # The epoch order follows trainer.current_epoch, so a resumed run replays the same batches (a partial, not
        # a lambda: ddp_spawn pickles the loaders, together with the trainer they read).
        loaders.append(cache.loader(batch_size=data.batch_size, shuffle=shuffle, seed=cfg.seed,
                                    epoch_seed_fn=functools.partial(getattr, trainer, "current_epoch")))
    backbone.cpu()
    return loaders


def check_resume_checkpoint(path: str | Path, classes: list[str], cfg: DictConfig, backbone: FrozenViT) -> None:
    """Refuse a resume checkpoint that is unsafe, not a cdam-pl checkpoint, or made for other classes, another head
    or other backbone weights: one line each, before any feature extraction starts."""
    meta = read_checkpoint(path)[CHECKPOINT_KEY]  # weights_only: refuses pickles that would run code
    if list(meta.get("classes", [])) != list(classes):
        raise ConfigError(f"resume checkpoint {path} was trained on classes {list(meta.get('classes', []))[:10]}, "
                          f"the data has {list(classes)[:10]}; resume with the data it was trained on or start a "
                          "new run (resume=null)")
    if meta.get("head") != to_container(cfg.head):
        raise ConfigError(f"resume checkpoint {path} has head {meta.get('head')}, the config asks for "
                          f"{to_container(cfg.head)}; use the same head.* settings or start a new run (resume=null)")
    check_backbone_matches(meta.get("backbone", {}), backbone)


@contextmanager
def _one_line_errors():
    """A user error raised inside a DataLoader worker reaches us as 'Caught DataError in DataLoader worker ...'
    followed by the worker's traceback; keep only the original message, so the CLI still prints one line."""
    try:
        yield
    except CdamError as e:
        text = str(e)
        if text.startswith("Caught ") and "Original Traceback" in text:
            last = [ln for ln in text.strip().splitlines() if ln.strip()][-1].strip()
            e.args = (re.sub(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*: ", "", last, count=1),)
        raise


def run_training(cfg: DictConfig, extra_callbacks: list | None = None) -> dict[str, Any]:
    """Train a head as configured; returns paths (run dir, checkpoints) and final validation metrics.

    A SIGTERM or Ctrl-C during training saves last.ckpt and returns early (before training, e.g. during feature
    extraction, it returns at once, keeping finished cache shards): `result["stopped"]` then holds the signal, epoch,
    step, checkpoint, exit code and a one-line message (see `cdam_pl.train.signals`); otherwise it is None.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    backbone = build_backbone(cfg)
    data = build_datamodule(cfg, backbone)
    data.setup()
    module = HeadClassifier(backbone, data.classes, head=to_container(cfg.head), optim=to_container(cfg.optim),
                            config=to_container(cfg))

    resume = cfg.resume
    version = None
    if resume == "last":
        found = sorted(Path(cfg.out_dir, cfg.run_name).glob(f"version_*/checkpoints/{LAST_NAME}.ckpt"),
                       key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"resume=last but no last.ckpt under {Path(cfg.out_dir, cfg.run_name)}")
        resume = str(found[-1])
    if resume:
        if not Path(resume).is_file():
            raise ConfigError(f"resume checkpoint {resume!r} not found")
        version = Path(resume).resolve().parent.parent.name  # keep logging into the interrupted run's folder
        check_resume_checkpoint(resume, data.classes, cfg, backbone)
    logger = AtomicTensorBoardLogger(save_dir=cfg.out_dir, name=cfg.run_name, version=version,
                                     default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    ckpt_dir = run_dir / "checkpoints"
    # The best epoch by validation accuracy, and last.ckpt after every epoch. Lightning's save_last=True on the
    # monitored callback writes last.ckpt only on epochs that also improve the metric, so resume=last could restart
    # from an earlier epoch; a second, unmonitored callback named "last" keeps it current.
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:02d}", monitor="val/acc", mode="max",
                           save_top_k=1, auto_insert_metric_name=False)
    last = ModelCheckpoint(dirpath=ckpt_dir, filename=LAST_NAME, save_top_k=1, enable_version_counter=False)
    callbacks: list = [best, last, GracefulStop(ckpt_dir / f"{LAST_NAME}.ckpt"), RestoreLoaderState(),
                       FiniteLossGuard()]
    if cfg.explain.enabled:
        callbacks.append(ExplanationCallback.from_config(cfg.explain, data))
    callbacks += list(extra_callbacks or [])

    trainer_kwargs = dict(to_container(cfg.trainer))
    trainer_kwargs.setdefault("log_every_n_steps", 10)
    try:
        trainer = L.Trainer(logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    except (TypeError, ValueError, MisconfigurationException) as e:
        raise ConfigError(f"invalid trainer option: {str(e).splitlines()[0]}") from None

    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    # The frozen backbone is in eval mode on purpose; Lightning's warning about it is noise here.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    t0 = time.perf_counter()
    use_cache = cfg.cache.enabled and not cfg.data.augment
    stopped, t_features = None, None

    def where() -> str:  # for a signal outside the training loop (inside it, GracefulStop saves and stops)
        if t_features is None:
            return "during feature extraction"
        if trainer.global_step == 0:
            return "before the first training batch"
        return f"at epoch {trainer.current_epoch} step {trainer.global_step}, outside the training loop"

    try:
        with _one_line_errors(), stop_now_on_signal(where):
            if use_cache:
                train_loader, val_loader = feature_loaders(cfg, backbone, data, trainer)
            else:
                train_loader, val_loader = data.train_dataloader(), data.val_dataloader()
            t_features = time.perf_counter() - t0
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=resume)
    except TrainingStopped as e:  # GracefulStop saved last.ckpt
        stopped = e
    except SIGTERMException:  # Lightning's own SIGTERM handling (when not in the main thread, so no handlers of ours)
        stopped = TrainingStopped(signal.SIGTERM, where=where())
    t_total = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    return {
        "run_dir": str(run_dir),
        "best_checkpoint": best.best_model_path or None,
        "last_checkpoint": str(ckpt_dir / f"{LAST_NAME}.ckpt"),
        "metrics": metrics,
        "seconds": {"features": t_total if t_features is None else t_features, "total": t_total},
        "cached": use_cache,
        "module": module,
        "trainer": trainer,
        "stopped": stopped.as_dict() if stopped is not None else None,
    }

