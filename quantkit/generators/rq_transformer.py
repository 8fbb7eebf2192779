"""RQ-Transformer: an autoregressive model of residual-quantized tokens (H x W positions x D codes each), split
into a spatial transformer, causal over positions, and a depth transformer, causal over the D codes of one
position.

Paper: Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization",
https://arxiv.org/abs/2203.01941 (reference code kakaobrain/rq-vae-transformer: ``rqvae/models/rqtransformer``).

The one idea to hold: the expensive spatial transformer runs once per *position* on the sum of that position's
code embeddings; the cheap depth transformer then predicts the D codes one after another from the spatial
context h_t and the running (cumulative) sum of the codes chosen so far.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._base import GeneratorConfig, TokenGenerator
from ._registry import register_generator
from .sampling import SamplingConfig, guided_logits, sample_logits
from .transformer import Transformer, TransformerConfig, causal_mask


@dataclass
class RQTransformerConfig(GeneratorConfig):
    token_shape: tuple[int, ...] = (4, 4, 4)  # (h, w, depth)
    dim: int = 128
    spatial_depth: int = 4
    depth_depth: int = 2
    heads: int = 4
    dropout: float = 0.0


@register_generator("rq_transformer", example=dict(vocab_size=16, token_shape=(3, 3, 2), num_classes=3, dim=32,
                                                   spatial_depth=2, depth_depth=1, heads=2))
class RQTransformer(TokenGenerator):
    config_class = RQTransformerConfig

    def __init__(self, cfg: RQTransformerConfig):
        super().__init__(cfg)
        if len(cfg.token_shape) != 3:
            raise ValueError(f"RQTransformer models (h, w, depth) tokens, got token_shape {cfg.token_shape}")
        h, w, D = cfg.token_shape
        self.T, self.D = h * w, D
        C = cfg.dim
        self.spatial_emb = nn.Embedding(cfg.vocab_size, C)  # summed over depth -> one input per position
        self.depth_emb = nn.Embedding(cfg.vocab_size, C)  # cumulative sums -> depth transformer inputs
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # + null class; the first spatial input
        self.pos_hw = nn.Parameter(torch.zeros(1, self.T, C))
        self.pos_d = nn.Parameter(torch.zeros(1, D, C))
        self.spatial = Transformer(TransformerConfig(C, cfg.spatial_depth, cfg.heads, dropout=cfg.dropout))
        self.depth = Transformer(TransformerConfig(C, cfg.depth_depth, cfg.heads, dropout=cfg.dropout))
        self.head = nn.Linear(C, cfg.vocab_size)
        for p in (self.spatial_emb.weight, self.depth_emb.weight, self.cls_emb.weight, self.pos_hw, self.pos_d):
            nn.init.normal_(p, std=0.02)
        self.register_buffer("mask_t", causal_mask(self.T), persistent=False)
        self.register_buffer("mask_d", causal_mask(D), persistent=False)

    def _spatial_inputs(self, codes: Tensor, labels: Tensor) -> Tensor:
        """codes (B, T, D), labels (B,) -> (B, T, C): [class, x_0, ..., x_{T-2}] shifted right, + positions."""
        x = self.spatial_emb(codes).sum(2)  # (B, T, C)
        x = torch.cat([self.cls_emb(labels)[:, None], x[:, :-1]], dim=1)
        return x + self.pos_hw

    def _depth_inputs(self, h: Tensor, codes: Tensor) -> Tensor:
        """h (N, C) spatial context, codes (N, D) -> (N, D, C): [h, e_1, e_1 + e_2, ...] + depth positions."""
        cum = self.depth_emb(codes[:, :-1]).cumsum(1)  # (N, D-1, C)
        return torch.cat([h[:, None], cum], dim=1) + self.pos_d

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids (B, h, w, D), labels (B,) -> logits (B, h, w, D, V); logits at (t, d) depend only on labels, the
        codes of positions < t and the codes of position t at depths < d."""
        B = ids.shape[0]
        codes = ids.reshape(B, self.T, self.D)
        h = self.spatial(self._spatial_inputs(codes, labels), mask=self.mask_t)  # (B, T, C)
        z = self._depth_inputs(h.reshape(B * self.T, -1), codes.reshape(B * self.T, self.D))
        logits = self.head(self.depth(z, mask=self.mask_d))  # (B*T, D, V)
        return logits.reshape(B, *self.cfg.token_shape, self.vocab_size)

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Positions in raster order, codes in depth order, both with KV caches. labels (B,) -> (B, h, w, D)."""
        sampling = sampling or SamplingConfig()
        steps = self.check_steps(steps, self.T)
        if steps != self.T:
            raise ValueError(f"RQTransformer takes one spatial step per position: steps must be {self.T}, "
                             f"got {steps}")
        labels = self.check_labels(labels)
        B, g = labels.shape[0], sampling.guidance
        both = self.with_null(labels, g)
        n = both.shape[0]  # B, or 2B with guidance
        codes = torch.zeros(B, self.T, self.D, dtype=torch.long, device=labels.device)
        cache_t = self.spatial.new_cache()
        x = self.cls_emb(both)[:, None]  # (n, 1, C)
        for t in range(self.T):
            h = self.spatial(x + self.pos_hw[:, t:t + 1], cache=cache_t)[:, 0]  # (n, C)
            cache_d = self.depth.new_cache()
            z, cum = h, 0
            for d in range(self.D):
                out = self.depth((z + self.pos_d[:, d])[:, None], cache=cache_d)[:, 0]  # (n, C)
                logits = self.head(out)
                if g > 0:
                    logits = guided_logits(*logits.chunk(2), g)
                code = sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
                codes[:, t, d] = code
                cum = cum + self.depth_emb(code.repeat(n // B))  # (n, C)
                z = cum
            x = self.spatial_emb(codes[:, t].repeat(n // B, 1)).sum(1)[:, None]  # next position's input
        return codes.reshape(B, *self.cfg.token_shape)

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        """Spatial passes (one per position) plus depth passes (one per code); CFG doubles both."""
        return self.T * (1 + self.D) * (2 if guidance > 0 else 1)
