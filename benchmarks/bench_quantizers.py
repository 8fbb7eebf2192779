"""Training-step benchmark of quantkit's quantizers against vector-quantize-pytorch (the issue's benchmark).

One training step = forward + backward + codebook update, on ``tokens`` vectors of size ``dim`` with ``codes``
codes (default 65,536 x 256 x 16,384). For each method and side (quantkit / peer) a fresh subprocess, capped with
RLIMIT_AS (CPU) so that running out of memory is a reported result rather than a crash, builds the module, runs
``warmup`` + ``repeats`` steps and reports the median step time and the peak memory of a step (CUDA: peak
allocated; CPU: peak RSS above the RSS before the first step).

    python benchmarks/bench_quantizers.py            # the full configuration
    python benchmarks/bench_quantizers.py --quick    # a small one, for a smoke test
    python benchmarks/bench_quantizers.py --only vq  # some methods only
    python benchmarks/bench_quantizers.py --only fsq --update  # re-run some rows, keep the others' results

Writes benchmarks/results/bench_quantizers.{json,md,png}. To add a method, append a ``Method`` to ``METHODS``:
a name, a function building the quantkit module and one building the peer (or None) from a ``Shape``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
from torch import nn

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Shape:
    tokens: int = 65_536
    dim: int = 256
    codes: int = 16_384
    depth: int = 4  # residual methods
    batch: int = 16  # tokens are laid out as (batch, tokens // batch, dim)


@dataclass(frozen=True)
class Method:
    name: str
    quantkit: Callable[[Shape], nn.Module]
    peer: Callable[[Shape], nn.Module] | None = None
    peer_name: str = ""


# ----------------------------------------------------------------------------------------------------------------
# the methods: same configuration on both sides (EMA codebook, decay 0.99, commitment 0.25, straight-through)


def _qk_vq(s: Shape) -> nn.Module:
    from quantkit import VectorQuantizer
    from quantkit.quantizers import EMAConfig

    return VectorQuantizer(s.dim, s.codes, ema=EMAConfig(decay=0.99), commitment_weight=0.25)


def _peer_vq(s: Shape) -> nn.Module:
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(dim=s.dim, codebook_size=s.codes, decay=0.99, commitment_weight=0.25, rotation_trick=False)


def _qk_rq(s: Shape) -> nn.Module:
    from quantkit import create_quantizer

    return create_quantizer("residual", dim=s.dim, quantizer="vq", depth=s.depth, codebook_size=s.codes,
                            commitment_weight=0.25)


def _peer_rq(s: Shape) -> nn.Module:
    from vector_quantize_pytorch import ResidualVQ

    return ResidualVQ(dim=s.dim, num_quantizers=s.depth, codebook_size=s.codes, decay=0.99, commitment_weight=0.25,
                      rotation_trick=False)


def _qk_lfq(bits: int) -> Callable[[Shape], nn.Module]:
    def build(s: Shape) -> nn.Module:  # MAGVIT-v2 losses: commitment 0.25, entropy 0.1 (exact over all 2^bits codes)
        from quantkit import LFQ

        return LFQ(dim=s.dim, codebook_size=2 ** bits, commitment_weight=0.25, entropy=dict(weight=0.1))
    return build


def _peer_lfq(bits: int) -> Callable[[Shape], nn.Module]:
    def build(s: Shape) -> nn.Module:
        from vector_quantize_pytorch import LFQ

        return LFQ(dim=s.dim, codebook_size=2 ** bits, entropy_loss_weight=0.1, commitment_loss_weight=0.25)
    return build


_FSQ_LEVELS = (8, 8, 8, 6, 5)  # the paper's 2^14-sized grid (15,360 codes)


def _qk_fsq(s: Shape) -> nn.Module:
    from quantkit import FSQ

    return FSQ(_FSQ_LEVELS, dim=s.dim)


def _peer_fsq(s: Shape) -> nn.Module:
    from vector_quantize_pytorch import FSQ

    return FSQ(levels=list(_FSQ_LEVELS), dim=s.dim)


def _qk_fsp(s: Shape) -> nn.Module:  # FSQ's grid through a tanh CDF; every element perturbed in training (the default)
    from quantkit.quantizers import FSP

    return FSP(_FSQ_LEVELS, dim=s.dim)


def _peer_fsp(s: Shape) -> nn.Module:
    from vector_quantize_pytorch import FSP

    return FSP(levels=list(_FSQ_LEVELS), dim=s.dim)


def _qk_bsq(s: Shape) -> nn.Module:  # LFQ on the sphere (BSQ), MAGVIT-v2's losses as in the lfq rows
    from quantkit import LFQ

    return LFQ(dim=s.dim, codebook_size=2 ** 16, commitment_weight=0.25, entropy=dict(weight=0.1), spherical=True)


def _peer_bsq(s: Shape) -> nn.Module:
    from vector_quantize_pytorch import LFQ

    return LFQ(dim=s.dim, codebook_size=2 ** 16, entropy_loss_weight=0.1, commitment_loss_weight=0.25, spherical=True)


class _ChannelsFirst(nn.Module):
    """(B, N, dim) in and out around a module that reads (B, dim, N) (the peer's LatentQuantize always does)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        quantized, *rest = self.module(x.transpose(1, 2))
        return (quantized.transpose(1, 2), *rest)


def _both(make: Callable) -> tuple[Callable[[Shape], nn.Module], Callable[[Shape], nn.Module]]:
    """(quantkit's compat adapter, the peer's class), each built by the same ``make(library, shape)``."""
    def ours(s: Shape) -> nn.Module:
        import quantkit.compat.vector_quantize_pytorch as lib
        return make(lib, s)

    def theirs(s: Shape) -> nn.Module:
        import vector_quantize_pytorch as lib
        return make(lib, s)
    return ours, theirs


def _hierarchical_scales(s: Shape) -> tuple[int, ...]:
    """1, 4, 16, ... up to the sequence length (a 1-D coarse-to-fine pyramid)."""
    n, scales = s.tokens // s.batch, [1]
    while scales[-1] * 4 < n:
        scales.append(scales[-1] * 4)
    return (*scales, n)


METHODS: list[Method] = [
    Method("vq", _qk_vq, _peer_vq, "VectorQuantize"),
    Method("rq", _qk_rq, _peer_rq, "ResidualVQ"),
    Method("fsq", _qk_fsq, _peer_fsq, "FSQ"),
    Method("lfq-2^16", _qk_lfq(16), _peer_lfq(16), "LFQ"),
    Method("lfq-2^18", _qk_lfq(18), _peer_lfq(18), "LFQ"),
    Method("fsp", _qk_fsp, _peer_fsp, "FSP"),
    Method("bsq-2^16", _qk_bsq, _peer_bsq, "LFQ(spherical=True)"),
    # 2 groups x depth levels, one projection per group around its residual stack (as the peer builds it)
    Method("grouped-rfsq", *_both(lambda lib, s: lib.GroupedResidualFSQ(dim=s.dim, groups=2, levels=list(_FSQ_LEVELS),
                                                                         num_quantizers=s.depth)),
           "GroupedResidualFSQ"),
    Method("grouped-rlfq", *_both(lambda lib, s: lib.GroupedResidualLFQ(dim=s.dim, groups=2, codebook_size=s.codes,
                                                                         num_quantizers=s.depth)),
           "GroupedResidualLFQ"),
    Method("simvq", *_both(lambda lib, s: lib.SimVQ(dim=s.dim, codebook_size=s.codes)), "SimVQ"),
    Method("residual-simvq", *_both(lambda lib, s: lib.ResidualSimVQ(dim=s.dim, codebook_size=s.codes,
                                                                      num_quantizers=s.depth)), "ResidualSimVQ"),
    Method("latent-quantize", *_both(lambda lib, s: _ChannelsFirst(lib.LatentQuantize(list(_FSQ_LEVELS), s.dim))),
           "LatentQuantize"),
    Method("hierarchical-vq", *_both(lambda lib, s: lib.HierarchicalVQ(dim=s.dim, codebook_size=s.codes,
                                                                        scales=_hierarchical_scales(s),
                                                                        channel_first=False, kmeans_init=False)),
           "HierarchicalVQ"),
]


# ----------------------------------------------------------------------------------------------------------------
# one side of one method, in its own process


def _loss_and_output(out) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized, scalar aux loss) from a QuantizerOutput or any of the peer's return tuples."""
    if hasattr(out, "quantized") and hasattr(out, "loss"):  # the peer's LFQ returns a namedtuple with .quantized
        return out.quantized, out.loss
    quantized = out[0]
    extra = [t for t in out[2:3] if isinstance(t, torch.Tensor)]
    return quantized, (extra[0].sum() if extra else quantized.new_zeros(()))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(method: Method, side: str, shape: Shape, device: str, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    build = method.quantkit if side == "quantkit" else method.peer
    module = build(shape).to(device).train()
    x = torch.randn(shape.batch, shape.tokens // shape.batch, shape.dim, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    cuda = device.startswith("cuda")

    def step():
        out = module(x)
        quantized, loss = _loss_and_output(out)
        (loss + (quantized * grad).sum()).backward()  # a decoder's gradient stands in as `grad`
        x.grad = None
        module.zero_grad(set_to_none=True)

    times = []
    base = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss is KiB on Linux
    return {"status": "ok", "median_s": statistics.median(times), "times_s": times, "peak_bytes": int(peak)}


def _run_one(name: str, side: str, args, shape: Shape) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, side, "--device", args.device,
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--shape", json.dumps(asdict(shape))]
    cap = int(args.mem_cap_gb * 2**30)

    def limit():  # address-space cap: a large allocation fails inside the worker instead of the machine swapping
        if not args.device.startswith("cuda"):
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"status": "timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (done.stderr or "").strip().splitlines()[-3:]
    oom = done.returncode in (-9, 137) or any("memory" in ln.lower() or "alloc" in ln.lower() for ln in tail)
    return {"status": "oom" if oom else "error", "detail": " | ".join(tail)[-300:]}


def _worker_main(name: str, side: str, args) -> None:
    method = {m.name: m for m in METHODS}[name]
    shape = Shape(**json.loads(args.shape))
    try:
        result = _worker(method, side, shape, args.device, args.warmup, args.repeats)
    except (MemoryError, RuntimeError) as e:  # CPU allocator failures under RLIMIT_AS, CUDA OOM
        text = str(e)
        oom = isinstance(e, MemoryError) or "memory" in text.lower() or "alloc" in text.lower()
        result = {"status": "oom" if oom else "error", "detail": text[:300]}
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# report


def _fmt_time(r: dict) -> str:
    return f"{r['median_s']:.3f} s" if r.get("status") == "ok" else r.get("status", "-").upper()


def _fmt_mem(r: dict) -> str:
    return f"{r['peak_bytes'] / 2**20:,.0f} MiB" if r.get("status") == "ok" else r.get("status", "-").upper()


def _ratio(a: dict, b: dict, key: str) -> str:
    if a.get("status") == "ok" and b.get("status") == "ok" and a[key] > 0:
        return f"{b[key] / a[key]:.1f}x"
    if a.get("status") == "ok" and b.get("status") in ("oom", "timeout"):
        return f"peer {b['status']}"
    return "-"


def _markdown(rows: list[dict], meta: dict) -> str:
    s = meta["shape"]
    lines = [f"Training step (forward + backward + codebook update), {s['tokens']:,} tokens x dim {s['dim']}, "
             f"{s['codes']:,} codes (residual: depth {s['depth']}); {meta['device']}, torch {meta['torch']}, "
             f"median of {meta['repeats']} after {meta['warmup']} warm-up; " +
             ("memory is the peak CUDA memory allocated during a step, above what was allocated before it."
              if str(meta["device"]).startswith("cuda") else
              f"CPU memory is peak RSS growth, capped at {meta['mem_cap_gb']} GiB."), "",
             "| method | quantkit time | peer | peer time | speed-up | quantkit peak mem | peer peak mem | "
             "memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, p = r["quantkit"], r.get("peer", {})
        lines.append(f"| {r['name']} | {_fmt_time(q)} | {r['peer_name'] or '-'} | {_fmt_time(p) if p else '-'} | "
                     f"{_ratio(q, p, 'median_s') if p else '-'} | {_fmt_mem(q)} | {_fmt_mem(p) if p else '-'} | "
                     f"{_ratio(q, p, 'peak_bytes') if p else '-'} |")
    commands = list(dict.fromkeys(r.get("command", meta["command"]) for r in rows))
    lines += [""] + [f"Reproduce: `{c}`" + (" (rows: " + ", ".join(r["name"] for r in rows
                                                                    if r.get("command", meta["command"]) == c) + ")"
                                          if len(commands) > 1 else "") for c in commands] + [""]
    return "\n".join(lines)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["name"] for r in rows]
    for ax, key, scale, label in ((axes[0], "median_s", 1.0, "step time (s)"),
                                  (axes[1], "peak_bytes", 2**-20, "peak memory (MiB)")):
        for offset, side, color in ((-0.2, "quantkit", "tab:blue"), (0.2, "peer", "tab:orange")):
            for i, r in enumerate(rows):
                res = r.get(side) or {}
                if res.get("status") == "ok":
                    ax.bar(i + offset, res[key] * scale, 0.4, color=color, label=side if i == 0 else None)
                elif res:
                    ax.text(i + offset, 1, res.get("status", "?").upper(), ha="center", rotation=90, fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("quantkit vs vector-quantize-pytorch, one training step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _merge_rows(path: str, rows: list[dict], meta: dict) -> list[dict]:
    """The rows of an earlier run at ``path`` with those of this run replacing them by name, in METHODS order."""
    with open(path) as f:
        old = json.load(f)
    if old["meta"]["shape"] != meta["shape"]:
        raise SystemExit(f"--update: {path} holds shape {old['meta']['shape']}, this run {meta['shape']}")
    merged = {r["name"]: {"command": old["meta"]["command"], **r} for r in old["rows"]}
    merged.update({r["name"]: r for r in rows})
    order = [m.name for m in METHODS]
    return sorted(merged.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4,096 tokens x dim 64, 1,024 codes")
    parser.add_argument("--only", nargs="*", help="method names to run (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=4, help="depth of the residual methods")
    parser.add_argument("--tokens", type=int, help="override the number of tokens (a multiple of 16)")
    parser.add_argument("--codes", type=int, help="override the codebook size")
    parser.add_argument("--mem-cap-gb", type=float, default=12.0, help="RLIMIT_AS of each CPU worker")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method and side")
    parser.add_argument("--no-peer", action="store_true", help="skip vector-quantize-pytorch")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--update", action="store_true",
                        help="replace only the rows run in the existing results of this shape (each row keeps the "
                             "command that produced it)")
    args = parser.parse_args(argv)
    if args.worker:
        _worker_main(*args.worker, args)
        return
    shape = Shape(4096, 64, 1024, args.depth, 4) if args.quick else Shape(depth=args.depth)
    shape = replace(shape, **{k: v for k, v in (("tokens", args.tokens), ("codes", args.codes)) if v is not None})
    methods = [m for m in METHODS if not args.only or m.name in args.only]
    command = "python benchmarks/bench_quantizers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for m in methods:
        row = {"name": m.name, "peer_name": m.peer_name, "command": command,
               "quantkit": _run_one(m.name, "quantkit", args, shape)}
        if m.peer is not None and not args.no_peer:
            row["peer"] = _run_one(m.name, "peer", args, shape)
        print(f"{m.name}: quantkit {_fmt_time(row['quantkit'])} {_fmt_mem(row['quantkit'])}"
              + (f" | peer {_fmt_time(row['peer'])} {_fmt_mem(row['peer'])}" if "peer" in row else ""), flush=True)
        rows.append(row)
    from quantkit import _ext

    meta = {"shape": asdict(shape), "device": args.device if not args.device == "cpu" else
            f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})", "torch": torch.__version__,
            "kernel": _ext.kernel_for("nearest_codeword", args.device.split(":")[0]), "warmup": args.warmup,
            "repeats": args.repeats, "mem_cap_gb": args.mem_cap_gb,
            "command": command}
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else "" if shape == Shape(depth=shape.depth) else f"_{shape.tokens}x{shape.codes}"
    stem = os.path.join(args.out, "bench_quantizers" + suffix)
    if args.update and os.path.exists(stem + ".json"):
        rows = _merge_rows(stem + ".json", rows, meta)
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(rows, meta))
    _plot(rows, stem + ".png")
    print(_markdown(rows, meta))


if __name__ == "__main__":
    main()
