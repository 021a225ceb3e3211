"""Array plumbing shared by the map and figure modules of `cdam_pl.viz`: inputs to numpy, token grids, colormaps."""
from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
import torch


def to_numpy(x: Any) -> np.ndarray:
    """Copy a torch tensor (any device/dtype, with grad) or array-like into a new numpy array."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        return t.numpy().copy()
    return np.array(x, copy=True)


def as_grid(map_: Any) -> np.ndarray:
    """Map -> float64 array [gh, gw] (leading singleton dims such as [1, gh, gw] are dropped)."""
    m = to_numpy(map_).astype(np.float64, copy=False)
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D token map [gh, gw], got shape {tuple(m.shape)}")
    if m.size == 0:
        raise ValueError("token map is empty")
    return m


def colormap(name: str):
    """A registered matplotlib colormap by name."""
    return matplotlib.colormaps[name]
