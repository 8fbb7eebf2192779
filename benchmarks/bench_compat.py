"""vector-quantize-pytorch's classes vs quantkit's drop-in adapters on the very same call: time and peak memory.

    python benchmarks/bench_compat.py --quick     # small shapes (a few minutes on 2 busy cores)
    python benchmarks/bench_compat.py --threads 1 # the full shapes (about 25 min on one busy core)
    python benchmarks/bench_compat.py --device cuda
    python benchmarks/bench_compat.py --only "ResidualVQ beam 4" "ResidualVQ QINCo" --stem compat_residual_options

Each (case, implementation, mode) runs in a fresh subprocess: build the module with the same keywords (the adapter
holding the peer's weights), one warm-up call, then ``--repeats`` timed calls (median reported). Peak memory is the
growth of peak allocated memory over the call: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the growth of the
process's peak resident set (``ru_maxrss``) during the first call, which counts what the call allocated at once.
"train" is a training-mode forward plus backward of (quantized.square().mean() + loss.sum()); "eval" a forward in
eval() under no_grad.

Writes benchmarks/results/compat{_quick}{_cuda}.json (machines), .md (the README table) and .png (bars per case).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (class, constructor keywords, input shape); quick shapes in QUICK.
CASES = {
    "VectorQuantize K=8192": ("VectorQuantize", dict(dim=256, codebook_size=8192), (4, 1024, 256)),
    "ResidualVQ 8x1024": ("ResidualVQ", dict(dim=256, num_quantizers=8, codebook_size=1024), (4, 1024, 256)),
    "FSQ [8,5,5,5]": ("FSQ", dict(levels=[8, 5, 5, 5], dim=256), (4, 1024, 256)),
    "LFQ 2^16": ("LFQ", dict(codebook_size=65536, dim=16), (4, 1024, 16)),
    # 16,384 tokens: beam search over residual paths (quantkit: the fused top-k search) and QINCo's per-token
    # codebooks (the peer builds N x K x dim; quantkit searches in chunks and recomputes only the chosen codes).
    "ResidualVQ beam 4": ("ResidualVQ", dict(dim=32, num_quantizers=4, codebook_size=256, beam_size=4),
                          (16, 1024, 32)),
    "ResidualVQ QINCo": ("ResidualVQ", dict(dim=16, num_quantizers=4, codebook_size=64, implicit_neural_codebook=True),
                         (16, 1024, 16)),
}
QUICK = {
    "VectorQuantize K=8192": (1, 512, 256),
    "ResidualVQ 8x1024": (1, 512, 256),
    "FSQ [8,5,5,5]": (1, 512, 256),
    "LFQ 2^16": (1, 512, 16),
    "ResidualVQ beam 4": (1, 512, 32),
    "ResidualVQ QINCo": (1, 512, 16),
}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_one(case: str, impl: str, mode: str, shape: tuple[int, ...], repeats: int, device: str) -> dict:
    """Measures one (case, implementation, mode) in this process."""
    import vector_quantize_pytorch as peer

    import quantkit.compat.vector_quantize_pytorch as compat

    torch.manual_seed(0)
    cls, kwargs, _ = CASES[case]
    module = getattr(peer, cls)(**kwargs)
    if impl == "quantkit":
        module = getattr(compat, cls)(**kwargs).load_peer_state_dict(module.state_dict())
    module = module.to(device).train(mode == "train")
    x = torch.randn(*shape, device=device)

    def call():
        if mode == "eval":
            with torch.no_grad():
                return module(x)
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        quantized, loss = out[0], (out[2] if len(out) > 2 else torch.zeros((), device=device))
        (quantized.square().mean() + loss.sum()).backward()
        return out

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        call()  # warm-up (kernels, allocator), then measure peak growth of one call
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        before = _peak_rss_bytes()
        call()  # the first call's peak RSS growth is its peak allocation (large blocks come from mmap)
        peak = _peak_rss_bytes() - before
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - t)
    return {"case": case, "impl": impl, "mode": mode, "shape": list(shape), "time_ms": 1e3 * statistics.median(times),
            "peak_mib": peak / 2 ** 20, "device": device, "threads": torch.get_num_threads()}


def _subprocess(case, impl, mode, shape, repeats, device, threads) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps([case, impl, mode, list(shape)]), "--repeats", str(repeats),
           "--device", device] + (["--threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        return {"case": case, "impl": impl, "mode": mode, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    """One line per (case, mode): peer vs quantkit time and peak memory, and the ratios."""
    by = {(r["case"], r["mode"], r["impl"]): r for r in rows}
    lines = ["| case | input | mode | peer ms | quantkit ms | speed-up | peer peak MiB | quantkit peak MiB | memory ratio |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for mode in ("train", "eval"):
            p, q = by.get((case, mode, "peer")), by.get((case, mode, "quantkit"))
            if p is None or q is None:
                continue
            if "error" in p or "error" in q:
                lines.append(f"| {case} | | {mode} | {p.get('error', '')} | {q.get('error', '')} | | | | |")
                continue
            # CPU RSS growth misses small reused blocks: no ratio under 1 MiB.
            ratio = f"{p['peak_mib'] / q['peak_mib']:.1f}x" if q["peak_mib"] >= 1 else "n/a"
            shape = "x".join(map(str, p["shape"]))
            lines.append(f"| {case} | {shape} | {mode} | {p['time_ms']:.1f} | {q['time_ms']:.1f} | "
                         f"{p['time_ms'] / q['time_ms']:.2f}x | {p['peak_mib']:.1f} | {q['peak_mib']:.1f} | "
                         f"{ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "error" not in r]
    labels = list(dict.fromkeys(f"{r['case']}\n{r['mode']}" for r in ok))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "time_ms", "time (ms, median)"), (axes[1], "peak_mib", "peak memory (MiB)")):
        for k, impl in enumerate(("peer", "quantkit")):
            vals = {f"{r['case']}\n{r['mode']}": r[key] for r in ok if r["impl"] == impl}
            ax.bar([i + 0.4 * k for i in range(len(labels))], [vals.get(lbl, 0) for lbl in labels], 0.4, label=impl)
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, fontsize=7, rotation=45, ha="right")
        ax.set_yscale("log")  # the cases span four orders of magnitude
        ax.set_title(title + ", log scale")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes, for a quick look")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", help="case names to run (default: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--stem", help="output file name (default: compat[_quick][_cuda])")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        case, impl, mode, shape = json.loads(args.one)
        print(json.dumps(run_one(case, impl, mode, tuple(shape), args.repeats, args.device)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or "compat" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else "")
    settings = {**vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count()}
    command = " ".join(["python benchmarks/bench_compat.py"] + sys.argv[1:])
    rows = []
    for case, (_, _, shape) in CASES.items():
        if args.only and case not in args.only:
            continue
        shape = QUICK[case] if args.quick else shape
        for mode in ("train", "eval"):
            for impl in ("peer", "quantkit"):
                rows.append(_subprocess(case, impl, mode, shape, args.repeats, args.device, args.threads))
                print(json.dumps(rows[-1]), flush=True)
                # Written after every row, so a run cut short still leaves what it measured.
                (out / f"{stem}.json").write_text(json.dumps({"settings": settings, "results": rows}, indent=1))
                (out / f"{stem}.md").write_text(f"`{command}`\n\n{markdown(rows)}\n")
    plot(rows, out / f"{stem}.png")
    print(markdown(rows))
    print(f"wrote {out / (stem + '.json')}, .md, .png")


if __name__ == "__main__":
    main()
