"""Explanation methods, one module each, all in one registry (`cdam_pl.explain.registry`).

CDAM (class and concept maps; vanilla, Smooth and Integrated) is computed by the engine in `cdam.py`, which every
caller (library, callback, explain.py, benchmark, web demo) goes through. Importing this package imports every
method module, so each registers itself beside its definition; the imports below run in display order.
"""
# isort: off
from cdam_pl.explain.cdam import CDAM, Explanation, concept_vectors
from cdam_pl.explain.attention import attention_maps
from cdam_pl.explain import rp, tam, input_space  # noqa: F401  (registers RP, TAM and the captum baselines)
# isort: on

__all__ = ["CDAM", "Explanation", "attention_maps", "concept_vectors"]
