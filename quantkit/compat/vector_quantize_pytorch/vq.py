"""``VectorQuantize`` with the peer's keywords, call and return tuple, over :class:`quantkit.quantizers.VectorQuantizer`
(VQ-VAE, arXiv:1711.00937).

Layout: x is moved channels-last (image / 3-D feature maps, ``channel_last=False``), projected to
``heads * codebook_dim`` (the peer's ``project_in``), quantized by one quantkit ``VectorQuantizer`` (heads sharing a
codebook) or one per head (``separate_codebook_per_head``), projected back and moved back.

The one idea to hold: in training, the returned ``quantized`` is ``get_output_from_indices(indices)`` evaluated after
the step's codebook update (EMA, revival), with quantkit's gradient; so indices never drift from the output (the
peer's issue #224). Per-call codebook options (``freeze_codebook``, ``ema_update_weight``, ``accum_ema_update``)
become one :class:`quantkit.quantizers.CodebookStep` for the call; ``topk`` is ``VectorQuantizer.nearest``.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quantizers import CodebookStep, DeadCodeConfig, EMAConfig, KMeansInit, Sampling, VectorQuantizer
from ...quantizers.gradients import straight_through
from ._common import (REQUIRED, Option, apply_padding, decode_with_sentinel, from_channels_last, lens_to_mask,
                      load_codebook, load_projections, only_default, parse_options, reject_call, set_signature, swapped,
                      to_channels_last, unless)

__all__ = ["VectorQuantize", "LossBreakdown", "VQ_OPTIONS", "vq_core_kwargs"]

_NS = "not supported"


class LossBreakdown(NamedTuple):
    """The peer's ``return_loss_breakdown`` tuple (unweighted terms)."""

    commitment: Tensor
    codebook_diversity: Tensor
    orthogonal_reg: Tensor
    inplace_optimize: Tensor


def _decay_ok(value, _):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1


