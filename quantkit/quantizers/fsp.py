"""Finite scalar perturbation, FSP (the quantizer of VP-VAE, arXiv:2602.17133; as released in
vector-quantize-pytorch 1.32).

FSQ's implicit grid, reached through a CDF instead of a bound: each of ``len(levels)`` channels is mapped into
[0, 1] by a cumulative distribution function (tanh, sigmoid, normal, Laplace or Cauchy), and [0, 1] is cut into
``levels[i]`` equal bins. The code is the bin's midpoint (k + 1/2) / L, read back either linearly, rescaled to unit
variance ((p - 1/2) * sqrt(12)), or through the inverse CDF. The index reads the bin numbers as a mixed-radix number
(channel 0 least significant), as FSQ's does.

The one idea to hold: in training the rounding is replaced by a perturbation. With probability
``1 - quantize_rate`` per element, the code is the CDF value plus noise uniform over one bin, U(-1/(2L), 1/(2L)) (a
proposal leaving (0, 1) keeps the CDF value): the decoder learns to read values anywhere near the bin's midpoint,
and the encoder gets the CDF's gradient. The index is always the bin's (the perturbation never changes a code choice)
and eval always rounds, so encode and decode are those of the plain grid.

A moment-matching loss (:class:`MomentLoss`) pulls the batch's per-channel mean, variance, skewness and kurtosis of
the projected vectors towards targets, so that the CDF spreads them evenly over the bins; it is computed in
training and eval (over unmasked rows; zero for fewer than two).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._registry import register_quantizer
from .base import Quantizer
from .fsq import _check_levels
from .gradients import straight_through
from .projection import projections

__all__ = ["FSP", "MomentLoss", "moment_statistics", "CDFS", "MOMENT_PRESETS"]

_SQRT2 = math.sqrt(2.0)
#: Standard deviation of U(0, 1), 1 / sqrt(12): the linear read-out divides by it, so the codes have unit variance.
_UNIFORM_STD = 0.28867513459481287


def _laplace_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z))))


def _laplace_icdf(p: Tensor) -> Tensor:
    return -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * torch.abs(p - 0.5))


#: name -> (CDF: R -> [0, 1], its inverse: (0, 1) -> R). The arithmetic is the peer's, so bins agree to the bit.
CDFS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (lambda z: (torch.tanh(z) + 1.0) / 2.0, lambda p: torch.atanh(p * 2.0 - 1.0)),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (lambda z: (1.0 + torch.erf(z / _SQRT2)) / 2.0, lambda p: torch.erfinv(2.0 * p - 1.0) * _SQRT2),
    "laplace": (_laplace_cdf, _laplace_icdf),
    "cauchy": (lambda z: torch.atan(z) / math.pi + 0.5, lambda p: torch.tan((p - 0.5) * math.pi)),
}


def moment_statistics(h: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel (mean, unbiased variance, skewness, excess kurtosis) of rows h (N, d), each (d,); N >= 2."""
    variance, mean = torch.var_mean(h, dim=0, unbiased=True)
    standard = (h - mean) / variance.sqrt().clamp_min(eps)  # (N, d)
    return mean, variance, standard.pow(3).mean(0), standard.pow(4).mean(0) - 3.0


@dataclass
class MomentLoss:
    """sum_k weight_k * mean_channels (moment_k - target_k)^2 over the batch's per-channel moments (k = mean,
    variance, skewness, excess kurtosis). ``MomentLoss.preset(name)`` gives the peer's presets: "none", "var",
    "kurt", "var_tanh" (FSP's default: variance 0.8225 for the tanh CDF), "var_sigmoid", "var_laplace"."""

    mean_target: float = 0.0
    mean_weight: float = 0.1
    variance_target: float = 1.0
    variance_weight: float = 0.07
    skewness_target: float = 0.0
    skewness_weight: float = 0.06
    kurtosis_target: float = 0.0
    kurtosis_weight: float = 0.05
    eps: float = 1e-8

    @classmethod
    def preset(cls, name: str) -> "MomentLoss":
        if name not in MOMENT_PRESETS:
            raise ValueError(f"MomentLoss: preset must be one of {sorted(MOMENT_PRESETS)}, got {name!r}")
        return cls(**MOMENT_PRESETS[name])

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self) if f.name.endswith("_weight"))

    def __call__(self, h: Tensor) -> Tensor:
        """Rows h (N, d) -> the weighted loss (scalar); zero for N < 2 (no variance to measure)."""
        if h.shape[0] < 2 or not self.enabled:
            return h.new_zeros(())
        mean, variance, skewness, kurtosis = moment_statistics(h, self.eps)
        return ((mean - self.mean_target).square().mean() * self.mean_weight
                + (variance - self.variance_target).square().mean() * self.variance_weight
                + (skewness - self.skewness_target).square().mean() * self.skewness_weight
                + (kurtosis - self.kurtosis_target).square().mean() * self.kurtosis_weight)


