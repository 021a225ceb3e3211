"""What `ExplanationCallback` explains, found in whatever a Lightning project hands the trainer.

- The model (`find_model`): this project's `HeadClassifier` (a `.backbone` view and a `.head`); a LightningModule's
  `cdam_model()` returning a timm or Hugging Face ViT classifier or a (backbone, head) pair; else the one timm
  VisionTransformer or transformers ViT among its submodules. A backbone that is not a `FrozenViT`, or one with a
  parameter that requires grad, trains, so what depends on it alone (concept vectors, attention) changes too.
- The tracked images (`pick_images`): a class-stratified, seeded subset of the validation data the trainer already
  has (`trainer.datamodule.val_dataset`, else the dataset of the first validation dataloader), read from the dataset
  directly (no DataLoader: its iterator draws a seed from the global RNG) with every global RNG restored afterwards.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.utils.data import Subset

from cdam_pl.backbone import FrozenViT, ViTFeatures, check_vit
from cdam_pl.data.splits import stratified_subset
from cdam_pl.errors import CdamError
from cdam_pl.explain.cdam import CDAM
from cdam_pl.explain.models import ClassifierViT

__all__ = ["DEFINE_CDAM_MODEL", "Explained", "Tracked", "find_model", "pick_images", "rng_untouched"]

DEFINE_CDAM_MODEL = ("define cdam_model() on your LightningModule, returning the ViT classifier to explain (a timm "
                     "VisionTransformer or a transformers ViTForImageClassification) or a (backbone, head) pair")
IMAGE_KEYS = ("image", "pixel_values", "img", "x", "input")
LABEL_KEYS = ("label", "labels", "target", "y")


@dataclass
class Explained:
    """The backbone view and head CDAM explains, and whether the backbone is being trained."""

    backbone: ViTFeatures
    head: nn.Module
    trains_backbone: bool
    classes: list[str] | None = None  # class names the model itself carries (a Hugging Face config's id2label)


def _explained(backbone: ViTFeatures, head: nn.Module, classes: list[str] | None = None) -> Explained:
    trains = not isinstance(backbone, FrozenViT) or any(p.requires_grad for p in backbone.parameters())
    return Explained(backbone, head, trains, classes)


def _hf_classes(model: nn.Module) -> list[str] | None:
    """A Hugging Face config's label names, unless they are its placeholders LABEL_0, LABEL_1, ..."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(len(id2label))]
    return names if names and names != [f"LABEL_{i}" for i in range(len(names))] and all(names) else None


def _from_classifier(model: nn.Module) -> Explained:
    cdam = CDAM.from_model(model)
    return _explained(cdam.backbone, cdam.head, _hf_classes(model))


def _is_vit(module: nn.Module) -> bool:
    """A timm VisionTransformer or a transformers ViT model (ViTForImageClassification, ViTModel, ...)."""
    cls = type(module)
    return isinstance(module, VisionTransformer) or (
        cls.__module__.split(".")[0] == "transformers" and cls.__name__.startswith("ViT") and cls.__name__.endswith(
            ("Model", "ForImageClassification")))


def _vits(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(name, module) of the ViTs under `module`, outermost only (a classifier's own ViT is not counted again)."""
    found = []
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        found += [(path, child)] if _is_vit(child) else _vits(child, path + ".")
    return found


def find_model(pl_module: nn.Module) -> Explained:
    """The model to explain inside `pl_module` (see the module docstring); a one-line CdamError when none or
    several could be meant."""
    backbone, head = getattr(pl_module, "backbone", None), getattr(pl_module, "head", None)
    if isinstance(backbone, ViTFeatures) and isinstance(head, nn.Module):
        return _explained(backbone, head)
    if callable(getattr(pl_module, "cdam_model", None)):
        model = pl_module.cdam_model()
        if isinstance(model, (tuple, list)) and len(model) == 2:
            backbone, head = model
            if isinstance(backbone, VisionTransformer):
                check_vit(backbone, "the backbone cdam_model() returned")
                backbone = ClassifierViT(backbone)  # timm's own pooling; its own head (if any) is not used
            if not isinstance(backbone, ViTFeatures) or not isinstance(head, nn.Module):
                raise CdamError(f"cdam_model() returned ({type(backbone).__name__}, {type(head).__name__}); a pair "
                                "must be (a timm VisionTransformer or cdam_pl FrozenViT, a head module)")
            return _explained(backbone, head)
        if not isinstance(model, nn.Module):
            raise CdamError(f"cdam_model() returned a {type(model).__name__}; {DEFINE_CDAM_MODEL}")
        return _from_classifier(model)
    found = _vits(pl_module)
    if len(found) == 1:
        return _from_classifier(found[0][1])
    what = "no timm or Hugging Face ViT" if not found else \
        f"{len(found)} ViTs ({', '.join(name for name, _ in found)})"
    raise CdamError(f"ExplanationCallback found {what} in {type(pl_module).__name__}; {DEFINE_CDAM_MODEL}")


# --- the tracked images -------------------------------------------------------------------------------------------
@contextmanager
def rng_untouched() -> Iterator[None]:
    """Restore the global torch (CPU), numpy and Python RNG states afterwards, so reading samples through a
    transform that draws random numbers never shifts training."""
    states = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])
        random.setstate(states[2])


