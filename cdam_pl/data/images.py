"""Reading image files: `load_image` (any common file -> 8-bit RGB), `check_image` (a cheap validity check),
`list_images` (files, folders and globs -> a sorted file list) and `path_text` (a path as printable text).

Every failure is a one-line `DataError` (or reason string) naming the file, what is wrong and how to fix it.
`to_rgb` and `error_reason` are the conversion and the reason text `load_image` uses, public so other readers
(e.g. the web demo decoding uploaded bytes) apply exactly the same rules.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cdam_pl.errors import DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "error_reason",
    "path_text",
    "to_rgb",
    "load_image",
    "check_image",
    "walk_images",
    "list_images",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
    ".ppm", ".pgm", ".pbm", ".pnm",
)

_FIX_HINT = "replace or delete the file"


def _one_line(text: object) -> str:
    """Collapse whitespace so a message fits on one line."""
    return " ".join(str(text).split())


def error_reason(exc: BaseException) -> str:
    """A short, one-line description of why PIL (or the file system) could not read a file."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format (or its header is corrupt)"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"image is too large, possible decompression bomb ({_one_line(exc)})"
    msg = _one_line(exc)
    name = type(exc).__name__
    return f"{name}: {msg}" if msg else name


def path_text(path: str | os.PathLike[str]) -> str:
    """`path` as printable UTF-8 text: bytes of a file name that are not UTF-8 are shown as `\\xNN`.

    Python keeps such bytes as lone surrogates (os.fsdecode), which JSON, HTML, fonts and strict UTF-8 streams
    refuse; use this wherever a path is written or drawn.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_error(path: Path | str, reason: str, hint: str = _FIX_HINT) -> DataError:
    return DataError(_one_line(f"cannot read image {path_text(path)}: {reason}; {hint}"))


def _file_problem(path: Path) -> tuple[str, str] | None:
    """`(reason, hint)` if `path` is not an existing, non-empty regular file, else None."""
    try:
        if not path.exists():
            return "file not found", "check the path"
        if not path.is_file():
            return "not a regular file", "pass an image file"
        if path.stat().st_size == 0:
            return "file is empty (0 bytes)", _FIX_HINT
    except OSError as exc:  # permission problems, broken mounts
        return error_reason(exc), "check the file's permissions"
    return None


def _bomb_check(im: Image.Image) -> None:
    """Treat images above PIL's warning threshold as decompression bombs."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        raise Image.DecompressionBombError(
            f"{im.width}x{im.height} = {im.width * im.height} pixels exceeds the limit of "
            f"{limit} pixels"
        )


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (alpha composited on white, 16-bit scaled down)."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit int holding 16-bit) grayscale: scale 0..65535 -> 0..255.
        arr = np.asarray(im).astype(np.float64)
        arr = np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        # Float grayscale: assume [0, 1] when that is its range, else [0, 255].
        arr = np.asarray(im).astype(np.float64)
        arr = np.nan_to_num(arr)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    )
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file as a fully loaded 8-bit RGB PIL image.

    Honours EXIF orientation; converts grayscale, palette, 16-bit and alpha images (alpha is
    composited on white). Raises `DataError` (one line, naming the file) for a missing, empty,
    non-image, truncated, corrupt or oversized (decompression bomb) file.
    """
    p = Path(path)
    problem = _file_problem(p)
    if problem is not None:
        raise _read_error(p, *problem)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                _bomb_check(im)
                im.load()
                im = ImageOps.exif_transpose(im)  # returns a detached copy
        rgb = to_rgb(im)
        if rgb.mode != "RGB":  # defensive: never hand back anything else
            rgb = rgb.convert("RGB")
        return rgb
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise _read_error(p, error_reason(exc)) from exc


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Cheaply check that a file is a readable image; return a one-line reason if it is not.

    PNGs are checked with `verify()` (all chunk CRCs), JPEGs are decoded at 1/8 scale (catches
    truncation), other formats are fully decoded. Does not change warning filters, so it is
    safe to call from threads.
    """
    p = Path(path)
    problem = _file_problem(p)
    if problem is not None:
        return problem[0]
    try:
        with Image.open(p) as im:
            _bomb_check(im)
            if im.format == "PNG":
                im.verify()
            else:
                if im.format == "JPEG":
                    im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except Exception as exc:
        return error_reason(exc)
    return None


def _is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def walk_images(folder: Path) -> list[Path]:
    """Image files below `folder` (recursive, sorted), skipping hidden files and folders."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            f = Path(dirpath) / name
            if _is_image_name(f) and f.is_file():
                found.append(f)
    return sorted(found)


def list_images(inputs: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand image files, folders (recursive) and glob patterns into a sorted, unique list.

    Explicitly named files are kept whatever their extension; folders and globs contribute
    files with an extension in `IMAGE_EXTENSIONS`. Raises `DataError` for a path that does not
    exist or when nothing is found.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: set[Path] = set()
    for item in items:
        text = os.fspath(item)
        p = Path(text).expanduser()
        if p.is_file():
            found.add(p)
        elif p.is_dir():
            found.update(walk_images(p))
        elif glob.has_magic(text):
            for match in glob.glob(os.path.expanduser(text), recursive=True):
                m = Path(match)
                if m.is_dir():
                    found.update(walk_images(m))
                elif m.is_file() and _is_image_name(m):
                    found.add(m)
        else:
            raise DataError(f"input not found: {text}; pass an image file, a folder or a glob")
    if not found:
        shown = ", ".join(os.fspath(i) for i in items[:3]) + (" ..." if len(items) > 3 else "")
        raise DataError(
            f"no images found in {shown or '(no inputs)'}; supported extensions: "
            f"{' '.join(IMAGE_EXTENSIONS)}"
        )
    return sorted(found)
