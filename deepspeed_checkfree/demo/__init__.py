"""``checkfree demo`` (also ``python -m deepspeed_checkfree.demo``): a 4-stage pipeline trains a small GPT on the
shipped corpus under the stock ``deepspeed`` launcher on this machine, loses a stage, rebuilds it from its
neighbours and keeps training. Runs from an installed package: the training script (:mod:`.train`), the model and
the corpus ship with it.

:mod:`.job` starts the launcher and, with ``--kill-stage``, kills a trainer; :mod:`.train` is what every rank runs.
This module only defines the command line, so ``checkfree --help`` stays light.
"""
from __future__ import annotations

import argparse
from typing import List, Optional

__all__ = ["add_arguments", "add_subcommand", "main", "run"]

DESCRIPTION = """\
Run the CheckFree demo on this machine: STAGES pipeline ranks train a small GPT on the shipped corpus under the
stock deepspeed launcher. Stage 2 loses its weights and optimizer state at step 30 and is rebuilt from stages 1
and 3 (CheckFree), or the first stage is lost and copied from stage 1 (--mode checkfree_plus); with --kill-stage,
a real kill -9 of that stage's trainer under the CheckFree supervisor instead. Prints the loss of every step and
the events, and writes OUT/metrics.csv and OUT/events.jsonl. Nothing is JIT-compiled on CPU: the demo uses
torch's AdamW and turns DeepSpeed's shm all-reduce op off."""
EPILOG = """examples:
  checkfree demo                                   # CheckFree: stage 2 lost at step 30 (injected)
  checkfree demo --mode checkfree_plus             # CheckFree+: the FIRST stage lost at step 30
  checkfree demo --kill-stage 2 --kill-step 20     # a real kill -9 of stage 2's trainer after step 19
  checkfree demo --mode baseline                   # stock DeepSpeed, no CheckFree
  checkfree demo --config my_ds_config.json        # your own DeepSpeed config (with a "checkfree" section)
environment: OMP_NUM_THREADS (default 1), DS_ACCELERATOR (default cpu; cuda on GPUs), CHECKFREE_JOB_TOKEN
(default: a random one)."""

MODES = ("checkfree", "checkfree_plus", "baseline")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (``checkfree demo`` and ``python -m deepspeed_checkfree.demo`` share them)."""
    p.add_argument("--mode", choices=MODES, default=None,
                   help="checkfree (default): a middle stage is lost; checkfree_plus: an edge stage is lost; "
                        "baseline: DeepSpeed's own engine, nothing lost")
    p.add_argument("--lose-stage", type=int, default=None, metavar="S",
                   help="the stage that loses its state (injected; default 2, under checkfree_plus 0)")
    p.add_argument("--lose-step", type=int, default=None, metavar="K", help="the step it is lost at (default 30)")
    p.add_argument("--kill-stage", type=int, default=None, metavar="S",
                   help="instead of an injected loss, kill -9 stage S's trainer process (every rank then runs under "
                        "the CheckFree supervisor, which starts a replacement)")
    p.add_argument("--kill-step", type=int, default=20, metavar="K", help="kill after step K-1 (default 20)")
    p.add_argument("--config", default=None, metavar="DS_CONFIG.json",
                   help="a DeepSpeed config to train with instead of the demo's (not with --mode/--lose-*)")
    p.add_argument("--stages", type=int, default=4, help="pipeline stages = ranks (default 4)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--master-port", type=int, default=29650,
                   help="the launcher's port; the CheckFree store uses the next one (default 29650)")
    p.add_argument("--timeout", type=float, default=900, metavar="S",
                   help="end the demo (exit code 124) if it runs longer (default 900 s)")


def add_subcommand(subparsers) -> None:
    """Register ``checkfree demo``."""
    p = subparsers.add_parser("demo", help="run the 4-stage demo: a stage is lost and rebuilt, training goes on",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns its exit code."""
    from .job import run_demo
    return run_demo(args)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m deepspeed_checkfree.demo``."""
    p = argparse.ArgumentParser(prog="python -m deepspeed_checkfree.demo", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))
