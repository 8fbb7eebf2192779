"""VAR: visual autoregressive modelling by next-*scale* prediction over the token maps of a multi-scale residual
quantizer (coarse 1x1 map first, the finest map last).

Paper: Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale Prediction",
https://arxiv.org/abs/2404.02905 (reference code FoundationVision/VAR: ``models/var.py``, ``models/basic_var.py``).

The one idea to hold: all tokens of one scale are predicted in parallel from everything coarser. The attention
mask is block-causal over scales (a position sees its own scale and the coarser ones), so sampling takes exactly
one forward pass per scale, each feeding only the new scale's positions through a KV cache.

Departure from the paper, to stay independent of the tokenizer: the input of scale k is built from *learned* token
embeddings - the embeddings of scales < k, each upsampled to the finest resolution and summed (the analogue of
VAR's cumulative f_hat), then area-downsampled to scale k - instead of from the VQVAE's own codebook vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import GeneratorConfig, TokenGenerator
from ._registry import register_generator
from .sampling import SamplingConfig, guided_logits, sample_logits
from .transformer import Transformer, TransformerConfig


def flatten_scales(maps: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """[(B, s_k, s_k) for each scale] -> (B, L) with L = sum s_k^2, coarse to fine, raster order inside a scale."""
    return torch.cat([m.flatten(1) for m in maps], dim=1)


def split_scales(seq: Tensor, scales: tuple[int, ...]) -> list[Tensor]:
    """(B, L) -> [(B, s_k, s_k) for each scale]; inverse of :func:`flatten_scales`."""
    sizes = [s * s for s in scales]
    if seq.shape[1] != sum(sizes):
        raise ValueError(f"expected {sum(sizes)} tokens for scales {scales}, got {seq.shape[1]}")
    return [part.reshape(seq.shape[0], s, s) for part, s in zip(seq.split(sizes, dim=1), scales)]


def block_causal_mask(scales: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """(L, L) bool: True where query i may attend key j, i.e. level(i) >= level(j)."""
    level = torch.cat([torch.full((s * s,), k, device=device) for k, s in enumerate(scales)])  # (L,)
    return level[:, None] >= level[None, :]


@dataclass
class VARConfig(GeneratorConfig):
    # token_shape is (L,): the flattened multi-scale sequence; scales are the square side of each map
    scales: tuple[int, ...] = (1, 2, 4, 8)
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.token_shape = (sum(s * s for s in self.scales),)
        super().__post_init__()
        if len(self.scales) < 2 or list(self.scales) != sorted(set(self.scales)):
            raise ValueError(f"scales must be at least two strictly increasing sides, got {self.scales}")


@register_generator("var", example=dict(vocab_size=16, scales=(1, 2, 3), num_classes=3, dim=32, depth=2, heads=2))
class VAR(TokenGenerator):
    config_class = VARConfig

    def __init__(self, cfg: VARConfig):
        super().__init__(cfg)
        self.scales = cfg.scales
        self.seq_len = cfg.token_shape[0]
        C = cfg.dim
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # + null class; also the start-of-sequence input
        self.lvl_emb = nn.Embedding(len(cfg.scales), C)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, C))
        self.transformer = Transformer(TransformerConfig(C, cfg.depth, cfg.heads, dropout=cfg.dropout), cond_dim=C)
        self.head = nn.Linear(C, cfg.vocab_size)
        for p in (self.tok_emb.weight, self.cls_emb.weight, self.lvl_emb.weight, self.pos_emb):
            nn.init.normal_(p, std=0.02)
        levels = torch.cat([torch.full((s * s,), k) for k, s in enumerate(cfg.scales)])
        self.register_buffer("levels", levels, persistent=False)  # (L,)
        self.register_buffer("mask", block_causal_mask(cfg.scales), persistent=False)  # (L, L)
        starts = [0]
        for s in cfg.scales:
            starts.append(starts[-1] + s * s)
        self.starts = starts  # position of each scale's first token; starts[-1] == L

    def as_sequence(self, ids) -> Tensor:
        """Accepts a list of per-scale maps or the flattened (B, L) sequence; returns (B, L) int64, checked."""
        if isinstance(ids, (list, tuple)):
            got = tuple(int(m.shape[-1]) for m in ids)
            if got != self.scales:
                raise ValueError(f"VAR was built for scales {self.scales}, got maps of sides {got}")
            ids = flatten_scales(ids)
        return self.check_ids(ids)

    # ----------------------------------------------------------------------------------------------------------
    def _scale_input(self, maps: list[Tensor], k: int) -> Tensor:
        """Teacher-forcing input of scale k >= 1 from the maps of scales < k. -> (B, s_k^2, C)."""
        final, side = self.scales[-1], self.scales[k]
        acc = 0
        for m in maps[:k]:
            e = self.tok_emb(m).permute(0, 3, 1, 2)  # (B, C, s, s)
            acc = acc + (e if e.shape[-1] == final else F.interpolate(e, size=(final, final), mode="bilinear",
                                                                       align_corners=False))
        x = acc if side == final else F.adaptive_avg_pool2d(acc, side)  # (B, C, s_k, s_k)
        return x.flatten(2).transpose(1, 2)

    def _embed(self, x: Tensor, k_first: int, k_last: int) -> Tensor:
        """Adds level and position embeddings to the positions of scales k_first..k_last-1. x (B, T, C)."""
        lo, hi = self.starts[k_first], self.starts[k_last]
        return x + self.lvl_emb(self.levels[lo:hi]) + self.pos_emb[:, lo:hi]

    def _start(self, cond: Tensor) -> Tensor:
        """First scale's input: the class embedding at every position of scale 0. cond (B, C) -> (B, s_0^2, C)."""
        return cond[:, None].expand(-1, self.scales[0] ** 2, -1)

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Teacher forcing. ids (B, L), labels (B,) -> logits (B, L, V); logits of scale k depend only on labels
        and the tokens of scales < k."""
        maps = split_scales(ids, self.scales)
        cond = self.cls_emb(labels)  # (B, C)
        x = torch.cat([self._start(cond)] + [self._scale_input(maps, k) for k in range(1, len(self.scales))], dim=1)
        x = self.transformer(self._embed(x, 0, len(self.scales)), cond, self.mask)
        return self.head(x)

    def loss(self, ids, labels: Tensor) -> Tensor:
        ids = self.as_sequence(ids)
        logits = self(ids, self.drop_labels(labels))
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), ids.reshape(-1))

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None, return_maps: bool = False):
        """One forward pass per scale, with a KV cache. labels (B,) -> ids (B, L) (or the per-scale maps)."""
        sampling = sampling or SamplingConfig()
        K = len(self.scales)
        steps = self.check_steps(steps, K)
        if steps != K:
            raise ValueError(f"VAR takes one step per scale: steps must be {K}, got {steps}")
        labels = self.check_labels(labels)
        B, g = labels.shape[0], sampling.guidance
        both = self.with_null(labels, g)  # (B or 2B,)
        cond = self.cls_emb(both)
        cache = self.transformer.new_cache()
        maps: list[Tensor] = []
        for k, side in enumerate(self.scales):
            x = self._start(cond) if k == 0 else self._scale_input([m.repeat(both.shape[0] // B, 1, 1)
                                                                     for m in maps], k)
            h = self.transformer(self._embed(x, k, k + 1), cond, None, cache)  # sees cached coarser scales
            logits = self.head(h)  # (B or 2B, s^2, V)
            if g > 0:
                logits = guided_logits(*logits.chunk(2), g)
            ids = sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
            maps.append(ids.reshape(B, side, side))
        return maps if return_maps else flatten_scales(maps)

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        return len(self.scales) * (2 if guidance > 0 else 1)
