"""GPU timing of nearest_codeword against the usual GPU ways of doing it (run by scripts/gpu_check.sh).

For each of issue 2's six (N, D, K) cases, on one CUDA device, float32, k = 1, l2:
  - quantkit exact (fp32 scores) and fast (bf16 scores + fp32 re-rank of the best few) modes;
  - torch matmul + argmin, chunked 8,192 rows (the usual hand-written GPU path);
  - torch.cdist(z, C).argmin(1) when its (N, K) distance matrix fits;
  - vector-quantize-pytorch's VectorQuantize forward in eval mode, when it is importable.
Reported: median milliseconds (CUDA events, after a warm-up call), GFLOP/s = 2 N K D / time, peak memory allocated
above the inputs, and the fraction of rows that agree with a float64 argmin (computed on the GPU, chunked).
Writes $OUT/timing.json (or ./timing.json) and prints one JSON line per (case, method).
"""
from __future__ import annotations

import json
import os

import torch

from quantkit import ops

CASES = [(16384, 8, 16384), (16384, 32, 16384), (16384, 256, 16384), (65536, 8, 65536), (16384, 8, 100000),
         (4096, 768, 100000)]


def median_ms(fn, reps: int = 7) -> float:
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def peak_extra_mib(fn) -> float:
    """Peak bytes allocated by one call above what was allocated before it (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def argmin_chunked(z: torch.Tensor, c: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    half_sq = 0.5 * c.square().sum(1)  # (K,): score = z.c - |c|^2 / 2, larger is nearer
    return torch.cat([torch.addmm(half_sq, z[s:s + chunk], c.T, beta=-1).argmax(1) for s in range(0, z.shape[0], chunk)])


def methods(z: torch.Tensor, c: torch.Tensor) -> dict:
    def quantkit(mode: str):
        def run():
            if mode == "fast":
                os.environ["QUANTKIT_CUDA_NEAREST"] = "fast"
            try:
                return ops.nearest_codeword(z, c).indices
            finally:
                os.environ.pop("QUANTKIT_CUDA_NEAREST", None)
        return run

    out = {"quantkit_exact": quantkit("exact"), "quantkit_fast": quantkit("fast"),
           "torch_matmul_argmin": lambda: argmin_chunked(z, c)}
    if z.shape[0] * c.shape[0] * 4 <= 8 * 2 ** 30:
        out["torch_cdist_argmin"] = lambda: torch.cdist(z, c).argmin(1)
    try:
        from vector_quantize_pytorch import VectorQuantize

        vq = VectorQuantize(dim=c.shape[1], codebook_size=c.shape[0]).cuda().eval()
        vq._codebook.embed.data.copy_(c[None])
        vq._codebook.initted.fill_(True)

        @torch.no_grad()
        def vqp():
            return vq(z[None])[1][0]
        out["vector_quantize_pytorch"] = vqp
    except Exception as error:  # noqa: BLE001 - the peer is optional here
        print(f"vector-quantize-pytorch not run: {type(error).__name__}: {error}", flush=True)
    return out


def main() -> None:
    rows = []
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    for n, d, k in CASES:
        gen = torch.Generator(device="cuda").manual_seed(1000 * d + 7)
        z = torch.randn(n, d, device="cuda", generator=gen)
        c = torch.randn(k, d, device="cuda", generator=gen)
        reference = argmin_chunked(z.double(), c.double())
        for name, fn in methods(z, c).items():
            row = {"N": n, "D": d, "K": k, "method": name}
            try:
                indices = fn()
                row["agreement_fp64"] = float((indices == reference).double().mean())
                row["peak_extra_mib"] = round(peak_extra_mib(fn), 2)
                row["ms"] = median_ms(fn)
                row["gflops"] = round(2 * n * k * d / row["ms"] / 1e6, 1)
            except Exception as error:  # noqa: BLE001 - a failure is a row
                row["status"] = f"{type(error).__name__}: {str(error)[:200]}"
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
        by = {r["method"]: r for r in rows if (r["N"], r["D"], r["K"]) == (n, d, k) and "ms" in r}
        if "quantkit_exact" in by and "torch_matmul_argmin" in by:
            print(f"({n}, {d}, {k}): exact {by['quantkit_exact']['ms']:.3f} ms, fast "
                  f"{by.get('quantkit_fast', {}).get('ms', float('nan')):.3f} ms, matmul+argmin "
                  f"{by['torch_matmul_argmin']['ms']:.3f} ms -> exact is "
                  f"{by['torch_matmul_argmin']['ms'] / by['quantkit_exact']['ms']:.2f}x the torch speed", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "timing.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