@dataclass
class Tracked:
    """Tracked images [B, 3, H, W] as the model sees them, their labels [B], ids, and what the data knows."""

    images: Tensor
    labels: Tensor
    ids: list[str]
    classes: list[str] | None
    mean: Sequence[float] | None
    std: Sequence[float] | None
    transform: Any  # the data's eval transform (PIL -> tensor) when it has one, for concept folders


def _val_dataset(trainer: Any) -> tuple[Any, Any]:
    """(validation dataset, datamodule or None) from what the trainer has."""
    dm = getattr(trainer, "datamodule", None)
    dataset = getattr(dm, "val_dataset", None)
    if dataset is None:
        loaders = getattr(trainer, "val_dataloaders", None)
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
    if dataset is None:
        raise CdamError("ExplanationCallback found no validation data to pick its images from: give the trainer "
                        "validation data (a DataModule with val_dataset, or val_dataloaders) or pass images= and "
                        "labels=")
    return dataset, dm


def _split(sample: Any) -> tuple[Any, Any]:
    """(image, label) of one sample: a tuple (x, y, ...) or a dict with an image and a label key."""
    if isinstance(sample, dict):
        x = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
        y = next((sample[k] for k in LABEL_KEYS if k in sample), None)
        if x is not None and y is not None:
            return x, y
    elif isinstance(sample, (tuple, list)) and len(sample) >= 2:
        return sample[0], sample[1]
    raise CdamError(f"validation samples must be (image, label) tuples or dicts with {IMAGE_KEYS[0]!r} and "
                    f"{LABEL_KEYS[0]!r}, got a {type(sample).__name__}; pass images= and labels=")


def _targets(dataset: Any, max_reads: int) -> np.ndarray:
    """Labels of the dataset: its `targets` (through Subsets), else read from up to `max_reads` samples (the
    images are then picked among those)."""
    base, rows = dataset, None
    while isinstance(base, Subset):
        rows = np.asarray(base.indices) if rows is None else np.asarray(base.indices)[rows]
        base = base.dataset
    targets = getattr(base, "targets", None)
    if targets is not None and len(targets) == len(base):
        t = np.asarray(torch.as_tensor(targets).cpu(), dtype=np.int64).reshape(-1)
        return t if rows is None else t[rows]
    with rng_untouched():
        return np.asarray([int(_split(dataset[i])[1]) for i in range(min(len(dataset), max_reads))], dtype=np.int64)


def _classes(dataset: Any, dm: Any) -> list[str] | None:
    for source in (dm, dataset, getattr(dataset, "dataset", None)):
        classes = getattr(source, "classes", None)
        if classes is not None and not callable(classes) and len(classes) > 0:
            return [str(c) for c in classes]
    return None


def pick_images(trainer: Any, num_images: int, seed: int, max_label_reads: int) -> Tracked:
    """`num_images` validation images stratified by class (seeded), from the trainer's validation data."""
    dataset, dm = _val_dataset(trainer)
    if len(dataset) == 0:
        raise CdamError("the validation dataset is empty; ExplanationCallback needs images to track")
    targets = _targets(dataset, max_label_reads)
    idx = stratified_subset(targets, num_images, seed)
    with rng_untouched():
        samples = [_split(dataset[i]) for i in idx]
    for x, _ in samples:
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise CdamError(f"validation images must be tensors [3, H, W] after the dataset's transform, got "
                            f"{shape}; give the dataset a transform to tensors or pass images= and labels=")
    if len({tuple(x.shape) for x, _ in samples}) > 1:
        raise CdamError("the picked validation images differ in size; resize them to one size in the dataset's "
                        "transform or pass images= and labels=")
    ids = getattr(dataset, "ids", None)
    return Tracked(
        images=torch.stack([x.detach().cpu() for x, _ in samples]),
        labels=torch.tensor([int(targets[i]) for i in idx], dtype=torch.long),
        ids=[str(ids[i]) for i in idx] if ids is not None and len(ids) == len(dataset) else [f"val {i}" for i in idx],
        classes=_classes(dataset, dm), mean=getattr(dm, "mean", None), std=getattr(dm, "std", None),
        transform=getattr(dm, "eval_transform", None),
    )
