"""MeanFlow: a network of the *average* velocity u(z, r, t) over [r, t], trained through the MeanFlow identity and
sampled in one step (or a few).

Paper: Geng, Deng, Bai, Kolter, He 2025, "Mean Flows for One-step Generative Modeling",
https://arxiv.org/abs/2505.13447 (section 4.1: the identity and the loss; section 4.2: guidance in the target).

The one idea to hold: on the path z_t = (1 - t) x + t eps (v = eps - x), the average velocity
u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds satisfies u = v - (t - r) * du/dt, where the total derivative
du/dt = v . d_z u + d_t u is one Jacobian-vector product of the network along the tangent (v, 1, 0) over (z, t, r).
The regression target u_tgt = v - (t - r) * sg(du/dt) is computed without gradient (stop-gradient), and a sample is
z_r = z_t - (t - r) * u(z_t, r, t): one network call from t = 1 to r = 0.

Network convention: ``net(z, t, r)`` (the denoiser signature of :mod:`.base`).
Forward-mode AD is not implemented for the fused CPU attention kernel, so the JVP runs with torch's math attention.
Temperature scales the starting noise.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Denoiser, NoiseProcess, batch_times, check_choice, per_sample, register_process
from .flow import TIME_SAMPLING, interpolate, sample_times


@register_process("meanflow", example=dict(ratio_r_neq_t=0.5, default_steps=1))
class MeanFlow(NoiseProcess):
    """ratio_r_neq_t: fraction of training rows with r < t (the rest are r = t, plain flow matching; paper 0.25);
    time_sampling / logit_mean / logit_std: how (t, r) are drawn (two draws, t the larger; paper logit-normal
    (-0.4, 1.0)); adaptive_p, adaptive_c: the loss is sg(w) * ||u - u_tgt||^2 with w = 1 / (||.||^2 + c)^p (p = 0:
    plain squared error); guidance_omega: the training-time guidance scale omega of section 4.2 (1 = off)."""

    def __init__(self, ratio_r_neq_t: float = 0.25, time_sampling: str = "logit_normal", logit_mean: float = -0.4,
                 logit_std: float = 1.0, adaptive_p: float = 1.0, adaptive_c: float = 1e-3,
                 guidance_omega: float = 1.0, default_steps: int = 1):
        name = type(self).__name__
        if not 0.0 <= ratio_r_neq_t <= 1.0:
            raise ValueError(f"{name}: ratio_r_neq_t must lie in [0, 1], got {ratio_r_neq_t!r}")
        self.time_sampling = check_choice(name, "time_sampling", time_sampling, TIME_SAMPLING)
        if not logit_std > 0:
            raise ValueError(f"{name}: logit_std must be > 0, got {logit_std!r}")
        if adaptive_p < 0 or not adaptive_c > 0:
            raise ValueError(f"{name}: need adaptive_p >= 0 and adaptive_c > 0, got {adaptive_p!r}, {adaptive_c!r}")
        if not guidance_omega >= 1.0:
            raise ValueError(f"{name}: guidance_omega must be >= 1 (1 = no guidance in the target), got "
                             f"{guidance_omega!r}")
        self.ratio_r_neq_t = float(ratio_r_neq_t)
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.adaptive_p, self.adaptive_c = float(adaptive_p), float(adaptive_c)
        self.guidance_omega = float(guidance_omega)
        self.default_steps = self.check_steps(default_steps)

    def config(self) -> dict[str, Any]:
        return dict(ratio_r_neq_t=self.ratio_r_neq_t, time_sampling=self.time_sampling, logit_mean=self.logit_mean,
                    logit_std=self.logit_std, adaptive_p=self.adaptive_p, adaptive_c=self.adaptive_c,
                    guidance_omega=self.guidance_omega, default_steps=self.default_steps)

    # ------------------------------------------------------------------------------------------------------------
    def sample_times(self, n: int, device, dtype) -> tuple[Tensor, Tensor]:
        """(t, r), each (n,), r <= t; a random ``ratio_r_neq_t`` of the rows keep r < t, the others r = t."""
        a = sample_times(n, self.time_sampling, self.logit_mean, self.logit_std, device, dtype)
        b = sample_times(n, self.time_sampling, self.logit_mean, self.logit_std, device, dtype)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        flow_rows = torch.rand(n, device=device) >= self.ratio_r_neq_t
        return t, torch.where(flow_rows, t, r)

    @staticmethod
    def time_derivative(net: Denoiser, z: Tensor, t: Tensor, r: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(u, du/dt) at (z, t, r) along the trajectory dz/dt = v, dr/dt = 0: one forward-mode JVP, no gradient."""
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            return torch.func.jvp(net, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))

    def target(self, net: Denoiser, z: Tensor, t: Tensor, r: Tensor, v: Tensor) -> Tensor:
        """u_tgt = v - (t - r) * du/dt, detached (the stop-gradient of the paper's eq. 10)."""
        _, dudt = self.time_derivative(net, z, t, r, v)
        return (v - per_sample(t - r, z) * dudt).detach()

    def training_loss(self, net: Denoiser, x0: Tensor, uncond: Denoiser | None = None,
                      guide_rows: Tensor | None = None) -> Tensor:
        """Adaptively weighted ||u_theta(z_t, r, t) - u_tgt||^2 (summed over dims, as the paper). -> (B,)

        uncond: the null-class denoiser; with guidance_omega > 1 the target's velocity becomes
        v_g = u(z_t, t, t | null) + omega * (v - u(z_t, t, t | null)) (section 4.2, kappa = 0) and the JVP tangent
        is v_g. guide_rows (B,) bool: the rows that get v_g (None = all); rows trained on the null class keep v.
        """
        B = x0.shape[0]
        t, r = self.sample_times(B, x0.device, x0.dtype)
        noise = torch.randn_like(x0)
        z = interpolate(x0, noise, t)
        v = noise - x0
        if self.guidance_omega != 1.0:
            if uncond is None:
                raise ValueError("MeanFlow: guidance_omega > 1 needs the null-class denoiser (uncond=...)")
            with torch.no_grad():
                v_u = uncond(z, t, t)
            v_g = v_u + self.guidance_omega * (v - v_u)
            v = v_g if guide_rows is None else torch.where(per_sample(guide_rows, v), v_g, v)
        u_tgt = self.target(net, z, t, r, v)
        err = (net(z, t, r) - u_tgt).pow(2).flatten(1).sum(1)  # (B,)
        if self.adaptive_p == 0:
            return err
        weight = (err.detach() + self.adaptive_c).pow(-self.adaptive_p)
        return weight * err

    @torch.no_grad()
    def sample(self, net: Denoiser, noise: Tensor, steps: int | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """z_r = z_t - (t - r) u(z_t, t, r) on the grid 1 = t_0 > ... > t_steps = 0 (``steps`` network calls)."""
        steps = self.check_steps(steps)
        z = noise * self.check_temperature(temperature)
        for i in range(steps):
            t, r = 1 - i / steps, 1 - (i + 1) / steps
            z = z - (t - r) * net(z, batch_times(t, z), batch_times(r, z))
        return z

    def evaluations(self, steps: int | None = None) -> int:
        return self.check_steps(steps)


__all__ = ["MeanFlow"]
