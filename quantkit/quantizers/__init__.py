"""Quantizers: one API (:class:`Quantizer`, :class:`QuantizerOutput`) over every method, and a registry."""
from ._registry import create_quantizer, example_kwargs, list_quantizers, register_quantizer
from .base import Quantizer, QuantizerOutput
from .binary_mapper import BinaryMapper
from .codebook import CodebookStep, DeadCodeConfig, EMAConfig, KMeansInit
from .fsq import FSQ
from .hierarchical import HierarchicalVQ
from .latent_quantize import LatentQuantizer
from .fsp import FSP, MomentLoss
from .grouped import GroupedQuantizer
from .lfq import LFQ, EntropyLoss
from .multiscale import MultiScaleResidualQuantizer
from .random_projection import RandomProjectionQuantizer
from .residual import BeamSearch, ImplicitCodebook, ResidualQuantizer
from .simvq import SimVQ
from .softvq import SoftVQ
from .vq import Sampling, VectorQuantizer
from .vqgan_lc import VQGANLCQuantizer

__all__ = ["Quantizer", "QuantizerOutput", "create_quantizer", "example_kwargs", "list_quantizers",
           "register_quantizer", "FSQ", "LFQ", "EntropyLoss", "MultiScaleResidualQuantizer", "ResidualQuantizer",
           "FSP", "MomentLoss", "GroupedQuantizer", "BinaryMapper",
           "SoftVQ", "VectorQuantizer", "VQGANLCQuantizer", "EMAConfig", "DeadCodeConfig", "KMeansInit", "Sampling",
           "CodebookStep", "BeamSearch", "ImplicitCodebook",
           "SimVQ", "LatentQuantizer", "RandomProjectionQuantizer", "HierarchicalVQ"]
