"""ViT internals shared by the explanation methods (cdam, rp, tam, input_space, registry) and the metrics.

Every method has the captum-like signature `fn(backbone, head, images, targets[B, K], **params) -> [B, K, gh, gw]`;
these helpers put the models in explaining mode, check targets the same way everywhere, evaluate the last block
for the CLS query alone, and turn pixel attributions into token grids.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT
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


@contextmanager
def explaining(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and autograd on (even inside no_grad/inference_mode); afterwards every submodule's train/eval flag
    is restored as it was (a user's model may mix modes, e.g. a frozen part kept in eval)."""
    modes = [(m, m.training) for top in modules for m in top.modules()]
    try:
        for m in modules:
            m.eval()
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def plain(t: Tensor) -> Tensor:
    """A normal tensor usable in autograd, also when `t` was created under inference_mode."""
    return t.clone() if t.is_inference() else t


class LastBlock:
    """The last block, the final norm and the pooling of the feature, from the last block's input z.

    When the feature reads only the CLS token, the block runs for the CLS query alone (keys and values still come
    from every token): exact, since no other query row reaches the CLS output. Otherwise it runs for every query.
    """

    def __init__(self, backbone: FrozenViT):
        m = backbone.model
        self.block = m.blocks[-1]
        self.attn = self.block.attn
        self.pool = backbone.pool
        self.cls_only = backbone.reads_cls_only
        self.num_prefix = backbone.num_prefix_tokens
        fc1 = getattr(self.block.mlp, "fc1", None)
        self.hidden = int(getattr(fc1, "out_features", 4 * backbone.embed_dim))  # MLP width (sizes memory chunks)

    def projections(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bias-free q, k, v projections of T = norm1(z), no autograd: [B, Q, A], [B, T, A], [B, T, A] with Q = 1 (the
        CLS query) when the feature reads only the CLS token, else Q = T."""
        with torch.no_grad():
            t = self.block.norm1(z)  # [B, T, D]
            w_q, w_k, w_v = self.attn.qkv.weight.chunk(3, dim=0)
            return F.linear(t[:, :1] if self.cls_only else t, w_q), F.linear(t, w_k), F.linear(t, w_v)

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, A] -> [B, heads, T, head_dim]
        b, t, _ = x.shape
        return x.view(b, t, self.attn.num_heads, self.attn.head_dim).transpose(1, 2)

    def forward(self, z: Tensor, q_lin: Tensor, k_lin: Tensor, v_lin: Tensor) -> tuple[Tensor, Tensor]:
        """-> (feature [B, F], CLS attention probabilities [B, heads, T])."""
        attn = self.attn
        bias = attn.qkv.bias
        b_q, b_k, b_v = bias.chunk(3) if bias is not None else (0.0, 0.0, 0.0)
        n_q = q_lin.shape[1]  # 1 (the CLS query) or T
        q = attn.q_norm(self._heads(q_lin + b_q))  # [B, h, Q, dh]
        k = attn.k_norm(self._heads(k_lin + b_k))  # [B, h, T, dh]
        v = self._heads(v_lin + b_v)
        probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, h, Q, T]
        out = (probs @ v).transpose(1, 2).reshape(z.shape[0], n_q, attn.attn_dim)  # [B, Q, A]
        x = z[:, :n_q] + self.block.ls1(attn.proj(attn.norm(out)))  # [B, Q, D]
        x = x + self.block.ls2(self.block.mlp(self.block.norm2(x)))
        return self.pool(x), probs[:, :, 0]
