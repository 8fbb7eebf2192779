"""Sampling utilities shared by every generator: temperature, top-k, top-p (nucleus), classifier-free guidance,
and seeded ``torch.Generator``s for reproducible samples.

Papers: top-k (Fan et al. 2018, https://arxiv.org/abs/1805.04833), nucleus / top-p (Holtzman et al. 2019,
https://arxiv.org/abs/1904.09751), classifier-free guidance (Ho & Salimans 2022, https://arxiv.org/abs/2207.12598).

The one idea to hold: every random draw goes through an explicit ``torch.Generator``, so the same seed, request
and weights give the same token IDs on the same device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingConfig:
    """Knobs shared by all samplers. ``guidance`` 0 means plain conditional sampling."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (a fresh non-deterministic seed when None)."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(seed))
    return gen


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """Keeps the k largest logits along the last dim, sets the rest to -inf. (..., V) -> (..., V)"""
    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Keeps the smallest set of tokens whose probability mass reaches p (the top token always stays)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    sorted_probs = sorted_logits.softmax(-1)
    # drop a token when the mass *before* it already reaches p
    drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def guided_logits(cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
    """Classifier-free guidance on logits: cond + g * (cond - uncond). g = 0 returns ``cond`` exactly."""
    if guidance == 0:
        return cond
    return cond + guidance * (cond - uncond)


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Temperature, then top-k, then top-p. (..., V) -> (..., V) float32 logits with -inf where filtered."""
    logits = logits.float() / temperature
    return top_p_filter(top_k_filter(logits, top_k), top_p)


def sample_logits(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Draws one token per row. logits (..., V) -> ids (...) int64."""
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    ids = torch.multinomial(flat, 1, generator=generator).squeeze(-1)  # (N,)
    return ids.reshape(probs.shape[:-1])


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise, -log(-log(U)), drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))
