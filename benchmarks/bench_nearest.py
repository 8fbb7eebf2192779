"""Nearest-codeword (k = 1, l2) benchmark: quantkit's fused kernel against the usual ways of doing it.

Methods, each in its own subprocess with an address-space cap (a method that runs out of memory is reported as
such, not a crash): faiss IndexFlatL2 (the anchor), torch.cdist(z, C).argmin(1), a chunked torch matmul + argmin
(4096 rows at a time), vector-quantize-pytorch's VectorQuantize forward in eval mode, and
quantkit.ops.nearest_codeword. quantkit is timed interleaved with faiss in the same process (call by call), so its
time ratio to faiss holds on a noisy machine. On a CUDA machine, torch matmul + argmin on the GPU is added as the
GPU anchor and quantkit runs there too.

Reported per method and case: median wall time, time ratio to faiss, GFLOP/s = 2 N K D / time, percent of a float32
GEMM measured in the same run, peak extra memory (VmHWM above the resident size before the first call) and the
fraction of rows whose index equals a float64 argmin. Writes results/nearest_cpu.{json,md,png}.

    python benchmarks/bench_nearest.py            # the six cases of issue 2 (about 15 minutes on 2 cores)
    python benchmarks/bench_nearest.py --quick    # small cases, about a minute
    python benchmarks/bench_nearest.py --cases 16384,8,16384 65536,8,65536
    python benchmarks/bench_nearest.py --sweep    # every D x K x N of a generated grid, per ISA (_nearest_sweep.py)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import _nearest_sweep  # noqa: E402

CASES = [(16384, 8, 16384), (16384, 32, 16384), (16384, 256, 16384), (65536, 8, 65536), (16384, 8, 100000),
         (4096, 768, 100000)]
QUICK_CASES = [(4096, 8, 4096), (2048, 64, 4096), (1024, 256, 4096)]
METHODS = {
    "faiss": "faiss IndexFlatL2 k=1",
    "quantkit": "quantkit nearest_codeword",
    "cdist": "torch.cdist(z, C).argmin(1)",
    "chunked": "torch chunked matmul + argmin (4096 rows)",
    "vqp": "vector-quantize-pytorch VectorQuantize (eval)",
}
CUDA_METHODS = {"cuda_mm": "torch matmul + argmin (CUDA anchor)", "quantkit_cuda": "quantkit nearest_codeword (CUDA)"}
CHUNK_ROWS = 4096


# ----------------------------------------------------------------------------------------------------------------
# worker side


def _make_data(N: int, D: int, K: int):
    import torch

    gen = torch.Generator().manual_seed(1000 * D + 7)
    return torch.randn(N, D, generator=gen), torch.randn(K, D, generator=gen)  # (N, D), (K, D) float32


def _build(method: str, z, codebook):
    """Returns fn() -> (N,) indices for one method; setup (index building, module creation) happens here."""
    import torch

    if method == "faiss":
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(z.shape[1])
        index.add(codebook.numpy())
        zn = z.numpy()
        return lambda: torch.from_numpy(index.search(zn, 1)[1][:, 0])
    if method == "quantkit":
        from quantkit import ops

        return lambda: ops.nearest_codeword(z, codebook).indices
    if method == "cdist":
        return lambda: torch.cdist(z, codebook).argmin(1)
    if method == "chunked":
        half_sq = 0.5 * codebook.square().sum(1)  # (K,)

        def chunked():
            out = torch.empty(z.shape[0], dtype=torch.int64)
            for s in range(0, z.shape[0], CHUNK_ROWS):  # score = z.c - |c|^2/2, larger is nearer
                out[s:s + CHUNK_ROWS] = torch.addmm(half_sq, z[s:s + CHUNK_ROWS], codebook.T, beta=-1).argmax(1)
            return out
        return chunked
    if method == "vqp":
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=z.shape[1], codebook_size=codebook.shape[0]).eval()
        vq._codebook.embed.data.copy_(codebook[None])
        vq._codebook.initted.fill_(True)

        def vqp():
            with torch.no_grad():
                return vq(z[None])[1][0]
        return vqp
    if method in ("cuda_mm", "quantkit_cuda"):
        zc, cc = z.cuda(), codebook.cuda()
        if method == "quantkit_cuda":
            from quantkit import ops

            return lambda: ops.nearest_codeword(zc, cc).indices.cpu()
        half_sq = 0.5 * cc.square().sum(1)
        return lambda: torch.addmm(half_sq, zc, cc.T, beta=-1).argmax(1).cpu()
    raise ValueError(method)


def _reference(spec: dict) -> dict:
    """float64 argmin, chunked, saved for the agreement column."""
    import numpy as np
    import torch

    z, codebook = (t.double() for t in _make_data(*spec["case"]))
    half_sq = 0.5 * codebook.square().sum(1)
    out = torch.empty(z.shape[0], dtype=torch.int64)
    step = max(1, (1 << 24) // codebook.shape[0])
    for s in range(0, z.shape[0], step):
        out[s:s + step] = torch.addmm(half_sq, z[s:s + step], codebook.T, beta=-1).argmax(1)
    np.save(spec["ref_path"], out.numpy())
    return {"status": "ok"}


def worker(spec: dict) -> dict:
    C.pin_threads(spec["threads"])
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["method"] == "gemm":
        return {"status": "ok", "gflops": C.gemm_gflops(spec["gemm_n"], device=spec.get("device", "cpu"))}
    if spec["method"] == "ref":
        return _reference(spec)
    import numpy as np

    z, codebook = _make_data(*spec["case"])
    cap = C.cap_address_space(spec["cap_gib"])
    result: dict = {"cap_gib": round(cap, 2)}
    try:
        fn = _build(spec["method"], z, codebook)
        sync = torch.cuda.synchronize if spec["method"].endswith("cuda") or spec["method"] == "cuda_mm" else None
        baseline = C.reset_peak_memory()
        indices = fn()  # warm-up call, also the peak-memory measurement
        result["peak_extra_bytes"] = C.peak_extra_bytes(baseline)
        if spec["method"] == "quantkit":  # interleaved with faiss in this process
            faiss_fn = _build("faiss", z, codebook)
            times = C.interleaved_times({"quantkit": fn, "faiss": faiss_fn}, min_reps=spec["min_reps"],
                                        max_reps=spec["max_reps"], budget_s=2 * spec["budget_s"])
            result["times"], result["faiss_times_same_process"] = times["quantkit"], times["faiss"]
        else:
            result["times"] = C.time_calls(fn, spec["min_reps"], spec["max_reps"], spec["budget_s"], sync)
        ref = torch.from_numpy(np.load(spec["ref_path"]))
        result["agreement"] = float((indices.cpu() == ref).double().mean())
        result["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - every failure becomes a row of the table
        result["peak_extra_bytes_at_fail"] = C.peak_extra_bytes(baseline) if "baseline" in dir() else None
        if C.is_out_of_memory(error):
            result["status"] = f"out of memory (cap {cap:.1f} GiB)"
        else:
            result["status"] = f"failed: {type(error).__name__}: {str(error)[:160]}"
    return result


# ----------------------------------------------------------------------------------------------------------------
# orchestration


def _summarize(case, method, res, gemm, faiss_median):
    N, D, K = case
    row = {"case": list(case), "method": method, "label": {**METHODS, **CUDA_METHODS}[method], **res}
    if res.get("status") == "ok":
        t = C.median(res["times"])
        row["median_s"] = t
        row["gflops"] = 2 * N * K * D / t / 1e9
        row["pct_gemm"] = 100 * row["gflops"] / gemm if gemm else None
        if "faiss_times_same_process" in res:  # same process, interleaved
            row["ratio_to_faiss"] = t / C.median(res["faiss_times_same_process"])
        elif faiss_median:
            row["ratio_to_faiss"] = t / faiss_median
    return row


def _ratio_cell(row: dict) -> str:
    """The ratio, and for quantkit the median of the faiss calls interleaved with it (what the ratio divides by)."""
    if not row.get("ratio_to_faiss"):
        return "-"
    same_process = row.get("faiss_times_same_process")
    if same_process:
        return f"{row['ratio_to_faiss']:.2f} (faiss {C.fmt_time(C.median(same_process))} interleaved)"
    return f"{row['ratio_to_faiss']:.2f}"


def _table(rows: list[dict]) -> str:
    header = ["case (N, D, K)", "method", "median time", "ratio to faiss", "GFLOP/s", "% of GEMM", "peak extra mem",
              "agreement vs fp64", "status"]
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        mem = r.get("peak_extra_bytes") if ok else r.get("peak_extra_bytes_at_fail")
        body.append([
            "(%d, %d, %d)" % tuple(r["case"]), r["label"], C.fmt_time(r.get("median_s")),
            _ratio_cell(r),
            f"{r['gflops']:.1f}" if ok else "-", f"{r['pct_gemm']:.0f}%" if r.get("pct_gemm") else "-",
            C.fmt_bytes(mem) if mem is not None else "-",
            f"{r['agreement']:.5f}" if "agreement" in r else "-", r.get("status", "-"),
        ])
    return C.markdown_table(header, body)


def _plot(rows: list[dict], path: Path, gemm: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({tuple(r["case"]) for r in rows}, key=lambda c: [tuple(r["case"]) for r in rows].index(c))
    methods = [m for m in {**METHODS, **CUDA_METHODS} if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        by_case = {tuple(r["case"]): r for r in rows if r["method"] == method}
        xs = [c + (i - len(methods) / 2 + 0.5) * width for c in range(len(cases))]
        gf = [by_case.get(c, {}).get("gflops", 0) or 0 for c in cases]
        mem = [(by_case.get(c, {}).get("peak_extra_bytes") or 0) / 2 ** 20 + 0.01 for c in cases]
        label = {**METHODS, **CUDA_METHODS}[method]
        axes[0].bar(xs, gf, width, label=label)
        axes[1].bar(xs, mem, width, label=label)
        for x, c in zip(xs, cases):
            if by_case.get(c, {}).get("status", "ok") != "ok":
                axes[0].text(x, 1, "OOM" if "memory" in by_case[c]["status"] else "fail", rotation=90, fontsize=7,
                             ha="center", va="bottom")
    names = ["N=%d\nD=%d\nK=%d" % c for c in cases]
    for ax in axes:
        ax.set_xticks(range(len(cases)), names, fontsize=8)
    if gemm:
        axes[0].axhline(gemm, color="k", ls="--", lw=1, label=f"fp32 GEMM ({gemm:.0f} GFLOP/s)")
    axes[0].set_ylabel("GFLOP/s (2NKD / time), higher is better")
    axes[1].set_ylabel("peak extra memory (MiB, log), lower is better")
    axes[1].set_yscale("log")
    axes[1].axhline(64, color="r", ls=":", lw=1, label="64 MiB target")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle("nearest codeword, k = 1, l2, float32 (2 threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small cases (what `make demo` runs)")
    parser.add_argument("--cases", nargs="+", help="N,D,K triples, e.g. 16384,8,16384")
    parser.add_argument("--methods", nargs="+", choices=sorted({**METHODS, **CUDA_METHODS}))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gib", type=float, default=12.0, help="address-space cap per method (GiB)")
    parser.add_argument("--stem", default=None, help="output name under benchmarks/results/")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    sweep = parser.add_argument_group("sweep (quantkit vs faiss over a generated grid, per ISA; see _nearest_sweep.py)")
    sweep.add_argument("--sweep", action="store_true", help="run the grid sweep instead of the case list")
    sweep.add_argument("--isas", nargs="+", choices=["avx512", "avx2"], help="default: every ISA this CPU has")
    sweep.add_argument("--max-gflop", type=float, default=40.0, help="skip points with 2NKD above this")
    sweep.add_argument("--max-codebook-gib", type=float, default=1.0, help="skip codebooks larger than this")
    sweep.add_argument("--budget-s", type=float, default=0.3, help="timing budget per point and method")
    sweep.add_argument("--no-extras", action="store_true", help="only the k = 1 l2 grid")
    sweep.add_argument("--timeout-s", type=float, default=3600)
    sweep.add_argument("--sweep-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        C.emit(worker(json.loads(args.worker)))
        return
    if args.sweep_worker:
        C.emit(_nearest_sweep.worker(json.loads(args.sweep_worker)))
        return
    if args.sweep:
        _nearest_sweep.main(args)
        return

    import torch

    cases = [tuple(int(x) for x in c.split(",")) for c in args.cases] if args.cases else \
        (QUICK_CASES if args.quick else CASES)
    methods = args.methods or list(METHODS) + (list(CUDA_METHODS) if torch.cuda.is_available() else [])
    stem = args.stem or ("nearest_cpu_quick" if args.quick else "nearest_cpu")
    cap = min(args.cap_gib, max(1.0, C.available_gib() - 2.0))
    timing = dict(min_reps=3, max_reps=5, budget_s=0.5) if args.quick else dict(min_reps=3, max_reps=7, budget_s=2.0)
    script = os.path.abspath(__file__)
    base = {"threads": args.threads, "cap_gib": cap, **timing}

    gemm = C.run_worker(script, {**base, "method": "gemm", "gemm_n": 2048 if args.quick else 4096}, 600)
    gemm_gflops = gemm.get("gflops")
    print(f"fp32 GEMM: {gemm_gflops or float('nan'):.1f} GFLOP/s ({args.threads} threads)", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            ref_path = str(Path(tmp) / ("ref_%d_%d_%d.npy" % case))
            ref = C.run_worker(script, {**base, "method": "ref", "case": case, "ref_path": ref_path}, 1200)
            if ref.get("status") != "ok":
                print(f"{case}: float64 reference failed: {ref.get('status')}", flush=True)
                continue
            faiss_median = None
            for method in methods:
                res = C.run_worker(script, {**base, "method": method, "case": case, "ref_path": ref_path}, 900)
                row = _summarize(case, method, res, gemm_gflops, faiss_median)
                if method == "faiss" and row.get("median_s"):
                    faiss_median = row["median_s"]
                rows.append(row)
                print(_table([row]).splitlines()[-1], flush=True)
    payload = {"machine": C.machine_info(), "threads": args.threads, "gemm_gflops": gemm_gflops,
               "command": "python benchmarks/bench_nearest.py" + (" --quick" if args.quick else ""), "rows": rows}
    table = _table(rows)
    markdown = (f"Nearest codeword, k = 1, l2, float32, {args.threads} threads, on {payload['machine']['cpu']} "
                f"({payload['machine']['date']}); fp32 GEMM measured in the same run: "
                f"{gemm_gflops or float('nan'):.1f} GFLOP/s.\nReproduce: `{payload['command']}`\n\n{table}")
    _, md_path = C.write_results(stem, payload, markdown)
    _plot(rows, C.RESULTS_DIR / f"{stem}.png", gemm_gflops)
    print("\n" + markdown + f"\n\nwrote {md_path} (+ .json, .png)")


if __name__ == "__main__":
    main()
