"""Adapters behind `CDAM.from_model`: a user's whole ViT classifier -> (backbone view, head) for the CDAM engine.

- A timm `VisionTransformer` with its own head (num_classes > 0) is wrapped as it is, by `ClassifierViT`: no copy,
  no freezing, its modes and requires_grad flags untouched. The feature is timm's own pre-logits feature,
  `model.forward_head(model.norm(tokens), pre_logits=True)` (pooling by `global_pool` or the attention-pool head,
  `fc_norm`, `head_drop`), the head `model.head`: together exactly `model.forward`.
- A Hugging Face `ViTForImageClassification` is converted, once per call, into a timm VisionTransformer with the same
  weights: query/key/value fused into `qkv`, the layer norms (`layernorm_before` -> `norm1`, `layernorm_after` ->
  `norm2`, with the config's eps), the MLP with exact GELU, the patch convolution, CLS token and position embedding,
  `vit.layernorm` as the final norm, and a copy of `classifier` as the head on the CLS token. The two compute the
  same function (same operations in the same order), so the CDAM of the copy is the CDAM of the original; the
  original is only read. `transformers` is the optional extra `hf`.
"""
from __future__ import annotations

import copy
from functools import partial

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from cdam_pl.backbone import ViTFeatures, check_vit
from cdam_pl.errors import CdamError

# VisionTransformer methods whose code the view reproduces or calls; a subclass or instance that replaces one of
# them computes something else.
TIMM_FORWARD = ("forward", "forward_features", "forward_head", "pool", "_pos_embed")
SUPPORTED = ("CDAM.from_model takes a timm VisionTransformer with its own head or a transformers "
             "ViTForImageClassification")


class ClassifierViT(ViTFeatures):
    """A live view of a timm VisionTransformer with its own head: the feature is timm's pre-logits feature.

    `pool(tokens) = model.forward_head(model.norm(tokens), pre_logits=True)`, so `model.head(self(images))` is
    `model(images)`. Only the CLS token is read when the model pools its CLS token (`global_pool="token"`, no
    attention-pool head).
    """

    @property
    def pooling(self) -> str:
        return str(self.model.global_pool)

    @property
    def feature_dim(self) -> int:
        return int(getattr(self.model, "head_hidden_size", self.model.num_features))

    @property
    def reads_cls_only(self) -> bool:
        return self.model.global_pool == "token" and getattr(self.model, "attn_pool", None) is None

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.norm(tokens), pre_logits=True)


def check_timm_classifier(model: nn.Module) -> None:
    """One-line errors for a timm model whose output the view would not reproduce exactly."""
    check_vit(model, "the model")
    name = type(model).__name__
    for method in TIMM_FORWARD:
        if method in vars(model):
            raise CdamError(f"the model's {method} was replaced on the instance; {SUPPORTED}, with timm's forward")
        if getattr(type(model), method, None) is not getattr(VisionTransformer, method, None):
            raise CdamError(f"{name} overrides VisionTransformer.{method}; {SUPPORTED}, with timm's forward")
    if isinstance(model.head, nn.Identity):
        raise CdamError("the model has no head (built with num_classes=0); build it with num_classes > 0, or pass "
                        "a head: CDAM(backbone, head)")
    if not model.global_pool and getattr(model, "attn_pool", None) is None:
        raise CdamError("the model does not pool its tokens (global_pool=''), so its head reads every token; "
                        "CDAM needs one feature per image: use global_pool token, avg, max, avgmax or map")
    if model.global_pool == "token" and getattr(model, "attn_pool", None) is None and model.cls_token is None:
        raise CdamError("the model pools its CLS token (global_pool='token') but has no CLS token (class_token=False)")


def from_timm(model: VisionTransformer) -> tuple[ClassifierViT, nn.Module]:
    check_timm_classifier(model)
    return ClassifierViT(model), model.head


# --- Hugging Face ViTForImageClassification -------------------------------------------------------------------------
def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _layers(vit: nn.Module) -> list[dict[str, nn.Module]]:
    """The modules of each encoder layer by role; transformers 5 renamed them (`layers`, q_proj, mlp.fc1, ...)."""
    out = []
    if hasattr(vit, "layers"):
        for layer in vit.layers:
            a = layer.attention
            out.append({"norm1": layer.layernorm_before, "q": a.q_proj, "k": a.k_proj, "v": a.v_proj,
                        "proj": a.o_proj, "norm2": layer.layernorm_after, "fc1": layer.mlp.fc1, "fc2": layer.mlp.fc2})
    else:  # transformers 4
        for layer in vit.encoder.layer:
            a = layer.attention
            out.append({"norm1": layer.layernorm_before, "q": a.attention.query, "k": a.attention.key,
                        "v": a.attention.value, "proj": a.output.dense, "norm2": layer.layernorm_after,
                        "fc1": layer.intermediate.dense, "fc2": layer.output.dense})
    return out


