"""quantkit: discrete image tokenizers for PyTorch.

Layers, bottom up: fused ops (:mod:`quantkit.ops`), quantizers (:mod:`quantkit.quantizers`), tokenizers and
generators built on them. ``import quantkit`` loads the ops and quantizers; every other submodule
(``quantkit.metrics``, ``quantkit.testing``, ``quantkit.tokenizers``, ``quantkit.generators``, ...) is imported on
first attribute access (PEP 562), so the import stays fast and ``quantkit.metrics.CodebookUsage`` works after it.
"""
import importlib as _importlib
import importlib.util as _importlib_util

from . import ops
from .ops import nearest_codeword, soft_assign
from .quantizers import (FSQ, LFQ, MultiScaleResidualQuantizer, Quantizer, QuantizerOutput, ResidualQuantizer,
                         SoftVQ, VectorQuantizer, VQGANLCQuantizer, create_quantizer, list_quantizers)

__version__ = "0.1.0"
__all__ = ["ops", "nearest_codeword", "soft_assign", "__version__", "Quantizer", "QuantizerOutput",
           "create_quantizer", "list_quantizers", "FSQ", "LFQ", "MultiScaleResidualQuantizer", "ResidualQuantizer",
           "SoftVQ", "VectorQuantizer", "VQGANLCQuantizer"]

#: Submodules loaded on first access (any other public submodule of the package is found the same way).
LAZY_SUBMODULES = ("metrics", "testing", "tokenizers", "generators", "evaluation", "training", "data", "compat",
                   "quantizers", "info", "cli", "demo")


def __getattr__(name: str):
    if not name.startswith("_") and (name in LAZY_SUBMODULES
                                     or _importlib_util.find_spec(f"{__name__}.{name}") is not None):
        module = _importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(LAZY_SUBMODULES))
