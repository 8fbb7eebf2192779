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
    """Keeps the nucleus: every token whose more probable rivals hold less than p of the mass together (so the top
    token always stays, and tokens of equal probability stay or go together). (..., V) -> (..., V)"""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
    sorted_probs = sorted_logits.softmax(-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (..., V) mass ahead of each position
    # tied tokens share the mass ahead of the first of them: the first index of each run of equal values
    ascending = -sorted_logits.contiguous()
    first_of_tie = torch.searchsorted(ascending, ascending)  # (..., V)
    drop_sorted = mass_before.gather(-1, first_of_tie) >= p
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
    """Draws one token per row from the filtered distribution. logits (..., V) -> ids (...) int64."""
    return sample_with_log_probs(logits, temperature, top_k, top_p, generator)[0]


def sample_with_log_probs(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                          top_p: float | None = None, generator: torch.Generator | None = None
                          ) -> tuple[Tensor, Tensor]:
    """Draws one token per row from the distribution :func:`filter_logits` describes, and returns with it the
    token's log-probability under the temperature-scaled softmax *before* filtering (what MaskGIT ranks its
    confidences by, as in google-research/maskgit). logits (..., V) -> ids (...) int64, log_probs (...) float32.

    Fast on long rows and many rows: one uniform number per row is located in the cumulative probabilities
    (``torch.multinomial`` draws V exponentials per row), and the nucleus needs no sort: a draw from the full
    distribution that lands inside the nucleus is a draw from the nucleus (rejection sampling), and whether it
    landed there is one comparison against the row. Rows still outside after two redraws are sampled from the
    filtered distribution directly.
    """
    V = logits.shape[-1]
    scaled = logits.reshape(-1, V).float() / temperature  # (R, V)
    log_z = scaled.logsumexp(-1, keepdim=True)  # (R, 1)
    if not torch.isfinite(log_z).all():
        raise ValueError("logits contain NaN or +inf (or a row that is -inf throughout); cannot sample")
    probs = top_k_filter(scaled, top_k).softmax(-1)  # (R, V)
    pick = _inverse_cdf(probs, generator)  # (R,)
    if top_p is not None and top_p < 1.0:
        pick = _redraw_outside_nucleus(probs, pick, top_p, generator)
    log_probs = scaled.gather(-1, pick[:, None]).squeeze(-1) - log_z.squeeze(-1)  # (R,)
    return pick.reshape(logits.shape[:-1]), log_probs.reshape(logits.shape[:-1])


def _inverse_cdf(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of (R, V) non-negative weights -> (R,) int64, by locating u ~ U[0, total) in the cumsum.
    The first index whose cumulative weight exceeds u always has positive weight."""
    cdf = probs.cumsum(-1)  # (R, V) non-decreasing
    total = cdf[:, -1:]  # (R, 1)
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding must never reach total
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def _inside_nucleus(probs: Tensor, pick: Tensor, p: float) -> Tensor:
    """(R,) bool: do the tokens strictly more probable than ``pick`` hold less than p of the mass together?"""
    p_pick = probs.gather(-1, pick[:, None])  # (R, 1)
    return (probs * (probs > p_pick)).sum(-1) < p


def _redraw_outside_nucleus(probs: Tensor, pick: Tensor, p: float, generator: torch.Generator | None,
                            rounds: int = 2) -> Tensor:
    """Rejection sampling into the nucleus; each round accepts a row with probability >= p."""
    outside = ~_inside_nucleus(probs, pick, p)  # (R,)
    for _ in range(rounds):
        rows = outside.nonzero().squeeze(1)
        if rows.numel() == 0:
            return pick
        redraw = _inverse_cdf(probs[rows], generator)
        pick[rows] = redraw
        outside[rows] = ~_inside_nucleus(probs[rows], redraw, p)
    rows = outside.nonzero().squeeze(1)
    if rows.numel():
        nucleus = top_p_filter(probs[rows].log(), p).softmax(-1)
        pick[rows] = _inverse_cdf(nucleus, generator)
    return pick


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Standard Gumbel noise, -log(-log(U)), drawn from ``generator``."""
    u = torch.rand(shape, generator=generator, device=device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))
