"""Class-discriminative attention maps (CDAM): the one implementation every part of cdam-pl calls.

Definition (Brocki, Binda and Chung, TMLR 2024): T = output of `blocks[-1].norm1`, S_i = sum_j T_ij * df/dT_ij
for every patch token i, f a raw class logit or a concept similarity, prefix tokens dropped, sign kept, reshaped
to the (gh, gw) grid.

How it is computed, exactly and cheaply:
- The blocks before the last run once without autograd; the result z is the last block's input.
- When the head reads only the CLS token (pooling "cls"), the CLS token depends on the other tokens after the last
  block only through the CLS query's attention row. So the last block is evaluated for the CLS query alone (keys
  and values still come from every token); the output is the same embedding as the full block. A patch token T_i
  then reaches f only through its key and value, k_i = W_k T_i + b_k and v_i = W_v T_i + b_v. For a linear map
  T_i . (W^T g) = (W T_i) . g, so with k^lin_i = W_k T_i and v^lin_i = W_v T_i (no bias):
      S_i = k^lin_i . df/dk^lin_i + v^lin_i . df/dv^lin_i
  which is the definition, rearranged; the backward never multiplies by a D x D weight.
- When the head reads pooled patch tokens ("avg", "cls+avg"), every token's output matters: the last block runs for
  every query, and T_i also reaches f through its query: S_i = q^lin_i . df/dq^lin_i + k^lin_i . df/dk^lin_i +
  v^lin_i . df/dv^lin_i. The definition is unchanged; only the shortcut no longer applies.
- All K targets of a batch share one forward: their gradients come from one batched vector-Jacobian product
  (`torch.autograd.grad(..., is_grads_batched=True)`), in memory-bounded chunks of targets; with every query row,
  from one backward per target (faster there: see `_scores`).
- Smooth and Integrated CDAM perturb z and re-run only the last block, batched over samples in chunks.
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
        # Samples per chunk: bounded by the gradients (K * B * T * A * 2 per sample) and the activations; with every
        # query row, also by the attention probabilities and MLP activations the backward keeps, and one target's
        # gradients of them (_scores runs one backward per target there).
        per_sample = b * t * max(d, self._last.attn.attn_dim) * (2 * k_tot + 8)
        if not self._last.cls_only:
            per_sample += 2 * b * t * (self._last.attn.attn_dim + self._last.attn.num_heads * t + self._last.hidden)
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
        """Exact CDAM token scores for every token: [B, K+M, T] (see the module docstring for the identity)."""
        q_lin, k_lin, v_lin = proj
        k_lin = k_lin.detach().requires_grad_()
        v_lin = v_lin.detach().requires_grad_()
        full = not self._last.cls_only  # every query row reaches the feature: T_i also acts through its query
        if full:
            q_lin = q_lin.detach().requires_grad_()
        emb, _ = self._last.forward(z, q_lin, k_lin, v_lin)
        parts = []
        if idx is not None:
            parts.append(self.head(emb).gather(1, idx))  # [B, K]
        if vectors is not None:
            parts.append(concept_scores(emb, vectors, similarity))  # [B, M]
        out = torch.cat(parts, dim=1)  # [B, K+M]
        b, k = out.shape
        if full:
            # One backward per target: measured 20-30% faster on CPU than one vmapped backward of all targets, since
            # the vmap has no batching rule for the block's elementwise backwards (GELU, LayerNorm, softmax), loops
            # over the targets there anyway and then stacks the results; it also holds one target's gradients.
            lin = (q_lin.detach(), k_lin.detach(), v_lin.detach())
            scores = []
            for j in range(k):
                cotangent = torch.zeros_like(out)
                cotangent[:, j] = 1
                grads = torch.autograd.grad(out, (q_lin, k_lin, v_lin), cotangent, retain_graph=j + 1 < k)
                scores.append(sum((g * x).sum(-1) for g, x in zip(grads, lin)))  # [B, T]
            return torch.stack(scores, dim=1)  # [B, K+M, T]
        t, a = k_lin.shape[1], k_lin.shape[2]
        per_target = 2 * b * t * a  # elements one target's backward holds: the k and v projections' gradients
        chunk = max(1, min(k, self.max_elements // per_target))
        inputs = (k_lin, v_lin)
        scores = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            eye = torch.zeros(n, b, k, device=out.device, dtype=out.dtype)  # one-hot cotangent per target
            eye[torch.arange(n), :, start + torch.arange(n)] = 1
            grads = torch.autograd.grad(out, inputs, eye, retain_graph=start + n < k, is_grads_batched=True)
            # [n, B, T, A] -> [n, B, T]
            scores.append((grads[0] * k_lin.detach()).sum(-1) + (grads[1] * v_lin.detach()).sum(-1))
        return torch.cat(scores).permute(1, 0, 2)  # [B, K+M, T]


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
