"""The attention map (AM): the last block's attention of the CLS query to each patch token, per head.

Class-agnostic and unsigned: the map the paper compares CDAM against. It comes from the same forward as CDAM
(`CDAM.explain(attention=True)`), computed from q and k of the last block, since timm's fused attention never
materialises the probabilities.
"""
from __future__ import annotations

from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT
from cdam_pl.explain._vit import as_targets
from cdam_pl.explain.cdam import CDAM, Targets
from cdam_pl.explain.registry import register_method


def attention_maps(backbone: FrozenViT, images: Tensor) -> Tensor:
    """Class-agnostic attention map: last block, CLS query -> each patch token, per head: [B, heads, gh, gw].

    Computed from q and k of the last block (timm's fused attention never materialises the probabilities).
    """
    return CDAM(backbone).explain(images, attention=True).attention


@register_method("attention", label="AM", signed=False, class_specific=False, aliases=("am",),
                 from_explanation=lambda ex: ex.attention.mean(1, keepdim=True), needs_attention=True)
def attention_map(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: Targets) -> Tensor:
    """attention map: last-block CLS attention to each patch, mean over heads (class-agnostic)"""
    k = as_targets(targets, images.shape[0], images.device).shape[1]
    am = attention_maps(backbone, images).mean(1, keepdim=True).float()  # [B, 1, gh, gw]
    return am.expand(-1, k, -1, -1).contiguous()
