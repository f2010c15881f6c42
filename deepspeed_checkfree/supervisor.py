"""``python -m deepspeed_checkfree.supervisor SCRIPT ARGS``: the per-rank supervisor's command (its code lives in
:mod:`deepspeed_checkfree.resilience.supervisor`)."""
import sys

from .resilience.supervisor import *  # noqa: F401,F403 - the 0.1 import path of the supervisor module
from .resilience.supervisor import main

if __name__ == "__main__":
    sys.exit(main())
