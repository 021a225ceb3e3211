"""Small pieces shared by the comparison methods (rp.py, tam.py, input_space.py, registry.py).

Every method has the captum-like signature `fn(backbone, head, images, targets[B, K], **params) -> [B, K, gh, gw]`;
these helpers check its inputs the same way everywhere and turn pixel attributions into token grids.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdam_pl.errors import CdamError

TargetsLike = Union[Tensor, Sequence[int], int]


def as_targets(targets: TargetsLike, batch: int, device: torch.device | str) -> Tensor:
    """Normalise targets to a LongTensor [B, K] on `device`: [B, K] or [B] tensors, or one list for every image."""
    if isinstance(targets, Tensor):
        idx = targets.to(device=device, dtype=torch.long)
        if idx.ndim == 1:
            idx = idx[:, None]
        if idx.ndim != 2 or idx.shape[0] != batch:
            raise CdamError(f"targets must be a LongTensor [B={batch}, K] or [B], got {tuple(targets.shape)}")
    else:
        items = [targets] if isinstance(targets, int) else list(targets)
        idx = torch.as_tensor(items, dtype=torch.long, device=device)
        if idx.ndim != 1:
            raise CdamError("targets must be a LongTensor [B, K], a LongTensor [B] or a list of class indices")
        idx = idx.expand(batch, -1)
    if idx.shape[1] == 0:
        raise CdamError("targets is empty; give at least one class index per image")
    if idx.is_inference():  # made under inference_mode: autograd (gather in a graph) could not use it
        with torch.inference_mode(False):
            idx = idx.clone()
    return idx


def check_range(idx: Tensor, num_classes: int) -> None:
    """One-line error for a class index outside the head's outputs (instead of an IndexError deep in a gather)."""
    if idx.min() < 0 or idx.max() >= num_classes:
        bad = idx[(idx < 0) | (idx >= num_classes)][0].item()
        raise CdamError(f"target class index {bad} is out of range: the head has {num_classes} classes "
                        f"(0..{num_classes - 1})")


def head_or_identity(head: nn.Module | None) -> nn.Module:
    return nn.Identity() if head is None else head


def pool_to_grid(pixel_scores: Tensor, patch: int) -> Tensor:
    """Pixel scores [B, C, H, W] -> token scores [B, gh, gw]: summed over channels and over each patch's pixels.

    Summing (not averaging) keeps totals: the token scores of Integrated Gradients still add up to
    f(x) - f(baseline). Any positive rescaling leaves every metric of the benchmark unchanged.
    """
    summed = pixel_scores.sum(1, keepdim=True)  # [B, 1, H, W]
    return (F.avg_pool2d(summed, kernel_size=patch, stride=patch) * (patch * patch))[:, 0]  # [B, gh, gw]
