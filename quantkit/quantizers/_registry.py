"""The quantizer registry behind :func:`create_quantizer` and :func:`list_quantizers`.

Every entry carries ``example``: small constructor keywords the test-suite and :func:`quantkit.testing.check_quantizer`
use to build it, so a quantizer is tested the day it is registered.
"""
from __future__ import annotations

from typing import Any, Callable

from .._registry import Registry

_QUANTIZERS = Registry("quantizer")


def register_quantizer(name: str, example: dict[str, Any]) -> Callable[[type], type]:
    """Class decorator: registers ``cls`` under ``name`` with ``example`` keywords (they must include ``dim``)."""
    if "dim" not in example:
        raise ValueError(f"register_quantizer({name!r}): example keywords must include 'dim'")
    return _QUANTIZERS.register(name, example)


def list_quantizers() -> list[str]:
    """Registered quantizer names, sorted."""
    return _QUANTIZERS.names()


def quantizer_class(name: str) -> type:
    return _QUANTIZERS.get(name)


def example_kwargs(name: str) -> dict[str, Any]:
    """The small example configuration registered with ``name`` (a copy)."""
    return _QUANTIZERS.example(name)


def create_quantizer(name: str, **kwargs: Any):
    """Builds the quantizer registered as ``name``; keywords go to its constructor."""
    return quantizer_class(name)(**kwargs)
