"""Deletion: remove patches in the order a map ranks them and watch the target logit.

Perturbation curves (benchmark): rank the patches by the map, delete most-important-first (MIF) and
least-important-first (LIF) in `steps` steps, record the target logit f at every step; fidelity is the area
between the curves (higher = better):

    fidelity = integral_0^1 (LIF(x) - MIF(x)) dx ~= sum_{s=1}^{S} (g_s + g_{s-1}) / (2 S),  g = LIF - MIF

Token deletion drop (training callback): with n = round(fraction * N) tokens removed,

    drop_top = f(x) - f(x without the n top-ranked tokens)
    drop_random = mean over random sets r of f(x) - f(x without r)

and faithfulness = drop_top - drop_random. Tokens are removed after the position embedding (the ViT-native variant,
like TAM); pixel deletion replaces the patch's pixels instead. `patch_logits` evaluates any set of kept patches
(token or pixel mode) in batches; the curves here and in `cdam_pl.metrics.faithfulness` are built on it.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn
from torchvision.transforms.v2.functional import gaussian_blur as gaussian_blur_tv

from cdam_pl.errors import CdamError
from cdam_pl.explain._vit import as_targets, check_range, explaining, head_or_identity, plain
from cdam_pl.explain.tam import sequence_logits
from cdam_pl.metrics._base import MeanMetricBase

DELETION_MODES = ("token", "pixel")
REPLACEMENTS = ("mean", "blur", "zero")
# Upper bound on float elements of one deletion chunk's largest activations (~128 MiB in float32).
DELETION_MAX_ELEMENTS = 2**25


def _sequences_per_chunk(backbone: nn.Module, tokens: int, max_elements: int) -> int:
    """How many sequences of `tokens` tokens one forward may take: a sequence's largest activations are its MLP
    hidden layer [T, hidden] and its attention matrices [heads, T, T]; their sum stays within `max_elements`."""
    blk = backbone.model.blocks[0]
    hidden = max(backbone.embed_dim, getattr(getattr(blk.mlp, "fc1", None), "out_features", 4 * backbone.embed_dim))
    return max(1, int(max_elements) // (tokens * (hidden + blk.attn.num_heads * tokens)))


def deletion_order(maps: Tensor, seed: int = 0) -> Tensor:
    """Patch indices from most to least important (highest score first) for each map: [..., gh, gw] -> [..., N].

    Ties (e.g. many exact zeros in a compact map) are broken by a seeded random permutation, not by raster order,
    so a sparse map is not rewarded or punished for where its zeros happen to lie.
    """
    flat = maps.detach().reshape(*maps.shape[:-2], -1).float()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(flat.shape[-1], generator=g).to(flat.device)
    ranked = torch.argsort(flat[..., perm], dim=-1, descending=True, stable=True)
    return perm[ranked]


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of [B, C, H, W] images, kernel 2 * ceil(3 sigma) + 1 (torchvision's reflect padding)."""
    k = 2 * math.ceil(3.0 * sigma) + 1
    return gaussian_blur_tv(images, kernel_size=[k, k], sigma=[sigma, sigma])


