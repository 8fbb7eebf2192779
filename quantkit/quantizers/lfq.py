"""Lookup-free quantization, LFQ (MAGVIT-v2, Yu et al. 2023, arXiv:2310.05737; Open-MAGVIT2 arXiv:2409.04410).

Each of ``bits = log2(codebook_size)`` channels is quantized to its sign (times ``codebook_scale``); the index reads
the bits as an integer (channel 0 least significant). The codebook {-s, +s}^bits is implicit.

The one idea to hold: the entropy regularizer is exact. The per-sample term factorizes per bit, and the codebook
term (the entropy of the batch-mean soft assignment over all 2^bits codes) is one chunked GEMM over the two halves
of the bits (:mod:`quantkit.quantizers.entropy`), so 2^18 codes never need an N x 2^18 matrix.

``spherical=True`` is binary spherical quantization, BSQ (Zhao et al. 2024, "Image and Video Tokenization with Binary
Spherical Quantization", arXiv:2406.07548): the projected vector is put on the sphere of radius ``codebook_scale``
first, and the codes are the sign vectors on that sphere, +-codebook_scale / sqrt(bits). All codes keep one norm, so
the entropy terms still factorize per bit (with that smaller code value) and the sign still picks the nearest code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_quantizer
from .base import Quantizer, bits_for, full_precision
from .entropy import codebook_entropy, per_sample_entropy
from .fsq import projections
from .gradients import straight_through

__all__ = ["LFQ", "EntropyLoss", "CosineLinear"]


@dataclass
class EntropyLoss:
    """MAGVIT-v2's entropy regularizer: ``weight * (sample_weight * mean_n H(p_n) - codebook_weight * H(mean_n p_n))``
    over the soft assignment p_n(c) = softmax_c(-||z_n - c||^2 / temperature).

    Defaults follow Open-MAGVIT2 (weight 0.1, temperature 0.01, both terms weighted 1). ``weight = 0`` disables
    it (no GEMM is run). Computed in training mode only, over unmasked rows.
    """

    weight: float = 0.1
    temperature: float = 0.01
    sample_weight: float = 1.0
    codebook_weight: float = 1.0
    chunk_size: int = 4096  # rows per GEMM chunk of the codebook term
    #: when set, the entropy term is softplus(term + offset), kept positive (vector-quantize-pytorch's experimental
    #: ``experimental_softplus_entropy_loss``; the peer's offset default is 5)
    softplus_offset: float | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"EntropyLoss: temperature must be positive, got {self.temperature!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"EntropyLoss: chunk_size must be a positive int, got {self.chunk_size!r}")


class CosineLinear(nn.Module):
    """x (..., in) -> scale * normalize(x) @ normalize(W, dim=0), W (in, out), no bias: every output is a cosine
    times ``scale``, so the projected vector is bounded whatever the encoder's scale (vector-quantize-pytorch's
    ``cosine_sim_project_in`` for LFQ). Computes in the weight's dtype (float32 under autocast too)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 1.0):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"CosineLinear: scale must be positive, got {scale!r}")
        self.weight = nn.Parameter(torch.randn(in_features, out_features))  # (in, out)
        self.bias = None
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x.device):
            w = F.normalize(self.weight, dim=0)
            out = (F.normalize(x.to(w.dtype), dim=-1) @ w) * self.scale
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[0]}, out_features={self.weight.shape[1]}, scale={self.scale}"


