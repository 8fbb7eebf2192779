"""``LFQ`` and ``ResidualLFQ`` with the peer's keywords, call and return tuples, over :class:`quantkit.quantizers.LFQ`
(MAGVIT-v2, arXiv:2310.05737) and :class:`quantkit.quantizers.ResidualQuantizer`.

The one idea to hold: the peer reads the bits most-significant first (channel 0 is the top bit), quantkit least
significant first, so the adapter reverses the channel order of each codebook group on the way in and out. Signs,
codes and the entropy terms are unchanged by that permutation, and the indices become the peer's.
"""
from __future__ import annotations

from collections import namedtuple
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quantizers import EntropyLoss, GroupedQuantizer, ResidualQuantizer
from ...quantizers.lfq import CosineLinear
from ...quantizers.base import bits_for
from ...quantizers.projection import ThinLinear
from ._common import (REQUIRED, Option, decode_with_sentinel, from_channels_last, load_projections, only_default,
                      parse_options, reject_call, set_signature, swapped, to_channels_last)
from .residual_vq import residual_losses

__all__ = ["LFQ", "ResidualLFQ", "Return", "LossBreakdown", "LFQ_OPTIONS", "RLFQ_OPTIONS"]

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])

_NS = "not supported"

LFQ_OPTIONS: dict[str, Option] = {
    "entropy_loss_weight": Option(0.1, "`EntropyLoss(weight=...)`"),
    "commitment_loss_weight": Option(0.0, "`LFQ(commitment_weight=...)`"),
    "diversity_gamma": Option(1.0, "`EntropyLoss(codebook_weight=...)`"),
    "straight_through_activation": Option(None, "`LFQ(straight_through_activation=...)`: the gradient passes "
                                                "through this module (None: the identity)"),
    "num_codebooks": Option(1, "`GroupedQuantizer(groups=num_codebooks, quantizer='lfq', loss_reduction='mean')`: "
                               "one LFQ per group of log2(codebook_size) bits, every loss term a mean over the groups "
                               "as in the peer; indices (..., num_codebooks)"),
    "keep_num_codebooks_dim": Option(None, "adapter: keep the codebook axis of indices (default: num_codebooks > 1)",
                                     lambda v, vals: v is None or v or vals["num_codebooks"] == 1,
                                     "num_codebooks > 1 needs the codebook axis (as in the peer)"),
    "codebook_scale": Option(1.0, "`LFQ(codebook_scale=...)`"),
    "frac_per_sample_entropy": Option(1.0, "quantkit computes the exact per-sample entropy (O(N bits) memory), the "
                                           "value the peer's subsample estimates", lambda v, _: 0 < v <= 1,
                                      "must lie in (0, 1]"),
    "has_projections": Option(None, "the adapter's `project_in`/`project_out` (None: when dim != bits * "
                                    "num_codebooks)"),
    "projection_has_bias": Option(True, "bias of the adapter's projections"),
    "soft_clamp_input_value": Option(None, "`LFQ(input_clamp=...)`: c * tanh(h / c) after the projection",
                                     lambda v, vals: v is None or v >= vals["codebook_scale"],
                                     "must be >= codebook_scale (as in the peer)"),
    "cosine_sim_project_in": Option(False, "the adapter's `project_in` is quantkit's `CosineLinear` "
                                           "(`LFQ(cosine_projection=scale)`), when there are projections"),
    "cosine_sim_project_in_scale": Option(None, "its scale (None: codebook_scale)"),
    "channel_first": Option(None, "adapter layout (None: channel-first for 4-D and 5-D input, as in the peer)"),
    "experimental_softplus_entropy_loss": Option(False, "`EntropyLoss(softplus_offset=entropy_loss_offset)`: "
                                                        "softplus(entropy term + offset)"),
    "entropy_loss_offset": Option(5.0, "the offset of `experimental_softplus_entropy_loss` (unused without it)"),
    "spherical": Option(False, "`LFQ(spherical=True)`: BSQ, inputs and codes on the sphere (arXiv:2406.07548)"),
    "force_quantization_f32": Option(True, "always: quantkit quantizes in float32", only_default(True),
                                     "quantkit always quantizes in float32"),
    "orthogonal_rotation": Option(False, "`LFQ(rotation=True)`: a fixed random orthogonal rotation around the sign "
                                         "step (`load_peer_state_dict` copies the peer's)"),
}


