"""``SimVQ`` and ``ResidualSimVQ`` with the peer's keywords, call and return tuples, over
:class:`quantkit.quantizers.SimVQ` (arXiv:2411.02038) and :class:`quantkit.quantizers.ResidualQuantizer` of SimVQ
levels (SoundStream's residual stack, arXiv:2107.03312).

The peer's loss ``commitment_weight * (||sg(x) - q||^2 + input_to_quantize_commit_loss_weight * ||x - sg(q)||^2)``
is quantkit's ``SimVQ(codebook_weight=commitment_weight, commitment_weight=commitment_weight * input_weight)``.

The one idea to hold: the adapter only renames. The frozen codebook, the transform, the search and the gradient are
quantkit's SimVQ; ``load_peer_state_dict`` copies ``frozen_codebook`` and ``code_transform.*`` into it, after which
indices equal the peer's and outputs equal them to rounding (the peer returns the code passed through the rotation
formula even in eval, a few float32 ulps off the code; quantkit returns the code exactly).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quantizers import ResidualQuantizer
from ...quantizers import SimVQ as _SimVQ
from ._common import REQUIRED, Option, decode_with_sentinel, only_default, parse_options, reject_call, set_signature

__all__ = ["SimVQ", "ResidualSimVQ", "SIMVQ_OPTIONS", "RESIDUAL_SIMVQ_OPTIONS"]

_NS = "not supported"


class _Identity:
    """The peer's default ``init_fn``: leaves the frozen draw as it is (with a repr that is the same in every
    process, for the docs table)."""

    def __call__(self, t: Tensor) -> Tensor:
        return t

    def __repr__(self) -> str:
        return "identity"


identity = _Identity()


SIMVQ_OPTIONS: dict[str, Option] = {
    "codebook_transform": Option(None, "`SimVQ(codebook_transform=...)` (None: `nn.Linear(frozen_dim, dim, "
                                       "bias=False)`)"),
    "init_fn": Option(identity, "`SimVQ(frozen_init=...)`, applied once to the frozen N(0, 1 / F) draw"),
    "channel_first": Option(False, "`SimVQ(channel_first=...)`: (B, dim, *spatial) in and out"),
    "rotation_trick": Option(True, "`SimVQ(gradient='rotation')`, else 'straight_through'"),
    "input_to_quantize_commit_loss_weight": Option(0.25, "`SimVQ(commitment_weight=commitment_weight * this)`"),
    "commitment_weight": Option(1.0, "`SimVQ(codebook_weight=...)`, and the factor of the encoder term"),
    "frozen_codebook_dim": Option(None, "`SimVQ(frozen_dim=...)` (None: dim)"),
}


def _core_kwargs(o: dict) -> dict:
    """quantkit ``SimVQ`` keywords from parsed peer options (everything but dim / codebook_size / layout)."""
    weight = o["commitment_weight"]
    return dict(frozen_dim=o["frozen_codebook_dim"], codebook_transform=o["codebook_transform"],
                frozen_init=None if o["init_fn"] is identity else o["init_fn"], codebook_weight=weight,
                commitment_weight=weight * o["input_to_quantize_commit_loss_weight"],
                gradient="rotation" if o["rotation_trick"] else "straight_through")


@torch.no_grad()
def _load_simvq(core: _SimVQ, state: dict[str, Tensor], prefix: str = "") -> None:
    """Copies a peer SimVQ's ``frozen_codebook`` and ``code_transform.*`` (under ``prefix``) into quantkit's."""
    core.frozen_codebook.copy_(state[f"{prefix}frozen_codebook"])
    transform = {k[len(f"{prefix}code_transform."):]: v for k, v in state.items()
                 if k.startswith(f"{prefix}code_transform.")}
    core.codebook_transform.load_state_dict(transform)


class SimVQ(nn.Module):
    """The peer's ``SimVQ(dim, codebook_size, **keywords)``; see ``SIMVQ_OPTIONS``.

    ``forward(x) -> (quantized, indices int64, loss scalar)``; the loss is computed in eval too, as in the peer.
    """

    def __init__(self, dim: int, codebook_size: int, **kwargs):
        super().__init__()
        o = parse_options("SimVQ", SIMVQ_OPTIONS, kwargs)
        self.dim, self.codebook_size, self.channel_first = dim, codebook_size, o["channel_first"]
        self.core = _SimVQ(dim, codebook_size, channel_first=self.channel_first, **_core_kwargs(o))

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook (codebook_size, dim)."""
        return self.core.implicit_codebook()

    @property
    def frozen_codebook(self) -> Tensor:
        return self.core.frozen_codebook

    def forward(self, x: Tensor):
        out = self.core(x)
        return out.quantized, out.indices, out.loss

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """indices (b, ...) -> codes (b, ..., dim), channel-first when channel_first."""
        return self.core.decode(indices.long())

    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "SimVQ":
        """Copies a peer ``SimVQ.state_dict()`` (same constructor keywords) into this adapter."""
        _load_simvq(self.core, state)
        return self


