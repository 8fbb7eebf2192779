"""Soft vector quantization, SoftVQ (SoftVQ-VAE, Chen et al. 2024, arXiv:2412.10958).

Every row becomes a softmax-weighted mix of the codebook, softmax(-d(z, C) / temperature) @ C, computed by the
fused :func:`quantkit.ops.soft_assign` (never the N x K matrix). The output is continuous and fully differentiable
(no straight-through), so gradients reach z, the codebook and a learnable temperature.

The one idea to hold: ``quantized`` stays soft; ``indices`` name the most probable code of each row (the nearest
one under the same metric, via :func:`quantkit.ops.nearest_codeword`) and ``decode`` returns those codes, so
``decode(indices)`` is the hard limit of ``quantized`` as the temperature goes to 0.

Dead-code revival (``dead_code=DeadCodeConfig()``; off by default, as for VectorQuantizer, so that a
training forward changes no state unless asked): a code's gradient is its share of the softmax, so codes far from
every latent get none and never move; the latents then concentrate on a small cap of the sphere whose few codes
are averaged together (tens of codes share each row's mass), and most of the vocabulary is never the most
probable code. Each training step counts the most probable codes into an EMA ``usage`` and replaces codes below
the threshold by this step's latents, through the shared :func:`quantkit.quantizers.codebook.revive_dead_codes`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import nearest_codeword, soft_assign
from ._registry import register_quantizer
from .base import Quantizer
from .codebook import DeadCodeConfig, default_revival_state, track_usage_and_revive

__all__ = ["SoftVQ"]


@register_quantizer("softvq", example=dict(dim=4, codebook_size=16))
class SoftVQ(Quantizer):
    """Soft assignment over a learned codebook.

    Args:
        dim: code size. codebook_size: number of codes K.
        metric: "cosine" (logits cos(z, c) / t over l2-normalized z and codes, SoftVQ-VAE's default; the mix and
            the decoded codes are then normalized codes) or "l2" (logits -||z - c||^2 / t).
        temperature: initial temperature (SoftVQ-VAE: 0.07 with cosine).
        learnable_temperature: learn log(temperature) as a parameter.
        dead_code: revival of codes whose EMA usage (rows per step for which the code is the most probable)
            falls below the threshold, from the step's latents; None (default) disables it. Turn it on
            when training from scratch: without it the codebook collapses to a few codes.
        channel_first: x is (B, dim, *spatial).

    No auxiliary loss (zero): the codebook learns through the gradients of whatever consumes ``quantized``.
    """

    soft = True

    def __init__(self, dim: int, codebook_size: int, metric: str = "cosine", temperature: float = 0.07,
                 learnable_temperature: bool = False, channel_first: bool = False,
                 dead_code: DeadCodeConfig | None = None):
        if metric not in ("l2", "cosine"):
            raise ValueError(f"SoftVQ: metric must be 'l2' or 'cosine', got {metric!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"SoftVQ: temperature must be a finite positive number, got {temperature!r}")
        if dead_code is not None and not isinstance(dead_code, DeadCodeConfig):
            raise ValueError(f"SoftVQ: dead_code must be a DeadCodeConfig or None, got {type(dead_code).__name__}")
        super().__init__(dim, codebook_size, channel_first)
        self.metric = metric
        self.dead_code = dead_code
        self.register_buffer("usage", torch.ones(codebook_size))  # EMA most-probable counts per step (revival)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # training steps; seeds revival
        self.codebook = nn.Parameter(torch.randn(codebook_size, dim) / math.sqrt(dim))  # (K, dim)
        log_t = torch.tensor(math.log(temperature))
        if learnable_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t)

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def codes(self) -> Tensor:
        """The codebook as the output sees it: (K, dim), l2-normalized under the cosine metric."""
        return F.normalize(self.codebook, dim=-1, eps=1e-12) if self.metric == "cosine" else self.codebook

    def _quantize(self, z: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        codebook = self.codebook.to(z.dtype)
        if self.training and self.dead_code is not None and codebook is self.codebook:
            codebook = codebook.clone()  # revival below rewrites the weight the backward would otherwise read
        with torch.autocast(z.device.type, enabled=False):  # small temperatures need float32 logits
            quantized = soft_assign(z, codebook, self.temperature, self.metric)  # (N, dim), soft
            indices = nearest_codeword(z.detach(), codebook.detach(), self.metric).indices  # (N,) most probable
        if self.training and self.dead_code is not None:
            self._update_usage(z if mask is None else z[mask], indices if mask is None else indices[mask])
        return quantized, indices, z.new_zeros(())

    @torch.no_grad()
    def _update_usage(self, z: Tensor, indices: Tensor) -> None:
        """One training step: EMA usage of the most probable codes, then revival of the dead ones from z (n, dim)
        (after the soft output is computed, so this step's output is unaffected)."""
        track_usage_and_revive(self.codebook.data, self.usage, self.steps, z, indices, self.dead_code, self.metric)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        default_revival_state(state_dict, prefix, self.usage, self.steps)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _encode(self, z: Tensor) -> Tensor:
        with torch.autocast(z.device.type, enabled=False):
            return nearest_codeword(z, self.codebook.to(z.dtype), self.metric).indices

    def _decode(self, indices: Tensor) -> Tensor:
        return self.codes()[indices]

    def extra_repr(self) -> str:
        return f"metric={self.metric!r}, temperature={float(self.temperature):.4g}, " + super().extra_repr()
