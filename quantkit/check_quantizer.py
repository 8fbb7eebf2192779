"""`quantkit check-quantizer module:Class`: the Quantizer contract's invariants on your own quantizer class.

    quantkit check-quantizer mypkg.quant:MyVQ --kwargs '{"dim": 8, "codebook_size": 64}'
    quantkit check-quantizer path/to/my_quant.py:MyVQ

Each invariant of :data:`quantkit.testing.CHECKS` runs on its own (through :func:`quantkit.testing.check_quantizer`,
so the same seeds and copies): one line per invariant, ``ok`` or ``FAIL`` with the first violation the check found
(what differed, by how much, on which input). Exit status 1 when any invariant fails.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path


def load_class(spec: str):
    """``package.module:Class`` or ``path/to/file.py:Class`` -> the class."""
    from .cli import CommandError

    module_name, sep, class_name = spec.rpartition(":")
    if not sep or not module_name or not class_name:
        raise CommandError(f"expected module:Class (e.g. mypkg.quant:MyVQ or my_quant.py:MyVQ), got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise CommandError(f"{spec!r}: file {module_name!r} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise CommandError(f"{spec!r}: cannot import {module_name!r} ({err})") from None
    if not hasattr(module, class_name):
        raise CommandError(f"{spec!r}: module {module_name!r} has no {class_name!r}")
    return getattr(module, class_name)


def run_checks(q, compile: bool = False) -> list[tuple[str, str | None]]:
    """(invariant, None if it holds else the failure message) for every check, in CHECKS order."""
    from .testing import CHECKS, check_quantizer

    results = []
    for name in CHECKS:
        if name == "compile" and not compile:
            continue
        try:
            check_quantizer(q, compile=compile, skip=tuple(n for n in CHECKS if n != name))
            results.append((name, None))
        except AssertionError as err:
            results.append((name, " ".join(str(err).split())))
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import json_object

    parser.add_argument("target", help="module:Class or file.py:Class of a quantkit.Quantizer subclass")
    parser.add_argument("--kwargs", type=json_object, default={}, help="JSON keyword arguments for the constructor")
    parser.add_argument("--compile", action="store_true", help="also check torch.compile(fullgraph=True) (slow)")


def run(args: argparse.Namespace) -> None:
    from .cli import CommandError
    from .quantizers import Quantizer

    cls = load_class(args.target)
    if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
        raise CommandError(f"{args.target!r} is not a quantkit.Quantizer subclass")
    try:
        q = cls(**args.kwargs)
    except TypeError as err:
        raise CommandError(f"--kwargs: {cls.__name__}(**{args.kwargs}) failed: {err}") from None
    results = run_checks(q, compile=args.compile)
    for name, failure in results:
        print(f"{'ok  ' if failure is None else 'FAIL'} {name}" + (f": {failure}" if failure else ""))
    failed = [name for name, failure in results if failure is not None]
    print(f"{len(results) - len(failed)} of {len(results)} invariants hold" +
          (f"; failing: {', '.join(failed)}" if failed else ""))
    if failed:
        raise SystemExit(1)
