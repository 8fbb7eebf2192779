"""``ResidualVQ`` and ``GroupedResidualVQ`` with the peer's keywords, call and return tuples, over
:class:`quantkit.quantizers.ResidualQuantizer` of ``VectorQuantizer`` levels (SoundStream, arXiv:2107.03312;
RQ-VAE, arXiv:2203.01941; grouped RVQ, arXiv:2305.02765).

One ``project_in`` / ``project_out`` pair surrounds the whole stack (the peer's ``codebook_dim``); every level is a
quantkit ``VectorQuantizer`` built from the same peer keywords as :class:`VectorQuantize`.

The one idea to hold: layout is handled once, before the projection, so ``accept_image_fmap`` works (it crashes in
the peer), and in training the output is the decode of the returned indices after the codebook update (no drift).
Per-level codebook sizes, ``quant_grad_frac`` and beam search are options of the native ``ResidualQuantizer``
(``codebook_sizes``, ``quant_grad_frac``, :class:`BeamSearch`); ``freeze_codebook`` is ``ResidualQuantizer.stepping``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contextlib import nullcontext

from ...quantizers import CodebookStep, ResidualQuantizer
from ...quantizers.gradients import straight_through
from ...quantizers.residual import BeamSearch, ImplicitCodebook
from ._common import (REQUIRED, Option, apply_padding, from_channels_last, load_codebook,
                      load_projections, only_default, parse_options, reject_call, set_signature, swapped,
                      to_channels_last)
from .vq import VQ_OPTIONS, sampling_temperature, vq_core_kwargs

__all__ = ["ResidualVQ", "GroupedResidualVQ", "RVQ_OPTIONS", "residual_losses"]

_NS = "not supported"


_RVQ_OWN: dict[str, Option] = {
    "num_quantizers": Option(None, "`ResidualQuantizer(depth=...)` (None: len(codebook_size) for a tuple)"),
    "codebook_dim": Option(None, "the adapter's `project_in`/`project_out` around the stack"),
    "shared_codebook": Option(False, "`ResidualQuantizer(shared_codebook=True)`"),
    "diveq": Option(False, "`ResidualQuantizer(diveq=5e-3)` over gradient-trained levels (DiVeQ on the "
                           "whole stack, as in the peer; applied in training only, the peer also in eval)"),
    "heads": Option(1, "must be 1 (as in the peer)", only_default(1), "residual VQ has one head"),
    "quantize_dropout": Option(False, "`ResidualQuantizer(quantize_dropout=1.0)`: every training vector keeps a random "
                                      "prefix of levels (the peer draws one prefix per batch)"),
    "quantize_dropout_cutoff_index": Option(0, "`ResidualQuantizer(min_depth=cutoff + 1)`"),
    "quantize_dropout_multiple_of": Option(1, _NS, only_default(1), "quantkit draws any prefix length"),
    "accept_image_fmap": Option(False, "adapter layout: (B, C, H, W) in and out, indices (B, H, W, Q) "
                                       "(crashes in the peer)"),
    "implicit_neural_codebook": Option(False, "`ResidualQuantizer(implicit_codebook=ImplicitCodebook(...))` (QINCo, "
                                              "arXiv:2401.14732): gradient-trained levels, as in the peer"),
    "mlp_kwargs": Option({}, "`ImplicitCodebook(hidden=dim_hidden, blocks=depth)`",
                         lambda v, _: isinstance(v, dict) and set(v) <= {"dim_hidden", "depth"},
                         "only dim_hidden and depth (the peer sets l2norm_output itself)"),
    "beam_size": Option(None, "`ResidualQuantizer(beam=BeamSearch(width=...))`: beam search over residual paths on "
                              "the fused top-k search (no N x K)"),
    "eval_beam_size": Option(None, "`BeamSearch(eval_width=...)` (None: beam_size)",
                             lambda v, vals: v is None or vals["beam_size"] is not None,
                             "needs beam_size (as in the peer)"),
    "beam_score_quantizer_weights": Option(None, "`BeamSearch(level_weights=...)`"),
    "quant_grad_frac": Option(0.0, "0: quantkit's straight-through stack (the output's gradient reaches x "
                                   "through the first level); > 0: `ResidualQuantizer(quant_grad_frac=...)`, the "
                                   "peer's residual gradient",
                              lambda v, _: isinstance(v, (int, float)) and 0 <= v <= 1, "must lie in [0, 1]"),
    "return_zeros_for_masked_padding": Option(True, "adapter: padding positions get zeros (True) or the input"),
    "freeze_codebook": Option(False, "no effect, as in the peer (its forward passes freeze_codebook=False to every "
                                     "level); forward's `freeze_codebook=True` is `ResidualQuantizer.stepping("
                                     "CodebookStep(frozen=True))`"),
}
_LAYOUT_ONLY = {
    "channel_last": "residual VQ reads (..., dim), or feature maps with accept_image_fmap",
    "accept_3d_fmap": "residual VQ takes accept_image_fmap only",
    "separate_codebook_per_head": "residual VQ has one head",
}
#: ResidualVQ's own keywords, then the per-level VectorQuantize keywords it forwards.
RVQ_OPTIONS: dict[str, Option] = {
    **_RVQ_OWN,
    **{name: Option(opt.default, "must stay at the default", only_default(opt.default), _LAYOUT_ONLY[name])
       for name, opt in VQ_OPTIONS.items() if name in _LAYOUT_ONLY},
    **{name: opt for name, opt in VQ_OPTIONS.items() if name not in _RVQ_OWN and name not in _LAYOUT_ONLY},
}


def residual_losses(loss: Tensor, depth: int, training: bool) -> Tensor:
    """The peer's per-level loss vector (depth,) from quantkit's summed loss: each level holds loss / depth (so
    ``.sum()`` and ``.mean()`` match the peer); zeros in eval, as in the peer."""
    if not training:
        return torch.zeros(depth, device=loss.device)
    return (loss / depth).expand(depth)


class ResidualVQ(nn.Module):
    """The peer's ``ResidualVQ(dim=, codebook_size=, num_quantizers=, **keywords)``; see ``RVQ_OPTIONS``.

    ``forward(x, mask=None, ...) -> (quantized, indices (..., Q) int64, losses (Q,)[, all_codes])`` with all_codes
    (Q, ..., codebook_dim).
    """

    def __init__(self, *, dim: int, codebook_size: int | tuple[int, ...], **kwargs):
        super().__init__()
        o = parse_options("ResidualVQ", RVQ_OPTIONS, kwargs)
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else None
        depth = o["num_quantizers"] if o["num_quantizers"] is not None else (len(sizes) if sizes else None)
        if depth is None:
            raise ValueError("ResidualVQ: pass num_quantizers (or a tuple codebook_size)")
        if sizes is not None and len(sizes) != depth:
            raise ValueError(f"ResidualVQ: codebook_size={codebook_size!r} must have num_quantizers={depth} entries")
        self.dim, self.num_quantizers = dim, depth
        self.codebook_sizes = sizes or (codebook_size,) * depth
        self.codebook_size = self.codebook_sizes[0]
        self.uniform_codebook_size = len(set(self.codebook_sizes)) == 1
        self.codebook_dim = o["codebook_dim"] or dim
        self.has_projections = self.codebook_dim != dim
        self.project_in = nn.Linear(dim, self.codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, dim) if self.has_projections else nn.Identity()
        dropout = bool(o["quantize_dropout"]) and depth > 1
        implicit = None
        if o["implicit_neural_codebook"] or o["diveq"]:  # the peer trains these codebooks by gradient
            o = {**o, "learnable_codebook": True, "ema_update": False}
        if o["diveq"]:  # no per-level commitment; the codes learn through the stack's DiVeQ output
            o = {**o, "commitment_weight": 0.0}
        if o["implicit_neural_codebook"]:
            implicit = ImplicitCodebook(hidden=o["mlp_kwargs"].get("dim_hidden"),
                                        blocks=o["mlp_kwargs"].get("depth", 4))
        core = vq_core_kwargs(o, self.codebook_dim)
        commitment = core.pop("commitment_weight")
        size = dict(codebook_size=self.codebook_size) if self.uniform_codebook_size else \
            dict(codebook_sizes=self.codebook_sizes)
        self.beam_score_weights = o["beam_score_quantizer_weights"]
        beam = self._beam(o["beam_size"], o["eval_beam_size"])
        self.rq = ResidualQuantizer(self.codebook_dim, "vq", depth=depth, shared_codebook=o["shared_codebook"],
                                    quantize_dropout=1.0 if dropout else 0.0,
                                    min_depth=min(o["quantize_dropout_cutoff_index"] + 1, depth),
                                    quant_grad_frac=float(o["quant_grad_frac"]) or None, beam=beam,
                                    implicit_codebook=implicit, diveq=5e-3 if o["diveq"] else None,
                                    **size, **core)
        for layer in self.rq.layers:
            # ResidualQuantizer's own commitment_weight (RQ-VAE's partial-sum term, off here) shadows the levels'
            # keyword of that name: the peer's per-level commitment is set on each level.
            layer.commitment_weight = float(commitment)
        self.quantize_dropout = dropout
        self.shared_codebook = o["shared_codebook"]
        self.accept_image_fmap = o["accept_image_fmap"]
        self.return_zeros_for_masked_padding = o["return_zeros_for_masked_padding"]
        self.ema_update = core["ema"] is not None

    def _beam(self, width: int | None, eval_width: int | None = None) -> BeamSearch | None:
        """The peer's beam sizes -> BeamSearch (None: greedy in both modes)."""
        if width is None:
            return None
        weights = self.beam_score_weights
        return BeamSearch(int(width), None if eval_width is None else int(eval_width),
                          None if weights is None else tuple(weights))

    @property
    def codebooks(self) -> Tensor | tuple[Tensor, ...]:
        """(num_quantizers, codebook_size, codebook_dim); a tuple of (K_d, codebook_dim) when sizes differ."""
        weights = [self.rq.layer(d).codebook.weight for d in range(self.num_quantizers)]
        return torch.stack(weights) if self.uniform_codebook_size else tuple(weights)

    def _check_layout(self, x: Tensor) -> bool:
        if self.accept_image_fmap and x.dim() != 4:
            raise ValueError(f"ResidualVQ: accept_image_fmap expects (B, C, H, W), got {tuple(x.shape)}")
        return self.accept_image_fmap

    def forward(self, x: Tensor, mask: Tensor | None = None, indices: Tensor | None = None,
                return_all_codes: bool = False, sample_codebook_temp: float | None = None,
                freeze_codebook: bool = False, beam_size: int | None = None,
                rand_quantize_dropout_fixed_seed: int | None = None):
        reject_call("ResidualVQ",
                    indices=(indices, None, "the residual cross-entropy head is not in quantkit; use "
                                            "VectorQuantize(indices=...) per level"),
                    rand_quantize_dropout_fixed_seed=(rand_quantize_dropout_fixed_seed, None,
                                                      "seed quantkit's ResidualQuantizer(seed=...) instead"))
        channel_first = self._check_layout(x)
        z = to_channels_last(x, channel_first)  # (..., dim)
        h = self.project_in(z)  # (..., codebook_dim)
        beam = nullcontext() if beam_size is None else swapped([self.rq], "beam", lambda _: self._beam(beam_size))
        frozen = self.rq.stepping(CodebookStep(frozen=True)) if freeze_codebook else nullcontext()
        with sampling_temperature(self.rq.layers, sample_codebook_temp), beam, frozen:
            searched = self.rq.beam_width() > 1
            res = self.rq(h, mask=mask)
        q, idx = res.quantized, res.indices
        if self.training and self.ema_update:
            q = straight_through(q, self.rq.decode(idx).to(q.dtype))  # codes after this step's update
        losses = residual_losses(res.loss, self.num_quantizers, self.training)
        if searched and not self.training:
            losses = self._beam_eval_losses(h, idx, mask)
        out, idx = apply_padding(self.project_out(q), idx, mask,
                                 None if self.return_zeros_for_masked_padding else z, 1)
        ret = (from_channels_last(out, channel_first), idx, losses)
        return (*ret, self.get_codes_from_indices(idx)) if return_all_codes else ret

    @torch.no_grad()
    def _beam_eval_losses(self, h: Tensor, indices: Tensor, mask: Tensor | None) -> Tensor:
        """The peer's eval losses under beam search (Q,): per level, commitment_weight (when > 0) times the mean
        squared error of that level's residual (unit-normalized for cosine) to its code, averaged over the
        (masked-in) vectors."""
        codes = self.get_codes_from_indices(indices)  # (Q, ..., codebook_dim)
        cosine = self.rq.layer(0).metric == "cosine"
        residual, errors = h, []
        for d in range(self.num_quantizers):
            level_input = F.normalize(residual, dim=-1) if cosine else residual  # what the level compares
            errors.append((level_input - codes[d]).square().mean(-1))  # (...)
            residual = residual - codes[d]
        err = torch.stack(errors, dim=-1)  # (..., Q)
        weight = self.rq.layer(0).commitment_weight
        err = err * weight if weight > 0 else err
        if mask is None:
            return err.reshape(-1, self.num_quantizers).mean(0)
        return torch.where(mask[..., None], err, 0.0).reshape(-1, self.num_quantizers).sum(0) / \
            mask.sum().clamp_min(1e-4)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-level codes (Q, ..., codebook_dim), before project_out; -1 (or missing trailing levels) gives zeros."""
        levels = self.rq.decode_levels(indices.long())  # (Q', ..., codebook_dim), -1 gives zeros
        missing = self.num_quantizers - levels.shape[0]
        if missing:
            levels = torch.cat([levels, levels.new_zeros(missing, *levels.shape[1:])])
        return levels

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The output for indices (..., Q') with Q' <= Q levels, in forward's layout."""
        out = self.project_out(self.rq.decode(indices.long()))  # -1 levels add nothing
        return from_channels_last(out, self.accept_image_fmap)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor], prefix: str = "") -> "ResidualVQ":
        """Copies a peer ``ResidualVQ.state_dict()`` (same constructor keywords) into this adapter."""
        load_projections(self, state, prefix)
        for d, layer in enumerate(self.rq.layers):
            load_codebook(layer.codebook, state, f"{prefix}layers.{d}._codebook")
        for d, mlp in enumerate(self.rq.mlps or ()):  # QINCo's per-depth MLPs: the same parameter names
            mlp.load_state_dict({name: state[f"{prefix}mlps.{d}.{name}"] for name in mlp.state_dict()})
        return self