# Peer keyword -> quantkit. Geometry and layout first, then the codebook, then what quantkit does not implement.
VQ_OPTIONS: dict[str, Option] = {
    "codebook_dim": Option(None, "`VectorQuantizer(dim=heads * codebook_dim, heads=heads)` behind the adapter's "
                                 "`project_in`/`project_out` (when `heads * codebook_dim != dim`)"),
    "heads": Option(1, "`VectorQuantizer(heads=...)`; indices gain a trailing heads axis"),
    "separate_codebook_per_head": Option(False, "one `VectorQuantizer` per head"),
    "decay": Option(0.8, "`EMAConfig(decay=...)` (1: EMA never moves the codes)", _decay_ok,
                    "quantkit's EMAConfig.decay must lie in (0, 1]"),
    "eps": Option(1e-5, "`EMAConfig(eps=...)`"),
    "freeze_codebook": Option(False, "`Codebook.stepping(CodebookStep(frozen=True))` for every call (forward's "
                                     "`freeze_codebook` overrides it)"),
    "kmeans_init": Option(False, "`KMeansInit()` (faiss k-means once `codebook_size` vectors were seen)"),
    "kmeans_iters": Option(10, "`KMeansInit(niter=...)`"),
    "sync_kmeans": Option(True, "always: k-means runs on rank 0 and is broadcast", only_default(True),
                          "quantkit always synchronizes k-means across ranks"),
    "use_cosine_sim": Option(False, "`VectorQuantizer(metric='cosine')`"),
    "layernorm_after_project_in": Option(False, _NS, only_default(False), "put a LayerNorm before the adapter"),
    "threshold_ema_dead_code": Option(0, "`DeadCodeConfig(threshold=...)` when > 0"),
    "channel_last": Option(True, "adapter layout: `False` reads (B, D, N)"),
    "accept_image_fmap": Option(False, "adapter layout: (B, C, H, W) in and out, indices (B, H, W)"),
    "accept_3d_fmap": Option(False, "adapter layout: (B, C, D, H, W) in and out"),
    "commitment_weight": Option(1.0, "`VectorQuantizer(commitment_weight=...)`"),
    "commitment_use_cross_entropy_loss": Option(False, _NS, only_default(False), "quantkit never builds the N x K "
                                                                                 "distance matrix it needs"),
    "orthogonal_reg_weight": Option(0.0, _NS, only_default(0.0), "no orthogonal regularizer in quantkit"),
    "orthogonal_reg_active_codes_only": Option(False, "no effect while `orthogonal_reg_weight = 0` (as in the peer)",
                                               unless("orthogonal_reg_weight", False)),
    "orthogonal_reg_max_codes": Option(None, "no effect while `orthogonal_reg_weight = 0` (as in the peer)",
                                       unless("orthogonal_reg_weight", None)),
    "codebook_diversity_loss_weight": Option(0.0, _NS, only_default(0.0), "no diversity loss on VQ in quantkit; "
                                                                          "LFQ has EntropyLoss"),
    "codebook_diversity_temperature": Option(100.0, "no effect while `codebook_diversity_loss_weight = 0`",
                                             unless("codebook_diversity_loss_weight", 100.0)),
    "stochastic_sample_codes": Option(False, "`Sampling(temperature=sample_codebook_temp)` (among the 16 nearest)"),
    "sample_codebook_temp": Option(1.0, "`Sampling.temperature`; 0 means nearest code",
                                   lambda v, _: isinstance(v, (int, float)) and v >= 0, "must be a number >= 0"),
    "straight_through": Option(False, _NS, only_default(False), "no Gumbel-softmax estimator in quantkit; "
                                                                "use SoftVQ"),
    "rotation_trick": Option(None, "`VectorQuantizer(gradient='rotation')` (None: when dim > 1), else "
                                   "'straight_through'"),
    "directional_reparam": Option(False, "`VectorQuantizer(gradient='diveq', ema=None, commitment_weight=0, "
                                         "codebook_weight=0)` (DiVeQ; needs `threshold_ema_dead_code > 0`)"),
    "directional_reparam_variance": Option(5e-3, "`VectorQuantizer(diveq_variance=...)`"),
    "sync_codebook": Option(None, "always: statistics are all-reduced whenever torch.distributed is initialized",
                            lambda v, _: v is None or v is True, "quantkit always synchronizes codebooks"),
    "sync_affine_param": Option(False, _NS, only_default(False), "no affine re-standardization in quantkit"),
    "ema_update": Option(None, "`EMAConfig` (None / True); `False` needs `learnable_codebook=True` (the default "
                               "with `directional_reparam`)",
                         lambda v, vals: v is None or v is True or bool(vals["learnable_codebook"])
                         or (vals["directional_reparam"] and vals["learnable_codebook"] is None),
                         "a fixed random codebook is not a quantkit mode; pass learnable_codebook=True for a "
                         "gradient-trained one (VectorQuantizer(ema=None))"),
    "vq_bridge": Option(None, _NS, only_default(None), "no codebook bridge network in quantkit"),
    "manual_ema_update": Option(False, _NS, only_default(False), "quantkit updates the EMA in every training "
                                                                 "forward"),
    "learnable_codebook": Option(None, "`VectorQuantizer(ema=None, codebook_weight=commitment_weight)`: the codebook "
                                       "is an nn.Parameter trained by the codebook loss"),
    "in_place_codebook_optimizer": Option(None, _NS, only_default(None), "train the codebook with your own optimizer "
                                                                         "(learnable_codebook=True)"),
    "manual_in_place_optimizer_update": Option(False, "no effect without `in_place_codebook_optimizer` "
                                                      "(as in the peer)", unless("in_place_codebook_optimizer", False)),
    "affine_param": Option(False, _NS, only_default(False), "no affine re-standardization in quantkit"),
    "affine_param_batch_decay": Option(0.99, "no effect while `affine_param = False`",
                                       unless("affine_param", 0.99)),
    "affine_param_codebook_decay": Option(0.9, "no effect while `affine_param = False`",
                                          unless("affine_param", 0.9)),
    "sync_update_v": Option(0.0, _NS, only_default(0.0), "no synchronous update rule in quantkit"),
    "return_zeros_for_masked_padding": Option(True, "adapter: padding positions get zeros (True) or the input"),
    "route_gradients_to_input": Option(True, _NS, only_default(True), "detach the adapter's input instead"),
}