def hf_vit_to_timm(hf: nn.Module) -> VisionTransformer:
    """The timm VisionTransformer computing exactly what `hf` (a ViTForImageClassification) computes, with copies of
    its weights, in eval mode and without requires_grad (see the module docstring)."""
    cfg = hf.config
    what = "the transformers ViTForImageClassification"
    if cfg.hidden_act != "gelu":
        raise CdamError(f"{what} uses hidden_act={cfg.hidden_act!r}; only 'gelu' (exact GELU) is supported")
    if isinstance(hf.classifier, nn.Identity):
        raise CdamError(f"{what} has no classifier (num_labels=0); give it num_labels > 0")
    if cfg.num_channels != 3:
        raise CdamError(f"{what} takes {cfg.num_channels} channels; CDAM explains RGB images (num_channels=3)")
    patch, size = _pair(cfg.patch_size), _pair(cfg.image_size)
    if patch[0] != patch[1] or size[0] % patch[0] or size[1] % patch[1]:
        raise CdamError(f"{what} has patch size {patch} and image size {size}; CDAM needs square patches that "
                        "tile the image")
    d, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    if (getattr(cfg, "head_dim", None) or d // heads) * heads != d:
        raise CdamError(f"{what} has {heads} heads that do not split hidden_size={d} evenly; not supported")
    layers = _layers(hf.vit)
    hidden = layers[0]["fc1"].out_features
    model = VisionTransformer(
        img_size=size, patch_size=patch[0], in_chans=3, num_classes=0, global_pool="token", embed_dim=d,
        depth=len(layers), num_heads=heads,
        mlp_ratio=(hidden + 0.5) / d,  # timm sizes the MLP as int(d * mlp_ratio): this gives exactly `hidden`
        qkv_bias=layers[0]["q"].bias is not None, class_token=True, no_embed_class=False,
        norm_layer=partial(nn.LayerNorm, eps=float(cfg.layer_norm_eps)), act_layer=nn.GELU, weight_init="skip",
    )
    p = hf.classifier.weight if hasattr(hf.classifier, "weight") else next(hf.parameters())
    model.to(device=p.device, dtype=p.dtype)  # before copying, so float64 weights stay float64
    emb = hf.vit.embeddings
    state = {
        "cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
        "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
        "norm.weight": hf.vit.layernorm.weight, "norm.bias": hf.vit.layernorm.bias,
    }
    for i, m in enumerate(layers):
        b = f"blocks.{i}."
        for timm_name, hf_name in (("norm1", "norm1"), ("attn.proj", "proj"), ("norm2", "norm2"),
                                   ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2")):
            state[b + timm_name + ".weight"] = m[hf_name].weight
            state[b + timm_name + ".bias"] = m[hf_name].bias
        state[b + "attn.qkv.weight"] = torch.cat([m["q"].weight, m["k"].weight, m["v"].weight])
        if m["q"].bias is not None:
            state[b + "attn.qkv.bias"] = torch.cat([m["q"].bias, m["k"].bias, m["v"].bias])
    with torch.no_grad():
        model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)  # every weight, or an error
    model.head = copy.deepcopy(hf.classifier)
    model.requires_grad_(False)
    for param in model.parameters():
        param.grad = None  # a deep copy carries the classifier's .grad along
    return model.eval()


def from_hf(model: nn.Module) -> tuple[ClassifierViT, nn.Module]:
    from transformers import ViTForImageClassification  # the optional extra `hf`; only a transformers model gets here

    if not isinstance(model, ViTForImageClassification):
        name = type(model).__name__
        lacks = "has no classification head" if not name.endswith("ForImageClassification") else "is not a ViT"
        raise CdamError(f"transformers' {name} {lacks}; {SUPPORTED} (a ViT with a classifier on the CLS token)")
    return from_timm(hf_vit_to_timm(model))


def adapt(model: nn.Module) -> tuple[ClassifierViT, nn.Module]:
    """(backbone view, head) of a whole classifier; see the module docstring."""
    if type(model).__module__.split(".")[0] == "transformers":
        return from_hf(model)
    if not isinstance(model, VisionTransformer):
        raise CdamError(f"the model is a {type(model).__name__}; {SUPPORTED}")
    return from_timm(model)
