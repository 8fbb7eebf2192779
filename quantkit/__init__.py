"""quantkit: discrete image tokenizers for PyTorch.

Layers, bottom up: fused ops (:mod:`quantkit.ops`), quantizers (:mod:`quantkit.quantizers`), tokenizers and
generators built on them.
"""
from . import ops
from .ops import nearest_codeword, soft_assign
from .quantizers import (FSQ, LFQ, MultiScaleResidualQuantizer, Quantizer, QuantizerOutput, ResidualQuantizer,
                         SoftVQ, VectorQuantizer, VQGANLCQuantizer, create_quantizer, list_quantizers)

__version__ = "0.1.0"
__all__ = ["ops", "nearest_codeword", "soft_assign", "__version__", "Quantizer", "QuantizerOutput",
           "create_quantizer", "list_quantizers", "FSQ", "LFQ", "MultiScaleResidualQuantizer", "ResidualQuantizer",
           "SoftVQ", "VectorQuantizer", "VQGANLCQuantizer"]
