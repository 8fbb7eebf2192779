"""MAR: masked autoregression over continuous tokens, each token sampled by a small per-token MLP running one of
the shared noise processes (the "diffusion loss" in place of a codebook's cross-entropy).

Paper: Li, Tian, Li, Deng, He 2024, "Autoregressive Image Generation without Vector Quantization",
https://arxiv.org/abs/2406.11838 (reference code LTH14/mar: ``models/mar.py``, ``models/diffloss.py``).

The one idea to hold: a bidirectional transformer reads the visible tokens (masked ones replaced by a learned mask
token, the class in a leading buffer position) and emits a condition z_i for every position; the loss trains the
MLP head to denoise token x_i given z_i (only at masked positions), and sampling reveals the tokens in a random
order in K steps on the cosine schedule, the head sampling each newly revealed token with the noise process.

Differences from the paper, for 64-token digit latents on a CPU: one transformer with mask tokens instead of
MAE's encoder / decoder split; one buffer position (not 64); the training mask ratio follows the cosine schedule
over (0, 1] (MaskGIT's, which the K-step decoding also walks) instead of a truncated normal in [0.7, 1]; the head's
DDPM uses the fixed posterior variance, not a learned one. Guidance follows MAR's "linear" schedule by default:
the scale grows from ~0 to ``guidance`` as tokens are revealed, w_k = w * (L - still masked after step k) / L.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..diffusion import guided_denoiser
from ._registry import register_generator
from .continuous import ContinuousGenerator, ContinuousGeneratorConfig, TimeConditioning
from .maskgit import cosine_schedule, masked_counts
from .sampling import SamplingConfig
from .transformer import Transformer, TransformerConfig


@dataclass
class MARConfig(ContinuousGeneratorConfig):
    """dim / depth / heads: the transformer; head_width / head_depth: the per-token MLP; diffusion_batch_mul: each
    masked token is trained on this many independent (t, noise) draws per transformer pass (MAR's 4);
    default_steps: K, the autoregressive steps; process_steps: the head sampler's steps (None = the process's
    default); guidance_schedule: "linear" (MAR's) or "constant"."""

    dim: int = 128
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    head_width: int = 128
    head_depth: int = 3
    diffusion_batch_mul: int = 4
    default_steps: int = 8
    process_steps: int | None = None
    guidance_schedule: str = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_schedule not in ("linear", "constant"):
            raise ValueError(f"guidance_schedule must be 'linear' or 'constant', got {self.guidance_schedule!r}")
        if self.diffusion_batch_mul < 1 or self.head_depth < 1:
            raise ValueError("diffusion_batch_mul and head_depth must be >= 1")


class _AdaLNResBlock(nn.Module):
    """x + gate(y) * MLP(LN(x) * (1 + scale(y)) + shift(y)); the modulation starts at zero (an identity block)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class TokenHead(nn.Module):
    """MAR's SimpleMLPAdaLN: the denoiser of one token given its transformer condition z.
    x (N, c), t (N,), r (N,), z (N, cond_dim) -> (N, c). Output layers start at zero (untrained output 0)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(token_dim, width)
        self.time = TimeConditioning(width)
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_AdaLNResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, token_dim)
        for layer in (self.final_ada[1], self.out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, r: Tensor, z: Tensor) -> Tensor:
        y = self.time(t, r) + self.cond(z)  # (N, width)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_ada(y).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


@register_generator("mar", example=dict(latent_shape=(4, 4, 3), num_classes=3, dim=32, depth=2, heads=2,
                                        head_width=32, head_depth=2, process="flow",
                                        process_kwargs={"default_steps": 4}, default_steps=4))
