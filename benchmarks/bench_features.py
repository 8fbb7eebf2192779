"""Pretrained-feature machinery on built-in data: the MAE's linear probe, SoftVQ-VAE with / without alignment,
VQGAN-LC codebooks from MAE features vs a plain VQ of the same size, RQ-Transformer with / without soft labels and
stochastic codes.

    python benchmarks/bench_features.py --threads 1 --out runs/bench_features                 # every section
    python benchmarks/bench_features.py --only rq --rq-steps 1000 --out runs/bench_features   # one section

Sections (each caches its runs in --out, writes out/<section>.json, and the report is rebuilt from every section
JSON present, so sections can run one at a time):
  mae       MAE on digits; linear-probe test accuracy of its patch features (mean / flat) vs raw pixels and vs the
            same encoder untrained.
  softvq    SoftVQ-VAE on digits, align_weight 0.1 (features of the digits MAE) vs 0: PSNR, codebook use on the
            test split (no generator row: the registered generators all model token grids, not 1D sequences).
  vqgan_lc  VQGAN on 16 px `patches`: vqgan_lc with a frozen k-means codebook of MAE patch features vs plain vq,
            K = 16,384 and 100,000: PSNR and utilization on 4,096 held-out crops (262,144 tokens).
  rq        RQ-Transformer on the digits RQ tokenizer: one-hot vs soft labels vs stochastic codes vs both.
Writes benchmarks/results/<stem>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("mae", "softvq", "vqgan_lc", "rq")
MAE_SMALL = dict(width=64, depth=4, heads=4, decoder_width=32, decoder_depth=1, decoder_heads=2)


def log(msg: str) -> None:
    print(f"[bench_features] {msg}", file=sys.stderr, flush=True)


def trained_mae(out: Path, data: str, steps: int, image_size: int | None = None) -> Path:
    from quantkit.features import MAETrainConfig, train_mae

    r = train_mae(MAETrainConfig(data=data, image_size=image_size, steps=steps, progress=False,
                                 out_dir=str(out / f"mae_{data}")))
    log(f"MAE on {data}: {'cached' if r.cached else f'{r.seconds:.0f} s'}, final loss {r.losses[-1][1]:.4f}")
    return r.out_dir


# ----------------------------------------------------------------------------------------------------------------


def section_mae(args, out: Path) -> dict:
    from quantkit.features import MAE, FeatureEncoder, load_feature_encoder, probe_report

    path = trained_mae(out, "digits", args.mae_steps)
    t0 = time.perf_counter()
    trained = probe_report(load_feature_encoder(path))
    torch.manual_seed(0)
    untrained = probe_report(FeatureEncoder(MAE().feature_module(), (1, 16, 16), name="untrained MAE"))
    meta = json.loads((path / "config.json").read_text())
    return {"mae_steps": args.mae_steps, "final_loss": meta["losses"][-1][1], "probe_seconds": time.perf_counter() - t0,
            "rows": [
                {"representation": "raw pixels", **trained["raw_pixels"]},
                {"representation": "MAE features, mean over patches", **trained["features_mean"]},
                {"representation": "MAE features, all patches", **trained["features_flat"]},
                {"representation": "untrained MAE, mean over patches", **untrained["features_mean"]},
                {"representation": "untrained MAE, all patches", **untrained["features_flat"]},
            ]}


def _train_tok(out: Path, name: str, steps: int, **fields):
    from quantkit.tokenizers import load_tokenizer
    from quantkit.tokenizers.train import TrainConfig, train_tokenizer

    path = out / name
    if not (path / "latest.json").is_file():
        t0 = time.perf_counter()
        train_tokenizer(TrainConfig(steps=steps, out_dir=str(path), checkpoint_every=steps, progress=False,
                                    eval_images=0, **fields))
        log(f"{name}: trained {steps} steps in {time.perf_counter() - t0:.0f} s")
    return path, load_tokenizer(path)


def _judge(out: Path):
    from quantkit.evaluation.classifier import ClassifierConfig, load_or_train_classifier

    return load_or_train_classifier(out / "classifier", ClassifierConfig(epochs=15))[0]


def _generator_row(out: Path, name: str, generator: str, tok_path: Path, tokenizer, clf, steps: int,
                   guidance: float, **model_config) -> dict:
    from quantkit.evaluation.generation import evaluate_generator, reference_sets
    from quantkit.generators import SamplingConfig
    from quantkit.generators.train import DIGITS_RECIPES, digits_recipe, load_generator, train_generator

    path = out / name
    if not (path / "latest.json").is_file():
        recipe_mc = dict(DIGITS_RECIPES[generator]["model_config"])
        cfg = digits_recipe(generator, str(tok_path), str(path), steps, progress=False,
                            model_config={**recipe_mc, **model_config})
        r = train_generator(cfg)
        log(f"{name}: trained {steps} steps in {r.seconds:.0f} s, final loss {r.metrics['loss']:.3f}")
    model, meta = load_generator(path)
    s = dict(meta["train_config"]["sampling"])
    gen_steps = s.pop("steps", None)
    s["guidance"] = guidance
    refs = reference_sets(tokenizer, clf)
    row = evaluate_generator(model, tokenizer, clf, refs, steps=gen_steps, sampling=SamplingConfig(**s))
    return {"generator_steps": steps, **{k: row[k] for k in ("conditional_accuracy", "frechet_distance",
                                                                "frechet_distance_std", "floor_frechet_distance",
                                                                "fd_over_floor", "guidance")}}


def section_softvq(args, out: Path) -> dict:
    from quantkit.data import load_dataset
    from quantkit.tokenizers.evaluate import evaluate_tokenizer

    mae = trained_mae(out, "digits", args.mae_steps)
    test = load_dataset("digits", "test", 16)
    rows = []
    for weight in (0.1, 0.0):
        mc = dict(width=64, depth=2, heads=4, num_latent_tokens=8, token_size=16, patch_size=4,
                  align_weight=weight, feature_run=str(mae) if weight else None)
        tok_path, tok = _train_tok(out, f"softvq_vae_align{weight}", args.tokenizer_steps, model="softvq_vae",
                                   model_config=mc, quantizer="softvq",
                                   quantizer_kwargs={"codebook_size": 256, "dead_code": {"threshold": 1.0}},
                                   data="digits", batch_size=64, lr=2e-3, recon_loss="l2")
        report = evaluate_tokenizer(tok.eval(), test, measure_speed=False)
        metrics = [json.loads(x) for x in (tok_path / "metrics.jsonl").read_text().splitlines() if x.strip()]
        # no downstream generator row: every registered generator models a grid (MaskGIT / PixelCNN (h, w), RQ
        # (h, w, depth), VAR scales), none a 1D token sequence
        rows.append({"align_weight": weight, "tokenizer_steps": args.tokenizer_steps, "psnr": report["psnr"],
                     "utilization": report["utilization"], "perplexity": report["perplexity"],
                     "final_align_term": metrics[-1].get("align")})
    return {"rows": rows}


def section_vqgan_lc(args, out: Path) -> dict:
    from quantkit.data import PatchesDataset, load_dataset
    from quantkit.features import load_feature_encoder
    from quantkit.quantizers import VQGANLCQuantizer
    from quantkit.tokenizers.evaluate import evaluate_tokenizer

    mae = trained_mae(out, "patches", args.mae_steps, image_size=16)
    train = load_dataset("patches", "train", 16)
    test = PatchesDataset("test", 16, length=4096)
    vqgan = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=32, norm_groups=8, embed_dim=8)
    rows = []
    for K in args.codes:
        book = out / f"lc_codebook_{K}.safetensors"
        kmeans_s = None
        if not book.is_file():
            t0 = time.perf_counter()
            q = VQGANLCQuantizer.from_encoder(load_feature_encoder(mae), train, K, 8, features_per_code=2, seed=0,
                                              progress=True)
            q.save_codebook(book)
            kmeans_s = time.perf_counter() - t0
            log(f"codebook K={K}: {kmeans_s:.0f} s (features + k-means)")
        for quantizer, kwargs in (("vqgan_lc", {"codebook_size": K, "features_codebook": str(book)}),
                                  ("vq", {"codebook_size": K})):
            _, tok = _train_tok(out, f"vqgan_{quantizer}_{K}", args.vqgan_steps, model="vqgan", model_config=vqgan,
                                quantizer=quantizer, quantizer_kwargs=kwargs, data="patches", image_size=16,
                                batch_size=16, lr=2e-3)
            report = evaluate_tokenizer(tok.eval(), test, measure_speed=False)
            rows.append({"quantizer": quantizer, "codes": K, "steps": args.vqgan_steps, "psnr": report["psnr"],
                         "ssim": report["ssim"], "utilization": report["utilization"],
                         "codes_used": round(report["utilization"] * K), "perplexity": report["perplexity"],
                         "test_tokens": report["images"] * 64, "codebook_seconds": kmeans_s})
    return {"rows": rows}


def section_rq(args, out: Path) -> dict:
    from quantkit.demo import ensure_tokenizer
    from quantkit.tokenizers import load_tokenizer

    tok_path = ensure_tokenizer("rq", out, args.tokenizer_steps, progress=False)
    tok = load_tokenizer(tok_path)
    clf = _judge(out)
    rows = []
    for label, soft, code_t in (("one-hot", 0.0, 0.0), ("soft labels", args.soft_tau, 0.0),
                                ("stochastic codes", 0.0, args.code_temperature),
                                ("soft + stochastic", args.soft_tau, args.code_temperature)):
        name = f"rq_soft{soft}_code{code_t}"
        extra = dict(soft_label_temperature=soft, code_temperature=code_t,
                     codebook_source=str(tok_path) if soft or code_t else "")
        gen = _generator_row(out, name, "rq_transformer", tok_path, tok, clf, args.rq_steps, guidance=0.5, **extra)
        rows.append({"variant": label, "soft_label_temperature": soft, "code_temperature": code_t, **gen})
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------------------------


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def render(results: dict, header: str) -> str:
    md = [header, ""]
    if "mae" in results:
        r = results["mae"]
        md += [f"MAE on digits ({r['mae_steps']} steps, final masked-patch loss {r['final_loss']:.3f}): linear probe "
               f"(logistic regression, C by 3-fold CV on train), digits test accuracy.", "",
               "| representation | dims | test accuracy | C |", "|---|---:|---:|---:|"]
        md += [f"| {x['representation']} | {x['dims']} | {_pct(x['accuracy'])} | {x['C']:g} |" for x in r["rows"]]
        md.append("")
    if "softvq" in results:
        md += ["SoftVQ-VAE on digits (8 tokens, 256 codes), test split:", "",
               "| align weight | tokenizer steps | PSNR dB | utilization (test) | perplexity | final align term |",
               "|---:|---:|---:|---:|---:|---:|"]
        for x in results["softvq"]["rows"]:
            a = "-" if x["final_align_term"] is None else f"{x['final_align_term']:.4f}"
            md.append(f"| {x['align_weight']} | {x['tokenizer_steps']} | {x['psnr']:.2f} | {_pct(x['utilization'])} | "
                      f"{x['perplexity']:.0f} | {a} |")
        md.append("")
    if "vqgan_lc" in results:
        md += ["VQGAN on 16 px patches (8x8 tokens, latent dim 8), evaluated on 4,096 held-out crops:", "",
               "| quantizer | codes | steps | PSNR dB | SSIM | utilization | codes used | perplexity |",
               "|---|---:|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {x['quantizer']} | {x['codes']:,} | {x['steps']} | {x['psnr']:.2f} | {x['ssim']:.3f} | "
               f"{_pct(x['utilization'])} | {x['codes_used']:,} | {x['perplexity']:.0f} |"
               for x in results["vqgan_lc"]["rows"]]
        md.append("")
    if "rq" in results:
        md += ["RQ-Transformer on the digits RQ tokenizer (4x4x3 FSQ codes), guidance 0.5, 4 draws:", "",
               "| variant | soft-label tau | code temperature | steps | cond. accuracy | FD (± sd) | FD / floor |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {x['variant']} | {x['soft_label_temperature']} | {x['code_temperature']} | {x['generator_steps']} | "
               f"{_pct(x['conditional_accuracy'])} | {x['frechet_distance']:.3f} ± {x['frechet_distance_std']:.3f} | "
               f"{x['fd_over_floor']:.2f} |" for x in results["rq"]["rows"]]
        md.append("")
    return "\n".join(md)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in SECTIONS if k in results]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = results[key]["rows"]
        if key == "mae":
            labels, vals, title = [r["representation"].replace(", ", "\n") for r in rows], [r["accuracy"] for r in rows], "probe accuracy"
        elif key == "softvq":
            labels, vals, title = [f"align {r['align_weight']}" for r in rows], [r["psnr"] for r in rows], "SoftVQ-VAE PSNR dB"
        elif key == "vqgan_lc":
            labels, vals, title = [f"{r['quantizer']}\n{r['codes']}" for r in rows], [r["utilization"] for r in rows], "utilization"
        else:
            labels, vals, title = [r["variant"].replace(" + ", "\n+ ") for r in rows], [r["fd_over_floor"] for r in rows], "RQ FD / floor"
        ax.bar(range(len(vals)), vals)
        ax.set_xticks(range(len(vals)), labels, fontsize=6)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_features")
    p.add_argument("--only", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--mae-steps", type=int, default=2000)
    p.add_argument("--tokenizer-steps", type=int, default=600)
    p.add_argument("--vqgan-steps", type=int, default=300)
    p.add_argument("--codes", type=int, nargs="*", default=[16384, 100000])
    p.add_argument("--rq-steps", type=int, default=1500)
    p.add_argument("--soft-tau", type=float, default=0.1, help="FSQ codes sit 0.5 apart: 0.1 leaves ~2/3 on the target")
    p.add_argument("--code-temperature", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stem", default="features")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key in args.only:
        t0 = time.perf_counter()
        result = globals()[f"section_{key}"](args, out)
        result["seconds"] = time.perf_counter() - t0
        result["command"] = " ".join(["python", *sys.argv])
        (out / f"{key}.json").write_text(json.dumps(result, indent=2))
        log(f"section {key}: {result['seconds']:.0f} s")
    results = {k: json.loads((out / f"{k}.json").read_text()) for k in SECTIONS if (out / f"{k}.json").is_file()}
    header = (f"Pretrained-feature benchmarks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
              f"{torch.__version__}, {args.threads} thread(s)); section commands and wall times in the JSON.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.stem}.json").write_text(json.dumps(results, indent=2))
    (RESULTS / f"{args.stem}.md").write_text(render(results, header))
    plot(results, RESULTS / f"{args.stem}.png")
    print(render(results, header))


if __name__ == "__main__":
    main()
