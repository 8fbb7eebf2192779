"""Tokenizers: images <-> token IDs over any registered quantizer (the contract is in :mod:`.base`).

    tok = create_tokenizer("vqgan", quantizer="fsq", quantizer_kwargs={"levels": [8, 5, 5, 5]}, embed_dim=4)
    ids = tok.encode(tok.from_unit(images01))   # (B, *tok.token_shape) int64
    images = tok.to_unit(tok.decode(ids))

Registered: ``vqvae``, ``vqgan``, ``titok``, ``softvq_vae`` (discrete), ``klvae`` (continuous: ``encode`` gives latents, see
:class:`.base.ContinuousTokenizer`). Training: ``train_tokenizer(TrainConfig(...)) -> TrainResult``
(checkpoint folder + final metrics); loading a trained checkpoint: ``load_tokenizer(path)``; metrics:
``evaluate_tokenizer``; published checkpoints: :mod:`.checkpoints`.
"""
from __future__ import annotations

from typing import Any

from .base import ContinuousTokenizer, LatentOutput, Tokenizer, TokenizerConfig, TokenizerOutput, with_overrides
from .klvae import KLVAE, KLVAEConfig
from .softvq_vae import SoftVQVAE, SoftVQVAEConfig
from .titok import TiTok, TiTokConfig
from .vqgan import VQGAN, VQGANConfig
from .vqvae import VQVAE, VQVAEConfig

_TOKENIZERS: dict[str, type[Tokenizer] | type[ContinuousTokenizer]] = {"vqvae": VQVAE, "vqgan": VQGAN, "titok": TiTok,
                                                                        "klvae": KLVAE, "softvq_vae": SoftVQVAE}
for _name, _cls in _TOKENIZERS.items():
    _cls.registry_name = _name


def list_tokenizers() -> list[str]:
    return sorted(_TOKENIZERS)


def tokenizer_class(name: str) -> type[Tokenizer]:
    if name not in _TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; registered: {list_tokenizers()}")
    return _TOKENIZERS[name]


def create_tokenizer(name: str, config: dict[str, Any] | TokenizerConfig | None = None, **kwargs: Any) -> Tokenizer:
    """Builds tokenizer ``name`` from a config (dataclass or dict) plus keyword overrides; ``quantizer=`` may be a
    registered quantizer name or a Quantizer instance."""
    cls = tokenizer_class(name)
    quantizer = kwargs.pop("quantizer", None)
    extra = {k: kwargs.pop(k) for k in ("proxy_tokenizer", "feature_encoder") if k in kwargs}
    if isinstance(quantizer, str):
        kwargs["quantizer"] = quantizer
        quantizer = None
    if config is None:
        config = cls.config_class()
    elif isinstance(config, dict):
        config = cls.config_class.from_dict(config)
    elif not isinstance(config, cls.config_class):
        raise TypeError(f"create_tokenizer({name!r}): config must be a {cls.config_class.__name__} or a dict")
    return cls(with_overrides(config, kwargs), quantizer, **extra)


# after the registry: train.py builds tokenizers through create_tokenizer
from .evaluate import evaluate_tokenizer  # noqa: E402
from .train import TrainConfig, TrainResult, load_tokenizer, train_tokenizer  # noqa: E402


__all__ = ["ContinuousTokenizer", "KLVAE", "KLVAEConfig", "LatentOutput", "SoftVQVAE", "SoftVQVAEConfig", "TiTok", "TiTokConfig", "Tokenizer", "TokenizerConfig", "TokenizerOutput", "TrainConfig", "TrainResult",
           "VQGAN", "VQGANConfig", "VQVAE", "VQVAEConfig", "create_tokenizer", "evaluate_tokenizer", "list_tokenizers",
           "load_tokenizer", "tokenizer_class", "train_tokenizer"]
