"""Codebook usage over many batches (and ranks): utilization, perplexity, entropy, dead codes and the histogram.

A quantizer's ``stats`` describe one batch; whether a codebook has collapsed shows only over many. ``CodebookUsage``
keeps one int64 count per code (per depth / head for multi-index quantizers), adds each batch with ``index_add_``
(no one-hot, so 2^18 codes cost 2 MiB), and sums the counts over ranks when ``torch.distributed`` is initialized.

    usage = CodebookUsage(codebook_size=1024)
    for x in loader:
        usage.update(quantizer(x).indices)
    report = usage.compute()      # report.utilization, report.perplexity, report.dead_code_indices, ...

The one idea to hold: the counts are the state; every metric is computed from the global counts at ``compute()``,
and reducing across ranks never changes the local counts, so ``compute()`` can be called any number of times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["CodebookUsage", "UsageReport"]


@dataclass(frozen=True)
class UsageReport:
    """What :meth:`CodebookUsage.compute` returns. Every per-code field has a leading (M,) axis when the tracker
    follows M indices per vector (depths / heads) and none when it follows one.

    counts: int64 histogram, (K,) or (M, K).
    total: number of indices counted, () or (M,).
    utilization: fraction of the K codes used at least once.
    perplexity: exp(entropy), the effective number of codes; 0 while nothing has been counted.
    entropy: entropy of the code distribution in nats; ``entropy_bits`` in bits (at most log2 K).
    num_dead: codes counted fewer than ``dead_threshold`` times; ``dead_code_indices`` lists them (a tensor, or one
        tensor per depth / head).
    """

    counts: Tensor
    total: Tensor
    utilization: Tensor
    perplexity: Tensor
    entropy: Tensor
    entropy_bits: Tensor
    num_dead: Tensor
    dead_code_indices: Tensor | tuple[Tensor, ...]
    dead_threshold: int

    @property
    def probabilities(self) -> Tensor:
        """counts / total (float64); zeros while nothing has been counted."""
        return self.counts.double() / self.total.unsqueeze(-1).clamp_min(1).double()

    def scalars(self, prefix: str = "") -> dict[str, float]:
        """Plain floats for a logger: ``{prefix}utilization``, ... with a ``/{m}`` suffix per depth / head."""
        names = ("utilization", "perplexity", "entropy_bits", "num_dead")
        out: dict[str, float] = {}
        for name in names:
            value = getattr(self, name)
            if value.dim() == 0:
                out[f"{prefix}{name}"] = float(value)
            else:
                out.update({f"{prefix}{name}/{m}": float(v) for m, v in enumerate(value.tolist())})
        return out


class CodebookUsage(nn.Module):
    """Accumulates code counts over batches and ranks.

    Args:
        codebook_size: K, the number of codes (per depth / head).
        num_indices: M, indices per vector; 1 takes indices of any shape, M > 1 takes (..., M) indices (residual
            depths or heads, each with its own histogram).
        dead_threshold: a code counted fewer times than this is dead (default 1: never used).
        ignore_index: an index value that is skipped, not counted: by default -1, the index of a depth dropped by
            quantize-dropout (as in the quantizers' own ``stats``); None makes it an error like any other.
    """

    counts: Tensor

    def __init__(self, codebook_size: int, num_indices: int = 1, dead_threshold: int = 1,
                 ignore_index: int | None = -1):
        super().__init__()
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"CodebookUsage: codebook_size must be a positive int, got {codebook_size!r}")
        if not isinstance(num_indices, int) or num_indices < 1:
            raise ValueError(f"CodebookUsage: num_indices must be a positive int, got {num_indices!r}")
        if not isinstance(dead_threshold, int) or dead_threshold < 0:
            raise ValueError(f"CodebookUsage: dead_threshold must be a non-negative int, got {dead_threshold!r}")
        if ignore_index is not None and 0 <= ignore_index < codebook_size:
            raise ValueError(f"CodebookUsage: ignore_index must lie outside [0, {codebook_size}), got {ignore_index}")
        self.codebook_size = codebook_size
        self.num_indices = num_indices
        self.dead_threshold = dead_threshold
        self.ignore_index = ignore_index
        self.register_buffer("counts", torch.zeros(num_indices, codebook_size, dtype=torch.int64))

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, num_indices={self.num_indices}, "
                f"dead_threshold={self.dead_threshold}, ignore_index={self.ignore_index}")

    # ------------------------------------------------------------------------------------------------------------
    # accumulation

    @torch.no_grad()
    def update(self, indices: Tensor, mask: Tensor | None = None) -> None:
        """Counts ``indices`` (any integer dtype; (...) when num_indices is 1, else (..., M)). ``mask`` (bool,
        the shape of one index per vector: ``indices.shape`` or ``indices.shape[:-1]``) drops the False vectors.
        Raises ValueError, counting nothing, when an index lies outside [0, codebook_size)."""
        rows = self._rows(indices, mask)  # (N, M) int64
        if self.ignore_index is not None:
            keep = rows != self.ignore_index
            rows = torch.where(keep, rows, 0)
        else:
            keep = None
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= self.codebook_size):
            bad = rows if keep is None else rows[keep]
            raise ValueError(f"CodebookUsage.update: indices must lie in [0, {self.codebook_size}), got range "
                             f"[{int(bad.min())}, {int(bad.max())}]")
        # Column m's code k lands in bin m * K + k of the flattened (M, K) counts.
        offsets = torch.arange(self.num_indices, device=rows.device) * self.codebook_size
        bins = (rows + offsets).reshape(-1)
        ones = torch.ones_like(bins) if keep is None else keep.reshape(-1).long()
        self.counts.view(-1).index_add_(0, bins.to(self.counts.device), ones.to(self.counts.device))

    def _rows(self, indices: Tensor, mask: Tensor | None) -> Tensor:
        if not isinstance(indices, Tensor):
            raise TypeError(f"CodebookUsage.update: indices must be a tensor, got {type(indices).__name__}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ValueError(f"CodebookUsage.update: indices must have an integer dtype, got {indices.dtype}")
        if self.num_indices == 1:
            per_vector = tuple(indices.shape)
        else:
            if indices.dim() < 1 or indices.shape[-1] != self.num_indices:
                raise ValueError(f"CodebookUsage.update: indices must have shape (..., {self.num_indices}) "
                                 f"(num_indices={self.num_indices}), got {tuple(indices.shape)}")
            per_vector = tuple(indices.shape[:-1])
        rows = indices.long().reshape(-1, self.num_indices)
        if mask is None:
            return rows
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != per_vector:
            got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"CodebookUsage.update: mask must be a bool tensor of shape {per_vector}, got {got}")
        return rows[mask.reshape(-1).to(rows.device)]

    def reset(self) -> None:
        """Forgets every count."""
        self.counts.zero_()

    # ------------------------------------------------------------------------------------------------------------
    # across ranks

    @torch.no_grad()
    def all_reduce(self) -> Tensor:
        """The counts summed over every rank when ``torch.distributed`` is initialized (a new tensor; the local
        counts are left as they are), else a copy of the local counts. Every rank must call it."""
        counts = self.counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        return counts

    # ------------------------------------------------------------------------------------------------------------
    # metrics

    @torch.no_grad()
    def compute(self, dead_threshold: int | None = None, sync: bool = True) -> UsageReport:
        """Metrics of the counts so far, over every rank when ``sync`` and ``torch.distributed`` is initialized
        (then every rank must call it). ``dead_threshold`` overrides the constructor's."""
        threshold = self.dead_threshold if dead_threshold is None else dead_threshold
        counts = self.all_reduce() if sync else self.counts.clone()  # (M, K)
        total = counts.sum(-1)  # (M,)
        probs = counts.double() / total.clamp_min(1).double().unsqueeze(-1)
        entropy = -torch.special.xlogy(probs, probs).sum(-1)  # nats; 0 log 0 = 0
        perplexity = torch.where(total > 0, entropy.exp(), torch.zeros_like(entropy))
        utilization = (counts > 0).double().mean(-1)
        dead = counts < threshold  # (M, K)
        dead_indices = tuple(row.nonzero().reshape(-1) for row in dead)
        single = self.num_indices == 1

        def squeeze(t: Tensor) -> Tensor:
            return t[0] if single else t

        return UsageReport(
            counts=squeeze(counts), total=squeeze(total), utilization=squeeze(utilization),
            perplexity=squeeze(perplexity), entropy=squeeze(entropy), entropy_bits=squeeze(entropy / math.log(2)),
            num_dead=squeeze(dead.sum(-1)), dead_code_indices=dead_indices[0] if single else dead_indices,
            dead_threshold=threshold,
        )
