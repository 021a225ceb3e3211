"""The literal definition of CDAM, slow on purpose: an oracle for tests and the baseline in benchmarks.

Hooks on `blocks[-1].norm1` keep T, autograd runs through the whole model down to the pixels, one target per
backward: S_i = sum_j T_ij dF/dT_ij. This is how the authors' reference notebook computes it. The library never
calls this; use `cdam_pl.explain.CDAM`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from cdam_pl.backbone import FrozenViT


def naive_cdam(
    backbone: FrozenViT,
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    z_transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """score_fn(embeddings [B, D]) -> [B] target per image. z_transform perturbs the last block's input
    (Smooth/Integrated CDAM). Returns [B, gh, gw]."""
    blk = backbone.model.blocks[-1]
    store = {}

    def pre(mod, args):
        return (z_transform(args[0]),) if z_transform is not None else None

    def keep(mod, inp, out):
        out.retain_grad()
        store["T"] = out

    hooks = [blk.register_forward_pre_hook(pre), blk.norm1.register_forward_hook(keep)]
    try:
        with torch.enable_grad():
            x = images.clone().requires_grad_(True)  # autograd through every block, down to the pixels
            score_fn(backbone(x)).sum().backward()
    finally:
        for h in hooks:
            h.remove()
    t = store["T"]
    s = (t * t.grad).sum(-1)[:, backbone.num_prefix_tokens:]
    gh, gw = backbone.grid_size(*images.shape[-2:])
    return s.reshape(-1, gh, gw).detach()
