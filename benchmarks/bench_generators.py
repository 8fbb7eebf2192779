"""Generators on ``digits``: MaskGIT, VAR, RQ-Transformer and the PixelCNN prior, each on a quantkit tokenizer.

For each generator: conditional accuracy (a quantkit digit classifier agrees with the requested class), Frechet
distance of classifier features vs the real test digits and the reconstruction floor (both averaged over 4 draws:
one FD at this set size varies by up to 40% between draws), images per second, network
evaluations per image; and the sampling speed of MaskGIT (8 steps) and VAR against a raster PixelCNN prior with the
*same parameter count* and the same guidance (timed interleaved, median of repeats, untrained weights suffice).

    python benchmarks/bench_generators.py --threads 1 --out runs/bench_generators        # full (2-core CPU, ~35 min)
    python benchmarks/bench_generators.py --quick --out /tmp/bench_gen                   # smoke run

Every generator is scored at several guidance scales (all rows are reported); the summary picks, per generator,
the row with the lowest FD / floor among those with at least 90% conditional accuracy, and re-scores it on 12
fresh sample sets (the minimum over guidance scales is biased low on the draws it was picked on). Writes results.json
(machines), results.md (README table) and samples.png / losses.png (people).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from quantkit.evaluation.classifier import ClassifierConfig, load_or_train_classifier
from quantkit.evaluation.generation import best_rows, evaluate_generator, reference_sets, sample_images
from quantkit.generators import SamplingConfig, create_generator, make_generator
from quantkit.demo import TOKENIZER_OF, TOKENIZER_RECIPES, ensure_generator, ensure_tokenizer, plot_curves
from quantkit.generators.train import load_generator



#: Training steps per generator when --steps is not given. MaskGIT learns slowest on digits (FD / floor 2.6 at
#: 2,500 steps, 2.1 at 5,000, 1.8 at 8,000); VAR with dropout 0.1 keeps improving to 5,000 (1.8).
DEFAULT_STEPS = {"maskgit": 8000, "var": 5000, "rq_transformer": 2500, "pixelcnn": 2500}


def log(msg: str) -> None:
    print(f"[bench_generators] {msg}", file=sys.stderr, flush=True)


def matched_pixelcnn(model, vocab_size: int, token_shape, layers: int = 6):
    """A PixelCNN prior whose parameter count is the closest to ``model``'s (channels searched)."""
    target = model.num_parameters()
    best = min(range(8, 400, 4), key=lambda c: abs(create_generator(
        "pixelcnn", vocab_size=vocab_size, token_shape=token_shape, channels=c, layers=layers).num_parameters()
        - target))
    return create_generator("pixelcnn", vocab_size=vocab_size, token_shape=token_shape, channels=best,
                            layers=layers).eval()


