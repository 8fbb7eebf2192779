"""Command line: `quantkit info` and the train / sample / eval commands of the layers above.

Each command lives in the module that owns it and exposes ``add_arguments(parser)`` and ``run(args)``; this file
only lists them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module that implements it, one-line help)
COMMANDS = {
    "info": ("quantkit.info", "versions, built kernels, which kernel runs on each device, thread count"),
    "demo": ("quantkit.demo", "the whole pipeline on built-in digits: tokenizers, MaskGIT, VAR, samples, report"),
    "train-tokenizer": ("quantkit.tokenizers.train", "train a VQVAE / VQGAN / TiTok tokenizer on any quantizer"),
    "eval-tokenizer": ("quantkit.tokenizers.evaluate", "PSNR, SSIM, codebook use, throughput and a reconstruction grid"),
    "train-generator": ("quantkit.generators.train", "train MaskGIT / VAR / RQ-Transformer / PixelCNN on a tokenizer's IDs"),
    "sample": ("quantkit.generators.sample", "class labels, count, steps, guidance, seed -> PNG grid and token IDs"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="quantkit", description="quantkit: discrete image tokenizers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    importlib.import_module(COMMANDS[args.command][0]).run(args)
