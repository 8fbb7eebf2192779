"""The learned linear maps around implicit-codebook quantizers (FSQ, LFQ, BSQ, ...): dim <-> a few code channels.

Mentzer et al. 2023 (FSQ, arXiv:2309.15505) and MAGVIT-v2 (arXiv:2310.05737) put a Linear on each side of the
quantizer, from a wide ``dim`` (256) to a handful of channels (5 for FSQ's 2^14 grid) and back.

The one idea to hold: these GEMMs are thin (one side is a few columns wide), and the orientation in which a thin
GEMM is handed to BLAS decides its speed. autograd's default ``grad.t() @ input`` for the weight of the
5 -> 256 output projection is a (256, N) x (N, 5) product that runs at about a tenth of the speed of the same
numbers computed as ``(input.t() @ grad).t()`` ((5, N) x (N, 256)): 16 ms against 1.9 ms at N = 16,384 on one
Zen 3 core. :class:`ThinLinear` computes the same values as ``nn.Linear`` (same parameters, same state_dict) with
each backward product in its fast orientation: the narrow operand on the left.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import full_precision

__all__ = ["ThinLinear", "projections"]

#: Below this many elements in the wide operand, the orientation gain is smaller than a Python autograd.Function's
#: call overhead (measured on Zen 3: 200 us a step at 16 rows of 64, break-even near 1,024 rows of 64), and ThinLinear runs nn.Linear's own kernels.
_MIN_THIN_ELEMENTS = 1 << 16


class _ThinLinearFunction(torch.autograd.Function):
    """y = x W^T + b for rows x (N, in); backward products with the narrow side on the left."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # (N, in), (out, in), (out,)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)  # (N, out)

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad (N, out)
        x, weight = ctx.saved_tensors
        out_features, in_features = weight.shape
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # (N, out) @ (out, in); a narrow result (in < out) is faster as (in, out) @ (out, N), transposed.
            grad_x = weight.t().mm(grad.t()).t() if in_features < out_features else grad.mm(weight)
        if ctx.needs_input_grad[1]:
            # (out, N) @ (N, in), or its transpose (in, N) @ (N, out) when in is the narrow side.
            grad_w = x.t().mm(grad).t() if in_features < out_features else grad.t().mm(x)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(0)
        return grad_x, grad_w, grad_b


class ThinLinear(nn.Linear):
    """``nn.Linear`` (same parameters, values and state_dict) with thin-GEMM-friendly backward products.

    It computes in its weight's dtype (float32 also under autocast, which would otherwise change the code choice)
    and returns its input's dtype, so a module cast with ``.half()`` still takes float32 rows. Any leading shape.
    """

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x.device):
            rows = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)  # (N, in)
            if rows.shape[0] * max(self.in_features, self.out_features) < _MIN_THIN_ELEMENTS or not torch.is_grad_enabled():
                out = F.linear(rows, self.weight, self.bias)  # small: a Python autograd.Function costs more
            else:
                out = _ThinLinearFunction.apply(rows, self.weight, self.bias)  # (N, out)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def projections(dim: int, inner_dim: int, bias: bool = True) -> tuple[nn.Module, nn.Module]:
    """(project_in, project_out) between ``dim`` and ``inner_dim``; identities when they are equal."""
    if dim == inner_dim:
        return nn.Identity(), nn.Identity()
    return ThinLinear(dim, inner_dim, bias=bias), ThinLinear(inner_dim, dim, bias=bias)
