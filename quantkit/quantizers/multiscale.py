"""Multi-scale residual quantization of feature maps, VAR's tokenizer (Tian et al. 2024, arXiv:2404.02905).

A feature map f (B, C, H, W) becomes K token maps of growing size (patch_nums, e.g. 1x1, 2x2, 3x3, 4x4), all from
one shared codebook. Scale k area-downsamples what earlier scales left unexplained, picks each cell's nearest code,
upsamples the code map to (H, W) (bicubic) and refines it with a 3x3 convolution phi_k; the refined map is added to
the reconstruction and subtracted from the residual:

    r_k = area(f - f_hat_k, size_k);  idx_k = argmin_c ||r_k - c||;  f_hat_{k+1} = f_hat_k + phi_k(up(C[idx_k]))

The one idea to hold: a row of this quantizer is a whole map. ``indices`` is (B, L) with L = sum_k h_k w_k, the
scales' token maps flattened and concatenated coarse to fine; ``encode_scales`` / ``decode_scales`` give the per-scale
(B, h_k, w_k) maps, and ``teacher_forcing_inputs`` / ``next_scale_input`` are what a next-scale generator consumes.

phi_k(h) = (1 - ratio) h + ratio conv_k(h) with ratio 0.5 and 4 convolutions shared across scales (scale k uses the
one whose tick in linspace(1/12, 11/12, 4) is nearest to k / (K - 1)), as in VAR. Loss (VAR): mean over scales of
beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2, beta 0.25; the output is f_hat with a straight-through gradient.

Dead-code revival (``dead_code=DeadCodeConfig()``; off by default, as for VectorQuantizer, so that a
training forward changes no state unless asked): the shared codebook is trained by gradient, and only the codes
some residual picks get one, so codes that start (or drift) away from the residuals are never picked again and the
vocabulary collapses to a handful of codes. Each training step counts the codes picked over all scales into an
EMA ``usage`` and replaces the codes below the threshold by residual rows of this step, through the shared
:func:`quantkit.quantizers.codebook.revive_dead_codes` (identical on every rank).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import nearest_codeword
from ._registry import register_quantizer
from .base import Quantizer, QuantizerOutput, _compute_dtype, all_finite, batch_usage_stats
from .codebook import DeadCodeConfig, default_revival_state, track_usage_and_revive
from .gradients import straight_through

__all__ = ["MultiScaleResidualQuantizer"]


def _sizes(patch_nums: Sequence[int | tuple[int, int]]) -> list[tuple[int, int]]:
    sizes = []
    for pn in patch_nums:
        hw = (pn, pn) if isinstance(pn, int) else tuple(pn)
        if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
            raise ValueError(f"MultiScaleResidualQuantizer: patch_nums entries must be positive ints or (h, w) "
                             f"pairs, got {pn!r}")
        sizes.append(hw)
    if not sizes:
        raise ValueError("MultiScaleResidualQuantizer: patch_nums must name at least one scale")
    return sizes


@register_quantizer("multiscale_residual", example=dict(dim=4, codebook_size=16, patch_nums=(1, 2, 3, 4)))
class MultiScaleResidualQuantizer(Quantizer):
    """VAR's multi-scale residual quantizer over (B, dim, H, W) maps with (H, W) = the last patch size.

    Args:
        dim: channels C. codebook_size: shared vocabulary size V.
        patch_nums: token-map side per scale, coarse to fine (ints or (h, w) pairs); VAR uses
            (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
        beta: commitment weight. phi_ratio: weight of the refinement conv (0 disables phi).
        num_phi: number of refinement convs shared across scales (VAR: 4); None gives one per scale.
        dead_code: revival of codes whose EMA usage (picks per step, all scales) falls below the threshold, from
            this step's residual rows; None (default) disables it. Turn it on
            when training from scratch: without it the codebook collapses to a few codes.
    """

    identity_gradient = True  # the output is f_hat with a straight-through gradient

    def __init__(self, dim: int, codebook_size: int, patch_nums: Sequence[int | tuple[int, int]] = (1, 2, 3, 4),
                 beta: float = 0.25, phi_ratio: float = 0.5, num_phi: int | None = 4,
                 dead_code: DeadCodeConfig | None = None):
        super().__init__(dim, codebook_size, channel_first=True)
        if dead_code is not None and not isinstance(dead_code, DeadCodeConfig):
            raise ValueError(f"MultiScaleResidualQuantizer: dead_code must be a DeadCodeConfig or None, "
                             f"got {type(dead_code).__name__}")
        self.dead_code = dead_code
        self.sizes = _sizes(patch_nums)
        if not 0.0 <= phi_ratio <= 1.0:
            raise ValueError(f"MultiScaleResidualQuantizer: phi_ratio must lie in [0, 1], got {phi_ratio!r}")
        n = len(self.sizes) if num_phi is None else num_phi
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"MultiScaleResidualQuantizer: num_phi must be a non-negative int or None, "
                             f"got {num_phi!r}")
        self.beta = float(beta)
        self.phi_ratio = float(phi_ratio) if n > 0 else 0.0
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) / math.sqrt(dim))  # (V, C)
        self.register_buffer("usage", torch.ones(codebook_size))  # EMA picks per step (dead-code revival)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training steps; seeds revival
        self.phi = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(n if self.phi_ratio else 0))
        num_scales = len(self.sizes)
        if len(self.phi) == 0:
            self._phi_of_scale = [-1] * num_scales
        elif num_phi is None:
            self._phi_of_scale = list(range(num_scales))
        else:  # the conv whose tick is nearest to the scale's relative position
            ticks = torch.linspace(1 / (3 * n), 1 - 1 / (3 * n), n, dtype=torch.float64)  # float64 as in VAR
            pos = [k / (num_scales - 1) if num_scales > 1 else 1.0 for k in range(num_scales)]
            self._phi_of_scale = [int((ticks - p).abs().argmin()) for p in pos]  # ties: the lower conv

    # ------------------------------------------------------------------------------------------------------------
    # geometry

    @property
    def num_scales(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        """L = sum_k h_k w_k, the length of ``indices``."""
        return sum(h * w for h, w in self.sizes)

    @property
    def num_indices(self) -> int:
        return self.num_tokens

    def _indices_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], self.num_tokens)  # channels-last (B, H, W, C) -> (B, L)

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> Tensor:
        """A standard-normal (batch, C, H, W) map of the size this quantizer takes (used by quantkit.testing)."""
        return torch.randn(batch, self.dim, *self.sizes[-1], generator=generator)

    def token_scales(self) -> Tensor:
        """(L,) int64: the scale of every position of ``indices`` (for VAR's block-causal mask)."""
        return torch.cat([torch.full((h * w,), k, dtype=torch.int64) for k, (h, w) in enumerate(self.sizes)])

    # ------------------------------------------------------------------------------------------------------------
    # the residual pass

    def _refine(self, k: int, h: Tensor) -> Tensor:
        j = self._phi_of_scale[k]
        if j < 0:
            return h
        conv = self.phi[j]
        return (1 - self.phi_ratio) * h + self.phi_ratio * conv(h.to(conv.weight.dtype)).to(h.dtype)

    def _contribution(self, k: int, idx: Tensor, dtype: torch.dtype) -> Tensor:
        """Scale k's token map (B, h_k, w_k) -> its refined contribution to f_hat, (B, C, H, W)."""
        with torch.autocast(idx.device.type, enabled=False):  # float32: the code choice must not depend on autocast
            emb = self.codebook.to(dtype)[idx].permute(0, 3, 1, 2)  # (B, C, h_k, w_k)
            if k < self.num_scales - 1:
                emb = F.interpolate(emb, size=self.sizes[-1], mode="bicubic")
            return self._refine(k, emb)

    def _assign(self, k: int, rest: Tensor, rows_out: list | None = None) -> Tensor:
        """Residual (B, C, H, W) -> scale k's token map (B, h_k, w_k) of nearest codes (the searched rows
        (B, h_k w_k, C) are appended to ``rows_out`` when given)."""
        with torch.autocast(rest.device.type, enabled=False):
            if k < self.num_scales - 1:
                rest = F.interpolate(rest, size=self.sizes[k], mode="area")
            b, c, h, w = rest.shape
            rows = rest.permute(0, 2, 3, 1).reshape(-1, c)  # (B h_k w_k, C)
            if rows_out is not None:
                rows_out.append(rows.view(b, h * w, c))
            return nearest_codeword(rows, self.codebook.detach().to(rows.dtype)).indices.view(b, h, w)

    def _residual_pass(self, f: Tensor, rows_out: list | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """f (B, C, H, W) -> (token maps per scale, f_hat after every scale (with graph to codebook and phi))."""
        rest = f.detach()
        f_hat = torch.zeros_like(rest)
        maps, f_hats = [], []
        for k in range(self.num_scales):
            idx = self._assign(k, rest, rows_out)
            h = self._contribution(k, idx, f.dtype)
            f_hat = f_hat + h
            rest = rest - h.detach()
            maps.append(idx)
            f_hats.append(f_hat)
        return maps, f_hats

    def _check_map(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError(f"MultiScaleResidualQuantizer: {name} must be a floating-point tensor")
        expect = (self.dim, *self.sizes[-1])
        if x.dim() != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"MultiScaleResidualQuantizer: {name} must have shape (B, {expect[0]}, {expect[1]}, "
                             f"{expect[2]}) (channels, then the last patch size), got {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and not all_finite(x):
            raise ValueError(f"MultiScaleResidualQuantizer: {name} contains NaN or inf")
        return x.to(_compute_dtype(x.dtype))

    # ------------------------------------------------------------------------------------------------------------
    # public API

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """x (B, C, H, W) -> quantized (B, C, H, W), indices (B, L); ``mask`` (B,) bool drops maps from the loss
        and the statistics."""
        f = self._check_map(x)
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0],)):
            raise ValueError(f"MultiScaleResidualQuantizer: mask must be a bool tensor of shape ({x.shape[0]},) "
                             f"(one flag per map), got {mask.dtype} of shape {tuple(mask.shape)}")
        rows: list[Tensor] | None = [] if self.training and self.dead_code is not None else None
        maps, f_hats = self._residual_pass(f, rows)
        indices = torch.cat([m.flatten(1) for m in maps], dim=1)  # (B, L)
        if rows is not None:
            self._update_usage(torch.cat(rows, dim=1), indices, mask)
        target = f if mask is None else f[mask]
        loss = f.new_zeros(())
        if target.shape[0]:
            for f_hat in f_hats:
                f_hat = f_hat if mask is None else f_hat[mask]
                loss = loss + self.beta * F.mse_loss(f_hat.detach(), target) + F.mse_loss(f_hat, target.detach())
            loss = loss / self.num_scales
        quantized = straight_through(f, f_hats[-1])  # value f_hat, identity gradient to x
        used = indices if mask is None else indices[mask]
        return QuantizerOutput(quantized.to(x.dtype), indices, loss.float(), batch_usage_stats(used, self.codebook_size))

    @torch.no_grad()
    def _update_usage(self, rows: Tensor, indices: Tensor, mask: Tensor | None) -> None:
        """One training step: EMA usage from the picked codes (B, L) (masked-in maps only), then revival of the
        dead codes from the searched residual rows (B, L, C)."""
        if mask is not None:
            rows, indices = rows[mask], indices[mask]
        rows, indices = rows.reshape(-1, self.dim).float(), indices.reshape(-1)
        track_usage_and_revive(self.codebook.data, self.usage, self.steps, rows, indices, self.dead_code)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        default_revival_state(state_dict, prefix, self.usage, self.steps)  # VAR's checkpoints have none
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def encode_scales(self, x: Tensor) -> list[Tensor]:
        """x (B, C, H, W) -> per-scale token maps [(B, h_k, w_k) int64]; never changes a parameter or buffer."""
        return self._residual_pass(self._check_map(x))[0]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> indices (B, L)."""
        return torch.cat([m.flatten(1) for m in self.encode_scales(x)], dim=1)

    def decode_scales(self, maps: Sequence[Tensor]) -> Tensor:
        """Token maps of the first k' <= K scales [(B, h_k, w_k)] -> f_hat (B, C, H, W) (float32)."""
        if not 1 <= len(maps) <= self.num_scales:
            raise ValueError(f"MultiScaleResidualQuantizer: maps must hold 1 to {self.num_scales} token maps, "
                             f"got {len(maps)}")
        f_hat = None
        for k, idx in enumerate(maps):
            if idx.dtype != torch.int64 or idx.dim() != 3 or tuple(idx.shape[1:]) != self.sizes[k]:
                raise ValueError(f"MultiScaleResidualQuantizer: maps[{k}] must be int64 of shape (B, "
                                 f"{self.sizes[k][0]}, {self.sizes[k][1]}), got {idx.dtype} {tuple(idx.shape)}")
            self._check_indices(idx)
            h = self._contribution(k, idx, torch.float32)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def split_scales(self, indices: Tensor) -> list[Tensor]:
        """indices (B, L') with L' a prefix of the scales' token counts -> [(B, h_k, w_k)]."""
        if indices.dim() != 2:
            raise ValueError(f"MultiScaleResidualQuantizer: indices must have shape (B, L), got {tuple(indices.shape)}")
        maps, start = [], 0
        for h, w in self.sizes:
            if start + h * w > indices.shape[-1]:
                break
            maps.append(indices[:, start:start + h * w].reshape(-1, h, w))
            start += h * w
        if start != indices.shape[-1] or not maps:
            raise ValueError(f"MultiScaleResidualQuantizer: indices must have shape (B, L') with L' a sum of the "
                             f"first scales' token counts {[h * w for h, w in self.sizes]}, got {tuple(indices.shape)}")
        return maps

    def decode(self, indices: Tensor) -> Tensor:
        """indices (B, L) (or a prefix of whole scales) -> quantized (B, C, H, W), float32."""
        if indices.dtype != torch.int64:
            raise ValueError(f"MultiScaleResidualQuantizer: indices must be int64, got {indices.dtype}")
        return self.decode_scales(self.split_scales(indices))

    # ------------------------------------------------------------------------------------------------------------
    # what a next-scale generator needs

    def teacher_forcing_inputs(self, maps: Sequence[Tensor]) -> Tensor:
        """Ground-truth token maps of all K scales -> the generator's inputs for scales 1..K-1, (B, L - h_0 w_0, C):
        scale k's input is f_hat after scales < k, area-downsampled to scale k's size."""
        inputs, f_hat = [], None
        for k in range(self.num_scales - 1):
            f_hat, nxt = self.next_scale_input(k, f_hat, maps[k])
            inputs.append(nxt.flatten(2).transpose(1, 2))  # (B, h_{k+1} w_{k+1}, C)
        if not inputs:
            return self.codebook.new_zeros(maps[0].shape[0], 0, self.dim)
        return torch.cat(inputs, dim=1)

    def next_scale_input(self, k: int, f_hat: Tensor | None, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """Adds scale k's tokens (B, h_k, w_k) to f_hat (B, C, H, W) (None before scale 0); returns the new f_hat
        and the next scale's input, f_hat area-downsampled to size_{k+1} (None after the last scale)."""
        h = self._contribution(k, idx, self.codebook.dtype)
        f_hat = h if f_hat is None else f_hat + h
        if k == self.num_scales - 1:
            return f_hat, None
        return f_hat, F.interpolate(f_hat, size=self.sizes[k + 1], mode="area")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_size={self.codebook_size}, patch_nums={self.sizes}, beta={self.beta}, "
                f"phi_ratio={self.phi_ratio}, phi_of_scale={self._phi_of_scale}")
