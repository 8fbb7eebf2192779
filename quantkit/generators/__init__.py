"""Generators over token IDs: MaskGIT, VAR, RQ-Transformer and a PixelCNN prior, one registry.

    model = create_generator("maskgit", vocab_size=256, token_shape=(8, 8), num_classes=10)
    loss = model.loss(ids, labels)                         # ids (B, 8, 8) int64, labels (B,)
    ids = model.generate(labels, steps=8, sampling=SamplingConfig(guidance=2.0), generator=make_generator(0))
"""
from . import maskgit, pixelcnn, rq_transformer, var  # noqa: F401  (registers the models)
from ._base import GeneratorConfig, TokenGenerator
from ._registry import create_generator, example_config, generator_class, list_generators, register_generator
from .maskgit import MaskGIT
from .pixelcnn import PixelCNNPrior
from .rq_transformer import RQTransformer
from .sampling import SamplingConfig, make_generator
from .var import VAR

__all__ = ["GeneratorConfig", "MaskGIT", "PixelCNNPrior", "RQTransformer", "SamplingConfig", "TokenGenerator",
           "VAR", "create_generator", "example_config", "generator_class", "list_generators", "make_generator",
           "register_generator"]
