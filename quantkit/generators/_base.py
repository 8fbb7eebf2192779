"""The ``TokenGenerator`` base class: what every generator over token IDs shares.

A generator is a class-conditional model of the token IDs a quantkit tokenizer emits. Subclasses implement

    loss(ids, labels) -> scalar training loss            (ids in the generator's token layout, labels (B,) int64)
    generate(labels, steps=None, sampling=SamplingConfig(), generator=None) -> ids
    evaluations_per_image(steps, guidance) -> int        network forward passes one sample costs

The label handling (null class, dropout, guidance batching, step checks) lives in ``ConditionalGenerator``, which
the continuous generators (:mod:`.continuous`: MAR, DiT, over a KL-VAE's latents) share.

The one idea to hold: class ``num_classes`` is the *null* class (label dropped), which classifier-free guidance
uses as its unconditional branch; requests for any class outside [0, num_classes) are refused.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn


@dataclass
class GeneratorConfig:
    """Fields every generator config has. ``token_shape``: the tokenizer's ID layout without the batch dim."""

    vocab_size: int = 64
    token_shape: tuple[int, ...] = (8, 8)
    num_classes: int = 10
    label_dropout: float = 0.1  # probability of training on the null class (needed for guidance)

    def __post_init__(self) -> None:
        self.token_shape = tuple(int(s) for s in self.token_shape)
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if any(s < 1 for s in self.token_shape):
            raise ValueError(f"token_shape must be positive, got {self.token_shape}")


class ConditionalGenerator(nn.Module):
    """What token and continuous generators share: the class labels (with the null class), label dropout,
    guidance batching, step checks. ``cfg`` has ``num_classes`` and ``label_dropout``."""

    registry_name: str = ""
    config_class: type = GeneratorConfig
    #: False: a model of token IDs (:class:`TokenGenerator`); True: of continuous latents (``ContinuousGenerator``)
    continuous: bool = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.cfg)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----------------------------------------------------------------------------------------------------------
    # validation shared by every subclass

    def check_labels(self, labels: Tensor | Sequence[int] | int) -> Tensor:
        """labels -> (B,) int64 on the model's device; a clear error for a class the model does not know."""
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(self.device)
        if labels.numel() == 0:
            raise ValueError("need at least one class label to sample")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.numel():
            raise ValueError(f"unknown class {int(bad[0])}: this {type(self).__name__} was trained on classes "
                             f"0..{self.num_classes - 1}")
        return labels

    @staticmethod
    def check_steps(steps: int | None, default: int) -> int:
        steps = default if steps is None else steps
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return steps

    def drop_labels(self, labels: Tensor) -> Tensor:
        """Training-time label dropout: replaces a fraction ``label_dropout`` of labels by the null class."""
        if not self.training or self.cfg.label_dropout <= 0:
            return labels
        drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
        return labels.masked_fill(drop, self.null_class)

    def with_null(self, labels: Tensor, guidance: float) -> Tensor:
        """For guidance > 0 the batch is doubled: (B,) -> (2B,) = [labels, null ... null]."""
        if guidance == 0:
            return labels
        return torch.cat([labels, torch.full_like(labels, self.null_class)])


class TokenGenerator(ConditionalGenerator):
    config_class: type = GeneratorConfig

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    def check_ids(self, ids: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
        """ids must be int64 in [0, vocab_size) with the generator's token layout (B, *token_shape)."""
        shape = self.cfg.token_shape if shape is None else shape
        if not isinstance(ids, Tensor) or ids.dtype != torch.long:
            raise ValueError(f"{type(self).__name__}: token ids must be an int64 tensor, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if tuple(ids.shape[1:]) != tuple(shape):
            raise ValueError(f"{type(self).__name__}: token ids must have shape (B, {', '.join(map(str, shape))}), "
                             f"got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"{type(self).__name__}: token ids must lie in [0, {self.vocab_size}) (the generator's "
                             f"vocabulary), got range [{int(ids.min())}, {int(ids.max())}]; was it trained on "
                             f"another tokenizer?")
        return ids

    # ----------------------------------------------------------------------------------------------------------
    # what subclasses implement

    def loss(self, ids, labels: Tensor) -> Tensor:
        """Teacher-forced cross-entropy of every token (autoregressive models); label dropout for guidance."""
        ids = self.check_ids(ids)
        logits = self(ids, self.drop_labels(labels))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab_size), ids.reshape(-1))

    def generate(self, labels, steps: int | None = None, sampling=None, generator: torch.Generator | None = None):
        raise NotImplementedError

    def evaluations_per_image(self, steps: int | None = None, guidance: float = 0.0) -> int:
        raise NotImplementedError
