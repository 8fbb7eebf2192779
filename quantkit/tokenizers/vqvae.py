"""VQ-VAE tokenizer: the original plain convolutional autoencoder around any quantizer.

Paper: van den Oord, Vinyals, Kavukcuoglu, "Neural Discrete Representation Learning", https://arxiv.org/abs/1711.00937

The one idea to hold: stride-2 4x4 convolutions halve the image ``num_downsamples`` times, a stack of ReLU residual
blocks (no normalisation, no attention) follows, and the decoder mirrors it with transposed convolutions; it is
trained on the reconstruction loss plus the quantizer's own loss only.

Shapes (defaults, digits): (B, 1, 16, 16) -> (B, 64, 4, 4) -> pre_quant (B, embed_dim, 4, 4) -> quantizer over
(B, 4, 4, embed_dim) -> post_quant -> (B, 1, 16, 16). Token grid (4, 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..quantizers import Quantizer
from ._conv import check_divisible
from .base import Tokenizer, TokenizerConfig, build_quantizer, with_overrides


@dataclass
class VQVAEConfig(TokenizerConfig):
    hidden: int = 64
    num_downsamples: int = 2
    num_res_blocks: int = 2
    res_hidden: int = 32
    embed_dim: int = 16


class _Residual(nn.Module):
    """x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class VQVAE(Tokenizer):
    config_class = VQVAEConfig

    def __init__(self, config: VQVAEConfig | None = None, quantizer: Quantizer | None = None, **overrides):
        config = with_overrides(config or VQVAEConfig(), overrides)
        name = type(self).__name__
        if config.num_downsamples < 1:
            raise ValueError(f"{name}: num_downsamples must be >= 1, got {config.num_downsamples}")
        side = check_divisible(config.image_size, 2 ** config.num_downsamples, name)
        super().__init__(config, build_quantizer(quantizer or config.quantizer, config.quantizer_kwargs,
                                                 config.embed_dim, name))
        self.latent_grid = (side, side)
        self._check_quantizer_grid()
        c, h = config.channels, config.hidden
        down = [nn.Conv2d(c, h, 4, stride=2, padding=1)]
        for _ in range(config.num_downsamples - 1):
            down += [nn.ReLU(), nn.Conv2d(h, h, 4, stride=2, padding=1)]
        down += [nn.ReLU(), nn.Conv2d(h, h, 3, padding=1)]
        down += [_Residual(h, config.res_hidden) for _ in range(config.num_res_blocks)]
        self.encoder = nn.Sequential(*down, nn.ReLU())
        self.pre_quant = nn.Conv2d(h, config.embed_dim, 1)
        self.post_quant = nn.Conv2d(config.embed_dim, h, 3, padding=1)
        up: list[nn.Module] = [_Residual(h, config.res_hidden) for _ in range(config.num_res_blocks)]
        for _ in range(config.num_downsamples - 1):
            up += [nn.ReLU(), nn.ConvTranspose2d(h, h, 4, stride=2, padding=1)]
        up += [nn.ReLU(), nn.ConvTranspose2d(h, c, 4, stride=2, padding=1)]
        self.decoder = nn.Sequential(*up)

    def encode_latents(self, images: Tensor) -> Tensor:
        return rearrange(self.pre_quant(self.encoder(images)), "b c h w -> b h w c")

    def decode_latents(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant(rearrange(z, "b h w c -> b c h w")))

    def last_layer(self) -> Tensor:
        return self.decoder[-1].weight


__all__ = ["VQVAE", "VQVAEConfig"]
