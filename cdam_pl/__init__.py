"""cdam-pl: heads on frozen SSL ViTs, explained with class-discriminative attention maps (CDAM)."""
from cdam_pl.backbone import FrozenViT, load_backbone
from cdam_pl.checkpoint import load_checkpoint

__all__ = ["FrozenViT", "load_backbone", "load_checkpoint"]
__version__ = "0.1.0"
