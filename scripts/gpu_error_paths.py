"""Does an error raised inside quantkit's C++ ops reach Python as an exception on this machine's torch?

Each case runs in its own subprocess (a crash there is a result, not the end of the check). The "op" cases call
torch.ops.quantkit.* directly, so the C++ check is what raises (torch 2.11 was seen to crash there); the "wrapper"
cases call quantkit.ops, whose Python checks must raise first wherever kernel errors crash.
Prints one line per case: the case, the subprocess's exit code and the last line it printed.

    python scripts/gpu_error_paths.py        # on a machine with the extension built (CUDA cases need a GPU)
"""
from __future__ import annotations

import subprocess
import sys

CASES = {
    "wrapper, cpu: NaN in z": "z = torch.randn(10, 4); z[3, 1] = float('nan'); quantkit.ops.nearest_codeword(z, torch.randn(5, 4))",
    "wrapper, cuda: inf in codebook": "c = torch.randn(5, 4, device='cuda'); c[2, 0] = float('inf'); "
                                      "quantkit.ops.nearest_codeword(torch.randn(10, 4, device='cuda'), c)",
    "wrapper, cuda: k above the kernel limit": "quantkit.ops.nearest_codeword(torch.randn(10, 4, device='cuda'), "
                                               "torch.randn(50, 4, device='cuda'), k=33)",
    "wrapper, cuda: soft_assign NaN temperature": "quantkit.ops.soft_assign(torch.randn(10, 4, device='cuda'), "
                                                  "torch.randn(5, 4, device='cuda'), torch.tensor(float('nan'), device='cuda'))",
    "op, cpu: NaN in z": "z = torch.randn(10, 4); z[3, 1] = float('nan'); op(z, torch.randn(5, 4), 0, 1)",
    "op, cpu: k above K": "op(torch.randn(10, 4), torch.randn(5, 4), 0, 6)",
    "op, cuda: k above the kernel limit": "op(torch.randn(10, 4, device='cuda'), torch.randn(50, 4, device='cuda'), 0, 33)",
    "op, cuda: NaN in z": "z = torch.randn(10, 4, device='cuda'); z[3, 1] = float('nan'); "
                      "op(z, torch.randn(5, 4, device='cuda'), 0, 1)",
    "op, cuda: NaN in z, then a good call": "z = torch.randn(10, 4, device='cuda'); z[3, 1] = float('nan'); c = torch.randn(5, 4, device='cuda')\n"
                                        "try:\n    op(z, c, 0, 1)\nexcept RuntimeError:\n    pass\n"
                                        "print(op(z.nan_to_num(), c, 0, 1)[0].shape)",
}

PRELUDE = "import torch, quantkit\nop = torch.ops.quantkit.nearest_codeword.default\n"
WRAP = ("try:\n{body}\nexcept (RuntimeError, ValueError) as error:\n"
        "    print('raised', type(error).__name__ + ':', str(error).splitlines()[0])\n")


def main() -> None:
    import torch

    for name, body in CASES.items():
        if "cuda" in name.split(":")[0] and not torch.cuda.is_available():
            print(f"{name}: skipped (no CUDA device)")
            continue
        code = PRELUDE + WRAP.format(body="\n".join("    " + line for line in body.splitlines()))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        print(f"{name}: exit code {proc.returncode}; {lines[-1] if lines else '(no output)'}", flush=True)


if __name__ == "__main__":
    main()
