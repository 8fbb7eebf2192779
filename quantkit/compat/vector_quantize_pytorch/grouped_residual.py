"""``GroupedResidualFSQ`` and ``GroupedResidualLFQ`` with the peer's keywords, call and return tuples: the channels
split into ``groups`` chunks, one :class:`ResidualFSQ` / :class:`ResidualLFQ` adapter per chunk (quantkit's
:class:`~quantkit.quantizers.GroupedQuantizer` over "residual" natively; group-residual VQ, arXiv:2305.02765).

Each group is the residual adapter of its own file, projections included, so indices and outputs match the peer's
wherever those do. One difference: with quantize dropout the peer draws one prefix length per batch and shares it
across the groups, quantkit draws per vector and per group (as in the residual adapters).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import REQUIRED, Option, set_signature
from .fsq import RFSQ_OPTIONS, ResidualFSQ
from .lfq import RLFQ_OPTIONS, ResidualLFQ

__all__ = ["GroupedResidualFSQ", "GroupedResidualLFQ"]

_GROUPED: dict[str, Option] = {
    "groups": Option(1, "`GroupedQuantizer(groups=...)`: one residual quantizer per chunk of dim / groups channels"),
    "accept_image_fmap": Option(False, "split (B, C, *spatial) input along C (pass the residual class's own "
                                       "channel-first keyword too, as in the peer)"),
}


class _GroupedResidual(nn.Module):
    """``groups`` residual adapters side by side; outputs concatenated, indices and losses stacked (G first), the
    per-level codes a tuple of G tensors (as the peer returns them)."""

    _residual: type = nn.Module
    _owner = ""
    _stacked = 1  # outputs after `quantized` that are stacked: indices (and the losses for LFQ)

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"{self._owner}: groups must be a positive int dividing dim={dim}, got {groups!r}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList([self._residual(dim=dim // groups, **kwargs) for _ in range(groups)])
        self.codebook_size = self.rvqs[0].codebook_size

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def _forward(self, x: Tensor, **call) -> tuple:
        if x.dim() < 1 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"{self._owner}: x must have {self.dim} channels on dim {self.split_dim}, got shape "
                             f"{tuple(x.shape)}")
        outs = [rvq(chunk, **call) for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized = torch.cat([o[0] for o in outs], dim=self.split_dim)
        stacked = [torch.stack([o[i] for o in outs]) for i in range(1, 1 + self._stacked)]
        return (quantized, *stacked, *(tuple(o[i] for o in outs) for i in range(1 + self._stacked, len(outs[0]))))

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """indices (G, ..., Q) -> per group, per level codes (G, Q, ..., d)."""
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """indices (G, ..., Q) -> the output forward gave for them."""
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]):
        """Copies a peer grouped module's ``state_dict()`` (``rvqs.{g}.*``) into each group's adapter."""
        for g, rvq in enumerate(self.rvqs):
            prefix = f"rvqs.{g}."
            rvq.load_peer_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        return self


class GroupedResidualFSQ(_GroupedResidual):
    """The peer's ``GroupedResidualFSQ(dim=, groups=1, accept_image_fmap=False, **ResidualFSQ keywords)``.

    ``forward(x, return_all_codes=False) -> (quantized, indices (G, ..., Q) int32[, all_codes: G x (Q, ..., d)])``.
    """

    _residual, _owner = ResidualFSQ, "GroupedResidualFSQ"

    def forward(self, x: Tensor, return_all_codes: bool = False):
        return self._forward(x, return_all_codes=return_all_codes)


class GroupedResidualLFQ(_GroupedResidual):
    """The peer's ``GroupedResidualLFQ(dim=, groups=1, accept_image_fmap=False, **ResidualLFQ keywords)``.

    ``forward(x, mask=None, return_all_codes=False) -> (quantized, indices (G, ..., Q), losses (G, Q)[, all_codes])``.
    """

    _residual, _owner, _stacked = ResidualLFQ, "GroupedResidualLFQ", 2

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False):
        return self._forward(x, mask=mask, return_all_codes=return_all_codes)


_RFSQ_GROUP = {k: v for k, v in RFSQ_OPTIONS.items() if k != "dim"}
set_signature(GroupedResidualFSQ, [("dim", REQUIRED), ("levels", REQUIRED)], {**_GROUPED, **_RFSQ_GROUP},
              keyword_only=True)
set_signature(GroupedResidualLFQ, [("dim", REQUIRED), ("codebook_size", REQUIRED)], {**_GROUPED, **RLFQ_OPTIONS},
              keyword_only=True)
