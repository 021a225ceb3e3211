"""Every explanation method under one name and one signature.

    >>> from cdam_pl.explain import registry
    >>> registry.names()
    ['cdam', 'smooth_cdam', 'integrated_cdam', 'am', 'rp', 'tam', 'ig', 'smoothgrad', 'ixg']
    >>> m = registry.get("tam")
    >>> maps = m(backbone, head, images, targets)        # [B, K, gh, gw] float32, on the images' device
    >>> maps = m(backbone, head, images, targets, chunk_size=64)   # override a default parameter

Signature of every method: `fn(backbone, head, images [B, 3, H, W], targets [B, K] LongTensor (or [B], or one
list of class indices for all images), **params) -> [B, K, gh, gw]`. Class-agnostic methods (the attention map)
return the same map for every target, broadcast to [B, K, gh, gw], so every consumer handles one shape (their
top-1/top-2 correlation is then 1 by construction). `signed` says whether negative scores carry meaning
(counter-evidence); unsigned maps are >= 0. The CDAM family and the attention map come from the engine
(`cdam_pl.explain.cdam`), never re-implemented.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT
from cdam_pl.errors import CdamError
from cdam_pl.explain.cdam import CDAM, attention_maps
from cdam_pl.explain.common import TargetsLike, as_targets
from cdam_pl.explain.input_space import input_x_gradient, integrated_gradients, smoothgrad
from cdam_pl.explain.rp import relevance_propagation
from cdam_pl.explain.tam import token_ablation_map


def _cdam(variant: str):
    def fn(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: TargetsLike, seed: int = 0,
           **params: Any) -> Tensor:
        idx = as_targets(targets, images.shape[0], images.device)
        gen = torch.Generator(device=images.device).manual_seed(seed) if variant != "vanilla" else None
        return CDAM(backbone, head).class_maps(images, idx, variant=variant, generator=gen, **params)

    fn.__name__ = f"cdam_{variant}"
    return fn


def attention_map(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: TargetsLike) -> Tensor:
    """Last-block CLS attention averaged over heads, the same for every target: [B, K, gh, gw] (>= 0)."""
    k = as_targets(targets, images.shape[0], images.device).shape[1]
    am = attention_maps(backbone, images).mean(1, keepdim=True).float()  # [B, 1, gh, gw]
    return am.expand(-1, k, -1, -1).contiguous()


@dataclass(frozen=True)
class Method:
    """A registered method: call it like the function, with `defaults` filled in for missing params."""

    name: str
    label: str  # short display name (tables, figures)
    fn: Callable[..., Tensor]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    signed: bool = True
    class_specific: bool = True
    description: str = ""

    def __call__(self, backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: TargetsLike,
                 **params: Any) -> Tensor:
        accepted = set(inspect.signature(self.fn).parameters) - {"backbone", "head", "images", "targets"}
        if "params" in accepted:  # engine wrappers forward the CDAM keyword arguments
            accepted = (accepted - {"params"}) | set(self.defaults)
        unknown = sorted(set(params) - accepted)
        if unknown:
            raise CdamError(f"method {self.name!r} has no parameter {unknown[0]!r}; it takes: "
                            f"{', '.join(sorted(accepted)) or 'no parameters'}")
        return self.fn(backbone, head, images, targets, **{**self.defaults, **params})


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("cdam", "CDAM", _cdam("vanilla"), {},
               description="gradient x token at the last attention layer's input (the engine)"),
        Method("smooth_cdam", "Smooth CDAM", _cdam("smooth"), {"n_samples": 50, "noise": 0.05, "seed": 0},
               description="CDAM averaged over 50 noisy copies of the last block's input"),
        Method("integrated_cdam", "Integrated CDAM", _cdam("integrated"), {"n_steps": 50, "noise": 0.0, "seed": 0},
               description="CDAM averaged along the path from zero to the last block's input"),
        Method("am", "AM", attention_map, {}, signed=False, class_specific=False,
               description="last-block CLS attention, mean over heads (class-agnostic)"),
        Method("rp", "RP", relevance_propagation, {}, signed=False,
               description="relevance propagation (Chefer et al. 2021) over all blocks"),
        Method("tam", "TAM", token_ablation_map, {},
               description="f(x) - f(x without token i), tokens removed before the first block"),
        Method("ig", "IG", integrated_gradients, {"n_steps": 50, "baseline": 0.0},
               description="captum Integrated Gradients, zero baseline, pooled to tokens"),
        Method("smoothgrad", "SmoothGrad", smoothgrad, {"n_samples": 50, "noise": 0.15, "seed": 0},
               description="captum NoiseTunnel(Saliency), signed, sigma = 0.15 * range, pooled to tokens"),
        Method("ixg", "IxG", input_x_gradient, {},
               description="captum Input x Gradient, pooled to tokens"),
    ]
}


def names() -> list[str]:
    """Registered method names, in display order."""
    return list(METHODS)


def get(name: str) -> Method:
    """The method registered as `name`; a one-line error naming the close matches otherwise."""
    key = str(name).strip().lower().replace("-", "_")
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(key, METHODS, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise CdamError(f"unknown explanation method {name!r}; {hint}choose one of {', '.join(METHODS)}")
