"""DiT: a small diffusion transformer over the whole latent grid, the denoiser of any of the shared noise processes
(DDPM, flow matching, MeanFlow for one-step sampling).

Papers: Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", https://arxiv.org/abs/2212.09748
(patchify, adaLN conditioning on time + class, zero-initialised output); used as MeanFlow's backbone by Geng et al.
2025, https://arxiv.org/abs/2505.13447.

The one idea to hold: the latent grid (h, w, c) is cut into p x p patches, each a token; every block's layer norms
are modulated by one vector, the embedding of (t, t - r) plus the class embedding (null class for the
unconditional branch), so a single network serves every time, interval and class. The output layer starts at zero.

Shapes (digits): latents (B, 8, 8, 4), patch 2 -> (B, 16, 16) tokens -> (B, 16, dim) -> (B, 8, 8, 4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn

from ..diffusion import guided_denoiser
from ._registry import register_generator
from .continuous import ContinuousGenerator, ContinuousGeneratorConfig, TimeConditioning
from .sampling import SamplingConfig
from .transformer import Transformer, TransformerConfig


@dataclass
class DiTConfig(ContinuousGeneratorConfig):
    """dim / depth / heads: the transformer; patch_size: p (must divide h and w)."""

    dim: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    patch_size: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        h, w, _ = self.latent_shape
        if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide the latent grid {h} x {w}")


@register_generator("dit", example=dict(latent_shape=(4, 4, 3), num_classes=3, dim=32, depth=2, heads=2,
                                        patch_size=2, process="meanflow"))
class DiT(ContinuousGenerator):
    config_class = DiTConfig

    def __init__(self, cfg: DiTConfig):
        super().__init__(cfg)
        h, w, c = cfg.latent_shape
        p = cfg.patch_size
        self.grid = (h // p, w // p)
        self.patch_in = nn.Linear(p * p * c, cfg.dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], cfg.dim))
        self.time = TimeConditioning(cfg.dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # + null class
        self.transformer = Transformer(TransformerConfig(cfg.dim, cfg.depth, cfg.heads, dropout=cfg.dropout),
                                       cond_dim=cfg.dim)
        self.patch_out = nn.Linear(cfg.dim, p * p * c)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cls_emb.weight, std=0.02)
        nn.init.zeros_(self.patch_out.weight)
        nn.init.zeros_(self.patch_out.bias)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, labels: Tensor) -> Tensor:
        """x (B, h, w, c), t / r (B,), labels (B,) (null class allowed) -> (B, h, w, c)."""
        p = self.cfg.patch_size
        tokens = rearrange(x, "b (gh p1) (gw p2) c -> b (gh gw) (p1 p2 c)", p1=p, p2=p)
        cond = self.time(t, r) + self.cls_emb(labels)  # (B, dim)
        out = self.patch_out(self.transformer(self.patch_in(tokens) + self.pos_emb, cond))
        return rearrange(out, "b (gh gw) (p1 p2 c) -> b (gh p1) (gw p2) c", gh=self.grid[0], p1=p, p2=p)

    def loss(self, latents: Tensor, labels: Tensor) -> Tensor:
        latents = self.check_latents(latents)
        dropped = self.drop_labels(labels)
        net = lambda x, t, r: self(x, t, r, dropped)  # noqa: E731
        if self.cfg.process == "meanflow" and getattr(self.process, "guidance_omega", 1.0) != 1.0:
            null = torch.full_like(labels, self.null_class)
            return self.process.training_loss(net, latents, uncond=lambda x, t, r: self(x, t, r, null),
                                              guide_rows=dropped != self.null_class).mean()
        return self.process.training_loss(net, latents).mean()

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``steps`` calls of the process's sampler (None = its default). labels (B,) -> latents (B, h, w, c)."""
        sampling = self.check_sampling(sampling)
        labels = self.check_labels(labels)
        w = sampling.guidance
        if w > 0:
            both = self.with_null(labels, w)
            net = guided_denoiser(lambda x, t, r: self(x, t, r, both), w)
        else:
            net = lambda x, t, r: self(x, t, r, labels)  # noqa: E731
        noise = self.noise((labels.shape[0], *self.latent_shape), generator)
        return self.process.sample(net, noise, steps, sampling.temperature, generator)

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        return self.process.evaluations(steps) * (2 if guidance > 0 else 1)


__all__ = ["DiT", "DiTConfig"]
