"""Relevance propagation (RP): Chefer, Gur and Wolf 2021, "Generic attention-model explainability".

For a target logit f and every block l with attention probabilities A_l [B, heads, T, T]:

    R = I;   for l = 1..L:   Abar_l = mean_heads(clamp(df/dA_l * A_l, min=0));   R = R + Abar_l @ R

and the map is R[CLS, patch tokens] (the P prefix tokens, CLS plus registers, are dropped). Unsigned (>= 0).

timm's fused attention never materialises A, so `recording_attention` swaps every block's attention forward for
the textbook one (qkv -> softmax(q k^T * scale) -> probs @ v -> proj) that records the probabilities; the swap is
undone on exit, also after an error. All K targets share one forward; one backward per target.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from timm.layers import Attention
from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT
from cdam_pl.errors import CdamError
from cdam_pl.explain._vit import TargetsLike, as_targets, check_range, explaining, head_or_identity, plain
from cdam_pl.explain.registry import register_method


def _manual_forward(attn: nn.Module, store: list[Tensor]):
    """timm Attention.forward written out, with A = softmax(q k^T * scale) kept in `store` (not detached: df/dA_l
    must include the paths through the later blocks' attention, as with Chefer's gradient hooks)."""

    def forward(x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, **_: object) -> Tensor:
        if attn_mask is not None or is_causal:
            raise CdamError("relevance propagation does not support attention masks")
        b, n, _c = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, h, T, dh] each
        q, k = attn.q_norm(q), attn.k_norm(k)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, T, T]
        store.append(probs)
        out = (attn.attn_drop(probs) @ v).transpose(1, 2).reshape(b, n, attn.attn_dim)  # [B, T, A]
        return attn.proj_drop(attn.proj(attn.norm(out)))

    return forward


@contextmanager
def recording_attention(backbone: FrozenViT) -> Iterator[list[Tensor]]:
    """Inside the block, every forward of the backbone appends each block's attention probabilities
    [B, heads, T, T] (in block order) to the yielded list; they are in the autograd graph when the input requires
    grad. The original forwards are always restored on exit."""
    attns = [blk.attn for blk in backbone.model.blocks]
    bad = [type(a).__name__ for a in attns if type(a) is not Attention or getattr(a, "gate", None) is not None]
    if bad:
        raise CdamError(f"relevance propagation needs timm's standard Attention in every block, found {bad[0]}")
    store: list[Tensor] = []
    saved = [a.__dict__.get("forward") for a in attns]
    try:
        for a in attns:
            a.forward = _manual_forward(a, store)
        yield store
    finally:
        for a, old in zip(attns, saved):
            if old is None:
                a.__dict__.pop("forward", None)
            else:
                a.forward = old


def rollout(probs: list[Tensor], grads: list[Tensor], num_prefix: int) -> Tensor:
    """Chefer's rule. probs, grads: per block [..., heads, T, T] -> relevance of the patch tokens for CLS [..., N]."""
    t = probs[0].shape[-1]
    lead = probs[0].shape[:-3]
    r = torch.eye(t, dtype=probs[0].dtype, device=probs[0].device).expand(*lead, t, t)
    for a, g in zip(probs, grads):
        abar = (g * a).clamp(min=0).mean(dim=-3)  # [..., T, T]
        r = r + abar @ r
    return r[..., 0, num_prefix:]


@register_method("rp", label="RP", signed=False,
                 description="relevance propagation (Chefer et al. 2021) over all blocks")
def relevance_propagation(
    backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: TargetsLike
) -> Tensor:
    """Chefer et al.'s relevance map for each target logit -> [B, K, gh, gw] float32, >= 0."""
    gh, gw = backbone.check_images(images)
    head = head_or_identity(head)
    idx = as_targets(targets, images.shape[0], images.device)
    with explaining(backbone, head), recording_attention(backbone) as probs:
        x = plain(images).detach().requires_grad_()  # puts A in the graph; autograd.grad stops at A
        logits = head(backbone(x))  # [B, C]
        check_range(idx, logits.shape[1])
        out = logits.gather(1, idx)  # [B, K]
        maps = []
        for k in range(idx.shape[1]):
            grads = torch.autograd.grad(out[:, k].sum(), probs, retain_graph=k + 1 < idx.shape[1])
            with torch.no_grad():
                maps.append(rollout([p.detach() for p in probs], list(grads), backbone.num_prefix_tokens))
    return torch.stack(maps, 1).reshape(images.shape[0], idx.shape[1], gh, gw).float()
