"""quantkit: discrete image tokenizers for PyTorch.

Layers, bottom up: fused ops (:mod:`quantkit.ops`), quantizers (:mod:`quantkit.quantizers`), tokenizers and
generators built on them.
"""
from . import ops
from .ops import nearest_codeword, soft_assign

__version__ = "0.1.0"
__all__ = ["ops", "nearest_codeword", "soft_assign", "__version__"]
