"""How gradients cross the non-differentiable code choice: straight-through and the rotation trick.

Both return the quantized value exactly in the forward pass; they differ only in the gradient sent to z.
- Straight-through (Bengio et al. 2013; VQ-VAE, arXiv:1711.00937): d quantized / d z = identity.
- Rotation trick (Fifty et al. 2024, arXiv:2410.06424): the gradient is rotated and rescaled by the map that
  takes z to its code, so it carries the angle and norm of the quantization error.
"""
from __future__ import annotations

import torch
from torch import Tensor


def straight_through(z: Tensor, quantized: Tensor) -> Tensor:
    """``quantized`` exactly in the forward pass, identity gradient to ``z``. Any shape.

    The textbook ``z + (quantized - z).detach()`` rounds (it differs from quantized in about a third of float32
    entries), which would break ``decode(indices) == quantized``; ``quantized + (z - z)`` adds an exact zero.
    """
    return quantized.detach() + (z - z.detach())


class _RotationTrick(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, quantized: Tensor) -> Tensor:  # (N, D), (N, D)
        eps = 1e-6
        z_norm = z.norm(dim=-1, keepdim=True)
        q_norm = quantized.norm(dim=-1, keepdim=True)
        u = z / z_norm.clamp_min(eps)
        q = quantized / q_norm.clamp_min(eps)
        w = u + q
        w_norm = w.norm(dim=-1, keepdim=True)
        # u = -q (w undefined) or a zero vector: fall back to straight-through for that row.
        degenerate = (w_norm < eps) | (z_norm < eps) | (q_norm < eps)
        w = w / w_norm.clamp_min(eps)
        ctx.save_for_backward(u, q, w, q_norm / z_norm.clamp_min(eps), degenerate)
        return quantized.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        u, q, w, scale, degenerate = ctx.saved_tensors
        # Transpose of R = I - 2 w w^T + 2 q u^T, scaled: R^T g = g - 2 w (w.g) + 2 u (q.g).
        rotated = grad - 2 * w * (w * grad).sum(-1, keepdim=True) + 2 * u * (q * grad).sum(-1, keepdim=True)
        return torch.where(degenerate, grad, scale * rotated), None


def rotation_trick(z: Tensor, quantized: Tensor) -> Tensor:
    """quantized in the forward pass; the gradient to z is rotated as in arXiv:2410.06424. Shapes (N, D)."""
    return _RotationTrick.apply(z, quantized.detach())
