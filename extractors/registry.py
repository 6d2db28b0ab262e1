"""One registry for all extractors: a name -> an extractor class, with what it can do.

An entry carries its capabilities (``uses_masks``, its constructor's keyword arguments), so code
that only needs to know what an extractor can do (config checks, the data layer) never builds a
model or parses the name.
"""

from __future__ import annotations

import inspect
from typing import Any

from extractors.text import has_text_tower
from utils.errors import SoIRError
from utils.families import FAMILIES

_EXTRACTORS: dict[str, type] = {}


def register_extractor(name: str, cls: type) -> type:
    """Register extractor class ``cls`` under ``name`` (e.g. ``siglip_mi_features``)."""
    if name in _EXTRACTORS:
        raise ValueError(f"extractor {name!r} is registered twice")
    _EXTRACTORS[name] = cls
    return cls


def list_extractors() -> list[str]:
    return sorted(_EXTRACTORS)


def extractor_class(name: str) -> type:
    if name not in _EXTRACTORS:
        raise SoIRError(f"unknown extractor {name!r}; available: {', '.join(list_extractors())}")
    return _EXTRACTORS[name]


def constructor_keys(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` accepts, through its base classes' ``__init__``s."""
    keys = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for param in inspect.signature(init).parameters.values():
            if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD) and param.name != "self":
                keys.add(param.name)
    return keys


def capabilities(name: str) -> dict[str, Any]:
    """What a registered extractor can do, without building it: ``uses_masks``, ``family``,
    ``supports_lora`` (its family's spec, utils/families.py), ``keys`` (the config keys its constructor
    takes), ``has_text_tower`` (its checkpoints hold a text tower for text queries: extractors/text.py
    ``TEXT_TOWERS``)."""
    cls = extractor_class(name)
    return {
        "uses_masks": cls.uses_masks,
        "family": cls.family,
        "supports_lora": FAMILIES[cls.family].supports_lora,
        "keys": constructor_keys(cls),
        "has_text_tower": has_text_tower(cls.family),
    }


def build_extractor(name: str, **kwargs: Any):
    """Build a registered extractor by name; keyword arguments go to its constructor."""
    return extractor_class(name)(**kwargs)
