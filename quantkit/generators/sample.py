"""`quantkit sample`: class labels, count, steps, guidance, seed -> a PNG grid and the token IDs.

    result = sample("runs/maskgit", labels=[3, 7], count=8, steps=8, guidance=2.0, seed=0, out_dir="samples")

The generator run carries a copy of the tokenizer it was trained on (``tokenizer/`` in the run folder); that
tokenizer decodes the IDs, wherever the run folder has been moved (a different one may be passed, and is refused
when its vocabulary or token layout differs). One row of the grid per label.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .sampling import SamplingConfig, make_generator
from .train import check_tokenizer_matches, generator_tokenizer_path, load_generator


@dataclass
class SampleResult:
    images: Tensor  # (len(labels) * count, C, H, W) in [0, 1], label-major
    ids: Tensor  # (len(labels) * count, *token_shape) int64
    labels: Tensor  # (len(labels) * count,)
    grid_path: Path | None
    ids_path: Path | None


def sample(generator_path: str | os.PathLike, labels, count: int = 8, steps: int | None = None,
           guidance: float | None = None, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, out_dir: str | os.PathLike | None = None,
           tokenizer_path: str | os.PathLike | None = None, device: str = "cpu") -> SampleResult:
    from ..tokenizers import load_tokenizer
    from ..tokenizers.evaluate import save_image_grid

    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    model, meta = load_generator(generator_path, map_location=device)
    tok_path = tokenizer_path or generator_tokenizer_path(generator_path, meta)
    tokenizer = load_tokenizer(tok_path).to(device)
    check_tokenizer_matches(model, tokenizer, f"tokenizer {str(tok_path)!r}")
    base = model.check_labels(labels)  # unknown class -> clear error before any work
    all_labels = base.repeat_interleave(count)
    defaults = (meta.get("train_config") or {}).get("sampling", {})  # the settings the run was evaluated with
    steps = defaults.get("steps") if steps is None else steps
    cfg = SamplingConfig(temperature=temperature if temperature is not None else defaults.get("temperature", 1.0),
                         top_k=top_k if top_k is not None else defaults.get("top_k"),
                         top_p=top_p if top_p is not None else defaults.get("top_p"),
                         guidance=guidance if guidance is not None else defaults.get("guidance", 0.0))
    with torch.no_grad():
        ids = model.generate(all_labels, steps=steps, sampling=cfg, generator=make_generator(seed, device))
        images = tokenizer.to_unit(tokenizer.decode(ids)).clamp(0, 1).cpu()
    grid_path = ids_path = None
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = list(images.split(count))
        grid_path = save_image_grid(rows, out / "samples.png")
        ids_path = out / "tokens.pt"
        torch.save({"ids": ids.cpu(), "labels": all_labels.cpu(), "seed": seed, "steps": steps,
                    "guidance": cfg.guidance, "temperature": cfg.temperature, "generator": str(generator_path)}, ids_path)
    return SampleResult(images=images, ids=ids.cpu(), labels=all_labels.cpu(), grid_path=grid_path,
                        ids_path=ids_path)


def _parse_labels(text: str) -> list[int]:
    from ..cli import CommandError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CommandError(f"--labels: expected comma-separated class numbers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import nonnegative_float, nonnegative_int, positive_float, positive_int, unit_interval

    parser.add_argument("--generator", required=True, help="run folder or checkpoint of a trained generator")
    parser.add_argument("--labels", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated classes (one grid row each)")
    parser.add_argument("--count", type=positive_int, default=8, help="samples per label")
    parser.add_argument("--steps", type=positive_int, help="decoding steps (MaskGIT; others take their fixed "
                                                            "number); unset flags use the run's recorded sampling "
                                                            "settings")
    parser.add_argument("--guidance", type=nonnegative_float, help="classifier-free guidance scale (0 = conditional)")
    parser.add_argument("--temperature", type=positive_float)
    parser.add_argument("--top-k", type=positive_int)
    parser.add_argument("--top-p", type=unit_interval)
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--tokenizer", help="decode with this tokenizer instead of the one the generator carries")
    parser.add_argument("--out", default="samples", help="folder for samples.png and tokens.pt")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> None:
    from ..cli import argument

    labels = _parse_labels(args.labels)
    with argument("--generator"):
        model, meta = load_generator(args.generator)
    with argument("--labels"):
        model.check_labels(labels)
    if args.tokenizer:
        from ..tokenizers import load_tokenizer

        with argument("--tokenizer"):
            check_tokenizer_matches(model, load_tokenizer(args.tokenizer), f"tokenizer {args.tokenizer!r}")
    else:
        with argument("--generator"):  # the tokenizer copy the run carries
            generator_tokenizer_path(args.generator, meta)
    del model
    result = sample(args.generator, labels, args.count, args.steps, args.guidance, args.temperature, args.top_k,
                    args.top_p, args.seed, args.out, args.tokenizer, args.device)
    print(json.dumps({"grid": str(result.grid_path), "tokens": str(result.ids_path),
                      "images": int(result.images.shape[0])}, indent=2))
