"""Drop-in adapters for other libraries' quantizer APIs, each a thin layer over quantkit's own quantizers.

- :mod:`quantkit.compat.vector_quantize_pytorch`: lucidrains' vector-quantize-pytorch. Switch by changing one
  import: ``from quantkit.compat.vector_quantize_pytorch import VectorQuantize``.

Submodules load on first use (``quantkit.compat.vector_quantize_pytorch``), so importing quantkit costs nothing here;
none of them imports the library it mirrors.
"""
from __future__ import annotations

import importlib

__all__ = ["vector_quantize_pytorch"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
