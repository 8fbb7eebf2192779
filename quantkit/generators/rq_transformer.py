"""RQ-Transformer: an autoregressive model of residual-quantized tokens (H x W positions x D codes each), split
into a spatial transformer, causal over positions, and a depth transformer, causal over the D codes of one
position.

Paper: Lee et al. 2022, "Autoregressive Image Generation using Residual Quantization",
https://arxiv.org/abs/2203.01941 (reference code kakaobrain/rq-vae-transformer: ``rqvae/models/rqtransformer``).

The one idea to hold: the expensive spatial transformer runs once per *position* on the sum of that position's
code embeddings; the cheap depth transformer then predicts the D codes one after another from the spatial
context h_t and the running (cumulative) sum of the codes chosen so far.

Training targets (paper section 3.3, both off by default, both switchable in the config; see
:mod:`.rq_targets`): ``soft_label_temperature`` > 0 trains on soft labels q(k) ∝ exp(-||e_t - e_k||^2 / tau)
over the RQ tokenizer's codebook instead of one-hot targets; ``code_temperature`` > 0 trains on codes drawn
stochastically from the tokenizer's softmax over distances instead of its greedy codes. Both need the
tokenizer's codebooks: ``codebook_source`` (a tokenizer run folder, read lazily on the first training step) or
:meth:`RQTransformer.set_codebooks`. They are training-only state: never saved, never used by ``generate``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import GeneratorConfig, TokenGenerator
from ._registry import register_generator
from .rq_targets import residual_codebooks, sample_residual_codes, soft_label_cross_entropy
from .sampling import SamplingConfig, guided_logits, sample_logits
from .transformer import Transformer, TransformerConfig, causal_mask


@dataclass
class RQTransformerConfig(GeneratorConfig):
    token_shape: tuple[int, ...] = (4, 4, 4)  # (h, w, depth)
    dim: int = 128
    spatial_depth: int = 4
    depth_depth: int = 2
    heads: int = 4
    dropout: float = 0.0
    soft_label_temperature: float = 0.0  # tau of the soft labels; 0: one-hot targets (the paper uses 0.5)
    code_temperature: float = 0.0  # temperature of the stochastic training codes; 0: the tokenizer's codes
    codebook_source: str = ""  # tokenizer run / checkpoint folder whose codebooks the two above use

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("soft_label_temperature", "code_temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"RQTransformerConfig.{name} must be a finite number >= 0 (0 = off), got {value!r}")


@register_generator("rq_transformer", example=dict(vocab_size=16, token_shape=(3, 3, 2), num_classes=3, dim=32,
                                                   spatial_depth=2, depth_depth=1, heads=2))
class RQTransformer(TokenGenerator):
    config_class = RQTransformerConfig

    def __init__(self, cfg: RQTransformerConfig):
        super().__init__(cfg)
        if len(cfg.token_shape) != 3:
            raise ValueError(f"RQTransformer models (h, w, depth) tokens, got token_shape {cfg.token_shape}")
        h, w, D = cfg.token_shape
        self.T, self.D = h * w, D
        C = cfg.dim
        self.spatial_emb = nn.Embedding(cfg.vocab_size, C)  # summed over depth -> one input per position
        self.depth_emb = nn.Embedding(cfg.vocab_size, C)  # cumulative sums -> depth transformer inputs
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, C)  # + null class; the first spatial input
        self.pos_hw = nn.Parameter(torch.zeros(1, self.T, C))
        self.pos_d = nn.Parameter(torch.zeros(1, D, C))
        self.spatial = Transformer(TransformerConfig(C, cfg.spatial_depth, cfg.heads, dropout=cfg.dropout))
        self.depth = Transformer(TransformerConfig(C, cfg.depth_depth, cfg.heads, dropout=cfg.dropout))
        self.head = nn.Linear(C, cfg.vocab_size)
        for p in (self.spatial_emb.weight, self.depth_emb.weight, self.cls_emb.weight, self.pos_hw, self.pos_d):
            nn.init.normal_(p, std=0.02)
        self.register_buffer("mask_t", causal_mask(self.T), persistent=False)
        self.register_buffer("mask_d", causal_mask(D), persistent=False)
        self._codebooks: Tensor | None = None  # (D, K, dim) of the tokenizer; training-only, not in state_dict

    # ------------------------------------------------------------------------------------------------------------
    # soft labels and stochastic codes (training only)

    @property
    def uses_codebooks(self) -> bool:
        return self.cfg.soft_label_temperature > 0 or self.cfg.code_temperature > 0

    def set_codebooks(self, codebooks: Tensor) -> None:
        """The RQ tokenizer's per-depth code vectors (D, K, dim) (e.g. ``residual_codebooks(tok.quantizer)``)."""
        if not isinstance(codebooks, Tensor) or codebooks.dim() != 3 or tuple(codebooks.shape[:2]) != \
                (self.D, self.vocab_size) or not codebooks.is_floating_point():
            got = tuple(codebooks.shape) if isinstance(codebooks, Tensor) else type(codebooks).__name__
            raise ValueError(f"RQTransformer.set_codebooks: codebooks must be a float tensor (depth, vocab, dim) = "
                             f"({self.D}, {self.vocab_size}, dim), got {got}")
        if not bool(torch.isfinite(codebooks).all()):
            raise ValueError("RQTransformer.set_codebooks: codebooks contain NaN or inf")
        self._codebooks = codebooks.detach().float().clone()

    def codebooks(self) -> Tensor:
        """The codebooks the soft labels and stochastic codes use (loaded from ``codebook_source`` if needed)."""
        if self._codebooks is None:
            if not self.cfg.codebook_source:
                raise ValueError("RQTransformer: soft labels / stochastic codes need the RQ tokenizer's codebooks: "
                                 "set codebook_source to its run folder or call set_codebooks(...)")
            from ..tokenizers import load_tokenizer

            tokenizer = load_tokenizer(self.cfg.codebook_source)
            self.set_codebooks(residual_codebooks(tokenizer.quantizer))
        return self._codebooks.to(self.pos_d.device)

    def loss(self, ids: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced cross-entropy of every code, with the switchable soft labels and stochastic codes."""
        ids = self.check_ids(ids)
        cfg = self.cfg
        if self.training and cfg.code_temperature > 0:  # the training codes are drawn, then used as inputs and targets
            ids = sample_residual_codes(ids.reshape(-1, self.D), self.codebooks(), cfg.code_temperature
                                        ).reshape(ids.shape)
        logits = self(ids, self.drop_labels(labels))  # (B, h, w, D, V)
        if cfg.soft_label_temperature <= 0:
            return F.cross_entropy(logits.reshape(-1, self.vocab_size), ids.reshape(-1))
        books = self.codebooks()
        logits, ids = logits.reshape(-1, self.D, self.vocab_size), ids.reshape(-1, self.D)
        per_depth = [soft_label_cross_entropy(logits[:, d], ids[:, d], books[d], cfg.soft_label_temperature)
                     for d in range(self.D)]  # every depth has as many rows: the mean of means is the mean
        return torch.stack(per_depth).mean()

    def _spatial_inputs(self, codes: Tensor, labels: Tensor) -> Tensor:
        """codes (B, T, D), labels (B,) -> (B, T, C): [class, x_0, ..., x_{T-2}] shifted right, + positions."""
        x = self.spatial_emb(codes).sum(2)  # (B, T, C)
        x = torch.cat([self.cls_emb(labels)[:, None], x[:, :-1]], dim=1)
        return x + self.pos_hw

    def _depth_inputs(self, h: Tensor, codes: Tensor) -> Tensor:
        """h (N, C) spatial context, codes (N, D) -> (N, D, C): [h, e_1, e_1 + e_2, ...] + depth positions."""
        cum = self.depth_emb(codes[:, :-1]).cumsum(1)  # (N, D-1, C)
        return torch.cat([h[:, None], cum], dim=1) + self.pos_d

    def forward(self, ids: Tensor, labels: Tensor) -> Tensor:
        """ids (B, h, w, D), labels (B,) -> logits (B, h, w, D, V); logits at (t, d) depend only on labels, the
        codes of positions < t and the codes of position t at depths < d."""
        B = ids.shape[0]
        codes = ids.reshape(B, self.T, self.D)
        h = self.spatial(self._spatial_inputs(codes, labels), mask=self.mask_t)  # (B, T, C)
        z = self._depth_inputs(h.reshape(B * self.T, -1), codes.reshape(B * self.T, self.D))
        logits = self.head(self.depth(z, mask=self.mask_d))  # (B*T, D, V)
        return logits.reshape(B, *self.cfg.token_shape, self.vocab_size)

    @torch.no_grad()
    def generate(self, labels, steps: int | None = None, sampling: SamplingConfig | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """Positions in raster order, codes in depth order, both with KV caches. labels (B,) -> (B, h, w, D)."""
        sampling = sampling or SamplingConfig()
        steps = self.check_steps(steps, self.T)
        if steps != self.T:
            raise ValueError(f"RQTransformer takes one spatial step per position: steps must be {self.T}, "
                             f"got {steps}")
        labels = self.check_labels(labels)
        B, g = labels.shape[0], sampling.guidance
        both = self.with_null(labels, g)
        n = both.shape[0]  # B, or 2B with guidance
        codes = torch.zeros(B, self.T, self.D, dtype=torch.long, device=labels.device)
        cache_t = self.spatial.new_cache()
        x = self.cls_emb(both)[:, None]  # (n, 1, C)
        for t in range(self.T):
            h = self.spatial(x + self.pos_hw[:, t:t + 1], cache=cache_t)[:, 0]  # (n, C)
            cache_d = self.depth.new_cache()
            z, cum = h, 0
            for d in range(self.D):
                out = self.depth((z + self.pos_d[:, d])[:, None], cache=cache_d)[:, 0]  # (n, C)
                logits = self.head(out)
                if g > 0:
                    logits = guided_logits(*logits.chunk(2), g)
                code = sample_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator)
                codes[:, t, d] = code
                cum = cum + self.depth_emb(code.repeat(n // B))  # (n, C)
                z = cum
            x = self.spatial_emb(codes[:, t].repeat(n // B, 1)).sum(1)[:, None]  # next position's input
        return codes.reshape(B, *self.cfg.token_shape)

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        """Spatial passes (one per position) plus depth passes (one per code); CFG doubles both."""
        return self.T * (1 + self.D) * (2 if guidance > 0 else 1)
