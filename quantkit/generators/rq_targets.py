"""RQ-Transformer's training targets: soft labels over the codebook and stochastic sampling of the RQ codes.

Paper: Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization", arXiv:2203.01941,
section 3.3 (reference: kakaobrain/rq-vae-transformer, ``get_soft_codes`` and ``soft_target_cross_entropy``).
Both address exposure bias: a model trained only on the one code the RQ-VAE chose, and fed only those, sees at
sampling time codes it never saw in training.

- Soft labels: the target of a position whose code is t is not one-hot but q(k) ∝ exp(-||e_t - e_k||^2 / tau)
  over the codebook of that depth, so codes near the chosen one are "partly right". Loss: the cross-entropy
  -sum_k q(k) log p(k). As tau -> 0, q becomes the one-hot of t (when no other code coincides with e_t).
- Stochastic codes: the training codes are drawn rather than taken: at depth d, k ~ softmax(-||r_d - e_k||^2 / T)
  over the depth's codebook and r_{d+1} = r_d - e_k, starting from r_0 = z. The token cache holds IDs, not the
  encoder's latents, so z is their reconstruction sum_d e_{t_d} (what the RQ-VAE's decoder sees). As T -> 0 this
  is the RQ-VAE's own greedy residual quantization of that z.

The one idea to hold: neither needs an N x K matrix beyond the logits the model already produces: the soft target
of a row depends only on its code, so the loss is computed over row chunks whose targets are rebuilt in the
backward pass (a custom autograd function saves the logits, the codes and the codebook, nothing of size N x K);
sampling draws one chunk of rows at a time.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .sampling import sample_logits

__all__ = ["residual_codebooks", "sample_residual_codes", "soft_label_cross_entropy", "soft_labels"]

#: Elements of one chunk's (rows x K) temporaries (float32: 16 MiB).
_CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(k: int, chunk_rows: int | None) -> int:
    return max(1, chunk_rows if chunk_rows is not None else _CHUNK_ELEMENTS // max(k, 1))


def _check_temperature(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")


def _code_distances(codes: Tensor, codebook: Tensor) -> Tensor:
    """||x_i - e_k||^2 for rows x (n, dim) and codebook (K, dim) -> (n, K), float32, never negative."""
    x, c = codes.float(), codebook.float()
    d = x.square().sum(1, keepdim=True) + c.square().sum(1) - 2 * x @ c.T
    return d.clamp_min_(0.0)


def _target_logits(targets: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """-||e_t - e_k||^2 / tau for targets (n,) -> (n, K); the target's own distance is exactly 0."""
    d = _code_distances(codebook[targets], codebook)  # (n, K)
    d.scatter_(1, targets[:, None], 0.0)  # the expansion above leaves rounding residue at k = t
    return d.div_(-temperature)


def soft_labels(targets: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """q(k | t) ∝ exp(-||e_t - e_k||^2 / tau): targets (n,) int64, codebook (K, dim) -> (n, K) float32 rows summing
    to 1. Dense: for inspection and small n x K; the loss uses :func:`soft_label_cross_entropy`."""
    _check_inputs(None, targets, codebook, temperature)
    return _target_logits(targets, codebook, temperature).softmax(-1)


def _check_inputs(logits: Tensor | None, targets: Tensor, codebook: Tensor, temperature: float) -> None:
    _check_temperature("soft labels: temperature", temperature)
    if not isinstance(codebook, Tensor) or codebook.dim() != 2 or not codebook.is_floating_point():
        raise ValueError(f"soft labels: codebook must be a float tensor (K, dim), got "
                         f"{tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__}")
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64 or targets.dim() != 1:
        raise ValueError("soft labels: targets must be an int64 tensor (n,)")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= codebook.shape[0]):
        raise ValueError(f"soft labels: targets must lie in [0, {codebook.shape[0]}) (the codebook's rows)")
    if logits is not None and (logits.dim() != 2 or tuple(logits.shape) != (targets.shape[0], codebook.shape[0])):
        raise ValueError(f"soft labels: logits must have shape (n, K) = ({targets.shape[0]}, {codebook.shape[0]}), "
                         f"got {tuple(logits.shape)}")


