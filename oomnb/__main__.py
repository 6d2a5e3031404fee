"""Command line: ``oomnb demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oomnb", description="CUDA out-of-memory errors, solved in notebooks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="run a short training loop that runs out of memory and recovers")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
