"""Exact entropies of LFQ's soft code distribution, without the N x 2^d matrix (MAGVIT-v2, arXiv:2310.05737).

LFQ's codebook is {-1, +1}^d and its soft assignment softmax(-||z - c||^2 / t) factorizes over bits:
p_n(c) = prod_i p_{n,i}(c_i) with p_{n,i}(+1) = sigmoid(logit_{n,i}). So
- the per-sample entropy is a sum of d binary entropies (O(N d));
- the codebook (batch-mean) distribution P(c) = mean_n p_n(c) does not factorize, but splitting the bits into a low
  half L and a high half R gives P = A^T B / N, where A (N, 2^|L|) and B (N, 2^|R|) hold each sample's distribution
  over the codes of each half. One GEMM, chunked over N, gives all 2^d entries exactly.

The one idea to hold: the only 2^d-sized tensor is P itself (1 MiB at d = 18); the backward recomputes A and B one
row chunk at a time, so memory is O(chunk * 2^(d/2) + 2^d), not O(N * 2^d).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["per_sample_entropy", "code_distribution", "codebook_entropy"]

_DEFAULT_CHUNK = 4096  # rows per GEMM chunk: 4096 x (512 + 512) floats = 16 MiB at d = 18
_LOG_EPS = 1e-30


def per_sample_entropy(bit_logits: Tensor) -> Tensor:
    """Entropy (nats) of each row's code distribution, prod_i Bernoulli(sigmoid(bit_logits[:, i])). (N, d) -> (N,).

    Exact: the entropy of a product distribution is the sum of its factors' entropies.
    """
    p = torch.sigmoid(bit_logits)
    # H_b(sigmoid(l)) = p * softplus(-l) + (1 - p) * softplus(l), stable for any l.
    return (p * F.softplus(-bit_logits) + (1 - p) * F.softplus(bit_logits)).sum(-1)


def _half_distribution(p: Tensor) -> Tensor:
    """Distribution over the 2^k codes of k independent bits: (n, k) probabilities of bit = 1 -> (n, 2^k).

    Code j = sum_i bit_i 2^i (bit 0 least significant), the same order as LFQ's index.
    """
    out = torch.ones(p.shape[0], 1, dtype=p.dtype, device=p.device)  # (n, 1)
    for i in range(p.shape[1]):
        pi = p[:, i:i + 1]
        out = torch.cat([out * (1 - pi), out * pi], dim=1)  # bit i set <=> index + 2^i
    return out


def _split(d: int) -> int:
    return d // 2


def _accumulate(p: Tensor, chunk: int) -> Tensor:
    """P (2^low, 2^high) = sum_n A_n^T B_n over row chunks (unnormalized, no autograd graph kept)."""
    low = _split(p.shape[1])
    total = p.new_zeros(1 << low, 1 << (p.shape[1] - low))
    for start in range(0, p.shape[0], chunk):
        rows = p[start:start + chunk]  # (n, d)
        total.addmm_(_half_distribution(rows[:, :low]).T, _half_distribution(rows[:, low:]))
    return total


class _CodebookEntropy(torch.autograd.Function):
    """H(mean_n p_n) from bit probabilities p (N, d); backward recomputes A, B per chunk."""

    @staticmethod
    def forward(ctx, p: Tensor, chunk: int) -> Tensor:
        probs = _accumulate(p, chunk) / p.shape[0]  # (2^low, 2^high), sums to 1
        log_probs = probs.clamp_min(_LOG_EPS).log()
        ctx.save_for_backward(p, log_probs)
        ctx.chunk = chunk
        return -(probs * log_probs).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, log_probs = ctx.saved_tensors
        low = _split(p.shape[1])
        # dH/dP = -(log P + 1); P = A^T B / N, so dH/dA_n = G B_n and dH/dB_n = G^T A_n with G = dH/dP / N.
        g = -(log_probs + 1) * (grad / p.shape[0])  # (2^low, 2^high)
        grad_p = torch.empty_like(p)
        for start in range(0, p.shape[0], ctx.chunk):
            with torch.enable_grad():
                rows = p[start:start + ctx.chunk].detach().requires_grad_(True)
                a = _half_distribution(rows[:, :low])  # (n, 2^low)
                b = _half_distribution(rows[:, low:])  # (n, 2^high)
                # One scalar (a has no graph when the low half is empty, d = 1).
                surrogate = (a * (b @ g.T).detach()).sum() + (b * (a @ g).detach()).sum()
                (grad_rows,) = torch.autograd.grad(surrogate, rows)
            grad_p[start:start + ctx.chunk] = grad_rows
        return grad_p, None


def code_distribution(bit_logits: Tensor, chunk_size: int = _DEFAULT_CHUNK) -> Tensor:
    """Batch-mean code distribution P (2^d,) of the rows of ``bit_logits`` (N, d), index = sum_i bit_i 2^i.

    Differentiable through ordinary autograd (keeps the chunks' A and B); for the loss use :func:`codebook_entropy`.
    """
    p = torch.sigmoid(bit_logits)
    low = _split(p.shape[1])
    total = p.new_zeros(1 << low, 1 << (p.shape[1] - low))
    for start in range(0, p.shape[0], chunk_size):
        rows = p[start:start + chunk_size]
        total = total + _half_distribution(rows[:, :low]).T @ _half_distribution(rows[:, low:])
    # P[j_low, j_high] holds code j_low + 2^low * j_high: flatten high-major.
    return (total / p.shape[0]).T.reshape(-1)


def codebook_entropy(bit_logits: Tensor, chunk_size: int = _DEFAULT_CHUNK) -> Tensor:
    """Entropy (nats) of the batch-mean code distribution of ``bit_logits`` (N, d), exact over all 2^d codes.

    Cost: 2 N 2^d FLOP in GEMMs of (chunk, 2^(d/2)) blocks; memory O(chunk_size * 2^(d/2) + 2^d) in forward and
    backward. Computed in bit_logits' dtype (use float32 or float64). Differentiable w.r.t. bit_logits.
    """
    if bit_logits.dim() != 2 or bit_logits.shape[0] == 0:
        raise ValueError(f"codebook_entropy: bit_logits must have shape (N, d) with N > 0, got "
                         f"{tuple(bit_logits.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"codebook_entropy: chunk_size must be a positive int, got {chunk_size!r}")
    return _CodebookEntropy.apply(torch.sigmoid(bit_logits), chunk_size)
