"""The interface every noise process shares, the registry behind :func:`create_process`, the sinusoidal time
embedding the networks use, and classifier-free guidance for denoisers.

Papers: classifier-free guidance, Ho & Salimans 2022, https://arxiv.org/abs/2207.12598; the time embedding of
Vaswani et al. 2017 as used by DDPM (Ho et al. 2020, https://arxiv.org/abs/2006.11239).

The one idea to hold: a noise process never owns a network. It is handed a *denoiser*, a plain function

    net(x (B, *shape), t (B,), r (B,)) -> (B, *shape)

where t in [0, 1] is the time of x (0 = data, 1 = noise) and r <= t the time the prediction jumps to (only
MeanFlow uses r; the other processes pass r = t). What the output means (noise, velocity, average velocity) is the
process's business. So the same three processes serve MAR's per-token MLP head (x = a batch of tokens, conditioned
on the transformer's output by a closure) and a whole-latent DiT (x = latent grids, conditioned on the class).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .._registry import Registry

Denoiser = Callable[[Tensor, Tensor, Tensor], Tensor]

_PROCESSES = Registry("noise process")


def register_process(name: str, example: dict[str, Any]):
    """Class decorator: registers a noise process under ``name`` with a small ``example`` configuration."""
    return _PROCESSES.register(name, example)


def list_processes() -> list[str]:
    return _PROCESSES.names()


def create_process(name: str, **kwargs: Any) -> "NoiseProcess":
    """Builds noise process ``name`` ("ddpm", "flow" or "meanflow"); unknown names and keywords are errors."""
    if name not in _PROCESSES.names():
        raise ValueError(f"unknown process {name!r}; registered noise processes: {list_processes()}")
    cls = _PROCESSES.get(name)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"process {name!r} does not take these keywords ({err})") from err


class NoiseProcess:
    """A forward noising process, its training objective and its samplers (no parameters, no state).

    Subclasses implement
        training_loss(net, x0 (B, *shape)) -> (B,) per-sample loss   (random draws from the global RNG)
        sample(net, noise (B, *shape), steps, temperature, generator) -> x0 (B, *shape)
        evaluations(steps) -> network calls per sample
    """

    registry_name: str = ""
    default_steps: int = 1

    def config(self) -> dict[str, Any]:
        """The keywords that rebuild this process with :func:`create_process`."""
        raise NotImplementedError

    def training_loss(self, net: Denoiser, x0: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, net: Denoiser, noise: Tensor, steps: int | None = None, temperature: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def evaluations(self, steps: int | None = None) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------------------
    def check_steps(self, steps: int | None) -> int:
        steps = self.default_steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"{type(self).__name__}: steps must be a positive int, got {steps!r}")
        return steps

    @staticmethod
    def check_temperature(temperature: float) -> float:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        return float(temperature)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"


def check_choice(owner: str, name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")
    return value


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def batch_times(value: float | Tensor, x: Tensor) -> Tensor:
    """A time as a (B,) tensor of x's dtype and device."""
    return torch.as_tensor(value, dtype=x.dtype, device=x.device).expand(x.shape[0]).clone()


def per_sample(t: Tensor, x: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1), broadcastable against x (B, *shape)."""
    return t.reshape(-1, *([1] * (x.dim() - 1)))


def logit_normal_times(n: int, mean: float, std: float, device, dtype) -> Tensor:
    """t = sigmoid(N(mean, std)) (Esser et al. 2024, SD3 section 3.1), (n,)."""
    return torch.sigmoid(torch.randn(n, device=device, dtype=dtype) * std + mean)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of times t (B,) in [0, 1] (scaled by 1000, DDPM's integer range) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / half)  # (half,)
    args = (t * scale)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def guided_denoiser(net_both: Denoiser, guidance: float) -> Denoiser:
    """Classifier-free guidance around a denoiser whose batch is doubled: ``net_both`` sees (2B, ...) inputs and
    answers the first B rows with the condition and the last B with the null class. Returns the B-row denoiser
    cond + w * (cond - uncond) (= uncond + s * (cond - uncond) with s = 1 + w; w = 0 is the conditional model,
    exactly). The same mixing rule as the discrete generators' logits (:func:`guided_logits`)."""
    from ..generators.sampling import guided_logits  # here: quantkit.generators imports this package

    if not guidance >= 0:
        raise ValueError(f"guidance must be >= 0, got {guidance!r}")

    def net(x: Tensor, t: Tensor, r: Tensor) -> Tensor:
        cond, uncond = net_both(torch.cat([x, x]), torch.cat([t, t]), torch.cat([r, r])).chunk(2)
        return guided_logits(cond, uncond, guidance)

    return net


__all__ = ["Denoiser", "NoiseProcess", "create_process", "guided_denoiser", "list_processes", "register_process",
           "timestep_embedding"]
