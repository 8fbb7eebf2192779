"""Noise processes for continuous tokens, written once and shared by MAR's per-token head and the whole-latent DiT.

    process = create_process("flow", sampler="heun")                   # or "ddpm", "meanflow"
    loss = process.training_loss(net, x0).mean()                       # net(x, t, r) -> (B, *shape)
    x0 = process.sample(net, torch.randn(B, *shape), steps=10, generator=make_generator(0))

Registered: ``ddpm`` (:mod:`.ddpm`), ``flow`` (:mod:`.flow`), ``meanflow`` (:mod:`.meanflow`); the interface,
time embedding and classifier-free guidance are in :mod:`.base`.
"""
from .base import (Denoiser, NoiseProcess, create_process, guided_denoiser, list_processes, register_process,
                   timestep_embedding)
from .ddpm import DDPM, beta_schedule
from .flow import FlowMatching
from .meanflow import MeanFlow

__all__ = ["DDPM", "Denoiser", "FlowMatching", "MeanFlow", "NoiseProcess", "beta_schedule", "create_process",
           "guided_denoiser", "list_processes", "register_process", "timestep_embedding"]
