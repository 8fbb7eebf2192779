"""What every training config shares: the loop's checks, a JSON round trip, self-contained path recording, the
step seeds and the learning-rate schedule.

The one idea to hold: step s is a pure function of (weights, optimizer state, seed, s). Its batch indices and the
global RNG are both seeded from ``step_seed(seed, s)``, so a run resumed from the checkpoint of step s repeats the
losses of an uninterrupted one exactly.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class RunConfig:
    """Mixin for a training dataclass with the fields ``steps, batch_size, checkpoint_every, log_every, betas, lr,
    warmup_steps, min_lr_ratio, seed, out_dir, progress``.

    PATH_FIELDS: the fields that hold file or folder paths; :meth:`recorded` stores them relative to the run folder,
    so a run folder that moves keeps pointing at what moved with it.
    """

    PATH_FIELDS: tuple[str, ...] = ()

    def _check_loop_fields(self) -> None:
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}.{name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        from ..tokenizers.base import reject_unknown_fields  # lazy: tokenizers imports this package

        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}: expected a JSON object of fields, got {type(d).__name__}")
        reject_unknown_fields(cls, d)
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def is_path(cls, name: str, value: Any) -> bool:
        """Whether field ``name``'s value is a path (subclasses refine it: "digits" is a dataset name)."""
        return isinstance(value, str) and bool(value)

    def recorded(self, run_dir: str | os.PathLike, **replace: Any) -> dict[str, Any]:
        """The config as a run records it: ``out_dir`` is "." (the run folder itself) and every path field is
        relative to ``run_dir`` (``replace`` sets fields to given values first)."""
        d = {**self.to_dict(), **replace}
        d["out_dir"] = "."
        for name in self.PATH_FIELDS:
            if name not in replace and self.is_path(name, d.get(name)):
                d[name] = relative_to_run(d[name], run_dir)
        return d

    @classmethod
    def resolve_recorded_paths(cls, d: dict[str, Any], run_dir: str | os.PathLike) -> dict[str, Any]:
        """A recorded config (:meth:`recorded`) with its path fields made usable from the working directory."""
        d = dict(d)
        for name in cls.PATH_FIELDS:
            if cls.is_path(name, d.get(name)):
                d[name] = str(resolve_recorded(d[name], run_dir))
        return d


def relative_to_run(path: str | os.PathLike, run_dir: str | os.PathLike) -> str:
    """``path`` (absolute or relative to the working directory) relative to ``run_dir``, in POSIX form."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(run_dir))).as_posix()


def resolve_recorded(path: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """A path a run recorded -> where it is now: relative paths are read against the run folder; runs written
    before paths were recorded that way stored them relative to the working directory, which is tried second."""
    path = Path(path)
    if path.is_absolute():
        return path
    inside = Path(run_dir) / path
    return inside if inside.exists() or not path.exists() else path


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s batch (its RNG state uses ``step_seed + 1``)."""
    return (seed * 1_000_003 + step * 7919 + 17) % (2 ** 63)


def step_indices(seed: int, step: int, n: int, batch_size: int, rank: int = 0, world: int = 1) -> Tensor:
    """This rank's slice of step ``step``'s global batch of ``batch_size`` indices into ``n`` examples."""
    g = torch.Generator().manual_seed(step_seed(seed, step))
    return torch.randint(n, (batch_size,), generator=g)[rank::world]


def lr_at(config, step: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    t = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
