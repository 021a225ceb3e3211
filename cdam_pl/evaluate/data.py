"""The evaluation's image sets, all offline, built from Fashion-MNIST test images the head never saw.

  fmnist      held-out single items; targets = the head's top-2 classes; mask = the item's foreground
  composites  two items of different classes side by side (1 x 2 tiles); targets = (left class, right class);
              masks = each item's foreground
  mosaics     the Focus protocol (Arias-Duart et al. 2022): 2 x 2 tiles, two of the target class and two of two other
              classes, at random positions; each tile at the head's input size, so the mosaic is twice as high and
              wide and its token grid doubles; target = the class shown twice
  photos      the bundled photos (`cdam_pl.data.photos`): no class of the head; targets = its top-2

Held out: a head trained by train.py on Fashion-MNIST learnt from the train split and was validated on a seeded
stratified subset of the TEST split; that subset is rebuilt from the checkpoint's config with the data module that
chose it (`ImageDataModule.from_config`) and left out. A head trained on other data saw no Fashion-MNIST image.

Exact object masks: an item's foreground is its pixels > 0 in the raw 28 x 28 image, resized to the tile by nearest
neighbour. On the token grid, a token is in the mask when at least half of its pixels are foreground (`masks`:
relevance mass and rank accuracy) or when any of them is (`masks_any`: the pointing game, whose hit may sit on an
item's edge).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cdam_pl.benchmark import fmnist_root, model_transform
from cdam_pl.data.datamodule import ImageDataModule
from cdam_pl.data.datasets import FashionMNISTDataset
from cdam_pl.data.splits import stratified_subset
from cdam_pl.errors import DataError

MASK_FRACTION = 0.5  # a token is in an object's mask when at least this share of its pixels are foreground
TILES = 4  # a Focus mosaic: 2 x 2 tiles


@dataclass
class EvalSet:
    """Images with K targets each, and what the localisation metrics need to score their maps."""

    name: str
    images: Tensor  # [B, 3, H, W] normalised, on the CPU
    targets: Tensor  # [B, K] class indices
    ids: list[str]  # one stable id per image (scores.csv's `image` column)
    titles: list[str]
    masks: Tensor | None = None  # [B, K, gh, gw] bool: >= MASK_FRACTION of the token's pixels are the target's object
    masks_any: Tensor | None = None  # [B, K, gh, gw] bool: any pixel of the token is the target's object
    tiles: Tensor | None = None  # [B, 4] bool: mosaic tiles showing the target class (TL, TR, BL, BR)
    labels: Tensor | None = None  # [B] true class of single items
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, idx: Sequence[int] | Tensor) -> "EvalSet":
        """The images at `idx`, with their targets, masks and ids."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return EvalSet(self.name, self.images[idx], self.targets[idx], [self.ids[i] for i in idx.tolist()],
                       [self.titles[i] for i in idx.tolist()], pick(self.masks), pick(self.masks_any),
                       pick(self.tiles), pick(self.labels), self.note, dict(self.extra))


def validation_indices(config: Mapping[str, Any], data_config: Mapping[str, Any], img_size) -> list[int]:
    """Fashion-MNIST test indices the head was validated on, rebuilt with the data module that chose them (the
    checkpoint's `data` section and `seed`); [] when the head trained on other data."""
    data = dict(config.get("data") or {})
    if data.get("name") != "fashion_mnist":
        return []
    dm = ImageDataModule.from_config(data, data_config, img_size, seed=int(config.get("seed", 0)), validate=False)
    dm.setup()
    return sorted(int(i.rsplit("/", 1)[1]) for i in dm.val_dataset.ids)


def heldout_indices(test: FashionMNISTDataset, pool: Sequence[int], n: int, seed: int) -> list[int]:
    """n of the held-out test indices `pool`, class-stratified and seeded; an error when fewer are held out."""
    pool = np.asarray(pool, dtype=np.int64)
    if len(pool) < n:
        raise DataError(f"only {len(pool)} Fashion-MNIST test images are held out from the head's validation set, "
                        f"{n} asked for; ask for fewer (--images)")
    pick = stratified_subset([test.targets[i] for i in pool], n, seed)
    return pool[pick].tolist()