def _check_diveq(o: dict) -> None:
    """The peer's own assertions around DiVeQ, as clear errors."""
    if not o["directional_reparam"]:
        return
    if o["threshold_ema_dead_code"] <= 0:
        raise ValueError("VectorQuantize: directional_reparam=True needs threshold_ema_dead_code > 0 (periodic "
                         "dead-code replacement), as in the peer")
    if o["rotation_trick"] or o["straight_through"]:
        raise ValueError("VectorQuantize: directional_reparam excludes rotation_trick and straight_through")
    if o["ema_update"] or o["learnable_codebook"] is False:
        raise ValueError("VectorQuantize: directional_reparam trains the codebook by gradient (learnable_codebook, no "
                         "EMA update)")


def vq_core_kwargs(o: dict, dim: int) -> dict:
    """quantkit ``VectorQuantizer`` keywords (everything but dim / codebook_size / heads) from parsed peer options."""
    _check_diveq(o)
    diveq = bool(o["directional_reparam"])
    learnable = bool(o["learnable_codebook"]) or o["ema_update"] is False or diveq
    rotation = o["rotation_trick"] if o["rotation_trick"] is not None else (dim > 1 and not diveq)
    sample = o["stochastic_sample_codes"] and o["sample_codebook_temp"] > 0
    commitment = 0.0 if diveq else o["commitment_weight"]  # the peer has no commitment loss under DiVeQ
    return dict(
        metric="cosine" if o["use_cosine_sim"] else "l2",
        ema=None if learnable else EMAConfig(decay=o["decay"], eps=o["eps"]),
        commitment_weight=commitment,
        codebook_weight=commitment,
        dead_code=DeadCodeConfig(threshold=o["threshold_ema_dead_code"]) if o["threshold_ema_dead_code"] > 0 else None,
        kmeans_init=KMeansInit(niter=o["kmeans_iters"]) if o["kmeans_init"] else None,
        gradient="diveq" if diveq else "rotation" if rotation else "straight_through",
        diveq_variance=o["directional_reparam_variance"],
        sampling=Sampling(temperature=o["sample_codebook_temp"]) if sample else None,
    )


def _per_codebook_weights(weight, codebooks: int, size: int) -> list:
    """The peer's ``ema_update_weight`` ((K,) or (codebooks, K) tensor, or a callable on (h, K, D) sums and (h, K)
    counts) -> one quantkit ``CodebookStep.weight`` per codebook. A callable is called per codebook with a
    one-head view (the peer calls it once on every head together)."""
    if weight is None:
        return [None] * codebooks
    if callable(weight) and not isinstance(weight, Tensor):
        def one_head(sums, counts, fn=weight):
            out = fn(None if sums is None else sums[None], counts[None])
            return out.reshape(-1, size)[0]
        return [one_head] * codebooks
    if not isinstance(weight, Tensor) or weight.dim() not in (1, 2) or weight.shape[-1] != size \
            or (weight.dim() == 2 and weight.shape[0] not in (1, codebooks)):
        raise ValueError(f"ema_update_weight must be a tensor of shape ({size},) or ({codebooks}, {size}), or a "
                         f"callable; got {getattr(weight, 'shape', type(weight).__name__)}")
    rows = weight.reshape(-1, size)
    return [rows[i if rows.shape[0] > 1 else 0] for i in range(codebooks)]


