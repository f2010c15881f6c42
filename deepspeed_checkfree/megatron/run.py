"""Run an unmodified Megatron-LM pretraining script with the CheckFree hook installed.

    torchrun --nproc-per-node 4 -m deepspeed_checkfree.megatron.run /path/to/Megatron-LM/pretrain_gpt.py \
        --pipeline-model-parallel-size 4 ... --save ckpt --load ckpt --checkfree-lr-boost 1.1

The script's directory goes first on ``sys.path`` (``pretrain_gpt.py`` imports ``gpt_builders`` and
``model_provider`` from it, and ``megatron.training`` from the checkout), the hook is installed, and the script runs
as ``__main__`` with the remaining arguments.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else 2)
    script = os.path.abspath(argv[0])
    if not os.path.isfile(script):
        print(f"deepspeed_checkfree.megatron.run: {argv[0]!r} is not a file; pass the pretraining script (e.g. "
              f"Megatron-LM/pretrain_gpt.py) first", file=sys.stderr)
        sys.exit(2)
    sys.path.insert(0, os.path.dirname(script))
    from . import install

    install()
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
