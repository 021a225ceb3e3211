"""The demo's example images: four of the bundled photos plus a few validation images of the checkpoint's data
(one per class, where that data is on this machine)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image

from cdam_pl.data.datamodule import ImageDataModule
from cdam_pl.data.photos import PHOTOS, load_photo
from cdam_pl.errors import DataError

__all__ = ["Example", "demo_examples"]

# the last one is a portrait in uniform: clothing, for a head trained on clothing
EXAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "grace_hopper")


@dataclass
class Example:
    id: str
    name: str
    source: str  # the package that ships the photo, or "validation"
    image: Image.Image  # RGB


def _photo_examples() -> list[Example]:
    """The EXAMPLE_PHOTOS (`cdam_pl.data.photos`); none where their package is not installed."""
    try:
        return [Example(key, PHOTOS[key].label, PHOTOS[key].package, load_photo(key)) for key in EXAMPLE_PHOTOS]
    except DataError:  # the demo works without its photos
        return []


def _validation_examples(config: dict[str, Any], backbone, n: int) -> list[Example]:
    """Up to n validation images of distinct classes, from the data the head was validated on (empty when that data
    is not on this machine)."""
    d = dict(config.get("data") or {})
    if n <= 0 or not d.get("name"):
        return []
    dm = ImageDataModule.from_config(d, backbone.data_config, backbone.img_size, seed=int(config.get("seed", 0)),
                                     batch_size=1, num_workers=0, augment=False, validate=False)
    dm.setup()
    val = dm.val_dataset
    out, seen = [], set()
    for i, label in enumerate(val.targets):
        if label in seen:
            continue
        seen.add(label)
        out.append(Example(f"val-{i}", f"validation #{i} (true: {val.classes[label]})", "validation",
                           val.load_image(i)))
        if len(out) == n:
            break
    return out


def demo_examples(config: dict[str, Any], backbone, n_validation: int = 4,
                  warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> list[Example]:
    """Four bundled photos plus a few of the checkpoint's validation images where available."""
    out = _photo_examples()
    try:
        out += _validation_examples(config, backbone, n_validation)
    except Exception as e:  # the data moved, is not installed here, ...: the demo works without it
        warn(f"note: no validation examples ({' '.join(str(e).split())[:200]})")
    return out