def patch_logits(
    backbone: nn.Module,
    head: nn.Module | None,
    images: Tensor,
    keep: Tensor,
    rows: Tensor | None = None,
    *,
    mode: str = "token",
    fill: Tensor | None = None,
    max_elements: int = DELETION_MAX_ELEMENTS,
) -> Tensor:
    """Logits of images with only the patches `keep` marks left intact: -> [S, C], no autograd.

    images [B, 3, H, W]; keep [S, N] bool, one row per evaluated input (N = gh * gw patches, raster order); rows [S]
    the image of each row (default: row s is image s). mode "token": the patch tokens not kept are removed from the
    sequence after the position embedding (prefix tokens and kept tokens stay, in order); mode "pixel": the pixels
    of the patches not kept are replaced by `fill` [B, 3, H, W] (e.g. a blur or the mean of the image). Rows with the
    same length (token mode: the same number of kept patches; pixel mode: all) share batched forwards, in chunks of
    at most `max_elements` activations; rows that keep every patch or none are computed once per image. The
    machinery under deletion, insertion and their curves.
    """
    if mode not in DELETION_MODES:
        raise CdamError(f"unknown deletion mode {mode!r}; choose one of {', '.join(DELETION_MODES)}")
    gh, gw = backbone.check_images(images)
    head = head_or_identity(head)
    n, dev = gh * gw, images.device
    keep = keep.to(dev)
    rows = torch.arange(keep.shape[0], device=dev) if rows is None else rows.to(device=dev, dtype=torch.long)
    if keep.ndim != 2 or keep.shape[1] != n or rows.shape != keep.shape[:1]:
        raise CdamError(f"keep must be [S, {n}] bool with rows [S], got {tuple(keep.shape)} and {tuple(rows.shape)}")
    if mode == "pixel" and (fill is None or fill.shape != images.shape):
        raise CdamError(f"pixel mode needs fill images of the images' shape {tuple(images.shape)}")
    p, pixel = backbone.num_prefix_tokens, backbone.patch_size
    kept_n = keep.sum(1)
    out: Tensor | None = None
    with explaining(backbone, head), torch.no_grad():
        images = plain(images)
        tokens = backbone.embed(images) if mode == "token" else None  # [B, P+N, D]

        def run(kp: Tensor, r: Tensor) -> Tensor:  # kp [s, N] (token mode: one count kept), r [s] their images
            if mode == "token":
                kept = kp.nonzero()[:, 1].view(kp.shape[0], int(kp[0].sum())) + p  # [s, c], ascending positions
                pos = torch.cat([torch.arange(p, device=dev).expand(kp.shape[0], p), kept], 1)
                return sequence_logits(backbone, head, tokens[r[:, None], pos])
            drop = (~kp).to(images.dtype).view(-1, 1, gh, gw)
            drop = drop.repeat_interleave(pixel, 2).repeat_interleave(pixel, 3)  # [s, 1, H, W]
            x = images[r] * (1 - drop) + fill[r] * drop  # [s, 3, H, W]
            return sequence_logits(backbone, head, backbone.embed(x))

        # groups of one sequence length; keeping all or none: the input depends on the image alone (-1: the rest)
        group = kept_n if mode == "token" else torch.where((kept_n == 0) | (kept_n == n), kept_n, -1)
        for c in group.unique().tolist():
            sel = (group == c).nonzero()[:, 0]
            r = rows[sel]
            if c in (0, n):  # once per image
                r, inverse = r.unique(return_inverse=True)
                kp = torch.full((r.shape[0], n), c == n, dtype=torch.bool, device=dev)
            else:
                inverse, kp = None, keep[sel]
            chunk = _sequences_per_chunk(backbone, p + (c if mode == "token" else n), max_elements)
            logits = torch.cat([run(kp[i:i + chunk], r[i:i + chunk]) for i in range(0, r.shape[0], chunk)])
            if out is None:
                out = torch.empty(keep.shape[0], logits.shape[1], device=dev, dtype=logits.dtype)
            out[sel] = logits if inverse is None else logits[inverse]
    return out


def deletion_curves(
    backbone: nn.Module,
    head: nn.Module | None,
    images: Tensor,
    targets: Tensor,
    maps: Tensor,
    steps: int = 40,
    mode: str = "token",
    replace: str = "mean",
    blur_sigma: float | None = None,
    seed: int = 0,
    max_elements: int = DELETION_MAX_ELEMENTS,
) -> Tensor:
    """Target logit while deleting patches in map order: -> [B, K, 2, steps+1] (0 = MIF, 1 = LIF).

    At step s the round(s / steps * N) most (MIF) or least (LIF) important patches are deleted; step 0 is the
    intact image, step `steps` has every patch deleted. mode "token": deleted patch tokens are removed from the
    sequence after the position embedding (the ViT-native variant, like TAM); mode "pixel": the patch's pixels are
    replaced by the image's per-channel mean ("mean"), a Gaussian blur of the image ("blur", sigma = blur_sigma,
    default half a patch) or 0 ("zero", the normalised data mean). images [B, 3, H, W], targets [B, K],
    maps [B, K, gh, gw] (one map per target). Every step of every map goes through `patch_logits` at once.
    """
    if mode not in DELETION_MODES:
        raise CdamError(f"unknown deletion mode {mode!r}; choose one of {', '.join(DELETION_MODES)}")
    if replace not in REPLACEMENTS:
        raise CdamError(f"unknown replacement {replace!r}; choose one of {', '.join(REPLACEMENTS)}")
    if int(steps) < 1:
        raise CdamError(f"deletion needs steps >= 1, got {steps}")
    gh, gw = backbone.check_images(images)
    b, n = images.shape[0], gh * gw
    idx = as_targets(targets, b, images.device)
    k = idx.shape[1]
    if tuple(maps.shape) != (b, k, gh, gw):
        raise CdamError(f"maps must be [B={b}, K={k}, {gh}, {gw}] (one per target), got {tuple(maps.shape)}")
    order = deletion_order(maps, seed).to(images.device)  # [B, K, N]
    orders = torch.stack([order, order.flip(-1)], 2).reshape(b * k * 2, n)  # MIF, LIF
    counts = [round(s * n / steps) for s in range(int(steps) + 1)]
    keep = keep_after_removal(orders, counts)  # [S * B*K*2, N], step-major
    rows = torch.arange(b, device=images.device).repeat_interleave(2 * k).repeat(len(counts))
    fill = None
    if mode == "pixel":
        with torch.no_grad():
            fill = {"mean": lambda x: x.mean((2, 3), keepdim=True).expand_as(x).contiguous(),
                    "blur": lambda x: gaussian_blur(x, float(blur_sigma) if blur_sigma else backbone.patch_size / 2),
                    "zero": torch.zeros_like}[replace](plain(images))
    logits = patch_logits(backbone, head, images, keep, rows, mode=mode, fill=fill, max_elements=max_elements)
    check_range(idx, logits.shape[1])
    tgt = idx.repeat_interleave(2, dim=1).reshape(-1).repeat(len(counts))  # row -> target class
    val = logits.gather(1, tgt[:, None])[:, 0].view(len(counts), b, k, 2)
    return val.permute(1, 2, 3, 0).float()


