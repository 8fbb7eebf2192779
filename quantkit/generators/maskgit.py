"""MaskGIT: a bidirectional transformer over the token grid, trained to fill in masked tokens and sampled by
parallel decoding in a few steps.

Paper: Chang et al. 2022, "MaskGIT: Masked Generative Image Transformer", https://arxiv.org/abs/2202.04200
(reference code google-research/maskgit: ``libml/mask_schedule.py``, ``libml/parallel_decode.py``).

The one idea to hold: training masks a cosine-scheduled fraction gamma(r) = cos(pi/2 r) of the tokens; decoding
runs the same schedule backwards, each step sampling every masked token at once and keeping only the most
confident ones (confidence = log-probability plus annealed Gumbel noise), re-masking the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import GeneratorConfig, TokenGenerator
from ._registry import register_generator
from .sampling import SamplingConfig, guided_logits, gumbel_noise, sample_with_log_probs
from .transformer import Transformer, TransformerConfig


def cosine_schedule(r: Tensor | float) -> Tensor:
    """gamma(r) = cos(pi/2 r): fraction of tokens masked at progress r in [0, 1]; gamma(0) = 1, gamma(1) = 0."""
    r = torch.as_tensor(r, dtype=torch.float32)
    return torch.cos(math.pi / 2 * r).clamp(0.0, 1.0)


def masked_counts(num_tokens: int, steps: int) -> list[int]:
    """How many tokens are still masked after each of ``steps`` decoding steps (the last is always 0).

    floor(N * gamma((t+1)/T)), kept strictly decreasing while possible so every step reveals at least one token.
    """
    counts, masked = [], num_tokens
    for t in range(steps):
        n = int(math.floor(num_tokens * float(cosine_schedule((t + 1) / steps))))
        n = 0 if t == steps - 1 else max(0, min(n, masked - 1))
        counts.append(n)
        masked = n
    return counts


@dataclass
class MaskGITConfig(GeneratorConfig):
    dim: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.1
    label_smoothing: float = 0.1
    default_steps: int = 8
    choice_temperature: float = 4.5  # Gumbel scale on confidences at step 0, annealed linearly to 0


@register_generator("maskgit", example=dict(vocab_size=16, token_shape=(4, 4), num_classes=3, dim=32, depth=2,
                                            heads=2))
class MaskGIT(TokenGenerator):
    config_class = MaskGITConfig

    def __init__(self, cfg: MaskGITConfig):
        super().__init__(cfg)
        if len(cfg.token_shape) != 2:
            raise ValueError(f"MaskGIT models a (h, w) token grid, got token_shape {cfg.token_shape}")
        self.num_tokens = cfg.token_shape[0] * cfg.token_shape[1]
        self.mask_id = cfg.vocab_size  # one extra embedding row for [MASK]
        self.tok_emb = nn.Embedding(cfg.vocab_size + 1, cfg.dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # + null class
        self.pos_emb = nn.Parameter(torch.zeros(1, self.num_tokens + 1, cfg.dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(TransformerConfig(cfg.dim, cfg.depth, cfg.heads, dropout=cfg.dropout))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size)
        for p in (self.tok_emb.weight, self.cls_emb.weight, self.pos_emb):
            nn.init.normal_(p, std=0.02)

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids (B, N) with ``mask_id`` where masked, labels (B,) (null class allowed) -> logits (B, N, V)."""
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(ids)], dim=1) + self.pos_emb  # (B, 1+N, C)
        x = self.transformer(self.drop(x))  # bidirectional: no mask
        return self.head(x[:, 1:])

    def loss(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy on the masked positions; the mask ratio is drawn from the cosine schedule."""
        ids = self.check_ids(ids).flatten(1)  # (B, N)
        B, N = ids.shape
        ratio = cosine_schedule(torch.rand(B, device=ids.device))  # (B,)
        n_masked = (ratio * N).ceil().clamp(1, N)  # (B,)
        rank = torch.rand(B, N, device=ids.device).argsort(dim=1).argsort(dim=1)  # random rank of each position
        masked = rank < n_masked[:, None]  # (B, N) bool
        logits = self(ids.masked_fill(masked, self.mask_id), self.drop_labels(labels))
        return F.cross_entropy(logits[masked], ids[masked], label_smoothing=self.cfg.label_smoothing)

    #: On the CPU, sampling runs the network on at most this many images per call. One call on 200 images makes
    #: 13 MB activations that leave the cache and that glibc maps afresh (page faults) every time: 64-image chunks
    #: sampled 200 images 1.2x faster (256 vs 211 images/s, one thread of a 2-core EPYC), where the PixelCNN prior
    #: gained nothing from chunks (36 vs 37 images/s). GPUs get the whole batch at once.
    cpu_chunk = 64

    def _logits_in_chunks(self, ids: Tensor, labels: Tensor) -> Tensor:
        """The forward pass over batch chunks on the CPU (images do not interact: the same logits up to rounding)."""
        n = self.cpu_chunk
        if ids.device.type != "cpu" or ids.shape[0] <= n:
            return self(ids, labels)
        return torch.cat([self(i, c) for i, c in zip(ids.split(n), labels.split(n))])

    def _guided(self, ids: Tensor, labels: Tensor, guidance: float) -> Tensor:
        if guidance == 0:
            return self._logits_in_chunks(ids, labels)
        cond, uncond = self._logits_in_chunks(ids.repeat(2, 1), self.with_null(labels, guidance)).chunk(2)
        return guided_logits(cond, uncond, guidance)

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Parallel decoding in ``steps`` steps. labels (B,) -> ids (B, h, w) int64."""
        sampling = sampling or SamplingConfig()
        steps = self.check_steps(steps, self.cfg.default_steps)
        labels = self.check_labels(labels)
        B, N = labels.shape[0], self.num_tokens
        ids = torch.full((B, N), self.mask_id, dtype=torch.long, device=labels.device)
        for t, n_keep_masked in enumerate(masked_counts(N, steps)):
            unknown = ids == self.mask_id  # (B, N)
            # only the masked positions are sampled and scored (M of them): known tokens stay as they are
            new_tokens, log_p = sample_with_log_probs(self._guided(ids, labels, sampling.guidance)[unknown],
                                                      sampling.temperature, sampling.top_k, sampling.top_p,
                                                      generator)  # (M,), (M,)
            sampled = ids.masked_scatter(unknown, new_tokens)  # row-major order, as [unknown] read
            if n_keep_masked == 0:
                ids = sampled
                break
            # confidence of each new token (its log-probability), with Gumbel noise annealed from
            # choice_temperature to 0
            anneal = self.cfg.choice_temperature * (1.0 - (t + 1) / steps)
            confidence = torch.full((B, N), float("inf"), device=ids.device)  # known tokens are never re-masked
            confidence = confidence.masked_scatter(unknown, log_p + anneal * gumbel_noise(log_p.shape, generator,
                                                                                          ids.device))
            remask = confidence.topk(n_keep_masked, dim=1, largest=False).indices  # (B, n) least confident
            ids = sampled.scatter(1, remask, self.mask_id)
        return ids.reshape(B, *self.cfg.token_shape)

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        steps = self.check_steps(steps, self.cfg.default_steps)
        passes = masked_counts(self.num_tokens, steps).index(0) + 1  # decoding stops once nothing is masked
        return passes * (2 if guidance > 0 else 1)
