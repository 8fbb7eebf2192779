"""Name -> Quantizer class registry behind :func:`create_quantizer` and :func:`list_quantizers` (timm-style).

Every entry carries ``example``: small constructor keywords the test-suite and :func:`quantkit.testing.check_quantizer`
use to build it, so a quantizer is tested the day it is registered.
"""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, tuple[type, dict[str, Any]]] = {}


def register_quantizer(name: str, example: dict[str, Any]) -> Callable[[type], type]:
    """Class decorator: registers ``cls`` under ``name`` with ``example`` keywords (they must include ``dim``)."""
    if "dim" not in example:
        raise ValueError(f"register_quantizer({name!r}): example keywords must include 'dim'")

    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"register_quantizer: {name!r} is already registered to {_REGISTRY[name][0].__name__}")
        _REGISTRY[name] = (cls, dict(example))
        cls.registry_name = name
        return cls

    return decorate


def list_quantizers() -> list[str]:
    """Registered quantizer names, sorted."""
    return sorted(_REGISTRY)


def quantizer_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown quantizer {name!r}; registered: {list_quantizers()}")
    return _REGISTRY[name][0]


def example_kwargs(name: str) -> dict[str, Any]:
    """The small example configuration registered with ``name`` (a copy)."""
    quantizer_class(name)
    return dict(_REGISTRY[name][1])


def create_quantizer(name: str, **kwargs: Any):
    """Builds the quantizer registered as ``name``; keywords go to its constructor."""
    return quantizer_class(name)(**kwargs)
