"""``LatentQuantize`` with the peer's keywords, call and return tuple, over
:class:`quantkit.quantizers.LatentQuantizer` (Hsu et al. 2023, arXiv:2305.18378).

Layout as in the peer: x is channel-first, (B, dim, *spatial) or (B, dim), and so is the output; indices are int32,
(B, *spatial[, num_codebooks]). A sequence (B, N, dim) with N != dim is read (and returned) channel-last, as the
peer's README promises and its code does not do.

The one idea to hold: the index is the mixed-radix number of the nearest value's position on each channel, computed
from the positions themselves. The peer instead recomputes it from the chosen values by float arithmetic and
truncates, which is exact only while the values sit on a grid that float32 represents exactly: for 6 or 7 levels a
few percent of its indices name a neighbouring code, and once values are trained (off the grid) they are
meaningless. So indices equal the peer's for levels such as [8, 5, 5, 5] and are right where the peer's are not.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ...quantizers import LatentQuantizer
from ._common import REQUIRED, Option, load_projections, only_default, parse_options, set_signature

__all__ = ["LatentQuantize", "LATENT_QUANTIZE_OPTIONS"]

_NS = "not supported"

LATENT_QUANTIZE_OPTIONS: dict[str, Option] = {
    "commitment_loss_weight": Option(0.1, "`LatentQuantizer(quantization_weight=...)`: the peer's 'commitment' term is "
                                          "mse(sg(x), out), the one that trains the quantized side"),
    "quantization_loss_weight": Option(0.1, "`LatentQuantizer(commitment_weight=...)`: the peer's 'quantization' term "
                                            "is mse(x, sg(out)), the one that trains the input side"),
    "num_codebooks": Option(1, "`LatentQuantizer(heads=...)`; indices gain a trailing axis"),
    "codebook_dim": Option(-1, "channels: len(levels) for a list of levels (-1 or that number), the number of "
                               "channels (> 0) for one int level count"),
    "keep_num_codebooks_dim": Option(None, "adapter: keep the codebook axis of indices (default: num_codebooks > 1)",
                                     lambda v, vals: not (vals["num_codebooks"] > 1 and v is False),
                                     "num_codebooks > 1 needs the codebook axis (as in the peer)"),
    "optimize_values": Option(True, "`LatentQuantizer(learnable_values=...)`"),
    "in_place_codebook_optimizer": Option(None, _NS, only_default(None),
                                          "the peer's own forward fails with it (AttributeError: optimize_values); "
                                          "the values are parameters: train them with your optimizer"),
}


class LatentQuantize(nn.Module):
    """The peer's ``LatentQuantize(levels, dim, **keywords)``; see ``LATENT_QUANTIZE_OPTIONS``.

    ``forward(z) -> (out (B, dim, ...), indices int32, loss)``; the loss is zero in eval, as in the peer.
    """

    def __init__(self, levels, dim: int, **kwargs):
        super().__init__()
        o = parse_options("LatentQuantize", LATENT_QUANTIZE_OPTIONS, kwargs)
        channels = o["codebook_dim"]
        one_count = isinstance(levels, int)
        if one_count and channels < 1 or not one_count and channels not in (-1, len(levels)):
            raise ValueError(f"LatentQuantize: codebook_dim={channels} must be > 0 with an int levels, and -1 or "
                             f"len(levels) with a list of levels (got levels={levels!r})")
        self.levels = [levels] * o["codebook_dim"] if isinstance(levels, int) else list(levels)
        self.dim, self.num_codebooks, self.codebook_dim = dim, o["num_codebooks"], len(self.levels)
        self.effective_codebook_dim = self.codebook_dim * self.num_codebooks
        self.keep_num_codebooks_dim = bool(o["keep_num_codebooks_dim"]) or self.num_codebooks > 1
        self.has_projections = dim != self.effective_codebook_dim
        self.core = LatentQuantizer(self.levels, dim, heads=self.num_codebooks,
                                    learnable_values=o["optimize_values"],
                                    quantization_weight=o["commitment_loss_weight"],
                                    commitment_weight=o["quantization_loss_weight"], channel_first=True)
        self.codebook_size = self.core.codebook_size

    @property
    def values_per_latent(self) -> list[Tensor]:
        return self.core.channel_values()

    @property
    def implicit_codebook(self) -> Tensor:
        """(codebook_size, codebook_dim): every code, built on request."""
        return self.core.indices_to_codes(torch.arange(self.codebook_size))

    def forward(self, z: Tensor):
        # A sequence (B, N, dim) with N != dim is read channel-last, as the peer's README promises (its code fails).
        sequence = z.dim() == 3 and z.shape[1] != self.dim and z.shape[2] == self.dim
        if not sequence and (z.dim() < 2 or z.shape[1] != self.dim):
            raise ValueError(f"LatentQuantize: z must have shape (B, {self.dim}, ...) (channel-first, as in the peer) "
                             f"or be a sequence (B, N, {self.dim}), got {tuple(z.shape)}")
        out = self.core(z.movedim(-1, 1) if sequence else z)
        indices = out.indices.int()
        if self.num_codebooks == 1 and self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        loss = out.loss if self.training else torch.zeros((), device=z.device)
        return (out.quantized.movedim(1, -1) if sequence else out.quantized), indices, loss

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """indices (b, ...[, c]) -> codes (b, dim, ...) (or (b, c * codebook_dim, ...) with project_out=False)."""
        indices = indices.long()
        if self.num_codebooks == 1 and not self.keep_num_codebooks_dim:
            indices = indices.unsqueeze(-1)
        codes = self.core.indices_to_codes(indices).flatten(-2)  # (b, ..., c * d)
        if project_out:
            codes = self.core.project_out(codes)
        return codes.movedim(-1, 1)

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes (..., codebook_dim) -> indices (...) int32 (of the nearest values)."""
        return self.core.codes_to_indices(zhat).int()

    @torch.no_grad()
    def load_peer_state_dict(self, state: dict[str, Tensor]) -> "LatentQuantize":
        """Copies a peer ``LatentQuantize.state_dict()`` (same constructor keywords) into this adapter: the
        projections and, with ``optimize_values``, the values."""
        load_projections(self.core, state)
        for i, values in enumerate(self.core.channel_values()):
            key = f"values_per_latent.{i}"
            if key in state:
                values.copy_(state[key])
        return self


set_signature(LatentQuantize, [("levels", REQUIRED), ("dim", REQUIRED)], LATENT_QUANTIZE_OPTIONS)
