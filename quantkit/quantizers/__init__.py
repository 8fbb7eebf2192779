"""Quantizers: one API (:class:`Quantizer`, :class:`QuantizerOutput`) over every method, and a registry."""
from ._registry import create_quantizer, example_kwargs, list_quantizers, register_quantizer
from .base import Quantizer, QuantizerOutput
from .fsq import FSQ
from .lfq import LFQ, EntropyLoss
from .multiscale import MultiScaleResidualQuantizer
from .residual import ResidualQuantizer
from .softvq import SoftVQ

__all__ = ["Quantizer", "QuantizerOutput", "create_quantizer", "example_kwargs", "list_quantizers",
           "register_quantizer", "FSQ", "LFQ", "EntropyLoss", "MultiScaleResidualQuantizer", "ResidualQuantizer",
           "SoftVQ"]