class MAR(ContinuousGenerator):
    config_class = MARConfig

    def __init__(self, cfg: MARConfig):
        super().__init__(cfg)
        h, w, c = cfg.latent_shape
        self.num_tokens, self.token_dim = h * w, c
        self.tok_proj = nn.Linear(c, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)  # + null class
        self.pos_emb = nn.Parameter(torch.zeros(1, 1 + self.num_tokens, cfg.dim))
        self.transformer = Transformer(TransformerConfig(cfg.dim, cfg.depth, cfg.heads, dropout=cfg.dropout))
        self.head_pos_emb = nn.Parameter(torch.zeros(1, self.num_tokens, cfg.dim))  # MAR's "diffusion pos-emb"
        self.head = TokenHead(c, cfg.dim, cfg.head_width, cfg.head_depth)
        for p in (self.mask_token, self.cls_emb.weight, self.pos_emb, self.head_pos_emb):
            nn.init.normal_(p, std=0.02)

    def backbone(self, tokens: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """tokens (B, L, c), mask (B, L) bool (True = unknown), labels (B,) -> conditions z (B, L, dim)."""
        x = torch.where(mask[..., None], self.mask_token.to(tokens.dtype), self.tok_proj(tokens))  # (B, L, dim)
        x = torch.cat([self.cls_emb(labels)[:, None], x], dim=1) + self.pos_emb  # (B, 1 + L, dim)
        return self.transformer(x)[:, 1:] + self.head_pos_emb

    def loss(self, latents: Tensor, labels: Tensor) -> Tensor:
        """The process's loss of the head on the masked tokens only (mask ratio on the cosine schedule)."""
        tokens = self.check_latents(latents).reshape(latents.shape[0], self.num_tokens, self.token_dim)
        B, L = tokens.shape[:2]
        n_masked = (cosine_schedule(torch.rand(B, device=tokens.device)) * L).ceil().clamp(1, L)  # (B,)
        rank = torch.rand(B, L, device=tokens.device).argsort(dim=1).argsort(dim=1)
        mask = rank < n_masked[:, None]  # (B, L)
        z = self.backbone(tokens, mask, self.drop_labels(labels))
        k = self.cfg.diffusion_batch_mul
        x0, cond = tokens[mask].repeat(k, 1), z[mask].repeat(k, 1)  # (k * M, c), (k * M, dim)
        return self.process.training_loss(lambda x, t, r: self.head(x, t, r, cond), x0).mean()

    def guidance_at(self, guidance: float, still_masked: int) -> float:
        if self.cfg.guidance_schedule == "constant":
            return guidance
        return guidance * (self.num_tokens - still_masked) / self.num_tokens

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """K = ``steps`` rounds of (transformer pass, head sampling of the newly revealed tokens). labels (B,) ->
        latents (B, h, w, c) float32."""
        sampling = self.check_sampling(sampling)
        steps = self.check_steps(steps, self.cfg.default_steps)
        labels = self.check_labels(labels)
        B, L, c = labels.shape[0], self.num_tokens, self.token_dim
        dev = labels.device
        tokens = torch.zeros(B, L, c, device=dev)
        order = torch.rand(B, L, generator=generator, device=dev).argsort(dim=1)  # a random order per image
        rank = order.argsort(dim=1)  # (B, L) the step rank of each position
        mask = torch.ones(B, L, dtype=torch.bool, device=dev)
        for still_masked in masked_counts(L, steps):
            next_mask = rank >= L - still_masked  # the last `still_masked` positions of the order stay unknown
            reveal = mask & ~next_mask  # (B, L), the same count in every row
            w = self.guidance_at(sampling.guidance, still_masked)
            if w > 0:
                z = self.backbone(tokens.repeat(2, 1, 1), mask.repeat(2, 1), self.with_null(labels, w))
                cond = torch.cat([z[:B][reveal], z[B:][reveal]])  # (2M, dim): conditional rows, then null rows
                net = guided_denoiser(lambda x, t, r: self.head(x, t, r, cond), w)
            else:
                cond = self.backbone(tokens, mask, labels)[reveal]  # (M, dim)
                net = lambda x, t, r: self.head(x, t, r, cond)  # noqa: E731
            noise = torch.randn(cond.shape[0] // (2 if w > 0 else 1), c, generator=generator, device=dev)
            new = self.process.sample(net, noise, self.cfg.process_steps, sampling.temperature, generator)
            tokens = tokens.masked_scatter(reveal[..., None], new)  # row-major, as [reveal] read
            mask = next_mask
            if still_masked == 0:
                break
        return tokens.reshape(B, *self.latent_shape)

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        """Transformer passes (K) plus head passes (K x the process's calls), doubled under guidance. The head
        runs on a step's new tokens only, so one of its passes costs far less than a transformer pass."""
        steps = self.check_steps(steps, self.cfg.default_steps)
        passes = masked_counts(self.num_tokens, steps).index(0) + 1
        return passes * (1 + self.process.evaluations(self.cfg.process_steps)) * (2 if guidance > 0 else 1)


__all__ = ["MAR", "MARConfig", "TokenHead"]
