"""Loads the compiled kernels (``quantkit._C``) and answers which kernel will run where.

The op schemas live in :mod:`quantkit.ops` and exist without the extension; loading ``_C`` only adds CPU / CUDA
kernels that override the pure-PyTorch references. Set ``QUANTKIT_DISABLE_EXT=1`` to run the references.
"""
from __future__ import annotations

import glob
import os
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

#: Why the extension is not loaded (None when it is).
LOAD_ERROR: str | None = None
#: Path of the loaded shared object (None when not loaded).
LIBRARY_PATH: str | None = None


def _load() -> None:
    global LOAD_ERROR, LIBRARY_PATH
    disabled_by_user = os.getenv("QUANTKIT_DISABLE_EXT", "0") not in ("", "0")
    if disabled_by_user:
        LOAD_ERROR = "disabled by QUANTKIT_DISABLE_EXT=1"
    else:
        candidates = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
        if not candidates:
            LOAD_ERROR = "quantkit._C is not built (run `pip install --no-build-isolation -e .`)"
        else:
            try:
                torch.ops.load_library(candidates[0])
                LIBRARY_PATH = candidates[0]
            except OSError as error:  # built for another torch, missing symbol, ...
                LOAD_ERROR = f"quantkit._C failed to load ({error}); rebuild with `pip install --no-build-isolation -e .`"
    # A user who set QUANTKIT_DISABLE_EXT asked for the references: only an unexpected failure is worth a warning.
    if LOAD_ERROR is not None and not disabled_by_user:
        warnings.warn(f"quantkit: fused kernels unavailable: {LOAD_ERROR}. Every op runs its pure-PyTorch reference.",
                      RuntimeWarning, stacklevel=3)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``quantkit::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    name = f"quantkit::{op}"
    if not torch._C._dispatch_has_kernel(name):
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


def kernel_for(op: str, device_type: str) -> str:
    """Which implementation runs for ``op`` on ``device_type``: "fused CPU", "fused CUDA" or "reference"."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return f"fused {key}" if has_kernel(op, key) else "reference"


#: QUANTKIT_CPU_ISA values and the kernels' answer (quantkit::cpu_isa) in words.
_ISA_NAMES = {2: "avx512", 1: "avx2", 0: "scalar"}


def cpu_isa() -> str:
    """The instruction set the CPU kernels run with now: "avx512", "avx2" or "scalar" (the portable build), the best
    this CPU has unless ``QUANTKIT_CPU_ISA`` caps it; "reference" when the extension is not loaded."""
    if LIBRARY_PATH is None:
        return "reference"
    try:
        return _ISA_NAMES[int(torch.ops.quantkit.cpu_isa())]
    except RuntimeError as error:  # an unknown QUANTKIT_CPU_ISA value, named by the kernel
        message = str(error).splitlines()[0]
        raise ValueError(message[message.find("QUANTKIT_CPU_ISA"):]) from None
