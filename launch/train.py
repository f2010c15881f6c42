"""Train a small GPT with DeepSpeed's pipeline engine on the shipped public-domain corpus, CheckFree from the config:
the demo's training script (``deepspeed_checkfree/demo/train.py``), run from a clone without installing.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu deepspeed --num_gpus 4 launch/train.py \
        --deepspeed_config configs/checkfree_middle.json --steps 60 --out runs/demo

    # surviving real process loss (every rank under the supervisor, with a job token):
    CHECKFREE_JOB_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(16))') OMP_NUM_THREADS=1 \
        DS_ACCELERATOR=cpu deepspeed --num_gpus 4 --module deepspeed_checkfree.supervisor --pid-dir runs/job/pids \
        launch/train.py --deepspeed_config configs/checkfree_no_failure.json --steps 60 --out runs/job

`python launch/train.py --help` lists its options.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing
from deepspeed_checkfree.demo.train import main  # noqa: E402

if __name__ == "__main__":
    main()
