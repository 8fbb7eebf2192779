"""Training quantkit's MAE on built-in data (``quantkit train-features``) and loading it back.

    result = train_mae(MAETrainConfig(data="digits", steps=2000, out_dir="runs/mae_digits"))
    encoder = load_feature_encoder("runs/mae_digits")   # FeatureEncoder: images (B, C, H, W) -> (B, N, F)

A run folder holds ``model.safetensors``, ``config.json`` (format, MAE config, train config, losses) and
``metrics.jsonl``. It is a cache: asking again for a run the folder already holds (same config) trains nothing and
returns it; a folder holding a different run is an error rather than silently replaced. The loop is small and
self-contained (AdamW, warmup + cosine, per-step seeded batches and masks, so a run is reproducible); a run takes
minutes on a CPU, so there is no mid-run resume.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import dataset_channels, load_dataset, stack_batch
from ..training import RunConfig, atomic_write_text, load_weights, lr_at, step_seed
from .encoder import FeatureEncoder
from .mae import MAE, MAEConfig

FORMAT = "quantkit-features"
FORMAT_VERSION = 1

__all__ = ["MAETrainConfig", "MAETrainResult", "load_feature_encoder", "load_mae", "train_mae"]


@dataclass
class MAETrainConfig(RunConfig):
    """data: "digits", "patches" or an image folder; image_size: None = the dataset's default; model_config:
    MAEConfig overrides (image_size / channels come from the data). The paper's AdamW (betas 0.9, 0.95, weight
    decay 0.05) with linear warmup and cosine decay. JSON round trip: ``to_dict`` / ``from_dict`` (RunConfig's)."""

    data: str = "digits"
    image_size: int | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1.5e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    seed: int = 0
    out_dir: str = "runs/features"
    log_every: int = 50
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        self.betas = tuple(self.betas)
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MAETrainConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"MAETrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"MAETrainConfig.lr must be a positive number, got {self.lr!r}")


@dataclass
class MAETrainResult:
    out_dir: Path
    losses: list[tuple[int, float]]  # (step, mean masked-patch loss) per logging window
    seconds: float  # training time of this call (0 when the cached run was returned)
    cached: bool


def _same_run(saved: dict[str, Any], config: MAETrainConfig) -> bool:
    keep = ("progress", "out_dir", "log_every", "device")
    a = {k: v for k, v in saved.items() if k not in keep}
    b = {k: v for k, v in config.to_dict().items() if k not in keep}
    return a == b


def train_mae(config: MAETrainConfig | dict[str, Any], dataset=None) -> MAETrainResult:
    """Trains an MAE on ``config.data``'s train split (or ``dataset``: a map-style dataset of [0, 1] images) into
    ``config.out_dir``; returns the cached run instead when the folder already holds this run."""
    if isinstance(config, dict):
        config = MAETrainConfig.from_dict(config)
    out_dir = Path(config.out_dir)
    meta_path = out_dir / "config.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if dataset is None and meta.get("format") == FORMAT and _same_run(meta.get("train_config", {}), config):
            return MAETrainResult(out_dir, [tuple(x) for x in meta.get("losses", [])], 0.0, cached=True)
        raise FileExistsError(f"{str(out_dir)!r} already holds a different features run; choose another output "
                              f"folder or delete it")
    if dataset is None:
        dataset = load_dataset(config.data, "train", config.image_size, seed=config.seed)
    if len(dataset) == 0:
        raise ValueError("train_mae: the training dataset is empty")
    first = stack_batch(dataset, [0])[0]
    model_config = {**config.model_config, "image_size": int(first.shape[-1]), "channels": dataset_channels(dataset)}
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    model = MAE(MAEConfig.from_dict({**MAEConfig().to_dict(), **model_config})).to(device)
    # no weight decay on biases, norms, the mask token (MAE's param groups)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "mask_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "mask_token" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=config.betas)
    print(f"[quantkit] training an MAE on {len(dataset)} {config.data} images: {model.num_patches} patches, "
          f"{model.num_visible} visible, {sum(p.numel() for p in model.parameters()):,} parameters", file=sys.stderr)
    bar = None
    if config.progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, desc="train-features", dynamic_ncols=True)
    losses, window = [], []
    t0 = time.perf_counter()
    model.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    try:
        for step in range(config.steps):
            g = torch.Generator().manual_seed(step_seed(config.seed, step))
            idx = torch.randint(len(dataset), (config.batch_size,), generator=g)
            images = stack_batch(dataset, idx.tolist())[0].to(device)
            lr = lr_at(config, step)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = model(images, generator=g).loss  # the masks come from the same per-step generator
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(float(loss.detach()))
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                losses.append((step + 1, sum(window) / len(window)))
                window = []
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": losses[-1][1], "lr": lr}) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    save_mae(out_dir, model, config, losses)
    return MAETrainResult(out_dir, losses, seconds, cached=False)


def save_mae(out_dir: str | os.PathLike, model: MAE, config: MAETrainConfig | None = None,
             losses: list[tuple[int, float]] | None = None) -> Path:
    """Writes model.safetensors, then config.json (last, atomically: a folder with a config.json is complete)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.safetensors.tmp-{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out_dir / "model.safetensors")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": "mae", "mae_config": model.config.to_dict(),
            "train_config": config.to_dict() if config is not None else None, "losses": losses or []}
    atomic_write_text(out_dir / "config.json", json.dumps(meta, indent=2))
    return out_dir


def load_mae(path: str | os.PathLike, map_location: str = "cpu") -> MAE:
    """The MAE of a features run folder, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path / "config.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a quantkit features run (no config.json); train one with "
                                f"`quantkit train-features --out {path}`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a quantkit features run (config.json format is "
                         f"{meta.get('format')!r}, expected {FORMAT!r})")
    model = MAE(MAEConfig.from_dict(meta["mae_config"]))
    load_weights(model, load_file(str(path / "model.safetensors"), device=map_location), str(path))
    return model.to(map_location).eval()


def load_feature_encoder(path: str | os.PathLike, map_location: str = "cpu") -> FeatureEncoder:
    """The patch feature encoder (images (B, C, H, W) in [0, 1] -> (B, N, width)) of a features run folder."""
    model = load_mae(path, map_location)
    c = model.config
    return FeatureEncoder(model.feature_module(), (c.channels, c.image_size, c.image_size), name=f"MAE({path})")


# ----------------------------------------------------------------------------------------------------------------
# command line: quantkit train-features


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="digits", help="digits (default), patches, or an image folder")
    parser.add_argument("--image-size", type=int, help="default: the dataset's")
    parser.add_argument("--model-config", type=json.loads, default={},
                        help='JSON MAEConfig overrides, e.g. \'{"width": 64, "depth": 4, "mask_ratio": 0.75}\'')
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", dest="out_dir", default="runs/features")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", action="store_true",
                        help="also report the linear-probe accuracy on digits against raw pixels")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> None:
    config = MAETrainConfig(data=args.data, image_size=args.image_size, model_config=args.model_config,
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            out_dir=args.out_dir, device=args.device, progress=not args.no_progress)
    try:
        result = train_mae(config)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        raise SystemExit(f"quantkit train-features: error: {err}")
    report: dict[str, Any] = {"run": str(result.out_dir), "cached": result.cached,
                              "final_loss": result.losses[-1][1] if result.losses else None,
                              "seconds": round(result.seconds, 1)}
    if args.probe:
        from .probe import probe_report

        report["probe"] = probe_report(load_feature_encoder(result.out_dir))
    print(json.dumps(report, indent=2))
