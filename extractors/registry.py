"""One registry for all extractors, timm-style: ``@register_extractor`` on a small factory function.

An entry carries its capabilities (``uses_masks``, ...) so code that only needs to know what an
extractor can do (config checks, the data layer) never builds a model or parses the name.
"""
from __future__ import annotations

from typing import Any, Callable

from utils.errors import SoIRError

_EXTRACTORS: dict[str, Callable[..., Any]] = {}
_CAPABILITIES: dict[str, dict[str, Any]] = {}


def register_extractor(fn: Callable[..., Any] | None = None, **capabilities: Any):
    """Register ``fn`` under its own name (e.g. ``siglip_mi_features``); use bare or with
    capabilities, ``@register_extractor(uses_masks=True)``."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        if fn.__name__ in _EXTRACTORS:
            raise ValueError(f"extractor {fn.__name__!r} is registered twice")
        _EXTRACTORS[fn.__name__] = fn
        _CAPABILITIES[fn.__name__] = {"uses_masks": False, **capabilities}
        return fn
    return register(fn) if fn is not None else register


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def _check(name: str) -> None:
    if name not in _EXTRACTORS:
        raise SoIRError(f"unknown extractor {name!r}; available: {', '.join(list_extractors())}")


def capabilities(name: str) -> dict[str, Any]:
    """What a registered extractor can do, without building it (e.g. ``{"uses_masks": True}``)."""
    _check(name)
    return dict(_CAPABILITIES[name])


def build_extractor(name: str, **kwargs: Any):
    """Build a registered extractor by name; keyword arguments go to its constructor."""
    _check(name)
    return _EXTRACTORS[name](**kwargs)