def time_sampling(models: dict, sampling: dict, batch: int, repeats: int) -> dict[str, float]:
    """images/second of each model, timed interleaved (contention hits all alike), median over repeats."""
    labels = torch.arange(batch) % 10
    times = {k: [] for k in models}
    for _ in range(repeats):
        for k, (model, steps) in models.items():
            t0 = time.perf_counter()
            model.generate(labels, steps=steps, sampling=sampling[k], generator=make_generator(0))
            times[k].append(time.perf_counter() - t0)
    return {k: batch / statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/generators")
    parser.add_argument("--quick", action="store_true", help="tiny step counts: checks the pipeline, not quality")
    parser.add_argument("--steps", type=int, help="generator training steps for all (default: DEFAULT_STEPS, "
                        "MaskGIT 8000, VAR 5000, the others 2500; quick 20)")
    parser.add_argument("--steps-of", nargs="*", default=[], metavar="NAME=STEPS",
                        help="per-generator training steps overriding --steps, e.g. maskgit=5000")
    parser.add_argument("--tokenizer-steps", type=int, help="tokenizer training steps (default 600, quick 20)")
    parser.add_argument("--only", nargs="*", default=["maskgit", "var", "rq_transformer", "pixelcnn"])
    for kind in TOKENIZER_RECIPES:
        parser.add_argument(f"--tokenizer-{kind}", help=f"use this trained '{kind}' tokenizer run")
    parser.add_argument("--guidance", type=float, nargs="*", default=[0.0, 0.5, 1.0],
                        help="evaluate every generator at these guidance scales")
    parser.add_argument("--speed-batches", type=int, nargs="*", help="batch sizes of the speed comparison: MaskGIT at "
                        "each, VAR (far from its target) at the first (default 50 200; quick 20)")
    parser.add_argument("--confirm-draws", type=int, default=12, help="re-score each generator's best row on this "
                        "many fresh sample sets (seeds 100, 101, ...), independent of the draws it was picked on")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (1 is faster on an oversubscribed CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    speed_batches = args.speed_batches or ([20] if args.quick else [50, 200])
    steps_of = {n: args.steps or (20 if args.quick else DEFAULT_STEPS.get(n, 2500)) for n in args.only}
    for item in args.steps_of:
        n, _, v = item.partition("=")
        if n not in steps_of or not v.isdigit() or int(v) < 1:
            parser.error(f"--steps-of wants NAME=STEPS with NAME one of {args.only} and STEPS >= 1, got {item!r}")
        steps_of[n] = int(v)
    tok_steps = args.tokenizer_steps or (20 if args.quick else 600)

    from quantkit.tokenizers import load_tokenizer

    clf, clf_acc = load_or_train_classifier(out / "classifier", ClassifierConfig(epochs=2 if args.quick else 15))
    log(f"digit classifier test accuracy {clf_acc:.2%}")
    kinds = sorted({TOKENIZER_OF[n] for n in args.only})
    tok_paths = {k: getattr(args, f"tokenizer_{k}") or ensure_tokenizer(k, out, tok_steps, progress=False)
                 for k in kinds}
    tokenizers = {k: load_tokenizer(p) for k, p in tok_paths.items()}
    refs = {k: reference_sets(tokenizers[k], clf) for k in kinds}
    for k, r in refs.items():
        log(f"tokenizer {k}: floor FD {r.floor_fd:.3f} (recon of test {r.recon_test_fd:.3f}, real train "
            f"{r.real_train_fd:.3f}), classifier accuracy on reconstructions {r.recon_accuracy:.2%}")

    rows, samples, losses, models = [], {}, {}, {}
    for name in args.only:
        kind = TOKENIZER_OF[name]
        path = ensure_generator(name, tok_paths[kind], out, steps_of[name], progress=False)
        model, meta = load_generator(path)
        s = dict(meta["train_config"]["sampling"])
        gen_steps = s.pop("steps", None)
        models[name] = (model, s, gen_steps)
        for guidance in args.guidance:
            report = evaluate_generator(model, tokenizers[kind], clf, refs[kind], gen_steps,
                                        SamplingConfig(**{**s, "guidance": guidance}))
            report.update(tokenizer=kind, train_steps=meta["step"])
            rows.append(report)
            log(json.dumps(report))
        labels = torch.arange(10).repeat(2)
        samples[name] = sample_images(model, tokenizers[kind], labels, gen_steps, SamplingConfig(**s), seed=1)[0]
        losses[name] = [(m["step"], m["loss"]) for m in
                        map(json.loads, (path / "metrics.jsonl").read_text().splitlines())]

    # the best rows, re-scored on fresh seeds: picking the minimum over guidance scales biases its own draws low
    best = best_rows(rows)
    confirmed = {}
    for name, row in best.items() if args.confirm_draws > 0 else ():
        model, s, gen_steps = models[name]
        kind = TOKENIZER_OF[name]
        report = evaluate_generator(model, tokenizers[kind], clf, refs[kind], gen_steps,
                                    SamplingConfig(**{**s, "guidance": row["guidance"]}), seed=100,
                                    draws=1 if args.quick else args.confirm_draws)
        confirmed[name] = report
        log(f"confirm {name}: {json.dumps(report)}")

    # speed at equal parameter count, same guidance, interleaved timing
    speed = {}
    for name in [n for n in ("maskgit", "var") if n in args.only]:
        model, meta = load_generator(out / name)
        s = dict(meta["train_config"]["sampling"])
        gen_steps = s.pop("steps", None)
        tok = tokenizers[TOKENIZER_OF["pixelcnn"]]
        prior = matched_pixelcnn(model, tok.vocab_size, tok.token_shape)
        for guidance, batch in [(g, b) for g in sorted({s.get("guidance", 0.0), 0.0, 0.5})
                              for b in (speed_batches if name == "maskgit" else speed_batches[:1])]:
            cfg = SamplingConfig(**{**s, "guidance": guidance})
            ips = time_sampling({name: (model, gen_steps), "pixelcnn": (prior, None)}, {name: cfg, "pixelcnn": cfg},
                                batch=batch, repeats=2 if args.quick else 3)
            speed[f"{name}@guidance={guidance},batch={batch}"] = {
                "params": model.num_parameters(), "pixelcnn_params": prior.num_parameters(),
                "images_per_second": ips[name], "pixelcnn_images_per_second": ips["pixelcnn"],
                "speedup": ips[name] / ips["pixelcnn"],
                "evaluations_per_image": model.evaluations_per_image(gen_steps, guidance),
                "pixelcnn_evaluations_per_image": prior.evaluations_per_image(None, guidance)}
            log(f"speed {name} guidance {guidance} batch {batch}: "
                f"{speed[f'{name}@guidance={guidance},batch={batch}']}")

    result = {"classifier_test_accuracy": clf_acc, "generator_steps": steps_of, "tokenizer_steps": tok_steps,
              "torch_threads": torch.get_num_threads(), "quick": args.quick,
              "references": {k: {"floor_fd": r.floor_fd, "floor_fd_std": r.floor_fd_std, "recon_test_fd": r.recon_test_fd,
                                 "real_train_fd": r.real_train_fd, "recon_accuracy": r.recon_accuracy}
                             for k, r in refs.items()},
              "generators": rows, "best": best, "confirmed": confirmed, "speed_vs_pixelcnn": speed,
              "wall_seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    write_markdown(result, out / "results.md")
    write_pictures(samples, losses, refs, out)
    log(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'samples.png'}, {out / 'losses.png'}")


def write_markdown(result: dict, path: Path) -> None:
    lines = [f"Digit classifier (trained by quantkit on the digits train split): test accuracy "
             f"{result['classifier_test_accuracy']:.1%}.", "",
             "| generator | tokens | params | trained steps | sampling steps | guidance | cond. accuracy | FD (mean ± sd of "
             f"{result['generators'][0].get('draws', 1)} draws) | floor FD | FD / floor | "
             "images/s | net evals / image |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["generators"]:
        lines.append(f"| {r['generator']} | {r['tokenizer']} | {r['parameters']:,} | {r['train_steps']} | "
                     f"{r['steps'] or '-'} | "
                     f"{r['guidance']} | {r['conditional_accuracy']:.1%} | {r['frechet_distance']:.3f} ± "
                     f"{r.get('frechet_distance_std', 0.0):.3f} | "
                     f"{r['floor_frechet_distance']:.3f} | {r['fd_over_floor']:.2f} | {r['images_per_second']:.1f} | "
                     f"{r['evaluations_per_image']} |")
    lines += ["", "Best guidance per generator (lowest FD / floor with at least 90% conditional accuracy):", "",
              "| generator | guidance | cond. accuracy | FD / floor |", "|---|---|---|---|"]
    for name, r in result["best"].items():
        lines.append(f"| {name} | {r['guidance']} | {r['conditional_accuracy']:.1%} | {r['fd_over_floor']:.2f} |")
    if result.get("confirmed"):
        n = next(iter(result["confirmed"].values()))["draws"]
        lines += ["", f"The best rows re-scored on {n} fresh sample sets (seeds 100-{99 + n}, not used to pick them):", "",
                  "| generator | guidance | cond. accuracy | FD (mean ± sd) | FD / floor |", "|---|---|---|---|---|"]
        for name, r in result["confirmed"].items():
            lines.append(f"| {name} | {r['guidance']} | {r['conditional_accuracy']:.1%} | {r['frechet_distance']:.3f} ± "
                         f"{r['frechet_distance_std']:.3f} | {r['fd_over_floor']:.2f} |")
    lines += ["", "Sampling speed against a raster PixelCNN prior with the same parameter count and guidance "
              "(untrained prior, timed interleaved, median of 3 repeats):", "",
              "| model | params | PixelCNN params | images/s | PixelCNN images/s | speedup | net evals (model / PixelCNN) |",
              "|---|---|---|---|---|---|---|"]
    for k, v in result["speed_vs_pixelcnn"].items():
        lines.append(f"| {k} | {v['params']:,} | {v['pixelcnn_params']:,} | {v['images_per_second']:.1f} | "
                     f"{v['pixelcnn_images_per_second']:.1f} | {v['speedup']:.1f}x | {v['evaluations_per_image']} / "
                     f"{v['pixelcnn_evaluations_per_image']} |")
    lines += ["", "Reference Frechet distances (same set size and class mix as the test split; the floor and real-train "
              "columns average 4 class-matched train subsets):", "",
              "| tokenizer | floor: recon of train vs test | recon of test vs test | real train vs test | "
              "classifier acc. on recon |", "|---|---|---|---|---|"]
    for k, v in result["references"].items():
        lines.append(f"| {k} | {v['floor_fd']:.3f} ± {v.get('floor_fd_std', 0.0):.3f} | {v['recon_test_fd']:.3f} | "
                     f"{v['real_train_fd']:.3f} | {v['recon_accuracy']:.1%} |")
    lines += ["", f"Benchmark wall time: {result['wall_seconds'] / 60:.1f} min ({result['torch_threads']} torch "
              f"thread(s)); generator training steps: "
              f"{', '.join(f'{n} {v}' for n, v in result['generator_steps'].items())}."]
    path.write_text("\n".join(lines) + "\n")


def write_pictures(samples: dict, losses: dict, refs: dict, out: Path) -> None:
    from quantkit.tokenizers.evaluate import save_image_grid

    first = next(iter(refs.values()))
    real = torch.cat([first.test_images[first.test_labels == c][:2] for c in range(10)])
    real = real.reshape(10, 2, *real.shape[1:]).transpose(0, 1).reshape(20, *real.shape[1:])
    save_image_grid([real] + list(samples.values()), out / "samples.png")
    (out / "samples.txt").write_text("rows: real test digits, " + ", ".join(samples) + "; columns: classes 0-9 twice\n")
    plot_curves(losses, "training loss", out / "losses.png")


if __name__ == "__main__":
    main()
