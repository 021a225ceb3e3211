"""Token ablation map (TAM): score_i = f(x) - f(x without patch token i).

Token i is removed from the sequence after the position embedding, before the first block (the other tokens keep
their positions), so the model sees N - 1 patches. Signed: positive = the target logit drops without the token.

All removals of a batch are independent sequences of the same length, so they run as large batches of
(image, token) pairs in memory-bounded chunks; every K target is read from the same forward.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT
from cdam_pl.explain._vit import LastBlock, TargetsLike, as_targets, check_range, explaining, head_or_identity, plain
from cdam_pl.explain.registry import register_method

# Upper bound on float elements of one chunk's largest activations (~32 MiB in float32): a chunk's MLP activations
# stay near the CPU caches; 4x larger chunks measured ~8% slower on 2 cores and no faster on 1 image.
DEFAULT_MAX_ELEMENTS = 2**23


def sequence_logits(backbone: FrozenViT, head: nn.Module, tokens: Tensor) -> Tensor:
    """Logits of token sequences that already went through the embedding: [S, T', D] -> [S, C], no autograd.

    The last block and the pooling are the engine's `LastBlock`: when the feature reads only the CLS token, the
    last block runs for the CLS query alone (keys and values from every token); same numbers as the full forward,
    ~6% less work for a ViT-S/12. A pooling that averages patch tokens averages the tokens left in the sequence.
    """
    last = LastBlock(backbone)
    with torch.no_grad():
        z = backbone.run_blocks(tokens, 0, -1)  # [S, T', D]
        emb, _ = last.forward(z, *last.projections(z))  # [S, D]
        return head(emb)


def keep_indices(num_prefix: int, num_patches: int, device: torch.device | str = "cpu") -> Tensor:
    """Row i lists the token positions kept when patch i is removed: [N, P + N - 1]."""
    t = num_prefix + num_patches
    full = torch.arange(t, device=device).expand(num_patches, t)
    drop = num_prefix + torch.arange(num_patches, device=device)
    return full[full != drop[:, None]].view(num_patches, t - 1)


@register_method("tam", label="TAM", expensive=True,
                 description="f(x) - f(x without token i), tokens removed before the first block")
def token_ablation_map(
    backbone: FrozenViT,
    head: nn.Module | None,
    images: Tensor,
    targets: TargetsLike,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    chunk_size: int | None = None,
) -> Tensor:
    """TAM for each target logit -> [B, K, gh, gw] float32, signed.

    chunk_size: (image, token) removals per forward; default from max_elements (MLP and attention activations).
    """
    gh, gw = backbone.check_images(images)
    head = head_or_identity(head)
    b = images.shape[0]
    idx = as_targets(targets, b, images.device)
    with explaining(backbone, head), torch.no_grad():
        tokens = backbone.embed(plain(images))  # [B, P+N, D]
        _, t, d = tokens.shape
        p = backbone.num_prefix_tokens
        n = t - p
        full = sequence_logits(backbone, head, tokens)  # [B, C]
        check_range(idx, full.shape[1])
        base = full.gather(1, idx)  # [B, K]
        blk = backbone.model.blocks[0]
        hidden = max(d, getattr(getattr(blk.mlp, "fc1", None), "out_features", 4 * d))
        per_seq = (t - 1) * (hidden + blk.attn.num_heads * (t - 1))
        chunk = int(chunk_size) if chunk_size else max(1, int(max_elements) // per_seq)
        keep = keep_indices(p, n, tokens.device)  # [N, T-1]
        img_of = torch.arange(b, device=tokens.device).repeat_interleave(n)  # pair -> image, image-major
        tok_of = torch.arange(n, device=tokens.device).repeat(b)  # pair -> removed patch
        ablated = torch.empty(b * n, idx.shape[1], device=tokens.device, dtype=full.dtype)
        for start in range(0, b * n, chunk):
            sl = slice(start, start + chunk)
            seqs = tokens[img_of[sl, None], keep[tok_of[sl]]]  # [S, T-1, D]
            logits = sequence_logits(backbone, head, seqs)  # [S, C]
            ablated[sl] = logits.gather(1, idx[img_of[sl]])  # [S, K]
        scores = base[:, None, :] - ablated.view(b, n, -1)  # [B, N, K]
    return scores.permute(0, 2, 1).reshape(b, idx.shape[1], gh, gw).float()


def naive_token_ablation_map(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: TargetsLike
                             ) -> Tensor:
    """The same scores from one forward per (image, removed token): slow on purpose, the baseline of the speed
    benchmarks. -> [B, K, gh, gw]."""
    gh, gw = backbone.check_images(images)
    head = head_or_identity(head)
    idx = as_targets(targets, images.shape[0], images.device)
    p = backbone.num_prefix_tokens
    out = []
    with explaining(backbone, head), torch.no_grad():
        for b in range(images.shape[0]):
            tok = backbone.embed(plain(images[b:b + 1]))  # [1, P+N, D]
            full = sequence_logits(backbone, head, tok)[0, idx[b]]  # [K]
            out.append(torch.stack([full - sequence_logits(
                backbone, head, torch.cat([tok[:, :p + i], tok[:, p + i + 1:]], 1))[0, idx[b]]
                for i in range(tok.shape[1] - p)], 1))  # [K, N]
    return torch.stack(out).reshape(images.shape[0], idx.shape[1], gh, gw).float()
