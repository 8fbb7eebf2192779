"""Residual quantization over any inner quantizer (RQ-VAE, Lee et al. 2022, arXiv:2203.01941; SoundStream's
quantize-dropout, arXiv:2107.03312).

Depth d quantizes what the earlier depths left over: r_0 = z, q_d = Q_d(r_d), r_{d+1} = r_d - q_d, and the output
is sum_d q_d. Q_d is any registered single-index quantizer (VQ, FSQ, LFQ, ...), one shared module or one per depth.

The one idea to hold: ``indices`` are (..., depth) and every column is an ordinary index of the inner quantizer, so
``decode`` accepts any prefix of the columns (coarse-to-fine), and -1 marks a depth skipped by quantize-dropout
(it decodes to zero).

Gradients: quantized reaches x through the first depth's estimator (straight-through for VQ / LFQ, the bound for
FSQ), which is the chain rule of a straight-through residual stack; deeper depths see a detached residual, so
their own losses train only their own parameters. ``commitment_weight`` adds RQ-VAE's commitment to every partial
sum, mean_d ||x - sg(q_0 + ... + q_d)||^2, which does reach the encoder.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._registry import create_quantizer, register_quantizer
from .base import Quantizer
from .gradients import straight_through

__all__ = ["ResidualQuantizer"]


def _per_channel(name: str, value, dim: int) -> float | tuple[float, ...] | None:
    """None, a positive number, or ``dim`` positive numbers (validated)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 < value < float("inf"):
            raise ValueError(f"ResidualQuantizer: {name} must be positive, got {value!r}")
        return float(value)
    values = tuple(float(v) for v in value)
    if len(values) != dim or not all(0 < v < float("inf") for v in values):
        raise ValueError(f"ResidualQuantizer: {name} must be a positive number or {dim} positive numbers (one per "
                         f"channel), got {value!r}")
    return values


def _div(x: Tensor, s: float | Tensor) -> Tensor:
    return x if isinstance(s, float) and s == 1.0 else x / s


def _mul(x: Tensor, s: float | Tensor) -> Tensor:
    return x if isinstance(s, float) and s == 1.0 else x * s


