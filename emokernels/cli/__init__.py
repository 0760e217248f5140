"""``emokernels`` command line. Each front end in this package (``generate``, ``judge``, ``directions``,
``steer``, ``components``, ``run``, ``export_gguf``) contributes its subcommand with ``register(subparsers)``;
``options`` holds the flags they share. The front ends sit on top of the stage packages and
import from them, never the other way round.

The parser is built without importing torch or transformers (``emokernels --help`` takes a fraction
of a second); each command imports what it needs when it runs. Errors print one line,
``emokernels CMD: error: ...``, and exit with status 2; ``--debug`` (or ``EMOKERNELS_DEBUG=1``)
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

# module path -> registers these subcommands (light modules: heavy imports happen inside the commands)
STAGES = (
    "emokernels.cli.generate",  # generate
    "emokernels.cli.judge",  # judge
    "emokernels.cli.directions",  # directions
    "emokernels.cli.steer",  # steer
    "emokernels.cli.components",  # components
    "emokernels.cli.run",  # run
    "emokernels.cli.export_gguf",  # export-gguf
)


class UsageError(ValueError):
    """A bad command line (unknown flag, bad value, missing argument)."""


class ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`UsageError` instead of printing the usage block and exiting, so ``main``
    reports it in the same one line as every other error (and returns instead of exiting)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    from .options import HelpFormatter

    p = ArgumentParser(prog="emokernels", description="Find and control emotion circuits in transformer LMs.",
                       formatter_class=HelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also EMOKERNELS_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in STAGES:
        importlib.import_module(mod).register(sub)
    for sp in sub.choices.values():  # `emokernels CMD --debug` works too
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        where = f" writing {e.filename}" if e.filename else ""
        return f"disk full (no space left on device){where}: free some space or use another --out, then rerun the same command"
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in text:
        text = f"{text}: {e.filename}"
    if isinstance(e, KeyError):
        text = f"missing key {text}"
    return text or type(e).__name__


def _reported(e: BaseException) -> bool:
    """Errors that are a user's input or environment, told in one line (anything else is a bug: traceback)."""
    if type(e).__module__.startswith("emokernels"):
        return True  # the project's own error types
    return isinstance(e, (ValueError, TypeError, OSError, ImportError))


def main(argv=None) -> int:
    # Spin-waiting OpenMP threads make generation 3-8x slower on a busy machine; OpenMP reads this
    # once, when torch loads, so set it before any command imports torch (a user's value wins).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("EMOKERNELS_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"emokernels {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - filtered just below
        if debug or not _reported(e):
            raise
        print(f"emokernels {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2