def foreground(test: FashionMNISTDataset, index: int) -> Tensor:
    """The item's exact mask: its pixels > 0 in the raw 28 x 28 image, [28, 28] bool."""
    return torch.from_numpy(np.asarray(test.images[index]) > 0)


def token_masks(pixel_masks: Tensor, patch: int) -> tuple[Tensor, Tensor]:
    """Pixel masks [..., H, W] -> token masks [..., H / patch, W / patch] (bool): (>= MASK_FRACTION of the token's
    pixels inside, any pixel inside)."""
    lead, (h, w) = pixel_masks.shape[:-2], pixel_masks.shape[-2:]
    frac = F.avg_pool2d(pixel_masks.reshape(-1, 1, h, w).float(), patch)  # [M, 1, gh, gw]
    frac = frac.reshape(*lead, h // patch, w // patch)
    return frac >= MASK_FRACTION, frac > 0


def _tile_mask(mask28: Tensor, size: tuple[int, int]) -> Tensor:
    """An item's raw mask resized to its tile, nearest neighbour: [28, 28] -> [h, w] bool."""
    return F.interpolate(mask28[None, None].float(), size=size, mode="nearest")[0, 0] > 0


def tile_grid(tiles: Tensor, rows: int, cols: int) -> Tensor:
    """Tiles [rows * cols, C, h, w] in reading order -> one image [C, rows * h, cols * w]."""
    n, c, h, w = tiles.shape
    if n != rows * cols:
        raise ValueError(f"{rows} x {cols} tiles need {rows * cols} images, got {n}")
    return tiles.view(rows, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, rows * h, cols * w)


class TileSource:
    """Held-out Fashion-MNIST items as tiles at the head's input size, with their foreground masks."""

    def __init__(self, model, test: FashionMNISTDataset, pool: Sequence[int]):
        self.test, self.pool = test, list(pool)
        self.size = tuple(model.backbone.img_size)
        self.patch = model.backbone.patch_size
        self.tf = model_transform(model, self.size)
        labels = np.asarray(test.targets)[self.pool]
        self.by_class = {int(c): np.asarray(self.pool)[labels == c] for c in np.unique(labels)}

    def image(self, i: int) -> Tensor:
        return self.tf(self.test.load_image(int(i)))  # [3, h, w]

    def mask(self, i: int) -> Tensor:
        return _tile_mask(foreground(self.test, int(i)), self.size)  # [h, w]

    def draw(self, rng: np.random.Generator, cls: int) -> int:
        return int(rng.choice(self.by_class[int(cls)]))


def fmnist_set(model, test: FashionMNISTDataset, idx: Sequence[int], choose: Callable[[Tensor], Tensor]) -> EvalSet:
    """Single held-out items; `choose(images)` gives their targets [B, K] (the head's top-2); every target's mask
    is the item's foreground."""
    src = TileSource(model, test, idx)
    images = torch.stack([src.image(i) for i in idx])
    targets = choose(images)
    pixel = torch.stack([src.mask(i) for i in idx])[:, None].expand(-1, targets.shape[1], -1, -1)
    half, anyp = token_masks(pixel, src.patch)
    names = model.classes
    titles = [f"{test.classes[test.targets[i]]} (pred {names[t]})" for i, t in zip(idx, targets[:, 0].tolist())]
    return EvalSet("fmnist", images, targets, [f"test/{i}" for i in idx], titles, half, anyp,
                   labels=torch.tensor([test.targets[i] for i in idx]),
                   note="held-out Fashion-MNIST test items, targets = the head's top-2 classes, "
                   "mask = the item's foreground")


def composite_set(model, test: FashionMNISTDataset, pool: Sequence[int], n: int, seed: int) -> EvalSet:
    """n pairs of held-out items of two different classes side by side: targets = (left class, right class)."""
    src = TileSource(model, test, pool)
    rng = np.random.default_rng(seed + 1)
    classes = sorted(src.by_class)
    images, targets, ids, pixel = [], [], [], []
    for _ in range(n):
        a, b = (int(c) for c in rng.choice(classes, 2, replace=False))
        ia, ib = src.draw(rng, a), src.draw(rng, b)
        images.append(tile_grid(torch.stack([src.image(ia), src.image(ib)]), 1, 2))
        ma, mb = src.mask(ia), src.mask(ib)
        blank = torch.zeros_like(ma)
        pixel.append(torch.stack([torch.cat([ma, blank], 1), torch.cat([blank, mb], 1)]))  # [2, h, 2w]
        targets.append([a, b])
        ids.append(f"test/{ia}+test/{ib}")
    half, anyp = token_masks(torch.stack(pixel), src.patch)
    names = test.classes
    return EvalSet("composites", torch.stack(images), torch.tensor(targets), ids,
                   [f"{names[a]} | {names[b]}" for a, b in targets], half, anyp,
                   note="two held-out Fashion-MNIST items of different classes side by side, targets = (left "
                   "class, right class), masks = each item's foreground")


def mosaic_set(model, test: FashionMNISTDataset, pool: Sequence[int], n: int, seed: int) -> EvalSet:
    """n Focus mosaics: two tiles of the target class and two of two other classes at random positions."""
    src = TileSource(model, test, pool)
    rng = np.random.default_rng(seed + 2)
    classes = sorted(src.by_class)
    if len(classes) < 3:
        raise DataError(f"mosaics need held-out items of at least 3 classes, found {len(classes)}")
    images, targets, ids, tiles, pixel = [], [], [], [], []
    for _ in range(n):
        c, o1, o2 = (int(k) for k in rng.choice(classes, 3, replace=False))
        on = np.zeros(TILES, dtype=bool)
        on[rng.choice(TILES, 2, replace=False)] = True
        others = iter((o1, o2))
        items = [src.draw(rng, c if on[t] else next(others)) for t in range(TILES)]
        images.append(tile_grid(torch.stack([src.image(i) for i in items]), 2, 2))
        masks = [src.mask(i) if on[t] else torch.zeros(src.size, dtype=torch.bool) for t, i in enumerate(items)]
        pixel.append(tile_grid(torch.stack(masks)[:, None], 2, 2))  # [1, 2h, 2w]: target items' foreground
        targets.append([c])
        tiles.append(torch.from_numpy(on))
        ids.append("+".join(f"test/{i}" for i in items))
    half, anyp = token_masks(torch.stack(pixel), src.patch)
    names = test.classes
    return EvalSet("mosaics", torch.stack(images), torch.tensor(targets), ids,
                   [f"{names[t[0]]} x2" for t in targets], half, anyp, torch.stack(tiles),
                   note="2 x 2 Focus mosaics of held-out items (two tiles of the target class, two of two other "
                   "classes, random positions; each tile at the head's input size), target = the class shown twice")


def fashion_mnist(model) -> FashionMNISTDataset:
    """The Fashion-MNIST test split the checkpoint's config names (or the default install)."""
    return FashionMNISTDataset(fmnist_root(model.config), "test")


def holdout_pool(model, test: FashionMNISTDataset) -> list[int]:
    """Every test index outside the head's validation subset."""
    val = set(validation_indices(model.config, model.backbone.data_config, model.backbone.img_size))
    pool = [i for i in range(len(test)) if i not in val]
    if not pool:
        raise DataError("the head was validated on the whole Fashion-MNIST test split: no held-out image is left")
    return pool


def seeded_order(n: int, seed: int) -> Tensor:
    """A seeded permutation of range(n): its first k entries are the seeded subset of size k (subsets nest)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))

