"""The one registry of explanation methods: every method under one name, one signature and its facts.

    >>> from cdam_pl.explain import registry
    >>> registry.names()
    ['cdam', 'smooth', 'integrated', 'attention', 'rp', 'tam', 'ig', 'smoothgrad', 'ixg']
    >>> m = registry.get("tam")
    >>> maps = m(backbone, head, images, targets)        # [B, K, gh, gw] float32, on the images' device
    >>> maps = m(backbone, head, images, targets, chunk_size=64)   # override a default parameter

Each method registers itself beside its definition with `@register_method(...)` (as timm registers models);
importing `cdam_pl.explain` imports every method module, so the registry is complete whenever any part of the
package is imported. explain.py, the benchmark and the web demo read a method's facts from here: its label,
whether its scores are signed, whether it is class-specific, whether it explains concepts, its parameters and their
defaults, which parameter counts samples, and how a seed becomes the method's `torch.Generator`.

Signature of every method: `fn(backbone, head, images [B, 3, H, W], targets [B, K] LongTensor (or [B], or one
list of class indices for all images), **params) -> [B, K, gh, gw]`; methods that explain concepts also take
`concepts=[M, D]` and `similarity=` and then return [B, K + M, gh, gw] (targets, then concepts). Class-agnostic
methods (the attention map) return the same map for every target, broadcast to [B, K, gh, gw], so every consumer
handles one shape (their top-1/top-2 correlation is then 1 by construction). `signed` says whether negative scores
carry meaning (counter-evidence); unsigned maps are >= 0.
"""
from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from cdam_pl.errors import CdamError

# The inputs every method receives from its caller; they are never recorded as parameters.
INPUTS = ("backbone", "head", "images", "targets", "concepts", "similarity", "generator")
SEED = "seed"  # the parameter that seeds a method's random numbers (its generator, for functions that take one)


@dataclass(frozen=True)
class Method:
    """A registered explanation method: call it like its function, with its defaults filled in."""

    name: str
    label: str  # short display name (tables, figures, the web demo)
    fn: Callable[..., Tensor]
    description: str = ""
    signed: bool = True  # negative scores are counter-evidence; unsigned maps are >= 0
    class_specific: bool = True  # False: one map per image, broadcast to every target
    takes_concepts: bool = False  # accepts concepts=[M, D] and similarity=, returns targets then concepts
    samples: str | None = None  # the parameter that counts samples or path steps (None: one pass)
    # A full forward pass per token or per sample (TAM, IG, SmoothGrad): evaluations give it a subset of the images.
    expensive: bool = False
    variant: str | None = None  # the `CDAM.explain` variant, for the methods computed by the CDAM engine
    # Reads the method's maps from a shared engine forward (an `Explanation`): [B, K (+ M), gh, gw], or [B, 1, gh, gw]
    # for a class-agnostic method. explain.py then computes it with no forward of its own.
    from_explanation: Callable[[Any], Tensor] | None = None
    needs_attention: bool = False  # from_explanation reads `Explanation.attention`
    aliases: tuple[str, ...] = ()  # older spellings, accepted by `get` and reported as the canonical name
    tunable: tuple[str, ...] | None = None  # the keyword parameters users set (None: all the function has)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every parameter of the method with its default, as the function declares it (`seed` for methods that
        draw random numbers from a generator)."""
        out: dict[str, Any] = {}
        for name, p in inspect.signature(self.fn).parameters.items():
            if name in INPUTS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
                continue
            if self.tunable is not None and name not in self.tunable:
                continue
            out[name] = p.default
        if self.seeded:
            out.setdefault(SEED, 0)
        return out

    @property
    def seeded(self) -> bool:
        """Whether the method draws random numbers: from a generator seeded by the `seed` parameter, or from its
        own RNG seeded by it."""
        params = inspect.signature(self.fn).parameters
        return "generator" in params or SEED in params

    def params(self, **given: Any) -> dict[str, Any]:
        """The effective parameters: `given` values (None = the default) over the defaults. Unknown names are a
        one-line error listing the method's parameters."""
        defaults = self.defaults
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise CdamError(f"method {self.name!r} has no parameter {unknown[0]!r}; it takes: "
                            f"{', '.join(sorted(defaults)) or 'no parameters'}")
        return {**defaults, **{k: v for k, v in given.items() if v is not None}}

    def params_from(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Effective parameters from settings shared by several methods (explain.py's command line, the web demo):
        the values of the parameters this method has; the other options do not apply to it."""
        return self.params(**{k: v for k, v in options.items() if k in self.defaults})

    def kwargs(self, params: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
        """Effective parameters -> the function's keyword arguments: `seed` becomes a `torch.Generator` on `device`
        for functions that take one (the same seed always gives the same map, whatever ran before)."""
        out = dict(params)
        if "generator" in inspect.signature(self.fn).parameters:
            out["generator"] = torch.Generator(device=device).manual_seed(int(out.pop(SEED, 0)))
        return out

    def __call__(self, backbone: nn.Module, head: nn.Module | None, images: Tensor, targets: Any, *,
                 concepts: Tensor | None = None, similarity: str = "dot", **params: Any) -> Tensor:
        """-> [B, K, gh, gw] (or [B, K + M, gh, gw] with concepts) float32 maps on the images' device."""
        kwargs = self.kwargs(self.params(**params), images.device)
        if concepts is not None:
            if not self.takes_concepts:
                raise CdamError(f"method {self.name!r} does not explain concepts; use one of "
                                f"{', '.join(n for n, m in METHODS.items() if m.takes_concepts)}")
            kwargs.update(concepts=concepts, similarity=similarity)
        return self.fn(backbone, head, images, targets, **kwargs)


METHODS: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(name: str, *, label: str | None = None, description: str | None = None, replace: bool = False,
                    **facts: Any) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register `fn` as method `name` (lower-case letters, digits, '_'). `facts` are the other `Method`
    fields; the description defaults to the first line of the function's docstring."""

    def add(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ValueError(f"method name {name!r} must be lower-case letters, digits or '_'")
        if (name in METHODS or name in _ALIASES) and not replace:
            raise ValueError(f"method {name!r} is already registered")
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        method = Method(name, label or name, fn, description if description is not None else (doc[0] if doc else ""),
                        **facts)
        METHODS[name] = method
        for alias in method.aliases:
            _ALIASES[alias] = name
        return fn

    return add


def unregister_method(name: str) -> None:
    method = METHODS.pop(name, None)
    for alias in () if method is None else method.aliases:
        _ALIASES.pop(alias, None)


def names() -> list[str]:
    """Registered method names, in registration (display) order."""
    return list(METHODS)


def get(name: str) -> Method:
    """The method registered as `name` or under one of its aliases; a one-line error naming close matches."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key in METHODS:
        return METHODS[key]
    close = difflib.get_close_matches(key, [*METHODS, *_ALIASES], n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise CdamError(f"unknown method {name!r}; available: {', '.join(METHODS)}{hint}")


def parse_methods(spec: str | Sequence[str], note: Callable[[str], None] | None = None) -> list[Method]:
    """A comma-separated list (or a sequence) of method names -> the methods, in order, without repeats. An alias
    is accepted, and `note` is told its canonical name."""
    items = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if str(n).strip()]
    if not items:
        raise CdamError(f"no method given; choose from {', '.join(METHODS)}, e.g. cdam,attention")
    out: dict[str, Method] = {}
    for item in items:
        method = get(item)
        if note is not None and method.name != item.strip().lower().replace("-", "_"):
            note(f"method {item!r} is called {method.name!r}")
        out.setdefault(method.name, method)
    return list(out.values())