class _SoftLabelCrossEntropy(torch.autograd.Function):
    """mean_i [logsumexp(l_i) - sum_k q_ik l_ik] over row chunks; backward (softmax(l) - q) / n, q rebuilt."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, codebook: Tensor, temperature: float, rows: int) -> Tensor:
        n = logits.shape[0]
        total = logits.new_zeros((), dtype=torch.float64)
        for s in range(0, n, rows):
            lg = logits[s:s + rows].float()  # (r, K)
            q = _target_logits(targets[s:s + rows], codebook, temperature).softmax(-1)  # (r, K)
            total += (lg.logsumexp(-1) - (q * lg).sum(-1)).double().sum()
        ctx.save_for_backward(logits, targets, codebook)
        ctx.temperature, ctx.rows = temperature, rows
        return (total / max(n, 1)).to(logits.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, codebook = ctx.saved_tensors
        n = logits.shape[0]
        out = torch.empty_like(logits)
        scale = grad.float() / max(n, 1)
        for s in range(0, n, ctx.rows):
            lg = logits[s:s + ctx.rows].float()
            q = _target_logits(targets[s:s + ctx.rows], codebook, ctx.temperature).softmax(-1)
            out[s:s + ctx.rows] = ((lg.softmax(-1) - q) * scale).to(out.dtype)
        return out, None, None, None, None


def soft_label_cross_entropy(logits: Tensor, targets: Tensor, codebook: Tensor, temperature: float,
                             chunk_rows: int | None = None) -> Tensor:
    """Mean over rows of -sum_k q(k | t) log softmax(logits)_k, q from :func:`soft_labels`, without building q
    for more than ``chunk_rows`` rows at once (default: 4M elements per chunk). logits (n, K), targets (n,) int64,
    codebook (K, dim) (no gradient reaches it: the targets are constants). Gradient to the logits only."""
    _check_inputs(logits, targets, codebook, temperature)
    rows = _rows_per_chunk(codebook.shape[0], chunk_rows)
    return _SoftLabelCrossEntropy.apply(logits, targets, codebook.detach(), float(temperature), rows)


@torch.no_grad()
def sample_residual_codes(ids: Tensor, codebooks: Tensor, temperature: float,
                          generator: torch.Generator | None = None, chunk_rows: int | None = None) -> Tensor:
    """Stochastic residual codes of the reconstruction of ``ids``: ids (n, D) int64, codebooks (D, K, dim) -> (n, D).

    z = sum_d codebooks[d, ids[:, d]]; at each depth k ~ softmax(-||r - e_k||^2 / temperature), r -= e_k. One
    uniform number per row and depth (the shared inverse-CDF sampler); rows are drawn in chunks, so memory is
    O(chunk x K), not n x K."""
    _check_temperature("stochastic codes: temperature", temperature)
    if not isinstance(codebooks, Tensor) or codebooks.dim() != 3:
        raise ValueError("stochastic codes: codebooks must be a tensor (D, K, dim)")
    D, K, _ = codebooks.shape
    if not isinstance(ids, Tensor) or ids.dtype != torch.int64 or ids.dim() != 2 or ids.shape[1] != D:
        raise ValueError(f"stochastic codes: ids must be an int64 tensor (n, {D}), got "
                         f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= K):
        raise ValueError(f"stochastic codes: ids must lie in [0, {K})")
    rows = _rows_per_chunk(K, chunk_rows)
    codebooks = codebooks.float()
    out = torch.empty_like(ids)
    for s in range(0, ids.shape[0], rows):
        chunk = ids[s:s + rows]
        residual = sum(codebooks[d][chunk[:, d]] for d in range(D))  # (r, dim): the reconstruction z
        for d in range(D):
            k = sample_logits(-_code_distances(residual, codebooks[d]), temperature, generator=generator)  # (r,)
            out[s:s + rows, d] = k
            residual = residual - codebooks[d][k]
    return out


@torch.no_grad()
def residual_codebooks(quantizer) -> Tensor:
    """(D, K, dim) float32: the vector each code of each depth adds, from a quantizer's public ``decode``. For a
    residual quantizer, depth d's code k is the decode of an index row with -1 (skipped) at the depths before d and
    k at d; a single-index quantizer gives D = 1."""
    if getattr(quantizer, "channel_first", False):
        raise ValueError("residual_codebooks: expected a channels-last quantizer (one vector per row)")
    K, depth = int(quantizer.codebook_size), int(getattr(quantizer, "num_indices", 1))
    if depth == 1 and not hasattr(quantizer, "depth"):
        return quantizer.decode(torch.arange(K)).float()[None]  # (1, K, dim)
    books = []
    for d in range(depth):
        idx = torch.full((K, d + 1), -1, dtype=torch.int64)
        idx[:, d] = torch.arange(K)
        books.append(quantizer.decode(idx).float())  # (K, dim)
    return torch.stack(books)  # (D, K, dim)
