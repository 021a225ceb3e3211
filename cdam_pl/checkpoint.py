"""Reading cdam-pl checkpoints safely and rebuilding backbone + head ready to explain.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain containers only, so a crafted pickle
cannot run code. The backbone is rebuilt from its recorded identity, and refused when the sha256 of its weights
differs from the one the head was trained on.
"""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdam_pl.backbone import FrozenViT, load_backbone
from cdam_pl.errors import CheckpointError
from cdam_pl.heads import build_head

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEY = "cdam_pl"  # the checkpoint entry that holds cdam-pl's metadata


@dataclass
class LoadedModel:
    backbone: FrozenViT
    head: nn.Module
    classes: list[str]
    config: dict[str, Any]
    meta: dict[str, Any]

    def to(self, device) -> "LoadedModel":
        self.backbone.to(device)
        self.head.to(device)
        return self


def read_checkpoint(path: str | Path, require_cdam: bool = True) -> dict[str, Any]:
    """The raw checkpoint dict, loaded with weights_only=True; clear errors for anything else.

    require_cdam=False also accepts plain tensor files (Lightning's own temporary weights under ddp_spawn).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else "unsupported object"
        raise CheckpointError(
            f"refusing to load {p}: it contains objects other than tensors and plain containers ({reason}); "
            "only load checkpoints you trust, and only with weights_only=True"
        ) from None
    except Exception as e:  # torch raises many types for bytes that are not a checkpoint at all
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p} is not a readable checkpoint ({first})") from None
    if require_cdam and (not isinstance(ckpt, dict) or CHECKPOINT_KEY not in ckpt or "state_dict" not in ckpt):
        raise CheckpointError(f"{p} is not a cdam-pl checkpoint (no '{CHECKPOINT_KEY}' section); "
                              "train one with train.py")
    return ckpt


def check_backbone_matches(recorded: dict[str, Any], backbone: FrozenViT) -> None:
    want, got = recorded.get("sha256"), backbone.identity.get("sha256")
    if want and want != got:
        raise CheckpointError(
            f"backbone weights do not match the checkpoint: it was trained on {recorded.get('name')} "
            f"({recorded.get('weights')}, sha256 {want[:12]}), these have sha256 {str(got)[:12]}; "
            "pass the weights the head was trained with"
        )
    pool = recorded.get("pool", "cls")
    if pool != backbone.pooling:
        raise CheckpointError(f"the head reads the {pool!r} feature of its backbone, this backbone pools "
                              f"{backbone.pooling!r}; set backbone.pool={pool}")


def load_checkpoint(path: str | Path, weights: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the frozen backbone and the trained head from a train.py checkpoint (eval mode, on `device`).

    weights overrides where the backbone weights come from (e.g. the file moved); its sha256 must still match.
    """
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    ident = meta["backbone"]
    src = weights if weights is not None else (None if ident["weights"] == "random" else ident["weights"])
    with warnings.catch_warnings():
        if src is None:  # a test checkpoint made on purpose with random weights: no need to warn twice
            warnings.simplefilter("ignore")
        backbone = load_backbone(ident["name"], weights=src, img_size=ident["img_size"], pool=ident.get("pool", "cls"),
                                 **ident.get("kwargs", {}))
    check_backbone_matches(ident, backbone)
    head = build_head(in_dim=backbone.feature_dim, num_classes=len(meta["classes"]), **meta["head"])
    state = {k[len("head."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: head weights do not fit the recorded head config "
                              f"({str(e).splitlines()[0]})") from None
    head.eval()
    return LoadedModel(backbone, head, list(meta["classes"]), dict(meta.get("config", {})), meta).to(device)