class GroupedResidualVQ(nn.Module):
    """The peer's ``GroupedResidualVQ(dim=, groups=, **ResidualVQ keywords)``: one ResidualVQ per channel group.

    ``forward -> (quantized, indices (G, ..., Q), losses (G, Q)[, all_codes (G, Q, ..., codebook_dim)])``.
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if dim % groups:
            raise ValueError(f"GroupedResidualVQ: groups={groups} must divide dim={dim}")
        self.dim, self.groups, self.accept_image_fmap = dim, groups, accept_image_fmap
        self.rvqs = nn.ModuleList([ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs)
                                   for _ in range(groups)])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    def forward(self, x: Tensor, indices: Tensor | None = None, return_all_codes: bool = False,
                sample_codebook_temp: float | None = None, freeze_codebook: bool = False,
                mask: Tensor | None = None):
        reject_call("GroupedResidualVQ", indices=(indices, None, "the residual cross-entropy head is not in quantkit"))
        outs = [rvq(chunk, mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                    freeze_codebook=freeze_codebook)
                for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))]
        quantized = torch.cat([o[0] for o in outs], dim=self.split_dim)
        return (quantized, *(torch.stack([o[i] for o in outs]) for i in range(1, len(outs[0]))))

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(i) for rvq, i in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return torch.cat([rvq.get_output_from_indices(i) for rvq, i in zip(self.rvqs, indices)], dim=self.split_dim)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "GroupedResidualVQ":
        for g, rvq in enumerate(self.rvqs):
            rvq.load_peer_state_dict(state, prefix=f"rvqs.{g}.")
        return self


set_signature(ResidualVQ, [("dim", REQUIRED), ("codebook_size", REQUIRED)], RVQ_OPTIONS, keyword_only=True)
