"""Name -> generator class registry behind :func:`create_generator` and :func:`list_generators` (timm-style).

Each entry carries ``example``: a tiny configuration the tests build, so a generator is tested the day it is
registered.
"""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, tuple[type, dict[str, Any]]] = {}


def register_generator(name: str, example: dict[str, Any]) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name][0] is not cls:
            raise ValueError(f"register_generator: {name!r} is already registered to {_REGISTRY[name][0].__name__}")
        _REGISTRY[name] = (cls, dict(example))
        cls.registry_name = name
        return cls

    return decorate


def list_generators() -> list[str]:
    """Registered generator names, sorted."""
    return sorted(_REGISTRY)


def generator_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown generator {name!r}; registered: {list_generators()}")
    return _REGISTRY[name][0]


def example_config(name: str) -> dict[str, Any]:
    """The tiny example configuration registered with ``name`` (a copy)."""
    generator_class(name)
    return dict(_REGISTRY[name][1])


def create_generator(name: str, **kwargs: Any):
    """Builds generator ``name``; keywords fill its config dataclass (unknown keywords are an error)."""
    cls = generator_class(name)
    fields = cls.config_class.__dataclass_fields__
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown config keys {unknown}; known: {sorted(fields)}")
    return cls(cls.config_class(**kwargs))
