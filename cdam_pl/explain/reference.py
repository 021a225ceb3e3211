"""The literal definition of CDAM, slow on purpose: an oracle for tests and the baseline in benchmarks.

Hooks on `blocks[-1].norm1` keep T, autograd runs through the whole model down to the pixels, one target per
backward: S_i = sum_j T_ij dF/dT_ij. This is how the authors' reference notebook computes it. The library never
calls this; use `cdam_pl.explain.CDAM`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from cdam_pl.backbone import FrozenViT


@contextmanager
def _kept_tokens(backbone: FrozenViT, z_transform: Callable[[Tensor], Tensor] | None) -> Iterator[dict]:
    """While open, a forward of `backbone` stores T (the output of blocks[-1].norm1) under "T", after z_transform
    perturbed the last block's input."""
    blk = backbone.model.blocks[-1]
    store: dict = {}

    def pre(mod, args):
        return (z_transform(args[0]),) if z_transform is not None else None

    def keep(mod, inp, out):
        out.retain_grad()
        store["T"] = out

    hooks = [blk.register_forward_pre_hook(pre), blk.norm1.register_forward_hook(keep)]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


def naive_cdam(
    backbone: FrozenViT,
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    z_transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """score_fn(embeddings [B, D]) -> [B] target per image. z_transform perturbs the last block's input
    (Smooth/Integrated CDAM). Returns [B, gh, gw]."""
    with _kept_tokens(backbone, z_transform) as store, torch.enable_grad():
        x = images.clone().requires_grad_(True)  # autograd through every block, down to the pixels
        score_fn(backbone(x)).sum().backward()
    t = store["T"]
    s = (t * t.grad).sum(-1)[:, backbone.num_prefix_tokens:]
    gh, gw = backbone.grid_size(*images.shape[-2:])
    return s.reshape(-1, gh, gw).detach()


def naive_cdam_many(
    backbone: FrozenViT,
    score_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    z_transform: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """`naive_cdam` for K targets at once: score_fn(embeddings [B, D]) -> [B, K]. The same hooks and full autograd;
    the K backwards (one one-hot cotangent each) run as one vmapped backward to T. Returns [B, K, gh, gw]."""
    with _kept_tokens(backbone, z_transform) as store, torch.enable_grad():
        x = images.clone().requires_grad_(True)
        scores = score_fn(backbone(x))  # [B, K]
        b, k = scores.shape
        t = store["T"]
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)[:, None].expand(k, b, k)  # [K, B, K]
        grads = torch.autograd.grad(scores, t, eye, is_grads_batched=True)[0]  # [K, B, P+N, D]
    s = (t.detach() * grads).sum(-1)[..., backbone.num_prefix_tokens:]  # [K, B, N]
    gh, gw = backbone.grid_size(*images.shape[-2:])
    return s.permute(1, 0, 2).reshape(b, k, gh, gw)
