"""Flow matching on the linear (rectified-flow / conditional-OT) path, with Euler and Heun ODE samplers.

Papers: Lipman et al. 2023, "Flow Matching for Generative Modeling", https://arxiv.org/abs/2210.02747 (section 4.1,
the OT path with sigma_min -> 0); Liu, Gong, Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer
Data with Rectified Flow", https://arxiv.org/abs/2209.03003.

The one idea to hold: z_t = (1 - t) x + t eps (t = 0 data, t = 1 noise: MeanFlow's convention, so the two processes
share one path), the network regresses the conditional velocity v = eps - x, and sampling integrates dz/dt = v from
t = 1 down to t = 0 on a uniform grid. At the optimum the loss is the irreducible conditional variance, not 0.

Temperature scales the starting noise.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import (Denoiser, NoiseProcess, batch_times, check_choice, logit_normal_times, per_sample, randn_like,
                   register_process)

SAMPLERS = ("euler", "heun")
TIME_SAMPLING = ("uniform", "logit_normal")


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """z_t = (1 - t) x0 + t noise; t (B,)."""
    t = per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def sample_times(n: int, how: str, mean: float, std: float, device, dtype) -> Tensor:
    """(n,) times in [0, 1]: uniform, or logit-normal(mean, std)."""
    if how == "uniform":
        return torch.rand(n, device=device, dtype=dtype)
    return logit_normal_times(n, mean, std, device, dtype)


@register_process("flow", example=dict(sampler="euler", default_steps=8))
class FlowMatching(NoiseProcess):
    """sampler "euler" (1 call per step) | "heun" (2); time_sampling "uniform" | "logit_normal" (mean, std)."""

    def __init__(self, sampler: str = "euler", time_sampling: str = "uniform", logit_mean: float = 0.0,
                 logit_std: float = 1.0, default_steps: int = 20):
        name = type(self).__name__
        self.sampler = check_choice(name, "sampler", sampler, SAMPLERS)
        self.time_sampling = check_choice(name, "time_sampling", time_sampling, TIME_SAMPLING)
        if not logit_std > 0:
            raise ValueError(f"{name}: logit_std must be > 0, got {logit_std!r}")
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.default_steps = self.check_steps(default_steps)

    def config(self) -> dict[str, Any]:
        return dict(sampler=self.sampler, time_sampling=self.time_sampling, logit_mean=self.logit_mean,
                    logit_std=self.logit_std, default_steps=self.default_steps)

    def training_loss(self, net: Denoiser, x0: Tensor) -> Tensor:
        """mean over dims of ||net(z_t, t) - (eps - x0)||^2. -> (B,)"""
        t = sample_times(x0.shape[0], self.time_sampling, self.logit_mean, self.logit_std, x0.device, x0.dtype)
        noise = torch.randn_like(x0)
        return (net(interpolate(x0, noise, t), t, t) - (noise - x0)).pow(2).flatten(1).mean(1)

    @torch.no_grad()
    def sample(self, net: Denoiser, noise: Tensor, steps: int | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None, sampler: str | None = None) -> Tensor:
        """Integrates from z_1 = temperature * noise to z_0 in ``steps`` uniform steps. (B, *shape) -> (B, *shape)"""
        steps = self.check_steps(steps)
        sampler = check_choice("FlowMatching", "sampler", sampler or self.sampler, SAMPLERS)
        z = noise * self.check_temperature(temperature)
        for i in range(steps):
            t, t_next = 1 - i / steps, 1 - (i + 1) / steps
            tt, tn = batch_times(t, z), batch_times(t_next, z)
            dt = t_next - t  # negative: towards the data
            v = net(z, tt, tt)
            if sampler == "euler":
                z = z + dt * v
            else:  # Heun: Euler predictor, then the mean of the two slopes
                v_next = net(z + dt * v, tn, tn)
                z = z + dt * 0.5 * (v + v_next)
        return z

    def evaluations(self, steps: int | None = None) -> int:
        return self.check_steps(steps) * (2 if self.sampler == "heun" else 1)


__all__ = ["FlowMatching", "interpolate", "sample_times"]
