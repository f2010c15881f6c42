"""``python -m deepspeed_checkfree.demo``: the same as ``checkfree demo``."""
import sys

from . import main

sys.exit(main())
