"""``python -m deepspeed_checkfree.supervisor SCRIPT ARGS``: the per-rank supervisor's command (its code lives in
:mod:`deepspeed_checkfree.resilience.supervisor`)."""

from .resilience.supervisor import *  # noqa: F401,F403 - the 0.1 import path of the supervisor module
from .resilience.supervisor import run_and_exit

if __name__ == "__main__":
    run_and_exit()
