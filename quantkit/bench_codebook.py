"""`quantkit bench`: your codebook on this machine: search speed against faiss and torch, utilisation, perplexity,
dead codes and a usage histogram.

    quantkit bench codebook.npy --latents z.npy --out bench_out     # or .pt / .safetensors, or a trained run

The codebook is a (K, D) tensor: a ``.npy``, a ``.pt`` holding a tensor (or a state dict with exactly one 2-D
tensor, or one named by ``--key``), a ``.safetensors`` file, or a quantkit tokenizer run / checkpoint (its
quantizer's codebook; for an implicit one such as FSQ or LFQ, every index decoded). Latents are (N, D) vectors (``.npy`` / ``.pt``); without them, Gaussian vectors with the
codebook's per-dimension mean and spread stand in (the report says so: usage then measures the codebook's
geometry, not your encoder). Search: ``quantkit.ops.nearest_codeword`` (l2), faiss ``IndexFlatL2`` and torch's
chunked matmul + argmin, median of ``--repeats`` calls after one warm-up; the three must agree on the indices
(reported as the fraction that do). Writes ``bench.json``, ``bench.md`` and ``usage.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor


def _only_matrix(state: dict, source: str, key: str | None) -> Tensor:
    if key is not None:
        if key not in state:
            raise ValueError(f"--key {key!r} is not in {source} (keys: {sorted(state)[:10]})")
        return state[key]
    matrices = {k: v for k, v in state.items() if isinstance(v, Tensor) and v.dim() == 2}
    if len(matrices) != 1:
        raise ValueError(f"{source} holds {len(matrices)} 2-D tensors ({sorted(matrices)[:10]}); name the codebook "
                         f"with --key")
    return next(iter(matrices.values()))


def load_matrix(path: str, what: str, key: str | None = None) -> Tensor:
    """A (rows, D) float32 matrix from .npy / .pt / .safetensors, or a tokenizer run's codebook."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if p.is_dir():
        from .tokenizers import load_tokenizer

        q = load_tokenizer(p).quantizer
        state = {k: v for k, v in q.state_dict().items() if tuple(v.shape) == (q.codebook_size, q.dim)}
        if not state and key is None and q.num_indices == 1:  # an implicit codebook (FSQ, LFQ): decode every index
            with torch.no_grad():
                state = {"decoded": q.eval().decode(torch.arange(q.codebook_size)).reshape(q.codebook_size, -1)}
        t = _only_matrix(state, f"the quantizer of {path!r}", key)
    elif p.suffix == ".npy":
        import numpy as np

        t = torch.from_numpy(np.load(p, allow_pickle=False))
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        t = _only_matrix(load_file(str(p)), repr(path), key)
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        t = obj if isinstance(obj, Tensor) else _only_matrix(obj, repr(path), key)
    if t.dim() != 2 or t.shape[0] == 0 or not t.is_floating_point():
        raise ValueError(f"{what} {path!r}: expected a non-empty floating (rows, D) matrix, got "
                         f"{t.dtype}{tuple(t.shape)}")
    t = t.float().contiguous()
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} {path!r} holds NaN or inf")
    return t


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_search(z: Tensor, codebook: Tensor, chunk: int = 4096) -> Tensor:
    c2 = codebook.pow(2).sum(1)
    return torch.cat([(c2 - 2 * zc @ codebook.T).argmin(1) for zc in z.split(chunk)])


def bench(codebook: Tensor, latents: Tensor, repeats: int = 3) -> dict:
    from .ops import nearest_codeword

    k, d = codebook.shape
    idx = nearest_codeword(latents, codebook, metric="l2")[0]
    rows = [{"method": "quantkit nearest_codeword", "seconds": _median_seconds(
        lambda: nearest_codeword(latents, codebook, metric="l2"), repeats), "agreement": 1.0}]
    rows.append({"method": "torch chunked matmul + argmin",
                 "seconds": _median_seconds(lambda: _torch_search(latents, codebook), repeats),
                 "agreement": float((_torch_search(latents, codebook) == idx).double().mean())})
    try:
        import faiss

        index = faiss.IndexFlatL2(d)
        index.add(codebook.numpy())
        zn = latents.numpy()
        rows.append({"method": "faiss IndexFlatL2", "seconds": _median_seconds(lambda: index.search(zn, 1), repeats),
                     "agreement": float((torch.from_numpy(index.search(zn, 1)[1][:, 0]) == idx).double().mean())})
    except ImportError:
        rows.append({"method": "faiss IndexFlatL2", "seconds": None, "agreement": None, "note": "faiss not installed"})
    counts = torch.bincount(idx, minlength=k)
    probs = counts.double() / counts.sum()
    perplexity = float(torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum()))
    return {"codebook": [k, d], "latents": int(latents.shape[0]), "threads": torch.get_num_threads(),
            "search": rows, "utilization": float((counts > 0).double().mean()), "perplexity": perplexity,
            "dead_codes": int((counts == 0).sum()), "counts": counts.tolist()}


def _plot_usage(counts: list[int], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = sorted(counts, reverse=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(ranked)), ranked, width=1.0)
    ax.set_xlabel("code (ranked by use)")
    ax.set_ylabel("vectors assigned")
    ax.set_title(f"{sum(c > 0 for c in counts)} of {len(counts)} codes used")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _markdown(report: dict) -> str:
    k, d = report["codebook"]
    lines = [f"Codebook K = {k}, D = {d}; {report['latents']} latents ({report['latent_source']}); "
             f"{report['threads']} threads.", "", "| method | median time | agreement with quantkit |", "|---|---|---|"]
    for r in report["search"]:
        t = "-" if r["seconds"] is None else f"{r['seconds'] * 1e3:.2f} ms"
        a = "-" if r["agreement"] is None else f"{r['agreement']:.5f}"
        lines.append(f"| {r['method']} | {t} | {a} |")
    lines += ["", f"Utilization {report['utilization']:.1%}, perplexity {report['perplexity']:.1f}, "
                  f"dead codes {report['dead_codes']}.", ""]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import nonnegative_int, positive_int

    parser.add_argument("codebook", help="(K, D) codebook: .npy, .pt, .safetensors, or a quantkit tokenizer run")
    parser.add_argument("--latents", help="(N, D) vectors to assign (.npy or .pt); default: Gaussian stand-ins")
    parser.add_argument("--key", help="which tensor of a state dict is the codebook")
    parser.add_argument("--num-latents", type=positive_int, default=16384, help="stand-in latents when none given")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--seed", type=nonnegative_int, default=1)
    parser.add_argument("--out", default="bench_codebook", help="folder for bench.json, bench.md, usage.png")


def run(args: argparse.Namespace) -> None:
    from .cli import argument

    with argument("codebook"):
        codebook = load_matrix(args.codebook, "codebook", args.key)
    if args.latents:
        with argument("--latents"):
            latents = load_matrix(args.latents, "latents")
            if latents.shape[1] != codebook.shape[1]:
                raise ValueError(f"latents have D = {latents.shape[1]}, the codebook D = {codebook.shape[1]}")
        source = args.latents
    else:
        g = torch.Generator().manual_seed(args.seed)
        std = codebook.std(0) if codebook.shape[0] > 1 else torch.ones(codebook.shape[1])
        latents = codebook.mean(0) + std * torch.randn(args.num_latents, codebook.shape[1], generator=g)
        source = "Gaussian stand-ins with the codebook's mean and spread"
    report = bench(codebook, latents, args.repeats)
    report["latent_source"] = source
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot_usage(report["counts"], out / "usage.png")
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(_markdown(report))
    print(_markdown(report))
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'usage.png'}")
