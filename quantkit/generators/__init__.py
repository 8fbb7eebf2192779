"""Generators over token IDs (MaskGIT, VAR, RQ-Transformer, a PixelCNN prior) and over continuous latents (MAR with a
per-token head, a whole-latent DiT; noise processes from :mod:`quantkit.diffusion`), one registry.

    model = create_generator("maskgit", vocab_size=256, token_shape=(8, 8), num_classes=10)
    loss = model.loss(ids, labels)                         # ids (B, 8, 8) int64, labels (B,)
    ids = model.generate(labels, steps=8, sampling=SamplingConfig(guidance=2.0), generator=make_generator(0))
"""
from . import dit, mar, maskgit, pixelcnn, rq_transformer, var  # noqa: F401  (registers the models)
from ._base import ConditionalGenerator, GeneratorConfig, TokenGenerator
from .continuous import ContinuousGenerator, ContinuousGeneratorConfig
from .dit import DiT
from .mar import MAR
from ._registry import create_generator, example_config, generator_class, list_generators, register_generator
from .maskgit import MaskGIT
from .pixelcnn import PixelCNNPrior
from .rq_transformer import RQTransformer
from .sampling import SamplingConfig, make_generator
from .var import VAR

__all__ = ["ConditionalGenerator", "ContinuousGenerator", "ContinuousGeneratorConfig", "DiT", "GeneratorConfig", "MAR",
           "MaskGIT", "PixelCNNPrior", "RQTransformer", "SamplingConfig", "TokenGenerator",
           "VAR", "create_generator", "example_config", "generator_class", "list_generators", "make_generator",
           "register_generator"]
