"""``FSP`` with the peer's keywords, call and return tuple, over :class:`quantkit.quantizers.FSP` (finite scalar
perturbation, VP-VAE arXiv:2602.17133).

quantkit's FSP does the CDF, binning, perturbation, read-out and moment loss with the peer's arithmetic, so eval
outputs and indices match it, and training draws the same random numbers in the same order (noise, then the choice),
so under one seed training matches too. The adapter owns the layout and the peer's int32 indices and info dict.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...quantizers import FSP as _FSP
from ...quantizers.fsp import CDFS, MOMENT_PRESETS, moment_statistics
from ._common import REQUIRED, Option, from_channels_last, load_projections, parse_options, set_signature, swapped
from ._common import to_channels_last

__all__ = ["FSP", "FSP_OPTIONS"]

FSP_OPTIONS: dict[str, Option] = {
    "channel_first": Option(False, "`FSP(channel_first=...)`: (B, C, *spatial) in and out"),
    "projection_has_bias": Option(True, "`FSP(projection_bias=...)`"),
    "act_name": Option("tanh", "`FSP(cdf=...)`: tanh, sigmoid, normal, laplace or cauchy",
                       lambda v, _: v in CDFS, f"one of {sorted(CDFS)}"),
    "quantize_rate": Option(0.0, "`FSP(quantize_rate=...)`", lambda v, _: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
    "need_inv_act": Option(False, "`FSP(invert_cdf=...)`"),
    "vector_norm": Option("var_tanh", "`FSP(moments=MomentLoss.preset(...))`",
                          lambda v, _: v in MOMENT_PRESETS, f"one of {sorted(MOMENT_PRESETS)}"),
}


class FSP(nn.Module):
    """The peer's ``FSP(levels, dim=None, **keywords)``; see ``FSP_OPTIONS``.

    ``forward(z, eps=None) -> (quantized, indices int32, norm_loss, info)`` with ``info`` holding ``level_indices``,
    ``norm_info`` (per-channel mean, variance, skewness, kurtosis) and, in training with perturbation,
    ``p_accept_prob``. The moment loss is zero, not NaN, for fewer than two vectors.
    """

    def __init__(self, levels, dim: int | None = None, **kwargs):
        super().__init__()
        o = parse_options("FSP", FSP_OPTIONS, kwargs)
        self.core = _FSP(list(levels), dim=dim, cdf=o["act_name"], quantize_rate=o["quantize_rate"],
                         invert_cdf=o["need_inv_act"], moments=o["vector_norm"],
                         projection_bias=o["projection_has_bias"])
        self.codebook_dim, self.dim = len(self.core.levels), self.core.dim
        self.codebook_size, self.channel_first = self.core.codebook_size, o["channel_first"]
        self.has_projections = self.dim != self.codebook_dim

    @property
    def project_in(self) -> nn.Module:
        return self.core.project_in

    @property
    def project_out(self) -> nn.Module:
        return self.core.project_out

    def forward(self, z: Tensor, eps: float | None = None):
        x = to_channels_last(z, self.channel_first)  # (..., dim)
        with swapped([self.core], "eps", lambda old: eps or old):
            res = self.core(x)
        out = from_channels_last(res.quantized, self.channel_first)
        level_indices = self.core.indices_to_digits(res.indices).to(x.dtype)
        with torch.no_grad():
            rows = self.core.project_in(x.reshape(-1, self.dim).float())
            stats = moment_statistics(rows, self.core.moments.eps)
        info = {"level_indices": level_indices,
                "norm_info": dict(zip(("mean", "variance", "skewness", "kurtosis"), stats))}
        if "accept_rate" in res.stats:
            info["p_accept_prob"] = res.stats["accept_rate"]
        return out, res.indices.int(), res.loss, info

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        """indices -> the output forward gave for them (channel-first when ``channel_first``)."""
        with swapped([self.core], "eps", lambda old: eps):
            codes = self.core.project_out(self.core.indices_to_codes(indices.long()))
        return from_channels_last(codes, self.channel_first)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        return self.core.indices_to_digits(indices.long()).int()

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        return self.core.digits_to_indices(level_indices).int()

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "FSP":
        """Copies a peer ``FSP.state_dict()`` (its projections; FSP has no other state)."""
        load_projections(self.core, state)
        return self


set_signature(FSP, [("levels", REQUIRED), ("dim", None)], FSP_OPTIONS)
