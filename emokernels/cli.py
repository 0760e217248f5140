"""``emokernels`` command line. Each stage module contributes its subcommands with ``register(subparsers)``."""
from __future__ import annotations

import argparse
import importlib
import sys

# module path -> registers these subcommands
STAGES = (
    "emokernels.data.generate",  # generate
    "emokernels.judge.cli",  # judge
    "emokernels.discover.directions_cli",  # directions
    "emokernels.control.steering_cli",  # steer
    "emokernels.discover.components_cli",  # components
    "emokernels.pipeline",  # run
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emokernels", description="Find and control emotion circuits in transformer LMs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in STAGES:
        importlib.import_module(mod).register(sub)
    return p


def main(argv=None) -> int:
    from .judge.base import JudgeUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, JudgeUnavailableError) as e:  # bad input or a judge down: one clear line
        print(f"emokernels {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
