"""Tokenizer benchmark: every quantkit quantizer and vector-quantize-pytorch's VectorQuantize / FSQ / LFQ inside the
very same VQGAN, trained on the same `patches` batches for the same number of steps, then evaluated on patches of
photographs never trained on; plus TiTok with 32 tokens at the same budget.

    python benchmarks/bench_tokenizers.py --quick      # 16x16 patches, 150 steps per model (~15 min on 2 busy cores)
    python benchmarks/bench_tokenizers.py              # 32x32 patches, 1,000 steps per model (~1 h on 2 idle cores)
    python benchmarks/bench_tokenizers.py --only vq "peer VectorQuantize"   # a subset
    python benchmarks/bench_tokenizers.py --steps 1000 --image-size 16 --test-images 1024 --threads 1 \
        --stem tokenizers_16px_1000steps      # the README's table (~35 min on 2 shared cores)

Writes benchmarks/results/tokenizers{_quick}.json (machines), .md (the README table) and .png (originals above each
model's reconstructions). Targets (issue 4): quantkit "vq" reaches at least the peer VectorQuantize's PSNR with at
least 95% codebook utilization at 1,024 codes, and no quantkit quantizer uses under 50% of its codebook.

Fairness: every model sees identical batches (same seed), the same optimizer, schedule and VQGAN; the codebook
quantizers use 1,024 codes of dimension 16. Both VQs get k-means initialisation and dead-code revival (the peer:
kmeans_init=True, threshold_ema_dead_code=2; its other settings are its defaults); both FSQs are the paper's
(levels [8, 5, 5, 5], straight-through rounding, no noise). FSQ's utilization grows with the budget (the encoder
learns to spread over the grid): at 16 px on 1,024 test crops, 41% after 500 steps and 91% after 1,000.
Utilization is measured over every token of the test crops (1,024 crops x 64 tokens by default; with 256 crops,
as --quick uses, codes rarer than about 1 in 16,000 tokens go unseen and utilization reads several points lower).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantkit.data import PatchesDataset, stack_batch  # noqa: E402
from quantkit.quantizers import Quantizer, QuantizerOutput, list_quantizers  # noqa: E402
from quantkit.quantizers.base import batch_usage_stats  # noqa: E402
from quantkit.tokenizers import create_tokenizer  # noqa: E402
from quantkit.tokenizers.evaluate import evaluate_tokenizer, save_image_grid  # noqa: E402
from quantkit.tokenizers.train import _lr_at, _step_seed, TrainConfig  # noqa: E402

CODES, DIM = 1024, 16


# ----------------------------------------------------------------------------------------------------------------
# vector-quantize-pytorch behind the quantkit Quantizer API, so it sits in the very same tokenizer


class PeerQuantizer(Quantizer):
    """Adapter: a vector-quantize-pytorch module on channels-last latents (B, *grid, dim)."""

    def __init__(self, kind: str, dim: int, **kwargs: Any):
        import vector_quantize_pytorch as vqp

        if kind == "VectorQuantize":
            module = vqp.VectorQuantize(dim=dim, **kwargs)
        elif kind == "FSQ":
            module = vqp.FSQ(dim=dim, **kwargs)
        elif kind == "LFQ":
            module = vqp.LFQ(dim=dim, **kwargs)
        else:
            raise ValueError(kind)
        super().__init__(dim, int(module.codebook_size))
        self.kind, self.module = kind, module
        self.registry_name = f"peer:{kind}"

    def _run(self, x: Tensor):
        b, d = x.shape[0], x.shape[-1]
        out = self.module(x.reshape(b, -1, d))  # (B, N, D)
        quantized, indices = out[0], out[1]  # (B, N, D), (B, N)
        loss = out[2] if len(out) > 2 and isinstance(out[2], Tensor) else x.new_zeros(())
        indices = indices.reshape(x.shape[:-1]).long()  # the peer's FSQ returns int32
        return quantized.reshape(x.shape), indices, loss.float().sum().reshape(())

    def forward(self, x: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        quantized, indices, loss = self._run(x)
        return QuantizerOutput(quantized, indices, loss, batch_usage_stats(indices, self.codebook_size))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        return self._run(x)[1]

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        flat = indices.reshape(indices.shape[0], -1)
        if self.kind == "VectorQuantize":
            codes = self.module.get_output_from_indices(flat)
        else:
            codes = self.module.indices_to_codes(flat)
        return codes.reshape(*indices.shape, self.dim)


# ----------------------------------------------------------------------------------------------------------------
# the contestants


@dataclass
class Entry:
    name: str
    family: str  # "quantkit" or "peer" (vector-quantize-pytorch)
    model: str = "vqgan"
    quantizer: str | None = None  # registered quantkit name
    kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = DIM
    peer: Callable[[], Quantizer] | None = None
    model_config: dict[str, Any] = field(default_factory=dict)


def entries(image_size: int) -> list[Entry]:
    from quantkit.quantizers import DeadCodeConfig, KMeansInit

    grid = image_size // 2 ** (len(vqgan_config(image_size)["ch_mult"]) - 1)  # side of the token grid
    out = [
        Entry("vq", "quantkit", quantizer="vq", kwargs=dict(codebook_size=CODES, kmeans_init=KMeansInit(),
                                                           dead_code=DeadCodeConfig())),
        Entry("softvq", "quantkit", quantizer="softvq", kwargs=dict(codebook_size=CODES, dead_code=DeadCodeConfig())),
        Entry("lfq", "quantkit", quantizer="lfq", kwargs=dict(codebook_size=CODES), dim=10),
        Entry("fsq", "quantkit", quantizer="fsq", kwargs=dict(levels=[8, 5, 5, 5]), dim=4),
        Entry("residual (vq x2)", "quantkit", quantizer="residual",
              kwargs=dict(quantizer="vq", depth=2, codebook_size=CODES, kmeans_init=KMeansInit(),
                          dead_code=DeadCodeConfig())),
        Entry("vqgan_lc", "quantkit", quantizer="vqgan_lc", kwargs=dict(codebook_size=CODES, feature_dim=32)),
        Entry("multiscale_residual", "quantkit", quantizer="multiscale_residual",
              kwargs=dict(codebook_size=CODES, patch_nums=[p for p in (1, 2, 4, 8, 16) if p < grid] + [grid],
                          dead_code=DeadCodeConfig())),
        Entry("peer VectorQuantize", "peer", peer=lambda: PeerQuantizer(
            "VectorQuantize", DIM, codebook_size=CODES, kmeans_init=True, threshold_ema_dead_code=2)),
        Entry("peer FSQ", "peer", dim=4, peer=lambda: PeerQuantizer("FSQ", 4, levels=[8, 5, 5, 5])),
        Entry("peer LFQ", "peer", dim=10, peer=lambda: PeerQuantizer("LFQ", 10, codebook_size=CODES)),
        Entry("TiTok-32 + vq", "quantkit", model="titok", quantizer="vq",
              kwargs=dict(codebook_size=CODES, kmeans_init=KMeansInit(), dead_code=DeadCodeConfig()),
              model_config=dict(num_latent_tokens=32, width=64, depth=2, heads=4,
                                patch_size=2 if image_size <= 16 else 4, pixel_range=(-1.0, 1.0))),
    ]
    return [e for e in out if e.peer is not None or e.quantizer in list_quantizers()]


def vqgan_config(image_size: int) -> dict[str, Any]:
    # 16 px (quick): one halving -> 8x8 tokens; 32 px: two halvings -> 8x8 tokens. Attention in the middle only.
    ch_mult = (1, 2) if image_size <= 16 else (1, 2, 2)
    return dict(ch=16, ch_mult=ch_mult, num_res_blocks=1, attn_levels=(), z_channels=32, norm_groups=8)


def build(entry: Entry, image_size: int):
    common = dict(image_size=image_size, channels=3)
    if entry.model == "titok":
        return create_tokenizer("titok", quantizer=entry.quantizer, quantizer_kwargs=entry.kwargs,
                                token_size=entry.dim, **common, **entry.model_config)
    quantizer = entry.peer() if entry.peer is not None else entry.quantizer
    return create_tokenizer("vqgan", quantizer=quantizer, quantizer_kwargs=entry.kwargs, embed_dim=entry.dim,
                            **common, **vqgan_config(image_size))


# ----------------------------------------------------------------------------------------------------------------


def train_one(entry: Entry, train_set, test_set, args) -> tuple[dict[str, Any], Tensor]:
    torch.manual_seed(args.seed)
    tok = build(entry, args.image_size)
    params = [p for p in tok.parameters() if p.requires_grad]
    sched = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.steps // 20)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95))
    step_times = []
    tok.train()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(_step_seed(args.seed, step))  # identical batches for every model
        idx = torch.randint(len(train_set), (args.batch_size,), generator=g)
        torch.manual_seed(_step_seed(args.seed, step) + 1)
        images = tok.from_unit(stack_batch(train_set, idx.tolist())[0])
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr_at(sched, step)
        terms, _ = tok.training_loss(images)
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step_times.append(time.perf_counter() - t0)
        if not math.isfinite(float(loss.detach())):
            raise RuntimeError(f"{entry.name}: loss became {float(loss)} at step {step}")
    report = evaluate_tokenizer(tok.eval(), test_set, batch_size=64)
    report["train_utilization"] = train_utilization(tok, train_set, args.test_images)
    images01 = stack_batch(test_set, range(args.grid_images))[0]
    recon = tok.to_unit(tok.decode(tok.encode(tok.from_unit(images01)))).clamp(0, 1)
    report.update(name=entry.name, family=entry.family, model=entry.model,
                  step_ms=1000 * statistics.median(step_times),
                  params=sum(p.numel() for p in tok.parameters()))
    return report, recon


@torch.no_grad()
def train_utilization(tok, train_set, n: int) -> float:
    """Fraction of the codebook used on n training crops (utilization on held-out photos is lower by design:
    codes that specialise to content only the training photos have stay unused there)."""
    used = torch.zeros(tok.vocab_size, dtype=torch.bool)
    for start in range(0, n, 64):
        images = stack_batch(train_set, range(start, min(start + 64, n)))[0]
        used[tok.encode(tok.from_unit(images)).reshape(-1)] = True
    return float(used.float().mean())


def markdown(rows: list[dict[str, Any]], args) -> str:
    lines = [f"Tokenizers on `patches` ({args.image_size}x{args.image_size} RGB crops; test = held-out photos, "
             f"{args.test_images} crops), {args.steps} steps x batch {args.batch_size}, seed {args.seed}. "
             f"Command: `python benchmarks/bench_tokenizers.py {args.command}`.",
             "",
             "| model | quantizer | family | codes | tokens/img | PSNR dB | SSIM | utilization (test) | "
             "utilization (train) | perplexity | step ms | enc img/s | dec img/s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['name']} | {r['family']} | {r['vocab_size']} | {r['tokens_per_image']} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.3f} | {r['utilization']:.1%} | "
                     f"{r.get('train_utilization', float('nan')):.1%} | {r['perplexity']:.0f} | "
                     f"{r['step_ms']:.0f} | {r['encode_images_per_s']:.0f} | {r['decode_images_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    by = {r["name"]: r for r in rows}
    notes = []
    if "vq" in by and "peer VectorQuantize" in by:
        ours, peer = by["vq"], by["peer VectorQuantize"]
        ok = ours["psnr"] >= peer["psnr"] and ours["utilization"] >= 0.95
        notes.append(f"{'PASS' if ok else 'MISS'}: quantkit vq PSNR {ours['psnr']:.2f} dB vs peer "
                     f"{peer['psnr']:.2f} dB, utilization {ours['utilization']:.1%} (target >= peer, >= 95%)")
    for r in rows:
        if r["family"] == "quantkit" and r["utilization"] < 0.5:
            notes.append(f"MISS: {r['name']} ({r['model']}) uses {r['utilization']:.1%} of its codebook (< 50%)")
    if not any(n.startswith("MISS: ") and "uses" in n for n in notes):
        notes.append("PASS: no quantkit quantizer under 50% utilization")
    return notes


def labelled_grid(originals: Tensor, recons: list[tuple[str, Tensor]], path: Path) -> None:
    """One row per model under the originals, with the model's name drawn at the left."""
    from PIL import Image, ImageDraw

    tmp = path.with_suffix(".tmp.png")
    save_image_grid([originals] + [r for _, r in recons], tmp, scale=max(1, 48 // originals.shape[-1]))
    grid = Image.open(tmp).convert("RGB")
    label_w = 150
    canvas = Image.new("RGB", (grid.width + label_w, grid.height), "white")
    canvas.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = grid.height / (len(recons) + 1)
    for i, name in enumerate(["original"] + [n for n, _ in recons]):
        draw.text((4, int(i * row_h + row_h / 2 - 6)), name, fill="black")
    canvas.save(path)
    tmp.unlink()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="16x16 patches, 150 steps, 256 test crops")
    p.add_argument("--steps", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--test-images", type=int)
    p.add_argument("--grid-images", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", help="names of entries to run (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--stem", help="file name of the results (default tokenizers / tokenizers_quick)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.command = shlex.join(sys.argv[1:] if argv is None else argv)
    args.steps = args.steps or (150 if args.quick else 1000)
    args.image_size = args.image_size or (16 if args.quick else 32)
    args.test_images = args.test_images or (256 if args.quick else 1024)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set = PatchesDataset("train", args.image_size, seed=args.seed)
    test_set = PatchesDataset("test", args.image_size, length=args.test_images, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or ("tokenizers_quick" if args.quick else "tokenizers")
    rows, recons = [], []
    todo = [e for e in entries(args.image_size) if not args.only or e.name in args.only]
    for entry in todo:
        t0 = time.time()
        report, recon = train_one(entry, train_set, test_set, args)
        rows.append(report)
        recons.append((f"{entry.model}: {entry.name}", recon))
        print(f"[{time.time() - t0:6.1f}s] {entry.model:6s} {entry.name:22s} PSNR {report['psnr']:6.2f}  "
              f"SSIM {report['ssim']:.3f}  util {report['utilization']:6.1%}  step {report['step_ms']:.0f} ms",
              flush=True)
        # rows so far, so that a long run that is cut short still leaves its measurements
        (out / f"{stem}.partial.json").write_text(json.dumps({"settings": vars(args), "results": rows},
                                                             indent=2, default=str))
    notes = check_targets(rows)
    (out / f"{stem}.json").write_text(json.dumps({"settings": vars(args), "results": rows, "targets": notes},
                                                 indent=2, default=str))
    (out / f"{stem}.md").write_text(markdown(rows, args) + "\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    originals = stack_batch(test_set, range(args.grid_images))[0]
    labelled_grid(originals, recons, out / f"{stem}.png")
    (out / f"{stem}.partial.json").unlink()
    print(markdown(rows, args))
    print("\n".join(notes))
    print(f"wrote {out / (stem + '.json')}, .md, .png")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
