"""KL-VAE: the continuous tokenizer of latent diffusion - VQGAN's conv encoder / decoder with a diagonal Gaussian
posterior and a KL penalty towards N(0, I) in place of the quantizer.

Paper: Rombach, Blattmann, Lorenz, Esser, Ommer 2022, "High-Resolution Image Synthesis with Latent Diffusion Models",
https://arxiv.org/abs/2112.10752 (section 3, appendix G); the VAE of Kingma & Welling 2014,
https://arxiv.org/abs/1312.6114. Used as MAR's tokenizer (Li et al. 2024, https://arxiv.org/abs/2406.11838).

The one idea to hold: the encoder outputs a mean and a log-variance per latent element (log-variance clamped to
[-30, 20]); training decodes z = mu + sigma * n, n ~ N(0, I), and adds
kl_weight * sum_(c, h, w) 1/2 (mu^2 + sigma^2 - 1 - log sigma^2) / (C * H * W) per image: LDM's weighting (KL summed
over latent elements against a reconstruction summed over pixels) expressed against quantkit's per-pixel-mean
reconstruction, so kl_weight means what it means in LDM's configs. ``encode`` returns the posterior mean (mode)
times the latent scale factor measured on the training set.

Posterior collapse is watched: every training forward reports the KL per latent element (nats) and the active
units (latent channels whose posterior mean varies across the batch, variance > 0.01, Burda et al. 2016), and a
warning names both when the KL per element falls under ``collapse_kl`` or no channel is active.

Shapes (defaults, digits): images (B, 1, 16, 16) -> encoder (B, z_channels, 8, 8) -> quant_conv (B, 2 * embed_dim,
8, 8) -> mean, logvar (B, 8, 8, embed_dim) -> post_quant_conv -> decoder (B, 1, 16, 16). Latent shape (8, 8, 4).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ._conv import Decoder, Encoder, check_divisible
from .base import AutoencoderConfig, ContinuousTokenizer, with_overrides

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class KLVAEConfig(AutoencoderConfig):
    """Architecture as :class:`~quantkit.tokenizers.vqgan.VQGANConfig` (embed_dim = latent channels); kl_weight in
    LDM's units (1e-6 in its f8/f16 configs); collapse_kl / collapse_after: warn when the KL per latent element is
    under collapse_kl nats, or no channel is active, after this many training steps."""

    ch: int = 16
    ch_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    attn_levels: tuple[int, ...] = ()
    mid_attention: bool = True
    z_channels: int = 32
    embed_dim: int = 4
    norm_groups: int = 8
    kl_weight: float = 1e-6
    collapse_kl: float = 0.01
    collapse_after: int = 100

    def __post_init__(self) -> None:
        self.ch_mult, self.attn_levels = tuple(self.ch_mult), tuple(self.attn_levels)
        if not self.kl_weight >= 0:
            raise ValueError(f"KLVAEConfig.kl_weight must be >= 0, got {self.kl_weight!r}")
        if self.embed_dim < 1:
            raise ValueError(f"KLVAEConfig.embed_dim must be >= 1, got {self.embed_dim!r}")


def kl_to_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element: 1/2 (mean^2 + exp(logvar) - 1 - logvar)."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def active_units(mean: Tensor, threshold: float = 0.01) -> Tensor:
    """Number of latent channels whose posterior mean varies across the batch: mean over positions of
    Var_batch(mu) > threshold (Burda, Grosse, Salakhutdinov 2016). mean (B, *grid, c) -> int64 scalar."""
    if mean.shape[0] < 2:
        return torch.zeros((), dtype=torch.int64)
    per_channel = mean.var(dim=0).reshape(-1, mean.shape[-1]).mean(0)  # (c,)
    return (per_channel > threshold).sum()


class KLVAE(ContinuousTokenizer):
    """Conv encoder -> (mean, logvar) -> sample -> post_quant_conv -> conv decoder."""

    config_class = KLVAEConfig

    def __init__(self, config: KLVAEConfig | None = None, quantizer: Any = None, **overrides):
        name = type(self).__name__
        if quantizer is not None:
            raise ValueError(f"{name} is a continuous tokenizer and takes no quantizer, got {quantizer!r}")
        config = with_overrides(config or KLVAEConfig(), overrides)
        side = check_divisible(config.image_size, 2 ** (len(config.ch_mult) - 1), name)
        super().__init__(config)
        self.latent_grid = (side, side)
        self.latent_dim = config.embed_dim
        arch = dict(ch=config.ch, ch_mult=tuple(config.ch_mult), num_res_blocks=config.num_res_blocks,
                    attn_levels=tuple(config.attn_levels), z_channels=config.z_channels, groups=config.norm_groups,
                    mid_attention=config.mid_attention)
        self.encoder = Encoder(config.channels, **arch)
        self.decoder = Decoder(config.channels, **arch)
        self.quant_conv = nn.Conv2d(config.z_channels, 2 * config.embed_dim, 1)  # mean and log-variance
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self._training_steps = 0
        self._warned = False

    def posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images -> (mean, logvar), each (B, h, w, embed_dim); logvar clamped to [-30, 20]."""
        moments = rearrange(self.quant_conv(self.encoder(images)), "b c h w -> b h w c")
        mean, logvar = moments.chunk(2, dim=-1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_latents(self, images: Tensor) -> Tensor:
        return self.posterior(images)[0]  # the mode

    def decode_latents(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(rearrange(z, "b h w c -> b c h w")))

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z = mean + sigma * n (the mean in eval mode), the weighted KL, and the collapse statistics."""
        mean, logvar = self.posterior(images)
        z = mean + (0.5 * logvar).exp() * torch.randn_like(mean) if self.training else mean
        kl = kl_to_standard_normal(mean.float(), logvar.float())  # (B, h, w, c)
        pixels = images[0].numel()
        loss = self.config.kl_weight * kl.flatten(1).sum(1).mean() / pixels
        with torch.no_grad():
            stats = {"kl_per_dim": kl.mean().detach(), "active_units": active_units(mean.detach()).float(),
                     "posterior_std": (0.5 * logvar).exp().mean().detach()}
        if self.training:
            self._training_steps += 1
            self._warn_on_collapse(stats)
        return z, loss, stats

    def _warn_on_collapse(self, stats: dict[str, Tensor]) -> None:
        if self._warned or self._training_steps < self.config.collapse_after:
            return
        kl, active = float(stats["kl_per_dim"]), int(stats["active_units"])
        if kl < self.config.collapse_kl or active == 0:
            self._warned = True
            warnings.warn(f"KLVAE: the posterior is collapsing towards the prior after {self._training_steps} "
                          f"training steps: KL per latent element {kl:.4g} nats (warning below {self.config.collapse_kl}), "
                          f"{active} of {self.latent_dim} latent channels active (warning at 0); lower kl_weight "
                          f"(now {self.config.kl_weight:g})", RuntimeWarning, stacklevel=3)

    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight


__all__ = ["KLVAE", "KLVAEConfig", "active_units", "kl_to_standard_normal"]