_NO_HIGHER = dict(skewness_weight=0.0, kurtosis_weight=0.0)
#: The peer's VectorNorm presets, as MomentLoss fields.
MOMENT_PRESETS: dict[str, dict[str, float]] = {
    "none": dict(mean_weight=0.0, variance_weight=0.0, **_NO_HIGHER),
    "var": dict(**_NO_HIGHER),
    "kurt": dict(),
    "var_tanh": dict(variance_target=0.8225, **_NO_HIGHER),
    "var_sigmoid": dict(variance_target=3.29, **_NO_HIGHER),
    "var_laplace": dict(variance_target=2.0, **_NO_HIGHER),
}


@register_quantizer("fsp", example=dict(dim=3, levels=(5, 4, 3)))
class FSP(Quantizer):
    """FSP with ``levels`` bins per channel; ``codebook_size = prod(levels)``.

    Args:
        levels: bins per channel, each >= 2.
        dim: input size; learned linear projections map dim <-> len(levels) when they differ (default len(levels)).
        cdf: one of ``CDFS``: "tanh" (default), "sigmoid", "normal", "laplace", "cauchy".
        quantize_rate: share of elements rounded to their bin in training, in [0, 1]; the others are perturbed
            (module docstring). 0 (the default, as in the peer) perturbs every element; eval always rounds.
        invert_cdf: read codes back through the inverse CDF (then d quantized / d z is the identity), instead of
            the linear unit-variance read-out (whose gradient is the CDF's derivative times sqrt(12)).
        moments: :class:`MomentLoss`, a preset name, or a dict of its fields (default "var_tanh").
        eps: the CDF value is clamped below 1 - eps before binning (None: the compute dtype's machine epsilon).
        channel_first: x is (B, dim, *spatial).
    """

    may_skip_depths = False

    def __init__(self, levels: Sequence[int], dim: int | None = None, cdf: str = "tanh", quantize_rate: float = 0.0,
                 invert_cdf: bool = False, moments: MomentLoss | str | dict = "var_tanh", eps: float | None = None,
                 channel_first: bool = False, projection_bias: bool = True):
        levels = _check_levels(levels)
        if cdf not in CDFS:
            raise ValueError(f"FSP: cdf must be one of {sorted(CDFS)}, got {cdf!r}")
        if isinstance(quantize_rate, bool) or not isinstance(quantize_rate, (int, float)) \
                or not 0.0 <= quantize_rate <= 1.0:
            raise ValueError(f"FSP: quantize_rate must be a probability in [0, 1], got {quantize_rate!r}")
        if eps is not None and not 0.0 < eps < 1.0:
            raise ValueError(f"FSP: eps must lie in (0, 1), got {eps!r}")
        super().__init__(len(levels) if dim is None else dim, math.prod(levels), channel_first)
        self.levels = tuple(levels)
        self._basis = [math.prod(levels[:i]) for i in range(len(levels))]  # mixed-radix place values
        self.cdf_name = cdf
        self.cdf, self.inverse_cdf = CDFS[cdf]
        self.quantize_rate = float(quantize_rate)
        self.invert_cdf = bool(invert_cdf)
        self.moments = (MomentLoss.preset(moments) if isinstance(moments, str)
                        else moments if isinstance(moments, MomentLoss) else MomentLoss(**moments))
        self.eps = eps
        self.project_in, self.project_out = projections(self.dim, len(levels), projection_bias)
        self.identity_gradient = self.invert_cdf and self.dim == len(levels)
        self._accept_rate: Tensor | None = None
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def _constants(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(levels (d,) in t's dtype, basis (d,) int64) on t's device, made once per (device, dtype) rather than kept
        as buffers (they follow from ``levels``; a state_dict holds only the projections)."""
        key = (t.device, t.dtype)
        if key not in self._cache:
            self._cache[key] = (torch.tensor(self.levels, dtype=t.dtype, device=t.device),
                                torch.tensor(self._basis, dtype=torch.int64, device=t.device))
        return self._cache[key]

    def _eps(self, t: Tensor) -> float:
        return self.eps if self.eps is not None else torch.finfo(t.dtype).eps

    # ------------------------------------------------------------------------------------------------------------

    def bins(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Projected rows (..., d) -> (CDF values p in [0, 1], bin numbers floor(min(p, 1 - eps) * L) as floats)."""
        p = self.cdf(h)
        return p, (p.clamp_max(1.0 - self._eps(h)) * self._constants(h)[0]).floor()

    def read_out(self, p: Tensor) -> Tensor:
        """Values in (0, 1) (bin midpoints, or perturbed CDF values) -> codes, by the inverse CDF or linearly."""
        if self.invert_cdf:
            eps = self._eps(p)
            return self.inverse_cdf(p.clamp(eps, 1.0 - eps))
        return (p - 0.5) / _UNIFORM_STD

    def digits_to_indices(self, digits: Tensor) -> Tensor:
        """Bin numbers (..., d) -> mixed-radix indices (...) int64."""
        return (digits.long() * self._constants(digits.float())[1]).sum(-1)

    def indices_to_digits(self, indices: Tensor) -> Tensor:
        """Indices (...) -> bin numbers (..., d) int64."""
        levels, basis = self._constants(indices.float())
        return torch.div(indices.unsqueeze(-1), basis, rounding_mode="floor") % levels.long()

    def indices_to_codes(self, indices: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Indices (...) -> codes (..., d), before the output projection."""
        digits = self.indices_to_digits(indices).to(dtype)
        return self.read_out((digits + 0.5) / self._constants(digits)[0])

    def _perturb(self, p: Tensor, midpoints: Tensor, mask: Tensor | None) -> Tensor:
        """Training: each element keeps its midpoint with probability quantize_rate, else takes p + U(-1/2L, 1/2L)
        (p itself when that leaves (0, 1)). Only masked-in rows draw, the noise first, then the choice."""
        levels = self._constants(p)[0]
        m = p.shape[0] if mask is None else int(mask.sum())
        noise = torch.rand(m, p.shape[1], dtype=p.dtype, device=p.device)  # (m, d)
        choice = torch.rand(m, p.shape[1], dtype=p.dtype, device=p.device)
        if mask is not None:  # masked-out rows: no noise, never substituted
            rows = mask[:, None].expand_as(p)
            noise = torch.full_like(p, 0.5).masked_scatter(rows, noise)
            choice = torch.zeros_like(p).masked_scatter(rows, choice)
        proposal = p + (1.0 / (levels * 2)) * (noise * 2.0 - 1.0)  # the peer's operation order, to the bit
        accept = (proposal > 0.0) & (proposal < 1.0)
        kept = accept if mask is None else accept[mask]
        self._accept_rate = kept.float().mean() if kept.numel() else p.new_zeros(())
        return torch.where(choice > self.quantize_rate, torch.where(accept, proposal, p), midpoints)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = self.project_in(z)  # (N, d)
        loss = self.moments(h if mask is None else h[mask])
        p, digits = self.bins(h)  # (N, d), (N, d)
        q = straight_through(p, (digits + 0.5) / self._constants(h)[0])  # bin midpoints, the CDF's gradient
        if self.training and self.quantize_rate < 1.0:
            q = self._perturb(p, q, mask)
        codes = straight_through(h, self.read_out(q)) if self.invert_cdf else self.read_out(q)
        return self.project_out(codes), self.digits_to_indices(digits), loss

    def forward(self, x: Tensor, mask: Tensor | None = None):
        """As :meth:`Quantizer.forward`; in training with perturbation, ``stats["accept_rate"]`` is the share of
        perturbation proposals that stayed inside (0, 1)."""
        self._accept_rate = None
        out = super().forward(x, mask)
        if self._accept_rate is not None:
            out.stats["accept_rate"] = self._accept_rate.detach()
            self._accept_rate = None
        return out

    def _encode(self, z: Tensor) -> Tensor:
        return self.digits_to_indices(self.bins(self.project_in(z))[1])

    def _decode(self, indices: Tensor) -> Tensor:
        return self.project_out(self.indices_to_codes(indices))

    def extra_repr(self) -> str:
        return (f"levels={self.levels}, cdf={self.cdf_name!r}, quantize_rate={self.quantize_rate}, "
                f"invert_cdf={self.invert_cdf}, " + super().extra_repr())
