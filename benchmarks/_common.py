"""Shared benchmark plumbing: timing, peak-memory measurement, memory caps, subprocess workers and result files.

Every benchmark runs each measured method in its own subprocess (so one method's allocator state, thread pool or
out-of-memory failure cannot touch another's), reports the median of several timed calls, and writes one JSON
(for machines), one markdown table (for the README) and one PNG (for people) from the same run.

Peak extra memory is Linux's VmHWM (reset through /proc/self/clear_refs) minus the resident size right before
the first measured call, so inputs that already exist are not counted.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------------------------------------------
# threads


def pin_threads(threads: int) -> None:
    """Set every thread-count knob (call before importing torch / numpy / faiss in a worker)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)


# ----------------------------------------------------------------------------------------------------------------
# memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_memory() -> int:
    """Reset VmHWM to the current resident size; returns that size in bytes (the baseline of peak_extra_bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux, or not permitted: peaks then include everything before
        pass
    return _status_kib("VmRSS") * 1024


def peak_extra_bytes(baseline: int) -> int:
    """Peak resident memory since reset_peak_memory() above its baseline."""
    return max(0, _status_kib("VmHWM") * 1024 - baseline)


def cap_address_space(extra_gib: float) -> float:
    """Limit this process's virtual memory to its current size + extra_gib (so a huge allocation fails cleanly
    instead of swapping the machine). Returns the cap in GiB."""
    current = _status_kib("VmSize") * 1024
    limit = int(current + extra_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return limit / 2 ** 30


def available_gib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2 ** 20
    return 8.0


def is_out_of_memory(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, MemoryError) or "can't allocate" in text or "out of memory" in text or \
        "cannot allocate" in text or "std::bad_alloc" in text


# ----------------------------------------------------------------------------------------------------------------
# timing


def time_calls(fn: Callable[[], object], min_reps: int = 3, max_reps: int = 15, budget_s: float = 4.0,
               sync: Callable[[], None] | None = None) -> list[float]:
    """Wall times of repeated calls: at least min_reps, then more until budget_s is spent or max_reps reached."""
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(fns: dict[str, Callable[[], object]], min_reps: int = 3, max_reps: int = 15,
                      budget_s: float = 6.0) -> dict[str, list[float]]:
    """Times several functions call by call in turn (a, b, a, b, ...), so a noisy machine slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    reps = 0
    while reps < max_reps and (reps < min_reps or sum(sum(t) for t in times.values()) < budget_s):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        reps += 1
    return times


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def gemm_gflops(n: int = 4096, reps: int = 5, device: str = "cpu") -> float:
    """Median float32 GEMM throughput (n x n x n torch.mm) with the current thread settings, in GFLOP/s."""
    import torch

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    torch.mm(a, b, out=out)
    times = time_calls(lambda: torch.mm(a, b, out=out), min_reps=reps, max_reps=reps, sync=sync)
    return 2 * n ** 3 / median(times) / 1e9


# ----------------------------------------------------------------------------------------------------------------
# subprocess workers: the parent passes a JSON spec on argv, the worker prints one JSON line prefixed by TAG


TAG = "@@RESULT@@ "


def emit(result: dict) -> None:
    print(TAG + json.dumps(result), flush=True)


def run_worker(script: str, spec: dict, timeout_s: float) -> dict:
    """Runs `python script --worker <spec>` and returns its JSON result (or a failure record)."""
    cmd = [sys.executable, script, "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout_s:.0f} s"}
    for line in done.stdout.splitlines()[::-1]:
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
    return {"status": f"failed (exit {done.returncode}): {tail[0][:200]}"}


# ----------------------------------------------------------------------------------------------------------------
# formatting and output files


def fmt_time(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} us"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 2 ** 30:
        return f"{n / 2 ** 30:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB"


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(stem: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Writes results/<stem>.json and results/<stem>.md; returns their paths (the caller draws the PNG)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path.write_text(markdown + "\n")
    return json_path, md_path
