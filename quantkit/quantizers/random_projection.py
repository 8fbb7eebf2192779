"""Random-projection quantizer, BEST-RQ (Chiu et al. 2022, "Self-supervised Learning with Random-projection
Quantizer for Speech Recognition", arXiv:2202.01855).

Nothing here is trained: each input vector is standardized (zero mean, unit variance over its channels, the
paper's guard against collapse), multiplied by a frozen Xavier-initialized random matrix to ``codebook_dim``
channels, and matched by cosine similarity against a frozen codebook of unit vectors drawn from a standard normal.
The indices are the targets of masked prediction; ``heads`` independent projections and codebooks give several
targets per vector (the paper's multi-codebook variant).

What ``quantized`` is: a quantizer returns a vector in x's space, and BEST-RQ only defines indices, so quantized is
the smallest vector whose projection is exactly the chosen (unit) codes, ``A^+ (c - b)`` with A the (heads *
codebook_dim, dim) projection and ``A^+`` its pseudo-inverse, passed straight-through. The loss is always zero.

The one idea to hold: the search is ``nearest_codeword`` with the cosine metric per head, so nothing of size N x K is
built; only :meth:`RandomProjectionQuantizer.similarities`, the logits of a cross-entropy on given targets, is
N x K, and it is computed on request.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import nearest_codeword
from ._registry import register_quantizer
from .base import Quantizer
from .gradients import straight_through

__all__ = ["RandomProjectionQuantizer"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"RandomProjectionQuantizer: {name} must be a positive int, got {value!r}")
    return value


@register_quantizer("random_projection", example=dict(dim=8, codebook_size=16, codebook_dim=4))
class RandomProjectionQuantizer(Quantizer):
    """Frozen random projection + frozen random unit codebook, nearest by cosine; indices (..., heads) when
    heads > 1.

    Args:
        dim: size of the input vectors.
        codebook_size: codes per head K.
        codebook_dim: channels of the projection (the paper's 16).
        heads: independent (projection, codebook) pairs.
        normalize: standardize each vector over its channels first (a LayerNorm without affine parameters).
        projection_bias: a frozen (heads, codebook_dim) offset after the projection (zero at init; a loaded affine
            projection fills it).
        seed: seeds the projection and the codebook (default: the global torch RNG).
        channel_first: x is (B, dim, *spatial).
    """

    may_skip_depths = False
    identity_gradient = True

    def __init__(self, dim: int, codebook_size: int, codebook_dim: int, *, heads: int = 1, normalize: bool = True,
                 projection_bias: bool = False, seed: int | None = None, channel_first: bool = False):
        super().__init__(dim, codebook_size, channel_first)
        self.codebook_dim = _positive_int("codebook_dim", codebook_dim)
        self.heads = _positive_int("heads", heads)
        self.normalize = bool(normalize)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        projection = torch.empty(heads, dim, codebook_dim)  # (h, dim, e)
        if gen is None:
            nn.init.xavier_normal_(projection)
        else:  # xavier_normal_'s std, from a private generator
            std = (2.0 / (dim * codebook_dim + heads * codebook_dim)) ** 0.5
            projection = torch.randn(heads, dim, codebook_dim, generator=gen) * std
        codebook = F.normalize(torch.randn(heads, codebook_size, codebook_dim, generator=gen), dim=-1)  # (h, K, e)
        self.register_buffer("projection", projection)
        self.register_buffer("projection_bias", torch.zeros(heads, codebook_dim) if projection_bias else None)
        self.register_buffer("codebook", codebook)

    @property
    def num_indices(self) -> int:
        return self.heads

    # ------------------------------------------------------------------------------------------------------------

    def project(self, z: Tensor) -> Tensor:
        """Rows (N, dim) -> standardized and projected (N, heads, codebook_dim)."""
        if self.normalize:
            z = F.layer_norm(z, (self.dim,))
        p = torch.einsum("nd,hde->nhe", z, self.projection.to(z.dtype))
        return p if self.projection_bias is None else p + self.projection_bias.to(z.dtype)

    def _search(self, z: Tensor) -> Tensor:
        p = self.project(z.detach())  # (N, h, e)
        indices = [nearest_codeword(p[:, h], self.codebook[h].to(p.dtype), "cosine").indices for h in range(self.heads)]
        return torch.stack(indices, dim=-1)  # (N, h)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        indices = self._search(z)
        lifted = self._lift(indices).to(z.dtype)  # (N, dim)
        out_indices = indices.squeeze(-1) if self.heads == 1 else indices
        return straight_through(z, lifted), out_indices, z.new_zeros(())

    def _encode(self, z: Tensor) -> Tensor:
        indices = self._search(z)
        return indices.squeeze(-1) if self.heads == 1 else indices

    def _decode(self, indices: Tensor) -> Tensor:
        return self._lift(indices.reshape(-1, self.heads))

    def _lift(self, indices: Tensor) -> Tensor:
        """(N, heads) indices -> (N, dim): the least-norm vector whose projection is the chosen codes."""
        codes = torch.stack([self.codebook[h][indices[:, h]] for h in range(self.heads)], dim=1)  # (N, h, e)
        if self.projection_bias is not None:
            codes = codes - self.projection_bias
        matrix = self.projection.permute(1, 0, 2).reshape(self.dim, -1)  # (dim, h * e): p = z @ matrix
        flat = codes.reshape(indices.shape[0], self.heads * self.codebook_dim)  # (N, h * e)
        return flat @ torch.linalg.pinv(matrix)  # (N, dim)

    def similarities(self, x: Tensor) -> Tensor:
        """Cosine similarities (..., heads, K) of x (in x's layout, channels first when channel_first) to every
        code: the logits of a cross-entropy on given target indices. N x K: for losses, never for the search."""
        rows, shape = self._to_rows(x)
        p = F.normalize(self.project(rows), dim=-1, eps=1e-6)  # (N, h, e)
        sims = torch.einsum("nhe,hke->nhk", p, self.codebook.to(p.dtype))
        return sims.reshape(*shape[:-1], self.heads, self.codebook_size)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, codebook_dim={self.codebook_dim}, heads={self.heads}, "
                f"normalize={self.normalize}")
