"""Exact entropies of LFQ's soft code distribution, without the N x 2^d matrix (MAGVIT-v2, arXiv:2310.05737).

LFQ's codebook is {-1, +1}^d and its soft assignment softmax(-||z - c||^2 / t) factorizes over bits:
p_n(c) = prod_i p_{n,i}(c_i) with p_{n,i}(+1) = sigmoid(logit_{n,i}). So
- the per-sample entropy is a sum of d binary entropies (O(N d));
- the codebook (batch-mean) distribution P(c) = mean_n p_n(c) does not factorize, but splitting the bits into a low
  half L and a high half R gives P = A^T B / N, where A (N, 2^|L|) and B (N, 2^|R|) hold each sample's distribution
  over the codes of each half (log A = l_L @ bits^T - sum softplus(l_L), itself a small GEMM). One GEMM, chunked
  over N, gives all 2^d entries exactly; the backward is two more GEMMs per chunk, in closed form.

The one idea to hold: the only 2^d-sized tensor is P itself (1 MiB at d = 18); the backward recomputes A and B one
row chunk at a time, so memory is O(chunk * 2^(d/2) + 2^d), not O(N * 2^d).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_sample_entropy", "code_distribution", "codebook_entropy"]

_DEFAULT_CHUNK = 4096  # rows per GEMM chunk: 4096 x (512 + 512) floats = 16 MiB at d = 18
_LOG_EPS = 1e-30


def _softplus(x: Tensor) -> Tensor:
    """log(1 + e^x) to full precision (F.softplus returns x itself above its threshold of 20, which would drop the
    e^-20-sized probabilities that the codebook entropy sums)."""
    return x.clamp_min(0) + torch.log1p(torch.exp(-x.abs()))


def per_sample_entropy(bit_logits: Tensor) -> Tensor:
    """Entropy (nats) of each row's code distribution, prod_i Bernoulli(sigmoid(bit_logits[:, i])). (N, d) -> (N,).

    Exact: the entropy of a product distribution is the sum of its factors' entropies.
    """
    if bit_logits.dtype in (torch.float16, torch.bfloat16):
        bit_logits = bit_logits.float()
    p = torch.sigmoid(bit_logits)
    # H_b(sigmoid(l)) = p * softplus(-l) + (1 - p) * softplus(l), stable for any l.
    return (p * _softplus(-bit_logits) + (1 - p) * _softplus(bit_logits)).sum(-1)


def _bit_table(k: int, like: Tensor) -> Tensor:
    """(2^k, k) 0/1 table: row j holds the bits of j, bit 0 least significant (LFQ's index order)."""
    j = torch.arange(1 << k, device=like.device)[:, None]
    return ((j >> torch.arange(k, device=like.device)) & 1).to(like.dtype)


def _half_distribution(logits: Tensor, table: Tensor) -> Tensor:
    """Distribution over the 2^k codes of k independent bits, from their logits (n, k) -> (n, 2^k).

    log p(c) = sum_i [c_i] l_i - softplus(l_i): one small GEMM and an exp, exact and stable for any logit.
    """
    return torch.exp(logits @ table.T - _softplus(logits).sum(-1, keepdim=True))


def _accumulate(logits: Tensor, chunk: int) -> Tensor:
    """P (2^low, 2^high) = sum_n A_n^T B_n over row chunks (unnormalized, no autograd graph kept)."""
    low = logits.shape[1] // 2
    t_low, t_high = _bit_table(low, logits), _bit_table(logits.shape[1] - low, logits)
    total = logits.new_zeros(t_low.shape[0], t_high.shape[0])
    with torch.autocast(logits.device.type, enabled=False):  # probabilities down to e^-20 need float32 GEMMs
        for start in range(0, logits.shape[0], chunk):
            rows = logits[start:start + chunk]  # (n, d)
            total.addmm_(_half_distribution(rows[:, :low], t_low).T, _half_distribution(rows[:, low:], t_high))
    return total


def _half_backward(logits: Tensor, dist: Tensor, grad_dist: Tensor, table: Tensor) -> Tensor:
    """Gradient w.r.t. the logits (n, k) of _half_distribution, given dist (n, 2^k) and dL/d dist (n, 2^k):
    d dist_j / d l_i = dist_j ([c_j]_i - sigmoid(l_i))."""
    weighted = grad_dist * dist  # (n, 2^k)
    return weighted @ table - torch.sigmoid(logits) * weighted.sum(-1, keepdim=True)


class _CodebookEntropy(torch.autograd.Function):
    """H(mean_n p_n) from bit logits (N, d); backward recomputes A, B per chunk."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk: int) -> Tensor:
        probs = _accumulate(logits, chunk) / logits.shape[0]  # (2^low, 2^high), sums to 1
        log_probs = probs.clamp_min(_LOG_EPS).log()
        ctx.save_for_backward(logits, log_probs)
        ctx.chunk = chunk
        return -(probs * log_probs).sum()

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, log_probs = ctx.saved_tensors
        low = logits.shape[1] // 2
        t_low, t_high = _bit_table(low, logits), _bit_table(logits.shape[1] - low, logits)
        # dH/dP = -(log P + 1); P = A^T B / N, so dH/dA_n = G B_n and dH/dB_n = G^T A_n with G = dH/dP / N.
        g = -(log_probs + 1) * (grad / logits.shape[0])  # (2^low, 2^high)
        grad_logits = torch.empty_like(logits)
        with torch.autocast(logits.device.type, enabled=False):
            for start in range(0, logits.shape[0], ctx.chunk):
                rows = logits[start:start + ctx.chunk]
                a = _half_distribution(rows[:, :low], t_low)  # (n, 2^low)
                b = _half_distribution(rows[:, low:], t_high)  # (n, 2^high)
                grad_logits[start:start + ctx.chunk, :low] = _half_backward(rows[:, :low], a, b @ g.T, t_low)
                grad_logits[start:start + ctx.chunk, low:] = _half_backward(rows[:, low:], b, a @ g, t_high)
        return grad_logits, None


def code_distribution(bit_logits: Tensor, chunk_size: int = _DEFAULT_CHUNK) -> Tensor:
    """Batch-mean code distribution P (2^d,) of the rows of ``bit_logits`` (N, d), index = sum_i bit_i 2^i.

    Not differentiable (for monitoring and tests); the loss is :func:`codebook_entropy`.
    """
    if bit_logits.dtype in (torch.float16, torch.bfloat16):
        bit_logits = bit_logits.float()
    with torch.no_grad():
        total = _accumulate(bit_logits, chunk_size) / bit_logits.shape[0]
    # P[j_low, j_high] holds code j_low + 2^low * j_high: flatten high-major.
    return total.T.reshape(-1)


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
    if bit_logits.dtype in (torch.float16, torch.bfloat16):
        bit_logits = bit_logits.float()
    return _CodebookEntropy.apply(bit_logits, chunk_size)
