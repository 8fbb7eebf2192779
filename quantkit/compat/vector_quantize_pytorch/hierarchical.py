"""``HierarchicalVQ`` with the peer's keywords, call and return tuple, over :class:`quantkit.quantizers.HierarchicalVQ`
(VAR-style multi-scale residual VQ, arXiv:2404.02905).

``forward(x, mask=None, lens=None, ...) -> (reconstruction, (indices per level, each (B, *shape_k) int64), loss[,
cutoff])``; the levels' VectorQuantize keywords map as in :class:`VectorQuantize`.

The one idea to hold: quantkit's HierarchicalVQ is the peer's scheme step for step (adaptive average pooling, masked
means, one VectorQuantizer per level or shared, (bi/tri)linear upsampling, phi = lerp(h, conv(h), quant_resi) with
the peer's choice of conv per level), so with the peer's codebooks and convolutions copied in, eval outputs equal the
peer's to rounding and indices equal them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...quantizers import HierarchicalVQ as _HierarchicalVQ
from ._common import (REQUIRED, Option, lens_to_mask, load_codebook, only_default, parse_options, reject_call,
                      set_signature)
from .vq import VQ_OPTIONS, sampling_temperature, vq_core_kwargs

__all__ = ["HierarchicalVQ", "HIERARCHICAL_OPTIONS"]

_NS = "not supported"
#: The levels' VectorQuantize keywords the peer exposes, with its HierarchicalVQ defaults.
_VQ_KEYWORDS = {"sync_codebook": None, "decay": 0.99, "commitment_weight": 1.0, "rotation_trick": False,
                "kmeans_init": True, "kmeans_iters": 10, "threshold_ema_dead_code": 2,
                "stochastic_sample_codes": False, "sample_codebook_temp": 0.1, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_max_codes": 128, "orthogonal_reg_active_codes_only": False}

HIERARCHICAL_OPTIONS: dict[str, Option] = {
    "shared_codebook": Option(True, "`HierarchicalVQ(shared_codebook=...)`"),
    "channel_first": Option(True, "adapter layout: `False` reads (B, *spatial, dim)"),
    **{name: Option(default, f"every level's VectorQuantize: {VQ_OPTIONS[name].quantkit}", VQ_OPTIONS[name].supported,
                    VQ_OPTIONS[name].hint) for name, default in _VQ_KEYWORDS.items()},
    "quant_resi": Option(0.5, "`HierarchicalVQ(phi_ratio=...)` (its absolute value, as in the peer)"),
    "share_quant_resi": Option(1, "`HierarchicalVQ(num_phi=...)`: 1 shared conv, k > 1 convs spread over the levels, "
                                  "<= 0 one per level (num_phi=None)"),
    "nested_dropout": Option(0.0, "`HierarchicalVQ(nested_dropout=...)`: one draw per batch, as in the peer"),
    "nested_dropout_min_levels": Option(1, "`HierarchicalVQ(nested_dropout_min_levels=...)`"),
    "accept_image_fmap": Option(False, "`HierarchicalVQ(spatial_dims=2)`"),
    "accept_3d_fmap": Option(False, "`HierarchicalVQ(spatial_dims=3)` (neither flag: 1-D sequences)"),
}


class HierarchicalVQ(nn.Module):
    """The peer's ``HierarchicalVQ(dim=, codebook_size=, scales=, **keywords)``; see ``HIERARCHICAL_OPTIONS``."""

    def __init__(self, *, dim: int, codebook_size: int | tuple[int, ...], scales, **kwargs):
        super().__init__()
        o = parse_options("HierarchicalVQ", HIERARCHICAL_OPTIONS, kwargs)
        if o["accept_image_fmap"] and o["accept_3d_fmap"]:
            raise ValueError("HierarchicalVQ: accept_image_fmap and accept_3d_fmap are exclusive")
        vq = parse_options("HierarchicalVQ", VQ_OPTIONS, {name: o[name] for name in _VQ_KEYWORDS})
        share = o["share_quant_resi"]
        self.dim, self.channel_first = dim, o["channel_first"]
        self.core = _HierarchicalVQ(dim, codebook_size, scales,
                                    spatial_dims=2 if o["accept_image_fmap"] else 3 if o["accept_3d_fmap"] else 1,
                                    shared_codebook=o["shared_codebook"], phi_ratio=o["quant_resi"],
                                    num_phi=1 if share == 1 else None if share <= 0 else share,
                                    nested_dropout=o["nested_dropout"],
                                    nested_dropout_min_levels=o["nested_dropout_min_levels"],
                                    **vq_core_kwargs(vq, dim))
        self.scales, self.level_shapes = tuple(scales), self.core.level_shapes
        self.num_levels, self.codebook_sizes = self.core.num_levels, self.core.codebook_sizes
        self.spatial_dims = self.core.spatial_dims

    def forward(self, x: Tensor, indices: Tensor | None = None, mask: Tensor | None = None,
                lens: Tensor | None = None, sample_codebook_temp: float | None = None, return_cutoff: bool = False):
        reject_call("HierarchicalVQ", indices=(indices, None, "decode with get_output_from_indices (as in the peer, "
                                                              "whose forward asserts on it)"))
        if mask is not None and lens is not None:
            raise ValueError("HierarchicalVQ.forward: pass mask or lens, not both")
        if not self.channel_first:
            x = x.movedim(-1, 1)  # (B, dim, *spatial)
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("HierarchicalVQ.forward: lens is for 1-D sequences only (as in the peer)")
            mask = lens_to_mask(lens, x.shape[2])
        with sampling_temperature(self.core.vqs, sample_codebook_temp):
            out = self.core(x, mask=mask)
        recon = out.quantized if self.channel_first else out.quantized.movedim(1, -1)
        loss = out.loss if self.training else torch.zeros((), device=x.device)
        ret = (recon, tuple(self.core.split_scales(out.indices)), loss)
        return (*ret, self.core.last_cutoff) if return_cutoff else ret

    def get_output_from_indices(self, indices, full_shape=None) -> Tensor:
        """Per-level token maps (tuple, -1 entries add nothing) -> the reconstruction at ``full_shape`` (default: the
        finest level's shape)."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(f"HierarchicalVQ: indices must be a tuple of {self.num_levels} token maps")
        flat = torch.cat([i.long().flatten(1) for i in indices], dim=1)  # (B, L); -1 cells add no code
        shape = None if full_shape is None else ((full_shape,) * self.spatial_dims if isinstance(full_shape, int)
                                                 else tuple(full_shape))
        out = self.core.decode(flat, shape)
        return out if self.channel_first else out.movedim(1, -1)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "HierarchicalVQ":
        """Copies a peer ``HierarchicalVQ.state_dict()`` (same keywords): the levels' codebooks and the phi convs."""
        for k, vq in enumerate(self.core.vqs):
            load_codebook(vq.codebook, state, "vq._codebook" if self.core.shared_codebook else f"vqs.{k}._codebook")
        for j, phi in enumerate(self.core.phi):
            prefix = "phi_shared.conv" if len(self.core.phi) == 1 and "phi_shared.conv.weight" in state \
                else f"phi_levels.{j}.conv"
            phi.conv.weight.copy_(state[f"{prefix}.weight"])
            phi.conv.bias.copy_(state[f"{prefix}.bias"])
        return self


set_signature(HierarchicalVQ, [("dim", REQUIRED), ("codebook_size", REQUIRED), ("scales", REQUIRED)],
              HIERARCHICAL_OPTIONS, keyword_only=True)
