"""TiTok: a ViT that reads image patches plus K learnable latent tokens and keeps only the K latents, quantized
into a 1D token sequence; a ViT decoder reads those tokens plus one mask token per patch back into an image.

Paper: Yu et al., "An Image is Worth 32 Tokens for Reconstruction and Generation", https://arxiv.org/abs/2406.07550

The one idea to hold: the token sequence has no spatial layout; K (``num_latent_tokens``) is chosen freely and
the decoder's mask tokens (one per patch) carry the positions.

Two decoder heads:
    head="pixels"       conv1x1 to patch pixels + depth-to-space + conv3x3 (single-stage training on pixels).
    head="proxy_codes"  conv1x1 -> tanh -> conv1x1 to logits over a trained quantkit VQGAN's codebook at every
                        patch (the "proxy codes"; TiTok's patch grid must equal the VQGAN token grid). Stage 1
                        trains on cross-entropy against the VQGAN's codes of the image; decoding takes the softmax-
                        weighted VQGAN code vectors through the VQGAN's decoder. Stage 2 (``stage=2``) freezes the
                        encoder, latent tokens and quantizer and trains both decoders on pixels.

Shapes (defaults, digits): (B, 1, 16, 16) -> 16 patches of 4x4 -> sequence [cls, 16 patches, 16 latents] x width
-> last 16 -> ln_post -> conv_out -> (B, 16, token_size) -> quantizer -> ids (B, 16).
Module names follow bytedance/1d-tokenizer, so its checkpoints load by renaming nothing (see checkpoints.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from torch import Tensor, nn

from ..quantizers import Quantizer
from ._conv import check_divisible
from .base import Tokenizer, TokenizerConfig, TokenizerOutput, build_quantizer, with_overrides


@dataclass
class TiTokConfig(TokenizerConfig):
    """width/depth/heads: ViT size (shared by encoder and decoder unless decoder_depth is set); token_size: the
    quantizer's dim; legacy_reshape: reproduce the published L-32/B-64/S-128 encoders' reshape without permute
    (needed to load those weights, otherwise leave False)."""

    pixel_range: tuple[float, float] = (0.0, 1.0)
    patch_size: int = 4
    width: int = 64
    depth: int = 2
    heads: int = 4
    decoder_depth: int | None = None
    mlp_ratio: float = 4.0
    num_latent_tokens: int = 16
    token_size: int = 16
    head: str = "pixels"
    legacy_reshape: bool = False
    stage: int = 1
    proxy_config: dict[str, Any] | None = None  # VQGANConfig.to_dict() of the proxy tokenizer (head="proxy_codes")


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, W)
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _param(*shape: int, scale: float) -> nn.Parameter:
    return nn.Parameter(scale * torch.randn(*shape))


class TiTokEncoder(nn.Module):
    def __init__(self, c: TiTokConfig, grid: int):
        super().__init__()
        w, scale = c.width, c.width ** -0.5
        self.legacy_reshape = c.legacy_reshape
        self.patch_embed = nn.Conv2d(c.channels, w, c.patch_size, stride=c.patch_size)
        self.class_embedding = _param(w, scale=scale)
        self.positional_embedding = _param(grid * grid + 1, w, scale=scale)
        self.latent_token_positional_embedding = _param(c.num_latent_tokens, w, scale=scale)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = nn.ModuleList(ResidualAttentionBlock(w, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.ln_post = nn.LayerNorm(w)
        self.conv_out = nn.Conv2d(w, c.token_size, 1)

    def forward(self, images: Tensor, latent_tokens: Tensor) -> Tensor:
        x = rearrange(self.patch_embed(images), "b w h v -> b (h v) w")  # (B, N, W)
        b, n, w = x.shape
        x = torch.cat([self.class_embedding.expand(b, 1, w), x], dim=1) + self.positional_embedding  # (B, 1+N, W)
        latents = (latent_tokens + self.latent_token_positional_embedding).expand(b, -1, -1)  # (B, K, W)
        x = self.ln_pre(torch.cat([x, latents], dim=1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1 + n:])  # (B, K, W)
        k = x.shape[1]
        if self.legacy_reshape:
            x = x.reshape(b, w, k, 1)  # the published quirk: a reshape without permute scrambles memory
        else:
            x = rearrange(x, "b k w -> b w k 1")
        return rearrange(self.conv_out(x), "b t k 1 -> b k t")  # (B, K, token_size)


class TiTokDecoder(nn.Module):
    def __init__(self, c: TiTokConfig, grid: int, proxy_vocab: int | None):
        super().__init__()
        w, scale = c.width, c.width ** -0.5
        self.grid = grid
        self.decoder_embed = nn.Linear(c.token_size, w)
        self.class_embedding = _param(w, scale=scale)
        self.positional_embedding = _param(grid * grid + 1, w, scale=scale)
        self.mask_token = _param(1, 1, w, scale=scale)
        self.latent_token_positional_embedding = _param(c.num_latent_tokens, w, scale=scale)
        self.ln_pre = nn.LayerNorm(w)
        depth = c.decoder_depth or c.depth
        self.transformer = nn.ModuleList(ResidualAttentionBlock(w, c.heads, c.mlp_ratio) for _ in range(depth))
        self.ln_post = nn.LayerNorm(w)
        p = c.patch_size
        if proxy_vocab is None:  # pixels: (B, W, g, g) -> (B, p*p*C, g, g) -> (B, C, g*p, g*p)
            self.ffn = nn.Sequential(nn.Conv2d(w, p * p * c.channels, 1),
                                     Rearrange("b (p1 p2 c) h w -> b c (h p1) (w p2)", p1=p, p2=p))
            self.conv_out = nn.Conv2d(c.channels, c.channels, 3, padding=1)
        else:  # proxy codes: (B, W, g, g) -> logits (B, V, g, g)
            self.ffn = nn.Sequential(nn.Conv2d(w, 2 * w, 1), nn.Tanh(), nn.Conv2d(2 * w, proxy_vocab, 1))
            self.conv_out = nn.Identity()

    def forward(self, z: Tensor) -> Tensor:  # z (B, K, token_size)
        x = self.decoder_embed(z) + self.latent_token_positional_embedding  # (B, K, W)
        b, _, w = x.shape
        n = self.grid * self.grid
        masks = torch.cat([self.class_embedding.expand(b, 1, w), self.mask_token.expand(b, n, w)], dim=1)
        x = self.ln_pre(torch.cat([masks + self.positional_embedding, x], dim=1))  # (B, 1+N+K, W)
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1:1 + n])  # (B, N, W)
        x = rearrange(x, "b (h v) w -> b w h v", h=self.grid)
        return self.conv_out(self.ffn(x))


class TiTok(Tokenizer):
    config_class = TiTokConfig

    def __init__(self, config: TiTokConfig | None = None, quantizer: Quantizer | None = None,
                 proxy_tokenizer: Tokenizer | None = None, **overrides):
        config = with_overrides(config or TiTokConfig(), overrides)
        name = type(self).__name__
        if config.head not in ("pixels", "proxy_codes"):
            raise ValueError(f"{name}: head must be 'pixels' or 'proxy_codes', got {config.head!r}")
        if config.stage not in (1, 2):
            raise ValueError(f"{name}: stage must be 1 or 2, got {config.stage}")
        grid = check_divisible(config.image_size, config.patch_size, name)
        if config.width % config.heads:
            raise ValueError(f"{name}: width {config.width} is not divisible by heads {config.heads}")
        super().__init__(config, build_quantizer(quantizer or config.quantizer, config.quantizer_kwargs,
                                                 config.token_size, name))
        self.latent_grid = (config.num_latent_tokens,)
        self.patch_grid = grid
        proxy_vocab = None
        if config.head == "proxy_codes":
            proxy_tokenizer = proxy_tokenizer or _proxy_from_config(config, name)
            if tuple(proxy_tokenizer.token_shape) != (grid, grid):
                raise ValueError(f"{name}: the proxy tokenizer's token grid {proxy_tokenizer.token_shape} must equal "
                                 f"TiTok's patch grid ({grid}, {grid}); set patch_size to "
                                 f"image_size / {proxy_tokenizer.token_shape[0]}")
            if proxy_tokenizer.image_shape != self.image_shape:
                raise ValueError(f"{name}: the proxy tokenizer reads images {proxy_tokenizer.image_shape}, TiTok reads "
                                 f"{self.image_shape}")
            config.proxy_config = proxy_tokenizer.config.to_dict()
            proxy_vocab = proxy_tokenizer.vocab_size
            self.pixel_tokenizer = proxy_tokenizer
            self._freeze(self.pixel_tokenizer.encoder, self.pixel_tokenizer.quant_conv, self.pixel_tokenizer.quantizer)
            if config.stage == 1:
                self._freeze(self.pixel_tokenizer)
        self.latent_tokens = _param(config.num_latent_tokens, config.width, scale=config.width ** -0.5)
        self.encoder = TiTokEncoder(config, grid)
        self.decoder = TiTokDecoder(config, grid, proxy_vocab)
        if config.stage == 2:
            self._freeze(self.encoder, self.quantizer)
            self.latent_tokens.requires_grad_(False)

    @staticmethod
    def _freeze(*modules: nn.Module) -> None:
        for m in modules:
            m.requires_grad_(False)

    def encode_latents(self, images: Tensor) -> Tensor:
        return self.encoder(images, self.latent_tokens)  # (B, K, token_size)

    def decode_logits(self, z: Tensor) -> Tensor:
        """Proxy-code logits (B, V, g, g) (head="proxy_codes" only)."""
        return self.decoder(z)

    def decode_latents(self, z: Tensor) -> Tensor:
        out = self.decoder(z)
        if self.config.head == "pixels":
            return out  # (B, C, H, W)
        probs = out.softmax(dim=1)  # (B, V, g, g)
        codes = self.pixel_tokenizer.quantizer.decode(torch.arange(probs.shape[1], device=probs.device))  # (V, D)
        soft = torch.einsum("bvhw,vd->bhwd", probs, codes.to(probs.dtype))  # (B, g, g, D)
        return self.from_unit(self.pixel_tokenizer.to_unit(self.pixel_tokenizer.decode_latents(soft)))

    def training_loss(self, images: Tensor, recon_loss: str = "l1") -> tuple[dict[str, Tensor], TokenizerOutput]:
        if self.config.head == "pixels" or self.config.stage == 2:
            return super().training_loss(images, recon_loss)
        # stage 1: cross-entropy against the frozen VQGAN's codes (the proxy codes)
        with torch.no_grad():
            targets = self.pixel_tokenizer.encode(self.pixel_tokenizer.from_unit(self.to_unit(images)))  # (B, g, g)
        z = self.encode_latents(images)
        q = self.quantizer(self._quantizer_layout(z))
        logits = self.decode_logits(self._latent_layout(q.quantized))  # (B, V, g, g)
        terms = {"proxy_ce": F.cross_entropy(logits, targets), "quantizer": q.loss}
        with torch.no_grad():
            recon = self.decode_latents(self._latent_layout(q.quantized))
        return terms, TokenizerOutput(recon, q.indices, q.loss, q.stats)

    def last_layer(self) -> Tensor | None:
        if self.config.head == "pixels":
            return self.decoder.conv_out.weight
        return self.pixel_tokenizer.last_layer() if self.config.stage == 2 else None


def _proxy_from_config(config: TiTokConfig, owner: str) -> Tokenizer:
    if config.proxy_config is None:
        raise ValueError(f"{owner}: head='proxy_codes' needs a trained quantkit VQGAN: pass proxy_tokenizer= (e.g. "
                         f"load_tokenizer(path)) or set proxy_tokenizer in the training config")
    from .vqgan import VQGAN, VQGANConfig

    return VQGAN(VQGANConfig.from_dict(config.proxy_config))


__all__ = ["TiTok", "TiTokConfig", "TiTokDecoder", "TiTokEncoder"]
