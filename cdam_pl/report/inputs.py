"""explain.py's inputs: each image's input size (fixed, or aspect-kept with the patch grid following it), loading
in threads one batch ahead, batches of equal size, and concept vectors from folders of example images."""
from __future__ import annotations

import math
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from PIL import Image
from torch import Tensor

from cdam_pl.data.images import list_images, load_image, path_text
from cdam_pl.data.transforms import build_transform, parse_img_size
from cdam_pl.errors import ConfigError, DataError
from cdam_pl.explain.cdam import concept_vectors


def keep_aspect_size(height: int, width: int, area: float, patch: int) -> tuple[int, int]:
    """(H, W) with the image's aspect ratio and about `area` pixels, each side a multiple of `patch` (>= patch)."""
    ratio = width / height
    h = math.sqrt(area / ratio)
    w = h * ratio
    return max(1, round(h / patch)) * patch, max(1, round(w / patch)) * patch


def check_img_size(size: Sequence[int], patch: int) -> tuple[int, int]:
    try:
        h, w = parse_img_size(size)
    except ConfigError:
        shown = " ".join(map(str, size)) if isinstance(size, Sequence) else str(size)
        raise ConfigError(f"--img-size must be positive, got {shown}") from None
    if h % patch or w % patch:
        fix = lambda s: max(patch, round(s / patch) * patch)  # noqa: E731
        raise ConfigError(f"--img-size {h} {w} is not a multiple of the patch size {patch}; "
                          f"try --img-size {fix(h)} {fix(w)}")
    return h, w


def displayed_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image as shown (EXIF orientation applied), from its header only."""
    with warnings.catch_warnings():  # a decompression bomb raises here (and is skipped) instead of printing a warning
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


@dataclass
class Item:
    index: int  # position in the sorted input list: the key prefix of the image's tensors in its shard
    path: Path
    size: tuple[int, int]  # model input (H, W)


class Sizer:
    """Input size of each image: fixed (checkpoint's or --img-size), or aspect-kept around the default area."""

    def __init__(self, default: tuple[int, int], patch: int, fixed: tuple[int, int] | None, keep_aspect: bool):
        self.default, self.patch, self.fixed, self.keep_aspect = default, patch, fixed, keep_aspect

    def __call__(self, path: Path) -> tuple[int, int]:
        if not self.keep_aspect:
            return self.fixed or self.default
        h, w = displayed_size(path)
        return keep_aspect_size(h, w, self.default[0] * self.default[1], self.patch)

    def describe(self) -> dict[str, Any]:
        if self.keep_aspect:
            return {"mode": "keep-aspect", "area_of": list(self.default), "multiple_of": self.patch}
        return {"mode": "fixed" if self.fixed else "checkpoint", "size": list(self.fixed or self.default)}


class ImageLoader:
    """load_image (RGB, EXIF, modes converted) + the backbone's eval transform at an item's size -> [3, H, W]."""

    def __init__(self, mean, std, interpolation):
        self._build = lambda size: build_transform(size, mean, std, interpolation)
        self._transforms: dict[tuple[int, int], Any] = {}

    def __call__(self, path: Path, size: tuple[int, int]) -> tuple[Tensor | None, tuple[int, int] | None, str | None]:
        try:
            img = load_image(path)
        except DataError as e:
            return None, None, str(e)
        if size not in self._transforms:
            self._transforms[size] = self._build(size)
        return self._transforms[size](img), (img.height, img.width), None


def batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Batches of equal input size: images grouped by size (groups in order of first appearance)."""
    groups: dict[tuple[int, int], list[Item]] = {}
    for it in items:
        groups.setdefault(it.size, []).append(it)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def prefetched(batches: list[list[Item]], load: ImageLoader, pool: Executor) -> Iterator[tuple[list[Item], list]]:
    """Yield (batch, [(tensor|None, original size, error)]) while the next batch loads in `pool`'s threads (one
    pool for a whole run: threads made afresh for every shard would each leave the allocator another arena)."""
    submit = lambda b: [pool.submit(load, it.path, it.size) for it in b]  # noqa: E731
    pending = submit(batches[0]) if batches else []
    for j, batch in enumerate(batches):
        current = pending
        pending = submit(batches[j + 1]) if j + 1 < len(batches) else []
        yield batch, [f.result() for f in current]


def outside_of(paths: list[Path], out: Path) -> list[Path]:
    """Drop files inside the output folder (a rerun on '.' must not explain the last run's panels)."""
    root = out.resolve()
    kept = [p for p in paths if root not in p.resolve().parents]
    if not kept:
        raise DataError(f"all {len(paths)} input images lie inside the output folder {out}; "
                        "point INPUT elsewhere or choose another --out")
    return kept


def plan(paths: Sequence[Path], sizer: Sizer, load: ImageLoader, warn,
         start: int = 0) -> tuple[list[Item], list[dict[str, Any]]]:
    """Every image's input size, from its header only; images whose header cannot be read are skipped here
    (other failures surface when the batch loads). `paths[k]` is input number `start + k`."""
    items, skipped = [], []
    for i, p in enumerate(paths, start):
        try:
            items.append(Item(i, p, sizer(p)))
        except Exception:
            _, _, err = load(p, sizer.default)
            if err is None:  # the header reader failed but the image loads: use the fixed size
                items.append(Item(i, p, sizer.fixed or sizer.default))
                continue
            warn(f"skipped: {err}")
            skipped.append({"index": i, "path": path_text(p), "reason": err})
    return items, skipped


def parse_concepts(specs: Iterable[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name = name.strip()
        if not sep or not name or not folder.strip():
            raise ConfigError(f"--concept {spec!r} is not NAME=DIR (e.g. --concept stripes=examples/stripes)")
        if name in out:
            raise ConfigError(f"--concept {name!r} is given twice; use one folder per concept name")
        path = Path(folder.strip()).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--concept {name}: folder {folder.strip()!r} not found; give a folder of example images")
        out[name] = path
    return out


def build_concepts(folders: dict[str, Path], backbone, sizer: Sizer, load: ImageLoader, device, batch_size: int,
                   warn: Callable[[str], None]) -> tuple[list[str], Tensor | None, list[dict[str, Any]]]:
    """Concept vectors [M, D] (mean embedding of each folder's readable images) and what went into them."""
    if not folders:
        return [], None, []
    examples, info = {}, []
    for name, folder in folders.items():
        try:
            paths = list_images(folder)
        except DataError:
            raise DataError(f"--concept {name}: no images in {folder}; add example images of the concept") from None
        tensors, skipped = [], []
        for p in paths:
            try:
                size = sizer(p)
            except Exception:
                size = sizer.fixed or sizer.default
            x, _, err = load(p, size)
            if err:
                warn(f"skipped concept example {path_text(p)}: {err}")
                skipped.append({"path": path_text(p), "reason": err})
            else:
                tensors.append(x.to(device))
        if not tensors:
            raise DataError(f"--concept {name}: none of the {len(paths)} images in {folder} could be read")
        examples[name] = tensors
        info.append({"name": name, "folder": path_text(folder), "images": len(tensors), "skipped": skipped})
    names, vectors = concept_vectors(backbone, examples, batch_size=batch_size)
    return names, vectors, info
