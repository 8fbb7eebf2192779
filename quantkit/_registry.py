"""``Registry``: name -> class, each with a small example configuration (timm-style).

Quantizers and generators register themselves with a decorator; the tests iterate over the names and build every
entry from its example, so a new entry is tested the day it is registered.
"""
from __future__ import annotations

from typing import Any, Callable


class Registry:
    """Classes of one kind (``kind`` names it in error messages), registered under unique names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, tuple[type, dict[str, Any]]] = {}

    def register(self, name: str, example: dict[str, Any]) -> Callable[[type], type]:
        """Class decorator: registers ``cls`` as ``name`` with ``example`` keywords and sets ``cls.registry_name``."""

        def decorate(cls: type) -> type:
            if name in self._entries and self._entries[name][0] is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered to {self._entries[name][0].__name__}")
            self._entries[name] = (cls, dict(example))
            cls.registry_name = name
            return cls

        return decorate

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def get(self, name: str) -> type:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {self.names()}")
        return self._entries[name][0]

    def example(self, name: str) -> dict[str, Any]:
        """The example keywords registered with ``name`` (a copy)."""
        self.get(name)
        return dict(self._entries[name][1])