def _entropy(o: dict) -> EntropyLoss:
    # The peer's softmax(2 x.c * inv_temperature) is quantkit's softmax(-||x - c||^2 / t) with t = 1 / inv_temperature.
    return EntropyLoss(weight=o["entropy_loss_weight"], temperature=0.01, codebook_weight=o["diversity_gamma"],
                       softplus_offset=o["entropy_loss_offset"] if o["experimental_softplus_entropy_loss"] else None)


def _temperature(quantizers, inv_temperature: float):
    """Per-call ``inv_temperature`` of the entropy loss (quantkit keeps it in ``EntropyLoss.temperature``)."""
    return swapped(quantizers, "entropy", lambda old: replace(old, temperature=1.0 / inv_temperature))


def _positions_mask(mask: Tensor, positions: tuple[int, ...]) -> Tensor:
    """The peer's mask -> one bool per position (B, *spatial): (B, N) over packed positions, or a per-sample (B,)
    flag broadcast over the sample's positions (the peer fails on that with feature maps)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"LFQ: mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() == 1 and mask.shape[0] == positions[0]:
        return mask.reshape(-1, *([1] * (len(positions) - 1))).expand(positions)
    if mask.numel() != torch.Size(positions).numel() or mask.shape[0] != positions[0]:
        raise ValueError(f"LFQ: mask must have shape (B,) = ({positions[0]},) or one entry per position "
                         f"{tuple(positions)} (packed (B, N) allowed), got {tuple(mask.shape)}")
    return mask.reshape(positions)


def load_rotation(core: nn.Module, state: dict[str, Tensor], key: str, reverse: bool = False) -> None:
    """Copies the peer's ``orthogonal_rot`` R into ``core.rotation`` (quantkit's LFQ / FSQ); ``reverse``: the peer's
    channels are quantkit's in reverse order (LFQ's bits), so R becomes P R P, P the reversal."""
    if (key in state) != (core.rotation is not None):
        raise ValueError(f"load_peer_state_dict: {key} is {'in' if key in state else 'missing from'} the peer's state "
                         "and orthogonal_rotation is not so here (were both built with the same keywords?)")
    if core.rotation is not None:
        core.rotation.copy_(state[key].flip(0).flip(1) if reverse else state[key])


class LFQ(nn.Module):
    """The peer's ``LFQ(dim=None, codebook_size=None, **keywords)``; see ``LFQ_OPTIONS``.

    ``forward(x, inv_temperature=100., return_loss_breakdown=False, mask=None) -> Return(quantized, indices int64,
    entropy_aux_loss)``, and ``(Return, LossBreakdown)`` with the breakdown.
    """

    def __init__(self, *, dim: int | None = None, codebook_size: int | None = None, **kwargs):
        super().__init__()
        o = parse_options("LFQ", LFQ_OPTIONS, kwargs)
        if dim is None and codebook_size is None:
            raise ValueError("LFQ: pass dim or codebook_size")
        self.codebook_size = codebook_size if codebook_size is not None else 2 ** dim
        self.codebook_dim = bits_for(self.codebook_size)
        self.num_codebooks = o["num_codebooks"]
        codebook_dims = self.codebook_dim * self.num_codebooks
        self.dim = dim if dim is not None else codebook_dims
        self.has_projections = o["has_projections"] if o["has_projections"] is not None else self.dim != codebook_dims
        bias = o["projection_has_bias"]
        self.project_in = ThinLinear(self.dim, codebook_dims, bias=bias) if self.has_projections else nn.Identity()
        if self.has_projections and o["cosine_sim_project_in"]:
            scale = o["cosine_sim_project_in_scale"]
            self.project_in = CosineLinear(self.dim, codebook_dims, o["codebook_scale"] if scale is None else scale)
        self.project_out = ThinLinear(codebook_dims, self.dim, bias=bias) if self.has_projections else nn.Identity()
        self.keep_num_codebooks_dim = o["keep_num_codebooks_dim"] if o["keep_num_codebooks_dim"] is not None \
            else self.num_codebooks > 1
        self.channel_first = o["channel_first"]
        # one LFQ per codebook, losses averaged over the codebooks (each of the peer's terms is such a mean)
        self.core = GroupedQuantizer(codebook_dims, groups=self.num_codebooks, quantizer="lfq", loss_reduction="mean",
                                     quantizer_kwargs=dict(
                                         codebook_size=self.codebook_size,
                                         commitment_weight=o["commitment_loss_weight"],
                                         entropy=_entropy(o), codebook_scale=o["codebook_scale"],
                                         spherical=o["spherical"], input_clamp=o["soft_clamp_input_value"],
                                         rotation=o["orthogonal_rotation"],
                                         straight_through_activation=o["straight_through_activation"]))

    def _flip(self, h: Tensor) -> Tensor:
        """(..., c * bits): each codebook's bits reversed, the peer's order <-> quantkit's (an involution)."""
        return h.unflatten(-1, (self.num_codebooks, self.codebook_dim)).flip(-1).flatten(-2)

    def forward(self, x: Tensor, inv_temperature: float = 100.0, return_loss_breakdown: bool = False,
                mask: Tensor | None = None):
        channel_first = self.channel_first if self.channel_first is not None else x.dim() >= 4
        z = to_channels_last(x, channel_first)  # (..., dim)
        h = self._flip(self.project_in(z))  # (..., c * bits)
        if mask is not None:  # the peer's (B, N) mask over packed positions, or one flag per sample (B,)
            mask = _positions_mask(mask, z.shape[:-1])
        with _temperature(self.core.quantizers, inv_temperature):
            res = self.core(h, mask=mask)
        out = from_channels_last(self.project_out(self._flip(res.quantized)), channel_first)
        indices = res.indices if self.keep_num_codebooks_dim else res.indices.squeeze(-1)
        zero = torch.zeros((), device=x.device)
        ret = Return(out, indices, res.loss if self.training else zero)
        if not return_loss_breakdown:
            return ret
        if not self.training:
            return ret, LossBreakdown(zero, zero, zero)
        rows = (h if mask is None else h[mask]).reshape(-1, self.num_codebooks, self.codebook_dim)
        terms = []
        with _temperature(self.core.quantizers, inv_temperature):
            for g, lfq in enumerate(self.core.quantizers):  # each term a mean over the codebooks, as the peer's
                signs = lfq.indices_to_codes(lfq.encode(rows[:, g]), rows.dtype)
                terms.append((*lfq.entropy_terms(rows[:, g]), F.mse_loss(lfq.prepare(rows[:, g]), signs)))
        return ret, LossBreakdown(*(torch.stack(t).mean() for t in zip(*terms)))

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices -> the output forward gave for them (channel-first for image / video indices)."""
        image = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        channel_first = self.channel_first if self.channel_first is not None else image
        if not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self._flip(self.core.decode(indices.long()))
        if project_out:
            codes = self.project_out(codes)
        return from_channels_last(codes, channel_first)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "LFQ":
        """Copies a peer ``LFQ.state_dict()`` (its projections and orthogonal rotation; the rest is fixed)."""
        load_projections(self, state)
        for lfq in self.core.quantizers:  # the peer's one rotation serves every codebook
            load_rotation(lfq, state, "orthogonal_rot", reverse=True)
        return self


_RLFQ_OWN: dict[str, Option] = {
    "num_quantizers": Option(REQUIRED, "`ResidualQuantizer(depth=...)`"),
    "quantize_dropout": Option(False, "`ResidualQuantizer(quantize_dropout=1.0)` (per vector; the peer draws per "
                                      "batch)"),
    "quantize_dropout_cutoff_index": Option(0, "`ResidualQuantizer(min_depth=cutoff + 1)`"),
    "quantize_dropout_multiple_of": Option(1, _NS, only_default(1), "quantkit draws any prefix length"),
    "cosine_sim_project_in": Option(False, "no effect: the peer's levels have no projections (it asserts so), and "
                                           "its own `project_in` is a Linear"),
    "cosine_sim_project_in_scale": Option(None, "no effect (see `cosine_sim_project_in`)"),
    "soft_clamp_input_value": Option(None, "`LFQ(input_clamp=c)` at every level (the peer's c * 2^-d on the "
                                           "unscaled residual)", lambda v, _: v is None or v >= 1.0,
                                     "must be >= 1, the first level's codebook_scale (as in the peer)"),
}
#: ResidualLFQ's own keywords, then the LFQ keywords it forwards to every level (the codebook scale halves per level:
#: quantkit's ``layer_scale=0.5``).
RLFQ_OPTIONS: dict[str, Option] = {
    **_RLFQ_OWN,
    **{name: opt for name, opt in LFQ_OPTIONS.items()
       if name not in _RLFQ_OWN and name not in ("num_codebooks", "keep_num_codebooks_dim", "codebook_scale",
                                                   "has_projections", "projection_has_bias", "channel_first")},
    "num_codebooks": Option(1, "must be 1", only_default(1), "residual LFQ levels have one codebook"),
}


class ResidualLFQ(nn.Module):
    """The peer's ``ResidualLFQ(dim=, codebook_size=, num_quantizers=, **keywords)``; see ``RLFQ_OPTIONS``.

    ``forward(x, mask=None) -> (quantized, indices (..., Q) int64, losses (Q,)[, all_codes (Q, ..., bits)])``.
    """

    def __init__(self, *, dim: int, codebook_size: int, **kwargs):
        super().__init__()
        o = parse_options("ResidualLFQ", RLFQ_OPTIONS, kwargs)
        if o["num_quantizers"] is REQUIRED:
            raise TypeError("ResidualLFQ.__init__() missing required keyword argument: 'num_quantizers'")
        self.dim, self.codebook_size, self.num_quantizers = dim, codebook_size, o["num_quantizers"]
        self.codebook_dim = bits_for(codebook_size)
        self.has_projections = self.codebook_dim != dim
        self.project_in = ThinLinear(dim, self.codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = ThinLinear(self.codebook_dim, dim) if self.has_projections else nn.Identity()
        dropout = bool(o["quantize_dropout"]) and self.num_quantizers > 1
        self.rq = ResidualQuantizer(self.codebook_dim, "lfq", depth=self.num_quantizers, codebook_size=codebook_size,
                                    entropy=_entropy(o), layer_scale=0.5, quantize_dropout=1.0 if dropout else 0.0,
                                    spherical=o["spherical"], rotation=o["orthogonal_rotation"],
                                    straight_through_activation=o["straight_through_activation"],
                                    min_depth=min(o["quantize_dropout_cutoff_index"] + 1, self.num_quantizers))
        for d, layer in enumerate(self.rq.layers):
            # Level d sees the residual scaled by 2^d against codes +-1, the peer's sees it unscaled against codes
            # +-2^-d: a 4^d times larger commitment and 4^d times sharper entropy logits, undone here (the peer's
            # losses, to rounding). ResidualQuantizer's own commitment_weight keyword shadows the levels' one.
            layer.commitment_weight = float(o["commitment_loss_weight"]) / 4 ** d
            layer.entropy = replace(layer.entropy, temperature=layer.entropy.temperature * 4 ** d)
            if o["soft_clamp_input_value"] is not None:  # level d sees r / 2^-d: the peer's c 2^-d clamp is c here
                layer.input_clamp = float(o["soft_clamp_input_value"])
                layer.identity_gradient = self.rq.identity_gradient = False

    def forward(self, x: Tensor, mask: Tensor | None = None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: int | None = None):
        reject_call("ResidualLFQ", rand_quantize_dropout_fixed_seed=(
            rand_quantize_dropout_fixed_seed, None, "seed quantkit's ResidualQuantizer(seed=...) instead"))
        h = self.project_in(x).flip(-1)  # the peer's bit order -> quantkit's
        res = self.rq(h, mask=mask)
        out = self.project_out(res.quantized.flip(-1))
        ret = (out, res.indices, residual_losses(res.loss, self.num_quantizers, self.training))
        return (*ret, self.get_codes_from_indices(res.indices)) if return_all_codes else ret

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-level scaled codes (Q, ..., bits) in the peer's bit order; -1 gives zeros."""
        codes = [decode_with_sentinel(self.rq.layer(d).decode, indices[..., d]) * 0.5 ** d
                 if d < indices.shape[-1] else torch.zeros(*indices.shape[:-1], self.codebook_dim,
                                                           device=indices.device)
                 for d in range(self.num_quantizers)]
        return torch.stack(codes).flip(-1)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.rq.decode(indices.long()).flip(-1))

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "ResidualLFQ":
        load_projections(self, state)
        for d, layer in enumerate(self.rq.layers):
            load_rotation(layer, state, f"layers.{d}.orthogonal_rot", reverse=True)
        return self


set_signature(LFQ, [("dim", None), ("codebook_size", None)], LFQ_OPTIONS, keyword_only=True)
set_signature(ResidualLFQ, [("dim", REQUIRED), ("codebook_size", REQUIRED)], RLFQ_OPTIONS, keyword_only=True)
