"""Explanation-quality metrics, one module per metric family.

Each family has a functional core (plain tensors in, per-map scores out, batched on the maps' or images' device;
the training callback and `python -m cdam_pl.evaluate` call these) and thin torchmetrics Metrics on one mean-metric
base (stateful, synced under DDP; the method benchmark `cdam_pl.benchmark` uses them). Both share one definition
per metric. Maps are token grids [..., gh, gw] as every method in `cdam_pl.explain.registry` returns them. Each
docstring gives the definition, the citation and how the metric deviates from Quantus on purpose (tokens instead of
pixels, batching); tests/test_metrics_quantus.py checks every metric Quantus implements against it. Inside
`cdam_pl`, import from the defining modules; this face re-exports their public names for users.

- compactness: fraction of negligible scores, two named rules (v1: signed max, the paper's; symmetric: max|s|)
- localisation: Focus, pointing game, relevance mass and rank accuracy against object masks
- sensitivity: Pearson correlation between the maps of two classes of one image; pooled correlation of two methods
- evidence: share of positive evidence inside the target's object mask
- deletion: MIF/LIF deletion curves and their area (fidelity); token-deletion logit drops; `patch_logits`
- faithfulness: deletion/insertion curves of the target probability and their AUC; ROAD with noisy linear imputation
- sanity: cascading model randomisation, Spearman and SSIM between maps, random-logit test
"""
from cdam_pl.metrics.compactness import (
    COMPACTNESS_RULES,
    CompactnessSymmetric,
    CompactnessV1,
    compactness_symmetric,
    compactness_v1,
)
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
    gaussian_blur,
    keep_after_removal,
    num_deleted,
    patch_logits,
    random_tokens,
)
from cdam_pl.metrics.evidence import MaskedEvidenceShare
from cdam_pl.metrics.faithfulness import (
    PERTURBATION_KINDS,
    ROAD,
    ROAD_FRACTIONS,
    ROAD_ORDERS,
    DeletionAUC,
    InsertionAUC,
    curve_auc,
    noisy_linear_imputation,
    perturbation_curves,
    road_curves,
)
from cdam_pl.metrics.localisation import (
    Focus,
    PointingGame,
    RelevanceMassAccuracy,
    RelevanceRankAccuracy,
    focus,
    pointing_game,
    quadrant_masks,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
)
from cdam_pl.metrics.sanity import (
    RANDOMISATION_SIMILARITIES,
    ModelRandomisation,
    RandomLogit,
    random_logit,
    random_other_classes,
    randomised_cascade,
    spearman,
    ssim,
    ssim_window,
)
from cdam_pl.metrics.sensitivity import ClassSensitivity, PooledCorrelation, map_correlation, pooled_correlation

__all__ = [
    # compactness
    "COMPACTNESS_RULES",
    "compactness_v1",
    "compactness_symmetric",
    "CompactnessV1",
    "CompactnessSymmetric",
    # localisation
    "quadrant_masks",
    "focus",
    "pointing_game",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "Focus",
    "PointingGame",
    "RelevanceMassAccuracy",
    "RelevanceRankAccuracy",
    "MaskedEvidenceShare",
    # sensitivity
    "map_correlation",
    "ClassSensitivity",
    "pooled_correlation",
    "PooledCorrelation",
    # deletion
    "DELETION_MODES",
    "REPLACEMENTS",
    "DELETION_MAX_ELEMENTS",
    "deletion_order",
    "gaussian_blur",
    "keep_after_removal",
    "patch_logits",
    "deletion_curves",
    "fidelity_from_curves",
    "DeletionFidelity",
    "num_deleted",
    "random_tokens",
    "embed_without_tokens",
    "deletion_drop",
    # faithfulness
    "PERTURBATION_KINDS",
    "ROAD_ORDERS",
    "ROAD_FRACTIONS",
    "perturbation_curves",
    "curve_auc",
    "noisy_linear_imputation",
    "road_curves",
    "DeletionAUC",
    "InsertionAUC",
    "ROAD",
    # sanity
    "RANDOMISATION_SIMILARITIES",
    "randomised_cascade",
    "spearman",
    "ssim",
    "ssim_window",
    "random_other_classes",
    "random_logit",
    "ModelRandomisation",
    "RandomLogit",
]
