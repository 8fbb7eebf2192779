"""The ``ContinuousGenerator`` base class: a class-conditional model of a continuous tokenizer's latents (a
KL-VAE's), trained and sampled through one of the shared noise processes of :mod:`quantkit.diffusion`.

Subclasses (MAR's per-token head, the whole-latent DiT) implement

    loss(latents (B, *latent_shape), labels (B,)) -> scalar training loss
    generate(labels, steps=None, sampling=SamplingConfig(), generator=None) -> latents (B, *latent_shape) float32
    evaluations_per_image(steps, guidance) -> network forward passes one sample costs

Papers: classifier-free guidance, Ho & Salimans 2022, https://arxiv.org/abs/2207.12598; the noise processes cite
theirs (DDPM: Ho et al. 2020; flow matching: Lipman et al. 2023 / Liu et al. 2023; MeanFlow: Geng et al. 2025).

The one idea to hold: everything about labels is the token generators' (class ``num_classes`` is the null class,
label dropout trains it, ``guidance`` w mixes cond + w (cond - uncond), w = 0 is the conditional model), and
everything about noise is the process's: a generator only builds the denoiser net(x, t, r) the process calls.
``SamplingConfig.temperature`` scales the process's Gaussian draws; top_k / top_p have no meaning here and are refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import create_process, timestep_embedding
from ._base import ConditionalGenerator
from .sampling import SamplingConfig


@dataclass
class ContinuousGeneratorConfig:
    """latent_shape: the tokenizer's latents of one image, channels last ((h, w, c)); process / process_kwargs: the
    noise process ("ddpm", "flow", "meanflow") and its keywords."""

    latent_shape: tuple[int, ...] = (8, 8, 4)
    num_classes: int = 10
    label_dropout: float = 0.1
    process: str = "flow"
    process_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.latent_shape = tuple(int(s) for s in self.latent_shape)
        if len(self.latent_shape) != 3 or any(s < 1 for s in self.latent_shape):
            raise ValueError(f"latent_shape must be a positive (h, w, channels), got {self.latent_shape}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1), got {self.label_dropout}")
        create_process(self.process, **self.process_kwargs)  # unknown process / keyword -> an error naming it


class TimeConditioning(nn.Module):
    """(t, r) -> (B, width): an MLP of the sinusoidal embedding of t plus one of the interval h = t - r (MeanFlow
    conditions on both; for the other processes r = t and the second term is a constant)."""

    def __init__(self, width: int, frequencies: int = 128):
        super().__init__()
        self.frequencies = frequencies
        self.t_mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))
        self.h_mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor, r: Tensor) -> Tensor:
        dtype = self.t_mlp[0].weight.dtype
        return (self.t_mlp(timestep_embedding(t, self.frequencies).to(dtype))
                + self.h_mlp(timestep_embedding(t - r, self.frequencies).to(dtype)))


class ContinuousGenerator(ConditionalGenerator):
    config_class: type = ContinuousGeneratorConfig
    continuous = True

    def __init__(self, cfg: ContinuousGeneratorConfig):
        super().__init__(cfg)
        self.process = create_process(cfg.process, **cfg.process_kwargs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return self.cfg.latent_shape

    def check_latents(self, latents: Tensor) -> Tensor:
        if not isinstance(latents, Tensor) or not latents.is_floating_point() \
                or tuple(latents.shape[1:]) != self.latent_shape:
            got = f"{tuple(latents.shape)} {latents.dtype}" if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"{type(self).__name__}: latents must be a float tensor of shape "
                             f"(B, {', '.join(map(str, self.latent_shape))}), got {got}; was it trained on another "
                             f"tokenizer?")
        if not torch.isfinite(latents).all():
            raise ValueError(f"{type(self).__name__}: latents contain NaN or inf")
        return latents

    @staticmethod
    def check_sampling(sampling: SamplingConfig | None) -> SamplingConfig:
        sampling = sampling or SamplingConfig()
        if sampling.top_k is not None or sampling.top_p is not None:
            raise ValueError("top_k / top_p filter token distributions; a continuous generator has none (use "
                             "temperature and guidance)")
        return sampling

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        return torch.randn(shape, generator=generator, device=self.device)

    # what subclasses implement
    def loss(self, latents: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        raise NotImplementedError


__all__ = ["ContinuousGenerator", "ContinuousGeneratorConfig", "TimeConditioning"]
