"""Grouped quantization: the channels split into groups, each quantized by its own quantizer (group-residual VQ,
HiFi-Codec, Yang et al. 2023, arXiv:2305.02765; grouped residual FSQ / LFQ as in vector-quantize-pytorch).

x (..., dim) is cut into ``groups`` contiguous chunks of dim / groups channels; group g is quantized by its own
instance of any registered quantizer (typically a residual stack: "residual" with an inner "vq", "fsq" or "lfq"),
and the outputs are concatenated back in channel order.

The one idea to hold: ``indices`` are (..., groups * M) with M the inner quantizer's indices per vector, group-major
(column g * M + m is group g's column m), so a grouped residual quantizer's indices reshape to (..., groups, depth)
and every column is an ordinary index of its group's quantizer (-1 marks a depth skipped by quantize-dropout).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._registry import create_quantizer, register_quantizer
from .base import Quantizer

__all__ = ["GroupedQuantizer"]


@register_quantizer("grouped", example=dict(dim=6, groups=2, quantizer="residual",
                                            quantizer_kwargs=dict(quantizer="fsq", depth=2, levels=(5, 4, 3),
                                                                  layer_scale=0.25)))
class GroupedQuantizer(Quantizer):
    """``groups`` independent quantizers, one per contiguous chunk of dim / groups channels.

    Args:
        dim: vector size; ``groups`` must divide it.
        groups: number of channel groups G >= 1.
        quantizer: registered name of each group's quantizer ("residual", "fsq", "lfq", "vq", ...).
        quantizer_kwargs: its keywords (``dim`` is dim / groups and is set here).
        channel_first: x is (B, dim, *spatial).
        loss_reduction: "sum" (default) or "mean" of the groups' losses ("mean" is LFQ with several codebooks in
            vector-quantize-pytorch: each term there is a mean over the codebooks).

    ``indices`` are (..., groups * M), see the module docstring.
    """

    def __init__(self, dim: int, groups: int = 2, quantizer: str = "residual",
                 quantizer_kwargs: dict[str, Any] | None = None, channel_first: bool = False,
                 loss_reduction: str = "sum"):
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"GroupedQuantizer: groups must be an int >= 1, got {groups!r}")
        if not isinstance(dim, int) or dim < 1 or dim % groups:
            raise ValueError(f"GroupedQuantizer: dim must be a positive multiple of groups={groups}, got {dim!r}")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"GroupedQuantizer: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        kwargs = dict(quantizer_kwargs or {})
        for name in ("dim", "channel_first"):
            if name in kwargs:
                raise ValueError(f"GroupedQuantizer: {name} is set by the GroupedQuantizer, not in quantizer_kwargs")
        quantizers = [create_quantizer(quantizer, dim=dim // groups, **kwargs) for _ in range(groups)]
        if quantizers[0].dim != dim // groups:
            raise ValueError(f"GroupedQuantizer: the group quantizer has dim {quantizers[0].dim}, expected "
                             f"dim / groups = {dim // groups}")
        super().__init__(dim, quantizers[0].codebook_size, channel_first)
        self.groups, self.loss_reduction = groups, loss_reduction
        self.quantizers = nn.ModuleList(quantizers)
        inner = quantizers[0]
        self.soft, self.may_skip_depths = inner.soft, inner.may_skip_depths
        self.identity_gradient = inner.identity_gradient
        self._inner_indices = inner.num_indices

    @property
    def num_indices(self) -> int:
        return self.groups * self._inner_indices

    def _indices_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], self.num_indices)  # the trailing axis stays, even for one group of one index

    def _columns(self, indices: Tensor) -> list[Tensor]:
        """(N, groups * M) -> per group (N,) when M = 1, else (N, M)."""
        per_group = indices.unflatten(-1, (self.groups, self._inner_indices))  # (N, G, M)
        return [per_group[:, g, 0] if self._inner_indices == 1 else per_group[:, g] for g in range(self.groups)]

    @staticmethod
    def _as_columns(idx: Tensor) -> Tensor:
        return idx if idx.dim() == 2 else idx[:, None]  # (N, M)

    # ------------------------------------------------------------------------------------------------------------

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        quantized, indices, loss = [], [], z.new_zeros(())
        for q, chunk in zip(self.quantizers, z.chunk(self.groups, dim=-1)):  # each (N, dim / G)
            qg, ig, lg = q._quantize(chunk, mask)
            quantized.append(qg)
            indices.append(self._as_columns(ig))
            loss = loss + lg
        if self.loss_reduction == "mean":
            loss = loss / self.groups
        return _cat(quantized), _cat(indices), loss  # (N, dim), (N, G * M), ()

    def _encode(self, z: Tensor) -> Tensor:
        return _cat([self._as_columns(q._encode(chunk)) for q, chunk in zip(self.quantizers, z.chunk(self.groups, -1))])

    def _decode(self, indices: Tensor) -> Tensor:
        return _cat([q._decode(idx) for q, idx in zip(self.quantizers, self._columns(indices))])

    def decode(self, indices: Tensor) -> Tensor:
        """indices (..., groups * M) -> vectors in x's layout (float32)."""
        if indices.dtype != torch.int64:
            raise ValueError(f"GroupedQuantizer: indices must be int64, got {indices.dtype}")
        self._check_indices(indices)
        out = self._decode(indices.reshape(-1, self.num_indices)).reshape(*indices.shape[:-1], self.dim)
        return out.movedim(-1, 1) if self.channel_first else out

    def _check_indices(self, indices: Tensor, codebook_size: int | None = None) -> None:
        if indices.dim() < 1 or indices.shape[-1] != self.num_indices:
            raise ValueError(f"GroupedQuantizer: indices must have shape (..., groups * {self._inner_indices} = "
                             f"{self.num_indices}), got {tuple(indices.shape)}")
        for q, idx in zip(self.quantizers, self._columns(indices.reshape(-1, self.num_indices))):
            q._check_indices(idx)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, loss_reduction={self.loss_reduction!r}, " + super().extra_repr()


def _cat(parts: list[Tensor]) -> Tensor:
    """Concatenation along the last axis (no copy for one group)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
