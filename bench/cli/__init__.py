"""The ``bench`` command: ``main`` parses the options (``parser.py``) and calls one thin adapter per command, kept by
stage in ``components.py`` (list, tokens, profile, plan), ``training.py`` (run, sweep, world build), ``evaluation.py``
(eval, generate, prune-curve, peer, report) and ``export.py`` (export-hf, save-pretrained).

Bad input (an unknown name, a missing file, a checkpoint of the wrong shape) prints one actionable line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from bench.cli import components, evaluation, export, training
from bench.cli.common import demo_images  # noqa: F401  (tests and benchmarks draw the same images)
from bench.cli.config_file import parse_with_config
from bench.cli.parser import build_parser
from connector_zoo.io import keep_freed_memory
from connector_zoo.registry import RegistryError

COMMANDS = {
    name[len("cmd_") :]: f
    for module in (components, training, evaluation, export)
    for name, f in vars(module).items()
    if name.startswith("cmd_")
}


USER_ERRORS: tuple[type[BaseException], ...] = (RegistryError, ValueError, OSError, KeyError, TypeError)


def main(argv: list[str] | None = None, errors: tuple[type[BaseException], ...] = USER_ERRORS) -> int:
    args = parse_with_config(build_parser(COMMANDS), argv)
    keep_freed_memory()  # before the model's first allocations; only with CONNECTOR_ZOO_MALLOC=keep
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except errors as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"bench {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