def keep_after_removal(orders: Tensor, counts: list[int]) -> Tensor:
    """Which patches stay when the first c of each ranking are removed: orders [R, N] (rankings), counts [S] ->
    keep [S * R, N] bool, step-major (row s * R + r: ranking r with counts[s] patches removed)."""
    r, n = orders.shape
    ranks = torch.empty_like(orders)
    ranks.scatter_(1, orders, torch.arange(n, device=orders.device).expand(r, n))  # position of each patch
    c = torch.tensor(counts, device=orders.device)
    return (ranks[None] >= c[:, None, None]).reshape(len(counts) * r, n)


def fidelity_from_curves(curves: Tensor) -> Tensor:
    """Area between the LIF and MIF curves, x from 0 to 1 (trapezoid): [..., 2, S+1] -> [...].

    curves[..., 0, :] is most-important-first, curves[..., 1, :] least-important-first. Higher is better.
    """
    gap = curves[..., 1, :] - curves[..., 0, :]  # [..., S+1]
    steps = gap.shape[-1] - 1
    return (gap[..., 1:] + gap[..., :-1]).sum(-1) / (2 * steps)


class DeletionFidelity(MeanMetricBase):
    """Mean area between the least- and most-important-first deletion curves of the target logit (higher = better).

    update(curves [B, K, 2, steps+1]) takes `deletion_curves(...)` output (token or pixel mode); the mean curves
    are kept too (`mean_curves()`), for plots.
    """

    higher_is_better = True

    def __init__(self, steps: int = 40, **kwargs):
        super().__init__(**kwargs)
        self.steps = int(steps)
        self.add_state("curve_sum", torch.zeros(2, self.steps + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, curves: Tensor) -> None:
        if curves.ndim < 2 or curves.shape[-2:] != (2, self.steps + 1):
            raise CdamError(f"curves must be [..., 2, {self.steps + 1}] (MIF, LIF over {self.steps} steps), "
                            f"got {tuple(curves.shape)}")
        c = curves.detach().double().reshape(-1, 2, self.steps + 1)
        self.accumulate(fidelity_from_curves(c))
        self.curve_sum += c.sum(0)

    def mean_curves(self) -> Tensor:
        """[2, steps+1]: the mean MIF and LIF curves over everything seen (synced like compute())."""
        return (self.curve_sum / self.count.clamp_min(1)).float()


def num_deleted(num_tokens: int, fraction: float = 0.1) -> int:
    """Patch tokens a deletion `fraction` removes: round(fraction * N), at least 1 and at most N - 1."""
    if not 0 < fraction < 1:
        raise CdamError(f"deletion fraction must be in (0, 1), got {fraction}")
    if num_tokens < 2:
        raise CdamError(f"token deletion needs at least 2 patch tokens, got {num_tokens}")
    return min(num_tokens - 1, max(1, round(fraction * num_tokens)))


def random_tokens(batch: int, num_tokens: int, n: int, repeats: int = 1, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
    """`repeats` sets of n distinct random patch indices per image: -> [B, repeats, n] (each set ascending).

    Drawn from `generator` (a CPU generator seeded 0 when None), never from the global RNG.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    keys = torch.rand(batch, repeats, num_tokens, generator=g, device=g.device)
    return keys.argsort(-1)[..., :n].sort(-1).values.to(device)


def embed_without_tokens(backbone: nn.Module, images: Tensor, remove: Tensor,
                         max_elements: int = DELETION_MAX_ELEMENTS) -> Tensor:
    """Features (the pooled tokens after the final norm) with patch tokens removed after the position embedding:
    images [B, 3, H, W], remove [B, R, n] patch indices -> [B, R, F].

    Each image is embedded once; each of its R removal sets gives one shorter sequence (prefix tokens kept, the
    kept tokens in their original order) through every block. Head-independent, so a caller may keep the result
    while the head trains. Sequences run in chunks bounded by `max_elements` activations.
    """
    gh, gw = backbone.check_images(images)
    num_patches, p = gh * gw, backbone.num_prefix_tokens
    if remove.ndim != 3 or remove.shape[0] != images.shape[0]:
        raise CdamError(f"remove must be [B={images.shape[0]}, R, n] patch indices, got {tuple(remove.shape)}")
    b, r, n = remove.shape
    if not 0 < n < num_patches or remove.min() < 0 or remove.max() >= num_patches:
        raise CdamError(f"remove must hold 1..{num_patches - 1} patch indices in 0..{num_patches - 1} per set")
    chunk = _sequences_per_chunk(backbone, p + num_patches - n, max_elements)
    with explaining(backbone), torch.no_grad():
        images = plain(images)
        tokens = backbone.embed(images)  # [B, P+N, D]
        keep = torch.ones(b * r, num_patches, dtype=torch.bool, device=images.device)
        keep.scatter_(1, remove.reshape(b * r, n).to(images.device), False)
        if (keep.sum(1) != num_patches - n).any():
            raise CdamError("each set of removed tokens must hold distinct patch indices")
        kept = keep.nonzero()[:, 1].view(b * r, num_patches - n) + p  # ascending token positions
        pos = torch.cat([torch.arange(p, device=images.device).expand(b * r, p), kept], 1)  # [B*R, T']
        rows = torch.arange(b, device=images.device).repeat_interleave(r)  # sequence -> image
        out = [backbone.pool(backbone.run_blocks(tokens[rows[s:s + chunk, None], pos[s:s + chunk]]))
               for s in range(0, b * r, chunk)]  # each [c, D]
    return torch.cat(out).view(b, r, -1)


def deletion_drop(backbone: nn.Module, head: nn.Module, images: Tensor, maps: Tensor, targets: Tensor,
                  fraction: float = 0.1, n_random: int = 1, generator: torch.Generator | None = None,
                  seed: int = 0, *, logits: Tensor | None = None,
                  embed: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Token-deletion faithfulness: how much the target logit drops when the `fraction` highest-scoring patch tokens
    are removed, and when as many random tokens are (mean over `n_random` sets from `generator`).

    images [B, 3, H, W]; maps [B, gh, gw] (one map per image, for its target); targets [B] class indices.
    -> (drop_top [B], drop_random [B]); faithfulness = drop_top - drop_random (higher = the map found evidence the
    head uses). Ties in the ranking are broken by `deletion_order`'s seeded permutation (`seed`). All removals of
    the batch share one batched forward; head and backbone run in eval mode (modes restored).
    logits [B, C]: the intact images' logits when already known (skips that forward). embed: replaces
    `embed_without_tokens` (same signature), e.g. by a cache: the removed-token embeddings do not depend on the head.
    """
    gh, gw = backbone.check_images(images)
    b = images.shape[0]
    if tuple(maps.shape) != (b, gh, gw):
        raise CdamError(f"maps must be [B={b}, {gh}, {gw}] (one per image), got {tuple(maps.shape)}")
    t = targets.reshape(-1).to(device=images.device, dtype=torch.long)
    if t.shape[0] != b:
        raise CdamError(f"targets must be [B={b}] class indices, got {tuple(targets.shape)}")
    n = num_deleted(gh * gw, fraction)
    top = deletion_order(maps, seed)[:, None, :n].to(images.device)  # [B, 1, n]
    rand = random_tokens(b, gh * gw, n, int(n_random), generator, images.device)  # [B, R, n]
    with explaining(backbone, head), torch.no_grad():
        images = plain(images)
        full = head(backbone(images)) if logits is None else logits.to(images.device)  # [B, C]
        if t.min() < 0 or t.max() >= full.shape[1]:
            raise CdamError(f"target class index out of range: the head has {full.shape[1]} classes")
        emb = (embed or embed_without_tokens)(backbone, images, torch.cat([top, rand], 1))  # [B, 1+R, D]
        deleted = head(emb.flatten(0, 1)).view(b, emb.shape[1], -1)  # heads take [N, D] (e.g. BatchNorm1d)
    f_full = full.gather(1, t[:, None])  # [B, 1]
    f_del = deleted.gather(2, t[:, None, None].expand(-1, deleted.shape[1], 1))[..., 0]  # [B, 1+R]
    drops = f_full - f_del
    return drops[:, 0], drops[:, 1:].mean(1)
