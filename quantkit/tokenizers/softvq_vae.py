"""SoftVQ-VAE: a 1D tokenizer (TiTok's ViT with L latent tokens) over a soft quantizer, whose tokens are aligned
with a pretrained encoder's patch features.

Paper: Chen et al. 2024, "SoftVQ-VAE: Efficient 1-Dimensional Continuous Tokenizer", arXiv:2412.10958 (reference
code Hhhhhhao/continuous_tokenizer; the alignment follows REPA, Yu et al. 2024, arXiv:2410.06940).

- Encoder / decoder: TiTok's (:mod:`.titok`): image patches plus L learnable latent tokens in, the L latents out.
- Quantizer: ``softvq`` by default (softmax over the codebook at temperature 0.07, cosine), any registered one
  works.
- Representation alignment (training only): each of the L soft tokens z is repeated N / L times, to the N patch
  positions of a frozen feature encoder y* (any module images -> (B, N, F), :mod:`quantkit.features`), projected
  by an MLP to F, and pulled towards the features:
      L_align = mean_n [1 - sim(y*_n, MLP(z_rep)_n)],   sim = cosine (the paper's) or -||.||^2 ("l2"),
  added to the reconstruction with weight ``align_weight`` (0 turns it off).

The one idea to hold: the feature encoder is a frozen teacher, not a part of the tokenizer: it runs under
``no_grad``, is never in ``parameters()`` or the checkpoint, and is loaded lazily (from ``feature_run``, a quantkit
features run folder, or the ``feature_encoder=`` instance) only when a training loss needs it; the MLP is the
tokenizer's own and trains with it. Encode / decode never touch either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..quantizers import Quantizer
from .base import TokenizerOutput, with_overrides
from .titok import TiTok, TiTokConfig

__all__ = ["SoftVQVAE", "SoftVQVAEConfig"]

SIMILARITIES = ("cosine", "l2")


@dataclass
class SoftVQVAEConfig(TiTokConfig):
    """TiTok's fields (``head`` must stay "pixels") plus the alignment: align_weight (0 = off; the paper's 0.1),
    align_similarity ("cosine" or "l2"), align_hidden (MLP width), feature_run (a quantkit features run folder:
    the frozen encoder; or pass ``feature_encoder=`` to the constructor). feature_dim / feature_patches: F and N
    of the encoder, recorded at construction so a checkpoint rebuilds the MLP without the encoder."""

    quantizer: str = "softvq"
    quantizer_kwargs: dict[str, Any] = field(default_factory=lambda: {"codebook_size": 256})
    num_latent_tokens: int = 8
    align_weight: float = 0.1
    align_similarity: str = "cosine"
    align_hidden: int = 128
    feature_run: str | None = None
    feature_dim: int | None = None
    feature_patches: int | None = None


class SoftVQVAE(TiTok):
    config_class = SoftVQVAEConfig

    def __init__(self, config: SoftVQVAEConfig | None = None, quantizer: Quantizer | None = None,
                 feature_encoder=None, **overrides):
        config = with_overrides(config or SoftVQVAEConfig(), overrides)
        name = type(self).__name__
        if config.head != "pixels":
            raise ValueError(f"{name}: head must be 'pixels' (SoftVQ-VAE decodes pixels), got {config.head!r}")
        if config.align_similarity not in SIMILARITIES:
            raise ValueError(f"{name}: align_similarity must be one of {SIMILARITIES}, got {config.align_similarity!r}")
        w = config.align_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < float("inf"):
            raise ValueError(f"{name}: align_weight must be a finite number >= 0 (0 = no alignment), got {w!r}")
        super().__init__(config, quantizer)
        self._features = None  # the frozen FeatureEncoder: deliberately not a submodule (never trained or saved)
        self.align_mlp: nn.Module | None = None
        if config.align_weight == 0:
            return
        if feature_encoder is not None:
            self.set_feature_encoder(feature_encoder)
        elif config.feature_dim is None or config.feature_patches is None:
            if not config.feature_run:
                raise ValueError(f"{name}: align_weight > 0 needs a frozen feature encoder: pass feature_encoder= (a "
                                 f"module mapping images (B, C, H, W) to (B, N, F)) or set feature_run to a "
                                 f"quantkit features run (quantkit train-features), or set align_weight=0")
            self.set_feature_encoder(config.feature_run)
        self._check_patches(config.feature_patches)
        h = config.align_hidden
        self.align_mlp = nn.Sequential(nn.Linear(config.token_size, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(),
                                       nn.Linear(h, config.feature_dim))  # REPA's projector shape

    def _check_patches(self, n: int) -> None:
        L = self.config.num_latent_tokens
        if n % L:
            raise ValueError(f"{type(self).__name__}: the feature encoder gives N={n} patches, not a multiple of "
                             f"num_latent_tokens={L} (each token is repeated N / L times); choose L dividing {n}")

    def set_feature_encoder(self, encoder) -> None:
        """Attach the frozen teacher: a FeatureEncoder, a quantkit MAE or its run folder, or any module mapping
        this tokenizer's [0, 1] images to (B, N, F). Its F and N must match the MLP once one is built."""
        from ..features import as_feature_encoder

        enc = as_feature_encoder(encoder, self.image_shape)
        if self.align_mlp is not None and (enc.num_patches, enc.feature_dim) != (self.config.feature_patches,
                                                                                 self.config.feature_dim):
            raise ValueError(f"{type(self).__name__}: this tokenizer's MLP aligns to features (B, N, F) = (B, "
                             f"{self.config.feature_patches}, {self.config.feature_dim}), the encoder gives (B, "
                             f"{enc.num_patches}, {enc.feature_dim})")
        self._check_patches(enc.num_patches)
        self.config.feature_dim, self.config.feature_patches = enc.feature_dim, enc.num_patches
        self._features = enc

    def feature_encoder(self):
        """The frozen teacher (loaded from ``feature_run`` on first use)."""
        if self._features is None:
            if not self.config.feature_run:
                raise ValueError(f"{type(self).__name__}: no feature encoder: call set_feature_encoder(...) or set "
                                 f"feature_run")
            self.set_feature_encoder(self.config.feature_run)
        return self._features

    def align_loss(self, images: Tensor, z_soft: Tensor) -> Tensor:
        """1 - mean similarity between the frozen features of ``images`` (pixel_range) and the MLP of the soft
        tokens z_soft (B, L, token_size) repeated to the N patches. Gradient to z_soft and the MLP only."""
        y = self.feature_encoder()(self.to_unit(images).clamp(0, 1))  # (B, N, F), no gradient
        rep = z_soft.repeat_interleave(y.shape[1] // z_soft.shape[1], dim=1)  # (B, N, token_size)
        pred = self.align_mlp(rep)  # (B, N, F)
        if self.config.align_similarity == "cosine":
            return 1 - F.cosine_similarity(pred, y.to(pred.dtype), dim=-1).mean()
        return (pred - y.to(pred.dtype)).square().sum(-1).mean()

    def training_loss(self, images: Tensor, recon_loss: str = "l1") -> tuple[dict[str, Tensor], TokenizerOutput]:
        if self.align_mlp is None:
            return super().training_loss(images, recon_loss)
        self._check_images(images)
        q = self.quantizer(self._quantizer_layout(self.encode_latents(images)))
        z_soft = self._latent_layout(q.quantized)  # (B, L, token_size): the soft tokens the decoder reads
        recon = self.decode_latents(z_soft)
        diff = recon - images
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        rec = diff.abs().mean() if recon_loss == "l1" else diff.square().mean()
        terms = {"recon": rec, "quantizer": q.loss,
                 "align": self.config.align_weight * self.align_loss(images, z_soft)}
        return terms, TokenizerOutput(recon, q.indices, q.loss, q.stats)

