"""SimVQ: a frozen random codebook reparameterized by one learned linear layer (Zhu et al. 2024, "Addressing
Representation Collapse in Vector Quantized Models with One Linear Layer", arXiv:2411.02038).

The codebook is never a free parameter: C (K, F) is a frozen Gaussian draw and the codes are C W^T, with W (dim, F)
learned (any module mapping (K, F) -> (K, dim) may stand in for the linear layer). A gradient step on W moves the
whole codebook at once, so codes that no latent selects still follow the ones that are selected, and the codebook
does not collapse onto a few codes as a plain VQ codebook does.

Loss (the paper's, eq. 5): ``codebook_weight * ||sg(z) - q||^2 + commitment_weight * ||z - sg(q)||^2``, q the
chosen row of C W^T; the first term is the only one that trains W. Gradients to z cross the code choice by the
rotation trick (Fifty et al. 2024, arXiv:2410.06424; the peer library's default for SimVQ) or straight-through.

The one idea to hold: the implicit codebook C W^T (K x dim, cheap) is rebuilt on every call, searched with
``nearest_codeword`` (nothing N x K is built), and the chosen rows are gathered from that same tensor, so forward
and ``decode`` give bitwise the same codes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import nearest_codeword
from ._registry import register_quantizer
from .base import Quantizer
from .gradients import rotation_trick, straight_through
from .vq import masked_mse

__all__ = ["SimVQ"]

_GRADIENTS = ("rotation", "straight_through")


def _check_weight(owner: str, name: str, value) -> float:
    """A finite number >= 0, as float (raises ValueError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


@register_quantizer("simvq", example=dict(dim=8, codebook_size=16))
class SimVQ(Quantizer):
    """Nearest code in C W^T, C a frozen (K, frozen_dim) Gaussian, W learned.

    Args:
        dim: size of the input vectors (and of the codes).
        codebook_size: number of codes K.
        frozen_dim: columns F of the frozen codebook (default: dim).
        codebook_transform: module mapping the frozen (K, F) codebook to (K, dim) (default: ``nn.Linear(F, dim,
            bias=False)``, the paper's W).
        frozen_init: applied once to the frozen draw (K, F), e.g. to rescale it (default: N(0, 1 / F) entries).
        codebook_weight: weight of ||sg(z) - q||^2, the term that trains the transform.
        commitment_weight: weight of ||z - sg(q)||^2, the encoder term.
        gradient: "rotation" (the rotation trick) or "straight_through".
        channel_first: x is (B, dim, *spatial).
    """

    may_skip_depths = False

    def __init__(self, dim: int, codebook_size: int, *, frozen_dim: int | None = None,
                 codebook_transform: nn.Module | None = None, frozen_init: Callable[[Tensor], Tensor] | None = None,
                 codebook_weight: float = 1.0, commitment_weight: float = 0.25, gradient: str = "rotation",
                 channel_first: bool = False):
        super().__init__(dim, codebook_size, channel_first)
        frozen_dim = dim if frozen_dim is None else frozen_dim
        if isinstance(frozen_dim, bool) or not isinstance(frozen_dim, int) or frozen_dim < 1:
            raise ValueError(f"SimVQ: frozen_dim must be a positive int, got {frozen_dim!r}")
        if gradient not in _GRADIENTS:
            raise ValueError(f"SimVQ: gradient must be one of {_GRADIENTS}, got {gradient!r}")
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise ValueError(f"SimVQ: codebook_transform must be an nn.Module, got {type(codebook_transform).__name__}")
        self.codebook_weight = _check_weight("SimVQ", "codebook_weight", codebook_weight)
        self.commitment_weight = _check_weight("SimVQ", "commitment_weight", commitment_weight)
        self.frozen_dim, self.gradient = frozen_dim, gradient
        frozen = torch.randn(codebook_size, frozen_dim) * frozen_dim ** -0.5  # (K, F)
        if frozen_init is not None:
            frozen = frozen_init(frozen)
        if not isinstance(frozen, Tensor) or tuple(frozen.shape) != (codebook_size, frozen_dim):
            raise ValueError(f"SimVQ: frozen_init must return a tensor of shape ({codebook_size}, {frozen_dim}), got "
                             f"{tuple(frozen.shape) if isinstance(frozen, Tensor) else type(frozen).__name__}")
        self.register_buffer("frozen_codebook", frozen.detach().float().contiguous())  # saved, never trained
        self.codebook_transform = codebook_transform if codebook_transform is not None \
            else nn.Linear(frozen_dim, dim, bias=False)
        with torch.no_grad():
            shape = tuple(self.codebook_transform(self.frozen_codebook).shape)
        if shape != (codebook_size, dim):
            raise ValueError(f"SimVQ: codebook_transform must map ({codebook_size}, {frozen_dim}) to "
                             f"({codebook_size}, {dim}), it gives {shape}")
        self.identity_gradient = gradient == "straight_through"

    def implicit_codebook(self) -> Tensor:
        """C W^T: (K, dim), differentiable w.r.t. the transform."""
        return self.codebook_transform(self.frozen_codebook)

    # ------------------------------------------------------------------------------------------------------------

    def _codes(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(indices (N,), codes (N, dim) differentiable w.r.t. the transform) of the rows of z (N, dim)."""
        codebook = self.implicit_codebook().to(z.dtype)  # (K, dim)
        indices = nearest_codeword(z.detach(), codebook.detach()).indices  # (N,)
        return indices, F.embedding(indices, codebook)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        indices, codes = self._codes(z)
        weight = None if mask is None else mask.to(z.dtype)
        loss = (self.codebook_weight * masked_mse(z.detach(), codes, weight)
                + self.commitment_weight * masked_mse(z, codes.detach(), weight))
        out = rotation_trick(z, codes) if self.gradient == "rotation" else straight_through(z, codes)
        return out, indices, loss

    def _encode(self, z: Tensor) -> Tensor:
        with torch.no_grad():
            return nearest_codeword(z, self.implicit_codebook().to(z.dtype)).indices

    def _decode(self, indices: Tensor) -> Tensor:
        return F.embedding(indices, self.implicit_codebook())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, frozen_dim={self.frozen_dim}, gradient={self.gradient!r}"
