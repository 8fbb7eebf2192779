"""DDPM: Gaussian diffusion with a linear or cosine beta schedule, epsilon- or v-prediction, and two samplers on
any subset of the T steps: ancestral (DDPM) and DDIM (eta = 0 deterministic).

Papers: Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models", https://arxiv.org/abs/2006.11239
(forward process, L_simple, ancestral sampling); Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672 (cosine
schedule, respacing); Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502
(eq. 12); Salimans & Ho 2022, https://arxiv.org/abs/2202.00512 (v-prediction).

The one idea to hold: q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) for integer t in [0, T); the network sees
the time as t / T. Sampling on a subset S of the steps recomputes the betas between consecutive kept steps,
beta'_i = 1 - abar_{s_i} / abar_{s_(i-1)}, so respacing to all T steps is the original chain.

Few steps with eps-prediction: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) multiplies the network's noise error by
1 / sqrt(abar), ~2e4 at the cosine schedule's last step (abar 2.4e-9 at T = 1000); v-prediction reads x0 off as
sqrt(abar) x_t - sqrt(1 - abar) v and has no such factor, so it is the choice for a short DDIM chain.

Variance: fixed to the posterior variance beta~_t (Ho et al.'s sigma_t^2 = beta~_t), not MAR's learned range.
Temperature scales every Gaussian draw of the sampler (the starting noise and, for DDPM, each step's noise; MAR
scales the step noise only).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import (Denoiser, NoiseProcess, batch_times, check_choice, per_sample, randn_like, register_process)

SCHEDULES = ("cosine", "linear")
PREDICTIONS = ("eps", "v")
SAMPLERS = ("ddpm", "ddim")


def beta_schedule(name: str, num_timesteps: int) -> Tensor:
    """(T,) float64 betas. linear: Ho et al.'s 1e-4 -> 0.02 rescaled by 1000 / T; cosine: Nichol & Dhariwal's
    abar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + 0.008) / 1.008 * pi / 2), beta clipped at 0.999."""
    check_choice("beta_schedule", "schedule", name, SCHEDULES)
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an int >= 2, got {num_timesteps!r}")
    T = num_timesteps
    if name == "linear":
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
    s = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


@register_process("ddpm", example=dict(schedule="cosine", prediction="eps", num_timesteps=100, default_steps=10))
class DDPM(NoiseProcess):
    """schedule "cosine" | "linear"; prediction "eps" | "v"; sampler "ddpm" (ancestral) | "ddim" (with ``eta``);
    default_steps: how many of the T steps a sampler visits unless told otherwise."""

    def __init__(self, schedule: str = "cosine", prediction: str = "eps", num_timesteps: int = 1000,
                 sampler: str = "ddpm", eta: float = 0.0, default_steps: int = 50):
        name = type(self).__name__
        self.schedule = check_choice(name, "schedule", schedule, SCHEDULES)
        self.prediction = check_choice(name, "prediction", prediction, PREDICTIONS)
        self.sampler = check_choice(name, "sampler", sampler, SAMPLERS)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"{name}: eta must lie in [0, 1], got {eta!r}")
        self.eta = float(eta)
        self.num_timesteps = num_timesteps
        self.betas = beta_schedule(schedule, num_timesteps)  # (T,) float64
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)  # (T,) strictly decreasing in (0, 1)
        self.default_steps = self.check_steps(default_steps)
        if default_steps > num_timesteps:
            raise ValueError(f"{name}: default_steps {default_steps} exceeds num_timesteps {num_timesteps}")

    def config(self) -> dict[str, Any]:
        return dict(schedule=self.schedule, prediction=self.prediction, num_timesteps=self.num_timesteps,
                    sampler=self.sampler, eta=self.eta, default_steps=self.default_steps)

    # ------------------------------------------------------------------------------------------------------------
    # forward process and targets

    def _abar(self, t_idx: Tensor, x: Tensor) -> Tensor:
        """abar at integer times (B,) -> (B, 1, ..., 1) in x's dtype."""
        return per_sample(self.alphas_cumprod.to(x.device)[t_idx].to(x.dtype), x)

    def q_sample(self, x0: Tensor, t_idx: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t_idx (B,) int64 in [0, T)."""
        abar = self._abar(t_idx, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t_idx: Tensor) -> Tensor:
        """What the network regresses: the noise, or v = sqrt(abar) eps - sqrt(1 - abar) x0."""
        if self.prediction == "eps":
            return noise
        abar = self._abar(t_idx, x0)
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0

    def network_time(self, t_idx: Tensor, x: Tensor) -> Tensor:
        """The time the network sees: t / T in [0, 1)."""
        return t_idx.to(x.dtype) / self.num_timesteps

    def training_loss(self, net: Denoiser, x0: Tensor) -> Tensor:
        """L_simple: mean over dims of ||target - net(x_t, t / T)||^2 with t uniform over the T steps. -> (B,)"""
        t_idx = torch.randint(self.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t_idx, noise)
        tt = self.network_time(t_idx, x0)
        return (net(x_t, tt, tt) - self.target(x0, noise, t_idx)).pow(2).flatten(1).mean(1)

    def split_prediction(self, out: Tensor, x_t: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
        """The network output -> (x0_hat, eps_hat)."""
        if self.prediction == "eps":
            return (x_t - (1 - abar).sqrt() * out) / abar.sqrt(), out
        x0 = abar.sqrt() * x_t - (1 - abar).sqrt() * out
        eps = (1 - abar).sqrt() * x_t + abar.sqrt() * out
        return x0, eps

    # ------------------------------------------------------------------------------------------------------------
    # sampling

    def timesteps(self, steps: int | None) -> list[int]:
        """The kept steps, ascending: ``steps`` integers spread evenly over [0, T - 1] (0 and T - 1 included)."""
        steps = self.check_steps(steps)
        if steps > self.num_timesteps:
            raise ValueError(f"DDPM: steps {steps} exceeds num_timesteps {self.num_timesteps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        return [round(i * (self.num_timesteps - 1) / (steps - 1)) for i in range(steps)]

    @torch.no_grad()
    def sample(self, net: Denoiser, noise: Tensor, steps: int | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None, sampler: str | None = None, eta: float | None = None
               ) -> Tensor:
        """From noise at t = T - 1 down to x0 over the kept steps. noise (B, *shape) -> (B, *shape)."""
        temperature = self.check_temperature(temperature)
        sampler = check_choice("DDPM", "sampler", sampler or self.sampler, SAMPLERS)
        eta = self.eta if eta is None else eta
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDPM: eta must lie in [0, 1], got {eta!r}")
        kept = self.timesteps(steps)
        abars = self.alphas_cumprod.tolist()
        x = noise * temperature
        for i in reversed(range(len(kept))):
            t = kept[i]
            a_t = abars[t]
            a_prev = abars[kept[i - 1]] if i > 0 else 1.0
            tt = batch_times(t / self.num_timesteps, x)
            x0, eps = self.split_prediction(net(x, tt, tt), x, torch.tensor(a_t, dtype=x.dtype, device=x.device))
            if sampler == "ddim":
                sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
                x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
            else:  # the posterior q(x_prev | x_t, x0) of the respaced chain
                beta = 1 - a_t / a_prev
                x = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
                sigma = math.sqrt(beta * (1 - a_prev) / (1 - a_t))
            if i > 0 and sigma > 0 and temperature > 0:
                x = x + (sigma * temperature) * randn_like(x, generator)
        return x

    def evaluations(self, steps: int | None = None) -> int:
        return len(self.timesteps(steps))


__all__ = ["DDPM", "beta_schedule"]