_RESIDUAL_OWN: dict[str, Option] = {
    "num_quantizers": Option(REQUIRED, "`ResidualQuantizer(depth=...)`"),
    "heads": Option(1, "must be 1 (as in the peer)", only_default(1), "residual SimVQ has one head"),
    "quantize_dropout": Option(False, "`ResidualQuantizer(quantize_dropout=1.0)`: every training vector keeps a random "
                                      "prefix of levels (the peer draws one prefix per batch)"),
    "quantize_dropout_cutoff_index": Option(0, "`ResidualQuantizer(min_depth=cutoff + 1)`"),
    "quantize_dropout_multiple_of": Option(1, _NS, only_default(1), "quantkit draws any prefix length"),
}
#: ResidualSimVQ's own keywords, then the SimVQ keywords it forwards to every level.
RESIDUAL_SIMVQ_OPTIONS: dict[str, Option] = {
    **_RESIDUAL_OWN,
    **{name: opt for name, opt in SIMVQ_OPTIONS.items() if name != "channel_first"},
    "channel_first": Option(False, "`ResidualQuantizer(channel_first=...)`: (B, dim, *spatial) in and out, indices "
                                   "(B, *spatial, Q)"),
}


class ResidualSimVQ(nn.Module):
    """The peer's ``ResidualSimVQ(dim=, num_quantizers=, codebook_size=, **keywords)``; see
    ``RESIDUAL_SIMVQ_OPTIONS``.

    ``forward(x) -> (quantized, indices (..., Q) int64, losses (Q,)[, all_codes (Q, ..., dim)])``. quantkit's
    residual stack sums the levels' losses, so each entry of ``losses`` is that sum / Q: ``losses.sum()`` equals the
    peer's, single entries do not.
    """

    def __init__(self, *, dim: int, codebook_size: int, **kwargs):
        super().__init__()
        o = parse_options("ResidualSimVQ", RESIDUAL_SIMVQ_OPTIONS, kwargs)
        if o["num_quantizers"] is REQUIRED:
            raise TypeError("ResidualSimVQ.__init__() missing required keyword argument: 'num_quantizers'")
        depth = o["num_quantizers"]
        self.dim, self.codebook_size, self.num_quantizers = dim, codebook_size, depth
        self.channel_first = o["channel_first"]
        self.quantize_dropout = bool(o["quantize_dropout"]) and depth > 1
        core = _core_kwargs(o)
        commitment = core.pop("commitment_weight")
        self.rq = ResidualQuantizer(dim, "simvq", depth=depth, quantize_dropout=1.0 if self.quantize_dropout else 0.0,
                                    min_depth=min(o["quantize_dropout_cutoff_index"] + 1, depth),
                                    channel_first=self.channel_first, codebook_size=codebook_size, **core)
        for layer in self.rq.layers:
            # ResidualQuantizer's own commitment_weight (RQ-VAE's partial-sum term, off here) shadows the levels'
            # keyword of that name: the peer's per-level encoder term is set on each level.
            layer.commitment_weight = float(commitment)

    @property
    def codebooks(self) -> Tensor:
        """(num_quantizers, codebook_size, dim)."""
        return torch.stack([layer.implicit_codebook() for layer in self.rq.layers])

    def forward(self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: int | None = None):
        reject_call("ResidualSimVQ",
                    rand_quantize_dropout_fixed_seed=(rand_quantize_dropout_fixed_seed, None,
                                                      "seed quantkit's ResidualQuantizer(seed=...) instead"))
        out = self.rq(x)
        losses = (out.loss / self.num_quantizers).expand(self.num_quantizers)
        ret = (out.quantized, out.indices, losses)
        return (*ret, self.get_codes_from_indices(out.indices)) if return_all_codes else ret

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """Per-level codes (Q, b, ..., dim) (channel-first: (Q, b, dim, ...)); -1 or missing levels give zeros."""
        padded = F.pad(indices.long(), (0, self.num_quantizers - indices.shape[-1]), value=-1)  # (b, ..., Q)
        codes = torch.stack([decode_with_sentinel(self.rq.layer(d).decode, padded[..., d])
                             for d in range(self.num_quantizers)])  # (Q, b, ..., dim)
        return codes.movedim(-1, 2) if self.channel_first else codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The output for indices (..., Q') with Q' <= Q levels (-1 levels add nothing), in forward's layout."""
        return self.rq.decode(indices.long())

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "ResidualSimVQ":
        """Copies a peer ``ResidualSimVQ.state_dict()`` (same constructor keywords) into this adapter."""
        for d, layer in enumerate(self.rq.layers):
            _load_simvq(layer, state, f"layers.{d}.")
        return self


set_signature(SimVQ, [("dim", REQUIRED), ("codebook_size", REQUIRED)], SIMVQ_OPTIONS)
set_signature(ResidualSimVQ, [("dim", REQUIRED), ("codebook_size", REQUIRED)], RESIDUAL_SIMVQ_OPTIONS,
              keyword_only=True)
