"""Class-discriminative attention maps (CDAM): the one implementation every part of cdam-pl calls.

Definition (Brocki, Binda and Chung, TMLR 2024): T = output of `blocks[-1].norm1`, S_i = sum_j T_ij * df/dT_ij
for every patch token i, f a raw class logit or a concept similarity, prefix tokens dropped, sign kept, reshaped
to the (gh, gw) grid.

How it is computed, exactly and cheaply:
- The blocks before the last run once without autograd; the result z is the last block's input.
- S_i is the derivative of f when T_i alone is scaled by (1 + eps). T_i reaches f only through its bias-free
  projections q^lin_i = W_q T_i, k^lin_i, v^lin_i, which that scaling scales too, so S_i is also
  k^lin_i . df/dk^lin_i + v^lin_i . df/dv^lin_i (+ q^lin_i . df/dq^lin_i when other query rows matter): the
  definition rearranged, with no D x D projection weight in any backward.
- S is linear in the target's gradient e = df/d(feature) [F]: S = e @ R, row f of R [F, T] the map of feature
  coordinate f. e is a linear head's weight row, a dot concept's vector, and otherwise (MLP heads, cosine concepts)
  the head's Jacobian at the image's feature, in reverse mode (K <= F) or forward mode (K > F).
- Feature read from the CLS token alone (pooling "cls"): after the last block the CLS token depends on the other
  tokens only through the CLS query's attention row, so the block runs for that query alone. With per head h the
  probabilities p_hi, values v_hi = v^lin_hi + b_v and output a_h = sum_i p_hi v_hi, and
  c_hi = k^lin_i . ds_hi/dk^lin_i (s_h the scores; one forward-mode pass, exact with any q_norm/k_norm), scaling
  T_i moves a_h by
      d_hi = da_h/d eps = p_hi ((1 + c_hi) v^lin_hi - c_hi a^lin_h),   a^lin_h = sum_j p_hj v^lin_hj
  (the value bias cancels), and everything after a acts on one token: S = e @ J @ D per image, J = d feature/da
  [F, A], D = [d_1 .. d_T] [A, T]. For K targets the engine multiplies in the cheapest order, counted in passes of
  the one-token path: 2 K reverse passes (e @ J), T forward passes along D's columns (J @ D), or A forward passes
  (J itself). 1,000 targets cost about T one-token passes: a few percent of the forward, plus a K x F x T product.
- Feature read from every token (pooling "avg", "cls+avg"): the block runs for every query, and the fewest passes
  through all of it win: one forward-mode pass per patch token (R directly), or one backward per cotangent (the K
  gradients, or the F unit vectors when K > F).
- Work is chunked over images (never over targets) to bound memory. Smooth and Integrated CDAM perturb z and
  repeat the per-image work for every sample, batched over samples in chunks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdam_pl.backbone import FrozenViT, ViTFeatures
from cdam_pl.errors import CdamError
from cdam_pl.explain._vit import LastBlock, as_targets, check_range, explaining, plain
from cdam_pl.explain.models import adapt
from cdam_pl.explain.registry import register_method

Targets = Union[Sequence[int], Tensor, Callable[[Tensor], Tensor], None]
VARIANTS = ("vanilla", "smooth", "integrated")
SIMILARITIES = ("dot", "cosine")
# Upper bound on float elements held by one chunk's gradients (~1 GiB in float32).
DEFAULT_MAX_ELEMENTS = 2**28
N_SAMPLES = 50  # Smooth CDAM: noisy copies of the last block's input
N_STEPS = 50  # Integrated CDAM: steps of the path from zero to the last block's input
SMOOTH_NOISE = 0.05  # Smooth CDAM: sigma as a fraction of each image's range of the last block's input
INTEGRATED_NOISE = 0.0  # Integrated CDAM: no noise on the path by default


@dataclass
class Explanation:
    """Everything one forward pass yields. Tensors stay on the images' device."""

    logits: Tensor  # [B, C] raw head outputs on the unperturbed images
    embeddings: Tensor  # [B, F] the feature the head reads (the pooled tokens after the final norm)
    targets: Tensor | None  # [B, K] class indices that class_maps refer to
    class_maps: Tensor | None  # [B, K, gh, gw] signed CDAM per target
    concept_scores: Tensor | None  # [B, M] similarity of each image to each concept vector
    concept_maps: Tensor | None  # [B, M, gh, gw] signed CDAM of each concept similarity
    attention: Tensor | None  # [B, heads, gh, gw] last-block attention of the CLS query to each patch

    @property
    def maps(self) -> Tensor:
        """Class maps, then concept maps: [B, K + M, gh, gw]."""
        return torch.cat([m for m in (self.class_maps, self.concept_maps) if m is not None], dim=1)


