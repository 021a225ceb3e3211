"""Evaluate every registered explanation method on a trained head: `python -m cdam_pl.evaluate`.

Image sets of held-out Fashion-MNIST items (single items, two-item composites, 2 x 2 Focus mosaics) with exact object
masks, and the photos bundled with scikit-image, scikit-learn and matplotlib (`data`); every method's maps scored per
image by the metrics of `cdam_pl.metrics` (`scoring`); means with seeded bootstrap intervals and paired differences
against CDAM (`stats`); results.md, scores.csv and figures (`report`); the run and its command line (`run`).
EVALUATION.md holds the full run on the demo checkpoint.
"""
from cdam_pl.evaluate.data import EvalSet, composite_set, fmnist_set, heldout_indices, mosaic_set, token_masks
from cdam_pl.evaluate.run import FULL, QUICK, main, parse_args, run
from cdam_pl.evaluate.stats import Estimate, bootstrap_mean, bootstrap_statistic, paired_difference

__all__ = [
    "EvalSet",
    "fmnist_set",
    "composite_set",
    "mosaic_set",
    "heldout_indices",
    "token_masks",
    "Estimate",
    "bootstrap_mean",
    "paired_difference",
    "bootstrap_statistic",
    "FULL",
    "QUICK",
    "run",
    "parse_args",
    "main",
]
