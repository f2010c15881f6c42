"""The ``checkfree`` console command. Each subcommand lives with the concern it serves and registers itself here."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Collection, List, Optional

from . import __version__

# Subcommand -> the module that provides ``add_subcommand(subparsers)``. A command line that names a subcommand
# imports only that module, so `checkfree events` loads neither torch nor DeepSpeed; `checkfree --help` imports
# them all (`repair` loads torch).
SUBCOMMAND_MODULES = {
    "demo": "deepspeed_checkfree.demo",
    "drain": "deepspeed_checkfree.resilience.drain_command",
    "events": "deepspeed_checkfree.events",
    "experiment": "deepspeed_checkfree.experiment",
    "repair": "deepspeed_checkfree.repair",
}


def build_parser(commands: Optional[Collection[str]] = None) -> argparse.ArgumentParser:
    """The ``checkfree`` parser with the subcommands in ``commands`` (default: all of them)."""
    parser = argparse.ArgumentParser(prog="checkfree", description="CheckFree: recover lost pipeline stages "
                                     "without checkpoints.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMAND_MODULES.items():
        if commands is None or name in commands:
            importlib.import_module(module).add_subcommand(sub)
    return parser


def _commands_needed(argv: List[str]) -> Optional[Collection[str]]:
    """The subcommands the parser needs for ``argv``: the one it names, none for a bare ``--version``, else all."""
    named = next((a for a in argv if not a.startswith("-")), None)
    if named in SUBCOMMAND_MODULES:
        return (named,)
    if named is None and "--version" in argv and not {"-h", "--help"} & set(argv):
        return ()
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_commands_needed(argv)).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