@register_quantizer("residual", example=dict(dim=3, quantizer="fsq", depth=3, levels=(5, 4, 3), layer_scale=0.25))
class ResidualQuantizer(Quantizer):
    """``depth`` residual levels of the quantizer registered as ``quantizer``.

    Args:
        dim: vector size (passed to the inner quantizer too).
        quantizer: registered name of the inner quantizer ("vq", "fsq", "lfq", ...); it must give one index per
            vector.
        depth: number of levels D >= 1.
        shared_codebook: one inner module for every depth (RQ-VAE) instead of D independent ones. With an EMA
            codebook the shared module updates once per depth per step.
        quantize_dropout: probability, per vector and training step, of keeping only a random prefix of
            ``[min_depth, depth]`` levels (SoundStream); skipped levels contribute zero and get index -1.
        min_depth: smallest prefix kept by quantize-dropout.
        layer_scale: when set, depth d quantizes r_d / s^d and returns s^d * q (e.g. 0.5 for residual LFQ, whose
            codes are +-1, or 1 / (L - 1) for residual FSQ), so every level sees a residual of unit scale. A sequence
            of ``dim`` numbers scales each channel separately (residual FSQ with per-channel levels L_i: 1 / L_i).
        input_clamp: when set, x is soft-clamped to +-c before depth 0, c * tanh(x / c) (a number, or one per
            channel), so the first level's bounded range covers it (residual FSQ: c = 1 + 1 / (L - 1)).
        commitment_weight: weight of RQ-VAE's partial-sum commitment (0 disables).
        seed: seeds a private generator for quantize-dropout (default: the global torch RNG).
        channel_first: x is (B, dim, *spatial).
        **quantizer_kwargs: the inner quantizer's other keywords (``codebook_size``, ``levels``, ...).
    """

    def __init__(self, dim: int, quantizer: str = "vq", depth: int = 4, shared_codebook: bool = False,
                 quantize_dropout: float = 0.0, min_depth: int = 1, layer_scale: float | Sequence[float] | None = None,
                 commitment_weight: float = 0.0, seed: int | None = None, channel_first: bool = False,
                 input_clamp: float | Sequence[float] | None = None, **quantizer_kwargs: Any):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"ResidualQuantizer: depth must be an int >= 1, got {depth!r}")
        if not 0.0 <= quantize_dropout <= 1.0:
            raise ValueError(f"ResidualQuantizer: quantize_dropout must be a probability in [0, 1], "
                             f"got {quantize_dropout!r}")
        if isinstance(min_depth, bool) or not isinstance(min_depth, int) or not 1 <= min_depth <= depth:
            raise ValueError(f"ResidualQuantizer: min_depth must be an int in [1, depth={depth}], got {min_depth!r}")
        layer_scale = _per_channel("layer_scale", layer_scale, dim)
        input_clamp = _per_channel("input_clamp", input_clamp, dim)
        if "channel_first" in quantizer_kwargs:
            raise ValueError("ResidualQuantizer: pass channel_first to the ResidualQuantizer, not to the inner "
                             "quantizer (it always sees rows)")
        layers = [create_quantizer(quantizer, dim=dim, **quantizer_kwargs) for _ in range(1 if shared_codebook
                                                                                          else depth)]
        if layers[0].num_indices != 1:
            raise ValueError(f"ResidualQuantizer: the inner quantizer {quantizer!r} must give one index per vector, "
                             f"it gives {layers[0].num_indices}")
        if layers[0].dim != dim:
            raise ValueError(f"ResidualQuantizer: the inner quantizer has dim {layers[0].dim}, expected dim={dim}")
        super().__init__(dim, layers[0].codebook_size, channel_first)
        self.layers = nn.ModuleList(layers)
        self.soft = layers[0].soft
        self.identity_gradient = layers[0].identity_gradient  # quantized reaches x through depth 0 only
        self.depth = depth
        self.shared_codebook = shared_codebook
        self.quantize_dropout = float(quantize_dropout)
        self.min_depth = min_depth
        self.layer_scale = layer_scale
        self.input_clamp = input_clamp
        if input_clamp is not None:
            self.identity_gradient = False
        self.commitment_weight = float(commitment_weight)
        self._generator: torch.Generator | None = None
        self._seed = seed

    @property
    def num_indices(self) -> int:
        return self.depth

    def _indices_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-1], self.depth)  # the depth axis stays, even at depth 1

    def layer(self, d: int) -> Quantizer:
        """The inner quantizer of depth d."""
        return self.layers[0 if self.shared_codebook else d]

    def depth_scale(self, d: int, like: Tensor | None = None) -> float | Tensor:
        """s^d: a float, or (dim,) in like's dtype for per-channel scales (computed in float64, then rounded)."""
        s = self.layer_scale
        if s is None:
            return 1.0
        if isinstance(s, float):
            return s ** d
        return torch.tensor([v ** d for v in s], dtype=torch.float64).to(
            device=like.device if like is not None else None, dtype=like.dtype if like is not None else torch.float32)

    def _clamp_input(self, z: Tensor) -> Tensor:
        c = self.input_clamp
        if c is None:
            return z
        c = c if isinstance(c, float) else torch.tensor(c, dtype=z.dtype, device=z.device)
        return torch.tanh(z / c) * c

    # ------------------------------------------------------------------------------------------------------------

    def _kept_depths(self, n: int, mask: Tensor | None, device: torch.device) -> Tensor | None:
        """(n,) number of levels each row keeps this step, or None when every row keeps all of them.

        Only masked-in rows draw (in order), so a masked batch draws exactly what the truncated batch draws."""
        if not (self.training and self.quantize_dropout > 0 and self.min_depth < self.depth):
            return None
        if self._seed is not None and self._generator is None:
            self._generator = torch.Generator().manual_seed(self._seed)
        m = n if mask is None else int(mask.sum())
        drop = torch.rand(m, generator=self._generator) < self.quantize_dropout
        prefix = torch.randint(self.min_depth, self.depth + 1, (m,), generator=self._generator)
        drawn = torch.where(drop, prefix, self.depth).to(device)
        if mask is None:
            return drawn
        return torch.full((n,), self.depth, device=device).masked_scatter(mask, drawn)

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        kept = self._kept_depths(z.shape[0], mask, z.device)
        residual = self._clamp_input(z)  # (N, dim); only depth 0 keeps the graph to z
        total_hard = torch.zeros_like(z)  # sum of the kept levels' values
        total = torch.zeros_like(z)  # the same values, carrying each level's gradient paths
        indices, loss, commit = [], z.new_zeros(()), z.new_zeros(())
        for d in range(self.depth):
            active = None if kept is None else kept > d  # (N,)
            layer_mask = active if mask is None else (mask if active is None else mask & active)
            s = self.depth_scale(d, z)
            q, idx, layer_loss = self.layer(d)._quantize(_div(residual, s), layer_mask)
            q = _mul(q, s)
            if active is not None:
                q = torch.where(active[:, None], q, 0.0)
                idx = torch.where(active, idx, -1)
            indices.append(idx)
            loss = loss + layer_loss
            total = total + q
            total_hard = total_hard + q.detach()
            residual = (residual - q).detach()
            if self.commitment_weight:
                err = (z - total_hard).square().sum(-1) / z.shape[1]  # (N,)
                if mask is not None:
                    err = err[mask]
                commit = commit + err.sum() / max(err.shape[0], 1)  # zero, not NaN, for an empty batch
        if self.commitment_weight:
            loss = loss + self.commitment_weight * commit / self.depth
        return total, torch.stack(indices, dim=-1), loss  # (N, dim), (N, depth), ()

    def _encode(self, z: Tensor) -> Tensor:
        residual, indices = self._clamp_input(z), []
        for d in range(self.depth):
            s = self.depth_scale(d, z)
            layer = self.layer(d)
            idx = layer._encode(_div(residual, s))
            q = layer._decode(idx).to(z.dtype)
            residual = residual - _mul(q, s)
            indices.append(idx)
        return torch.stack(indices, dim=-1)  # (N, depth)

    def _decode(self, indices: Tensor) -> Tensor:
        """(N, d') with 1 <= d' <= depth -> (N, dim): the sum of the first d' levels (-1 entries add nothing)."""
        out = None
        for d in range(indices.shape[1]):
            idx = indices[:, d]
            q = self.layer(d)._decode(idx.clamp_min(0))
            q = _mul(q, self.depth_scale(d, q))
            q = torch.where((idx >= 0)[:, None], q, 0.0)
            out = q if out is None else out + q
        return out

    def decode(self, indices: Tensor) -> Tensor:
        """indices (..., d') with 1 <= d' <= depth -> the sum of the first d' levels, in x's layout (float32)."""
        if indices.dtype != torch.int64:
            raise ValueError(f"ResidualQuantizer: indices must be int64, got {indices.dtype}")
        self._check_indices(indices)
        out = self._decode(indices.reshape(-1, indices.shape[-1])).reshape(*indices.shape[:-1], self.dim)
        return out.movedim(-1, 1) if self.channel_first else out

    def _check_indices(self, indices: Tensor, codebook_size: int | None = None) -> None:
        if indices.dim() < 1 or not 1 <= indices.shape[-1] <= self.depth:
            raise ValueError(f"ResidualQuantizer: indices must have shape (..., d) with 1 <= d <= depth="
                             f"{self.depth}, got {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < -1 or int(indices.max()) >= self.codebook_size):
            raise ValueError(f"ResidualQuantizer: indices must lie in [0, {self.codebook_size}) or be -1 (a skipped "
                             f"depth), got range [{int(indices.min())}, {int(indices.max())}]")

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, shared_codebook={self.shared_codebook}, "
                f"quantize_dropout={self.quantize_dropout}, " + super().extra_repr())
