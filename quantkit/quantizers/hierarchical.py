"""Hierarchical (multi-scale residual) vector quantization of 1-D, 2-D or 3-D feature maps: VAR's coarse-to-fine
residual scheme (Tian et al. 2024, "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction", arXiv:2404.02905) with an ordinary VQ codebook per level, as vector-quantize-pytorch's
``HierarchicalVQ`` builds it (its README cites VAR and Kumbong et al. 2026, "Next-Concept Modeling: Fast, Parallel
Coarse-to-Fine Text Generation", arXiv:2610.14162, for the 1-D sequence case).

Level k average-pools what the earlier levels left unexplained to its own shape, quantizes every cell with a
:class:`VectorQuantizer` (one shared, or one per level, each with its own codebook size), upsamples the codes back
to the input's shape (linear / bilinear / trilinear) and refines them with a 3-wide convolution
phi(h) = lerp(h, conv(h), phi_ratio); the refined map is added to the reconstruction and subtracted from the
residual:

    r_k = pool(x - x_hat_k, shape_k);  q_k = VQ_k(r_k);  x_hat_{k+1} = x_hat_k + phi(up(q_k))

Differences from :class:`MultiScaleResidualQuantizer` (VAR's own tokenizer): any number of spatial dims, EMA-trained
(or any VectorQuantizer-trained) codebooks, per-level codebooks, (bi/tri)linear upsampling, no straight-through
around the whole stack (the output is x_hat itself, differentiable through every level's pooling, quantizer
estimator, upsampling and phi), per-position masks, and nested dropout: in training, with probability
``nested_dropout`` the output is x_hat after a random number of levels (>= ``nested_dropout_min_levels``), one
draw per batch, and the loss is the mean of the kept levels' losses.

The one idea to hold: a row of this quantizer is a whole map. ``indices`` is (B, L), every level's token map
flattened and concatenated coarse to fine (``split_scales`` / ``encode_scales`` give the maps, as on
:class:`MultiScaleResidualQuantizer`); each level's search is its VectorQuantizer's fused ``nearest_codeword``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_quantizer
from .base import Quantizer, QuantizerOutput, _compute_dtype, all_finite, batch_usage_stats, full_precision
from .vq import VectorQuantizer

__all__ = ["HierarchicalVQ"]

_UPSAMPLE = ("linear", "bilinear", "trilinear")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _level_shapes(scales: Sequence, spatial_dims: int | None) -> tuple[int, tuple[tuple[int, ...], ...]]:
    """(spatial_dims, per-level shapes), validated: positive, non-decreasing, one entry per spatial dim."""
    if not isinstance(scales, (list, tuple)) or not scales:
        raise ValueError(f"HierarchicalVQ: scales must be a non-empty sequence, got {scales!r}")
    if spatial_dims is None:
        spatial_dims = next((len(s) for s in scales if isinstance(s, (list, tuple))), 2)
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"HierarchicalVQ: spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    shapes = []
    for s in scales:
        shape = (s,) * spatial_dims if isinstance(s, int) else tuple(s)
        if len(shape) != spatial_dims or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
            raise ValueError(f"HierarchicalVQ: every scale must be a positive int or {spatial_dims} positive ints, "
                             f"got {s!r}")
        shapes.append(shape)
    for prev, cur in zip(shapes, shapes[1:]):
        if any(a > b for a, b in zip(prev, cur)):
            raise ValueError(f"HierarchicalVQ: scales must be non-decreasing, got {prev} before {cur}")
    return spatial_dims, tuple(shapes)


class _Phi(nn.Module):
    """h + ratio (conv(h) - h), a 3-wide convolution blended in after upsampling; the identity for ratio ~ 0."""

    def __init__(self, dim: int, spatial_dims: int, ratio: float):
        super().__init__()
        self.conv = _CONV[spatial_dims - 1](dim, dim, 3, padding=1)
        self.ratio = abs(float(ratio))

    def forward(self, h: Tensor) -> Tensor:
        if self.ratio <= 1e-8:
            return h
        return h.lerp(self.conv(h.to(self.conv.weight.dtype)).to(h.dtype), self.ratio)


@register_quantizer("hierarchical_vq", example=dict(dim=4, codebook_size=16, scales=(1, 3)))
class HierarchicalVQ(Quantizer):
    """Multi-scale residual VQ over (B, dim, *spatial) maps; the output has the input's spatial shape.

    Args:
        dim: channels C.
        codebook_size: codes per level, one int or one per level (shared codebooks need one size).
        scales: each level's shape, coarse to fine: ints (a cube of that side) or ``spatial_dims`` ints each.
        spatial_dims: 1, 2 or 3 (default: from the first tuple in ``scales``, else 2).
        shared_codebook: one VectorQuantizer for every level (default) or one per level.
        phi_ratio: weight of the refinement convolution (0: none).
        num_phi: refinement convolutions: 1 shared by every level (default), k spread over the levels (level l uses
            conv round(l / (levels - 1) * (k - 1))), or None for one per level.
        nested_dropout: probability, per training batch, of truncating the output to a random prefix of levels.
        nested_dropout_min_levels: shortest prefix nested dropout keeps.
        seed: seeds a private generator for nested dropout (default: the global torch RNG).
        **vq_kwargs: the levels' VectorQuantizer keywords (ema, commitment_weight, kmeans_init, dead_code,
            gradient, ...).
    """

    def __init__(self, dim: int, codebook_size: int | Sequence[int], scales: Sequence, *,
                 spatial_dims: int | None = None, shared_codebook: bool = True, phi_ratio: float = 0.5,
                 num_phi: int | None = 1, nested_dropout: float = 0.0, nested_dropout_min_levels: int = 1,
                 seed: int | None = None, **vq_kwargs: Any):
        self.spatial_dims, self.level_shapes = _level_shapes(scales, spatial_dims)
        levels = len(self.level_shapes)
        sizes = (codebook_size,) * levels if isinstance(codebook_size, int) else tuple(codebook_size)
        if len(sizes) != levels or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes):
            raise ValueError(f"HierarchicalVQ: codebook_size must be a positive int or {levels} positive ints, got "
                             f"{codebook_size!r}")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"HierarchicalVQ: shared_codebook=True needs one codebook_size, got {sizes}")
        if isinstance(nested_dropout, bool) or not isinstance(nested_dropout, (int, float)) \
                or not 0.0 <= nested_dropout <= 1.0:
            raise ValueError(f"HierarchicalVQ: nested_dropout must be a probability in [0, 1], got {nested_dropout!r}")
        if isinstance(nested_dropout_min_levels, bool) or not isinstance(nested_dropout_min_levels, int) \
                or nested_dropout_min_levels < 1:
            raise ValueError(f"HierarchicalVQ: nested_dropout_min_levels must be an int >= 1, got "
                             f"{nested_dropout_min_levels!r}")
        if num_phi is not None and (isinstance(num_phi, bool) or not isinstance(num_phi, int) or num_phi < 1):
            raise ValueError(f"HierarchicalVQ: num_phi must be a positive int or None, got {num_phi!r}")
        if "channel_first" in vq_kwargs:
            raise ValueError("HierarchicalVQ: the levels always see rows; maps are channel-first (B, dim, *spatial)")
        super().__init__(dim, max(sizes), channel_first=True)
        self.codebook_sizes, self.shared_codebook = sizes, bool(shared_codebook)
        self.vqs = nn.ModuleList(VectorQuantizer(dim, s, **vq_kwargs) for s in (sizes[:1] if shared_codebook
                                                                                 else sizes))
        n_phi = levels if num_phi is None else min(levels, num_phi)
        self.phi = nn.ModuleList(_Phi(dim, self.spatial_dims, phi_ratio) for _ in range(n_phi))
        self.nested_dropout, self.nested_dropout_min_levels = float(nested_dropout), nested_dropout_min_levels
        self._seed, self._generator = seed, None
        self._last_cutoff: int | None = None

    @property
    def last_cutoff(self) -> int | None:
        """The last level the previous forward kept (nested dropout), or None when it kept them all."""
        return self._last_cutoff

    # ------------------------------------------------------------------------------------------------------------
    # geometry

    @property
    def num_levels(self) -> int:
        return len(self.level_shapes)

    @property
    def num_tokens(self) -> int:
        """L = sum over levels of the cells of each level's shape: the length of ``indices``."""
        return sum(math.prod(s) for s in self.level_shapes)

    @property
    def num_indices(self) -> int:
        return self.num_tokens

    def _indices_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], self.num_tokens)

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> Tensor:
        """A standard-normal (batch, dim, *finest level shape) map (used by quantkit.testing)."""
        return torch.randn(batch, self.dim, *self.level_shapes[-1], generator=generator)

    def level_vq(self, k: int) -> VectorQuantizer:
        return self.vqs[0 if self.shared_codebook else k]

    def _phi(self, k: int) -> nn.Module:
        n = len(self.phi)
        return self.phi[0] if n == 1 else self.phi[round(k / max(self.num_levels - 1, 1) * (n - 1))]

    def split_scales(self, indices: Tensor) -> list[Tensor]:
        """indices (B, L) -> every level's token map (B, *shape_k)."""
        counts = [math.prod(s) for s in self.level_shapes]
        if indices.dim() != 2 or indices.shape[1] != sum(counts):
            raise ValueError(f"HierarchicalVQ: indices must have shape (B, {sum(counts)}), got {tuple(indices.shape)}")
        return [m.reshape(-1, *s) for m, s in zip(indices.split(counts, dim=1), self.level_shapes)]

    # ------------------------------------------------------------------------------------------------------------
    # the residual pass

    def _pool(self, t: Tensor, k: int, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Residual (B, C, *spatial) -> level k's map (B, C, *shape_k) and which of its cells any masked-in position
        reaches (B, *shape_k) (None without a mask): the masked mean of each cell's positions."""
        pool = (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)[self.spatial_dims - 1]
        shape = self.level_shapes[k]
        if mask is None:
            return pool(t, shape), None
        m = mask[:, None].to(t.dtype)  # (B, 1, *spatial)
        counts = pool(m, shape)
        if all(s == 1 for s in shape):  # one cell: the plain masked mean
            dims = tuple(range(2, t.dim()))
            pooled = (t * m).sum(dims, keepdim=True) / m.sum(dims, keepdim=True).clamp_min(1e-5)
        else:
            pooled = pool(t * m, shape) / counts.clamp_min(1e-6)
        return pooled, counts[:, 0] > 0

    def _expand(self, k: int, codes: Tensor, full_shape: tuple[int, ...]) -> Tensor:
        """Level k's code map (B, C, *shape_k) -> its refined contribution at full_shape (B, C, *full_shape)."""
        if tuple(codes.shape[2:]) != full_shape:
            codes = F.interpolate(codes, size=full_shape, mode=_UPSAMPLE[self.spatial_dims - 1], align_corners=False)
        return self._phi(k)(codes)

    def _levels(self, f: Tensor, mask: Tensor | None, pure: bool, map_mask: Tensor | None = None):
        """f (B, C, *spatial) -> (token maps, x_hat after every level, the levels' losses). ``mask`` (B, *spatial)
        masks positions (masked pooling), ``map_mask`` (B,) whole maps (plain pooling). ``pure``: encode (each
        level's encode / decode, nothing changes); otherwise each level's forward (training updates)."""
        full_shape = tuple(f.shape[2:])
        residual, x_hat = f, torch.zeros_like(f)
        maps, x_hats, losses = [], [], []
        for k, shape in enumerate(self.level_shapes):
            down, cell_mask = self._pool(residual, k, mask)  # (B, C, *shape_k), (B, *shape_k)
            if map_mask is not None:
                cell_mask = map_mask.reshape(-1, *[1] * self.spatial_dims).expand(-1, *shape)
            rows = down.flatten(2).transpose(1, 2)  # (B, n_k, C)
            vq = self.level_vq(k)
            if pure:
                idx = vq.encode(rows)
                q, loss = vq.decode(idx), f.new_zeros(())
            else:
                keep = None if cell_mask is None else cell_mask.flatten(1)  # (B, n_k)
                out = vq(rows, mask=keep)
                idx, q, loss = out.indices, out.quantized, out.loss
                if keep is not None:  # a cell no masked-in position reaches gets no code: index -1, a zero row
                    idx, q = torch.where(keep, idx, -1), torch.where(keep[..., None], q, 0.0)
            q = self._expand(k, q.transpose(1, 2).reshape(down.shape), full_shape)
            x_hat = x_hat + q
            residual = residual - q
            maps.append(idx.reshape(-1, *shape))
            x_hats.append(x_hat)
            losses.append(loss)
        return maps, x_hats, losses

    def _cutoff(self) -> int | None:
        """Last level kept this training batch, or None for all of them (nested dropout)."""
        low = self.nested_dropout_min_levels
        if not (self.training and self.nested_dropout > 0 and low < self.num_levels):
            return None
        if self._seed is not None and self._generator is None:
            self._generator = torch.Generator().manual_seed(self._seed)
        if float(torch.rand((), generator=self._generator)) >= self.nested_dropout:
            return None
        return int(torch.randint(low - 1, self.num_levels - 1, (), generator=self._generator))

    def _check_map(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """x (B, dim, *spatial) -> x in the compute dtype; mask checked: (B,) or (B, *spatial) bool."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError("HierarchicalVQ: x must be a floating-point tensor")
        if x.dim() != 2 + self.spatial_dims or x.shape[1] != self.dim or x.shape[0] == 0:
            raise ValueError(f"HierarchicalVQ: x must have shape (B >= 1, {self.dim}, *spatial) with "
                             f"{self.spatial_dims} spatial dims, got {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and not all_finite(x):
            raise ValueError("HierarchicalVQ: x contains NaN or inf")
        if mask is not None:
            spatial = (x.shape[0], *x.shape[2:])
            if mask.dtype != torch.bool or tuple(mask.shape) not in ((x.shape[0],), spatial):
                raise ValueError(f"HierarchicalVQ: mask must be a bool tensor of shape ({x.shape[0]},) (per map) or "
                                 f"{spatial} (per position), got {mask.dtype} of shape {tuple(mask.shape)}")
        return x.to(_compute_dtype(x.dtype)), mask

    # ------------------------------------------------------------------------------------------------------------
    # public API

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """x (B, dim, *spatial) -> quantized (B, dim, *spatial), indices (B, L). ``mask`` (B,) (per map) or
        (B, *spatial) (per position, pooled as masked means): masked-out positions take no part in the loss, the
        statistics or any codebook update, and their output is zero; a level's cell that no masked-in position
        reaches gets index -1 and adds no code."""
        f, mask = self._check_map(x, mask)
        per_map = mask is not None and mask.dim() == 1
        with full_precision(f.device):
            maps, x_hats, losses = self._levels(f, None if per_map else mask, False, mask if per_map else None)
        cutoff = self._cutoff()
        self._last_cutoff = cutoff
        kept = self.num_levels if cutoff is None else cutoff + 1
        out = x_hats[kept - 1]
        loss = torch.stack(losses[:kept]).mean()
        if mask is not None:
            out = torch.where(mask.reshape(*mask.shape, *[1] * (out.dim() - mask.dim()))
                              if per_map else mask[:, None], out, 0.0)
        indices = torch.cat([m.flatten(1) for m in maps], dim=1)  # (B, L)
        used = indices if mask is None else indices[mask if per_map else mask.flatten(1).any(1)]
        stats = batch_usage_stats(used, self.codebook_size, may_skip=mask is not None)  # -1: cells with no code
        return QuantizerOutput(out.to(x.dtype), indices, loss.float(), stats)

    @torch.no_grad()
    def encode_scales(self, x: Tensor) -> list[Tensor]:
        """x (B, dim, *spatial) -> every level's token map [(B, *shape_k) int64]; never changes a parameter or
        buffer."""
        f, _ = self._check_map(x, None)
        with full_precision(f.device):
            return self._levels(f, None, pure=True)[0]

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """x (B, dim, *spatial) -> indices (B, L); never changes a parameter or buffer."""
        return torch.cat([m.flatten(1) for m in self.encode_scales(x)], dim=1)

    def decode(self, indices: Tensor, full_shape: Sequence[int] | None = None) -> Tensor:
        """indices (B, L) -> the output (B, dim, *full_shape) (default: the finest level's shape), float32; a -1
        cell adds no code (its zero row is still upsampled and refined, as the peer decodes it)."""
        if indices.dtype != torch.int64:
            raise ValueError(f"HierarchicalVQ: indices must be int64, got {indices.dtype}")
        full_shape = tuple(self.level_shapes[-1] if full_shape is None else full_shape)
        out = None
        with full_precision(indices.device):
            for k, idx in enumerate(self.split_scales(indices)):
                size = self.codebook_sizes[k]
                if idx.numel() and (int(idx.min()) < -1 or int(idx.max()) >= size):
                    raise ValueError(f"HierarchicalVQ: indices of level {k} must lie in [0, {size}) or be -1 (no "
                                     f"code), got range [{int(idx.min())}, {int(idx.max())}]")
                flat = idx.flatten(1)  # (B, n_k)
                rows = self.level_vq(k).decode(flat.clamp_min(0))  # (B, n_k, C)
                rows = torch.where((flat >= 0)[..., None], rows, 0.0)
                q = self._expand(k, rows.transpose(1, 2).reshape(idx.shape[0], self.dim, *idx.shape[1:]), full_shape)
                out = q if out is None else out + q
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, codebook_sizes={self.codebook_sizes}, level_shapes={self.level_shapes}, "
                f"shared_codebook={self.shared_codebook}, nested_dropout={self.nested_dropout}")
