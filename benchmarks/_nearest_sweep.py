"""The nearest-codeword sweep behind ``bench_nearest.py --sweep``: quantkit against faiss over a generated grid.

The one idea: no hand-picked case list decides the kernel's tuning. The grid is every combination of
D in {4, 6, 8, ..., 1024} (17 values), K in {256, 2048, 16384, 131072, 2^20} and N in {1, 16, 256, 4096, 65536},
less the points whose work (2 N K D flops) or codebook (K D floats) is over a cap (listed, never silently dropped).
Each instruction set the machine has runs in its own subprocess with quantkit (``QUANTKIT_CPU_ISA``), faiss
(``FAISS_SIMD_LEVEL``) and the BLAS behind faiss and torch held to that ISA, so the AVX2 column is what an AVX2-only
machine would see. In each point quantkit and faiss IndexFlatL2 are timed call by call in turn (a noisy machine slows
both alike) and the ratio is of their medians; quantkit's peak extra resident memory is read from VmHWM; a sample of
rows is checked against a float64 argmin for both. A float32 GEMM measured in the same subprocess gives "% of peak".

Three more sections: top-k (k = 4, 16) against IndexFlatL2 k-search and cosine against IndexFlatIP on normalised
vectors (on a sub-grid), soft_assign forward + backward against the fastest pure-torch formulation (chunked
softmax(-d / tau) @ C with autograd), and time against N at a fixed (D, K) with 1 and 2 threads (where threading
starts to pay). Writes results/nearest_sweep.{json,md,png} (+ nearest_sweep_rows.png).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

D_GRID = [4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
K_GRID = [256, 2048, 16384, 131072, 1 << 20]
N_GRID = [1, 16, 256, 4096, 65536]
TOPK_GRID = dict(D=[8, 32, 128, 512], K=[16384, 131072], N=[1, 256, 4096])
SOFT_GRID = dict(D=[8, 32, 128, 512], N=4096, K=4096)
ROWS_SCALING = dict(D=64, K=16384, N=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384, 65536])
#: Per ISA: quantkit's QUANTKIT_CPU_ISA, faiss's FAISS_SIMD_LEVEL, and the BLAS / ATen caps (for the GEMM anchor
#: and faiss's sgemm path), so every library in the subprocess runs at that ISA.
ISA_ENV = {
    "avx512": {"QUANTKIT_CPU_ISA": "avx512", "FAISS_SIMD_LEVEL": "AVX512"},
    "avx2": {"QUANTKIT_CPU_ISA": "avx2", "FAISS_SIMD_LEVEL": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPENBLAS_CORETYPE": "Haswell"},
}


def grid(max_gflop: float, max_codebook_gib: float) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
    """(points to run, points over a cap) as (N, D, K) triples, cheapest first within each D."""
    run, skipped = [], []
    for D, K, N in itertools.product(D_GRID, K_GRID, N_GRID):
        over = 2 * N * K * D > max_gflop * 1e9 or K * D * 4 > max_codebook_gib * 2 ** 30
        (skipped if over else run).append((N, D, K))
    return run, skipped


# ----------------------------------------------------------------------------------------------------------------
# worker side (one subprocess per ISA)


def _data(N: int, D: int, K: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=gen), torch.randn(K, D, generator=gen)


def _exact_fraction(z, codebook, indices, rows: int = 256) -> float:
    """Fraction of (up to ``rows``) sampled rows whose index is a float64 argmin (ties count as exact)."""
    import torch

    pick = torch.linspace(0, z.shape[0] - 1, min(rows, z.shape[0])).long()
    zs = z[pick].double()
    best = torch.full((len(pick),), float("inf"), dtype=torch.float64)
    for s in range(0, codebook.shape[0], 1 << 16):  # K in chunks: 256 x 2^20 doubles would be 2 GiB
        best = torch.minimum(best, torch.cdist(zs, codebook[s:s + (1 << 16)].double()).square().min(1).values)
    got = (zs - codebook[indices[pick].long()].double()).square().sum(1)
    return float((got <= best * (1 + 1e-9)).double().mean())


def _timed_pair(fq, ff, budget_s: float) -> tuple[list[float], list[float]]:
    """Interleaved times of quantkit and faiss, as many repeats as fit in budget_s (3 to 200)."""
    t0 = time.perf_counter()
    fq(), ff()
    first = time.perf_counter() - t0
    reps = int(min(200, max(3, budget_s / max(first, 1e-6))))
    times = C.interleaved_times({"q": fq, "f": ff}, min_reps=reps, max_reps=reps, budget_s=0)
    return times["q"], times["f"]


def _l2_point(N: int, D: int, K: int, budget_s: float) -> dict:
    import faiss
    import torch

    from quantkit import ops

    z, codebook = _data(N, D, K, seed=1000 * D + N + K)
    index = faiss.IndexFlatL2(D)
    index.add(codebook.numpy())
    zn = z.numpy()
    baseline = C.reset_peak_memory()
    got = ops.nearest_codeword(z, codebook).indices
    extra = C.peak_extra_bytes(baseline)
    faiss_idx = torch.from_numpy(index.search(zn, 1)[1][:, 0])
    tq, tf = _timed_pair(lambda: ops.nearest_codeword(z, codebook), lambda: index.search(zn, 1), budget_s)
    q, f = C.median(tq), C.median(tf)
    return {"case": [N, D, K], "quantkit_s": q, "faiss_s": f, "ratio": q / f, "gflops": 2 * N * K * D / q / 1e9,
            "faiss_gflops": 2 * N * K * D / f / 1e9, "extra_bytes": extra, "reps": len(tq),
            "exact_quantkit": _exact_fraction(z, codebook, got), "exact_faiss": _exact_fraction(z, codebook, faiss_idx)}


def _topk_point(N: int, D: int, K: int, k: int, metric: str, budget_s: float) -> dict:
    import faiss
    import torch

    from quantkit import ops

    z, codebook = _data(N, D, K, seed=7 * D + N + K + k)
    if metric == "cosine":  # faiss gets unit vectors for free (its best case); quantkit normalises inside the op
        index = faiss.IndexFlatIP(D)
        index.add(torch.nn.functional.normalize(codebook, dim=1).numpy())
        zn = torch.nn.functional.normalize(z, dim=1).numpy()
    else:
        index = faiss.IndexFlatL2(D)
        index.add(codebook.numpy())
        zn = z.numpy()
    baseline = C.reset_peak_memory()
    ops.nearest_codeword(z, codebook, metric=metric, k=k)
    extra = C.peak_extra_bytes(baseline)
    tq, tf = _timed_pair(lambda: ops.nearest_codeword(z, codebook, metric=metric, k=k),
                         lambda: index.search(zn, k), budget_s)
    q, f = C.median(tq), C.median(tf)
    return {"case": [N, D, K], "k": k, "metric": metric, "quantkit_s": q, "faiss_s": f, "ratio": q / f,
            "extra_bytes": extra}


def _soft_point(N: int, D: int, K: int, budget_s: float) -> dict:
    """soft_assign forward + backward against chunked softmax(-|z - c|^2 / tau) @ C with autograd (the fastest
    pure-torch formulation that stays within the memory bound: 4096-row chunks, logits as one addmm)."""
    import torch

    from quantkit import ops

    z0, c0 = _data(N, D, K, seed=3 * D + 1)
    tau = 0.5
    chunk = max(1, (16 << 20) // (4 * K))  # rows per 16 MiB chunk of logits

    def fused():
        z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
        ops.soft_assign(z, c, tau).sum().backward()

    def torch_chunked():
        z, c = z0.clone().requires_grad_(), c0.clone().requires_grad_()
        half_sq = 0.5 * c.square().sum(1)
        total = 0
        for s in range(0, N, chunk):
            # (2 z.c - |c|^2) / tau = -(|z - c|^2 - |z|^2) / tau, as one addmm
            logits = torch.addmm(-half_sq, z[s:s + chunk], c.T, alpha=2 / tau, beta=2 / tau)
            total = total + (torch.softmax(logits, dim=1) @ c).sum()
        total.backward()

    baseline = C.reset_peak_memory()
    fused()
    extra = C.peak_extra_bytes(baseline)
    tq, tt = _timed_pair(fused, torch_chunked, budget_s)
    return {"case": [N, D, K], "quantkit_s": C.median(tq), "torch_s": C.median(tt),
            "speedup": C.median(tt) / C.median(tq), "extra_bytes": extra}


def _rows_scaling(budget_s: float) -> list[dict]:
    import faiss
    import torch

    from quantkit import ops

    D, K = ROWS_SCALING["D"], ROWS_SCALING["K"]
    out = []
    for N in ROWS_SCALING["N"]:
        z, codebook = _data(N, D, K, seed=N)
        index = faiss.IndexFlatL2(D)
        index.add(codebook.numpy())
        zn = z.numpy()
        row = {"N": N}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            tq, tf = _timed_pair(lambda: ops.nearest_codeword(z, codebook), lambda: index.search(zn, 1), budget_s)
            row[f"quantkit_{threads}t_s"], row[f"faiss_{threads}t_s"] = C.median(tq), C.median(tf)
        out.append(row)
    return out


def worker(spec: dict) -> dict:
    import faiss
    import torch

    from quantkit import _ext

    threads = spec["threads"]
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    result = {"isa": spec["isa"], "quantkit_isa": _ext.cpu_isa(), "faiss_simd": str(faiss.SIMDConfig.get_level()),
              "gemm_gflops": C.gemm_gflops(2048), "l2": [], "topk": [], "soft": []}
    start = time.perf_counter()
    for i, (N, D, K) in enumerate(spec["points"]):
        row = _l2_point(N, D, K, spec["budget_s"])
        result["l2"].append(row)
        print(f"[{spec['isa']}] {i + 1}/{len(spec['points'])} N={N} D={D} K={K}: ratio {row['ratio']:.2f} "
              f"({row['gflops']:.1f} GFLOP/s, {C.fmt_bytes(row['extra_bytes'])}) "
              f"[{time.perf_counter() - start:.0f} s]", file=sys.stderr, flush=True)
    if spec["extras"]:
        for D, K, N in itertools.product(TOPK_GRID["D"], TOPK_GRID["K"], TOPK_GRID["N"]):
            for k, metric in ((4, "l2"), (16, "l2"), (1, "cosine")):
                result["topk"].append(_topk_point(N, D, K, k, metric, spec["budget_s"]))
        for D in SOFT_GRID["D"]:
            result["soft"].append(_soft_point(SOFT_GRID["N"], D, SOFT_GRID["K"], 2 * spec["budget_s"]))
        result["rows_scaling"] = _rows_scaling(spec["budget_s"])
        torch.set_num_threads(threads)
    return result


# ----------------------------------------------------------------------------------------------------------------
# orchestration


def available_isas() -> list[str]:
    """The ISAs this CPU runs, best first (what quantkit's dispatcher would pick, and below it)."""
    with open("/proc/cpuinfo") as fh:
        flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    isas = []
    if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= set(flags):
        isas.append("avx512")
    if {"avx2", "fma"} <= set(flags):
        isas.append("avx2")
    return isas


def _run_isa(isa: str, spec: dict, timeout_s: float) -> dict:
    env = {**os.environ, **ISA_ENV[isa], "OMP_NUM_THREADS": str(spec["threads"])}
    script = Path(__file__).resolve().parent / "bench_nearest.py"
    proc = subprocess.run([sys.executable, str(script), "--sweep-worker", json.dumps({**spec, "isa": isa})],
                          env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(C.TAG):
            return json.loads(line[len(C.TAG):])
    return {"isa": isa, "error": f"worker exited with {proc.returncode}"}


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(res: dict) -> dict:
    rows = res["l2"]
    ratios = [r["ratio"] for r in rows]
    worst = max(rows, key=lambda r: r["ratio"])
    wide = [100 * r["gflops"] / res["gemm_gflops"] for r in rows if r["case"][1] >= 64 and r["case"][0] >= 256]
    return {"points": len(rows), "geomean_ratio": _geomean(ratios), "worst_ratio": worst["ratio"],
            "worst_case": worst["case"], "at_most_1": sum(x <= 1.0 for x in ratios),
            "median_pct_gemm_d64": sorted(wide)[len(wide) // 2] if wide else None,
            "min_pct_gemm_d64": min(wide) if wide else None,
            "max_extra_bytes": max(r["extra_bytes"] for r in rows),
            "min_exact_quantkit": min(r["exact_quantkit"] for r in rows),
            "min_exact_faiss": min(r["exact_faiss"] for r in rows),
            "topk_worst": max((r["ratio"] for r in res["topk"]), default=None),
            "topk_geomean": _geomean([r["ratio"] for r in res["topk"]]) if res["topk"] else None,
            "soft_min_speedup": min((r["speedup"] for r in res["soft"]), default=None)}


def markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [f"Nearest-codeword sweep, l2, float32, {payload['threads']} threads, on {m['cpu']} ({m['date']}).",
             f"Reproduce: `{payload['command']}`", "",
             f"Grid: D in {D_GRID}, K in {K_GRID}, N in {N_GRID}; {len(payload['skipped'])} points over the caps "
             f"(2NKD > {payload['max_gflop']} GFLOP or a codebook over {payload['max_codebook_gib']} GiB) not run.",
             "", "| ISA (quantkit / faiss) | points | geomean ratio | worst ratio (N, D, K) | points <= 1.0 | "
             "% of GEMM at D >= 64, N >= 256 (median / min) | peak extra memory | rows exact (quantkit / faiss) | "
             "top-k & cosine ratio (geomean / worst) | soft_assign fwd+bwd speedup vs torch (min) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for isa, res in payload["isas"].items():
        if "error" in res:
            lines.append(f"| {isa} | {res['error']} |" + " |" * 8)
            continue
        s = res["summary"]
        pct = "-" if s["median_pct_gemm_d64"] is None else \
            f"{s['median_pct_gemm_d64']:.0f}% / {s['min_pct_gemm_d64']:.0f}% of {res['gemm_gflops']:.0f} GFLOP/s"
        topk = "-" if s["topk_worst"] is None else f"{s['topk_geomean']:.2f} / {s['topk_worst']:.2f}"
        soft = "-" if s["soft_min_speedup"] is None else f"{s['soft_min_speedup']:.1f}x"
        lines.append(f"| {isa} ({res['quantkit_isa']} / {res['faiss_simd']}) | {s['points']} | "
                     f"{s['geomean_ratio']:.2f} | {s['worst_ratio']:.2f} {tuple(s['worst_case'])} | "
                     f"{s['at_most_1']} / {s['points']} | {pct} | {C.fmt_bytes(s['max_extra_bytes'])} | "
                     f"{s['min_exact_quantkit']:.3f} / {s['min_exact_faiss']:.3f} (min) | {topk} | {soft} |")
    for isa, res in payload["isas"].items():
        over = [r for r in res.get("l2", []) if r["ratio"] > 1.0]
        if over:
            lines += ["", f"{isa}: points above 1.0 (quantkit slower than faiss):", "",
                      "| N | D | K | ratio | quantkit | faiss |", "|---|---|---|---|---|---|"]
            lines += [f"| {r['case'][0]} | {r['case'][1]} | {r['case'][2]} | {r['ratio']:.2f} | "
                      f"{C.fmt_time(r['quantkit_s'])} | {C.fmt_time(r['faiss_s'])} |"
                      for r in sorted(over, key=lambda r: -r["ratio"])]
    return "\n".join(lines)


def plot(payload: dict, path: Path, rows_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    isas = [i for i, r in payload["isas"].items() if "l2" in r]
    cols = [(N, K) for N in N_GRID for K in K_GRID]
    fig, axes = plt.subplots(1, max(1, len(isas)), figsize=(9 * max(1, len(isas)), 7), squeeze=False)
    for ax, isa in zip(axes[0], isas):
        grid_ = np.full((len(D_GRID), len(cols)), np.nan)
        for r in payload["isas"][isa]["l2"]:
            N, D, K = r["case"]
            grid_[D_GRID.index(D), cols.index((N, K))] = r["ratio"]
        im = ax.imshow(np.log2(grid_), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
        for (i, j), v in np.ndenumerate(grid_):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5)
        ax.set_yticks(range(len(D_GRID)), [str(d) for d in D_GRID])
        ax.set_xticks(range(len(cols)), [f"N={n}\nK={k}" for n, k in cols], fontsize=5, rotation=90)
        ax.set_ylabel("D")
        s = payload["isas"][isa]["summary"]
        ax.set_title(f"{isa}: quantkit / faiss time (blue: quantkit faster); geomean {s['geomean_ratio']:.2f}, "
                     f"worst {s['worst_ratio']:.2f}", fontsize=9)
        fig.colorbar(im, ax=ax, label="log2(time ratio)")
    fig.suptitle(f"nearest codeword sweep on {payload['machine']['cpu']}, {payload['threads']} threads "
                 "(blank: over the work / memory cap)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for isa in isas:
        rows = payload["isas"][isa].get("rows_scaling")
        if not rows:
            continue
        ns = [r["N"] for r in rows]
        for key, style in (("quantkit_1t_s", "-"), ("quantkit_2t_s", "-"), ("faiss_1t_s", ":"), ("faiss_2t_s", ":")):
            ax.plot(ns, [r[key] for r in rows], style, marker="o", ms=3, label=f"{isa} {key[:-2]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("N (rows per call)")
    ax.set_ylabel("seconds per call")
    ax.set_title(f"time vs rows at D={ROWS_SCALING['D']}, K={ROWS_SCALING['K']} (1 and 2 threads)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(rows_path, dpi=110)
    plt.close(fig)


def main(args) -> None:
    points, skipped = grid(args.max_gflop, args.max_codebook_gib)
    isas = args.isas or available_isas()
    spec = {"threads": args.threads, "points": points, "budget_s": args.budget_s, "extras": not args.no_extras}
    command = "python benchmarks/bench_nearest.py --sweep" + (f" --isas {' '.join(args.isas)}" if args.isas else "")
    payload = {"machine": C.machine_info(), "threads": args.threads, "command": command, "max_gflop": args.max_gflop,
               "max_codebook_gib": args.max_codebook_gib, "skipped": skipped, "isas": {}}
    for isa in isas:
        res = _run_isa(isa, spec, timeout_s=args.timeout_s)
        if "l2" in res:
            res["summary"] = summarize(res)
        payload["isas"][isa] = res
    stem = args.stem or "nearest_sweep"
    text = markdown(payload)
    _, md_path = C.write_results(stem, payload, text)
    plot(payload, C.RESULTS_DIR / f"{stem}.png", C.RESULTS_DIR / f"{stem}_rows.png")
    print("\n" + text + f"\n\nwrote {md_path} (+ .json, .png, _rows.png)")
