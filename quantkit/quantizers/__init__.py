"""Quantizers: one API (:class:`Quantizer`, :class:`QuantizerOutput`) over every method, and a registry."""
from ._registry import create_quantizer, example_kwargs, list_quantizers, register_quantizer
from .base import Quantizer, QuantizerOutput

__all__ = ["Quantizer", "QuantizerOutput", "create_quantizer", "example_kwargs", "list_quantizers",
           "register_quantizer"]
