"""Evaluating a tokenizer: reconstruction quality, codebook use, speed, and a picture (``quantkit eval-tokenizer``).

Metrics (over a dataset's images, all in [0, 1]):
    psnr, ssim                 per-image, averaged; computed by scikit-image (``skimage.metrics``)
    utilization, perplexity    over every token of the set: fraction of the vocabulary used, exp(entropy) (discrete tokenizers; a continuous one reports latent_shape and latent_scale)
    tokens_per_image           prod(token_shape)
    encode_images_per_s, decode_images_per_s   wall-clock throughput of ``encode`` / ``decode`` (after a warm-up)

The one idea to hold: everything goes through the public contract (``from_unit`` -> ``encode`` -> ``decode`` ->
``to_unit``), so what is measured is exactly what a generator will see.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data import load_dataset, stack_batch
from .base import Tokenizer


@torch.no_grad()
def evaluate_tokenizer(tokenizer: Tokenizer, dataset, batch_size: int = 64, max_images: int | None = None,
                       measure_speed: bool = True, grid_path: str | Path | None = None,
                       grid_images: int = 16) -> dict[str, Any]:
    """Metrics of ``tokenizer`` on a map-style dataset of [0, 1] images; writes a PNG grid when grid_path is set."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    tokenizer = tokenizer.eval()
    device = next(tokenizer.parameters()).device
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    if n == 0:
        raise ValueError("evaluate_tokenizer: the dataset is empty")
    continuous = getattr(tokenizer, "continuous", False)  # a KL-VAE: latents, no codes to count
    counts = None if continuous else torch.zeros(tokenizer.vocab_size, dtype=torch.int64)
    psnrs, ssims = [], []
    encode_s = decode_s = 0.0
    first_batch = None
    if measure_speed:  # warm-up so that one-off allocation does not count
        x = tokenizer.from_unit(stack_batch(dataset, range(min(batch_size, n)))[0].to(device))
        tokenizer.decode(tokenizer.encode(x))
    for start in range(0, n, batch_size):
        images01 = stack_batch(dataset, range(start, min(start + batch_size, n)))[0].to(device)
        t0 = time.perf_counter()
        ids = tokenizer.encode(tokenizer.from_unit(images01))
        t1 = time.perf_counter()
        recon01 = tokenizer.to_unit(tokenizer.decode(ids)).clamp(0, 1)
        t2 = time.perf_counter()
        encode_s, decode_s = encode_s + (t1 - t0), decode_s + (t2 - t1)
        if counts is not None:
            counts.index_add_(0, ids.reshape(-1).cpu(), torch.ones(ids.numel(), dtype=torch.int64))
        a = images01.cpu().numpy().transpose(0, 2, 3, 1).astype(np.float64)  # (B, H, W, C)
        b = recon01.cpu().numpy().transpose(0, 2, 3, 1).astype(np.float64)
        win = min(7, a.shape[1], a.shape[2])
        win -= 1 - win % 2  # odd
        for x, y in zip(a, b):
            psnrs.append(peak_signal_noise_ratio(x, y, data_range=1.0) if not np.array_equal(x, y) else 100.0)
            ssims.append(structural_similarity(x, y, data_range=1.0, channel_axis=-1, win_size=win))
        if first_batch is None:
            first_batch = (images01.cpu(), recon01.cpu())
    report: dict[str, Any] = {"images": n, "psnr": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}
    if continuous:
        report.update(latent_shape=list(tokenizer.latent_shape), latent_scale=float(tokenizer.latent_scale),
                      tokens_per_image=int(math.prod(tokenizer.latent_grid)))
    else:
        probs = counts.double() / counts.sum()
        report.update(utilization=float((counts > 0).double().mean()),
                      perplexity=float(torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum())),
                      vocab_size=tokenizer.vocab_size, token_shape=list(tokenizer.token_shape),
                      tokens_per_image=int(math.prod(tokenizer.token_shape)))
    if measure_speed:
        report["encode_images_per_s"] = n / max(encode_s, 1e-9)
        report["decode_images_per_s"] = n / max(decode_s, 1e-9)
    if grid_path is not None:
        originals, recon = first_batch
        k = min(grid_images, originals.shape[0])
        save_image_grid([originals[:k], recon[:k]], grid_path)
        report["grid"] = str(grid_path)
    return report


def save_image_grid(rows: list[Tensor], path: str | Path, scale: int | None = None, pad: int = 1) -> Path:
    """Saves rows of [0, 1] images (each (N, C, H, W), same N) as one PNG: row r holds rows[r] side by side.

    With [originals, reconstructions] the picture shows each original above its reconstruction. ``scale``
    enlarges small images by pixel repetition (default: up to about 64 px per image).
    """
    from PIL import Image

    n, c, h, w = rows[0].shape
    scale = scale or max(1, 64 // max(h, w))
    hs, ws = h * scale, w * scale
    canvas = np.ones(((hs + pad) * len(rows) + pad, (ws + pad) * n + pad, 3), dtype=np.uint8) * 255
    for r, batch in enumerate(rows):
        batch = batch.detach().float().clamp(0, 1).cpu()
        if batch.shape[1] == 1:
            batch = batch.expand(-1, 3, -1, -1)
        for i in range(min(n, batch.shape[0])):
            img = (batch[i].numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
            img = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + r * (hs + pad), pad + i * (ws + pad)
            canvas[y:y + hs, x:x + ws] = img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# command line: quantkit eval-tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="training run folder or checkpoint folder")
    parser.add_argument("--data", help="digits, patches or an image folder (default: the data it was trained on)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", help="folder for eval.json and reconstructions.png (default: the checkpoint folder)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    from .train import load_tokenizer, read_checkpoint_config, resolve_checkpoint

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        config = read_checkpoint_config(ckpt)
        tokenizer = load_tokenizer(ckpt).to(args.device)
        data = args.data or (config.get("train_config") or {}).get("data") or "digits"
        dataset = load_dataset(data, args.split, tokenizer.config.image_size)
        if dataset[0][0].shape[0] != tokenizer.config.channels:
            raise ValueError(f"dataset {data!r} has {dataset[0][0].shape[0]}-channel images, the tokenizer reads "
                             f"{tokenizer.config.channels}")
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"quantkit eval-tokenizer: error: {err}")
    out = Path(args.out) if args.out else ckpt
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate_tokenizer(tokenizer, dataset, batch_size=args.batch_size, max_images=args.max_images,
                                grid_path=out / "reconstructions.png")
    report.update({"checkpoint": str(ckpt), "data": str(data), "split": args.split})
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


__all__ = ["evaluate_tokenizer", "save_image_grid"]
