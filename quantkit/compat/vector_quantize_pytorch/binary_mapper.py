"""``BinaryMapper`` with the peer's keywords, call and return tuple, over :class:`quantkit.quantizers.BinaryMapper`
(the Free Transformer's binary mapper, Fleuret 2025, arXiv:2510.17558).

quantkit's BinaryMapper draws the bits (the same ``torch.bernoulli`` call on the same probabilities as the peer, so
under one seed the same samples), builds the straight-through one-hot and computes the free-bits KL; the adapter maps
the peer's per-call switches (temperature, deterministic, straight_through, calc_aux_loss) onto it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...quantizers import BinaryMapper as _BinaryMapper
from ._common import Option, swapped

__all__ = ["BinaryMapper", "BINARY_MAPPER_OPTIONS"]

BINARY_MAPPER_OPTIONS: dict[str, Option] = {
    "bits": Option(1, "`BinaryMapper(dim=bits)`"),
    "kl_loss_threshold": Option(math.log(2), "`BinaryMapper(kl_threshold=...)`"),
    "deterministic_on_eval": Option(False, "`BinaryMapper(sampling='train')` when True; False (the peer's default) "
                                           "samples in eval too, `sampling='always'`"),
}


def _default(value, fallback):
    return fallback if value is None else value


class BinaryMapper(nn.Module):
    """The peer's ``BinaryMapper(bits=1, kl_loss_threshold=ln 2, deterministic_on_eval=False)``.

    ``forward(logits, temperature=1., straight_through=None, calc_aux_loss=None, deterministic=None,
    return_indices=False, reduce_aux_kl_loss=True) -> (one_hot (..., 2^bits), [indices (...),] aux_kl_loss)``.
    """

    def __init__(self, bits: int = 1, kl_loss_threshold: float = math.log(2), deterministic_on_eval: bool = False):
        super().__init__()
        self.core = _BinaryMapper(bits, kl_threshold=kl_loss_threshold, kl_weight=0.0)  # the adapter adds the KL
        self.bits, self.num_codes = bits, 2 ** bits
        self.kl_loss_threshold, self.deterministic_on_eval = kl_loss_threshold, deterministic_on_eval

    @property
    def codes(self) -> Tensor:
        """(2^bits, bits) bool: the bits of every code (the peer's buffer, built on request)."""
        return self.core.indices_to_bits(torch.arange(self.num_codes))

    def binary_entropy(self, logits: Tensor) -> Tensor:
        return self.core.binary_entropy(logits)

    def calc_aux_loss(self, logits: Tensor, reduce_aux_kl_loss: bool = True) -> Tensor:
        return self.core.kl_loss(logits, reduce=reduce_aux_kl_loss)

    def log_prob(self, logits: Tensor, *, indices: Tensor | None = None, one_hot: Tensor | None = None,
                 sum_bits: bool = True) -> Tensor:
        if (indices is None) == (one_hot is None):
            raise ValueError("BinaryMapper.log_prob: pass exactly one of indices and one_hot")
        indices = one_hot.argmax(dim=-1) if one_hot is not None else indices
        return self.core.log_prob(logits, indices.long(), sum_bits=sum_bits)

    def forward(self, logits: Tensor, temperature: float = 1.0, straight_through: bool | None = None,
                calc_aux_loss: bool | None = None, deterministic: bool | None = None, return_indices: bool = False,
                reduce_aux_kl_loss: bool = True):
        deterministic = _default(deterministic, self.deterministic_on_eval and not self.training)
        straight_through = _default(straight_through, self.training)
        calc_aux_loss = _default(calc_aux_loss, self.training)
        with swapped([self.core], "temperature", lambda _: temperature), \
                swapped([self.core], "sampling", lambda _: "never" if deterministic else "always"):
            indices = self.core(logits).indices  # (...)
        one_hot = self.core.one_hot(indices, logits if straight_through else None)  # (..., 2^bits)
        aux = self.core.kl_loss(logits, reduce_aux_kl_loss) if calc_aux_loss else logits.new_zeros(())
        return (one_hot, indices, aux) if return_indices else (one_hot, aux)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "BinaryMapper":
        """The peer's BinaryMapper has no persistent state; accepts its (empty) ``state_dict()``."""
        if state:
            raise ValueError(f"load_peer_state_dict: a peer BinaryMapper has no persistent state, got {list(state)}")
        return self


BinaryMapper.keywords = BINARY_MAPPER_OPTIONS  # the docs table (the signature is the peer's as written)
