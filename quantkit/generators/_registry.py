"""Name -> generator class registry behind :func:`create_generator` and :func:`list_generators` (timm-style).

Each entry carries ``example``: a tiny configuration the tests build, so a generator is tested the day it is
registered.
"""
from __future__ import annotations

from typing import Any, Callable

from .._registry import Registry

_GENERATORS = Registry("generator")


def register_generator(name: str, example: dict[str, Any]) -> Callable[[type], type]:
    """Class decorator: registers a generator class under ``name`` with a tiny ``example`` config."""
    return _GENERATORS.register(name, example)


def list_generators() -> list[str]:
    """Registered generator names, sorted."""
    return _GENERATORS.names()


def generator_class(name: str) -> type:
    return _GENERATORS.get(name)


def example_config(name: str) -> dict[str, Any]:
    """The tiny example configuration registered with ``name`` (a copy)."""
    return _GENERATORS.example(name)


def create_generator(name: str, **kwargs: Any):
    """Builds generator ``name``; keywords fill its config dataclass (unknown keywords are an error)."""
    cls = generator_class(name)
    fields = cls.config_class.__dataclass_fields__
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise ValueError(f"{name}: unknown config keys {unknown}; known: {sorted(fields)}")
    return cls(cls.config_class(**kwargs))