@register_quantizer("lfq", example=dict(dim=4, codebook_size=16))
class LFQ(Quantizer):
    """LFQ with ``codebook_size`` codes (a power of two).

    Args:
        dim: input size (default ``log2(codebook_size)``); learned projections map dim <-> bits when they differ.
        codebook_size: 2^bits.
        commitment_weight: weight of mean ||z - sg(q)||^2 (0.25 in MAGVIT-v2 / Open-MAGVIT2).
        entropy: :class:`EntropyLoss` (or a dict of its fields).
        codebook_scale: codes are +-codebook_scale (residual LFQ shrinks it per depth).
        channel_first: x is (B, dim, *spatial).
        spherical: BSQ (see the module docstring): the projected vector and the codes lie on the sphere of radius
            codebook_scale; the gradient then passes through the normalization (not the identity).
        input_clamp: when set, the projected vector is soft-clamped to +-c first, c * tanh(h / c) (c >=
            codebook_scale), so no input lies far beyond the codes.
        rotation: quantize h R for a fixed random orthogonal R (a buffer, drawn at construction) and return the
            code times R^T: the codebook becomes a rotated hypercube, whose axes need not match the encoder's
            (the incoherence rotation of QuIP, arXiv:2307.13304; vector-quantize-pytorch's orthogonal_rotation).
        cosine_projection: when set (a scale s), the input projection is a :class:`CosineLinear` of scale s
            (needs dim != bits).
        straight_through_activation: a module f (e.g. ``nn.Tanh()``): the gradient passes through f instead of the
            identity, quantized = code + f(h) - sg(f(h)) (the forward value is the code either way).
    """

    may_skip_depths = False

    def __init__(self, dim: int | None = None, codebook_size: int = 2 ** 10, commitment_weight: float = 0.25,
                 entropy: EntropyLoss | dict | None = None, codebook_scale: float = 1.0,
                 channel_first: bool = False, projection_bias: bool = True, spherical: bool = False,
                 input_clamp: float | None = None, rotation: bool = False, cosine_projection: float | None = None,
                 straight_through_activation: nn.Module | None = None):
        if isinstance(codebook_size, bool) or not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"LFQ: codebook_size must be a power of two >= 2, got {codebook_size!r}")
        try:
            bits = bits_for(codebook_size)
        except ValueError:
            raise ValueError(f"LFQ: codebook_size must be a power of two, got {codebook_size}") from None
        if not codebook_scale > 0:
            raise ValueError(f"LFQ: codebook_scale must be positive, got {codebook_scale!r}")
        if input_clamp is not None and not codebook_scale <= input_clamp < float("inf"):
            raise ValueError(f"LFQ: input_clamp must be a number >= codebook_scale={codebook_scale}, "
                             f"got {input_clamp!r}")
        super().__init__(bits if dim is None else dim, codebook_size, channel_first)
        self.bits = bits
        self.commitment_weight = float(commitment_weight)
        self.entropy = entropy if isinstance(entropy, EntropyLoss) else EntropyLoss(**(entropy or {}))
        self.codebook_scale = float(codebook_scale)
        self.spherical = bool(spherical)
        self.input_clamp = None if input_clamp is None else float(input_clamp)
        if rotation:
            self.register_buffer("rotation", torch.nn.init.orthogonal_(torch.empty(bits, bits)))  # (bits, bits)
        else:
            self.rotation = None
        self.project_in, self.project_out = projections(self.dim, bits, projection_bias)
        if cosine_projection is not None:
            if self.dim == bits:
                raise ValueError(f"LFQ: cosine_projection needs an input projection, i.e. dim != bits = {bits}")
            self.project_in = CosineLinear(self.dim, bits, cosine_projection)
        # plain straight-through unless projections or the spherical normalization surround it
        self.activation = straight_through_activation
        self.identity_gradient = (self.dim == bits and not self.spherical and self.input_clamp is None
                                  and (self.activation is None or isinstance(self.activation, nn.Identity)))

    # ------------------------------------------------------------------------------------------------------------

    def _powers(self, t: Tensor) -> Tensor:
        """(bits,) int64 place values 2^i (made on the fly: a state_dict holds only the projections)."""
        return 2 ** torch.arange(self.bits, dtype=torch.int64, device=t.device)

    def to_sphere(self, h: Tensor) -> Tensor:
        """(..., bits) -> h / ||h|| * codebook_scale when spherical (BSQ), else h unchanged."""
        return F.normalize(h, dim=-1) * self.codebook_scale if self.spherical else h

    def prepare(self, h: Tensor) -> Tensor:
        """Projected rows (..., bits) -> what the signs are taken of: soft-clamped (input_clamp), rotated (rotation),
        then on the sphere (spherical)."""
        if self.input_clamp is not None:
            h = (h / self.input_clamp).tanh() * self.input_clamp
        return self.to_sphere(self.rotate(h))

    def rotate(self, h: Tensor) -> Tensor:
        """(..., bits) -> h R (h unchanged without rotation)."""
        return h if self.rotation is None else h @ self.rotation.to(h.dtype)

    def rotate_back(self, codes: Tensor) -> Tensor:
        """(..., bits) -> codes R^T, the inverse of :meth:`rotate`: from the sign space back to the input's."""
        return codes if self.rotation is None else codes @ self.rotation.to(codes.dtype).T

    @property
    def code_value(self) -> float:
        """|c_i| of every code's every entry: codebook_scale, or codebook_scale / sqrt(bits) when spherical."""
        return self.codebook_scale / self.bits ** 0.5 if self.spherical else self.codebook_scale

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Indices (...) -> codes (..., bits) in {-scale, +scale} (on the sphere when spherical), in the space where
        the signs are taken: :meth:`rotate_back` them, then project out, for the output."""
        bits = (indices.unsqueeze(-1) & self._powers(indices)) != 0
        return self.to_sphere(torch.where(bits, self.codebook_scale, -self.codebook_scale).to(dtype))

    def bit_logits(self, h: Tensor) -> Tensor:
        """Projected rows (N, bits) (on the sphere when spherical) -> logits of p(bit = 1) under
        softmax(-||h - c||^2 / t): 4 c h / t with c the code value (every code has the same norm)."""
        return h * (4 * self.code_value / self.entropy.temperature)

    def entropy_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy, codebook entropy) of x's soft assignment, in nats (for monitoring)."""
        rows, _ = self._to_rows(x)
        logits = self.bit_logits(self.prepare(self.project_in(rows)))
        return per_sample_entropy(logits).mean(), codebook_entropy(logits, self.entropy.chunk_size)

    def _hard(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Projected rows (N, bits) -> (codes (N, bits), indices (N,))."""
        positive = h > 0
        codes = self.to_sphere(torch.where(positive, self.codebook_scale, -self.codebook_scale).to(h.dtype))
        return codes, (positive.long() * self._powers(h)).sum(-1)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = self.prepare(self.project_in(z))  # (N, bits)
        codes, indices = self._hard(h)
        through = h if self.activation is None else self.activation(h)
        quantized = self.project_out(self.rotate_back(straight_through(through, codes)))
        if mask is not None:  # masked-out rows take no part in the loss
            h, codes = h[mask], codes[mask]
        loss = z.new_zeros(())
        if h.shape[0] == 0:
            return quantized, indices, loss
        if self.commitment_weight:
            loss = loss + self.commitment_weight * F.mse_loss(h, codes)
        e = self.entropy
        if self.training and e.weight:
            logits = self.bit_logits(h)
            sample = per_sample_entropy(logits).mean()
            batch = codebook_entropy(logits, e.chunk_size) if e.codebook_weight else logits.new_zeros(())
            term = e.sample_weight * sample - e.codebook_weight * batch
            if e.softplus_offset is not None:
                term = F.softplus(term + e.softplus_offset)
            loss = loss + e.weight * term
        return quantized, indices, loss

    def _encode(self, z: Tensor) -> Tensor:
        h = self.project_in(z)
        return self._hard(h if self.rotation is None else self.prepare(h))[1]  # clamp and sphere keep the signs

    def _decode(self, indices: Tensor) -> Tensor:
        return self.project_out(self.rotate_back(self.indices_to_codes(indices)))

    def extra_repr(self) -> str:
        spherical = (", spherical=True" if self.spherical else "") + (", rotation=True" if self.rotation is not None
                                                                        else "")
        return f"bits={self.bits}, codebook_scale={self.codebook_scale}{spherical}, " + super().extra_repr()
