"""The ``Quantizer`` base class and its one output type, ``QuantizerOutput``.

Every quantizer in quantkit (VQ, SoftVQ, LFQ, FSQ, RQ, VQGAN-LC, and a user's own subclass) sees the same thing:
the base class flattens the input to rows ``(N, dim)`` (moving channels last when ``channel_first=True``), drops
masked-out rows from everything that learns or is measured, calls the subclass on the rows, and reshapes back.
A subclass implements three methods on rows:

    _quantize(z (N, dim), mask (N,) bool | None) -> (quantized (N, dim), indices (N,) or (N, M), loss scalar)
    _encode(z (N, dim)) -> indices           pure: never changes a parameter or buffer
    _decode(indices (N,) or (N, M), ...) -> (N, dim)

The one idea to hold: ``indices`` are always int64 and ``loss`` is always a float32 scalar, whatever the method.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor, nn


class QuantizerOutput(NamedTuple):
    """What every quantizer returns.

    quantized: x's shape and dtype; gradients reach x by straight-through unless the method says otherwise.
    indices: int64, shape x.shape[:-1] (channels-last view), plus a trailing (depth,) / (heads,) for multi-index
        methods.
    loss: float32 scalar, the method's auxiliary losses already weighted (zero when there are none).
    stats: detached scalars; at least ``perplexity`` and ``usage`` (fraction of the codebook used in this batch).
    """

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Quantizers compute in float32 (float64 stays float64, for gradient checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_finite(x: Tensor) -> bool:
    """True when every element of x is finite; exact, at the cost of one reduction.

    ``torch.isfinite(x).all()`` builds three full-size temporaries (37 ms on 4M floats on one Zen 3 core, as long as
    FSQ's whole training step); a sum is NaN or inf whenever an element is, and only when it is finite-but-overflowed
    do we need the element-wise test."""
    if x.numel() == 0:
        return True
    total = x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def full_precision(device: torch.device):
    """Context in which quantizers compute: autocast off, because a bfloat16 projection or search flips codes.
    (A no-op context when autocast is already off: entering torch.autocast costs more than FSQ's small steps.)"""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def batch_usage_stats(indices: Tensor, codebook_size: int, may_skip: bool = True) -> dict[str, Tensor]:
    """Perplexity and used fraction of ``codebook_size`` codes over ``indices`` (any shape; every column shares
    one codebook of that size). Negative indices (the -1 of a depth skipped by quantize-dropout) are not counted;
    ``may_skip=False`` promises there are none (a quantizer whose indices are never -1) and saves two passes.
    Detached float32 scalars."""
    flat = indices.detach().reshape(-1)
    if flat.shape[0] == 0:
        zero = torch.zeros((), device=indices.device)
        return {"perplexity": zero, "usage": zero.clone()}
    # index_add_ rather than bincount: a static output shape keeps torch.compile(fullgraph=True) working.
    if may_skip:
        counts = torch.zeros(codebook_size, device=flat.device).index_add_(0, flat.clamp_min(0), (flat >= 0).float())
    else:  # every index counts once: an expanded scalar, no (N,) weights to build
        counts = torch.zeros(codebook_size, device=flat.device).index_add_(
            0, flat, torch.ones((), device=flat.device).expand(flat.shape[0]))
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -torch.xlogy(probs, probs).sum()  # 0 log 0 = 0
    return {"perplexity": entropy.exp(), "usage": (counts > 0).float().mean()}


class Quantizer(nn.Module):
    """Base class of every quantizer: one input layout, one output type, one index dtype.

    Args:
        dim: size of the vectors being quantized (the channel dimension of x).
        codebook_size: number of codes (per depth / head for multi-index methods).
        channel_first: x is (B, dim, *spatial) instead of (..., dim).
    """

    #: Name under which the class is registered (set by ``register_quantizer``).
    registry_name: str = ""
    #: True when ``quantized`` is a soft mixture (SoftVQ): decode then returns the most probable codes only.
    soft: bool = False
    #: True when, in training, d quantized / d x is exactly the identity (plain straight-through, nothing
    #: differentiable around the code choice); ``quantkit.testing`` then checks it. Set it per instance when options
    #: (projections, the rotation trick, a bound) decide.
    identity_gradient: bool = False
    #: False when no index is ever -1 (the mark of a depth skipped by quantize-dropout): usage statistics then skip
    #: the check. Single-index quantizers set it to False.
    may_skip_depths: bool = True

    def __init__(self, dim: int, codebook_size: int, channel_first: bool = False):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{type(self).__name__}: dim must be a positive int, got {dim!r}")
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"{type(self).__name__}: codebook_size must be a positive int, got {codebook_size!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.channel_first = channel_first

    # ------------------------------------------------------------------------------------------------------------
    # what subclasses implement

    @property
    def num_indices(self) -> int:
        """Indices per vector: 1 (then ``indices`` has no trailing axis), or depth / heads."""
        return 1

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def _encode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def _decode(self, indices: Tensor) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------
    # layout

    def _to_rows(self, x: Tensor, name: str = "x") -> tuple[Tensor, tuple[int, ...]]:
        """x -> (rows (N, dim) in the compute dtype, channels-last shape of x)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{type(self).__name__}: {name} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{type(self).__name__}: {name} must be a floating-point tensor, got {x.dtype}")
        if self.channel_first:
            if x.dim() < 2 or x.shape[1] != self.dim:
                raise ValueError(f"{type(self).__name__}: with channel_first=True, {name} must have shape "
                                 f"(B, {self.dim}, *spatial), got {tuple(x.shape)}")
            x = x.movedim(1, -1)
        elif x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"{type(self).__name__}: {name} must have shape (..., {self.dim}), got {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and not all_finite(x):
            raise ValueError(f"{type(self).__name__}: {name} contains NaN or inf")
        shape = tuple(x.shape)
        return x.reshape(-1, self.dim).to(_compute_dtype(x.dtype)), shape

    def _from_rows(self, rows: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        out = rows.reshape(shape).to(dtype)
        return out.movedim(-1, 1) if self.channel_first else out

    def _indices_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        lead = shape[:-1]
        return lead if self.num_indices == 1 else (*lead, self.num_indices)

    def _mask_rows(self, mask: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
        if mask is None:
            return None
        if mask.dtype != torch.bool or tuple(mask.shape) != shape[:-1]:
            raise ValueError(f"{type(self).__name__}: mask must be a bool tensor of shape {shape[:-1]} (x without "
                             f"its channel dim), got {mask.dtype} of shape {tuple(mask.shape)}")
        return mask.reshape(-1)

    # ------------------------------------------------------------------------------------------------------------
    # public API

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """Quantizes x ((..., dim), or (B, dim, *spatial) when channel_first); rows where ``mask`` is False are
        quantized too but take no part in the loss, the statistics or any codebook update."""
        rows, shape = self._to_rows(x)
        mask_rows = self._mask_rows(mask, shape)
        with full_precision(rows.device):
            quantized, indices, loss = self._quantize(rows, mask_rows)
        used = indices if mask_rows is None else indices[mask_rows]
        stats = batch_usage_stats(used, self.codebook_size, self.may_skip_depths)
        return QuantizerOutput(
            quantized=self._from_rows(quantized, shape, x.dtype),
            indices=indices.reshape(self._indices_shape(shape)),
            loss=loss.float().reshape(()),
            stats=stats,
        )

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Indices of x (int64); never changes a parameter or buffer."""
        rows, shape = self._to_rows(x)
        with full_precision(rows.device):
            return self._encode(rows).reshape(self._indices_shape(shape))

    def decode(self, indices: Tensor) -> Tensor:
        """Quantized vectors for ``indices`` in x's layout (channels first when channel_first), float32."""
        if indices.dtype != torch.int64:
            raise ValueError(f"{type(self).__name__}: indices must be int64, got {indices.dtype}")
        self._check_indices(indices)
        lead = tuple(indices.shape) if self.num_indices == 1 else tuple(indices.shape[:-1])
        with full_precision(indices.device):
            rows = self._decode(indices.reshape(-1) if self.num_indices == 1 else indices.reshape(-1, indices.shape[-1]))
        out = rows.reshape(*lead, self.dim)
        return out.movedim(-1, 1) if self.channel_first else out

    def _check_indices(self, indices: Tensor, codebook_size: int | None = None) -> None:
        """Raises when an index is outside [0, codebook_size)."""
        size = self.codebook_size if codebook_size is None else codebook_size
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
            raise ValueError(f"{type(self).__name__}: indices must lie in [0, {size}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")

    def extra_repr(self) -> str:
        return f"dim={self.dim}, codebook_size={self.codebook_size}, channel_first={self.channel_first}"


def bits_for(codebook_size: int) -> int:
    """log2 of a power-of-two codebook size (raises otherwise)."""
    bits = int(round(math.log2(codebook_size)))
    if 1 << bits != codebook_size:
        raise ValueError(f"codebook_size must be a power of two, got {codebook_size}")
    return bits
