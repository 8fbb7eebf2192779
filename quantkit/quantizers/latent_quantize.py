"""Latent quantization: a learned scalar codebook per latent dimension (Hsu et al. 2023, "Disentanglement via
Latent Quantization", arXiv:2305.18378).

Each of the d channels has its own short list of L_i learnable values; a vector is quantized channel by channel to
the nearest value of that channel's list, so the codebook is the grid of prod(L_i) points, never materialized, and
the index reads the per-channel value positions as a mixed-radix number (channel 0 least significant, as in FSQ).
Unlike FSQ the values move: the quantization loss pulls them towards the latents.

Values start evenly spread over [-0.5, 0.5] with zero on the grid: linspace(-1/2, 1/2, L) for odd L,
k / L - 1/2 for even L (the reference implementation's, and vector-quantize-pytorch's, start).

Loss (the paper's eq. 3): ``quantization_weight * ||sg(z) - q||^2 + commitment_weight * ||z - sg(q)||^2``; the first
term is the only one that trains the values. Gradients to z are straight-through.

The one idea to hold: the search is d one-dimensional nearest-codeword searches (``nearest_codeword`` on (N, 1)
against (L_i, 1)), so nothing of size N x prod(L_i) is ever built, and the values it returns are gathered from the
same parameters that decode reads, so forward and decode agree exactly.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..ops import nearest_codeword
from ._registry import register_quantizer
from .base import Quantizer
from .gradients import straight_through
from .projection import projections
from .simvq import _check_weight
from .vq import masked_mse

__all__ = ["LatentQuantizer", "initial_values"]


def initial_values(levels: int) -> Tensor:
    """The starting values of a channel with ``levels`` values: evenly spread over [-1/2, 1/2], zero included."""
    if levels % 2:
        return torch.linspace(-0.5, 0.5, levels)
    return torch.arange(levels) / levels - 0.5


@register_quantizer("latent_quantize", example=dict(dim=3, levels=(5, 4, 3)))
class LatentQuantizer(Quantizer):
    """Latent quantization with ``levels[i]`` learnable values on channel i; ``codebook_size = prod(levels)``.

    Args:
        levels: values per channel, each >= 2.
        dim: input size; learned linear projections map dim <-> heads * len(levels) when they differ (default
            heads * len(levels)).
        heads: chunks of len(levels) channels per (projected) vector, each quantized with the same values; indices
            are then (..., heads).
        learnable_values: the values are parameters trained by the quantization loss (the paper); False keeps
            them fixed (buffers), a plain scalar grid.
        quantization_weight: weight of ||sg(z) - q||^2, the term that trains the values.
        commitment_weight: weight of ||z - sg(q)||^2, the encoder term.
        projection_bias: bias of the projections.
        channel_first: x is (B, dim, *spatial).
    """

    may_skip_depths = False

    def __init__(self, levels: Sequence[int], dim: int | None = None, *, heads: int = 1, learnable_values: bool = True,
                 quantization_weight: float = 0.1, commitment_weight: float = 0.1, projection_bias: bool = True,
                 channel_first: bool = False):
        levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        if not isinstance(levels, list) or not levels or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in levels):
            raise ValueError(f"LatentQuantizer: levels must be a non-empty sequence of ints >= 2, got {levels!r}")
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"LatentQuantizer: heads must be a positive int, got {heads!r}")
        inner = heads * len(levels)
        super().__init__(inner if dim is None else dim, math.prod(levels), channel_first)
        self.levels, self.heads, self.learnable_values = tuple(levels), heads, bool(learnable_values)
        self.quantization_weight = _check_weight("LatentQuantizer", "quantization_weight", quantization_weight)
        self.commitment_weight = _check_weight("LatentQuantizer", "commitment_weight", commitment_weight)
        if self.learnable_values:
            self.values = nn.ParameterList([nn.Parameter(initial_values(v)) for v in levels])
        else:
            for i, v in enumerate(levels):
                self.register_buffer(f"values_{i}", initial_values(v))
        self._basis = [math.prod(levels[:i]) for i in range(len(levels))]  # mixed-radix place values
        self.project_in, self.project_out = projections(self.dim, inner, projection_bias)
        self.identity_gradient = inner == self.dim

    def channel_values(self) -> list[Tensor]:
        """The values of each channel: len(levels) tensors of shape (L_i,)."""
        if self.learnable_values:
            return list(self.values)
        return [getattr(self, f"values_{i}") for i in range(len(self.levels))]

    # ------------------------------------------------------------------------------------------------------------

    def _digits(self, h: Tensor) -> Tensor:
        """Rows (M, d) -> per-channel positions of the nearest value (M, d) int64."""
        return torch.stack([nearest_codeword(h[:, i:i + 1].detach(), v.detach().to(h.dtype)[:, None]).indices
                            for i, v in enumerate(self.channel_values())], dim=-1)

    def _values(self, digits: Tensor) -> Tensor:
        """Positions (M, d) -> values (M, d), differentiable w.r.t. learnable values."""
        return torch.stack([v[digits[:, i]] for i, v in enumerate(self.channel_values())], dim=-1)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = self.project_in(z).reshape(-1, len(self.levels))  # (M, d), M = N * heads
        digits = self._digits(h)
        values = self._values(digits).to(h.dtype)
        weight = None if mask is None else mask.repeat_interleave(self.heads).to(h.dtype)
        loss = (self.quantization_weight * masked_mse(h.detach(), values, weight)
                + self.commitment_weight * masked_mse(h, values.detach(), weight))
        out = self.project_out(straight_through(h, values).reshape(z.shape[0], self.heads * len(self.levels)))
        return out, self._to_indices(digits), loss

    def _to_indices(self, digits: Tensor) -> Tensor:
        """(N * heads, d) digits -> (N,) or (N, heads) indices."""
        indices = self._mixed_radix(digits).reshape(-1, self.heads)  # (N, heads)
        return indices.squeeze(-1) if self.heads == 1 else indices

    def _encode(self, z: Tensor) -> Tensor:
        return self._to_indices(self._digits(self.project_in(z).reshape(-1, len(self.levels))))

    def _decode(self, indices: Tensor) -> Tensor:
        return self.project_out(self.indices_to_codes(indices).reshape(-1, self.heads * len(self.levels)))

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices (...) -> the channel values (..., len(levels)) they name, before the output projection."""
        levels, basis = (torch.tensor(t, device=indices.device) for t in (self.levels, self._basis))
        digits = torch.div(indices.reshape(-1, 1), basis, rounding_mode="floor") % levels  # (n, d)
        return self._values(digits).reshape(*indices.shape, len(self.levels))

    @torch.no_grad()
    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Codes (..., len(levels)) -> the index (...) of the grid point nearest to them, channel by channel."""
        rows = codes.reshape(-1, len(self.levels)).float()
        return self._mixed_radix(self._digits(rows)).reshape(codes.shape[:-1])

    def _mixed_radix(self, digits: Tensor) -> Tensor:
        """Positions (n, d) -> indices (n,), channel 0 least significant."""
        return (digits * torch.tensor(self._basis, device=digits.device)).sum(-1)

    @property
    def num_indices(self) -> int:
        return self.heads

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, levels={list(self.levels)}, heads={self.heads}, "
                f"learnable_values={self.learnable_values}")
