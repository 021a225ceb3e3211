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
    The forward is split where the CDAM engine needs it: `attend` (scores, softmax, weighted values) and
    `after_attention` (the rest of the block, the final norm and the pooling, row by row).
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

    def heads(self, x: Tensor) -> Tensor:
        """[B, T, A] -> [B, heads, T, head_dim]."""
        b, t, _ = x.shape
        return x.view(b, t, self.attn.num_heads, self.attn.head_dim).transpose(1, 2)

    def _biases(self) -> tuple[Tensor | float, Tensor | float, Tensor | float]:
        bias = self.attn.qkv.bias
        return bias.chunk(3) if bias is not None else (0.0, 0.0, 0.0)

    def _head_mask(self, like: Tensor) -> Tensor:
        """[A, heads], like's device and dtype: column h is 1 on head h's slice of the A attention channels."""
        eye = torch.eye(self.attn.num_heads, device=like.device, dtype=like.dtype)
        return eye.repeat_interleave(self.attn.head_dim, dim=0)

    def _head_blocks(self, x: Tensor) -> Tensor:
        """One vector per head [B, heads, dh] -> block-diagonal [B, A, heads]: column h holds head h's slice."""
        return x.reshape(x.shape[0], -1, 1) * self._head_mask(x)

    def scores(self, q_lin: Tensor, k_lin: Tensor) -> Tensor:
        """Attention scores before the softmax: [B, heads, Q, T] (biases, q_norm/k_norm and the scale applied).

        For one query, one matrix product against the keys in their own [B, T, A] layout and the query's heads
        laid out block-diagonally: the per-head product would first copy every key into per-head order."""
        b_q, b_k, _ = self._biases()
        q = self.attn.q_norm(self.heads(q_lin + b_q)) * self.attn.scale  # [B, h, Q, dh]
        if q.shape[2] == 1:
            b, t, a = k_lin.shape
            k = self.attn.k_norm((k_lin + b_k).view(b, t, self.attn.num_heads, -1)).view(b, t, a)  # [B, T, A]
            return (k @ self._head_blocks(q[:, :, 0])).transpose(1, 2)[:, :, None]  # [B, h, 1, T]
        return q @ self.attn.k_norm(self.heads(k_lin + b_k)).transpose(-2, -1)

    def attend(self, q_lin: Tensor, k_lin: Tensor, v_lin: Tensor) -> tuple[Tensor, Tensor]:
        """-> (attention output before `attn.norm` and `proj` [B, Q, A], probabilities [B, heads, Q, T])."""
        _, _, b_v = self._biases()
        probs = self.scores(q_lin, k_lin).softmax(dim=-1)  # [B, h, Q, T]
        if probs.shape[2] == 1:  # every head's weights on every value, then each head's own block; sum(p) = 1
            every = probs[:, :, 0] @ v_lin  # [B, h, A]
            return ((every * self._head_mask(every).T).sum(1) + b_v)[:, None], probs
        out = probs @ self.heads(v_lin + b_v)  # [B, h, Q, dh]
        return out.transpose(1, 2).reshape(q_lin.shape[0], q_lin.shape[1], self.attn.attn_dim), probs

    def after_attention(self, z: Tensor, out: Tensor) -> Tensor:
        """The rest of the block from the attention output [B, Q, A], then the final norm and the pooling -> [B, F].
        Every operation acts on each query row alone (residual from z's first Q rows)."""
        n_q = out.shape[1]
        x = z[:, :n_q] + self.block.ls1(self.attn.proj(self.attn.norm(out)))  # [B, Q, D]
        x = x + self.block.ls2(self.block.mlp(self.block.norm2(x)))
        return self.pool(x)

    def forward(self, z: Tensor, q_lin: Tensor, k_lin: Tensor, v_lin: Tensor) -> tuple[Tensor, Tensor]:
        """-> (feature [B, F], CLS attention probabilities [B, heads, T])."""
        out, probs = self.attend(q_lin, k_lin, v_lin)
        return self.after_attention(z, out), probs[:, :, 0]

    def token_directions(self, probs: Tensor, out: Tensor, q_lin: Tensor, k_lin: Tensor, v_lin: Tensor) -> Tensor:
        """d_i = da/d eps for every token i: the change of the CLS query's attention output a when T_i alone is
        scaled by (1 + eps), token-major: [B, T, A]. probs [B, heads, T] and out [B, 1, A] from `attend`.

        Per head h: d_hi = p_hi ((1 + c_hi) v^lin_hi - c_hi a^lin_h), with c from `key_sensitivity` and
        a^lin_h = a_h - b_v (the value bias cancels, as the probabilities sum to 1)."""
        b, t, a = v_lin.shape
        h = probs.shape[1]
        with torch.no_grad():
            c = self.key_sensitivity(q_lin, k_lin).transpose(1, 2)[..., None]  # [B, T, h, 1]
            a_lin = (out[:, 0] - self._biases()[2]).view(b, 1, h, -1)  # [B, 1, h, dh]
            dirs = torch.addcmul(v_lin.view(b, t, h, -1) * (1 + c), a_lin, c, value=-1)  # [B, T, h, dh]
            return dirs.mul_(probs.transpose(1, 2)[..., None]).view(b, t, a)

    def cls_product(self, z: Tensor, out: Tensor, left: Tensor, dirs: Tensor) -> Tensor:
        """left @ J @ dirs^T, J = d feature / d out [B, F, A]: the Jacobian of `after_attention` for the CLS token at
        its attention output out [B, 1, A]. left [B, n, F], dirs [B, m, A] -> [B, n, m] (no graph kept).

        By the cheapest of three ways, counted in one-token passes: n reverse passes (the one-token path runs
        once per row of `left`, rows replicated, and one backward pulls them all back: 2 passes each); m forward
        passes along the rows of `dirs` (J @ dirs^T); A forward passes along the unit vectors (J itself).
        None uses a vmapped backward: LayerNorm and GELU backwards have no batching rule, it would loop."""
        b, n, _ = left.shape
        m, a = dirs.shape[1], dirs.shape[2]
        if 2 * n <= min(m, a):
            rows = out.detach()[:, None].expand(b, n, 1, a).reshape(b * n, 1, a).requires_grad_()
            feature = self.after_attention(z[:, None, :1].expand(b, n, 1, z.shape[-1]).reshape(b * n, 1, -1),
                                           rows.view_as(rows))  # a view: a leaf input upsets FlopCounterMode's hooks
            pulled = torch.autograd.grad(feature, rows, left.reshape(b * n, -1))[0].view(b, n, a)  # left @ J
            return pulled @ dirs.transpose(1, 2)
        if m <= a:
            tangents = dirs.transpose(0, 1)[:, :, None]  # [m, B, 1, A]
        else:
            tangents = torch.eye(a, device=out.device, dtype=out.dtype)[:, None, None].expand(a, b, 1, a)
        with torch.no_grad():
            cols = torch.func.vmap(
                lambda t: torch.func.jvp(lambda o: self.after_attention(z, o), (out,), (t,))[1])(tangents)
        pushed = cols.permute(1, 2, 0)  # [B, F, m] = J @ dirs^T, or [B, F, A] = J
        return left @ (pushed if m <= a else pushed @ dirs.transpose(1, 2))

    def token_jvps(self, z: Tensor, proj: tuple[Tensor, Tensor, Tensor], tokens: Tensor) -> Tensor:
        """d feature / d eps when token i's own T_i is scaled by (1 + eps), i.e. along its bias-free q, k, v
        projections, for each token i in `tokens` [m]: -> [B, F, m], one forward-mode pass each (every query row)."""
        t = proj[1].shape[1]
        masks = torch.zeros(len(tokens), t, device=z.device, dtype=z.dtype)
        masks[torch.arange(len(tokens)), tokens] = 1

        def along(mask: Tensor) -> Tensor:
            tangents = tuple(x * mask[None, :, None] for x in proj)
            return torch.func.jvp(lambda q, k, v: self.forward(z, q, k, v)[0], proj, tangents)[1]

        with torch.no_grad():
            return torch.func.vmap(along)(masks).permute(1, 2, 0)

    def key_sensitivity(self, q_lin: Tensor, k_lin: Tensor) -> Tensor:
        """c[b, h, i] = k_i . d s_hi / d k_i for the first query's scores s_h, k = k_lin (bias-free): [B, heads, T].

        Score s_hi depends on the keys only through k_i's slice of head h, so this is the derivative of s along k_lin
        itself: one forward-mode pass, exact with any k_norm; without one, s is affine in the keys and c is s of
        the bias-free keys."""
        with torch.no_grad():
            q = q_lin[:, :1]
            if isinstance(self.attn.k_norm, nn.Identity):
                b_q, _, _ = self._biases()
                q = self.attn.q_norm(self.heads(q + b_q))[:, :, 0] * self.attn.scale  # [B, h, dh]
                return (k_lin @ self._head_blocks(q)).transpose(1, 2)
            _, c = torch.func.jvp(lambda k: self.scores(q, k), (k_lin,), (k_lin,))
        return c[:, :, 0]
