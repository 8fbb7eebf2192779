"""Vector quantization: each vector becomes its nearest codeword (VQ-VAE, van den Oord et al. 2017,
arXiv:1711.00937), with the training machinery that makes it work in practice.

- metric "l2", or "cosine" (codes and inputs l2-normalized: ViT-VQGAN, Yu et al. 2021, arXiv:2110.04627);
- ``codebook_dim``: a low-dimensional lookup with learned in / out projections (ViT-VQGAN's factorized codes);
- ``heads``: the (projected) vector is split into ``heads`` chunks, each quantized with the shared codebook;
- codebook trained by EMA (:class:`EMAConfig`) or by gradient (codebook loss), k-means init
  (:class:`KMeansInit`), dead-code revival (:class:`DeadCodeConfig`) -- all in :mod:`.codebook`;
- straight-through or rotation-trick gradients (:mod:`.gradients`); optional stochastic code sampling.

Loss (canonical placement, beta on the encoder term): ``commitment_weight * ||z - sg(e)||^2`` plus, for a
gradient-trained codebook, ``codebook_weight * ||sg(z) - e||^2``; both are means over masked-in elements, measured in
the codebook space (after projection and normalization), where the search happens.

The one idea to hold: the search goes through ``nearest_codeword`` and every codebook statistic through
``index_add_``, so nothing of size N x K (distances, one-hot) is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_quantizer
from .base import Quantizer
from .codebook import Codebook, DeadCodeConfig, EMAConfig, KMeansInit
from .gradients import rotation_trick, straight_through

__all__ = ["VectorQuantizer", "Sampling", "masked_mse"]

_GRADIENTS = ("straight_through", "rotation")


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
        gradient: "straight_through" or "rotation" (the rotation trick, arXiv:2410.06424).
        sampling: stochastic code choice in training (None: always the nearest code).
        channel_first: x is (B, dim, *spatial).
    """

    may_skip_depths = False

    def __init__(self, dim: int, codebook_size: int, *, codebook_dim: int | None = None, heads: int = 1,
                 metric: str = "l2", ema: EMAConfig | None = EMAConfig(), commitment_weight: float = 0.25,
                 codebook_weight: float = 1.0, dead_code: DeadCodeConfig | None = None,
                 kmeans_init: KMeansInit | None = None, gradient: str = "straight_through",
                 sampling: Sampling | None = None, channel_first: bool = False):
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
        if sampling is not None and not isinstance(sampling, Sampling):
            raise ValueError(f"VectorQuantizer: sampling must be a Sampling or None, got {type(sampling).__name__}")
        self.heads, self.codebook_dim, self.metric, self.gradient = heads, codebook_dim, metric, gradient
        self.commitment_weight, self.codebook_weight = float(commitment_weight), float(codebook_weight)
        self.sampling = sampling
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

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        h = self._to_codes_space(z)  # (M, C) with M = N * heads, C = codebook_dim
        row_mask = None if mask is None else mask.repeat_interleave(self.heads)  # (M,)
        if self.training:
            valid = h.detach() if row_mask is None else h.detach()[row_mask]  # (m, C)
            self.codebook.prepare(valid)  # k-means once enough vectors were seen (no-op afterwards)
        indices = self._choose(h)  # (M,)
        codes = self.codebook.lookup(indices)  # (M, C), differentiable when the codebook is a Parameter
        weight = None if row_mask is None else row_mask.to(h.dtype)
        loss = self.commitment_weight * masked_mse(h, codes.detach(), weight)
        if self.codebook.ema is None:
            loss = loss + self.codebook_weight * masked_mse(h.detach(), codes, weight)
        if self.gradient == "rotation":
            out = rotation_trick(h, codes)
        else:
            out = straight_through(h, codes)
        if self.training:
            ind_valid = indices if row_mask is None else indices[row_mask]
            self.codebook.update(valid, ind_valid)
        return self._from_codes_space(out), indices.reshape(-1, self.heads).squeeze(-1), loss

    def _encode(self, z: Tensor) -> Tensor:
        indices = self.codebook.search(self._to_codes_space(z)).indices  # (N * heads,)
        return indices.reshape(-1, self.heads).squeeze(-1)

    def _decode(self, indices: Tensor) -> Tensor:
        codes = self.codebook.lookup(indices.reshape(-1))  # (N * heads, C)
        return self._from_codes_space(codes)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, codebook_dim={self.codebook_dim}, heads={self.heads}, "
                f"metric={self.metric!r}, gradient={self.gradient!r}")
