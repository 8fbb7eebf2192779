"""VQGAN tokenizer: ResNet + attention conv autoencoder around any quantizer; trained with a PatchGAN.

Paper: Esser, Rombach, Ommer, "Taming Transformers for High-Resolution Image Synthesis", https://arxiv.org/abs/2012.09841

The one idea to hold: the autoencoder here is only the generator. Its adversarial training (PatchGAN discriminator,
hinge loss, adaptive weight, discriminator start step, optional perceptual loss) lives in
:mod:`quantkit.tokenizers.losses` and the training loop, so a trained tokenizer checkpoint carries no discriminator.

Shapes (defaults, digits): images (B, 1, 16, 16) -> encoder (B, z_channels=32, 4, 4) -> quant_conv (B, embed_dim, 4, 4)
-> quantizer over (B, 4, 4, embed_dim) -> post_quant_conv -> decoder (B, 1, 16, 16). Token grid (4, 4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from einops import rearrange
from torch import Tensor, nn

from ..quantizers import Quantizer
from ._conv import Decoder, Encoder, check_divisible
from .base import Tokenizer, TokenizerConfig, build_quantizer, with_overrides


@dataclass
class VQGANConfig(TokenizerConfig):
    """ch_mult: channel multiplier per resolution level (len(ch_mult) - 1 halvings); attn_levels: levels (0 = full
    resolution) whose ResNet blocks are followed by attention; quant_conv_kernel: 1 (taming, LlamaGen) or 3 (VAR)."""

    ch: int = 16
    ch_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = (2,)
    mid_attention: bool = True
    z_channels: int = 32
    embed_dim: int = 16
    norm_groups: int = 8
    quant_conv_kernel: int = 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        d = dict(d)
        for key in ("ch_mult", "attn_levels"):
            if key in d:
                d[key] = tuple(d[key])
        return super().from_dict(d)


class VQGAN(Tokenizer):
    """Conv encoder -> quant_conv -> quantizer -> post_quant_conv -> conv decoder."""

    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig | None = None, quantizer: Quantizer | None = None, **overrides):
        config = with_overrides(config or VQGANConfig(), overrides)
        name = type(self).__name__
        factor = 2 ** (len(config.ch_mult) - 1)
        side = check_divisible(config.image_size, factor, name)
        super().__init__(config, build_quantizer(quantizer or config.quantizer, config.quantizer_kwargs,
                                                 config.embed_dim, name))
        self.latent_grid = (side, side)
        self._check_quantizer_grid()
        arch = dict(ch=config.ch, ch_mult=tuple(config.ch_mult), num_res_blocks=config.num_res_blocks,
                    attn_levels=tuple(config.attn_levels), z_channels=config.z_channels, groups=config.norm_groups,
                    mid_attention=config.mid_attention)
        self.encoder = Encoder(config.channels, **arch)
        self.decoder = Decoder(config.channels, **arch)
        k = config.quant_conv_kernel
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, k, padding=k // 2)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, k, padding=k // 2)

    def encode_latents(self, images: Tensor) -> Tensor:
        z = self.quant_conv(self.encoder(images))  # (B, embed_dim, h, w)
        return rearrange(z, "b c h w -> b h w c")

    def decode_latents(self, z: Tensor) -> Tensor:
        z = rearrange(z, "b h w c -> b c h w")
        return self.decoder(self.post_quant_conv(z))  # (B, C, H, W)

    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight


__all__ = ["VQGAN", "VQGANConfig"]
