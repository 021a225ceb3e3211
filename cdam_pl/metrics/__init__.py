"""Explanation-quality metrics, one module per metric family.

Each family has a functional core (plain tensors in, per-map scores out; the training callback calls these on its
tracked batch) and thin torchmetrics Metrics on one mean-metric base (batched, stateful, synced under DDP; the
method benchmark `cdam_pl.benchmark` uses them). Both share one definition per metric, so the callback's per-epoch
scalars and the benchmark's figures measure the same thing. Maps are token grids [..., gh, gw] as every method in
`cdam_pl.explain.registry` returns them. Inside `cdam_pl`, import from the defining modules; this face re-exports
their public names for users.

- compactness: fraction of negligible scores, |s| < rel * max|s|
- sensitivity: Pearson correlation between the maps of two classes of one image
- evidence: share of positive evidence inside the target's object mask
- deletion: MIF/LIF deletion curves and their area (fidelity); token-deletion logit drops
"""
from cdam_pl.metrics.compactness import Compactness, compactness
from cdam_pl.metrics.deletion import (
    DELETION_MAX_ELEMENTS,
    DELETION_MODES,
    REPLACEMENTS,
    DeletionFidelity,
    deletion_curves,
    deletion_drop,
    deletion_order,
    embed_without_tokens,
    fidelity_from_curves,
    num_deleted,
    random_tokens,
)
from cdam_pl.metrics.evidence import MaskedEvidenceShare
from cdam_pl.metrics.sensitivity import ClassSensitivity, map_correlation

__all__ = [
    "compactness",
    "Compactness",
    "map_correlation",
    "ClassSensitivity",
    "MaskedEvidenceShare",
    "DELETION_MODES",
    "REPLACEMENTS",
    "DELETION_MAX_ELEMENTS",
    "deletion_order",
    "deletion_curves",
    "fidelity_from_curves",
    "DeletionFidelity",
    "num_deleted",
    "random_tokens",
    "embed_without_tokens",
    "deletion_drop",
]
