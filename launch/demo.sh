#!/usr/bin/env bash
# Demo: train the small GPT on 4 CPU pipeline stages with the stock deepspeed launcher, lose a stage at a planned
# step, rebuild it from its neighbours and keep training.
#
#   bash launch/demo.sh                                   # CheckFree: lose middle stage 2 at step 30
#   CONFIG=configs/checkfree_plus_first.json bash launch/demo.sh   # CheckFree+: lose the first stage
#   CONFIG=configs/baseline.json bash launch/demo.sh      # no CheckFree, for comparison
#
# Prints the loss per step; writes OUT/metrics.csv and OUT/events.jsonl (one JSON record per loss and rebuild).
set -euo pipefail
cd "$(dirname "$0")/.."

STAGES=${STAGES:-4}
STEPS=${STEPS:-60}
CONFIG=${CONFIG:-configs/checkfree_middle.json}
OUT=${OUT:-runs/demo}
MASTER_PORT=${MASTER_PORT:-29650}
PYTHON_BIN=${PYTHON_BIN:-$(command -v python)}

# CPU: one thread per rank (2 cores are shared by all ranks; without this a step is ~30x slower).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

mkdir -p "$OUT"
rm -f "$OUT/events.jsonl"
# On CPU DeepSpeed counts one device, so --num_gpus is what starts STAGES ranks.
timeout "${TIMEOUT_S:-900}" "$(dirname "$PYTHON_BIN")/deepspeed" --num_gpus "$STAGES" --master_port "$MASTER_PORT" \
    launch/train.py --deepspeed_config "$CONFIG" --steps "$STEPS" --stages "$STAGES" --out "$OUT"

if [ -s "$OUT/events.jsonl" ]; then
    echo "--- events ($OUT/events.jsonl) ---"
    cat "$OUT/events.jsonl"
fi
