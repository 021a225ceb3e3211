"""Input-space attributions through captum: Integrated Gradients, SmoothGrad, Input x Gradient.

captum computes the pixel attributions (never re-implemented here); they are summed over colour channels and over
the pixels of each patch (`pool_to_grid`) to give one signed score per token, [B, K, gh, gw]. The model captum sees
is images -> head(backbone(images)); K targets are K captum calls with per-image targets.

Conventions (the paper's): IG with a zero baseline in the model's input space (i.e. the normalised image, so 0 is
the data set's mean colour) and 50 steps; SmoothGrad = the mean *signed* gradient over 50 noisy copies,
sigma = 0.15 * (max - min) of each image (captum `NoiseTunnel(Saliency)`, `abs=False`); Input x Gradient plain.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT
from cdam_pl.errors import CdamError
from cdam_pl.explain._vit import TargetsLike, as_targets, check_range, explaining, head_or_identity, plain, pool_to_grid
from cdam_pl.explain.registry import register_method


def _captum():
    """captum.attr, imported on first use: explain.py runs without it unless an input-space method is asked for."""
    try:
        import captum.attr as attr  # optional at run time: only ig, smoothgrad and ixg need it
    except ImportError:
        raise CdamError("input-space methods need captum: pip install captum") from None
    return attr


class _Model(nn.Module):
    """images -> logits, the forward function handed to captum."""

    def __init__(self, backbone: FrozenViT, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


def _prepare(backbone, head, images, targets):
    backbone.check_images(images)
    model = _Model(backbone, head_or_identity(head))
    idx = as_targets(targets, images.shape[0], images.device)
    with torch.no_grad():
        check_range(idx, model(images[:1]).shape[1])
    return model, idx


@register_method("ig", label="IG", samples="n_steps", tunable=("n_steps", "baseline"), expensive=True,
                 description="captum Integrated Gradients, zero baseline, pooled to tokens")
def integrated_gradients(
    backbone: FrozenViT,
    head: nn.Module | None,
    images: Tensor,
    targets: TargetsLike,
    n_steps: int = 50,
    baseline: float = 0.0,
    internal_batch_size: int | None = 32,
    return_delta: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """captum IntegratedGradients per target -> [B, K, gh, gw] (and captum's convergence deltas [B, K]).

    Token scores sum to f(x) - f(baseline) up to the convergence delta (completeness).
    """
    attr = _captum()
    with explaining(backbone, head_or_identity(head)):
        images = plain(images)
        model, idx = _prepare(backbone, head, images, targets)
        ig = attr.IntegratedGradients(model)
        maps, deltas = [], []
        for k in range(idx.shape[1]):
            a, delta = ig.attribute(images, baselines=float(baseline), target=idx[:, k], n_steps=int(n_steps),
                                    internal_batch_size=internal_batch_size, return_convergence_delta=True)
            maps.append(pool_to_grid(a.detach(), backbone.patch_size))
            deltas.append(delta.detach())
    out = torch.stack(maps, 1).float()  # [B, K, gh, gw]
    return (out, torch.stack(deltas, 1)) if return_delta else out


@register_method("smoothgrad", label="SmoothGrad", samples="n_samples", expensive=True,
                 tunable=("n_samples", "noise", "seed"),
                 description="captum NoiseTunnel(Saliency), signed, sigma = 0.15 * range, pooled to tokens")
def smoothgrad(
    backbone: FrozenViT,
    head: nn.Module | None,
    images: Tensor,
    targets: TargetsLike,
    n_samples: int = 50,
    noise: float = 0.15,
    batch_size: int | None = 25,
    seed: int = 0,
) -> Tensor:
    """captum NoiseTunnel(Saliency), signed, sigma = noise * (max - min) per image -> [B, K, gh, gw].

    One captum call per image (the noise scale is per image); the K targets of an image share the call.
    The noise comes from a seeded, forked RNG: same seed, same map, global RNG untouched.
    """
    attr = _captum()
    with explaining(backbone, head_or_identity(head)):
        images = plain(images)
        model, idx = _prepare(backbone, head, images, targets)
        nt = attr.NoiseTunnel(attr.Saliency(model))
        k = idx.shape[1]
        devices = [images.device] if images.device.type == "cuda" else []
        maps = []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for b in range(images.shape[0]):
                x = images[b:b + 1].expand(k, -1, -1, -1)  # [K, 3, H, W]: one row per target
                sigma = float(noise) * float(x.max() - x.min())
                a = nt.attribute(x, nt_type="smoothgrad", nt_samples=int(n_samples),
                                 nt_samples_batch_size=batch_size, stdevs=sigma, target=idx[b], abs=False)
                maps.append(pool_to_grid(a.detach(), backbone.patch_size))  # [K, gh, gw]
    return torch.stack(maps).float()


@register_method("ixg", label="IxG", description="captum Input x Gradient, pooled to tokens")
def input_x_gradient(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: TargetsLike) -> Tensor:
    """captum InputXGradient per target -> [B, K, gh, gw], signed."""
    attr = _captum()
    with explaining(backbone, head_or_identity(head)):
        images = plain(images)
        model, idx = _prepare(backbone, head, images, targets)
        images = images.detach().requires_grad_()  # a new leaf: captum would otherwise warn and set it
        ixg = attr.InputXGradient(model)
        maps = [pool_to_grid(ixg.attribute(images, target=idx[:, k]).detach(), backbone.patch_size)
                for k in range(idx.shape[1])]
    return torch.stack(maps, 1).float()