@contextmanager
def codebook_steps(quantizers, frozen: bool, weight=None, accumulate: bool = False) -> Iterator[None]:
    """One ``CodebookStep`` for this call on every quantizer's codebook (nothing to do for the default step). A
    refused weight leaves every codebook's rule as it was."""
    if not frozen and weight is None and not accumulate:
        yield
        return
    weights = _per_codebook_weights(weight, len(quantizers), quantizers[0].codebook_size)
    with ExitStack() as stack:
        for q, w in zip(quantizers, weights):
            stack.enter_context(q.codebook.stepping(CodebookStep(weight=w, accumulate=bool(accumulate),
                                                                 frozen=frozen)))
        yield


def sampling_temperature(quantizers, temperature: float | None):
    """Per-call ``sample_codebook_temp`` on quantkit VectorQuantizers (0 = nearest code; None = as constructed)."""
    if temperature is None:
        return nullcontext()
    return swapped(quantizers, "sampling", lambda old: Sampling(temperature=temperature, topk=(old or Sampling()).topk)
                   if temperature > 0 else None)


class VectorQuantize(nn.Module):
    """The peer's ``VectorQuantize(dim, codebook_size, **keywords)``; see ``VQ_OPTIONS`` for every keyword.

    ``forward(x, ...) -> (quantized, indices int64, loss scalar[, LossBreakdown])``; with ``indices=`` given,
    ``(quantized, cross-entropy of those indices under softmax(-distance))``.
    """

    def __init__(self, dim: int, codebook_size: int, **kwargs):
        super().__init__()
        o = parse_options("VectorQuantize", VQ_OPTIONS, kwargs)
        if o["accept_image_fmap"] and o["accept_3d_fmap"]:
            raise ValueError("VectorQuantize: accept_image_fmap and accept_3d_fmap are exclusive")
        self.dim, self.codebook_size, self.heads = dim, codebook_size, o["heads"]
        self.separate_codebook_per_head = o["separate_codebook_per_head"]
        self.codebook_dim = o["codebook_dim"] or dim
        inner = self.codebook_dim * self.heads
        self.has_projections = inner != dim
        self.project_in = nn.Linear(dim, inner) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(inner, dim) if self.has_projections else nn.Identity()
        core = vq_core_kwargs(o, dim)
        if self.separate_codebook_per_head:
            quantizers = [VectorQuantizer(self.codebook_dim, codebook_size, **core) for _ in range(self.heads)]
        else:
            quantizers = [VectorQuantizer(inner, codebook_size, heads=self.heads, **core)]
        self.quantizers = nn.ModuleList(quantizers)
        self.channel_last, self.accept_image_fmap = o["channel_last"], o["accept_image_fmap"]
        self.accept_3d_fmap = o["accept_3d_fmap"]
        self.commitment_weight = o["commitment_weight"]
        self.return_zeros_for_masked_padding = o["return_zeros_for_masked_padding"]
        self.ema_update = core["ema"] is not None
        self.freeze_codebook = bool(o["freeze_codebook"])
        if o["directional_reparam"]:
            self.commitment_weight = 0.0  # no commitment loss under DiVeQ (its breakdown term is zero)

    # ------------------------------------------------------------------------------------------------------------
    # layout

    def _channel_first(self, x: Tensor) -> bool:
        if self.accept_image_fmap or self.accept_3d_fmap:
            want = 4 if self.accept_image_fmap else 5
            if x.dim() != want:
                raise ValueError(f"VectorQuantize: expected a {want}-D channel-first feature map, got {tuple(x.shape)}")
            return True
        return not self.channel_last and x.dim() == 3

    @property
    def _index_axes(self) -> int:
        return 1 if self.heads > 1 else 0

    @property
    def codebook(self) -> Tensor:
        """(codebook_size, codebook_dim), or (heads, codebook_size, codebook_dim) with separate codebooks."""
        weights = [q.codebook.weight for q in self.quantizers]
        return torch.stack(weights) if self.separate_codebook_per_head else weights[0]

    # ------------------------------------------------------------------------------------------------------------
    # the quantkit call

    def _quantize(self, h: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """h (..., heads * codebook_dim) -> (quantized like h, indices (...[, heads]), loss)."""
        if not self.separate_codebook_per_head:
            out = self.quantizers[0](h, mask=mask)
            q, indices, loss = out.quantized, out.indices, out.loss
        else:
            outs = [qz(hh, mask=mask) for qz, hh in zip(self.quantizers, h.unflatten(-1, (self.heads, -1)).unbind(-2))]
            q = torch.cat([o.quantized for o in outs], dim=-1)
            indices = torch.stack([o.indices for o in outs], dim=-1)
            loss = torch.stack([o.loss for o in outs]).mean()  # equal-size heads: the mean over every element
        if self.training and self.ema_update:
            # The EMA step (and revival) moved the codebook after the lookup: report the codes the indices now name.
            q = straight_through(q, self._codes(indices).to(q.dtype))
        return q, indices, loss

    def _codes(self, indices: Tensor) -> Tensor:
        """indices (...[, heads]) -> codebook-space codes (..., heads * codebook_dim); -1 gives zeros."""
        if not self.separate_codebook_per_head:
            # One codebook for every head: each head's index is looked up in it, heads concatenated.
            return decode_with_sentinel(self.quantizers[0].codebook.lookup, indices).flatten(-2) if self.heads > 1 \
                else decode_with_sentinel(self.quantizers[0].decode, indices)
        return torch.cat([decode_with_sentinel(q.decode, i) for q, i in zip(self.quantizers, indices.unbind(-1))],
                         dim=-1)

    def _cross_entropy(self, h: Tensor, indices: Tensor) -> Tensor:
        """Mean cross-entropy of the given indices under softmax(-distance) (cosine: similarity), -1 ignored."""
        rows = h.reshape(-1, self.codebook_dim)  # (N * heads, codebook_dim)
        if self.separate_codebook_per_head:
            rows = h.reshape(-1, self.heads, self.codebook_dim)
        codebooks = [q.codebook for q in self.quantizers]
        metric = self.quantizers[0].metric
        if metric == "cosine":
            rows = F.normalize(rows, dim=-1)
        logits = []
        for i, cb in enumerate(codebooks):
            r = rows[:, i] if self.separate_codebook_per_head else rows
            w = cb.lookup(torch.arange(cb.num_codes, device=h.device)).to(r.dtype)
            logits.append(r @ w.T if metric == "cosine" else -torch.cdist(r, w))
        logits = torch.stack(logits, dim=1).reshape(-1, self.codebook_size) if self.separate_codebook_per_head \
            else logits[0]
        return F.cross_entropy(logits.float(), indices.reshape(-1).long(), ignore_index=-1)

    # ------------------------------------------------------------------------------------------------------------
    # public API (the peer's)

    def forward(self, x: Tensor, indices: Tensor | None = None, mask: Tensor | None = None, lens: Tensor | None = None,
                topk: int | None = None, sample_codebook_temp: float | None = None, freeze_codebook: bool | None = None,
                return_loss_breakdown: bool = False, codebook_transform_fn=None, ema_update_weight=None,
                accum_ema_update: bool = False, ema_update: bool | None = None):
        reject_call("VectorQuantize",
                    codebook_transform_fn=(codebook_transform_fn, None, "the implicit neural codebook lives in "
                                           "ResidualVQ(implicit_neural_codebook=True)"),
                    ema_update=(ema_update if ema_update is not None else True, True,
                                "quantkit always applies the EMA step in training; use eval() to skip it"))
        if mask is not None and lens is not None:
            raise ValueError("VectorQuantize.forward: pass mask or lens, not both")
        channel_first = self._channel_first(x)
        z = to_channels_last(x, channel_first)  # (..., dim)
        if lens is not None:
            mask = lens_to_mask(lens, z.shape[1])
        h = self.project_in(z)  # (..., heads * codebook_dim)
        if topk is not None:
            return self._topk(z, h, mask, topk, channel_first, return_loss_breakdown)
        if indices is not None:
            if self.training:
                raise ValueError("VectorQuantize.forward: indices= (the cross-entropy loss) is computed in eval() "
                                 "only, so that it never updates the codebook")
            quantized, *_ = self.forward(x, mask=mask)
            return quantized, self._cross_entropy(h, indices)
        frozen = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        with sampling_temperature(self.quantizers, sample_codebook_temp), \
                codebook_steps(self.quantizers, frozen, ema_update_weight, accum_ema_update):
            q, idx, loss = self._quantize(h, mask)
        out, idx = apply_padding(self.project_out(q), idx, mask,
                                 None if self.return_zeros_for_masked_padding else z, self._index_axes)
        out = from_channels_last(out, channel_first)
        if not self.training:
            loss = torch.zeros((), device=x.device)
        if not return_loss_breakdown:
            return out, idx, loss
        zero = torch.zeros((), device=x.device)
        # quantkit's loss is commitment_weight * commit (EMA), or that plus an equal codebook term (learnable).
        parts = 1 if self.ema_update else 2
        commit = loss / (parts * self.commitment_weight) if self.commitment_weight else zero
        return out, idx, loss, LossBreakdown(commit, zero, zero, zero)

    def _topk(self, z: Tensor, h: Tensor, mask: Tensor | None, topk: int, channel_first: bool, breakdown: bool):
        """forward(topk=k): the k nearest codes of every vector (``VectorQuantizer.nearest``, the fused top-k
        search), quantized (..., k, dim) (channel-first: (B, dim, *spatial, k)), indices (..., k) and the per-code
        commitment loss (..., k); the codebook is not updated, as in the peer."""
        if self.heads != 1 or isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"VectorQuantize.forward: topk must be a positive int and needs heads == 1, got "
                             f"topk={topk!r} with heads={self.heads}")
        codes, idx, error = self.quantizers[0].nearest(h, topk)  # (..., k, C), (..., k), (..., k)
        out = self.project_out(codes)  # (..., k, dim)
        zero = torch.zeros((), device=z.device)
        loss = error * self.commitment_weight if self.commitment_weight > 0 else error
        if self.training and not self.commitment_weight > 0:
            loss = zero  # the peer's training loss without a commitment term
        if mask is not None:
            fill = torch.zeros_like(out) if self.return_zeros_for_masked_padding else z[..., None, :].expand_as(out)
            out = torch.where(mask[..., None, None], out, fill)
            idx = torch.where(mask[..., None], idx, -1)
            error = torch.where(mask[..., None], error, 0.0)
            if loss.dim():
                loss = torch.where(mask[..., None], loss, 0.0)
        out = from_channels_last(out, channel_first)
        return (out, idx, loss, LossBreakdown(error, zero, zero, zero)) if breakdown else (out, idx, loss)

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Raw codebook vectors (before project_out) for indices (...[, heads]); channel-first for feature maps."""
        codes = self._codes(indices)
        return from_channels_last(codes, self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """What forward returns for these indices (eval, or after the training step that produced them)."""
        out = self.project_out(self._codes(indices))
        return from_channels_last(out, self.accept_image_fmap or self.accept_3d_fmap or not self.channel_last)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "VectorQuantize":
        """Copies a peer ``VectorQuantize.state_dict()`` (same constructor keywords) into this adapter."""
        load_projections(self, state)
        for head, q in enumerate(self.quantizers):
            load_codebook(q.codebook, state, "_codebook", head)
        return self


set_signature(VectorQuantize, [("dim", REQUIRED), ("codebook_size", REQUIRED)], VQ_OPTIONS)