def concept_scores(embeddings: Tensor, vectors: Tensor, similarity: str = "dot") -> Tensor:
    """Similarity of embeddings [B, D] to concept vectors [M, D] -> [B, M] (dot product, or cosine)."""
    if similarity == "cosine":
        return F.normalize(embeddings, dim=-1) @ F.normalize(vectors, dim=-1).T
    return embeddings @ vectors.T


class CDAM:
    """CDAM for a frozen ViT and a head ([B, D] -> [B, C] logits), or for a whole ViT classifier (`from_model`).

    >>> cdam = CDAM(backbone, head)
    >>> maps = cdam.class_maps(images, [3, 7])                 # [B, 2, gh, gw]
    >>> ex = cdam.explain(images, targets=lambda logits: logits.topk(3).indices, concepts=vectors)
    """

    def __init__(self, backbone: ViTFeatures, head: nn.Module | None = None,
                 max_elements: int = DEFAULT_MAX_ELEMENTS):
        if not isinstance(backbone, ViTFeatures):
            raise CdamError(f"CDAM needs a FrozenViT from cdam_pl.load_backbone, got {type(backbone).__name__}; "
                            "for a whole classifier use CDAM.from_model(model)")
        self.backbone = backbone
        self.head = head if head is not None else nn.Identity()
        self.max_elements = int(max_elements)
        self._last = LastBlock(backbone)

    @classmethod
    def from_model(cls, model: nn.Module, max_elements: int = DEFAULT_MAX_ELEMENTS) -> CDAM:
        """CDAM for a whole ViT classifier whose last attention layer feeds its output: a timm VisionTransformer
        with its own head (any global_pool: token, avg, max, avgmax, map; fc_norm; register tokens), or a
        transformers ViTForImageClassification (extra `hf`; converted once, here, to a timm copy with the same
        weights). The maps are those of the model's own logits; `self.backbone` gives the pre-logits feature
        (concept vectors: `concept_vectors(cdam.backbone, examples)`). A timm model is used as it is: not copied,
        not frozen; its train/eval modes and requires_grad flags are restored after each call, and no parameter
        gets a `.grad`. Anything else is a one-line CdamError naming what is missing.
        """
        backbone, head = adapt(model)
        return cls(backbone, head, max_elements=max_elements)

    # --- public API --------------------------------------------------------------------------------------------
    def class_maps(self, images: Tensor, targets: Targets, **kwargs) -> Tensor:
        """Signed CDAM for class targets -> [B, K, gh, gw]. kwargs as in `explain` (variant, n_samples, ...)."""
        return self.explain(images, targets=targets, **kwargs).class_maps

    def concept_maps(self, images: Tensor, vectors: Tensor, similarity: str = "dot", **kwargs) -> Tensor:
        """Signed CDAM of the similarity to each concept vector [M, D] -> [B, M, gh, gw]."""
        return self.explain(images, concepts=vectors, similarity=similarity, **kwargs).concept_maps

    def explain(
        self,
        images: Tensor,
        targets: Targets = None,
        concepts: Tensor | None = None,
        similarity: str = "dot",
        attention: bool = False,
        variant: str = "vanilla",
        n_samples: int = N_SAMPLES,
        noise: float | None = None,
        n_steps: int = N_STEPS,
        generator: torch.Generator | None = None,
    ) -> Explanation:
        """Class maps, concept maps and (optionally) attention maps of a batch from one forward pass.

        targets: list[int] (same for every image), LongTensor [B, K] or [B], or a callable logits [B, C] -> [B, K]
        (e.g. top-k or predicted class, chosen on the same forward). concepts: [M, D] concept vectors.
        variant: "vanilla"; "smooth" (n_samples noisy copies of z, noise = lambda, default SMOOTH_NOISE);
        "integrated" (z scaled by k/n_steps for k = 1..n_steps-1, optional noise, default INTEGRATED_NOISE).
        Sample k's noise is the k-th draw of shape [B, P+N, D] from `generator`, times
        sigma = noise * (max(z_b) - min(z_b)) per image.
        """
        if variant not in VARIANTS:
            raise CdamError(f"unknown CDAM variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        if similarity not in SIMILARITIES:
            raise CdamError(f"unknown similarity {similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        if attention and not self.backbone.has_cls_token:
            raise CdamError("attention maps are the CLS query's attention and this model has no CLS token; "
                            "ask for attention=False")
        gh, gw = self.backbone.check_images(images)
        with explaining(self.backbone, self.head):
            images = plain(images)
            vectors = None if concepts is None else self._check_concepts(plain(concepts), images)
            z = self.backbone.last_block_input(images)  # [B, P+N, D], no autograd
            q_lin, k_lin, v_lin = self._last.projections(z)
            with torch.no_grad():
                emb, probs = self._last.forward(z, q_lin, k_lin, v_lin)
                logits = self.head(emb)
            idx = self._resolve_targets(targets, logits)
            n_cls = 0 if idx is None else idx.shape[1]
            n_con = 0 if vectors is None else vectors.shape[0]
            maps = None
            if n_cls + n_con:
                maps = self._maps(z, (q_lin, k_lin, v_lin), idx, vectors, similarity, variant,
                                  n_samples, noise, n_steps, generator)
                maps = maps.reshape(images.shape[0], n_cls + n_con, gh, gw).float()
        return Explanation(
            logits=logits,
            embeddings=emb,
            targets=idx,
            class_maps=maps[:, :n_cls] if n_cls else None,
            concept_scores=None if vectors is None else concept_scores(emb, vectors, similarity),
            concept_maps=maps[:, n_cls:] if n_con else None,
            attention=probs[:, :, self.backbone.num_prefix_tokens:].reshape(-1, probs.shape[1], gh, gw)
            if attention else None,
        )

    # --- internals ---------------------------------------------------------------------------------------------
    def _check_concepts(self, vectors: Tensor, images: Tensor) -> Tensor:
        if vectors.ndim != 2 or vectors.shape[1] != self.backbone.feature_dim:
            raise CdamError(
                f"concept vectors must be [M, {self.backbone.feature_dim}], got {tuple(vectors.shape)}; "
                "build them with cdam_pl.explain.concept_vectors"
            )
        return vectors.to(device=images.device, dtype=images.dtype)

    @staticmethod
    def _resolve_targets(targets: Targets, logits: Tensor) -> Tensor | None:
        """Targets (a callable is applied to the logits) -> LongTensor [B, K] on the logits' device, checked
        against the head's classes."""
        if targets is None:
            return None
        idx = as_targets(targets(logits) if callable(targets) else targets, logits.shape[0], logits.device)
        check_range(idx, logits.shape[1])
        return idx

    def _maps(self, z, proj, idx, vectors, similarity, variant, n_samples, noise, n_steps, generator) -> Tensor:
        """Token scores [B, K+M, P+N] (prefix tokens dropped later), averaged over samples for smooth/integrated."""
        if variant == "vanilla":
            return self._scores(z, proj, idx, vectors, similarity)[..., self.backbone.num_prefix_tokens:]
        if variant == "smooth":
            scales = torch.ones(n_samples)
            lam = SMOOTH_NOISE if noise is None else float(noise)
        else:
            scales = torch.arange(1, n_steps) / n_steps
            lam = INTEGRATED_NOISE if noise is None else float(noise)
        if len(scales) < 1:
            raise CdamError(f"{variant} CDAM needs n_samples >= 1 / n_steps >= 2")
        b, t, d = z.shape
        flat = z.reshape(b, -1)
        sigma = lam * (flat.max(1).values - flat.min(1).values)  # [B]: noise scale per image
        k_tot = (0 if idx is None else idx.shape[1]) + (0 if vectors is None else vectors.shape[0])
        # Samples per chunk, bounded by what a chunk holds at once: the perturbed inputs and their projections, and
        # the chunk's scores; `_scores` bounds the rest by chunking over the chunk's images.
        per_sample = b * t * (2 * d + 3 * self._last.attn.attn_dim + k_tot)
        chunk = max(1, min(len(scales), self.max_elements // max(per_sample, 1)))
        total = None
        for start in range(0, len(scales), chunk):
            zs = []
            for s in scales[start:start + chunk].tolist():
                zk = z * s
                if lam:
                    eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
                    zk = zk + eps * sigma[:, None, None]
                zs.append(zk)
            n = len(zs)
            zc = torch.cat(zs)  # [n*B, T, D], sample-major
            rep = lambda x: None if x is None else x.repeat(n, 1)  # noqa: E731
            s = self._scores(zc, self._last.projections(zc), rep(idx), vectors, similarity)
            s = s.view(n, b, k_tot, t).sum(0)
            total = s if total is None else total + s
        return (total / len(scales))[..., self.backbone.num_prefix_tokens:]

    def _scores(self, z: Tensor, proj, idx: Tensor | None, vectors: Tensor | None, similarity: str) -> Tensor:
        """Exact CDAM token scores for every token: [B, K+M, T], in chunks of images bounded by `max_elements`."""
        b, t, _ = z.shape
        k_tot = (0 if idx is None else idx.shape[1]) + (0 if vectors is None else vectors.shape[0])
        chunk = max(1, min(b, self.max_elements // max(self._elements_per_image(t, k_tot), 1)))
        if chunk >= b:
            return self._chunk_scores(z, proj, idx, vectors, similarity)
        parts = []
        for start in range(0, b, chunk):
            rows = slice(start, start + chunk)
            parts.append(self._chunk_scores(z[rows], tuple(x[rows] for x in proj),
                                            None if idx is None else idx[rows], vectors, similarity))
        return torch.cat(parts)

    def _elements_per_image(self, t: int, k_tot: int) -> int:
        """Upper estimate of the float elements one image holds at once in `_chunk_scores` (sizes its chunks)."""
        last, f = self._last, self.backbone.feature_dim
        d, a, hidden, h = self.backbone.embed_dim, last.attn.attn_dim, last.hidden, last.attn.num_heads
        # a head's forward-mode Jacobian holds F tangents of its widest layer
        c = max((m.out_features for m in self.head.modules() if isinstance(m, nn.Linear)), default=f)
        common = k_tot * (2 * f + 2 * t) + f * c + t * (2 * d + 3 * a)
        if last.cls_only:  # at most min(T, A) forward passes (or 2 K reverse ones) of the one-token path
            return common + min(t, a) * 2 * (d + hidden + a + f) + f * (t + a) + 4 * h * t
        # the whole block's autograd graph and one cotangent's gradients of it, or the token_jvps of a chunk of
        # tokens (chunked in _full_token_scores), and F x T scores
        return common + 4 * t * (3 * a + h * t + 2 * hidden + 4 * d) + f * t

    def _chunk_scores(self, z: Tensor, proj, idx: Tensor | None, vectors: Tensor | None, similarity: str) -> Tensor:
        """Exact CDAM token scores of one chunk of images: [B, K+M, T] (the identities: module docstring)."""
        last = self._last
        if last.cls_only:
            with torch.no_grad():
                out, probs = last.attend(*proj)  # [B, 1, A], [B, h, 1, T]
                feature = last.after_attention(z, out) if self._needs_feature(idx, vectors, similarity) else None
            grads = self._target_gradients(feature, z, idx, vectors, similarity)  # [B, K+M, F]
            return last.cls_product(z, out, grads, last.token_directions(probs[:, :, 0], out, *proj))
        return self._full_token_scores(z, proj, idx, vectors, similarity)

    def _needs_feature(self, idx: Tensor | None, vectors: Tensor | None, similarity: str) -> bool:
        """Whether some target is nonlinear in the feature, so that its gradient needs the image's feature."""
        return (idx is not None and type(self.head) is not nn.Linear) or (vectors is not None and similarity != "dot")

    def _target_gradients(self, feature: Tensor | None, z: Tensor, idx: Tensor | None, vectors: Tensor | None,
                          similarity: str) -> Tensor:
        """Gradient of each target with respect to the feature, per image: [B, K+M, F]. The feature [B, F] is only
        read (and may be None) where a target is nonlinear in it."""
        parts = []
        if idx is not None:
            if type(self.head) is nn.Linear:  # a linear head's gradient for class k is its weight row k
                parts.append(self.head.weight.detach()[idx])
            else:
                parts.append(_jacobian_rows(lambda e: self.head(e).gather(1, idx), feature, idx.shape[1]))
        if vectors is not None:
            if similarity == "dot":  # linear in the feature: the gradient is the concept vector
                parts.append(vectors.expand(z.shape[0], -1, -1))
            else:
                parts.append(_jacobian_rows(lambda e: concept_scores(e, vectors, similarity), feature,
                                            vectors.shape[0]))
        return torch.cat(parts, dim=1).to(z.dtype)

    def _full_token_scores(self, z: Tensor, proj, idx: Tensor | None, vectors: Tensor | None,
                           similarity: str) -> Tensor:
        """Token scores when the feature reads every query row: [B, K+M, T]. By the fewest passes through the whole
        last block: one forward-mode pass per patch token (the F x N matrix R of the feature coordinates' maps,
        then S = e @ R), or one backward per cotangent (the K target gradients, or the F unit vectors when K > F).

        One backward per cotangent: measured 20-30% faster on CPU than one vmapped backward of all of them, since
        the vmap has no batching rule for the block's elementwise backwards (GELU, LayerNorm, softmax), loops over
        the cotangents there anyway and then stacks the results; it also holds one cotangent's gradients."""
        last, prefix, f = self._last, self.backbone.num_prefix_tokens, self.backbone.feature_dim
        b, t, _ = z.shape
        k = (0 if idx is None else idx.shape[1]) + (0 if vectors is None else vectors.shape[0])
        if t - prefix < min(k, f):
            with torch.no_grad():
                feature = last.forward(z, *proj)[0] if self._needs_feature(idx, vectors, similarity) else None
            grads = self._target_gradients(feature, z, idx, vectors, similarity)  # [B, K+M, F]
            # tokens per chunk of forward passes: each holds about the block's activations
            a, h = last.attn.attn_dim, last.attn.num_heads
            per_token = 2 * b * t * (3 * a + h * t + 2 * last.hidden + 4 * self.backbone.embed_dim)
            chunk = max(1, self.max_elements // per_token)
            rows = torch.zeros(b, f, t, device=z.device, dtype=z.dtype)
            for start in range(prefix, t, chunk):
                tokens = torch.arange(start, min(start + chunk, t), device=z.device)
                rows[:, :, tokens] = last.token_jvps(z, proj, tokens)
            return grads @ rows
        lin = tuple(x.detach().requires_grad_() for x in proj)
        feature, _ = last.forward(z, *lin)
        grads = self._target_gradients(feature.detach(), z, idx, vectors, similarity)
        by_feature = k > f  # the F coordinates' maps, then each target's map as a combination of them
        n = f if by_feature else k
        scores = []
        for j in range(n):
            if by_feature:
                cot = torch.zeros_like(feature)
                cot[:, j] = 1
            else:
                cot = grads[:, j]
            g = torch.autograd.grad(feature, lin, cot, retain_graph=j + 1 < n)
            scores.append(sum((gi * x).sum(-1) for gi, x in zip(g, proj)))  # [B, T]
        rows = torch.stack(scores, dim=1)  # [B, n, T]
        return grads @ rows if by_feature else rows


def _jacobian_rows(fn: Callable[[Tensor], Tensor], x: Tensor, n: int) -> Tensor:
    """Per-row Jacobian of fn: [B, F] -> [B, n] (row b of the output depends on row b of x alone) -> [B, n, F].

    Reverse mode (n one-hot cotangents) when n <= F, else forward mode (F unit tangents): the cheaper of the two.
    """
    b, f = x.shape
    if n <= f:
        x = x.detach().requires_grad_()
        y = fn(x.view_as(x))  # a view: a leaf input upsets FlopCounterMode's module hooks
        eye = torch.eye(n, device=x.device, dtype=y.dtype)[:, None].expand(n, b, n)
        return torch.autograd.grad(y, x, eye, is_grads_batched=True)[0].permute(1, 0, 2)
    x = x.detach()
    eye = torch.eye(f, device=x.device, dtype=x.dtype)[:, None].expand(f, b, f)
    with torch.no_grad():
        cols = torch.func.vmap(lambda tangent: torch.func.jvp(fn, (x,), (tangent,))[1])(eye)  # [F, B, n]
    return cols.permute(1, 2, 0)


def concept_vectors(
    backbone: ViTFeatures, examples: Mapping[str, Tensor | Sequence[Tensor]], batch_size: int = 32
) -> tuple[list[str], Tensor]:
    """Concept vector = mean embedding of a concept's example images: -> (names, [M, D]).

    examples maps a name to a [n, 3, H, W] tensor or a list of [3, H, W] tensors (sizes may differ). The backbone
    runs in eval mode (a live model's modes are restored afterwards), without autograd.
    """
    names, vectors = [], []
    with explaining(backbone), torch.no_grad():
        for name, imgs in examples.items():
            items = list(imgs) if not isinstance(imgs, Tensor) else list(imgs.unbind(0))
            if not items:
                raise CdamError(f"concept {name!r} has no example images; give it at least one")
            embs = []
            for i in range(0, len(items), batch_size):
                group = items[i:i + batch_size]
                if len({tuple(x.shape) for x in group}) == 1:
                    embs.append(backbone(torch.stack(group)))
                else:
                    embs.extend(backbone(x[None]) for x in group)
            names.append(name)
            vectors.append(torch.cat(embs).mean(0))
    return names, torch.stack(vectors)


# --- the engine's methods in the registry -------------------------------------------------------------------------
@register_method("cdam", label="CDAM", takes_concepts=True, variant="vanilla", from_explanation=lambda ex: ex.maps)
def cdam_maps(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: Targets, *,
              concepts: Tensor | None = None, similarity: str = "dot") -> Tensor:
    """vanilla CDAM: signed gradient x token at the last attention layer's input"""
    return CDAM(backbone, head).explain(images, targets=targets, concepts=concepts, similarity=similarity).maps


@register_method("smooth", label="Smooth CDAM", takes_concepts=True, variant="smooth", samples="n_samples",
                 aliases=("smooth_cdam",))
def smooth_cdam_maps(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: Targets, *,
                     concepts: Tensor | None = None, similarity: str = "dot", n_samples: int = N_SAMPLES,
                     noise: float = SMOOTH_NOISE, generator: torch.Generator | None = None) -> Tensor:
    """Smooth CDAM: mean CDAM over n_samples noisy copies of the last block's input (sigma = noise * range)"""
    return CDAM(backbone, head).explain(images, targets=targets, concepts=concepts, similarity=similarity,
                                        variant="smooth", n_samples=n_samples, noise=noise, generator=generator).maps


@register_method("integrated", label="Integrated CDAM", takes_concepts=True, variant="integrated",
                 samples="n_steps", aliases=("integrated_cdam",))
def integrated_cdam_maps(backbone: FrozenViT, head: nn.Module | None, images: Tensor, targets: Targets, *,
                         concepts: Tensor | None = None, similarity: str = "dot", n_steps: int = N_STEPS,
                         noise: float = INTEGRATED_NOISE, generator: torch.Generator | None = None) -> Tensor:
    """Integrated CDAM: mean CDAM along the path 0 -> last block input (k/n_steps, k = 1..n_steps-1)"""
    return CDAM(backbone, head).explain(images, targets=targets, concepts=concepts, similarity=similarity,
                                        variant="integrated", n_steps=n_steps, noise=noise, generator=generator).maps
