"""Where the explanation callback's scalars and pictures go: every logger of the trainer, nothing silently dropped.

- Scalars: `logger.log_metrics` of every logger.
- Pictures (uint8 HWC, one per tag `explain/imgNN/<kind>`): TensorBoard's `experiment.add_image` (with histograms);
  a logger with `log_image(key, images, step=...)` (the Weights & Biases convention: WandbLogger); any other logger
  (CSVLogger, ...) gets PNG files `<its log_dir, or the trainer's default_root_dir>/explanations/imgNN/<kind>/
  step_SSS.png`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cdam_pl.viz.maps import save_png

__all__ = ["EXPLANATIONS_DIR", "log_dir", "png_path", "publish"]

EXPLANATIONS_DIR = "explanations"


def log_dir(logger: Any, default: str | Path) -> Path:
    """A logger's run folder (never trainer.log_dir: it broadcasts), else `default`."""
    return Path(getattr(logger, "log_dir", None) or default)


def png_path(root: str | Path, tag: str, step: int) -> Path:
    """Where a picture logged under `tag` at `step` goes as a file: explain/img00/classes -> img00/classes/..."""
    parts = tag.split("/")[1:] if tag.startswith("explain/") else tag.split("/")
    return Path(root, EXPLANATIONS_DIR, *parts, f"step_{step:03d}.png")


def publish(loggers: Sequence[Any], default_dir: str | Path, step: int, scalars: Mapping[str, float],
            histograms: Mapping[str, np.ndarray], pictures: Callable[[], dict[str, np.ndarray]]) -> list[Path]:
    """Send one logging step to every logger; `pictures` is drawn once, when the first logger needs it. Returns the
    PNG files written for loggers that take no images."""
    drawn: dict[str, np.ndarray] | None = None
    written: list[Path] = []

    def get() -> dict[str, np.ndarray]:
        nonlocal drawn
        drawn = pictures() if drawn is None else drawn
        return drawn

    for logger in loggers:
        logger.log_metrics(dict(scalars), step=step)
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_image"):  # TensorBoard
            for tag, values in histograms.items():
                exp.add_histogram(tag, values, step)
            for tag, image in get().items():
                exp.add_image(tag, image, step, dataformats="HWC")
        elif callable(getattr(logger, "log_image", None)):  # Weights & Biases and loggers of its convention
            for tag, image in get().items():
                logger.log_image(key=tag, images=[image], step=step)
        else:
            root = log_dir(logger, default_dir)
            written += [save_png(image, png_path(root, tag, step)) for tag, image in get().items()]
        if hasattr(exp, "flush"):
            exp.flush()
    return written
