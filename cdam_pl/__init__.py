"""cdam-pl: heads on frozen self-supervised ViTs, explained with class-discriminative attention maps (CDAM).

The public API; everything else is reachable from its subpackage (`cdam_pl.explain.registry`, `cdam_pl.metrics`,
`cdam_pl.viz`, ...). Modules inside the package never import from here.
"""
from cdam_pl.backbone import FrozenViT, load_backbone
from cdam_pl.checkpoint import LoadedModel, load_checkpoint
from cdam_pl.config import load_config
from cdam_pl.data.datamodule import ImageDataModule
from cdam_pl.errors import CdamError, CheckpointError, ConfigError, DataError
from cdam_pl.explain.attention import attention_maps
from cdam_pl.explain.cdam import CDAM, Explanation, concept_vectors
from cdam_pl.report.run import ExplainOptions, explain_to_dir
from cdam_pl.store.reader import StoredExplanation, load_explanations
from cdam_pl.train.callbacks import ExplanationCallback
from cdam_pl.train.module import HeadClassifier
from cdam_pl.train.run import run_training

__all__ = [
    "CDAM",
    "CdamError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExplainOptions",
    "Explanation",
    "ExplanationCallback",
    "FrozenViT",
    "HeadClassifier",
    "ImageDataModule",
    "LoadedModel",
    "StoredExplanation",
    "attention_maps",
    "concept_vectors",
    "explain_to_dir",
    "load_backbone",
    "load_checkpoint",
    "load_config",
    "load_explanations",
    "run_training",
]
__version__ = "0.1.0"
