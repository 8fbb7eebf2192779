"""Vector quantization: each vector becomes its nearest codeword (VQ-VAE, van den Oord et al. 2017,
arXiv:1711.00937), with the training machinery that makes it work in practice.

- metric "l2", or "cosine" (codes and inputs l2-normalized: ViT-VQGAN, Yu et al. 2021, arXiv:2110.04627);
- ``codebook_dim``: a low-dimensional lookup with learned in / out projections (ViT-VQGAN's factorized codes);
- ``heads``: the (projected) vector is split into ``heads`` chunks, each quantized with the shared codebook;
- codebook trained by EMA (:class:`EMAConfig`) or by gradient (codebook loss), k-means init
  (:class:`KMeansInit`), dead-code revival (:class:`DeadCodeConfig`) -- all in :mod:`.codebook`;
- straight-through or rotation-trick gradients (:mod:`.gradients`), or DiVeQ's directional reparameterization
  (``gradient="diveq"``: the output is z plus the quantization error's length along a noised error direction, so the
  gradient reaches the code through that length; Vali et al., "DiVeQ: Differentiable Vector Quantization Using the
  Reparameterization Trick", openreview.net/forum?id=KRVnpTbx7R); optional stochastic code sampling;
- :meth:`VectorQuantizer.nearest`: the k nearest codes of every vector (the fused top-k search), with their errors,
  changing nothing (the residual quantizer's beam search is built on it).

Loss (canonical placement, beta on the encoder term): ``commitment_weight * ||z - sg(e)||^2`` plus, for a
gradient-trained codebook, ``codebook_weight * ||sg(z) - e||^2``; both are means over masked-in elements, measured in
the codebook space (after projection and normalization), where the search happens.

The one idea to hold: the search goes through ``nearest_codeword`` and every codebook statistic through
``index_add_``, so nothing of size N x K (distances, one-hot) is ever built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_quantizer
from .base import Quantizer
from .codebook import Codebook, DeadCodeConfig, EMAConfig, KMeansInit
from .gradients import rotation_trick, straight_through

__all__ = ["VectorQuantizer", "Sampling", "masked_mse"]

_GRADIENTS = ("straight_through", "rotation", "diveq")


@dataclass(frozen=True)
class Sampling:
    """Stochastic code choice in training: a code is drawn with probability softmax(-d / temperature) among the
    ``topk`` nearest (the rest of the codebook carries negligible mass at sensible temperatures, and restricting to
    the top k keeps the search free of an N x K matrix). Eval always takes the nearest code.
    Draws use the global torch RNG row by row, so a masked batch and its masked-in subset draw differently."""

    temperature: float = 1.0
    topk: int = 16

    def __post_init__(self):
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not 0 < self.temperature < float("inf"):
            raise ValueError(f"Sampling: temperature must be a finite positive number, got {self.temperature!r}")
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"Sampling: topk must be a positive int, got {self.topk!r}")


def directional_reparam(z: Tensor, codes: Tensor, variance: float, rows: Tensor | None = None) -> Tensor:
    """DiVeQ (openreview.net/forum?id=KRVnpTbx7R, figure 1): z + ||codes - z|| * sg(unit(codes - z + noise)), noise
    ~ N(0, variance) per element. With variance 0 the value is codes (up to rounding); the gradient reaches z (the
    identity minus the error direction's component) and codes (along the error direction). Shapes (M, D).

    Noise is drawn, in order, for the rows where ``rows`` (M,) bool is True only (all rows when None), so a masked
    batch and its masked-in subset draw the same noise."""
    error = codes - z
    if variance > 0:
        m = error.shape[0] if rows is None else int(rows.sum())
        draw = torch.randn(m, error.shape[1], device=error.device, dtype=error.dtype)
        noise = draw if rows is None else error.new_zeros(error.shape).masked_scatter(rows[:, None], draw)
        error_dir = error + math.sqrt(variance) * noise
    else:
        error_dir = error
    return z + F.normalize(error_dir, dim=-1).detach() * error.norm(dim=-1, keepdim=True)


def masked_mse(a: Tensor, b: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of (a - b)^2 over the rows (n, D) whose ``weight`` (n,) is 1 (all rows when None); 0 for no rows."""
    err = (a - b).square().sum(-1)  # (n,)
    if weight is None:
        return err.sum() / max(err.numel() * a.shape[-1], 1)
    return (err * weight).sum() / (weight.sum() * a.shape[-1]).clamp_min(1.0)


@register_quantizer("vq", example=dict(dim=8, codebook_size=16))
class VectorQuantizer(Quantizer):
    """Nearest-codeword quantizer with EMA or gradient codebook training.

    Args:
        dim: size of the input vectors.
        codebook_size: number of codes K.
        codebook_dim: size of each code; when ``heads * codebook_dim != dim``, learned linear projections map
            dim -> heads * codebook_dim and back (default: dim // heads, no projection).
        heads: chunks per vector, each quantized against the one shared codebook; indices are then (..., heads).
        metric: "l2" or "cosine" (inputs and codes l2-normalized; quantized is then a unit vector per head).
        ema: train the codebook by EMA (default ``EMAConfig()``); None trains it by gradient, with the codebook loss.
        commitment_weight: weight of the encoder (commitment) term.
        codebook_weight: weight of the codebook term (gradient training only).
        dead_code: revive codes whose usage falls below a threshold (None: off).
        kmeans_init: initialize the codebook by k-means on the first training vectors (None: random normal).
        gradient: "straight_through", "rotation" (the rotation trick, arXiv:2410.06424) or "diveq" (directional
            reparameterization; pair it with ``ema=None`` so the codebook learns from the output's gradient).
        diveq_variance: variance of DiVeQ's direction noise (>= 0; 0: no noise).
        sampling: stochastic code choice in training (None: always the nearest code).
        channel_first: x is (B, dim, *spatial).
    """

    may_skip_depths = False

    def __init__(self, dim: int, codebook_size: int, *, codebook_dim: int | None = None, heads: int = 1,
                 metric: str = "l2", ema: EMAConfig | None = EMAConfig(), commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0, dead_code: DeadCodeConfig | None = None,
                 kmeans_init: KMeansInit | None = None, gradient: str = "straight_through",
                 sampling: Sampling | None = None, channel_first: bool = False, diveq_variance: float = 5e-3):
        super().__init__(dim, codebook_size, channel_first)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"VectorQuantizer: heads must be a positive int, got {heads!r}")
        if codebook_dim is None:
            if dim % heads:
                raise ValueError(f"VectorQuantizer: heads={heads} must divide dim={dim} (or set codebook_dim)")
            codebook_dim = dim // heads
        if isinstance(codebook_dim, bool) or not isinstance(codebook_dim, int) or codebook_dim < 1:
            raise ValueError(f"VectorQuantizer: codebook_dim must be a positive int, got {codebook_dim!r}")
        if metric not in ("l2", "cosine"):
            raise ValueError(f"VectorQuantizer: metric must be 'l2' or 'cosine', got {metric!r}")
        if gradient not in _GRADIENTS:
            raise ValueError(f"VectorQuantizer: gradient must be one of {_GRADIENTS}, got {gradient!r}")
        for name, value in (("commitment_weight", commitment_weight), ("codebook_weight", codebook_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"VectorQuantizer: {name} must be a finite number >= 0, got {value!r}")
        if isinstance(diveq_variance, bool) or not isinstance(diveq_variance, (int, float)) \
                or not 0 <= diveq_variance < float("inf"):
            raise ValueError(f"VectorQuantizer: diveq_variance must be a finite number >= 0, got {diveq_variance!r}")
        if sampling is not None and not isinstance(sampling, Sampling):
            raise ValueError(f"VectorQuantizer: sampling must be a Sampling or None, got {type(sampling).__name__}")
        self.heads, self.codebook_dim, self.metric, self.gradient = heads, codebook_dim, metric, gradient
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.sampling = sampling
        self.diveq_variance = float(diveq_variance)
        inner = heads * codebook_dim
        self.project_in = nn.Linear(dim, inner) if inner != dim else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if inner != dim else nn.Identity()
        self.codebook = Codebook(codebook_size, codebook_dim, metric, ema, dead_code, kmeans_init)
        # d quantized / d x is the identity only for plain straight-through with nothing around the code choice.
        self.identity_gradient = gradient == "straight_through" and inner == dim and metric == "l2"

    @property
    def num_indices(self) -> int:
        return self.heads

    # ------------------------------------------------------------------------------------------------------------

    def _to_codes_space(self, z: Tensor) -> Tensor:
        """(N, dim) -> (N * heads, codebook_dim): projected, split into heads, normalized for cosine."""
        h = self.project_in(z).reshape(-1, self.codebook_dim)
        return F.normalize(h, dim=-1) if self.metric == "cosine" else h

    def _from_codes_space(self, q: Tensor) -> Tensor:
        """(N * heads, codebook_dim) -> (N, dim)."""
        return self.project_out(q.reshape(-1, self.heads * self.codebook_dim))

    def _choose(self, h: Tensor) -> Tensor:
        """Code index of every row of h (M, codebook_dim) -> (M,): nearest, or sampled in training."""
        if self.sampling is None or not self.training:
            return self.codebook.search(h).indices
        k = min(self.sampling.topk, self.codebook_size)
        candidates, dist = self.codebook.search(h, k)  # (M, k) each
        if k == 1:
            return candidates.reshape(-1)
        probs = torch.softmax(-dist / self.sampling.temperature, dim=-1)  # (M, k)
        pick = torch.multinomial(probs, 1)  # (M, 1)
        return candidates.gather(1, pick).reshape(-1)

    def _quantize(self, z: Tensor, mask: Tensor | None, indices: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """``indices`` (N * heads,), when given, are the codes to use instead of the nearest ones (a residual beam
        search chose them); loss, gradient and codebook update follow them."""
        h = self._to_codes_space(z)  # (M, C) with M = N * heads, C = codebook_dim
        row_mask = None if mask is None else mask.repeat_interleave(self.heads)  # (M,)
        if self.training:
            valid = h.detach() if row_mask is None else h.detach()[row_mask]  # (m, C)
            self.codebook.prepare(valid)  # k-means once enough vectors were seen (no-op afterwards)
        indices = self._choose(h) if indices is None else indices.reshape(-1)  # (M,)
        codes = self.codebook.lookup(indices)  # (M, C), differentiable when the codebook is a Parameter
        weight = None if row_mask is None else row_mask.to(h.dtype)
        loss = self.commitment_weight * masked_mse(h, codes.detach(), weight)
        if self.codebook.ema is None:
            loss = loss + self.codebook_weight * masked_mse(h.detach(), codes, weight)
        out = self._estimate(h, codes, row_mask)
        if self.training:
            ind_valid = indices if row_mask is None else indices[row_mask]
            self.codebook.update(valid, ind_valid)
        return self._from_codes_space(out), indices.reshape(-1, self.heads).squeeze(-1), loss

    def _estimate(self, h: Tensor, codes: Tensor, rows: Tensor | None = None) -> Tensor:
        """The codes (M, C) in the forward pass, with the configured gradient to h (M, C) (and, for DiVeQ, to a
        gradient-trained codebook). DiVeQ's noise (drawn for the masked-in ``rows`` only) is a training device: in
        eval the codes come back exactly."""
        if self.gradient == "rotation":
            return rotation_trick(h, codes)
        if self.gradient == "diveq" and self.training:
            return directional_reparam(h, codes, self.diveq_variance, rows)
        return straight_through(h, codes)

    def _candidates(self, z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The k nearest codes of z (N, dim), nearest first: (codes (N, k, dim) with the gradient estimator from z,
        indices (N, k), squared error (N, k) in the codebook space, mean over its elements). Needs heads == 1;
        changes nothing. The error keeps its graph to z (and to a gradient-trained codebook): a commitment term."""
        h = self._to_codes_space(z)  # (N, C)
        k = min(k, self.codebook_size)
        indices = self.codebook.search(h, k).indices.reshape(h.shape[0], k)  # (N, k), the fused top-k search
        codes = self.codebook.lookup(indices.reshape(-1))  # (N k, C)
        h_rep = h.repeat_interleave(k, dim=0)  # (N k, C)
        error = (h_rep - codes).square().mean(-1).reshape(-1, k)  # (N, k)
        out = self._from_codes_space(self._estimate(h_rep, codes))  # (N k, dim)
        return out.reshape(-1, k, self.dim), indices, error

    def nearest(self, x: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The k nearest codes of every vector of x, nearest first, changing nothing (no EMA, no k-means):
        ``(codes (..., k, dim), indices (..., k) int64, error (..., k))`` with error the mean squared quantization
        error in the codebook space (differentiable: a per-candidate commitment term). Channel-first x gives
        codes (B, dim, *spatial, k). Built on the fused top-k search: nothing of size N x K is formed."""
        if self.heads != 1:
            raise ValueError(f"VectorQuantizer.nearest: needs heads == 1, got heads={self.heads}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"VectorQuantizer.nearest: k must be a positive int, got {k!r}")
        rows, shape = self._to_rows(x)
        k = min(k, self.codebook_size)
        codes, indices, error = self._candidates(rows, k)
        codes = codes.reshape(*shape[:-1], k, self.dim).to(x.dtype)
        if self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes, indices.reshape(*shape[:-1], k), error.float().reshape(*shape[:-1], k)

    def _encode(self, z: Tensor) -> Tensor:
        indices = self.codebook.search(self._to_codes_space(z)).indices  # (N * heads,)
        return indices.reshape(-1, self.heads).squeeze(-1)

    def _decode(self, indices: Tensor) -> Tensor:
        codes = self.codebook.lookup(indices.reshape(-1))  # (N * heads, C)
        return self._from_codes_space(codes)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, codebook_dim={self.codebook_dim}, heads={self.heads}, "
                f"metric={self.metric!r}, gradient={self.gradient!r}")
