"""Classifier heads on the frozen CLS embedding: [B, D] -> [B, C] raw logits."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from cdam_pl.errors import ConfigError

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
HEAD_KINDS = ("linear", "mlp")


def build_head(
    kind: str,
    in_dim: int,
    num_classes: int,
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    activation: str = "gelu",
    batchnorm: bool = False,
) -> nn.Sequential:
    """A linear head, or an MLP with `hidden` layer sizes; dropout before every Linear.

    batchnorm prepends BatchNorm1d(affine=False), the standard linear-probe trick (as in MAE's linear probing):
    it standardises the frozen features, which speeds up and improves training; in eval mode it is a fixed
    affine map, so a linear head stays linear in the features.
    """
    if kind not in HEAD_KINDS:
        raise ConfigError(f"head.kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"head.activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"head.dropout must be in [0, 1), got {dropout!r}")
    hidden = list(hidden or []) if kind == "mlp" else []
    if kind == "mlp" and not hidden:
        raise ConfigError("head.kind=mlp needs head.hidden, e.g. head.hidden=[512]")
    layers: list[nn.Module] = [nn.BatchNorm1d(in_dim, affine=False, eps=1e-6)] if batchnorm else []
    dims = [in_dim, *[int(h) for h in hidden]]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Dropout(dropout), nn.Linear(a, b), ACTIVATIONS[activation]()]
    layers += [nn.Dropout(dropout), nn.Linear(dims[-1], num_classes)]
    return nn.Sequential(*layers)
