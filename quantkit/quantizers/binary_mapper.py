"""The binary mapper of the Free Transformer (Fleuret 2025, arXiv:2510.17558): ``bits`` logits -> one of 2^bits codes,
by sampling each bit, with a straight-through gradient and a thresholded KL to the uniform code distribution.

The input is H bit logits l (a latent's encoder head). In training each bit is drawn from Bernoulli(sigmoid(l / T));
in eval it is thresholded (sigmoid(l / T) > 1/2). The index reads the bits as an integer (channel 0 least
significant), the code is the bits as +-1 (LFQ's codebook). The paper feeds the decoder the one-hot of the index over
2^H codes, with gradient through G, the code probabilities G_c = prod_i p_i^{c_i} (1 - p_i)^{1 - c_i}, p = sigmoid(l):
``one_hot(indices, logits)`` builds it (N x 2^H, on request only).

The one idea to hold: ``quantized`` is that straight-through one-hot times the +-1 codebook, computed without the
one-hot: sum_c G_c c = 2p - 1 = tanh(l / 2) per bit, so quantized = code + tanh(l / 2) - sg(tanh(l / 2)) has the
paper's gradient for any decoder that reads the codes linearly, at O(N H) cost.

The loss (training only) is the free-bits KL, kl_weight * mean_n relu(H ln 2 - sum_i h(p_ni) - kl_threshold), with h
the binary entropy: the KL from the bits' distribution to the uniform one, free below kl_threshold nats.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._registry import register_quantizer
from .base import Quantizer

__all__ = ["BinaryMapper"]

_SAMPLING = ("train", "always", "never")
_MAX_BITS = 30


@register_quantizer("binary_mapper", example=dict(dim=4))
class BinaryMapper(Quantizer):
    """Binary mapper over ``dim`` bit logits; ``codebook_size = 2^dim``.

    Args:
        dim: number of bits H (the input is (..., H) logits), 1 <= H <= 30.
        temperature: bits are drawn from sigmoid(logits / temperature) (the gradient uses temperature 1, as in the
            paper's reference code).
        kl_threshold: free nats of the KL loss (default ln 2, one bit).
        kl_weight: weight of the KL loss (0 disables it).
        sampling: "train" (default: Bernoulli in training, threshold in eval), "always" (Bernoulli in eval too; eval
            is then not deterministic) or "never" (threshold in training too).
        channel_first: x is (B, H, *spatial).
    """

    may_skip_depths = False

    def __init__(self, dim: int, temperature: float = 1.0, kl_threshold: float = math.log(2), kl_weight: float = 1.0,
                 sampling: str = "train", channel_first: bool = False):
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= _MAX_BITS:
            raise ValueError(f"BinaryMapper: dim (the number of bits) must be an int in [1, {_MAX_BITS}], got {dim!r}")
        if not temperature > 0:
            raise ValueError(f"BinaryMapper: temperature must be positive, got {temperature!r}")
        if sampling not in _SAMPLING:
            raise ValueError(f"BinaryMapper: sampling must be one of {_SAMPLING}, got {sampling!r}")
        super().__init__(dim, 2 ** dim, channel_first)
        self.bits = dim
        self.temperature = float(temperature)
        self.kl_threshold = float(kl_threshold)
        self.kl_weight = float(kl_weight)
        self.sampling = sampling

    def _powers(self, t: Tensor) -> Tensor:
        return 2 ** torch.arange(self.bits, dtype=torch.int64, device=t.device)  # (H,)

    def _samples(self) -> bool:
        return self.sampling == "always" or (self.sampling == "train" and self.training)

    # ------------------------------------------------------------------------------------------------------------

    def draw_bits(self, logits: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits (N, H) -> bits (N, H) bool: Bernoulli(sigmoid(logits / T)) when sampling, else the threshold.
        Only masked-in rows draw (masked-out rows take the threshold)."""
        probs = torch.sigmoid(logits / self.temperature)  # (N, H)
        hard = probs > 0.5
        if not self._samples():
            return hard
        if mask is None:
            return torch.bernoulli(probs).bool()
        return hard.masked_scatter(mask[:, None], torch.bernoulli(probs[mask]).bool())

    def indices_to_bits(self, indices: Tensor) -> Tensor:
        """Indices (...) -> bits (..., H) bool."""
        return (indices.unsqueeze(-1) & self._powers(indices)) != 0

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Indices (...) -> codes (..., H) in {-1, +1}."""
        return self.indices_to_bits(indices).to(dtype) * 2 - 1

    def one_hot(self, indices: Tensor, logits: Tensor | None = None) -> Tensor:
        """Indices (...) -> one-hot (..., 2^H) float; with ``logits`` (..., H), the paper's straight-through gradient
        through the code probabilities G (one_hot + G - sg(G)). Builds (..., 2^H): for a decoder that embeds it."""
        out = F.one_hot(indices, self.codebook_size).float()
        if logits is None:
            return out
        table = self.indices_to_bits(torch.arange(self.codebook_size, device=logits.device)).to(logits.dtype)
        # log G_c = sum_i [c_i ? log p_i : log(1 - p_i)] = sum_i log(1 - p_i) + sum_i c_i l_i   (log p - log(1 - p) = l)
        log_g = F.logsigmoid(-logits).sum(-1, keepdim=True) + logits @ table.T  # (..., 2^H)
        g = log_g.exp()
        return out + (g - g.detach())

    def log_prob(self, logits: Tensor, indices: Tensor, sum_bits: bool = True) -> Tensor:
        """log p(indices | logits): (..., H) logits, (...) indices -> (...) (per bit (..., H) with sum_bits=False)."""
        per_bit = torch.where(self.indices_to_bits(indices), F.logsigmoid(logits), F.logsigmoid(-logits))
        return per_bit.sum(-1) if sum_bits else per_bit

    @staticmethod
    def binary_entropy(logits: Tensor) -> Tensor:
        """Entropy (nats) of the independent bits: (..., H) logits -> (...)."""
        p = torch.sigmoid(logits)
        return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits)).sum(-1)

    def kl_loss(self, logits: Tensor, reduce: bool = True) -> Tensor:
        """relu(KL(bits || uniform) - kl_threshold), unweighted: per vector (...) or its mean (reduce)."""
        per_vector = F.relu(self.bits * math.log(2) - self.binary_entropy(logits) - self.kl_threshold)
        return per_vector.mean() if reduce else per_vector

    # ------------------------------------------------------------------------------------------------------------

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        bits = self.draw_bits(z.detach(), mask)  # (N, H)
        indices = (bits.long() * self._powers(z)).sum(-1)  # (N,)
        expected = torch.tanh(z / 2)  # E[+-1 bit] = 2 sigmoid(z) - 1: the straight-through one-hot's gradient path
        quantized = (bits.to(z.dtype) * 2 - 1) + (expected - expected.detach())
        loss = z.new_zeros(())
        kept = z if mask is None else z[mask]
        if self.training and self.kl_weight and kept.shape[0]:
            loss = self.kl_weight * self.kl_loss(kept)
        return quantized, indices, loss

    def _encode(self, z: Tensor) -> Tensor:
        return (self.draw_bits(z).long() * self._powers(z)).sum(-1)

    def _decode(self, indices: Tensor) -> Tensor:
        return self.indices_to_codes(indices)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, temperature={self.temperature}, kl_threshold={self.kl_threshold:.4f}, "
                f"sampling={self.sampling!r}, " + super().extra_repr())
