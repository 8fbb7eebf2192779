"""``RandomProjectionQuantizer`` (BEST-RQ, arXiv:2202.01855) with the peer's keywords and call, over
:class:`quantkit.quantizers.RandomProjectionQuantizer`.

``forward(x (b, n, dim)) -> indices`` (b, n) or (b, n, num_codebooks), int64; ``forward(x, indices)`` -> the
cross-entropy of those indices under softmax(cosine similarity), as in the peer.

The one idea to hold: with ``num_codebooks > 1`` the peer's inner VectorQuantize adds a random ``project_in``
(Linear(h * e, h * h * e), never trained) after the random projection, so each head searches an h * e-dimensional
codebook; the two maps compose into one affine projection per head, which is what ``load_peer_state_dict`` copies
into quantkit's (weight and bias), so indices equal the peer's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quantizers import RandomProjectionQuantizer as _RPQ
from ._common import REQUIRED, Option, UnsupportedKeywordError, parse_options, set_signature

__all__ = ["RandomProjectionQuantizer", "RPQ_OPTIONS"]

RPQ_OPTIONS: dict[str, Option] = {
    "num_codebooks": Option(1, "`RandomProjectionQuantizer(heads=...)`; each head searches h * codebook_dim channels "
                               "when h > 1, as the peer's inner projection makes it"),
    "norm": Option(True, "`RandomProjectionQuantizer(normalize=...)`"),
}


class RandomProjectionQuantizer(nn.Module):
    """The peer's ``RandomProjectionQuantizer(dim=, codebook_size=, codebook_dim=, **keywords)``; see
    ``RPQ_OPTIONS``. The peer forwards any other keyword to a VectorQuantize that it only ever runs in eval; none of
    them changes its indices except ones that replace the random codebook, so they are refused."""

    def __init__(self, *, dim: int, codebook_size: int, codebook_dim: int, **kwargs):
        super().__init__()
        extra = sorted(set(kwargs) - set(RPQ_OPTIONS))
        if extra:
            raise UnsupportedKeywordError(f"RandomProjectionQuantizer: {', '.join(extra)} (VectorQuantize keywords) "
                                          "are not supported by quantkit's adapter; the peer runs its VectorQuantize "
                                          "in eval() only, on a frozen random codebook")
        o = parse_options("RandomProjectionQuantizer", RPQ_OPTIONS, kwargs)
        self.num_codebooks = heads = o["num_codebooks"]
        self.dim, self.codebook_size, self.codebook_dim = dim, codebook_size, codebook_dim
        self.core = _RPQ(dim, codebook_size, codebook_dim * heads if heads > 1 else codebook_dim, heads=heads,
                         normalize=o["norm"], projection_bias=heads > 1)

    def forward(self, x: Tensor, indices: Tensor | None = None):
        if x.dim() != 3:
            raise ValueError(f"RandomProjectionQuantizer: x must have shape (b, n, {self.dim}), got {tuple(x.shape)}")
        if indices is None:
            return self.core.encode(x)
        logits = self.core.similarities(x).reshape(-1, self.codebook_size)  # (b * n * h, K)
        return F.cross_entropy(logits, indices.reshape(-1).long(), ignore_index=-1)

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "RandomProjectionQuantizer":
        """Copies a peer ``RandomProjectionQuantizer.state_dict()`` (same keywords): the random projection (composed
        with the inner ``project_in`` when num_codebooks > 1) and the codebook."""
        rand = state["rand_projs"]  # (h, dim, e)
        h = self.num_codebooks
        if h == 1:
            self.core.projection.copy_(rand)
        else:
            flat = rand.permute(1, 0, 2).reshape(self.dim, -1)  # (dim, h * e): the peer's packed projection
            weight, bias = state["vq.project_in.weight"], state["vq.project_in.bias"]  # (h * h * e, h * e), (h*h*e,)
            per_head = weight.reshape(h, -1, weight.shape[1])  # (h, h * e, h * e)
            self.core.projection.copy_(torch.einsum("dk,hek->hde", flat.double(), per_head.double()))
            self.core.projection_bias.copy_(bias.reshape(h, -1))
        self.core.codebook.copy_(state["vq._codebook.embed"])
        return self


set_signature(RandomProjectionQuantizer, [("dim", REQUIRED), ("codebook_size", REQUIRED), ("codebook_dim", REQUIRED)],
              RPQ_OPTIONS, keyword_only=True)
