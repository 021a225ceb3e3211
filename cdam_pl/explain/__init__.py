"""Explanation methods. CDAM (class and concept maps, vanilla/Smooth/Integrated) and the attention map live in
`cdam.py`; every caller (library, callback, explain.py, benchmarks) goes through them."""
from cdam_pl.explain.cdam import CDAM, Explanation, attention_maps, concept_vectors

__all__ = ["CDAM", "Explanation", "attention_maps", "concept_vectors"]
