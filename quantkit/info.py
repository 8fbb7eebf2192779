"""`quantkit info`: the first thing to run when something is slow or missing."""
from __future__ import annotations

import argparse
import os
import platform

import torch

from . import __version__, _ext

OPS = ("nearest_codeword", "soft_assign", "soft_assign_backward")


def _isa_line() -> str:
    try:
        isa = _ext.cpu_isa()
    except ValueError as error:
        return f"invalid request ({error})"
    cap = os.getenv("QUANTKIT_CPU_ISA")
    return isa + (f" (capped by QUANTKIT_CPU_ISA={cap})" if cap else " (the best this CPU has; "
                  "QUANTKIT_CPU_ISA=avx512|avx2|scalar caps it)")


def report() -> str:
    lines = [
        f"quantkit {__version__}",
        f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, CUDA available: "
        f"{torch.cuda.is_available()})",
        f"python {platform.python_version()} on {platform.machine()}",
        f"extension: {_ext.LIBRARY_PATH or 'not loaded: ' + str(_ext.LOAD_ERROR)}",
        f"threads: torch.get_num_threads() = {torch.get_num_threads()}",
        f"CPU kernels' instruction set: {_isa_line()}",
        "",
        f"{'op':<22} {'CPU kernel built':<17} {'CUDA kernel built':<18} {'runs on cpu':<12} runs on cuda",
    ]
    for op in OPS:
        cpu, cuda = _ext.has_kernel(op, "CPU"), _ext.has_kernel(op, "CUDA")
        on_cuda = _ext.kernel_for(op, "cuda") if torch.cuda.is_available() else "(no CUDA device)"
        lines.append(f"{op:<22} {str(cpu):<17} {str(cuda):<18} {_ext.kernel_for(op, 'cpu'):<12} {on_cuda}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> None:
    del args
    print(report())
