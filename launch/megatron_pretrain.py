#!/usr/bin/env python
"""Run Megatron-LM's own, unmodified pretraining script with CheckFree installed (no patch needed).

    torchrun --nproc-per-node 4 launch/megatron_pretrain.py /path/to/Megatron-LM/pretrain_gpt.py \
        --pipeline-model-parallel-size 4 ... --save ckpt --load ckpt [--checkfree-strategy gradnorm_average]

Equivalent to ``python -m deepspeed_checkfree.megatron.run``: the hook records each pipeline stage's gradient norm,
saves neighbour replicas with every checkpoint, and rebuilds a lost stage's shard before Megatron loads it. Use the
Megatron-LM checkout matching megatron-core (tag core_v0.16.1 for megatron-core 0.16.1).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from deepspeed_checkfree.megatron.run import main  # noqa: E402

if __name__ == "__main__":
    main()
