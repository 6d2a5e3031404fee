"""Command line: ``oomnb demo`` and ``oomnb profile NOTEBOOK``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oomnb", description="CUDA out-of-memory errors, solved in notebooks.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="run a short training loop that runs out of memory and recovers")
    prof = commands.add_parser(
        "profile",
        help="run a notebook headlessly with every cell measured",
        description="Run NOTEBOOK in a real kernel with every cell measured; print a per-cell table and the "
        "advice for any cell that ran out of memory.",
    )
    prof.add_argument("notebook", help="the .ipynb file")
    prof.add_argument("--limit", help="run as on a device of this size or card: 16GiB, T4, A100-40GB")
    prof.add_argument("--device", help="auto, simulated, cuda or cuda:N")
    prof.add_argument("--json", metavar="PATH", help="write every report as JSON")
    prof.add_argument("--output", metavar="PATH", help="write the executed notebook, reports included")
    prof.add_argument("--fail-over", metavar="SIZE", help="exit 3 if any cell's peak passes SIZE")
    prof.add_argument("--timeout", type=int, default=600, help="seconds a cell may run (default 600)")
    prof.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.command == "profile":
        from .cli.profile import main as profile_main

        return profile_main(args)
    if args.command == "demo":
        from .cli.demo import run

        return run()
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
