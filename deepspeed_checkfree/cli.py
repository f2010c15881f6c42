"""The ``checkfree`` console command. Each subcommand lives with the concern it serves and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# Modules that provide ``add_subcommand(subparsers)``; imported lazily so `checkfree --help` stays fast.
SUBCOMMAND_MODULES = (
    "deepspeed_checkfree.events",
    "deepspeed_checkfree.experiment",
    "deepspeed_checkfree.repair",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="checkfree", description="CheckFree: recover lost pipeline stages "
                                     "without checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_subcommand(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
