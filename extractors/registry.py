"""One registry for all extractors, timm-style: ``@register_extractor`` on a small factory function."""
from __future__ import annotations

from typing import Any, Callable

_EXTRACTORS: dict[str, Callable[..., Any]] = {}


def register_extractor(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Register ``fn`` under its own name (e.g. ``siglip_mi_features``)."""
    if fn.__name__ in _EXTRACTORS:
        raise ValueError(f"extractor {fn.__name__!r} is registered twice")
    _EXTRACTORS[fn.__name__] = fn
    return fn


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def build_extractor(name: str, **kwargs: Any):
    """Build a registered extractor by name; keyword arguments go to its constructor."""
    if name not in _EXTRACTORS:
        raise ValueError(f"unknown extractor {name!r}; available: {', '.join(list_extractors())}")
    return _EXTRACTORS[name](**kwargs)
