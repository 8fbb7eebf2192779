"""``FSQ`` and ``ResidualFSQ`` with the peer's keywords, call and return tuples, over :class:`quantkit.quantizers.FSQ`
(Mentzer et al. 2023, arXiv:2309.15505) and :class:`quantkit.quantizers.ResidualQuantizer`.

The adapter owns the layout (channel-first when ``channel_first`` or for 4-D+ input, as the peer infers it), the
projection to ``num_codebooks * len(levels)`` channels, and the int32 index dtype the peer documents; quantkit's FSQ
(projection-free) does the bounding, rounding and index arithmetic, with the same bound and the same mixed-radix
index (channel 0 least significant) as the peer, so indices and outputs match it exactly.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...quantizers import FSQ as _FSQ
from ...quantizers import ResidualQuantizer
from ...quantizers.projection import ThinLinear
from .lfq import load_rotation
from ._common import (REQUIRED, Option, decode_with_sentinel, from_channels_last, load_projections, only_default,
                      parse_options, reject_call, set_signature, to_channels_last)

__all__ = ["FSQ", "ResidualFSQ", "FSQ_OPTIONS", "RFSQ_OPTIONS"]

_NS = "not supported"

FSQ_OPTIONS: dict[str, Option] = {
    "num_codebooks": Option(1, "adapter: the projected vector is split into groups of len(levels) channels, each "
                               "quantized by quantkit's FSQ; indices (..., num_codebooks)"),
    "keep_num_codebooks_dim": Option(None, "adapter: keep the codebook axis of indices (default: num_codebooks > 1)",
                                     lambda v, vals: v is None or v or vals["num_codebooks"] == 1,
                                     "num_codebooks > 1 needs the codebook axis (as in the peer)"),
    "scale": Option(None, "unused by the peer; accepted and unused here too"),
    "allowed_dtypes": Option((torch.float32, torch.float64), "quantkit computes in float32 (float64 stays float64)",
                             only_default((torch.float32, torch.float64)), "quantkit's compute dtype is fixed"),
    "channel_first": Option(False, "adapter layout (4-D and 5-D input is channel-first regardless, as in the peer)"),
    "projection_has_bias": Option(True, "bias of the adapter's `project_in`/`project_out`"),
    "return_indices": Option(True, "`False` returns `None` for indices (no implicit codebook is ever built)"),
    "force_quantization_f32": Option(True, "always: quantkit quantizes in float32", only_default(True),
                                     "quantkit always rounds in float32"),
    "preserve_symmetry": Option(False, "`FSQ(grid='symmetric')` (arXiv:2411.19842 sec. 3.2)"),
    "noise_dropout": Option(0.0, "`FSQ(noise_dropout=p, noise_mode='code')`: U(-1/2, 1/2) added to a share p of the "
                                 "rounded codes in training (the peer's share is 1/2 whatever p: see the peer bugs)",
                            lambda v, vals: v == 0 or vals.get("preserve_symmetry", True),
                            "needs preserve_symmetry=True (the peer asserts so)"),
    "bound_hard_clamp": Option(False, "`FSQ(bound='clamp')`"),
    "orthogonal_rotation": Option(False, "`FSQ(rotation=True)`: a fixed random orthogonal rotation around the "
                                         "rounding (`load_peer_state_dict` copies the peer's)"),
}


class FSQ(nn.Module):
    """The peer's ``FSQ(levels, dim=None, **keywords)``; see ``FSQ_OPTIONS``.

    ``forward(z) -> (quantized, indices int32 or None)``; ``indices_to_codes`` inverts it exactly.
    """

    def __init__(self, levels, dim: int | None = None, **kwargs):
        super().__init__()
        o = parse_options("FSQ", FSQ_OPTIONS, kwargs)
        self.levels = list(levels)
        # (..., len(levels)) rows, no projection
        self.core = _FSQ(self.levels, grid="symmetric" if o["preserve_symmetry"] else "paper",
                         bound="clamp" if o["bound_hard_clamp"] else "tanh", rotation=o["orthogonal_rotation"],
                         noise_dropout=o["noise_dropout"], noise_mode="code" if o["preserve_symmetry"] else "step")
        self.codebook_dim, self.num_codebooks = len(self.levels), o["num_codebooks"]
        self.effective_codebook_dim = self.codebook_dim * self.num_codebooks
        self.keep_num_codebooks_dim = o["keep_num_codebooks_dim"] if o["keep_num_codebooks_dim"] is not None \
            else self.num_codebooks > 1
        self.dim = dim if dim is not None else self.effective_codebook_dim
        self.has_projections = self.dim != self.effective_codebook_dim
        bias = o["projection_has_bias"]
        self.project_in = ThinLinear(self.dim, self.effective_codebook_dim, bias=bias) if self.has_projections \
            else nn.Identity()
        self.project_out = ThinLinear(self.effective_codebook_dim, self.dim, bias=bias) if self.has_projections \
            else nn.Identity()
        self.channel_first, self.return_indices = o["channel_first"], o["return_indices"]
        self.codebook_size = math.prod(self.levels)

    def forward(self, z: Tensor):
        channel_first = z.dim() >= 4 or self.channel_first
        x = to_channels_last(z, channel_first)  # (..., dim)
        h = self.project_in(x).unflatten(-1, (self.num_codebooks, self.codebook_dim))  # (..., c, d)
        res = self.core(h)
        out = from_channels_last(self.project_out(res.quantized.flatten(-2)), channel_first)
        if not self.return_indices:
            return out, None
        indices = res.indices.int()  # (..., c)
        return out, indices if self.keep_num_codebooks_dim else indices.squeeze(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (..., [c]) -> the output forward gave for them (channel-first for image / video indices)."""
        channel_first = indices.dim() >= 3 + int(self.keep_num_codebooks_dim) or self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self.core.rotate_back(self.core.indices_to_codes(indices.long())).flatten(-2)  # (..., c * d)
        return from_channels_last(self.project_out(codes), channel_first)

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Grid codes (..., len(levels)) -> indices (...) int32."""
        return self.core.codes_to_indices(zhat).int()

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """indices (...) -> per-channel level indices (..., len(levels))."""
        return self.core.indices_to_digits(indices.long())

    @property
    def implicit_codebook(self) -> Tensor:
        """(codebook_size, len(levels)) every grid code, built on request (the peer keeps it as a buffer)."""
        return self.core.indices_to_codes(torch.arange(self.codebook_size))

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "FSQ":
        """Copies a peer ``FSQ.state_dict()`` (its projections and orthogonal rotation; FSQ has no other state)."""
        load_projections(self, state)
        load_rotation(self.core, state, "orthogonal_rot")
        return self


_RFSQ_OWN: dict[str, Option] = {
    "num_quantizers": Option(REQUIRED, "`ResidualQuantizer(depth=...)`"),
    "dim": Option(None, "the adapter's `project_in`/`project_out` when dim != len(levels)"),
    "is_channel_first": Option(False, "adapter layout: (B, C, *spatial) in and out, indices (B, Q, *spatial) as "
                                      "in the peer"),
    "quantize_dropout": Option(False, "`ResidualQuantizer(quantize_dropout=1.0)` (per vector; the peer draws per "
                                      "batch)"),
    "quantize_dropout_cutoff_index": Option(0, "`ResidualQuantizer(min_depth=cutoff + 1)`"),
    "quantize_dropout_multiple_of": Option(1, _NS, only_default(1), "quantkit draws any prefix length"),
    "soft_clamp_input_value": Option(None, "`ResidualQuantizer(input_clamp=...)` (only without bound_hard_clamp, "
                                           "as in the peer)",
                                     lambda v, vals: v is None or not vals["bound_hard_clamp"],
                                     "the peer allows it only with bound_hard_clamp=False"),
    "bound_hard_clamp": Option(True, "every level is `FSQ(grid='symmetric', bound='clamp')` and the input is "
                                     "soft-clamped to 1 + 1 / (L - 1) (`ResidualQuantizer(input_clamp=...)`); "
                                     "`False`: tanh bound (`FSQ(bound='tanh')`). Level d is scaled by L^-d per "
                                     "channel (`ResidualQuantizer(layer_scale=[1 / L_i])`), the peer's numbers"),
}
#: ResidualFSQ's own keywords, then the FSQ keywords it forwards to every level.
RFSQ_OPTIONS: dict[str, Option] = {
    **_RFSQ_OWN,
    **{name: opt for name, opt in FSQ_OPTIONS.items()
       if name not in ("channel_first", "projection_has_bias", "bound_hard_clamp", "preserve_symmetry",
                       "num_codebooks", "keep_num_codebooks_dim", "return_indices")},
    "num_codebooks": Option(1, "must be 1", only_default(1), "residual FSQ levels have one codebook"),
}


class ResidualFSQ(nn.Module):
    """The peer's ``ResidualFSQ(levels=, num_quantizers=, dim=None, **keywords)``; see ``RFSQ_OPTIONS``.

    ``forward(x) -> (quantized, indices (..., Q) int32[, all_codes (Q, ..., len(levels))])``.
    """

    def __init__(self, *, levels, **kwargs):
        super().__init__()
        o = parse_options("ResidualFSQ", RFSQ_OPTIONS, kwargs)
        if o["num_quantizers"] is REQUIRED:
            raise TypeError("ResidualFSQ.__init__() missing required keyword argument: 'num_quantizers'")
        self.levels, self.num_quantizers = list(levels), o["num_quantizers"]
        self.codebook_dim = len(self.levels)
        self.dim = o["dim"] if o["dim"] is not None else self.codebook_dim
        self.has_projections = self.dim != self.codebook_dim
        self.project_in = ThinLinear(self.dim, self.codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = ThinLinear(self.codebook_dim, self.dim) if self.has_projections else nn.Identity()
        dropout = bool(o["quantize_dropout"]) and self.num_quantizers > 1
        levels_t = torch.tensor(self.levels)
        if o["bound_hard_clamp"]:  # the peer's float32 values, exactly
            clamp = (1 + 1 / (levels_t - 1)).tolist()
        else:
            c = o["soft_clamp_input_value"]
            clamp = c.tolist() if isinstance(c, Tensor) else c
            clamp = [float(clamp)] * self.codebook_dim if isinstance(clamp, (int, float)) else clamp
        self.rq = ResidualQuantizer(self.codebook_dim, "fsq", depth=self.num_quantizers, levels=self.levels,
                                    grid="symmetric", bound="clamp" if o["bound_hard_clamp"] else "tanh",
                                    layer_scale=[1.0 / v for v in self.levels], input_clamp=clamp,
                                    rotation=o["orthogonal_rotation"], noise_dropout=o["noise_dropout"],
                                    noise_mode="code", quantize_dropout=1.0 if dropout else 0.0,
                                    min_depth=min(o["quantize_dropout_cutoff_index"] + 1, self.num_quantizers))
        self.is_channel_first = o["is_channel_first"]
        self.codebook_size = math.prod(self.levels)

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        reject_call("ResidualFSQ", rand_quantize_dropout_fixed_seed=(
            rand_quantize_dropout_fixed_seed, None, "seed quantkit's ResidualQuantizer(seed=...) instead"))
        z = to_channels_last(x, self.is_channel_first)
        res = self.rq(self.project_in(z))
        out = from_channels_last(self.project_out(res.quantized), self.is_channel_first)
        indices = from_channels_last(res.indices.int(), self.is_channel_first)  # the peer moves Q to axis 1 too
        if not return_all_codes:
            return out, indices
        return out, indices, self.get_codes_from_indices(indices)

    def _levels_last(self, indices: Tensor) -> Tensor:
        return to_channels_last(indices, self.is_channel_first).long()

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-level scaled codes (Q, ..., len(levels)); -1 gives zeros."""
        indices = self._levels_last(indices)
        codes = [decode_with_sentinel(self.rq.layer(d).decode, indices[..., d]) * self.rq.depth_scale(d)
                 if d < indices.shape[-1] else torch.zeros(*indices.shape[:-1], self.codebook_dim,
                                                           device=indices.device)
                 for d in range(self.num_quantizers)]
        return torch.stack(codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        out = self.project_out(self.rq.decode(self._levels_last(indices)))
        return from_channels_last(out, self.is_channel_first)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "ResidualFSQ":
        load_projections(self, state)
        for d, layer in enumerate(self.rq.layers):
            load_rotation(layer, state, f"layers.{d}.orthogonal_rot")
        return self


set_signature(FSQ, [("levels", REQUIRED), ("dim", None)], FSQ_OPTIONS)
set_signature(ResidualFSQ, [("levels", REQUIRED)], RFSQ_OPTIONS, keyword_only=True)
