"""PixelCNN prior: the original VQ-VAE prior, a class-conditional gated PixelCNN with masked convolutions over
the token grid, sampled one token at a time in raster order. It is the autoregressive baseline the parallel
generators are compared against.

Papers: van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"
(https://arxiv.org/abs/1606.05328); used as the prior in VQ-VAE (https://arxiv.org/abs/1711.00937).

The one idea to hold: two stacks keep the receptive field causal without a blind spot. The vertical stack sees
all rows *above* (its output is shifted down one row before anyone else reads it); the horizontal stack sees the
pixels to the *left* in the current row (the first layer excludes the pixel itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import GeneratorConfig, TokenGenerator
from ._registry import register_generator
from .sampling import SamplingConfig, guided_logits, sample_logits


def _shift_down(x: Tensor) -> Tensor:
    """(B, C, H, W): row i takes row i-1 (zeros in row 0)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _shift_right(x: Tensor) -> Tensor:
    """(B, C, H, W): column j takes column j-1 (zeros in column 0)."""
    return F.pad(x, (1, 0, 0, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    """One gated layer: tanh(a) * sigmoid(b) on both stacks, with a class-dependent bias."""

    def __init__(self, channels: int, kernel: int, num_classes: int, first: bool):
        super().__init__()
        self.first, self.pad = first, kernel // 2
        C = channels
        # vertical: rows i-k//2 .. i, all k columns (read by others only after _shift_down)
        self.v_conv = nn.Conv2d(C, 2 * C, (kernel // 2 + 1, kernel))
        self.v_to_h = nn.Conv2d(2 * C, 2 * C, 1)
        # horizontal: columns j-k//2 .. j of row i (the first layer shifts its input right: excludes j itself)
        self.h_conv = nn.Conv2d(C, 2 * C, (1, kernel // 2 + 1))
        self.h_out = nn.Conv2d(C, C, 1)
        self.cls_bias = nn.Embedding(num_classes + 1, 4 * C)

    @staticmethod
    def _gate(x: Tensor) -> Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.tanh(a) * torch.sigmoid(b)

    def forward(self, v: Tensor, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """v, h (B, C, H, W), labels (B,) -> new v, h."""
        p = self.pad
        bias_v, bias_h = self.cls_bias(labels)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, 2C, 1, 1)
        v_feat = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2C, H, W)
        h_in = _shift_right(h) if self.first else h
        h_feat = self.h_conv(F.pad(h_in, (p, 0, 0, 0))) + self.v_to_h(_shift_down(v_feat))
        v_new = self._gate(v_feat + bias_v)
        h_new = self.h_out(self._gate(h_feat + bias_h))
        return v_new, (h_new if self.first else h + h_new)


@dataclass
class PixelCNNConfig(GeneratorConfig):
    channels: int = 96
    layers: int = 8
    kernel: int = 5


@register_generator("pixelcnn", example=dict(vocab_size=16, token_shape=(4, 4), num_classes=3, channels=16,
                                             layers=2, kernel=3))
class PixelCNNPrior(TokenGenerator):
    config_class = PixelCNNConfig

    def __init__(self, cfg: PixelCNNConfig):
        super().__init__(cfg)
        if len(cfg.token_shape) != 2:
            raise ValueError(f"PixelCNNPrior models a (h, w) token grid, got token_shape {cfg.token_shape}")
        if cfg.kernel % 2 == 0 or cfg.kernel < 3:
            raise ValueError(f"kernel must be odd and >= 3, got {cfg.kernel}")
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.channels)
        self.layers = nn.ModuleList(GatedLayer(cfg.channels, cfg.kernel, cfg.num_classes, first=(i == 0))
                                    for i in range(cfg.layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(cfg.channels, cfg.channels, 1), nn.ReLU(),
                                  nn.Conv2d(cfg.channels, cfg.vocab_size, 1))

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids (B, H, W), labels (B,) -> logits (B, H, W, V); logits at (i, j) depend on tokens before it in
        raster order only."""
        x = self.tok_emb(ids).permute(0, 3, 1, 2)  # (B, C, H, W)
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self.head(h).permute(0, 2, 3, 1)

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Raster-order sampling: one full forward pass per token. ``steps`` must be None or H*W."""
        sampling = sampling or SamplingConfig()
        H, W = self.cfg.token_shape
        steps = self.check_steps(steps, H * W)
        if steps != H * W:
            raise ValueError(f"PixelCNNPrior samples one token per step: steps must be {H * W}, got {steps}")
        labels = self.check_labels(labels)
        B = labels.shape[0]
        ids = torch.zeros(B, H, W, dtype=torch.long, device=labels.device)
        both = self.with_null(labels, sampling.guidance)
        for i in range(H):
            for j in range(W):
                logits = self(ids.repeat(both.shape[0] // B, 1, 1), both)[:, i, j]  # (B or 2B, V)
                if sampling.guidance > 0:
                    logits = guided_logits(*logits.chunk(2), sampling.guidance)
                ids[:, i, j] = sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p,
                                             generator)
        return ids

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        H, W = self.cfg.token_shape
        return H * W * (2 if guidance > 0 else 1)
