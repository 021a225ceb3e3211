"""Which classes explain.py explains: `--targets topN`, `pred`, `all` or class names, resolved against the head."""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from cdam_pl.errors import ConfigError


@dataclass(frozen=True)
class TargetSpec:
    """Which classes to explain: the top-n logits, or fixed class indices."""

    text: str
    top: int | None = None  # top-n by logit (pred = top-1)
    indices: tuple[int, ...] = ()

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [B, C] -> class indices [B, K]."""
        if self.top is not None:
            return logits.topk(self.top, dim=1).indices
        return torch.tensor(self.indices, dtype=torch.long, device=logits.device).expand(logits.shape[0], -1)


def list_names(names: Sequence[str], limit: int = 100) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} classes in all)" if len(names) > limit else "")


def default_targets(classes: Sequence[str]) -> str:
    """What --targets means when not given: the top 3 classes, or all of them for a head with fewer."""
    return f"top{min(3, len(classes))}"


def parse_targets(spec: str, classes: Sequence[str]) -> TargetSpec:
    """`topN`, `pred`, `all` (every class, in the head's order) or comma-separated class names (case-insensitive;
    exact spelling wins over case-folding, and a class literally named `pred` or `all` wins over the keyword)."""
    text = spec.strip()
    exact = {c: i for i, c in enumerate(classes)}
    folded: dict[str, int] = {}
    for i, c in enumerate(classes):
        folded.setdefault(c.casefold(), i)
    m = re.fullmatch(r"top(\d+)", text.lower())
    if text.lower() == "pred" and text not in exact:
        return TargetSpec(text, top=1)
    if text.lower() == "all" and text not in exact and text.casefold() not in folded:
        return TargetSpec(text, indices=tuple(range(len(classes))))
    if m and text not in exact and text.casefold() not in folded:
        n = int(m.group(1))
        if not 1 <= n <= len(classes):
            raise ConfigError(f"--targets {text}: the head has {len(classes)} classes; use top1..top{len(classes)}")
        return TargetSpec(text, top=n)
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--targets is empty; use top3, pred, all or class names separated by commas")
    idx = []
    for name in names:
        i = exact.get(name, folded.get(name.casefold()))
        if i is None:
            close = difflib.get_close_matches(name, list(classes), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown class {name!r}{hint}; valid classes: {list_names(list(classes))}")
        idx.append(i)
    return TargetSpec(text, indices=tuple(dict.fromkeys(idx)))
