"""`quantkit demo` (what `make demo` runs): the whole pipeline on the built-in `digits`, on a CPU, in minutes.

1. trains the judge: a small digit classifier on the real digits train split (its test accuracy is reported);
2. the discrete track: trains two tokenizers on digits, an 8x8 FSQ grid (for MaskGIT) and a VAR multi-scale
   residual VQ (1-2-4-8), tokenizes the dataset once and trains MaskGIT and VAR on the token IDs;
3. the continuous track: trains a KL-VAE (8x8x4 latents, no quantizer) and MAR with a flow-matching head on its
   latents (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization");
4. samples the test split's labels and scores conditional accuracy, Frechet distance against the real test digits
   (with tokenizer reconstructions as the floor), images per second and network evaluations per image, the same
   way for both tracks;
5. writes ``report.md`` with ``samples.png`` (discrete and continuous samples, one row each, under real digits),
   ``losses.png`` and ``codebook_usage.png`` beside it, and prints its path.

Every stage resumes from its run folder, so a second call only evaluates. ``--quick`` shrinks every budget (the
tests use it); the numbers it produces check the plumbing, not the quality.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: Tokenizer recipes for 16x16 digits: an 8x8 FSQ grid (MaskGIT, PixelCNN), VAR scales 1-2-4-8, a 4x4x3 residual.
TOKENIZER_RECIPES = {
    "grid": dict(model="vqvae", model_config={"num_downsamples": 1, "embed_dim": 3, "hidden": 48}, quantizer="fsq",
                 quantizer_kwargs={"levels": [4, 4, 4]}),
    "ms": dict(model="vqvae", model_config={"num_downsamples": 1, "embed_dim": 8, "hidden": 48},
               quantizer="multiscale_residual", quantizer_kwargs={"codebook_size": 64, "patch_nums": [1, 2, 4, 8]}),
    "rq": dict(model="vqvae", model_config={"num_downsamples": 2, "embed_dim": 3, "hidden": 48}, quantizer="residual",
               quantizer_kwargs={"quantizer": "fsq", "levels": [4, 4, 4], "depth": 3}),
    # the continuous tokenizer: a KL-VAE with 8x8x4 latents (MAR, DiT)
    "kl": dict(model="klvae", model_config={"ch": 32, "ch_mult": [1, 2], "z_channels": 32, "embed_dim": 4,
                                            "kl_weight": 1e-6}),
}
#: Which tokenizer recipe each generator consumes.
TOKENIZER_OF = {"maskgit": "grid", "pixelcnn": "grid", "var": "ms", "rq_transformer": "rq", "mar_ddpm": "kl",
                "mar_flow": "kl", "dit_meanflow": "kl"}


@dataclass(frozen=True)
class Budget:
    tokenizer_steps: int
    generator_steps: int
    classifier_epochs: int
    continuous_tokenizer_steps: int = 300  # the KL-VAE
    continuous_generator_steps: int = 500  # MAR (a step costs ~2.5 MaskGIT steps: the per-token head)
    eval_draws: int = 4  # sample sets per generator (and train subsets per floor) that FD and accuracy average


#: The full budget fits 15 minutes on a 2-core CPU with room to spare (4 min 41 s with set-up and build on a
#: 2-core EPYC for the discrete track; the continuous track, KL-VAE 300 steps + MAR 500 steps + its evaluation,
#: 3.3 min with 1 thread on a 2-core EPYC Zen 4 shared with other jobs, 2026-12-08: MAR 76% accuracy, FD 21x floor).
#: 1,000 generator steps rather than 500: VAR's conditional accuracy 96.5% instead of 84%, FD / floor 2.3 vs 5.7.
BUDGETS = {"full": Budget(tokenizer_steps=600, generator_steps=1000, classifier_epochs=10),
           "quick": Budget(tokenizer_steps=10, generator_steps=10, classifier_epochs=1, continuous_tokenizer_steps=10,
                           continuous_generator_steps=10, eval_draws=1)}
#: The demo's generators per track (``TOKENIZER_OF`` names the tokenizer recipe of each).
DISCRETE, CONTINUOUS = ("maskgit", "var"), ("mar_flow",)


def log(msg: str) -> None:
    print(f"[quantkit demo] {msg}", file=sys.stderr, flush=True)


def ensure_tokenizer(kind: str, out: Path, steps: int, progress: bool = True) -> Path:
    """Trains (or resumes) the ``kind`` tokenizer recipe on digits in ``out/tokenizer_<kind>``."""
    from .tokenizers.train import TrainConfig, train_tokenizer

    path = out / f"tokenizer_{kind}"
    latest = path / "latest.json"
    if latest.is_file() and json.loads(latest.read_text())["step"] >= steps:
        return path
    log(f"training the '{kind}' tokenizer for {steps} steps")
    train_tokenizer(TrainConfig(**TOKENIZER_RECIPES[kind], data="digits", steps=steps, batch_size=64, lr=2e-3,
                                out_dir=str(path), checkpoint_every=steps, progress=progress, eval_images=0),
                    resume=latest.is_file())
    return path


def ensure_generator(name: str, tokenizer: Path, out: Path, steps: int, progress: bool = True) -> Path:
    """Trains (or resumes) generator ``name`` from its digits recipe on ``tokenizer``'s token IDs."""
    from .generators.train import digits_recipe, train_generator

    path = out / name
    latest = path / "latest.json"
    if latest.is_file() and json.loads(latest.read_text())["step"] >= steps:
        return path
    log(f"training {name} for {steps} steps")
    result = train_generator(digits_recipe(name, str(tokenizer), str(path), steps, progress=progress),
                             resume=latest.is_file())
    log(f"{name}: {result.num_parameters:,} parameters, final loss {result.metrics['loss']:.3f}, "
        f"{result.seconds:.0f} s")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(curves: dict[str, list[tuple[int, float]]], ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is_continuous(kind: str) -> bool:
    from .tokenizers import tokenizer_class

    return tokenizer_class(TOKENIZER_RECIPES[kind]["model"]).continuous


def run_pipeline(out: Path, budget: Budget, generators=DISCRETE + CONTINUOUS, progress: bool = True) -> Path:
    """Runs the whole pipeline into ``out``; returns the report's path. Generators on a continuous tokenizer (the
    KL-VAE) form the continuous track, with the continuous budget; its wall time is reported on its own."""
    from .evaluation.classifier import ClassifierConfig, load_or_train_classifier
    from .evaluation.generation import evaluate_generator, reference_sets, sample_images
    from .generators.sampling import SamplingConfig
    from .generators.train import load_generator
    from .tokenizers import load_tokenizer
    from .tokenizers.evaluate import save_image_grid

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    classifier, classifier_accuracy = load_or_train_classifier(out / "classifier",
                                                               ClassifierConfig(epochs=budget.classifier_epochs))
    log(f"digit classifier: test accuracy {classifier_accuracy:.1%}")

    kinds = sorted({TOKENIZER_OF[g] for g in generators})
    seconds = {"discrete": 0.0, "continuous": 0.0}  # wall time of each track's own stages
    tokenizer_paths, tokenizers, refs = {}, {}, {}
    for k in kinds:
        t0, track = time.perf_counter(), "continuous" if _is_continuous(k) else "discrete"
        steps = budget.continuous_tokenizer_steps if track == "continuous" else budget.tokenizer_steps
        tokenizer_paths[k] = ensure_tokenizer(k, out, steps, progress)
        tokenizers[k] = load_tokenizer(tokenizer_paths[k])
        refs[k] = reference_sets(tokenizers[k], classifier, draws=budget.eval_draws)
        seconds[track] += time.perf_counter() - t0

    rows, samples, losses = [], {}, {}
    for name in generators:
        kind = TOKENIZER_OF[name]
        t0, track = time.perf_counter(), "continuous" if _is_continuous(kind) else "discrete"
        steps = budget.continuous_generator_steps if track == "continuous" else budget.generator_steps
        path = ensure_generator(name, tokenizer_paths[kind], out, steps, progress)
        model, meta = load_generator(path)
        sampling = dict(meta["train_config"]["sampling"])
        steps = sampling.pop("steps", None)
        report = evaluate_generator(model, tokenizers[kind], classifier, refs[kind], steps, SamplingConfig(**sampling),
                                    draws=budget.eval_draws)
        report.update(generator=name, track=track, tokenizer=kind, train_steps=meta["step"])
        rows.append(report)
        labels = torch.arange(10).repeat(2)
        samples[name] = sample_images(model, tokenizers[kind], labels, steps, SamplingConfig(**sampling), seed=1)[0]
        losses[name] = [(m["step"], m["loss"]) for m in read_jsonl(path / "metrics.jsonl")]
        seconds[track] += time.perf_counter() - t0

    first = refs[kinds[0]]
    real = torch.cat([first.test_images[first.test_labels == c][:2] for c in range(10)])
    real = real.reshape(10, 2, *real.shape[1:]).transpose(0, 1).reshape(20, *real.shape[1:])
    save_image_grid([real, *samples.values()], out / "samples.png")
    plot_curves(losses, "generator training loss", out / "losses.png")
    usage = {f"tokenizer {k}": [(m["step"], m["usage"]) for m in read_jsonl(p / "metrics.jsonl") if "usage" in m]
             for k, p in tokenizer_paths.items() if not _is_continuous(k)}  # a KL-VAE has no codebook
    plot_curves(usage, "codebook usage (fraction of codes in a batch)", out / "codebook_usage.png")

    report_path = out / "report.md"
    report_path.write_text(_report(rows, refs, tokenizer_paths, classifier_accuracy, budget, generators,
                                   time.perf_counter() - started, seconds))
    (out / "report.json").write_text(json.dumps({"classifier_test_accuracy": classifier_accuracy,
                                                 "budget": budget.__dict__, "generators": rows,
                                                 "track_seconds": seconds}, indent=2))
    return report_path


def _report(rows, refs, tokenizer_paths, classifier_accuracy, budget, generators, seconds, track_seconds) -> str:
    lines = ["# quantkit demo report", "",
             f"Built-in `digits` (16x16), CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"budget: discrete track tokenizers {budget.tokenizer_steps} steps, generators {budget.generator_steps} "
             f"steps; continuous track KL-VAE {budget.continuous_tokenizer_steps} steps, MAR "
             f"{budget.continuous_generator_steps} steps; wall time {seconds / 60:.1f} min (discrete track "
             f"{track_seconds['discrete'] / 60:.1f} min, continuous track {track_seconds['continuous'] / 60:.1f} min, "
             f"the rest the judge and the pictures).", "",
             f"Judge: a digit classifier trained by quantkit on the digits train split, test accuracy "
             f"{classifier_accuracy:.1%}.", "",
             f"| track | generator | tokenizer | params | cond. accuracy | Frechet distance (mean ± sd of "
             f"{budget.eval_draws} sample sets) | floor (mean of {budget.eval_draws} train subsets) | FD / floor | images/s | "
             "net evals / image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r, name in zip(rows, generators):
        lines.append(f"| {r['track']} | {name} | {TOKENIZER_OF[name]} | {r['parameters']:,} | "
                     f"{r['conditional_accuracy']:.1%} | "
                     f"{r['frechet_distance']:.3f} ± {r['frechet_distance_std']:.3f} | {r['floor_frechet_distance']:.3f} | "
                     f"{r['fd_over_floor']:.2f} | "
                     f"{r['images_per_second']:.1f} | {r['evaluations_per_image']} |")
    lines += ["", "| tokenizer | run | reconstruction floor FD | classifier accuracy on reconstructions |",
              "|---|---|---|---|"]
    for k, r in refs.items():
        lines.append(f"| {k} | `{tokenizer_paths[k]}` | {r.floor_fd:.3f} | {r.recon_accuracy:.1%} |")
    lines += ["", "![samples](samples.png)", "",
              "Rows: real test digits, then " + ", ".join(f"{g} ({r['track']})" for g, r in zip(generators, rows)) +
              "; columns: classes 0-9, twice.", "",
              "![losses](losses.png) ![codebook usage](codebook_usage.png)", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder (stages resume from it)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, not the quality")
    parser.add_argument("--tokenizer-steps", type=int, help="override the tokenizer training steps (both tracks)")
    parser.add_argument("--generator-steps", type=int, help="override the generator training steps (both tracks)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    budget = BUDGETS["quick" if args.quick else "full"]
    for name in ("tokenizer_steps", "generator_steps"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise SystemExit(f"quantkit demo: --{name.replace('_', '-')} must be at least 1, got {value}")
            budget = Budget(**{**budget.__dict__, name: value, f"continuous_{name}": value})
    report = run_pipeline(Path(args.out), budget, progress=not args.no_progress)
    print(report)
