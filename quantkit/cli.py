"""Command line: `quantkit info` and the train / sample / eval / bench commands of the layers above.

Each command lives in the module that owns it and exposes ``add_arguments(parser)`` and ``run(args)``; this file
lists them and owns what every command shares: bad input ends in one line naming the argument and what was
expected (exit status 1; 2 for what argparse rejects), never a traceback unless ``--debug`` (or ``QUANTKIT_DEBUG=1``) asks for one; Ctrl-C is
exit status 130. The flag types below (``positive_int``, ``json_object``, ...) give argparse those one-line errors.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

# command -> (module that implements it, one-line help)
COMMANDS = {
    "info": ("quantkit.info", "versions, built kernels, which kernel runs on each device, thread count"),
    "demo": ("quantkit.demo", "the whole pipeline on built-in digits: tokenizers, MaskGIT, VAR, a KL-VAE and MAR, samples, report"),
    "train-tokenizer": ("quantkit.tokenizers.train", "train a VQVAE / VQGAN / TiTok tokenizer on any quantizer"),
    "eval-tokenizer": ("quantkit.tokenizers.evaluate", "PSNR, SSIM, codebook use, throughput and a reconstruction grid"),
    "train-generator": ("quantkit.generators.train", "train MaskGIT / VAR / RQ-Transformer / PixelCNN on a tokenizer's IDs"),
    "sample": ("quantkit.generators.sample", "class labels, count, steps, guidance, seed -> PNG grid and token IDs"),
    "bench": ("quantkit.bench_codebook", "your codebook: search speed vs faiss and torch, utilisation, perplexity, "
                                         "dead codes, usage histogram"),
    "check-quantizer": ("quantkit.check_quantizer", "run the quantizer invariant suite on your own Quantizer class"),
}


class CommandError(Exception):
    """Bad input, reported as one line (the message names the argument)."""


#: What counts as the user's input being wrong rather than quantkit being broken: one line, no traceback.
USER_ERRORS = (CommandError, ValueError, OSError)


@contextmanager
def argument(flag: str) -> Iterator[None]:
    """Errors raised inside become a CommandError that starts with ``flag``, e.g. ``--generator: ...``."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise CommandError(f"{flag}: {_message(err)}") from err


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {str(err.filename)!r}"
    return str(err)


def _number(kind, text: str, ok, expected: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    return _number(int, text, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(float, text, lambda v: v > 0 and v != float("inf"), "a positive finite number")


def nonnegative_float(text: str) -> float:
    return _number(float, text, lambda v: 0 <= v < float("inf"), "a finite number >= 0")


def unit_interval(text: str) -> float:
    return _number(float, text, lambda v: 0 < v <= 1, "a number in (0, 1]")


def json_object(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def read_json_file(path: str, flag: str = "--config") -> dict:
    """A JSON object from a file; a missing file or malformed JSON is a CommandError naming ``flag``."""
    try:
        with open(path) as f:
            value = json.load(f)
    except ValueError as err:
        raise CommandError(f"{flag} {path!r}: not valid JSON ({err})") from None
    except OSError as err:
        raise CommandError(f"{flag}: {_message(err)}") from None
    if not isinstance(value, dict):
        raise CommandError(f"{flag} {path!r}: expected a JSON object of fields, got {type(value).__name__}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage block is noise next to a one-line reason
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = _Parser(prog="quantkit", description="quantkit: discrete image tokenizers for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    debug = args.debug or os.environ.get("QUANTKIT_DEBUG", "") not in ("", "0")
    try:
        importlib.import_module(COMMANDS[args.command][0]).run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit(130)
    except USER_ERRORS as err:
        if debug:
            raise
        raise SystemExit(f"quantkit {args.command}: error: {_message(err)}") from None
